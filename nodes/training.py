"""Training nodes: load trained modules and edit with them, and train them from a graph
(docs/algorithms.md §14).

* xMGIE Load Trained Modules reads a folder of the ``xmgie_trained`` models folder (the
  ``final/`` of ``xmgie train``, or what xMGIE Train Edit Modules wrote) into one socket,
  ``XMGIE_TRAINED``: xMGIE's PFB weights and identity injection, or MGIE's trained parts.
* The samplers use them through their controls: xMGIE PFB Feature Blending takes the
  trained per-layer weights (its optional ``trained`` input), xMGIE Trained Identity
  Injection adds the trained identity embeddings to the UNet's features, xMGIE Apply
  Trained UNet merges the UNet adapter trained with them into a new SD model, and xMGIE
  Apply Trained MGIE gives new MGIE and SD models (the given ones, which a model cache
  may share, are never changed).
* xMGIE Train Edit Modules runs a short training (a few hundred steps on a handful of
  pairs) with the same engine as ``xmgie train``, in the ComfyUI process, under its
  progress bar and cancel button, and returns the trained modules and a loss plot.
"""

from __future__ import annotations

import dataclasses
import math
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..mgie_core import grad_mode, host, paths, random_state
from ..mgie_core.errors import InputError
from ..mgie_core.images import check_image, check_mask
from ._common import (
    IDENTITY_ENCODER,
    MGIE_MODEL,
    PREFIX,
    SD_MODEL,
    ControlNode,
    category,
    inp,
)
from .identity_guidance import ID_EMBEDDING

TRAINED = "XMGIE_TRAINED"     # TrainedModules below
_KIND_NAMES = {"xmgie": "xMGIE", "mgie": "MGIE"}

_HOW_TO_TRAIN = ("Train modules with `xmgie train configs/train/xmgie.yaml --out RUN` (or "
                 "configs/train/mgie.yaml) and put RUN/final/ in the xmgie_trained models "
                 "folder, or train them in the graph with xMGIE Train Edit Modules.")


@dataclasses.dataclass(frozen=True)
class TrainedModules:
    """What xMGIE Load Trained Modules gives: the folder, its kind ("xmgie" or "mgie")
    and, for xMGIE, the loaded modules (``mgie_core.trained.TrainedXMGIE``: ``pfb``,
    ``ie``, either may be None). MGIE's parts are applied from the folder by xMGIE Apply
    Trained MGIE, which builds new models from it."""

    kind: str
    folder: Path
    xmgie: object | None = None

    @property
    def pfb(self):
        return getattr(self.xmgie, "pfb", None)

    @property
    def ie(self):
        return getattr(self.xmgie, "ie", None)


def load_trained(folder: Path | str) -> TrainedModules:
    """The trained modules in ``folder`` (a folder with trained.json), or a clear error
    naming the folder and how to make one."""
    from ..mgie_core import trained as trained_lib

    folder = Path(folder)
    kind = trained_lib.read_kind(folder)
    if kind == "xmgie":
        modules = trained_lib.load_xmgie(folder)
        for m in (modules.pfb, modules.ie):   # used for sampling: no autograd graph
            if m is not None:
                m.requires_grad_(False)
        return TrainedModules("xmgie", folder, modules)
    return TrainedModules(kind, folder)


def _find_folder(name: str) -> Path:
    """The trained-modules folder ``name`` names: a folder that exists under that name
    (a path, or a folder in one of the xmgie_trained folders) is read as it is, so a
    folder without trained.json gets the format's own error (what it lacks, how to make
    one) rather than "not found"; otherwise the pack's model search (and its not-found
    error: where it looked, where to put the folder)."""
    fam = paths.TRAINED
    if paths.tiny_root() is None and name:
        candidates = [Path(name).expanduser()] + [d / name for d in paths.search_dirs(fam)]
        for c in candidates:
            if c.is_dir():
                return c
    return paths.resolve(fam, name)


def trained_input(what: str) -> tuple:
    return (TRAINED, inp(f"Trained modules from xMGIE Load Trained Modules or xMGIE Train "
                         f"Edit Modules: {what}"))


def _need(trained: TrainedModules, kind: str, part: str, node: str):
    if not isinstance(trained, TrainedModules):
        raise InputError("trained", f"got a {type(trained).__name__}",
                         "trained modules from xMGIE Load Trained Modules")
    if trained.kind != kind:
        raise InputError("trained", f"holds {_KIND_NAMES.get(trained.kind, trained.kind)} "
                         f"modules ({trained.folder})",
                         f"{_KIND_NAMES[kind]} modules for {node}", _HOW_TO_TRAIN)
    value = getattr(trained, part) if kind == "xmgie" else trained.folder
    if value is None:
        raise InputError("trained", f"({trained.folder}) has no trained {part.upper()} "
                         "module", f"a folder trained with {part.upper()} for {node}",
                         "Train with that module enabled in the config.")
    return value


def pfb_alpha(trained: TrainedModules | None, alpha: float, preset: str, placement: str):
    """The PFB node's blend weight: the trained per-layer weights (``PFBWeights``) when
    ``trained`` is connected (made for the node's preset and placement), else the typed
    ``alpha``."""
    if trained is None:
        return alpha
    weights = _need(trained, "xmgie", "pfb", "PFB")
    if (weights.preset, weights.placement) != (preset, placement):
        raise InputError("trained", f"holds PFB weights trained with preset "
                         f"{weights.preset!r} and placement {weights.placement!r} "
                         f"({trained.folder})", f"weights for the node's preset {preset!r} "
                         f"and placement {placement!r}", f"Set the PFB node's preset to "
                         f"{weights.preset} and placement to {weights.placement}.")
    return weights


# --- loader -------------------------------------------------------------------------------

class LoadTrained:
    NODE_ID = f"{PREFIX}LoadTrained"
    DISPLAY_NAME = "xMGIE Load Trained Modules"
    CATEGORY = category("training")
    DESCRIPTION = ("Loads trained modules from a folder in models/xmgie_trained (the final/ "
                   "folder of `xmgie train`, or what xMGIE Train Edit Modules wrote): "
                   "xMGIE's PFB layer weights and identity injection, or MGIE's trained "
                   "parts (embeddings, LM head, edit head, UNet, LoRA adapters). Connect it "
                   "to xMGIE PFB Feature Blending (trained), xMGIE Trained Identity "
                   "Injection or xMGIE Apply Trained MGIE.")
    LOADS_MODELS = True
    RETURN_TYPES = (TRAINED,)
    RETURN_NAMES = ("trained",)
    OUTPUT_TOOLTIPS = ("The trained modules (xMGIE's or MGIE's, as trained.json says).",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "trained_name": (paths.list_models(paths.TRAINED), inp(
                "A folder holding trained.json in models/xmgie_trained (e.g. a copy of a "
                "run's final/ folder).")),
        }}

    def load(self, trained_name):
        return (load_trained(_find_folder(trained_name)),)


# --- using them in the samplers -----------------------------------------------------------

class IdentityInjectionNode(ControlNode):
    NODE_ID = f"{PREFIX}IdentityInjection"
    DISPLAY_NAME = "xMGIE Trained Identity Injection"
    DESCRIPTION = ("xMGIE's identity embedding (IE) with trained weights: the source "
                   "photo's identity embedding (frozen encoder) is concatenated to the "
                   "UNet's features at the trained layers and projected back, in the edit "
                   "branch of every step. Chain it into a sampler before PFB, so PFB's mask "
                   "keeps the change inside the edited region. Untrained (initial) modules "
                   "change nothing.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "identity_encoder": (IDENTITY_ENCODER, inp(
                "The encoder the modules were trained with (trained.json names its kind; "
                "its embedding width must match).")),
            "trained": trained_input("xMGIE modules with an identity injection."),
        }, "optional": {
            "image": ("IMAGE", inp("The source photo whose identity is injected (one, or "
                                   "one per edited image). Empty: the sampler's source "
                                   "(its clean latent, decoded).")),
            "embedding": (ID_EMBEDDING, inp(
                "An identity embedding from xMGIE Identity Embedding (e.g. of the mask's "
                "box) instead of embedding the whole image; made with the same encoder.")),
            "controls": cls.CHAIN_INPUT,
        }}

    def control(self, identity_encoder, trained, image=None, embedding=None):
        from ..mgie_core import trainable

        ie = _need(trained, "xmgie", "ie", "identity injection")
        if image is not None:
            image = check_image("image", image)
        return trainable.IdentityEmbeddingControl(ie, identity_encoder, embedding=embedding,
                                                  source=image)


UNET_LORA = "unet_lora"      # the UNet's LoRA adapter in an xMGIE run's final/
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"   # diffusers' save_lora_adapter name


def unet_with_lora(sd_model, trained: TrainedModules):
    """A new SD model whose UNet is a copy of ``sd_model``'s with the trained LoRA adapter
    (``final/unet_lora/``, diffusers' LoRA layout) merged into its weights; the VAE and
    text encoder are shared. ``sd_model`` itself is not changed (a model cache may share
    it). Without an adapter in the folder: ``sd_model`` as it is."""
    import copy

    from ..mgie_core.errors import ModelLoadError
    from ..mgie_core.models.sd import with_unet

    folder = _need(trained, "xmgie", "folder", "Apply Trained UNet")
    lora_dir = folder / UNET_LORA
    if not lora_dir.is_dir():
        return sd_model
    with grad_mode.loading():
        unet = copy.deepcopy(sd_model.unet)
        try:
            unet.load_lora_adapter(str(lora_dir), prefix=None, adapter_name="trained",
                                   weight_name=LORA_WEIGHTS, use_safetensors=True,
                                   local_files_only=True)
            unet.fuse_lora(adapter_names=["trained"])
            unet.unload_lora()
        except (ValueError, KeyError, RuntimeError, OSError) as exc:
            raise ModelLoadError("trained UNet LoRA adapter", lora_dir, f"it does not fit "
                                 f"this UNet ({type(exc).__name__}: {exc})",
                                 "Use the base model the modules were trained with.") from exc
    unet.requires_grad_(False).eval()
    return with_unet(sd_model, unet, folder)


class ApplyTrainedUNet:
    NODE_ID = f"{PREFIX}ApplyTrainedUNet"
    DISPLAY_NAME = "xMGIE Apply Trained UNet"
    CATEGORY = category("training")
    DESCRIPTION = ("Gives a new SD model whose UNet has the LoRA adapter an xMGIE run trained "
                   "with its modules (final/unet_lora/, merged into a copy of the weights); "
                   "the model connected here is left as it is. Invert and sample with the "
                   "new model. A folder without an adapter gives the model unchanged.")
    LOADS_MODELS = True     # copies the UNet's weights, runs nothing
    RETURN_TYPES = (SD_MODEL,)
    RETURN_NAMES = ("sd_model",)
    OUTPUT_TOOLTIPS = ("The SD model with the trained UNet adapter merged.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "sd_model": (SD_MODEL, inp("The base SD 1.x model the modules were trained "
                                       "on.")),
            "trained": trained_input("xMGIE modules (their UNet adapter, if trained)."),
        }}

    def apply(self, sd_model, trained):
        return (unet_with_lora(sd_model, trained),)


class ApplyTrainedMGIE:
    NODE_ID = f"{PREFIX}ApplyTrainedMGIE"
    DISPLAY_NAME = "xMGIE Apply Trained MGIE"
    CATEGORY = category("training")
    DESCRIPTION = ("Puts MGIE's trained parts (input embeddings with the [IMG] tokens, LM "
                   "head, edit head, the 8-channel UNet and LoRA adapters, as trained) into "
                   "new MGIE and SD models; the models connected here are left as they are, "
                   "so other nodes using them are unchanged.")
    LOADS_MODELS = True     # builds new models from the given ones' weights, runs nothing
    RETURN_TYPES = (MGIE_MODEL, SD_MODEL)
    RETURN_NAMES = ("mgie", "sd_model")
    OUTPUT_TOOLTIPS = ("MGIE with the trained embeddings, LM head and edit head (and "
                       "adapters).", "The instruction SD model with the trained UNet.")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "mgie": (MGIE_MODEL, inp("A model from xMGIE Load MGIE (the one trained from).")),
            "sd_model": (SD_MODEL, inp("The 8-channel instruction model (xMGIE Load MGIE "
                                       "UNet) whose UNet the run trained.")),
            "trained": trained_input("MGIE's trained parts."),
        }}

    def apply(self, mgie, sd_model, trained):
        from ..mgie_core.models.mgie import trained as mgie_trained

        folder = _need(trained, "mgie", "folder", "Apply Trained MGIE")
        return tuple(mgie_trained.apply_mgie_trained(mgie, sd_model, folder))


# --- training from the graph --------------------------------------------------------------

PLOT_SIZE = (640, 360)          # (W, H) of the loss plot
_MARGIN = (64, 20, 16, 40)      # left, top, right, bottom
_TERM_COLOURS = [(230, 120, 40), (70, 160, 90), (150, 90, 200), (200, 60, 80),
                 (60, 150, 200)]


def loss_plot(metrics: list[dict], size: tuple[int, int] = PLOT_SIZE) -> torch.Tensor:
    """The loss curves of a run as an IMAGE ([1,H,W,3] float32 in 0..1), drawn with PIL:
    the total ``loss`` (thick, blue) and each logged term (``l_*``), against the step,
    on one linear axis from the smallest to the largest value logged."""
    w, h = size
    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = _MARGIN
    x0, x1, y0, y1 = left, w - right, top, h - bottom
    draw.rectangle([x0, y0, x1, y1], outline=(90, 90, 90))
    rows = [m for m in metrics if isinstance(m.get("step"), (int, float))]
    names = ["loss"] + sorted({k for m in rows for k in m
                               if k.startswith("l_") and _finite(m[k])})
    series = {n: [(float(m["step"]), float(m[n])) for m in rows if _finite(m.get(n))]
              for n in names}
    values = [v for pts in series.values() for _, v in pts]
    if not values:
        draw.text((x0 + 10, y0 + 10), "no loss was logged", fill=(0, 0, 0))
        return _to_image(img)
    steps = [s for pts in series.values() for s, _ in pts]
    s_lo, s_hi = min(steps), max(steps)
    v_lo, v_hi = min(values), max(values)
    if v_hi - v_lo < 1e-12:
        v_lo, v_hi = v_lo - 0.5, v_hi + 0.5
    if s_hi - s_lo < 1e-12:
        s_lo, s_hi = s_lo - 1, s_hi + 1

    def xy(step, value):
        return (x0 + (step - s_lo) / (s_hi - s_lo) * (x1 - x0),
                y1 - (value - v_lo) / (v_hi - v_lo) * (y1 - y0))

    for k in range(5):                 # grid and value labels
        v = v_lo + (v_hi - v_lo) * k / 4
        _, y = xy(s_lo, v)
        draw.line([x0, y, x1, y], fill=(225, 225, 225))
        draw.text((4, y - 6), f"{v:.3g}", fill=(60, 60, 60))
    draw.text((x0, y1 + 6), f"step {s_lo:g}", fill=(60, 60, 60))
    draw.text((x1 - 70, y1 + 6), f"step {s_hi:g}", fill=(60, 60, 60))
    legend_x = x0 + 8
    for i, name in enumerate(names):
        pts = [xy(s, v) for s, v in series[name]]
        colour = (40, 80, 200) if name == "loss" else _TERM_COLOURS[i % len(_TERM_COLOURS)]
        if len(pts) == 1:
            px, py = pts[0]
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        elif pts:
            draw.line(pts, fill=colour, width=3 if name == "loss" else 1)
        draw.text((legend_x, y0 + 4), name, fill=colour)
        legend_x += 8 * len(name) + 16
    return _to_image(img)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _to_image(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None].contiguous()


def output_directory() -> Path:
    """ComfyUI's output folder inside ComfyUI (its adapter installed); the run's
    ``--output-dir`` standalone, even where ComfyUI could be imported."""
    if paths.in_comfyui():
        import folder_paths

        return Path(folder_paths.get_output_directory())
    from ..runner import core_nodes

    return Path(core_nodes.context().output_dir)


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _run_folder(root: Path, name: str) -> Path:
    """``root/<name>_00001/``, numbered after the folders already there (as SaveImage
    numbers its files); ``name`` may not leave ``root``."""
    stem = _SAFE.sub("_", name.strip()).strip("._") or "xmgie_train"
    root.mkdir(parents=True, exist_ok=True)
    taken = [int(m.group(1)) for p in root.iterdir()
             if (m := re.fullmatch(re.escape(stem) + r"_(\d{5})", p.name))]
    folder = root / f"{stem}_{max(taken, default=0) + 1:05d}"
    folder.mkdir()
    return folder


def _lines(name: str, text: str, n: int) -> list[str]:
    """One text per pair: ``text``'s lines (one per pair), or its one line for all."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if len(lines) <= 1:
        return [lines[0] if lines else ""] * n
    if len(lines) != n:
        raise InputError(name, f"has {len(lines)} lines for {n} pairs",
                         "one line per pair, or one line for every pair")
    return lines


def write_pairs(folder: Path, source: torch.Tensor, target: torch.Tensor,
                mask: torch.Tensor | None, texts: dict[str, list[str]]) -> Path:
    """The graph's pairs as a manifest dataset (``training.data`` reads it): PNGs under
    ``folder/images`` and ``folder/manifest.jsonl``; returns the folder."""
    from ..runner.dataset import write_pair_manifest

    def u8(t: torch.Tensor) -> np.ndarray:
        return (t.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)

    write_pair_manifest(folder, (
        (u8(source[i]), u8(target[i]),
         u8(mask[i if mask.shape[0] > 1 else 0]) if mask is not None else None,
         {k: v[i] for k, v in texts.items() if v[i]})
        for i in range(source.shape[0])), "pair")
    return folder


TRAIN_CONFIGS = ("xmgie",)


class _Stop:
    """``should_stop`` for the engine: polls the host's interruption (ComfyUI's cancel
    button, Ctrl-C standalone) and keeps the exception to raise once the engine has
    stopped cleanly (ComfyUI clears its flag when it raises)."""

    def __init__(self):
        self.raised: BaseException | None = None

    def __call__(self) -> bool:
        if self.raised is not None:
            return True
        try:
            host.check_interrupt()
        except BaseException as exc:     # ComfyUI's InterruptProcessingException, Ctrl-C
            self.raised = exc
            return True
        return False


class TrainEditModules:
    NODE_ID = f"{PREFIX}TrainEditModules"
    DISPLAY_NAME = "xMGIE Train Edit Modules"
    CATEGORY = category("training")
    DESCRIPTION = ("Trains xMGIE's modules (PFB layer weights, identity injection, the UNet "
                   "adapter; SD frozen) on a handful of pairs from the graph with the engine "
                   "of `xmgie train`, in ComfyUI's process, with its progress bar and cancel "
                   "button; returns the trained modules and a loss plot. A few hundred steps "
                   "of the paper's loss (L1 to the target, adversarial, identity) from the "
                   "shipped config; the run (metrics.jsonl, final/) is written under the "
                   "output folder. Edit with the result through xMGIE Apply Trained UNet, "
                   "Trained Identity Injection and PFB (trained).")
    RETURN_TYPES = (TRAINED, "IMAGE", "STRING")
    RETURN_NAMES = ("trained", "loss_plot", "run_folder")
    OUTPUT_TOOLTIPS = ("The trained modules (the run's final/), for the PFB and identity "
                       "injection nodes.",
                       "The loss (and each term) against the step.",
                       "Where the run was written (copy its final/ folder into "
                       "models/xmgie_trained to load it later).")
    OUTPUT_NODE = True
    FUNCTION = "train"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "sd_model": (SD_MODEL, inp("The SD 1.x model to train the modules on (frozen; "
                                       "edit with the same one).")),
            "source": ("IMAGE", inp("The photos before the edit (a batch: one per pair).")),
            "target": ("IMAGE", inp("The edited photos, the same number and size as "
                                    "source.")),
            "instruction": ("STRING", inp("The edit, e.g. 'make the square red': one line "
                                          "per pair, or one line for all.", multiline=True,
                                          default="")),
            "steps": ("INT", inp("Optimiser steps (a few hundred on a handful of pairs).",
                                 default=200, min=1, max=10000)),
            "lr": ("FLOAT", inp("Adam's learning rate. The paper's 1e-4 is for long runs; "
                                "a short run needs more.", default=1e-3, min=1e-6, max=1.0,
                                step=1e-5, round=False)),
            "seed": ("INT", inp("Seed of the run (initialisation, noise, order).", default=0,
                                min=0, max=2 ** 32 - 1)),
            "config": (list(TRAIN_CONFIGS), inp(
                "The shipped training config the run starts from: xmgie (the paper's loss "
                "weights and modules; configs/train/xmgie.yaml).", default="xmgie")),
        }, "optional": {
            "mask": ("MASK", inp("The edited region of each pair (one per pair, or one for "
                                 "all), the size of the photos; without it the whole "
                                 "image.")),
            "source_prompt": ("STRING", inp("What each photo shows: one line per pair, or "
                                            "one for all (may be empty).", multiline=True,
                                            default="")),
            "target_prompt": ("STRING", inp("The same with the edit: one line per pair, or "
                                            "one for all (may be empty).", multiline=True,
                                            default="")),
            "identity_encoder": (IDENTITY_ENCODER, inp(
                "The frozen identity encoder of L_id and of the identity injection "
                "(else the config's).")),
            "resolution": ("INT", inp("Side the pairs are trained at (centre-cropped "
                                      "square). The shipped config's critic needs at least "
                                      "192.", default=256, min=64, max=1024, step=64)),
            "batch_size": ("INT", inp("Pairs per step (the paper: 32; at most the number of "
                                      "pairs).", default=4, min=1, max=64)),
            "run_name": ("STRING", inp("Folder name of the run under the output folder "
                                       "(numbered: <name>_00001).", default="xmgie_train")),
        }}

    def train(self, sd_model, source, target, instruction, steps, lr, seed, config,
              mask=None, source_prompt="", target_prompt="", identity_encoder=None,
              resolution=256, batch_size=4, run_name="xmgie_train"):
        from ..training import config as config_lib
        from ..training import engine

        source = check_image("source", source)
        target = check_image("target", target)
        if tuple(target.shape) != tuple(source.shape):
            raise InputError("target", f"has shape {tuple(target.shape)} and source "
                             f"{tuple(source.shape)}", "one edited photo per source photo, "
                             "of the same size", "Resize or batch them alike.")
        n = int(source.shape[0])
        if mask is not None:
            mask = check_mask("mask", mask, size=tuple(source.shape[1:3]))
            if mask.shape[0] not in (1, n):
                raise InputError("mask", f"holds {mask.shape[0]} masks for {n} pairs",
                                 "one mask per pair, or one for all")
        if config not in TRAIN_CONFIGS:
            raise InputError("config", f"is {config!r}", " or ".join(TRAIN_CONFIGS))
        texts = {"instruction": _lines("instruction", instruction, n),
                 "source_prompt": _lines("source_prompt", source_prompt, n),
                 "target_prompt": _lines("target_prompt", target_prompt, n)}
        empty = [i for i in range(n)
                 if not (texts["instruction"][i] or texts["target_prompt"][i])]
        if empty:
            raise InputError("instruction", f"is empty for pair(s) {empty} and so is "
                             "target_prompt", "the edit of every pair, e.g. 'make the "
                             "square red', or a target prompt")
        batch = max(1, min(int(batch_size), n))
        overrides = _overrides(steps=int(steps), lr=float(lr), seed=int(seed),
                               batch=batch, resolution=int(resolution))
        if host.device().type == "cpu":     # mixed precision is for accelerators
            overrides["precision"] = "no"
        # Tiny mode (xmgie run --tiny): the config's tiny section (small critic, LoRA).
        cfg = config_lib.load_config(config, tiny=paths.tiny_root() is not None,
                                     overrides=overrides)
        engine.check_task_config(cfg)       # e.g. the critic's smallest resolution
        run = _run_folder(output_directory(), run_name)
        data = write_pairs(run / "pairs", source, target, mask, texts)
        models = {"sd": sd_model}
        if identity_encoder is not None:
            models["identity"] = identity_encoder
        # Gradients pass through the frozen models: weights a host made in inference mode
        # (a model bridged from ComfyUI) are copied once into normal tensors.
        grad_mode.differentiable(sd_model.unet, sd_model.vae, sd_model.text_encoder,
                                 getattr(identity_encoder, "model", None),
                                 stage="xMGIE Train Edit Modules")
        stop = _Stop()
        # The host's bar (ComfyUI's ProgressBar). Its update raises on cancel inside
        # ComfyUI (the server's progress hook checks the interruption): the exception is
        # kept for should_stop, polled right after, so the engine stops cleanly at the
        # step's end and writes its checkpoint before the exception is raised here.
        bar = host.hooks().progress(int(steps), "training")
        done = [0]

        def progress(step, total, logs):
            if step > done[0]:
                try:
                    bar.update(step - done[0])
                except BaseException as exc:     # as _Stop: the host's cancel, Ctrl-C
                    if stop.raised is None:
                        stop.raised = exc
                done[0] = step

        # The engine seeds the process's generators (accelerate's set_seed) and building
        # the loaded modules draws their initial weights: the host's (ComfyUI's) random
        # state is put back afterwards, so its later draws are as if nothing had trained.
        with random_state.preserved():
            try:
                # The pairs go in as the dataset: under --tiny the engine would otherwise
                # train on its synthetic set.
                with grad_mode.autograd():
                    result = engine.train(cfg, run / "train", max_steps=int(steps),
                                          dataset=data, models=models, progress=progress,
                                          should_stop=stop)
            except BaseException:
                # A run that failed before its first checkpoint (a model not found, a
                # setting refused) leaves no folder behind: it holds only the pairs.
                if not any((run / "train").glob("checkpoint-*")):
                    shutil.rmtree(run, ignore_errors=True)
                raise
            finally:
                bar.close()
            if stop.raised is not None:
                raise stop.raised
            trained = load_trained(result.final_dir)
        plot = loss_plot(list(result.metrics))
        text = f"{run} ({result.steps} steps)"
        return {"ui": {"text": [f"trained {result.steps} steps; run written to {run}"]},
                "result": (trained, plot, text)}


def _overrides(*, steps: int, lr: float, seed: int, batch: int, resolution: int) -> dict:
    """The short in-graph run over the shipped config: every pair is trained on (no
    validation split, hence no early stopping), checkpoints only at the end or on cancel,
    and every step logged for the plot."""
    return {
        "seed": seed,
        "data": {"format": "manifest", "resolution": resolution, "val_fraction": 0.0,
                 "val_path": None},
        "optim": {"lr": lr},
        "batch": {"global": batch, "per_device": batch},
        "steps": {"max": steps, "log_every": 1, "val_every": 0, "checkpoint_every": 0},
        "early_stopping": {"metric": None},
    }


NODES = [LoadTrained, ApplyTrainedUNet, IdentityInjectionNode, ApplyTrainedMGIE,
         TrainEditModules]
