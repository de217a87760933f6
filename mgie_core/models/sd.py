"""Stable Diffusion 1.x loaders: diffusers folders, single-file checkpoints, the 8-channel
instruction UNet (InstructPix2Pix folder, or MGIE's unet.pt over SD 1.5 components).

Every loader is offline-first: files come from the search order of :mod:`paths`, never
from the Hub. Single-file checkpoints are read with diffusers' own converter, given a
local config folder (the pack's SD 1.5 config, or ``<checkpoint stem>.config/`` beside
the file), because without one ``from_single_file`` reaches the Hub.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import torch

from .. import paths, runtime
from ..errors import ModelLoadError, XMGIEError
from .validate import check_files, check_state_dict_keys, check_tokenizer

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "sd15"
SIDE_CONFIG_SUFFIX = ".config"

# ALGORITHMS.md section 0: DDIM, scaled_linear 0.00085 -> 0.012, no clipping,
# set_alpha_to_one=False, steps_offset=1.
DDIM_SETTINGS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                     prediction_type="epsilon")


@dataclasses.dataclass
class SDModel:
    """The components of an SD 1.x model (transparent custom socket type)."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    device: torch.device
    dtype: torch.dtype
    source: str

    @property
    def instruct(self) -> bool:
        """True for an 8-channel instruction UNet (InstructPix2Pix / MGIE)."""
        return self.unet.config.in_channels == 8

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def __repr__(self) -> str:
        kind = "instruction" if self.instruct else "text-to-image"
        return f"SDModel({kind}, {self.source}, {self.device}, {self.dtype})"


DTYPES = ("auto", "fp16", "bf16", "fp32")   # the choices loaders offer


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
             "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in table:
        raise XMGIEError(f"dtype: '{dtype}' is not known; expected one of auto, "
                         + ", ".join(table))
    return table[dtype]


def ddim_scheduler(config: Optional[dict] = None):
    from diffusers import DDIMScheduler

    base = dict(config or {})
    base.update(DDIM_SETTINGS)
    base.setdefault("num_train_timesteps", 1000)
    return DDIMScheduler.from_config(base)


def _finish(unet, vae, text_encoder, tokenizer, scheduler_config, source: Path,
            device, dtype) -> SDModel:
    """Freeze and cast the components on the CPU, then hand them to the model registry,
    which places them (standalone: on ``device`` after freeing room there; ComfyUI: on
    its offload device until a node uses them)."""
    device = torch.device(device) if device is not None else runtime.device()
    dtype = resolve_dtype(dtype, device)
    modules = {"unet": unet, "vae": vae, "text_encoder": text_encoder}
    for m in modules.values():
        m.requires_grad_(False).eval()
        if next(m.parameters()).dtype != dtype:  # diffusers warns on every same-dtype cast
            m.to(dtype=dtype)
    model = SDModel(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                    scheduler=ddim_scheduler(scheduler_config), device=device, dtype=dtype,
                    source=str(source))
    name = Path(source).name
    return runtime.manage(model, {f"{name} {k}": m for k, m in modules.items()}, device)


def _load_tokenizer(folder: Path, what: str):
    from transformers import CLIPTokenizer

    try:
        tok = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # missing vocab/merges raise deep inside tokenizers
        raise ModelLoadError(what, folder, f"the tokenizer could not be read ({exc})",
                             "Copy vocab.json, merges.txt and tokenizer_config.json "
                             "of the model into this folder.") from exc
    check_tokenizer(tok, folder, what)
    return tok


@runtime.builds_weights
def load_diffusers_folder(path: Path, what: str, dtype="auto", device=None) -> SDModel:
    """Load unet/vae/text_encoder/tokenizer/scheduler from a diffusers SD 1.x folder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    path = Path(path)
    fix = "A diffusers Stable Diffusion folder has unet/, vae/, text_encoder/, tokenizer/ " \
          "and scheduler/ sub-folders, each with its config and weights."
    check_files(path, ["model_index.json", "unet/config.json", "vae/config.json",
                       "text_encoder/config.json", "tokenizer", "scheduler"], what, fix)
    tokenizer = _load_tokenizer(path / "tokenizer", what)
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder",
                                                     local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(what, path, str(exc).splitlines()[0], fix) from exc
    sched_cfg = json.loads((path / "scheduler" / "scheduler_config.json").read_text()) \
        if (path / "scheduler" / "scheduler_config.json").exists() else None
    return _finish(unet, vae, text_encoder, tokenizer, sched_cfg, path, device, dtype)


def load_sd_diffusers(name: str, dtype="auto", device=None) -> SDModel:
    """An SD 1.x text-to-image model from a diffusers folder (models/diffusers)."""
    path = paths.resolve(paths.SD_DIFFUSERS, name)
    model = load_diffusers_folder(path, paths.SD_DIFFUSERS.what, dtype, device)
    if model.unet.config.in_channels != 4:
        raise ModelLoadError(paths.SD_DIFFUSERS.what, path,
                             f"its UNet has {model.unet.config.in_channels} input channels, "
                             "not 4", "Load instruction models with the instruction loader.")
    return model


def load_instruct_diffusers(name: str, dtype="auto", device=None) -> SDModel:
    """An 8-channel instruction model (InstructPix2Pix layout) from a diffusers folder."""
    path = paths.resolve(paths.IP2P_DIFFUSERS, name)
    model = load_diffusers_folder(path, paths.IP2P_DIFFUSERS.what, dtype, device)
    if not model.instruct:
        raise ModelLoadError(paths.IP2P_DIFFUSERS.what, path,
                             f"its UNet has {model.unet.config.in_channels} input channels, "
                             "not 8 (this is a text-to-image model)",
                             "Use the Stable Diffusion loader for it, or pick an "
                             "InstructPix2Pix folder.")
    return model


def find_clip_tokenizer(config_dir: Path) -> Path:
    """Tokenizer for a single-file checkpoint (those files carry none)."""
    if (config_dir / "tokenizer" / "vocab.json").exists():
        return config_dir / "tokenizer"
    errors = []
    for name in paths.CLIP_TOKENIZER.default_names:
        try:
            return paths.resolve(paths.CLIP_TOKENIZER, name)
        except FileNotFoundError as exc:
            errors.append(exc)
    raise errors[0]


def single_file_config(checkpoint: Path) -> Path:
    """``<stem>.config/`` beside the checkpoint when present, else the pack's SD 1.5."""
    side = checkpoint.with_name(checkpoint.stem + SIDE_CONFIG_SUFFIX)
    return side if (side / "model_index.json").exists() else CONFIG_DIR


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


@runtime.builds_weights
def load_sd_checkpoint(name: str, dtype="auto", device=None,
                       config_dir: Optional[Path] = None) -> SDModel:
    """An SD 1.x single-file checkpoint (.safetensors/.ckpt, ComfyUI models/checkpoints)."""
    from diffusers import StableDiffusionPipeline

    path = paths.resolve(paths.SD_CHECKPOINT, name)
    config_dir = Path(config_dir) if config_dir else single_file_config(path)
    tokenizer = _load_tokenizer(find_clip_tokenizer(config_dir), "CLIP tokenizer")
    try:
        pipe = StableDiffusionPipeline.from_single_file(
            str(path), config=str(config_dir), local_files_only=True, tokenizer=tokenizer,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    except Exception as exc:
        raise ModelLoadError(paths.SD_CHECKPOINT.what, path,
                             f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                             f"Only SD 1.x checkpoints are supported (config used: {config_dir})."
                             ) from exc
    return _finish(pipe.unet, pipe.vae, pipe.text_encoder, tokenizer,
                   dict(pipe.scheduler.config), path, device, dtype)


@runtime.builds_weights
def load_mgie_unet(name: str, base: SDModel) -> SDModel:
    """MGIE's released ``unet.pt`` (an 8-channel diffusers UNet state dict) over the
    VAE, text encoder and tokenizer of an SD 1.5 model."""
    from diffusers import UNet2DConditionModel

    path = paths.resolve(paths.MGIE_UNET, name)
    state = read_checkpoint(path)
    if not isinstance(state, dict) or "conv_in.weight" not in state:
        raise ModelLoadError(paths.MGIE_UNET.what, path,
                             "it is not a diffusers UNet state dict (no conv_in.weight)",
                             "Use unet.pt from the MGIE release.")
    in_ch = state["conv_in.weight"].shape[1]
    if in_ch != 8:
        raise ModelLoadError(paths.MGIE_UNET.what, path,
                             f"its conv_in takes {in_ch} channels, not 8",
                             "Use unet.pt from the MGIE release.")
    config = dict(base.unet.config)
    config["in_channels"] = 8
    unet = UNet2DConditionModel.from_config(config)
    result = unet.load_state_dict(state, strict=False)
    check_state_dict_keys(paths.MGIE_UNET.what, path, result.missing_keys,
                          result.unexpected_keys)
    unet.requires_grad_(False).eval()
    if base.dtype != torch.float32:
        unet.to(dtype=base.dtype)
    model = dataclasses.replace(base, unet=unet, source=f"{base.source} + {path}")
    base_modules = {e.module: e.name for e in runtime.registry().entries_of(base)}
    return runtime.manage(model, {f"{path.name} unet": unet,
                                  base_modules.get(base.vae, "vae"): base.vae,
                                  base_modules.get(base.text_encoder, "text_encoder"):
                                      base.text_encoder}, base.device)
