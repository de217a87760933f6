"""The one adapter between the pack and ComfyUI's services.

Inside ComfyUI: registers the pack's model folders with folder_paths (appending, so the
user's extra_model_paths stay), and installs ComfyUI's device choice, memory management,
ProgressBar and interruption as mgie_core runtime hooks. Outside ComfyUI nothing here
imports ComfyUI and the library keeps its standalone defaults (tqdm, Ctrl-C, model dirs
from --models-dir / XMGIE_MODELS_DIR, the registry's own offloading).

Memory inside ComfyUI. Every module the pack's loaders register (``memory.manage``: a
UNet, a VAE, a text encoder, BLIP-2, the MGIE LLM, SAM, an identity encoder) is wrapped
in a ``comfy.model_patcher.ModelPatcher`` (around a plain holder module: diffusers and
transformers models have a read-only ``device`` property that ModelPatcher assigns) and
placed on ComfyUI's offload device. A node that runs it calls ``memory.use``, which
calls ``comfy.model_management.load_models_gpu`` with every pack model the computation
needs: ComfyUI frees memory first (offloading its own models and the pack's, least
needed first) and moves them to its torch device. They then sit in ComfyUI's list of
loaded models like its own, so a later ``free_memory`` (another model loading, "Free
model and node cache") moves them back to the CPU. ``force_full_load=True``: ComfyUI's
partial (lowvram) loading only works for its own ``comfy.ops`` layers and would leave
plain torch layers of one model on two devices. The load runs inside
``torch.inference_mode(False)`` so the moved weights are normal tensors (ComfyUI's own
trainer does the same), and ``grad_mode.normal_weights`` repairs a module ComfyUI moved
inside inference mode.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from ..mgie_core import grad_mode, host, memory, paths

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
    # single-file loader find it under the name "sd1_tokenizer". ``comfy`` is a namespace
    # package (no __init__.py, so no __file__): its folder is on __path__. Nothing here may
    # stop the pack from loading: a failure only costs this convenience, and says so.
    try:
        import comfy

        comfy_dir = next(d for d in comfy.__path__
                         if os.path.isdir(os.path.join(d, "sd1_tokenizer")))
        known = folder_paths.folder_names_and_paths[paths.CLIP_TOKENIZER.folder][0]
        if comfy_dir not in known:
            known.append(comfy_dir)
    except Exception as exc:  # an older or unusual ComfyUI
        import logging

        logging.getLogger(__name__).warning(
            "xMGIE: ComfyUI's SD 1.x tokenizer folder (comfy/sd1_tokenizer) could not be "
            "registered (%s: %s); single-file checkpoints then need models/clip_tokenizer/"
            "clip-vit-large-patch14", type(exc).__name__, exc)


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
        mm.throw_exception_if_processing_interrupted()

    host.set_hooks(
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

    def wrap_model(entry: memory.ManagedModule):
        return model_patcher.ModelPatcher(_Holder(entry.module), load_device=entry.load_device,
                                          offload_device=entry.offload_device,
                                          size=entry.nbytes)

    def load_models(entries: list[memory.ManagedModule]) -> None:
        patchers = [e.handle for e in entries if e.handle is not None]
        with torch.inference_mode(False):
            mm.load_models_gpu(patchers, force_full_load=True)
        for e in entries:
            if e.handle is None:     # registered before install(): move it ourselves
                memory.registry().load([e])
            grad_mode.normal_weights(e.module)
            e.loaded = True

    def is_loaded(entry: memory.ManagedModule) -> bool:
        p = entry.handle
        if p is None:
            return entry.loaded
        return (any(m is p for m in mm.loaded_models())
                and p.loaded_size() >= p.model_size())

    return {"wrap_model": wrap_model, "load_models": load_models, "is_loaded": is_loaded,
            "load_on_register": lambda entry: False}


# --- ComfyUI's MODEL / CLIP / VAE -> the pack's SD model (the bridge node) ----------------

# ComfyUI model types -> the family the pack reads (comfy.supported_models class names;
# subclasses such as unCLIP, the x4 upscaler or the distilled SDXLs are not these).
SUPPORTED_MODEL_TYPES = {"SD15": "sd1", "SD15_instructpix2pix": "sd1", "SD20": "sd2",
                         "SDXL": "sdxl", "SDXL_instructpix2pix": "sdxl"}
# The ComfyUI text-encoder models each family's CLIP holds.
_CLIP_MODELS = {"sd1": ("clip_l",), "sd2": ("clip_h",), "sdxl": ("clip_l", "clip_g")}
_NOT_SD = ("Load an SD 1.x, SD 2.x or SDXL checkpoint (or a fine-tune of one, or an SD 1.5 "
           "or SDXL InstructPix2Pix) with Load Checkpoint.")
# Above this sigma the schedule is a zero-terminal-SNR one (ComfyUI's zsnr), not the
# scaled-linear schedule the pack's DDIM uses (whose largest sigma is about 14.6).
_ZSNR_SIGMA = 100.0


def _name(obj) -> str:
    return type(obj).__name__


def _check_model(model):
    """(model config, family, prediction type) of a ComfyUI MODEL (a ModelPatcher), or
    a clear error."""
    from ..mgie_core.errors import InputError

    base = getattr(model, "model", None)
    config = getattr(base, "model_config", None)
    if base is None or config is None or not hasattr(model, "patches"):
        raise InputError("model", f"got a {_name(model)}", "ComfyUI's MODEL from Load "
                         "Checkpoint (or a LoRA loader after it)", _NOT_SD)
    import comfy.model_sampling

    kind = _name(config)
    if kind not in SUPPORTED_MODEL_TYPES:
        raise InputError("model", f"is a {kind} model", "an SD 1.x, SD 2.x or SDXL model "
                         f"(ComfyUI model types {', '.join(SUPPORTED_MODEL_TYPES)})", _NOT_SD)
    family = SUPPORTED_MODEL_TYPES[kind]
    sampling = model.get_model_object("model_sampling")
    # The prediction type is the first of comfy.model_sampling's EPS family in the MRO
    # (ComfyUI combines it with the schedule class: ModelSampling(Discrete, EPS)).
    kinds = [c for c in type(sampling).__mro__ if c.__module__ == comfy.model_sampling.__name__
             and issubclass(c, comfy.model_sampling.EPS)]
    allowed = {comfy.model_sampling.EPS: "epsilon",
               comfy.model_sampling.V_PREDICTION: "v_prediction"}
    if not kinds or kinds[0] not in allowed:
        got = kinds[0].__name__ if kinds else _name(sampling)
        raise InputError("model", f"predicts {got} (a ModelSampling node or a checkpoint "
                         "of another prediction type)", "an epsilon (EPS) or v-prediction "
                         "model", "Remove the ModelSampling node before this one.")
    sigma_max = float(getattr(sampling, "sigma_max", 0.0))
    if sigma_max > _ZSNR_SIGMA:
        raise InputError("model", f"samples on a zero-terminal-SNR schedule (largest sigma "
                         f"{sigma_max:g})", "the scaled-linear schedule SD was trained on",
                         "Remove the zsnr ModelSampling setting before this node.")
    return config, family, allowed[kinds[0]]


def _check_clip(clip, family: str):
    """ComfyUI's text-encoder models of the family, in order (SDXL: CLIP-L, OpenCLIP-bigG)."""
    from ..mgie_core.errors import InputError

    encoder = getattr(clip, "cond_stage_model", None)
    if encoder is None or not hasattr(clip, "patcher"):
        raise InputError("clip", f"got a {_name(clip)}", "ComfyUI's CLIP from Load Checkpoint",
                         _NOT_SD)
    want = _CLIP_MODELS[family]
    held = tuple(n for n in ("clip_l", "clip_g", "clip_h") if hasattr(encoder, n))
    if set(held) != set(want):
        raise InputError("clip", f"is a {_name(encoder)} text encoder (holding "
                         f"{', '.join(held) or 'no CLIP'})", f"the CLIP of the same checkpoint "
                         f"as the model ({' and '.join(want)})", _NOT_SD)
    layer = getattr(clip, "layer_idx", None)
    # SD 1.x reads the last layer, so -1 is its default; SD 2.x and SDXL read the
    # penultimate one, which only "no setting" (None) keeps.
    if layer is not None and not (family == "sd1" and layer == -1):
        raise InputError("clip", f"is set to stop at layer {layer} (CLIP Set Last Layer)",
                         "the layer the model was trained with, which the pack's text "
                         "encoding uses", "Remove CLIP Set Last Layer before this node.")
    return encoder, [getattr(encoder, n) for n in want]


def _check_vae(vae):
    from ..mgie_core.errors import InputError

    first = getattr(vae, "first_stage_model", None)
    if first is None or not hasattr(vae, "patcher"):
        raise InputError("vae", f"got a {_name(vae)}", "ComfyUI's VAE from Load Checkpoint "
                         "or Load VAE", _NOT_SD)
    channels = getattr(vae, "latent_channels", None)
    if channels != 4 or getattr(vae, "latent_dim", 2) != 2 or \
            not any(k.startswith("encoder.down.") for k in first.state_dict()):
        raise InputError("vae", f"is a {_name(first)} with {channels} latent channels",
                         "an SD AutoencoderKL (4 latent channels)", _NOT_SD)
    return first


def _group_norms(module) -> int:
    import torch

    for m in module.modules():
        if isinstance(m, torch.nn.GroupNorm):
            return int(m.num_groups)
    return 32


def _activation_name(clip_model) -> str:
    import comfy.clip_model

    act = clip_model.transformer.text_model.encoder.layers[0].mlp.activation
    for name, fn in comfy.clip_model.ACTIVATIONS.items():
        if fn is act:
            return name
    return "quick_gelu"


def _text_state(encoder_state: dict, name: str, projection: bool, drop_last: bool) -> dict:
    """One ComfyUI text-encoder model's tensors in transformers' names (``text_model.*``,
    and ``text_projection.weight`` where the pack's model has the projection). SD 2.x
    reads OpenCLIP-H's penultimate layer (through the final norm): its last layer is
    left out, as diffusers' SD 2.x text encoder has one layer fewer."""
    import re

    prefix = f"{name}.transformer."
    out = {k[len(prefix):]: v for k, v in encoder_state.items()
           if k.startswith(prefix + "text_model.")
           or (projection and k == prefix + "text_projection.weight")}
    if drop_last:
        rx = re.compile(r"text_model\.encoder\.layers\.(\d+)\.")
        last = max(int(m.group(1)) for k in out for m in [rx.match(k)] if m)
        out = {k: v for k, v in out.items() if not k.startswith(
            f"text_model.encoder.layers.{last}.")}
    return out


def sd_parts(model, clip, vae):
    """(UNet, text encoder, VAE) :class:`mgie_core.models.from_ldm.LDMPart` of ComfyUI's
    MODEL, CLIP and VAE (SD 1.x, SD 2.x or SDXL), their tensors being ComfyUI's own, LoRA
    patches applied. SDXL: the text-encoder part carries OpenCLIP-bigG (ComfyUI's
    ``clip_g``, with its projection) as ``second``; SD 2.x: OpenCLIP-H (``clip_h``) up to
    its penultimate layer, which is what SD 2.x reads.

    How the patched weights are obtained: ``comfy.model_management.load_models_gpu(
    [model, clip.patcher, vae.patcher], force_patch_weights=True, force_full_load=True)``
    (as ComfyUI's own CheckpointSave does before it reads the weights) loads the three
    onto ComfyUI's device with every weight patch applied into the modules' weights
    (no low-VRAM on-the-fly patches); their ``state_dict()`` tensors are then taken as
    they are, not copied.

    Lifetime, which the pack cannot change:
      * The pack's model keeps the tensors it was given for as long as ComfyUI caches the
        bridge node's output. When ComfyUI later unpatches (another LoRA on the same
        checkpoint, a strength change) it puts its ORIGINAL tensors back into its modules
        and the pack's model keeps the patched ones: results stay those of the graph at
        bridge time. Patching replaces tensors, it does not write into them, except where
        a ModelPatcher has ``weight_inplace_update`` (then this function copies the
        tensors instead of sharing them) and for hook-based LoRAs (Create Hook LoRA),
        which ComfyUI writes in place at sampling time: not supported with this node.
      * When ComfyUI offloads the model (moves its modules to the CPU to make room), the
        pack's references keep the device copies alive: ComfyUI's memory accounting does
        not see them. On a GPU that cannot hold both, free the pack's model (rerun
        without this node, or ComfyUI's "unload models") before loading others.
      * Sampling-time model patches (FreeU, attention patches, ModelSampling nodes) are
        options of ComfyUI's sampler, not weights, and are not carried over; a
        ModelSampling other than epsilon or v-prediction, a zero-terminal-SNR schedule,
        and CLIP Set Last Layer, are refused.
    """
    import logging

    import comfy.model_management as mm

    from ..mgie_core.models import from_ldm

    config, family, prediction = _check_model(model)
    encoder, clip_models = _check_clip(clip, family)
    first = _check_vae(vae)
    options = getattr(model, "model_options", {}) or {}
    if (options.get("transformer_options") or {}).get("patches") or \
            options.get("model_function_wrapper") or getattr(model, "object_patches", None):
        logging.getLogger(__name__).warning(
            "xMGIE SD Model From ComfyUI: the MODEL carries sampling-time patches (e.g. "
            "FreeU, attention patches); only weight patches such as LoRAs are carried over "
            "to the pack's model.")
    mm.load_models_gpu([model, clip.patcher, vae.patcher], force_patch_weights=True,
                       force_full_load=True)
    unet = model.model.diffusion_model
    unet_state = unet.state_dict()
    encoder_state = encoder.state_dict()
    names = _CLIP_MODELS[family]
    text_states = [_text_state(encoder_state, name, projection=(name == "clip_g"),
                               drop_last=(family == "sd2")) for name in names]
    vae_state = first.state_dict()
    if any(getattr(p, "weight_inplace_update", False)
           for p in (model, clip.patcher, vae.patcher)):
        # Later patches would be written into these very tensors: take copies.
        unet_state, vae_state, *text_states = (
            {k: v.clone() for k, v in d.items()} for d in (unet_state, vae_state, *text_states))
    unet_config = config.unet_config
    heads = unet_config.get("num_heads", 8)
    head_channels = unet_config.get("num_head_channels", -1) if heads == -1 else None
    embedder = getattr(model.model, "embedder", None)      # SDXL's time-id embedding
    patched = len(getattr(model, "patches", {}) or {})
    clip_patched = len(getattr(clip.patcher, "patches", {}) or {})
    source = (f"ComfyUI {_name(config)} model ({patched} UNet and {clip_patched} CLIP "
              "weights patched)")
    shipped = from_ldm.shipped_configs(family)
    unet_part = from_ldm.LDMPart(
        "unet", unet_state, from_ldm.unet_config_from_ldm(
            unet_state, num_heads=heads if heads != -1 else 8,
            num_head_channels=head_channels, norm_num_groups=_group_norms(unet),
            base=shipped["unet"], source=source,
            addition_time_embed_dim=int(getattr(embedder, "dim", 256))),
        source, scheduler_config={**shipped["scheduler"], "prediction_type": prediction})
    tokenizers = {"clip_l": lambda: clip.tokenizer.clip_l.tokenizer,
                  "clip_g": lambda: from_ldm.open_clip_tokenizer(clip.tokenizer.clip_g.tokenizer),
                  "clip_h": lambda: from_ldm.open_clip_tokenizer(clip.tokenizer.clip_h.tokenizer)}
    text_parts = []
    for name, cm, state in zip(names, clip_models, text_states):
        layers = cm.transformer.text_model.encoder.layers
        kind = "text_encoder_2" if name == "clip_g" else "text_encoder"
        text_parts.append(from_ldm.LDMPart(
            kind, state, from_ldm.text_config_from_ldm(
                state, num_attention_heads=layers[0].self_attn.heads,
                hidden_act=_activation_name(cm), source=source),
            source, tokenizer=tokenizers[name]()))
    text_part = text_parts[0]
    if len(text_parts) > 1:
        text_part.second = text_parts[1]
    latent_format = getattr(config, "latent_format", None)
    vae_part = from_ldm.LDMPart(
        "vae", vae_state, from_ldm.vae_config_from_ldm(
            vae_state, norm_num_groups=_group_norms(first), source=source,
            base=shipped["vae"],
            scaling_factor=getattr(latent_format, "scale_factor", None)), source)
    return unet_part, text_part, vae_part
