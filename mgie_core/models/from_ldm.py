"""SD 1.x models from LDM-layout state dicts, sharing the weight tensors.

The LDM layout is the one single-file checkpoints use and the one ComfyUI's loaded models
hold: the UNet as under ``model.diffusion_model.`` (``input_blocks.*``, ``middle_block.*``,
``output_blocks.*``), the VAE as under ``first_stage_model.`` (``encoder.down.*``,
``decoder.up.*``), the CLIP text encoder as under ``cond_stage_model.transformer.``
(``text_model.*``). An :class:`LDMPart` is one of the three with its diffusers config;
:func:`sd_from_ldm` turns three parts into the pack's :class:`~.sd.SDModel`.

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
(attention heads, GroupNorm groups, the activation) from the caller.
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
    SINGLE_FILE_OPTIONAL,
    TEXT_ENCODER_OPTIONAL,
    SDModel,
    ddim_scheduler,
    fit_tokenizer,
    read_single_file,
    resolve_dtype,
)
from .validate import (
    check_state_dict_keys,
    compare_state_dicts,
    describe_load_error,
    read_sd_configs,
)

UNET, VAE, TEXT_ENCODER = "unet", "vae", "text_encoder"
KINDS = (UNET, VAE, TEXT_ENCODER)
WHAT = {UNET: "SD 1.x UNet", VAE: "SD 1.x VAE", TEXT_ENCODER: "SD 1.x CLIP text encoder"}
# Dtypes the diffusers/transformers modules run in; others (fp8) are converted.
RUNNABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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
    tokenizer: Any = None                  # text encoder only (a CLIPTokenizer)
    scheduler_config: dict | None = None  # UNet only
    cache: dict = dataclasses.field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"LDMPart kind must be one of {KINDS}, not {self.kind!r}")

    def __repr__(self) -> str:
        return f"LDMPart({self.kind}, {len(self.state)} tensors, {self.source})"


# --- reading a checkpoint ----------------------------------------------------------------

def split_checkpoint(state: dict, what: str, path: Path | str) -> dict[str, dict]:
    """A single-file SD 1.x state dict split into the three components' LDM tensors
    (prefixes removed; older CLIP names get the ``text_model.`` level). Keys of no
    component are refused unless :data:`.sd.SINGLE_FILE_OPTIONAL` allows them."""
    parts: dict[str, dict] = {k: {} for k in KINDS}
    stray = []
    for key, value in state.items():
        for kind, prefix in LDM_PREFIXES.items():
            if key.startswith(prefix):
                rest = key[len(prefix):]
                if kind == TEXT_ENCODER and not rest.startswith("text_model."):
                    rest = "text_model." + rest
                parts[kind][rest] = value
                break
        else:
            stray.append(key)
    check_state_dict_keys(what, path, (), stray, (), SINGLE_FILE_OPTIONAL)
    return parts


def read_ldm_checkpoint(name: str, config_dir: Path | None = None
                        ) -> tuple[LDMPart, LDMPart, LDMPart]:
    """(UNet, text encoder, VAE) parts of a single-file SD 1.x checkpoint, found as the
    single-file loader finds it (models/checkpoints, tiny mode), with the same configs
    (``<stem>.config/`` beside it, else the pack's SD 1.5). Nothing is converted yet."""
    what = paths.SD_CHECKPOINT.what
    path, _, configs, tokenizer, state = read_single_file(name, config_dir)
    # Tensors read from a file start at arbitrary byte offsets; CPU matrix kernels take
    # other code paths for unaligned memory and round differently (~1e-6 in a UNet
    # output). One fresh (aligned) tensor each, as a module's own parameters are, keeps
    # the results bit-identical to the single-file loader's, which copies into its
    # parameters. These are the run's own tensors: nothing is shared yet.
    for key in list(state):
        state[key] = state.pop(key).clone()
    parts = split_checkpoint(state, what, path)
    source = str(path)
    return (LDMPart(UNET, parts[UNET], configs[UNET], source,
                    scheduler_config=configs["scheduler"]),
            LDMPart(TEXT_ENCODER, parts[TEXT_ENCODER], configs[TEXT_ENCODER], source,
                    tokenizer=tokenizer),
            LDMPart(VAE, parts[VAE], configs[VAE], source))


# --- configs from shapes -------------------------------------------------------------------

def _shape(state: dict, key: str, what: str, source: str) -> tuple[int, ...]:
    if key not in state:
        raise ModelLoadError(what, source, f"it has no weight '{key}'",
                             "Only SD 1.x models are supported.")
    return tuple(state[key].shape)


def _indices(state: dict, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in state for m in [rx.match(k)] if m})


def unet_config_from_ldm(state: dict, num_heads: int = 8, norm_num_groups: int = 32,
                         base: dict | None = None, source: str = "UNet") -> dict:
    """The diffusers config of an SD 1.x LDM UNet, sizes read from its tensors.

    Shapes give the channels per level, the res blocks per level, which levels have
    cross-attention, the context width and the input/output channels. ``num_heads``
    (SD 1.x: 8, ComfyUI's ``unet_config["num_heads"]``) and the GroupNorm groups (32)
    are not in the shapes. SD 2.x (linear attention projections, head width instead of
    head count) and SDXL (``label_emb``, several transformer layers) are refused."""
    what = WHAT[UNET]
    cfg = dict(base if base is not None else read_sd_configs(CONFIG_DIR, "SD 1.5 config")[UNET])
    cin = _shape(state, "input_blocks.0.0.weight", what, source)
    if any(k.startswith("label_emb.") for k in state):
        raise ModelLoadError(what, source, "it has a label embedding (label_emb: SDXL or "
                             "another class-conditioned UNet)", "Only SD 1.x is supported.")
    levels: list[list] = [[0, 0, False]]      # per level: [channels, resnets, attention]
    for i in _indices(state, r"input_blocks\.(\d+)\.0\.")[1:]:
        if f"input_blocks.{i}.0.op.weight" in state:  # a downsampler ends the level
            levels.append([0, 0, False])
            continue
        levels[-1][0] = _shape(state, f"input_blocks.{i}.0.out_layers.3.weight", what,
                               source)[0]
        levels[-1][1] += 1
        levels[-1][2] = levels[-1][2] or f"input_blocks.{i}.1.proj_in.weight" in state
    counts = {lv[1] for lv in levels}
    if len(counts) != 1:
        raise ModelLoadError(what, source, f"its levels have different numbers of res "
                             f"blocks ({[lv[1] for lv in levels]})", "Only SD 1.x is supported.")
    proj = [k for k in state if k.endswith(".proj_in.weight")]
    if not proj:
        raise ModelLoadError(what, source, "it has no cross-attention", "Only SD 1.x is "
                             "supported.")
    if len(state[proj[0]].shape) != 4:
        raise ModelLoadError(what, source, "its attention projections are linear layers "
                             "(the SD 2.x layout)", "Only SD 1.x (convolutional projections, "
                             "768-wide CLIP-L context) is supported.")
    depth = _indices(state, r"input_blocks\.\d+\.1\.transformer_blocks\.(\d+)\.")
    if len(depth) != 1:
        raise ModelLoadError(what, source, f"it has {len(depth)} transformer layers per "
                             "attention block (SDXL layout)", "Only SD 1.x is supported.")
    context = [k for k in state if k.endswith("attn2.to_k.weight")]
    cfg.update(
        in_channels=cin[1], out_channels=_shape(state, "out.2.weight", what, source)[0],
        block_out_channels=[lv[0] for lv in levels], layers_per_block=counts.pop(),
        down_block_types=["CrossAttnDownBlock2D" if lv[2] else "DownBlock2D" for lv in levels],
        up_block_types=["CrossAttnUpBlock2D" if lv[2] else "UpBlock2D" for lv in reversed(levels)],
        cross_attention_dim=state[context[0]].shape[1], attention_head_dim=int(num_heads),
        norm_num_groups=int(norm_num_groups))
    for key in ("use_linear_projection", "transformer_layers_per_block", "addition_embed_type",
                "class_embed_type", "num_attention_heads"):
        cfg.pop(key, None)
    return cfg


def vae_config_from_ldm(state: dict, norm_num_groups: int = 32, base: dict | None = None,
                        source: str = "VAE") -> dict:
    """The diffusers config of an LDM AutoencoderKL, sizes read from its tensors (the
    GroupNorm groups, 32 in SD, are not in the shapes); the scaling factor is SD 1.x's."""
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
    return cfg


def text_config_from_ldm(state: dict, num_attention_heads: int = 12,
                         hidden_act: str = "quick_gelu", base: dict | None = None,
                         source: str = "CLIP") -> dict:
    """The transformers config of a CLIP text encoder, sizes read from its tensors
    (heads and activation are not in the shapes: CLIP-L has 12 and quick_gelu)."""
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
    return cfg


# --- building the modules ------------------------------------------------------------------

def _meta_build(kind: str, config: dict, source: str):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    build = {UNET: lambda: UNet2DConditionModel.from_config(config),
             VAE: lambda: AutoencoderKL.from_config(config),
             TEXT_ENCODER: lambda: CLIPTextModel(CLIPTextConfig.from_dict(config))}[kind]
    try:
        with torch.device("meta"):
            return build()
    except Exception as exc:
        raise ModelLoadError(WHAT[kind], source, f"its config does not build a {kind}: "
                             f"{describe_load_error(exc)}", "Only SD 1.x is supported.") from exc


def _expected_ldm(kind: str, module) -> dict:
    """The LDM names and shapes the module's weights have in a checkpoint."""
    from .ldm_convert import text_encoder_to_ldm, unet_to_ldm, vae_to_ldm

    own = module.state_dict()
    if kind == UNET:
        return unet_to_ldm(own, module.config)
    if kind == VAE:
        return vae_to_ldm(own, module.config)
    return text_encoder_to_ldm(own)


def _convert(kind: str, prefixed: dict, module) -> dict:
    """diffusers' own LDM -> diffusers key converters, as the single-file loader uses."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    if kind == UNET:
        return convert_ldm_unet_checkpoint(prefixed, module.config)
    if kind == VAE:
        return convert_ldm_vae_checkpoint(prefixed, module.config)
    state = convert_ldm_clip_checkpoint(prefixed)
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
                                 "Only SD 1.x is supported.")
    left = [n for n, p in module.named_parameters() if p.device.type == "meta"]
    if left:
        raise ModelLoadError(WHAT[kind], source, f"{len(left)} weights were not filled "
                             f"(e.g. {', '.join(left[:4])})", "Only SD 1.x is supported.")


def build_module(part: LDMPart):
    """The diffusers UNet / AutoencoderKL or transformers CLIPTextModel of a part, its
    parameters sharing the part's tensors. Every weight must be present with its shape
    (names as the checkpoint spells them in the error)."""
    module = _meta_build(part.kind, part.config, part.source)
    prefix = LDM_PREFIXES[part.kind]
    prefixed = {prefix + k: v for k, v in part.state.items()}
    optional = (LDM_PREFIXES[TEXT_ENCODER] + "text_model.embeddings.position_ids",)
    missing, unexpected, mismatched = compare_state_dicts(
        _expected_ldm(part.kind, module), prefixed, loose_1x1=True)
    check_state_dict_keys(WHAT[part.kind], part.source, missing, unexpected, mismatched,
                          optional)
    try:
        converted = _convert(part.kind, prefixed, module)
    except Exception as exc:
        raise ModelLoadError(WHAT[part.kind], part.source, f"its weights could not be "
                             f"converted: {describe_load_error(exc)}",
                             "Only SD 1.x is supported.") from exc
    own = module.state_dict()
    extra = [k for k in converted if k not in own and not k.endswith("position_ids")]
    absent = [k for k in own if k not in converted]
    if extra or absent:  # the key check above makes this unreachable for SD 1.x
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
    """The pack's :class:`SDModel` from three LDM parts, the modules' weights being the
    parts' tensors.

    ``device`` None: the device of the UNet's tensors. ``dtype`` None: the UNet's dtype
    (fp8 and other dtypes the modules cannot run in become fp16 on CUDA, fp32 elsewhere);
    the VAE is brought to it, since the pack feeds UNet and VAE the same tensors; the text
    encoder KEEPS its own dtype (it only turns token ids into features, which the pack
    casts to float32: ComfyUI runs its CLIP in fp16 even on the CPU, and so the bridge's
    prompts read as ComfyUI's own). An explicit ``dtype`` applies to all three. Tensors
    already on the device in the dtype are shared; anything moved or cast is a copy (e.g.
    ComfyUI keeps the VAE in bf16 or fp32 next to an fp16 UNet on a GPU)."""
    for part, kind, name in ((unet, UNET, "model"), (vae, VAE, "vae"),
                             (text_encoder, TEXT_ENCODER, "clip")):
        if not isinstance(part, LDMPart) or part.kind != kind:
            got = part.kind if isinstance(part, LDMPart) else type(part).__name__
            raise InputError(name, f"got {got}", f"the {WHAT[kind]} of an SD 1.x model")
    if text_encoder.tokenizer is None:
        raise InputError("clip", "has no tokenizer", "a CLIP text encoder with its tokenizer")
    home_device, home_dtype = _tensor_home(unet.state)
    device = torch.device(device) if device is not None else home_device
    explicit = dtype is not None
    dtype = resolve_dtype(dtype, device) if explicit else runnable_dtype(home_dtype, device)
    modules = {}
    for part in (unet, vae, text_encoder):
        module = build_module(part)
        want = dtype
        if part.kind == TEXT_ENCODER and not explicit:
            want = runnable_dtype(_tensor_home(part.state)[1], device)
        own_dtypes = {t.dtype for t in module.parameters()}
        module.to(device=device)          # no-op for tensors already there (buffers move)
        if own_dtypes != {want}:
            module.to(dtype=want)         # a copy: documented above
        modules[part.kind] = module
    u, v, t = modules[UNET], modules[VAE], modules[TEXT_ENCODER]
    if u.config.cross_attention_dim != t.config.hidden_size:
        raise InputError("clip", f"gives {t.config.hidden_size}-wide text features but the "
                         f"UNet attends to {u.config.cross_attention_dim}-wide ones",
                         "the CLIP of the same SD 1.x checkpoint as the model")
    if v.config.latent_channels != u.config.out_channels:
        raise InputError("vae", f"has {v.config.latent_channels} latent channels but the UNet "
                         f"predicts {u.config.out_channels}", "an SD 1.x VAE (4 channels)")
    tokenizer = fit_tokenizer(copy.deepcopy(text_encoder.tokenizer), t)
    return SDModel(unet=u, vae=v, text_encoder=t, tokenizer=tokenizer,
                   scheduler=ddim_scheduler(unet.scheduler_config), device=device, dtype=dtype,
                   source=source or unet.source)


def shares_storage(module: torch.nn.Module, part: LDMPart) -> float:
    """Fraction of the module's parameters that use the storage of one of the part's
    tensors (1.0 = nothing copied)."""
    ptrs = {v.untyped_storage().data_ptr() for v in part.state.values()
            if isinstance(v, torch.Tensor)}
    params = list(module.parameters())
    shared = sum(p.untyped_storage().data_ptr() in ptrs for p in params)
    return shared / max(1, len(params))
