"""The one adapter between the pack and ComfyUI's services.

Inside ComfyUI: registers the pack's model folders with folder_paths (appending, so the
user's extra_model_paths stay), and installs ComfyUI's device choice, memory freeing,
ProgressBar and interruption as mgie_core runtime hooks. Outside ComfyUI nothing here
imports ComfyUI and the library keeps its standalone defaults (tqdm, Ctrl-C, model dirs
from --models-dir / XMGIE_MODELS_DIR).
"""

from __future__ import annotations

import importlib.util
import os

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
    )
    _installed = True
    return True
