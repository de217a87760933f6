"""Stable Diffusion loaders (SD 1.x, SD 2.x, SDXL): diffusers folders, single-file
checkpoints, the 8-channel instruction UNet (InstructPix2Pix folder, SDXL's included, or
MGIE's unet.pt over SD 1.5 components).

Every loader is offline-first: files come from the search order of :mod:`paths`, never
from the Hub. Single-file checkpoints are read with diffusers' own converter, given a
local config folder (the pack's shipped config of the file's family, or ``<checkpoint
stem>.config/`` beside the file), because without one ``from_single_file`` reaches the
Hub.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .. import grad_mode, host, memory, paths
from ..errors import ModelLoadError, XMGIEError
from .validate import (
    check_files,
    check_loading_info,
    check_state_dict_keys,
    check_tokenizer,
    check_tokenizer_folder,
    compare_state_dicts,
    describe_load_error,
    load_state_dict_checked,
    read_sd_configs,
    read_weights_file,
    weights_file,
)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "sd15"
SIDE_CONFIG_SUFFIX = ".config"

# docs/algorithms.md section 0: DDIM, scaled_linear 0.00085 -> 0.012, no clipping,
# set_alpha_to_one=False, steps_offset=1.
DDIM_SETTINGS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                     prediction_type="epsilon")


@dataclasses.dataclass
class SDModel:
    """The components of a Stable Diffusion model, SD 1.x, SD 2.x or SDXL (transparent
    custom socket type). SDXL's second text encoder (OpenCLIP-bigG, with its projection)
    and its tokenizer are ``text_encoder_2`` / ``tokenizer_2``; None for SD 1.x and 2.x.
    How the conditioning of each family is packed into one tensor: ``diffusion.
    encode_prompt`` and ``diffusion.split_condition``."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    device: torch.device
    dtype: torch.dtype
    source: str
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: object | None = None

    @property
    def instruct(self) -> bool:
        """True for an 8-channel instruction UNet (InstructPix2Pix / MGIE)."""
        return self.unet.config.in_channels == 8

    @property
    def family(self) -> str:
        """The UNet architecture's name ("SD 1.x", "SD 2.x", "SDXL"; see
        :mod:`mgie_core.architecture`)."""
        from ..architecture import architecture_of

        return architecture_of(self.unet).name

    @property
    def vae_dtype(self) -> torch.dtype:
        """The dtype the VAE runs in: its weights' own. A loader may keep the VAE in
        float32 under a half-precision UNet where the VAE's config asks for it
        (``force_upcast``: SDXL's VAE overflows in float16, as diffusers' SDXL pipelines
        note)."""
        return next(self.vae.parameters()).dtype

    @property
    def prediction_type(self) -> str:
        """What the UNet predicts, from the scheduler config: "epsilon" or "v_prediction"
        (SD 2.x 768-v). ``diffusion.unet_eps`` returns epsilon either way."""
        return str(getattr(self.scheduler.config, "prediction_type", "epsilon"))

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


def ddim_scheduler(config: dict | None = None):
    from diffusers import DDIMScheduler

    base = dict(config or {})
    base.update(DDIM_SETTINGS)
    # What the UNet was trained to predict is the model's, not the sampler's choice:
    # SD 2.x 768-v predicts v (diffusion.unet_eps converts it to epsilon).
    base["prediction_type"] = (config or {}).get("prediction_type") or "epsilon"
    base.setdefault("num_train_timesteps", 1000)
    return DDIMScheduler.from_config(base)


def fit_tokenizer(tokenizer, text_encoder):
    """The tokenizer with ``model_max_length`` no longer than the text encoder's position
    table (77 for CLIP). Prompts are padded to ``model_max_length``; some tokenizer
    folders say more (ComfyUI's own ``comfy/sd1_tokenizer`` says 8192, because ComfyUI
    chunks long prompts itself), which would make every prompt 8192 tokens long and fail
    in the position embedding."""
    limit = getattr(getattr(text_encoder, "config", None), "max_position_embeddings", None)
    if limit and getattr(tokenizer, "model_max_length", limit) > limit:
        tokenizer.model_max_length = int(limit)
    return tokenizer


def vae_dtype_for(unet, vae, dtype: torch.dtype) -> torch.dtype:
    """The dtype a loader gives the VAE next to a UNet in ``dtype``: the same, except
    float32 for SDXL's VAE under float16 where its config says ``force_upcast`` (it
    overflows in float16, as diffusers' SDXL pipelines note; ``SDModel.vae_dtype``)."""
    xl = getattr(unet.config, "addition_embed_type", None) == "text_time"
    if dtype == torch.float16 and xl and getattr(vae.config, "force_upcast", False):
        return torch.float32
    return dtype


def _finish(unet, vae, text_encoder, tokenizer, scheduler_config, source: Path,
            device, dtype, text_encoder_2=None, tokenizer_2=None) -> SDModel:
    """Freeze and cast the components on the CPU, then hand them to the model registry,
    which places them (standalone: on ``device`` after freeing room there; ComfyUI: on
    its offload device until a node uses them). SDXL: the second text encoder and its
    tokenizer too."""
    tokenizer = fit_tokenizer(tokenizer, text_encoder)
    if text_encoder_2 is not None:
        tokenizer_2 = fit_tokenizer(tokenizer_2, text_encoder_2)
    device = torch.device(device) if device is not None else host.device()
    dtype = resolve_dtype(dtype, device)
    modules = {"unet": unet, "vae": vae, "text_encoder": text_encoder}
    if text_encoder_2 is not None:
        modules["text_encoder_2"] = text_encoder_2
    for name, m in modules.items():
        m.requires_grad_(False).eval()
        want = vae_dtype_for(unet, vae, dtype) if name == "vae" else dtype
        if next(m.parameters()).dtype != want:  # diffusers warns on every same-dtype cast
            m.to(dtype=want)
    model = SDModel(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                    scheduler=ddim_scheduler(scheduler_config), device=device, dtype=dtype,
                    source=str(source), text_encoder_2=text_encoder_2,
                    tokenizer_2=tokenizer_2)
    name = Path(source).name
    return memory.manage(model, {f"{name} {k}": m for k, m in modules.items()}, device)


def _load_tokenizer(folder: Path, what: str):
    from transformers import CLIPTokenizer

    check_tokenizer_folder(folder, what)
    try:
        tok = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # missing vocab/merges raise deep inside tokenizers
        raise ModelLoadError(what, folder, f"the tokenizer could not be read ({exc})",
                             "Copy vocab.json, merges.txt and tokenizer_config.json "
                             "of the model into this folder.") from exc
    check_tokenizer(tok, folder, what)
    return tok


def _from_pretrained(cls, path: Path, subfolder: str, what: str, fix: str,
                     optional: tuple[str, ...] = ()):
    """``cls.from_pretrained`` of one component, every key checked (a missing weight
    would otherwise keep its random initialisation with only a logged warning)."""
    try:
        model, info = cls.from_pretrained(path, subfolder=subfolder, local_files_only=True,
                                          output_loading_info=True)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelLoadError(what, path / subfolder, describe_load_error(exc), fix) from exc
    check_loading_info(info, f"{what} ({subfolder})", weights_file(path / subfolder), optional)
    return model


# Buffers older exports of CLIPTextModel saved; transformers computes them.
TEXT_ENCODER_OPTIONAL = ("*embeddings.position_ids",)


@grad_mode.builds_weights
def load_diffusers_folder(path: Path, what: str, dtype="auto", device=None) -> SDModel:
    """Load unet/vae/text_encoder/tokenizer/scheduler from a diffusers SD 1.x, SD 2.x or
    SDXL folder (SDXL: also text_encoder_2/ and tokenizer_2/; SDXL InstructPix2Pix
    alike).

    Every config is read as data first (:func:`validate.read_sd_configs`: the classes
    model_index.json names must be Stable Diffusion's, no code); the components are then
    built with the fixed diffusers/transformers classes, never the classes the folder
    names."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    path = Path(path)
    fix = "A diffusers Stable Diffusion folder has unet/, vae/, text_encoder/, tokenizer/ " \
          "and scheduler/ sub-folders (SDXL: also text_encoder_2/ and tokenizer_2/), each " \
          "with its config and weights."
    check_files(path, ["model_index.json", "unet/config.json", "vae/config.json",
                       "text_encoder/config.json", "tokenizer", "scheduler"], what, fix)
    configs = read_sd_configs(path, what)
    xl = "text_encoder_2" in configs
    if xl:
        check_files(path, ["text_encoder_2/config.json", "tokenizer_2"], what, fix)
    tokenizer = _load_tokenizer(path / "tokenizer", what)
    unet = _from_pretrained(UNet2DConditionModel, path, "unet", what, fix)
    vae = _from_pretrained(AutoencoderKL, path, "vae", what, fix)
    text_encoder = _from_pretrained(CLIPTextModel, path, "text_encoder", what, fix,
                                    TEXT_ENCODER_OPTIONAL)
    text_encoder_2 = tokenizer_2 = None
    if xl:
        tokenizer_2 = _load_tokenizer(path / "tokenizer_2", what)
        text_encoder_2 = _from_pretrained(CLIPTextModelWithProjection, path, "text_encoder_2",
                                          what, fix, TEXT_ENCODER_OPTIONAL)
    return _finish(unet, vae, text_encoder, tokenizer, configs["scheduler"], path, device, dtype,
                   text_encoder_2, tokenizer_2)


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


def read_checkpoint(path: Path, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors / .ckpt / .pt file; errors name the file."""
    return read_weights_file(path, what)


# Single-file layout: the three models under these prefixes (ComfyUI's checkpoints).
LDM_PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
                "text_encoder": "cond_stage_model.transformer."}
# Keys an SD 1.x single file may carry besides the weights the models use: the DDPM
# schedule buffers of the original training code, the EMA copy of the UNet
# (v1-5-pruned.ckpt holds one; the non-EMA weights are loaded), and the text encoder's
# position_ids buffer, which transformers computes.
SINGLE_FILE_OPTIONAL = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "model_ema.*", "cond_stage_model.transformer.text_model.embeddings.position_ids")


def _normalise_ldm_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Older files name the CLIP weights without the "text_model." level.
    pre = LDM_PREFIXES["text_encoder"]
    return {(pre + "text_model." + k[len(pre):]
             if k.startswith(pre) and not k.startswith(pre + "text_model.") else k): v
            for k, v in state.items()}


def check_single_file_keys(state: dict[str, torch.Tensor], unet, vae, text_encoder,
                           what: str, path: Path) -> None:
    """Every weight of the three models present in the file with its shape, and no
    other key than :data:`SINGLE_FILE_OPTIONAL` (names as the file spells them)."""
    from .ldm_convert import text_encoder_to_ldm, unet_to_ldm, vae_to_ldm

    expected = {}
    expected.update(unet_to_ldm(unet.state_dict(), unet.config))
    expected.update(vae_to_ldm(vae.state_dict(), vae.config))
    expected.update(text_encoder_to_ldm(text_encoder.state_dict()))
    missing, unexpected, mismatched = compare_state_dicts(
        expected, _normalise_ldm_keys(state), loose_1x1=True)
    check_state_dict_keys(what, path, missing, unexpected, mismatched, SINGLE_FILE_OPTIONAL)


def _build(what: str, config_dir: Path, component: str, build):
    try:
        return build()
    except Exception as exc:
        raise ModelLoadError(what, config_dir / component, f"its config does not build a "
                             f"{component}: {describe_load_error(exc)}",
                             "Use the config folder of an SD 1.x model.") from exc


def resolve_checkpoint(name: str) -> Path:
    """The single-file checkpoint ``name`` (models/checkpoints, any family; tiny mode:
    the tiny model of the family the name says, :func:`paths.tiny_family`)."""
    return paths.resolve(paths.SD_CHECKPOINT, name)


def read_single_file(name: str, config_dir: Path | None = None):
    """What every single-file SD 1.x reader starts from: (path, config folder, configs read
    as data, CLIP tokenizer, raw state dict). The checkpoint is found in models/checkpoints
    (or tiny mode); the configs come from ``<stem>.config/`` beside it, else the pack's
    SD 1.5."""
    what = paths.SD_CHECKPOINT.what
    path = resolve_checkpoint(name)
    config_dir = Path(config_dir) if config_dir else single_file_config(path)
    configs = read_sd_configs(config_dir, f"{what} config")
    tokenizer = _load_tokenizer(find_clip_tokenizer(config_dir), "CLIP tokenizer")
    return path, config_dir, configs, tokenizer, read_checkpoint(path, what)


@grad_mode.builds_weights
def load_sd_checkpoint(name: str, dtype="auto", device=None,
                       config_dir: Path | None = None) -> SDModel:
    """An SD 1.x, SD 2.x or SDXL single-file checkpoint (.safetensors/.ckpt, ComfyUI
    models/checkpoints, ComfyUI's layout); the family comes from the file's keys
    (:func:`.from_ldm.detect_layout`).

    The architecture comes from a local config folder (``<stem>.config/`` beside the file,
    else the pack's shipped config of the family: SD 1.5, SD 2.x 768-v, SDXL base, SDXL
    InstructPix2Pix), read as data (:func:`validate.read_sd_configs`); the models are
    built with the fixed diffusers/transformers classes and filled from the file with
    diffusers' own LDM and OpenCLIP key converters. Unlike ``from_single_file``, nothing
    is fetched and nothing the config folder names is imported, and every weight must be
    in the file: a missing or unexpected key, or one of the wrong shape, is an error
    naming it. SD 2.x with the shipped config: v-prediction when the file says so (the
    ``v_pred`` key, or ComfyUI's rule, :func:`.from_ldm.file_prediction_type`), else
    epsilon (the 512 px base model)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from . import from_ldm

    what = paths.SD_CHECKPOINT.what
    sf = from_ldm.read_any_single_file(name, config_dir)
    if sf.layout is not from_ldm.SD1_LAYOUT:
        return _load_ldm_parts(from_ldm.ldm_parts(sf), device, dtype)
    path, config_dir, configs, tokenizer, state = (sf.path, sf.config_dir, sf.configs,
                                                   sf.tokenizer, sf.state)
    unet = _build(what, config_dir, "unet",
                  lambda: UNet2DConditionModel.from_config(configs["unet"]))
    vae = _build(what, config_dir, "vae", lambda: AutoencoderKL.from_config(configs["vae"]))
    text_encoder = _build(what, config_dir, "text_encoder", lambda: CLIPTextModel(
        CLIPTextConfig.from_dict(configs["text_encoder"])))
    check_single_file_keys(state, unet, vae, text_encoder, what, path)
    try:
        te_state = convert_ldm_clip_checkpoint(_normalise_ldm_keys(state))
        if not hasattr(text_encoder, "text_model"):  # transformers >= 5.6 flattened it
            te_state = {k.removeprefix("text_model."): v for k, v in te_state.items()}
        converted = [(unet, convert_ldm_unet_checkpoint(state, unet.config), "unet", ()),
                     (vae, convert_ldm_vae_checkpoint(state, vae.config), "vae", ()),
                     (text_encoder, te_state, "text_encoder", TEXT_ENCODER_OPTIONAL)]
    except Exception as exc:
        raise ModelLoadError(what, path, f"its weights could not be converted: "
                             f"{describe_load_error(exc)}",
                             "Only SD 1.x checkpoints are supported (config used: "
                             f"{config_dir}).") from exc
    for module, sub_state, label, optional in converted:
        load_state_dict_checked(module, sub_state, f"{what} ({label})", path, optional)
    del state, converted
    return _finish(unet, vae, text_encoder, tokenizer, configs["scheduler"], path, device, dtype)


def _load_ldm_parts(parts, device, dtype) -> SDModel:
    """An SD 2.x or SDXL single file's model: its parts (every key already checked
    against the configs' models) become the modules, which take the file's tensors."""
    from . import from_ldm

    unet, text, vae = parts
    second = text.second
    modules = [from_ldm.build_module(p) for p in (unet, vae, text)]
    te2 = from_ldm.build_module(second) if second is not None else None
    from_ldm._check_fit(*modules, te2)
    return _finish(*modules[:2], modules[2], text.tokenizer, unet.scheduler_config,
                   Path(unet.source), device, dtype, te2,
                   None if second is None else second.tokenizer)


@grad_mode.builds_weights
def load_mgie_unet(name: str, base: SDModel) -> SDModel:
    """MGIE's released ``unet.pt`` (an 8-channel diffusers UNet state dict) over the
    VAE, text encoder and tokenizer of an SD 1.5 model."""
    from diffusers import UNet2DConditionModel

    what = paths.MGIE_UNET.what
    path = paths.resolve(paths.MGIE_UNET, name)
    state = read_checkpoint(path, what)
    if "conv_in.weight" not in state:
        raise ModelLoadError(what, path, "it is not a diffusers UNet state dict (no "
                             "conv_in.weight)", "Use unet.pt from the MGIE release.")
    shape = tuple(state["conv_in.weight"].shape)
    in_ch = shape[1] if len(shape) == 4 else "?"
    if in_ch != 8:
        raise ModelLoadError(what, path, f"its conv_in.weight has shape {shape}: it takes "
                             f"{in_ch} channels, not 8", "Use unet.pt from the MGIE release.")
    config = dict(base.unet.config)
    config["in_channels"] = 8
    unet = UNet2DConditionModel.from_config(config)
    load_state_dict_checked(unet, state, what, path)
    unet.requires_grad_(False).eval()
    if base.dtype != torch.float32:
        unet.to(dtype=base.dtype)
    return with_unet(base, unet, path)


def with_unet(sd: SDModel, unet: torch.nn.Module, label: Path | str) -> SDModel:
    """A new SD model with ``unet`` and ``sd``'s VAE, text encoder(s), tokenizer(s) and
    scheduler (shared, not copied), its source ``"<sd's source> + <label>"``, registered
    with the memory registry as a loader registers a model: the new UNet as ``"<label's
    name> unet"``, the shared modules under the names they already have. ``sd`` is
    unchanged."""
    model = dataclasses.replace(sd, unet=unet, source=f"{sd.source} + {label}")
    names = {e.module: e.name for e in memory.registry().entries_of(sd)}
    shared = {"vae": sd.vae, "text_encoder": sd.text_encoder,
              "text_encoder_2": sd.text_encoder_2}
    return memory.manage(model, {f"{Path(label).name} unet": unet,
                                 **{names.get(m, k): m for k, m in shared.items()
                                    if m is not None}}, sd.device)
