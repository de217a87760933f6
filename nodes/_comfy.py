"""The one adapter between the pack and ComfyUI's services.

Inside ComfyUI: registers the pack's model folders with folder_paths (appending, so the
user's extra_model_paths stay), and installs ComfyUI's device choice, memory management,
ProgressBar and interruption as mgie_core runtime hooks. Outside ComfyUI nothing here
imports ComfyUI and the library keeps its standalone defaults (tqdm, Ctrl-C, model dirs
from --models-dir / XMGIE_MODELS_DIR, the registry's own offloading).

Memory inside ComfyUI. Every module the pack's loaders register (``runtime.manage``: a
UNet, a VAE, a text encoder, BLIP-2, the MGIE LLM, SAM, an identity encoder) is wrapped
in a ``comfy.model_patcher.ModelPatcher`` (around a plain holder module: diffusers and
transformers models have a read-only ``device`` property that ModelPatcher assigns) and
placed on ComfyUI's offload device. A node that runs it calls ``runtime.use``, which
calls ``comfy.model_management.load_models_gpu`` with every pack model the computation
needs: ComfyUI frees memory first (offloading its own models and the pack's, least
needed first) and moves them to its torch device. They then sit in ComfyUI's list of
loaded models like its own, so a later ``free_memory`` (another model loading, "Free
model and node cache") moves them back to the CPU. ``force_full_load=True``: ComfyUI's
partial (lowvram) loading only works for its own ``comfy.ops`` layers and would leave
plain torch layers of one model on two devices. The load runs inside
``torch.inference_mode(False)`` so the moved weights are normal tensors (ComfyUI's own
trainer does the same), and ``runtime.normal_weights`` repairs a module ComfyUI moved
inside inference mode.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from ..mgie_core import paths, runtime

_installed = False


def comfy_available() -> bool:
    """True when running inside ComfyUI (its folder_paths and comfy package import)."""
    return (importlib.util.find_spec("folder_paths") is not None
            and importlib.util.find_spec("comfy") is not None)


def _register_folders(folder_paths) -> None:
    for fam in paths.FAMILIES.values():
        for name in fam.comfy_names:
            default = os.path.join(folder_paths.models_dir, name)
            exts = set(fam.extensions) if fam.kind == "file" else set()
            if name in folder_paths.folder_names_and_paths:
                # Keep every path already registered (extra_model_paths.yaml included).
                known, known_exts = folder_paths.folder_names_and_paths[name]
                if default not in known:
                    known.append(default)
                if exts and isinstance(known_exts, set):
                    known_exts.update(exts)
            else:
                folder_paths.folder_names_and_paths[name] = ([default], exts)
    # ComfyUI ships the SD 1.x CLIP tokenizer as comfy/sd1_tokenizer: let the
    # single-file loader find it under the name "sd1_tokenizer".
    try:
        import comfy

        comfy_dir = os.path.dirname(comfy.__file__)
        known = folder_paths.folder_names_and_paths[paths.CLIP_TOKENIZER.folder][0]
        if comfy_dir not in known:
            known.append(comfy_dir)
    except Exception:
        pass


def install() -> bool:
    """Hook ComfyUI's services into mgie_core. Safe to call many times."""
    global _installed
    if _installed or not comfy_available():
        return _installed
    import comfy.model_management as mm
    import comfy.utils
    import folder_paths

    _register_folders(folder_paths)
    paths.set_comfy_provider(folder_paths.get_folder_paths)

    class _Bar:
        def __init__(self, total: int, desc: str):
            self._bar = comfy.utils.ProgressBar(total)

        def update(self, n: int = 1) -> None:
            self._bar.update(n)

        def close(self) -> None:
            pass

    def _interrupt() -> None:
        try:
            mm.throw_exception_if_processing_interrupted()
        except mm.InterruptProcessingException:
            raise

    runtime.set_hooks(
        device=mm.get_torch_device,
        offload_device=mm.unet_offload_device,
        progress=_Bar,
        check_interrupt=_interrupt,
        free_memory=lambda nbytes, dev: mm.free_memory(nbytes, dev),
        **memory_hooks(mm, comfy.model_patcher),
    )
    _installed = True
    return True


class _Holder(torch.nn.Module):
    """What ModelPatcher wraps: a plain module holding one of the pack's modules.
    ModelPatcher sets ``.device`` and bookkeeping attributes on the module it wraps,
    which diffusers/transformers models refuse (``device`` is a read-only property)."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.wrapped = module


def memory_hooks(mm, model_patcher) -> dict:
    """The runtime hooks that put the pack's models under ComfyUI's memory management:
    ``mm`` is ``comfy.model_management``, ``model_patcher`` ``comfy.model_patcher``."""

    def wrap_model(entry: runtime.ManagedModule):
        return model_patcher.ModelPatcher(_Holder(entry.module), load_device=entry.load_device,
                                          offload_device=entry.offload_device,
                                          size=entry.nbytes)

    def load_models(entries: list[runtime.ManagedModule]) -> None:
        patchers = [e.handle for e in entries if e.handle is not None]
        with torch.inference_mode(False):
            mm.load_models_gpu(patchers, force_full_load=True)
        for e in entries:
            if e.handle is None:     # registered before install(): move it ourselves
                runtime.registry().load([e])
            runtime.normal_weights(e.module)
            e.loaded = True

    def is_loaded(entry: runtime.ManagedModule) -> bool:
        p = entry.handle
        if p is None:
            return entry.loaded
        return (any(m is p for m in mm.loaded_models())
                and p.loaded_size() >= p.model_size())

    return {"wrap_model": wrap_model, "load_models": load_models, "is_loaded": is_loaded,
            "load_on_register": lambda entry: False}
