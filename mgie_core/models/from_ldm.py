"""SD 1.x, SD 2.x and SDXL models from LDM-layout state dicts, sharing the weight tensors.

The LDM layout is the one single-file checkpoints use and the one ComfyUI's loaded models
hold: the UNet as under ``model.diffusion_model.`` (``input_blocks.*``, ``middle_block.*``,
``output_blocks.*``; SDXL's ``label_emb.*``), the VAE as under ``first_stage_model.``
(``encoder.down.*``, ``decoder.up.*``), the CLIP text encoder in transformers' names
(``text_model.*``), as under ``cond_stage_model.transformer.`` in an SD 1.x file. An
:class:`LDMPart` is one of these with its diffusers config; :func:`sd_from_ldm` turns
them into the pack's :class:`~.sd.SDModel`.

The text encoders are always held in transformers' names, as ComfyUI holds them once
loaded: a file's OpenCLIP tensors (SD 2.x's OpenCLIP-H, SDXL's OpenCLIP-bigG; fused
``in_proj`` attention, see :mod:`.ldm_convert`) are converted when the file is read, with
diffusers' own ``convert_open_clip_checkpoint``. SDXL's CLIP part carries the second
encoder (OpenCLIP-bigG with its projection) as :attr:`LDMPart.second`, so ComfyUI's one
CLIP socket stays one value. Which family a file is comes from its keys
(:func:`detect_layout`), as ComfyUI tells them; its configs are the pack's shipped ones
(``configs/sd15``, ``sd2``, ``sdxl``, ``sdxl_ip2p``) unless ``<stem>.config/`` sits beside
the file.

Why a second path next to :func:`.sd.load_sd_checkpoint`: the bridge node takes the
models a ComfyUI graph already loaded (after its LoRA loaders), so there is no file to
read, only tensors. The conversion is the same as the single-file loader's (diffusers'
own LDM key converters, every key and shape checked against the model built from the
config), and the tests hold the two bit-exact on a tiny checkpoint.

Sharing: the diffusers/transformers modules are built on the ``meta`` device (no memory,
no random initialisation) and filled with ``load_state_dict(assign=True)``, so their
parameters ARE the given tensors (same storage), not copies. Where the layouts differ the
diffusers side gets a view (the VAE attention's 1x1 convolutions become linear weights by
indexing ``[:, :, 0, 0]``, which shares storage). A copy happens only where the caller
asks for another device or dtype than the tensors have (:func:`sd_from_ldm`), and for
the CLIP ``position_ids`` buffer, which checkpoints do not carry and transformers
computes.

Configs: :func:`read_ldm_checkpoint` takes them from the checkpoint's config folder (as
the single-file loader does); for tensors with no file (ComfyUI),
:func:`unet_config_from_ldm`, :func:`vae_config_from_ldm` and :func:`text_config_from_ldm`
read every size from the tensor shapes, and take the few numbers shapes cannot tell
(attention heads or head width, GroupNorm groups, the activation, SDXL's time-embedding
width, the VAE's scaling factor) from the caller.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path
from typing import Any

import torch

from .. import paths
from ..errors import InputError, ModelLoadError
from .sd import (
    CONFIG_DIR,
    LDM_PREFIXES,
    SIDE_CONFIG_SUFFIX,
    SINGLE_FILE_OPTIONAL,
    TEXT_ENCODER_OPTIONAL,
    SDModel,
    _load_tokenizer,
    ddim_scheduler,
    find_clip_tokenizer,
    fit_tokenizer,
    read_checkpoint,
    resolve_checkpoint,
    resolve_dtype,
    vae_dtype_for,
)
from .validate import (
    check_state_dict_keys,
    compare_state_dicts,
    describe_load_error,
    read_sd_configs,
)

UNET, VAE, TEXT_ENCODER, TEXT_ENCODER_2 = "unet", "vae", "text_encoder", "text_encoder_2"
KINDS = (UNET, VAE, TEXT_ENCODER, TEXT_ENCODER_2)
WHAT = {UNET: "SD UNet", VAE: "SD VAE", TEXT_ENCODER: "SD CLIP text encoder",
        TEXT_ENCODER_2: "SDXL OpenCLIP-bigG text encoder"}
SUPPORTED = "Only SD 1.x, SD 2.x and SDXL models are supported."
# Where a part's tensors sit in a checkpoint (named so in key errors). The second text
# encoder is held in transformers' names, as ComfyUI holds it ("clip_g.transformer.").
PART_PREFIXES = {**LDM_PREFIXES, TEXT_ENCODER_2: "clip_g.transformer."}
# Dtypes the diffusers/transformers modules run in; others (fp8) are converted.
RUNNABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CONFIGS_ROOT = CONFIG_DIR.parent


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one family's single file holds its text encoders, and its shipped configs."""

    family: str               # "sd1", "sd2", "sdxl"
    name: str                 # for messages
    config: str               # the shipped config folder under mgie_core/configs
    text_prefix: str          # the (first) text encoder
    text_open_clip: bool = False   # the first text encoder in OpenCLIP's layout (SD 2.x)
    text_2_prefix: str = ""        # SDXL's OpenCLIP-bigG

    @property
    def what(self) -> str:
        """The file's kind in messages."""
        return paths.SD_CHECKPOINT.what if self is SD1_LAYOUT else f"{self.name} checkpoint"

    def prefixes(self) -> dict[str, str]:
        out = {UNET: LDM_PREFIXES[UNET], VAE: LDM_PREFIXES[VAE], TEXT_ENCODER: self.text_prefix}
        if self.text_2_prefix:
            out[TEXT_ENCODER_2] = self.text_2_prefix
        return out


SD1_LAYOUT = Layout("sd1", "SD 1.x", "sd15", LDM_PREFIXES[TEXT_ENCODER])
SD2_LAYOUT = Layout("sd2", "SD 2.x", "sd2", "cond_stage_model.model.", text_open_clip=True)
SDXL_LAYOUT = Layout("sdxl", "SDXL", "sdxl", "conditioner.embedders.0.transformer.",
                     text_2_prefix="conditioner.embedders.1.model.")
# Keys some files carry to say how the model was trained (ComfyUI reads the same):
# "v_pred" marks a v-prediction model; zero-terminal-SNR ("ztsnr") and EDM schedules
# are not the DDIM schedule of docs/algorithms.md section 0 and are refused.
V_PRED_KEY = "v_pred"
UNSUPPORTED_MARKERS = {"ztsnr": "a zero-terminal-SNR schedule", "edm_mean": "an EDM model",
                       "edm_vpred.sigma_max": "an EDM v-prediction model"}
# ComfyUI tells an SD 2.x 768-v file from a 512-base one by the spread of this bias
# (comfy/supported_models.py, SD20.model_type); the pack does the same.
SD2_V_PROBE = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
SD2_V_STD = 0.09


@dataclasses.dataclass(eq=False)
class LDMPart:
    """One SD 1.x component as LDM-layout tensors, with its diffusers/transformers config.

    ``state`` keys carry no checkpoint prefix (``input_blocks.0.0.weight``,
    ``encoder.conv_in.weight``, ``text_model.embeddings.token_embedding.weight``). The
    headless runner's CheckpointLoaderSimple gives these as its MODEL, CLIP and VAE; in
    ComfyUI the pack's glue makes them from ComfyUI's own objects."""

    kind: str
    state: dict
    config: dict
    source: str
    tokenizer: Any = None                  # text encoders only (a CLIPTokenizer)
    scheduler_config: dict | None = None  # UNet only
    cache: dict = dataclasses.field(default_factory=dict, repr=False)
    second: LDMPart | None = None  # text encoder only: SDXL's OpenCLIP-bigG part

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"LDMPart kind must be one of {KINDS}, not {self.kind!r}")

    def __repr__(self) -> str:
        return f"LDMPart({self.kind}, {len(self.state)} tensors, {self.source})"


# --- reading a checkpoint ----------------------------------------------------------------

def detect_layout(state: dict, what: str, path: Path | str) -> Layout:
    """The family of a single-file state dict, from its text encoders' keys (as ComfyUI
    and diffusers tell them): OpenCLIP-bigG under ``conditioner.embedders.1.model.``
    is SDXL, OpenCLIP under ``cond_stage_model.model.`` SD 2.x, anything else is read as
    SD 1.x (whose key check then names what is missing)."""
    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in state)

    for key, kind in UNSUPPORTED_MARKERS.items():
        if key in state:
            raise ModelLoadError(what, path, f"it is {kind} (key '{key}')",
                                 "The pack samples with DDIM on the scaled-linear schedule "
                                 "(epsilon or v-prediction); " + SUPPORTED)
    if has(SDXL_LAYOUT.text_2_prefix):
        return SDXL_LAYOUT
    if has("conditioner.embedders.0.model."):
        raise ModelLoadError(what, path, "its only text encoder is OpenCLIP under "
                             "conditioner.embedders.0 (the SDXL refiner, or SD 2.x in the "
                             "sgm layout)", SUPPORTED)
    if has(SD2_LAYOUT.text_prefix):
        return SD2_LAYOUT
    return SD1_LAYOUT


def shipped_configs(family: str) -> dict[str, dict]:
    """The pack's shipped configs of a family ("sd1", "sd2", "sdxl"), read as data."""
    layout = {"sd1": SD1_LAYOUT, "sd2": SD2_LAYOUT, "sdxl": SDXL_LAYOUT}[family]
    return read_sd_configs(CONFIGS_ROOT / layout.config, "shipped config")


def _shipped_config(layout: Layout, state: dict) -> Path:
    cin = state.get(LDM_PREFIXES[UNET] + "input_blocks.0.0.weight")
    if layout is SDXL_LAYOUT and cin is not None and cin.ndim == 4 and cin.shape[1] == 8:
        return CONFIGS_ROOT / "sdxl_ip2p"    # SDXL InstructPix2Pix
    return CONFIGS_ROOT / layout.config


def file_prediction_type(layout: Layout, state: dict) -> str | None:
    """What a file says its UNet predicts, where it says anything: the ``v_pred`` key,
    or for SD 2.x ComfyUI's rule (a 768-v model's :data:`SD2_V_PROBE` bias has a
    standard deviation above 0.09; a 512-base model's does not)."""
    if V_PRED_KEY in state:
        return "v_prediction"
    if layout is SD2_LAYOUT:
        probe = state.get(SD2_V_PROBE)
        if probe is not None and float(probe.float().std(unbiased=False)) > SD2_V_STD:
            return "v_prediction"
        return "epsilon"
    return None


def open_clip_tokenizer(tokenizer):
    """OpenCLIP pads with "!" (id 0), not the end token (ComfyUI and diffusers alike)."""
    tok = copy.deepcopy(tokenizer)
    if "!" in tok.get_vocab():
        tok.pad_token = "!"
    return tok


@dataclasses.dataclass
class SingleFile:
    """A single-file checkpoint read, nothing converted: its family, config folder,
    configs (read as data), tokenizers and tensors."""

    path: Path
    layout: Layout
    config_dir: Path
    configs: dict
    tokenizer: Any
    tokenizer_2: Any
    state: dict


def read_any_single_file(name: str, config_dir: Path | None = None) -> SingleFile:
    """A single-file checkpoint of any family, found as the single-file loader finds it
    (models/checkpoints; tiny mode: by the name, see :func:`.sd.resolve_checkpoint`). The
    configs: ``config_dir``, else ``<stem>.config/`` beside the file, else the family's
    shipped ones, whose scheduler then takes the prediction type the file states
    (:func:`file_prediction_type`). Tokenizers: the config folder's ``tokenizer/`` and
    ``tokenizer_2/``, else the CLIP tokenizer (models/clip_tokenizer, ComfyUI's own),
    padding with "!" for OpenCLIP as the originals do."""
    what = paths.SD_CHECKPOINT.what
    path = resolve_checkpoint(name)
    if config_dir is None:
        side = path.with_name(path.stem + SIDE_CONFIG_SUFFIX)
        config_dir = side if (side / "model_index.json").exists() else None
    state = read_checkpoint(path, what)
    layout = detect_layout(state, what, path)
    shipped = config_dir is None
    config_dir = Path(config_dir) if config_dir is not None else _shipped_config(layout, state)
    configs = read_sd_configs(config_dir, f"{layout.what} config")
    if shipped:
        predicted = file_prediction_type(layout, state)
        if predicted:
            configs["scheduler"] = {**configs["scheduler"], "prediction_type": predicted}
    tok_dir = find_clip_tokenizer(config_dir)
    tokenizer = _load_tokenizer(tok_dir, "CLIP tokenizer")
    own = tok_dir == config_dir / "tokenizer"
    tokenizer_2 = None
    if layout is SD2_LAYOUT and not own:
        tokenizer = open_clip_tokenizer(tokenizer)
    if layout is SDXL_LAYOUT:
        second = config_dir / "tokenizer_2"
        tokenizer_2 = (_load_tokenizer(second, "CLIP tokenizer") if (second / "vocab.json")
                       .exists() else open_clip_tokenizer(tokenizer))
    return SingleFile(path, layout, config_dir, configs, tokenizer, tokenizer_2, state)


def _text_layers_optional(layout: Layout, state: dict, configs: dict) -> tuple[str, ...]:
    """SD 2.x files hold all of OpenCLIP-H's layers, its projection and logit scale; the
    model reads the penultimate layer's output (diffusers' config has one layer fewer),
    so the layers past the config's count are not used."""
    out: list[str] = []
    for prefix, key in ((layout.text_prefix, TEXT_ENCODER), (layout.text_2_prefix,
                                                               TEXT_ENCODER_2)):
        if not prefix:
            continue
        out += [prefix + "logit_scale"]
        if key == TEXT_ENCODER and layout.text_open_clip:
            out += [prefix + "text_projection"]
            n = int(configs[key]["num_hidden_layers"])
            layers = _indices(state, re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
            out += [f"{prefix}transformer.resblocks.{i}.*" for i in layers if i >= n]
        if key == TEXT_ENCODER and not layout.text_open_clip:
            out += [prefix + "text_model.embeddings.position_ids",
                    prefix + "text_projection.weight"]
    return tuple(out)


def check_file_keys(sf: SingleFile) -> None:
    """Every weight the configs' models have, in the file with its shape, under the
    family's names; nothing else than the documented optional keys (the SD 1.x ones:
    schedule buffers, the EMA copy; the ``v_pred`` marker; the unused OpenCLIP tensors of
    :func:`_text_layers_optional`). Errors name the keys as the file spells them. The
    models are built on the meta device: no memory, whatever their size."""
    from .ldm_convert import text_encoders_to_ldm, unet_to_ldm, vae_to_ldm

    what = sf.layout.what
    modules = {kind: _meta_build(kind, sf.configs[kind], str(sf.config_dir))
               for kind in sf.layout.prefixes()}
    expected = {}
    expected.update(unet_to_ldm(modules[UNET].state_dict(), modules[UNET].config))
    expected.update(vae_to_ldm(modules[VAE].state_dict(), modules[VAE].config))
    second = modules.get(TEXT_ENCODER_2)
    expected.update(text_encoders_to_ldm(sf.layout.family, modules[TEXT_ENCODER].state_dict(),
                                         None if second is None else second.state_dict()))
    missing, unexpected, mismatched = compare_state_dicts(expected, sf.state, loose_1x1=True)
    optional = (SINGLE_FILE_OPTIONAL + (V_PRED_KEY, "denoiser.*")
                + _text_layers_optional(sf.layout, sf.state, sf.configs))
    check_state_dict_keys(what, sf.path, missing, unexpected, mismatched, optional)


def _hf_text_state(sub: dict, layout: Layout, kind: str, config: dict) -> dict:
    """A text encoder's tensors (prefix removed) in transformers' names, with the
    ``text_model.`` level; OpenCLIP tensors go through diffusers' converter, and keep
    only what the config's model has (the layers it reads; the projection of the
    encoder that has one)."""
    open_clip = kind == TEXT_ENCODER_2 or layout.text_open_clip
    if not open_clip:
        # SDXL files may carry CLIP-L's position_ids and projection, which it does not use
        drop = ("text_model.embeddings.position_ids", "text_projection.weight") \
            if layout is not SD1_LAYOUT else ()
        return {(k if k.startswith("text_model.") else "text_model." + k): v
                for k, v in sub.items() if k not in drop}
    from types import SimpleNamespace

    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    width = sub["token_embedding.weight"].shape[1]
    stub = SimpleNamespace(config=SimpleNamespace(hidden_size=width))
    out = convert_open_clip_checkpoint(stub, {"m." + k: v for k, v in sub.items()}, prefix="m.")
    n = int(config["num_hidden_layers"])
    keep = {}
    for k, v in out.items():
        m = re.match(r"text_model\.encoder\.layers\.(\d+)\.", k)
        if (m and int(m.group(1)) >= n) or (k == "text_projection.weight"
                                             and kind == TEXT_ENCODER):
            continue
        keep[k] = v
    return keep


def split_checkpoint(state: dict, what: str, path: Path | str,
                     layout: Layout = SD1_LAYOUT, configs: dict | None = None
                     ) -> dict[str, dict]:
    """A single-file state dict split into its components' tensors (prefixes removed;
    text encoders in transformers' names, older CLIP names given the ``text_model.``
    level). For SD 1.x, keys of no component are refused unless
    :data:`.sd.SINGLE_FILE_OPTIONAL` allows them (SD 2.x and SDXL files are checked whole
    by :func:`check_file_keys` first)."""
    prefixes = layout.prefixes()
    parts: dict[str, dict] = {k: {} for k in prefixes}
    stray = []
    for key, value in state.items():
        for kind, prefix in prefixes.items():
            if key.startswith(prefix):
                parts[kind][key[len(prefix):]] = value
                break
        else:
            stray.append(key)
    if layout is SD1_LAYOUT:
        check_state_dict_keys(what, path, (), stray, (), SINGLE_FILE_OPTIONAL)
    for kind in (TEXT_ENCODER, TEXT_ENCODER_2):
        if kind in parts:
            parts[kind] = _hf_text_state(parts[kind], layout, kind,
                                         (configs or {}).get(kind) or {"num_hidden_layers": 10**6})
    return parts


def read_ldm_checkpoint(name: str, config_dir: Path | None = None
                        ) -> tuple[LDMPart, LDMPart, LDMPart]:
    """(UNet, text encoder, VAE) parts of a single-file checkpoint of any family, found
    as the single-file loader finds it (models/checkpoints, tiny mode), with the same
    configs (see :func:`read_any_single_file`); SDXL's text-encoder part carries the
    second encoder as ``second``. Every key is checked first; nothing is converted to a
    module yet."""
    return ldm_parts(read_any_single_file(name, config_dir))


def ldm_parts(sf: SingleFile) -> tuple[LDMPart, LDMPart, LDMPart]:
    """The parts of a single file read by :func:`read_any_single_file` (its tensors are
    taken: ``sf.state`` is emptied)."""
    what = sf.layout.what
    if sf.layout is not SD1_LAYOUT:
        check_file_keys(sf)
    state = sf.state
    # Tensors read from a file start at arbitrary byte offsets; CPU matrix kernels take
    # other code paths for unaligned memory and round differently (~1e-6 in a UNet
    # output). One fresh (aligned) tensor each, as a module's own parameters are, keeps
    # the results bit-identical to the single-file loader's, which copies into its
    # parameters. These are the run's own tensors: nothing is shared yet.
    fresh = {}
    for key in list(state):
        fresh[key] = state.pop(key).clone()
    parts = split_checkpoint(fresh, what, sf.path, sf.layout, sf.configs)
    del fresh
    source = str(sf.path)
    text = LDMPart(TEXT_ENCODER, parts[TEXT_ENCODER], sf.configs[TEXT_ENCODER], source,
                   tokenizer=sf.tokenizer)
    if TEXT_ENCODER_2 in parts:
        text.second = LDMPart(TEXT_ENCODER_2, parts[TEXT_ENCODER_2], sf.configs[TEXT_ENCODER_2],
                              source, tokenizer=sf.tokenizer_2)
    return (LDMPart(UNET, parts[UNET], sf.configs[UNET], source,
                    scheduler_config=sf.configs["scheduler"]),
            text, LDMPart(VAE, parts[VAE], sf.configs[VAE], source))


# --- configs from shapes -------------------------------------------------------------------

def _shape(state: dict, key: str, what: str, source: str) -> tuple[int, ...]:
    if key not in state:
        raise ModelLoadError(what, source, f"it has no weight '{key}'", SUPPORTED)
    return tuple(state[key].shape)


def _indices(state: dict, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in state for m in [rx.match(k)] if m})


def unet_config_from_ldm(state: dict, num_heads: int = 8, norm_num_groups: int = 32,
                         base: dict | None = None, source: str = "UNet", *,
                         num_head_channels: int | None = None,
                         addition_time_embed_dim: int = 256) -> dict:
    """The diffusers config of an LDM UNet (SD 1.x, SD 2.x or SDXL), sizes read from its
    tensors.

    Shapes give the channels per level, the res blocks per level, which levels have
    cross-attention and how many transformer layers each, whether the attention
    projections are linear (SD 2.x, SDXL) or 1x1 convolutions (SD 1.x), the context width,
    SDXL's added-conditioning input width (``label_emb``) and the input/output channels.
    Not in the shapes: the heads, either a count (``num_heads``: SD 1.x's 8) or a width
    (``num_head_channels``: SD 2.x's and SDXL's 64, ComfyUI's ``num_head_channels``); the
    GroupNorm groups (32); SDXL's time-id embedding width (256, ComfyUI's fixed one)."""
    what = WHAT[UNET]
    if base is None:
        sdxl = any(k.startswith("label_emb.") for k in state)
        base = read_sd_configs(CONFIGS_ROOT / ("sdxl" if sdxl else "sd15"),
                               "shipped config")[UNET]
    cfg = dict(base)
    cin = _shape(state, "input_blocks.0.0.weight", what, source)
    levels: list[list] = [[0, 0, 0]]      # per level: [channels, resnets, transformer depth]
    for i in _indices(state, r"input_blocks\.(\d+)\.0\.")[1:]:
        if f"input_blocks.{i}.0.op.weight" in state:  # a downsampler ends the level
            levels.append([0, 0, 0])
            continue
        levels[-1][0] = _shape(state, f"input_blocks.{i}.0.out_layers.3.weight", what,
                               source)[0]
        levels[-1][1] += 1
        depth = len(_indices(state, rf"input_blocks\.{i}\.1\.transformer_blocks\.(\d+)\."))
        levels[-1][2] = max(levels[-1][2], depth)
    counts = {lv[1] for lv in levels}
    if len(counts) != 1:
        raise ModelLoadError(what, source, f"its levels have different numbers of res "
                             f"blocks ({[lv[1] for lv in levels]})", SUPPORTED)
    proj = [k for k in state if k.endswith(".proj_in.weight")]
    if not proj:
        raise ModelLoadError(what, source, "it has no cross-attention", SUPPORTED)
    linear = len(state[proj[0]].shape) == 2
    context = [k for k in state if k.endswith("attn2.to_k.weight")]
    channels = [lv[0] for lv in levels]
    if num_head_channels:
        heads: int | list[int] = [max(1, c // int(num_head_channels)) for c in channels]
    else:
        heads = int(num_heads)
    mid_depth = len(_indices(state, r"middle_block\.1\.transformer_blocks\.(\d+)\."))
    depths = [max(1, lv[2]) for lv in levels]
    cfg.update(
        in_channels=cin[1], out_channels=_shape(state, "out.2.weight", what, source)[0],
        block_out_channels=channels, layers_per_block=counts.pop(),
        down_block_types=["CrossAttnDownBlock2D" if lv[2] else "DownBlock2D" for lv in levels],
        up_block_types=["CrossAttnUpBlock2D" if lv[2] else "UpBlock2D" for lv in reversed(levels)],
        cross_attention_dim=state[context[0]].shape[1], attention_head_dim=heads,
        norm_num_groups=int(norm_num_groups), use_linear_projection=linear)
    for key in ("transformer_layers_per_block", "addition_embed_type", "class_embed_type",
                "num_attention_heads", "projection_class_embeddings_input_dim",
                "addition_time_embed_dim", "addition_embed_type_num_heads"):
        cfg.pop(key, None)
    if any(d != 1 for d in depths) or (mid_depth and mid_depth != 1):
        if mid_depth and mid_depth != depths[-1]:
            raise ModelLoadError(what, source, f"its middle block has {mid_depth} transformer "
                                 f"layers and its last level {depths[-1]}", SUPPORTED)
        cfg["transformer_layers_per_block"] = depths
    if "label_emb.0.0.weight" in state:     # SDXL: pooled text embedding + time ids
        cfg.update(addition_embed_type="text_time",
                   addition_time_embed_dim=int(addition_time_embed_dim),
                   projection_class_embeddings_input_dim=state["label_emb.0.0.weight"].shape[1])
    elif any(k.startswith("label_emb.") for k in state):
        raise ModelLoadError(what, source, "it has a class label embedding other than SDXL's",
                             SUPPORTED)
    return cfg


def vae_config_from_ldm(state: dict, norm_num_groups: int = 32, base: dict | None = None,
                        source: str = "VAE", scaling_factor: float | None = None) -> dict:
    """The diffusers config of an LDM AutoencoderKL, sizes read from its tensors (the
    GroupNorm groups, 32 in SD, are not in the shapes); the scaling factor is the
    caller's (SDXL's 0.13025; ComfyUI's latent format says it), else SD 1.x's."""
    what = WHAT[VAE]
    cfg = dict(base if base is not None else read_sd_configs(CONFIG_DIR, "SD 1.5 config")[VAE])
    levels = _indices(state, r"encoder\.down\.(\d+)\.")
    if not levels:
        raise ModelLoadError(what, source, "it has no encoder.down blocks", "Only the SD "
                             "1.x AutoencoderKL is supported.")
    blocks = _indices(state, r"encoder\.down\.0\.block\.(\d+)\.")
    cfg.update(
        in_channels=_shape(state, "encoder.conv_in.weight", what, source)[1],
        out_channels=_shape(state, "decoder.conv_out.weight", what, source)[0],
        latent_channels=_shape(state, "post_quant_conv.weight", what, source)[0],
        block_out_channels=[_shape(state, f"encoder.down.{i}.block.0.conv1.weight", what,
                                   source)[0] for i in levels],
        layers_per_block=len(blocks), norm_num_groups=int(norm_num_groups),
        down_block_types=["DownEncoderBlock2D"] * len(levels),
        up_block_types=["UpDecoderBlock2D"] * len(levels))
    if scaling_factor is not None:
        cfg["scaling_factor"] = float(scaling_factor)
    return cfg


def text_config_from_ldm(state: dict, num_attention_heads: int = 12,
                         hidden_act: str = "quick_gelu", base: dict | None = None,
                         source: str = "CLIP") -> dict:
    """The transformers config of a CLIP text encoder, sizes read from its tensors
    (heads and activation are not in the shapes: CLIP-L has 12 and quick_gelu,
    OpenCLIP-H 16 and gelu, OpenCLIP-bigG 20 and gelu). With ``text_projection.weight``
    (SDXL's OpenCLIP-bigG) it is the config of a CLIPTextModelWithProjection."""
    what = WHAT[TEXT_ENCODER]
    cfg = dict(base if base is not None else
               read_sd_configs(CONFIG_DIR, "SD 1.5 config")[TEXT_ENCODER])
    vocab, width = _shape(state, "text_model.embeddings.token_embedding.weight", what, source)
    cfg.update(
        vocab_size=vocab, hidden_size=width,
        max_position_embeddings=_shape(
            state, "text_model.embeddings.position_embedding.weight", what, source)[0],
        num_hidden_layers=len(_indices(state, r"text_model\.encoder\.layers\.(\d+)\.")),
        intermediate_size=_shape(state, "text_model.encoder.layers.0.mlp.fc1.weight", what,
                                 source)[0],
        num_attention_heads=int(num_attention_heads), hidden_act=hidden_act)
    if "text_projection.weight" in state:
        cfg.update(projection_dim=state["text_projection.weight"].shape[0],
                   architectures=["CLIPTextModelWithProjection"])
    return cfg


# --- building the modules ------------------------------------------------------------------

def _meta_build(kind: str, config: dict, source: str):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    build = {UNET: lambda: UNet2DConditionModel.from_config(config),
             VAE: lambda: AutoencoderKL.from_config(config),
             TEXT_ENCODER: lambda: CLIPTextModel(CLIPTextConfig.from_dict(config)),
             TEXT_ENCODER_2: lambda: CLIPTextModelWithProjection(
                 CLIPTextConfig.from_dict(config))}[kind]
    try:
        with torch.device("meta"):
            return build()
    except Exception as exc:
        raise ModelLoadError(WHAT[kind], source, f"its config does not build a {kind}: "
                             f"{describe_load_error(exc)}", SUPPORTED) from exc


def _with_level(key: str) -> str:
    """A CLIP weight's name with the ``text_model.`` level checkpoints use (transformers
    >= 5.6 flattened CLIPTextModel; the projection sits beside the level)."""
    if key.startswith("text_model.") or key == "text_projection.weight":
        return key
    return "text_model." + key


def _expected_ldm(kind: str, module) -> dict:
    """The LDM names and shapes the module's weights have in a checkpoint."""
    from .ldm_convert import unet_to_ldm, vae_to_ldm

    own = module.state_dict()
    if kind == UNET:
        return unet_to_ldm(own, module.config)
    if kind == VAE:
        return vae_to_ldm(own, module.config)
    return {PART_PREFIXES[kind] + _with_level(k): v for k, v in own.items()}


def _convert(kind: str, prefixed: dict, module) -> dict:
    """diffusers' own LDM -> diffusers key converters, as the single-file loader uses;
    text encoders are already in transformers' names (the part's prefix comes off)."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    if kind == UNET:
        return convert_ldm_unet_checkpoint(prefixed, module.config)
    if kind == VAE:
        return convert_ldm_vae_checkpoint(prefixed, module.config)
    prefix = PART_PREFIXES[kind]
    state = {k[len(prefix):]: v for k, v in prefixed.items()}
    if not hasattr(module, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    return state


def _materialise_buffers(module, kind: str, source: str) -> None:
    """Buffers no checkpoint carries are computed (CLIP's position_ids); anything else
    still on the meta device is an error, never an uninitialised weight."""
    for name, buf in list(module.named_buffers()):
        if buf.device.type != "meta":
            continue
        owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "position_ids":
            owner.register_buffer(leaf, torch.arange(buf.shape[-1]).expand(tuple(buf.shape)),
                                  persistent=False)
        else:
            raise ModelLoadError(WHAT[kind], source, f"the buffer {name} was not filled",
                                 SUPPORTED)
    left = [n for n, p in module.named_parameters() if p.device.type == "meta"]
    if left:
        raise ModelLoadError(WHAT[kind], source, f"{len(left)} weights were not filled "
                             f"(e.g. {', '.join(left[:4])})", SUPPORTED)


def build_module(part: LDMPart):
    """The diffusers UNet / AutoencoderKL or transformers CLIPTextModel (SDXL's second:
    CLIPTextModelWithProjection) of a part, its parameters sharing the part's tensors.
    Every weight must be present with its shape (names as the checkpoint spells them in
    the error)."""
    module = _meta_build(part.kind, part.config, part.source)
    prefix = PART_PREFIXES[part.kind]
    prefixed = {prefix + (_with_level(k) if part.kind in (TEXT_ENCODER, TEXT_ENCODER_2)
                          else k): v for k, v in part.state.items()}
    optional = (prefix + "text_model.embeddings.position_ids",)
    missing, unexpected, mismatched = compare_state_dicts(
        _expected_ldm(part.kind, module), prefixed, loose_1x1=True)
    check_state_dict_keys(WHAT[part.kind], part.source, missing, unexpected, mismatched,
                          optional)
    try:
        converted = _convert(part.kind, prefixed, module)
    except Exception as exc:
        raise ModelLoadError(WHAT[part.kind], part.source, f"its weights could not be "
                             f"converted: {describe_load_error(exc)}",
                             SUPPORTED) from exc
    own = module.state_dict()
    extra = [k for k in converted if k not in own and not k.endswith("position_ids")]
    absent = [k for k in own if k not in converted]
    if extra or absent:  # the key check above makes this unreachable
        check_state_dict_keys(WHAT[part.kind], part.source, absent, extra, (),
                              TEXT_ENCODER_OPTIONAL)
    module.load_state_dict({k: v for k, v in converted.items() if k in own}, strict=False,
                           assign=True)
    _materialise_buffers(module, part.kind, part.source)
    return module.requires_grad_(False).eval()


def vae_module(part: LDMPart):
    """The part's diffusers VAE, built once and kept on the part (headless VAE nodes)."""
    if part.kind != VAE:
        raise InputError("vae", f"got a {part.kind} part", "a VAE")
    if "module" not in part.cache:
        part.cache["module"] = build_module(part)
    return part.cache["module"]


# --- the SD model --------------------------------------------------------------------------

def _tensor_home(state: dict) -> tuple[torch.device, torch.dtype]:
    for v in state.values():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v.device, v.dtype
    return torch.device("cpu"), torch.float32


def runnable_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """``dtype`` if the modules can run in it, else fp16 on CUDA / fp32 elsewhere (fp8
    weights, which ComfyUI casts layer by layer, are converted once)."""
    if dtype in RUNNABLE_DTYPES:
        return dtype
    return torch.float16 if device.type == "cuda" else torch.float32


def sd_from_ldm(unet: LDMPart, vae: LDMPart, text_encoder: LDMPart, *, dtype=None,
                device=None, source: str | None = None) -> SDModel:
    """The pack's :class:`SDModel` from the LDM parts, the modules' weights being the
    parts' tensors. SDXL: ``text_encoder.second`` is OpenCLIP-bigG, which becomes
    ``text_encoder_2`` with its tokenizer ``tokenizer_2``.

    ``device`` None: the device of the UNet's tensors. ``dtype`` None: the UNet's dtype
    (fp8 and other dtypes the modules cannot run in become fp16 on CUDA, fp32 elsewhere);
    the VAE is brought to it (SDXL's float32 under a float16 UNet:
    :func:`.sd.vae_dtype_for`), since the pack feeds UNet and VAE the same tensors; the text
    encoders KEEP their own dtype (they only turn token ids into features, which the pack
    casts to float32: ComfyUI runs its CLIP in fp16 even on the CPU, and so the bridge's
    prompts read as ComfyUI's own). An explicit ``dtype`` applies to all. Tensors
    already on the device in the dtype are shared; anything moved or cast is a copy (e.g.
    ComfyUI keeps the VAE in bf16 or fp32 next to an fp16 UNet on a GPU)."""
    for part, kind, name in ((unet, UNET, "model"), (vae, VAE, "vae"),
                             (text_encoder, TEXT_ENCODER, "clip")):
        if not isinstance(part, LDMPart) or part.kind != kind:
            got = part.kind if isinstance(part, LDMPart) else type(part).__name__
            raise InputError(name, f"got {got}", f"the {WHAT[kind]} of an SD 1.x, SD 2.x "
                             "or SDXL model")
    second = text_encoder.second
    for part in (text_encoder, second):
        if part is not None and part.tokenizer is None:
            raise InputError("clip", "has no tokenizer", "a CLIP text encoder with its "
                             "tokenizer")
    home_device, home_dtype = _tensor_home(unet.state)
    device = torch.device(device) if device is not None else home_device
    explicit = dtype is not None
    dtype = resolve_dtype(dtype, device) if explicit else runnable_dtype(home_dtype, device)
    modules = {}
    for part in (unet, vae, text_encoder, second):
        if part is None:
            continue
        module = build_module(part)
        want = dtype
        if part.kind in (TEXT_ENCODER, TEXT_ENCODER_2) and not explicit:
            want = runnable_dtype(_tensor_home(part.state)[1], device)
        if part.kind == VAE:
            want = vae_dtype_for(modules[UNET], module, dtype)
        own_dtypes = {t.dtype for t in module.parameters()}
        module.to(device=device)          # no-op for tensors already there (buffers move)
        if own_dtypes != {want}:
            module.to(dtype=want)         # a copy: documented above
        modules[part.kind] = module
    u, v, t = modules[UNET], modules[VAE], modules[TEXT_ENCODER]
    t2 = modules.get(TEXT_ENCODER_2)
    _check_fit(u, v, t, t2)
    tokenizer = fit_tokenizer(copy.deepcopy(text_encoder.tokenizer), t)
    tokenizer_2 = None if t2 is None else fit_tokenizer(copy.deepcopy(second.tokenizer), t2)
    return SDModel(unet=u, vae=v, text_encoder=t, tokenizer=tokenizer,
                   scheduler=ddim_scheduler(unet.scheduler_config), device=device, dtype=dtype,
                   source=source or unet.source, text_encoder_2=t2, tokenizer_2=tokenizer_2)


def _check_fit(u, v, t, t2) -> None:
    """The parts belong together: the UNet attends to the text encoders' width (SDXL:
    the two side by side), SDXL's added conditioning takes the second encoder's pooled
    projection and six time ids, and the VAE has the UNet's latent channels."""
    width = t.config.hidden_size + (t2.config.hidden_size if t2 is not None else 0)
    text_time = getattr(u.config, "addition_embed_type", None) == "text_time"
    if text_time != (t2 is not None):
        raise InputError("clip", "has " + ("two text encoders" if t2 is not None else
                                           "one text encoder") + " but the UNet is "
                         + ("an SDXL" if text_time else "not an SDXL") + " UNet",
                         "the CLIP of the same checkpoint as the model")
    if u.config.cross_attention_dim != width:
        raise InputError("clip", f"gives {width}-wide text features but the "
                         f"UNet attends to {u.config.cross_attention_dim}-wide ones",
                         "the CLIP of the same checkpoint as the model")
    if text_time:
        added = t2.config.projection_dim + 6 * u.config.addition_time_embed_dim
        if added != u.config.projection_class_embeddings_input_dim:
            raise InputError("clip", f"gives a {t2.config.projection_dim}-wide pooled "
                             f"embedding: with the time ids {added} values, but the UNet's "
                             "added conditioning takes "
                             f"{u.config.projection_class_embeddings_input_dim}",
                             "the CLIP of the same SDXL checkpoint as the model")
    if v.config.latent_channels != u.config.out_channels:
        raise InputError("vae", f"has {v.config.latent_channels} latent channels but the UNet "
                         f"predicts {u.config.out_channels}", "the VAE of an SD 1.x, SD 2.x "
                         "or SDXL model (4 channels)")


def shares_storage(module: torch.nn.Module, part: LDMPart) -> float:
    """Fraction of the module's parameters that use the storage of one of the part's
    tensors (1.0 = nothing copied)."""
    ptrs = {v.untyped_storage().data_ptr() for v in part.state.values()
            if isinstance(v, torch.Tensor)}
    params = list(module.parameters())
    shared = sum(p.untyped_storage().data_ptr() in ptrs for p in params)
    return shared / max(1, len(params))
