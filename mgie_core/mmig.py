"""MMIG's two small modules between its LLM and its diffusion editing model
(docs/algorithms.md §15): the MM-Adapter, which adapts the frozen LLM to a mix of
text-only and image+text inputs, and MMSM, which lets the LLM's text embedding and a
UNet feature map support each other. Both start as the identity, so attaching them
changes nothing until they are trained.

* MM-Adapter (LaVIN's Mixture-of-Modality adaptation): before each decoder layer's
  attention, ``Z' = Z + s * (w0 f_a1(Z) + w1 f_a2(Z))``, where ``f_a1``/``f_a2`` are
  RepAdapters sharing one down-projection and ``w = softmax(router(m) / T)`` is read
  from a learned modality embedding ``m`` (row 0: text only, row 1: image + text).
  :func:`inject_mm_adapters` replaces each layer's ``input_layernorm`` by the norm
  followed by its adapter (module replacement, as peft injects), freezing the base.
* MMSM: ``e3 = MLP(e0)`` (the LLM's text embedding), ``e2 = DE(e1)`` (a UNet feature
  map through a domain encoder), ``e4 = CA(e2, e3)`` (cross-attention, the image
  positions query the text), ``e6 = e1 + DD(e4)`` (a domain decoder back to the UNet's
  channels), with ``L_MMSM = ½ (ē3 − ē2)²`` on the pooled embeddings
  (:func:`mmsm_loss`). :func:`attach_mmsm` hooks it on a UNet block.
* :func:`save_mmig` / :func:`load_mmig`: both modules in one safetensors file whose
  metadata holds their constructor arguments.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import write_atomic
from .errors import InputError, ModelLoadError

KIND = "xmgie-mmig"
FORMAT = "1"
ADAPTER_PREFIX, MMSM_PREFIX = "mm_adapter.", "mmsm."
WHAT = "MMIG modules (MM-Adapter / MMSM)"
MAKE = ("Make one with save_mmig (mgie_core.mmig) or an MMIG training run "
        "(xmgie train configs/train/mmig_stage1.yaml ...), which writes it.")
TEXT_ONLY, IMAGE_TEXT = 0, 1          # rows of the modality embedding
CROSS_ATTENTION_FACTOR = 4            # the pack's cross-attention maps: 16x16 at 512 px


# --- MM-Adapter ----------------------------------------------------------------------------

class RepAdapterRouter(nn.Module):
    """Two RepAdapters mixed by a modality router (LaVIN's RepAdapter_Router):
    ``x + scale * (w0 up1(h) + w1 up2(h))``, ``h = dropout(down(x))``,
    ``w = softmax(router(modality) / temperature)``.

    ``down`` (dim -> hidden) is xavier-initialised; ``up1``/``up2`` (hidden -> dim, in
    ``groups`` groups as LaVIN's grouped 1x1 convolutions) start at zero, so the module
    is exactly the identity until trained. The adapter computes in its own precision
    (float32) and adds its change in the input's dtype."""

    def __init__(self, dim: int, hidden: int = 8, temperature: float = 10.0,
                 scale: float = 1.0, groups: int = 2, dropout: float = 0.1):
        super().__init__()
        if dim % groups or hidden % groups:
            raise ValueError(f"dim {dim} and hidden {hidden} must be multiples of groups "
                             f"{groups}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.dim, self.hidden = int(dim), int(hidden)
        self.temperature, self.scale = float(temperature), float(scale)
        self.down = nn.Conv1d(dim, hidden, 1)
        self.up1 = nn.Conv1d(hidden, dim, 1, groups=groups)
        self.up2 = nn.Conv1d(hidden, dim, 1, groups=groups)
        self.router = nn.Linear(dim, 2)
        self.dropout = nn.Dropout(dropout)
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        for up in (self.up1, self.up2):
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)

    def weights(self, modality: torch.Tensor) -> torch.Tensor:
        """[B, 2] routing weights for [B, dim] modality vectors."""
        p = self.router.weight
        return torch.softmax(self.router(modality.to(p.device, p.dtype)) / self.temperature,
                             dim=-1)

    def forward(self, x: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        p = self.down.weight
        h = self.dropout(self.down(x.to(p.device, p.dtype).transpose(1, 2)))   # [B,hid,L]
        w = self.weights(modality)[:, :, None, None]                           # [B,2,1,1]
        delta = w[:, 0] * self.up1(h) + w[:, 1] * self.up2(h)                  # [B,dim,L]
        return x + (self.scale * delta).transpose(1, 2).to(x.dtype)


class MMAdapters(nn.Module):
    """Every layer's :class:`RepAdapterRouter` and the modality embedding: exactly the
    trained parameters θ_a of the MM-Adapter (its ``parameters()``).

    The modality of the next forward is set per row with :meth:`set_modality` (or the
    :meth:`modality` context); without one, every row has ``default_has_image``
    (MGIE's prompts always hold the image)."""

    def __init__(self, dim: int, num_layers: int, hidden: int = 8, temperature: float = 10.0,
                 scale: float = 1.0, groups: int = 2, dropout: float = 0.1):
        super().__init__()
        self.config = dict(dim=int(dim), num_layers=int(num_layers), hidden=int(hidden),
                           temperature=float(temperature), scale=float(scale),
                           groups=int(groups), dropout=float(dropout))
        self.adapters = nn.ModuleList(
            RepAdapterRouter(dim, hidden, temperature, scale, groups, dropout)
            for _ in range(num_layers))
        self.modality_embedding = nn.Embedding(2, dim)
        self.default_has_image = True
        self._rows: torch.Tensor | None = None

    def set_modality(self, has_image) -> None:
        """The modality of each row of the next forwards: a bool, or a [B] bool tensor
        (True: image + text). ``None`` goes back to ``default_has_image``."""
        if has_image is None:
            self._rows = None
            return
        rows = torch.as_tensor(has_image).reshape(-1).long()
        if rows.numel() == 0 or bool(((rows != 0) & (rows != 1)).any()):
            raise InputError("has_image", f"is {has_image!r}", "a bool, or one bool per row")
        self._rows = rows

    @contextlib.contextmanager
    def modality(self, has_image) -> Iterator[MMAdapters]:
        old = self._rows
        self.set_modality(has_image)
        try:
            yield self
        finally:
            self._rows = old

    def modality_vectors(self, batch: int, device: torch.device | None = None) -> torch.Tensor:
        """[batch, dim] modality embeddings of the rows (one set row is broadcast), on
        ``device``: the embedding follows the layers when a host moves the LLM (it is
        not one of the LLM's modules, so the move leaves it behind)."""
        if device is not None and self.modality_embedding.weight.device != device:
            from .grad_mode import normal_tensors

            with normal_tensors():        # normal weights even inside a host's inference mode
                self.modality_embedding.to(device)
        emb = self.modality_embedding.weight
        rows = self._rows
        if rows is None:
            rows = torch.full((1,), IMAGE_TEXT if self.default_has_image else TEXT_ONLY)
        if rows.numel() == 1:
            rows = rows.expand(batch)
        elif rows.numel() != batch:
            raise InputError("has_image", f"gives {rows.numel()} rows but the LLM's batch has "
                             f"{batch}", "one modality per row (or one for all)",
                             "Call set_modality with the batch's has_image flags.")
        return self.modality_embedding(rows.to(emb.device))

    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.parameters())


def adapter_parameter_count(dim: int, num_layers: int, hidden: int = 8,
                            groups: int = 2) -> int:
    """θ_a's size without building it: per layer, down ``dim*hidden + hidden``, two grouped
    ups ``2 (hidden/groups * dim + dim)``, router ``2 dim + 2``; plus the ``2 dim``
    modality embedding (docs/algorithms.md §15 gives the 7B number)."""
    per_layer = (dim * hidden + hidden) + 2 * (hidden // groups * dim + dim) + (2 * dim + 2)
    return num_layers * per_layer + 2 * dim


class _AdaptedNorm(nn.Module):
    """A decoder layer's input norm followed by its adapter (what injection puts in
    place of ``input_layernorm``; :func:`remove_mm_adapters` puts ``norm`` back)."""

    def __init__(self, norm: nn.Module, adapter: RepAdapterRouter, owner: MMAdapters):
        super().__init__()
        self.norm = norm
        self.adapter = adapter
        self._owner = [owner]        # a plain list: the owner is not a child module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        return self.adapter(y, self._owner[0].modality_vectors(y.shape[0], y.device))


def _decoder_layers(llm) -> nn.ModuleList:
    body = getattr(llm, "model", llm)          # LlamaForCausalLM -> LlamaModel
    layers = getattr(body, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers) \
            or not all(hasattr(layer, "input_layernorm") for layer in layers):
        raise InputError("llm", f"is a {type(llm).__name__} without decoder layers holding "
                         "an input_layernorm", "a transformers LlamaForCausalLM or LlamaModel")
    return layers


def inject_mm_adapters(llm, hidden: int = 8, temperature: float = 10.0, scale: float = 1.0,
                       *, adapters: MMAdapters | None = None, groups: int = 2,
                       dropout: float = 0.1) -> MMAdapters:
    """Put an adapter before every decoder layer's attention of ``llm`` (in place, its
    own weights frozen) and return the :class:`MMAdapters` holding them: new ones
    (identity at init, float32, on the LLM's device), or ``adapters`` (e.g. loaded by
    :func:`load_mmig`), which must fit the LLM's width and depth."""
    layers = _decoder_layers(llm)
    if any(isinstance(layer.input_layernorm, _AdaptedNorm) for layer in layers):
        raise InputError("llm", "already has MM-Adapters", "an LLM without them",
                         "Call remove_mm_adapters(llm) first, or use the ones it has.")
    dim = int(llm.config.hidden_size)
    if adapters is None:
        adapters = MMAdapters(dim, len(layers), hidden, temperature, scale, groups, dropout)
        p = next(llm.parameters())
        adapters.to(p.device)
    elif (adapters.config["dim"], adapters.config["num_layers"]) != (dim, len(layers)):
        raise InputError("adapters", f"were made for width {adapters.config['dim']} and "
                         f"{adapters.config['num_layers']} layers", f"adapters for this "
                         f"LLM's width {dim} and {len(layers)} layers",
                         "Use the MM-Adapter trained with this LLM.")
    llm.requires_grad_(False)
    adapters.requires_grad_(True).train(llm.training)   # dropout only when the LLM trains
    for layer, adapter in zip(layers, adapters.adapters, strict=True):
        layer.input_layernorm = _AdaptedNorm(layer.input_layernorm, adapter, adapters)
    return adapters


def remove_mm_adapters(llm):
    """Put the original norms back (the adapters are kept by their MMAdapters)."""
    for layer in _decoder_layers(llm):
        if isinstance(layer.input_layernorm, _AdaptedNorm):
            layer.input_layernorm = layer.input_layernorm.norm
    return llm


# --- MMSM --------------------------------------------------------------------------------

@dataclasses.dataclass
class MMSMOut:
    e2: torch.Tensor    # [B, HW, hidden]  DE(e1)
    e3: torch.Tensor    # [B, L, hidden]   MLP(e0)
    e4: torch.Tensor    # [B, HW, hidden]  CA(e2, e3)
    e6: torch.Tensor    # [B, C, H, W]     e1 + DD(e4)


def _groups(channels: int, most: int = 32) -> int:
    return max(g for g in range(1, min(most, channels) + 1) if channels % g == 0)


class MMSM(nn.Module):
    """Multi-modality mutual Support Module (module docstring). DE is a GroupNorm and a
    1x1 convolution (per position), the MLP two linear layers with a GELU, CA one
    multi-head attention (queries e2, keys and values e3), DD two linear layers with a
    GELU whose last is zero-initialised, so ``e6 == e1`` until trained."""

    def __init__(self, text_dim: int, feature_channels: int, hidden: int = 256,
                 heads: int = 4):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden {hidden} must be a multiple of heads {heads}")
        self.config = dict(text_dim=int(text_dim), feature_channels=int(feature_channels),
                           hidden=int(hidden), heads=int(heads))
        self.site: str | None = None      # the UNet block it was attached to
        self.text_mlp = nn.Sequential(nn.Linear(text_dim, hidden), nn.GELU(),
                                      nn.Linear(hidden, hidden))
        self.domain_encoder = nn.Sequential(
            nn.GroupNorm(_groups(feature_channels), feature_channels),
            nn.Conv2d(feature_channels, hidden, 1))
        self.cross_attention = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.domain_decoder = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(),
                                            nn.Linear(hidden, feature_channels))
        nn.init.zeros_(self.domain_decoder[-1].weight)
        nn.init.zeros_(self.domain_decoder[-1].bias)

    def forward(self, e0: torch.Tensor, e1: torch.Tensor,
                text_mask: torch.Tensor | None = None) -> MMSMOut:
        p = self.domain_decoder[-1].weight
        b, c, h, w = e1.shape
        if c != self.config["feature_channels"]:
            raise InputError("e1", f"has {c} channels", f"{self.config['feature_channels']} "
                             "(the MMSM's feature_channels)", "Attach it at the site it was "
                             "made for.")
        if e0.shape[-1] != self.config["text_dim"]:
            raise InputError("e0", f"is {e0.shape[-1]} wide", f"{self.config['text_dim']} "
                             "(the MMSM's text_dim)")
        e3 = self.text_mlp(e0.to(p.device, p.dtype))
        e2 = self.domain_encoder(e1.to(p.device, p.dtype)).flatten(2).transpose(1, 2)
        ignore = None
        if text_mask is not None:
            keep = text_mask.to(e3.device).bool()
            if not bool(keep.any(-1).all()):
                raise InputError("text_mask", "masks every token of a row", "at least one "
                                 "text token per row")
            ignore = ~keep
        e4, _ = self.cross_attention(e2, e3, e3, key_padding_mask=ignore,
                                     need_weights=False)
        d = self.domain_decoder(e4).transpose(1, 2).reshape(b, c, h, w)
        return MMSMOut(e2=e2, e3=e3, e4=e4, e6=e1 + d.to(e1.dtype))


def mmsm_loss(e2: torch.Tensor, e3: torch.Tensor,
              text_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``L_MMSM = ½ (ē3 − ē2)²`` (float32 scalar): ē3 is e3's mean over its (unmasked)
    tokens, ē2 e2's mean over the positions (the two live on different axes, so they
    are pooled first); the square is averaged over the hidden width and the batch."""
    e2, e3 = e2.float(), e3.float()
    if text_mask is None:
        m3 = e3.mean(1)
    else:
        keep = text_mask.to(e3.device).float().unsqueeze(-1)
        if bool((keep.sum(1) == 0).any()):
            raise InputError("text_mask", "masks every token of a row", "at least one "
                             "text token per row")
        m3 = (e3 * keep).sum(1) / keep.sum(1)
    return 0.5 * (m3 - e2.mean(1)).pow(2).mean()


def default_site(unet) -> str:
    """The block whose output MMSM replaces by default: the first up block whose output
    is at the resolution where the pack reads cross-attention (latent/4: 16x16 at 512 px
    on SD 1.x, ``up_blocks.0`` after its upsampler), so the fused features feed every
    cross-attention layer of the decoder at that resolution (docs/algorithms.md §15); on
    SDXL, whose lowest level that is, the middle block."""
    from .architecture import MID, architecture_of

    arch = architecture_of(unet)
    level = int(math.log2(CROSS_ATTENTION_FACTOR))
    for i in range(arch.levels):
        if arch.block_output_level(f"up_blocks.{i}") == level:
            return f"up_blocks.{i}"
    # SDXL: latent/4 is its lowest level, so no up block outputs there; the middle block
    # does, and its output is what the decoder's first cross-attention blocks at that
    # level (up_blocks.0, 10 deep) read: the same role as SD 1.x's up_blocks.0.
    if arch.block_output_level(MID) == level:
        return MID
    raise InputError("unet", f"({arch.name}) has no up block whose output is at latent/"
                     f"{CROSS_ATTENTION_FACTOR}", "a UNet with that level", "Name a site.")


def site_channels(unet, site: str) -> int:
    """Channels of the output of block ``site`` (diffusers' block_out_channels)."""
    from .architecture import architecture_of

    widths = list(unet.config.block_out_channels)
    kind, i = architecture_of(unet).block(site)
    if kind == "down_blocks":
        return int(widths[i])
    if kind == "up_blocks":
        return int(widths[::-1][i])
    return int(widths[-1])


class MMSMHook:
    """MMSM on a UNet block: a forward hook that replaces the block's output e1 by e6.
    Call :meth:`set_text` before the UNet's forward; :attr:`last` holds the last
    :class:`MMSMOut` (for :func:`mmsm_loss`); :meth:`remove` takes the hook off."""

    def __init__(self, unet, mmsm: MMSM, site: str):
        try:
            self.module = unet.get_submodule(site)
        except AttributeError as e:
            raise InputError("site", f"{site!r} is not a module of the UNet",
                             "a block name such as 'up_blocks.0'") from e
        self.mmsm, self.site = mmsm, site
        self.e0: torch.Tensor | None = None
        self.text_mask: torch.Tensor | None = None
        self.last: MMSMOut | None = None
        self._handle = self.module.register_forward_hook(self._hook)

    def set_text(self, e0: torch.Tensor, text_mask: torch.Tensor | None = None) -> None:
        if e0.ndim != 3:
            raise InputError("e0", f"has shape {tuple(e0.shape)}", "[B, L, text_dim]")
        self.e0, self.text_mask = e0, text_mask

    def _hook(self, module, args, output):
        e1 = output[0] if isinstance(output, tuple) else output
        if self.e0 is None:
            raise InputError("MMSM", "has no text embedding for this forward",
                             "set_text(e0) before the UNet runs")
        e0, mask, b = self.e0, self.text_mask, e1.shape[0]
        if e0.shape[0] != b:
            if b % e0.shape[0]:
                raise InputError("e0", f"has a batch of {e0.shape[0]}, the UNet's is {b}",
                                 "one embedding, or one per row (or a divisor of the batch)")
            e0 = e0.repeat(b // e0.shape[0], 1, 1)   # e.g. the guidance's doubled batch
            mask = None if mask is None else mask.repeat(b // mask.shape[0], 1)
        p = self.mmsm.domain_decoder[-1].weight
        if p.device != e1.device:              # the host may have moved the UNet
            from .grad_mode import normal_tensors

            with normal_tensors():
                self.mmsm.to(e1.device)
        self.last = self.mmsm(e0, e1, mask)
        e6 = self.last.e6
        return (e6, *output[1:]) if isinstance(output, tuple) else e6

    def remove(self) -> None:
        self._handle.remove()


def attach_mmsm(unet, mmsm: MMSM, site: str | None = None) -> MMSMHook:
    """Hook ``mmsm`` on the UNet block ``site`` (default: the ``site`` it was saved with,
    else :func:`default_site`), in place; the hook's :meth:`MMSMHook.remove` undoes it."""
    site = site or mmsm.site or default_site(unet)
    hook = MMSMHook(unet, mmsm, site)
    mmsm.site = site
    return hook


# --- on disk -------------------------------------------------------------------------------

def save_mmig(path: Path | str, adapters: MMAdapters | None = None, mmsm: MMSM | None = None,
              meta: dict | None = None) -> Path:
    """Write the modules to one safetensors file (float32); the metadata records each
    module's constructor arguments (and MMSM's site), so :func:`load_mmig` rebuilds them."""
    from safetensors.torch import save_file

    if adapters is None and mmsm is None:
        raise InputError("save_mmig", "got no module", "adapters and/or mmsm")
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    info: dict[str, str] = {"kind": KIND, "format": FORMAT,
                            "meta": json.dumps(meta or {})}
    for prefix, module, key in ((ADAPTER_PREFIX, adapters, "mm_adapter"),
                                (MMSM_PREFIX, mmsm, "mmsm")):
        if module is None:
            continue
        tensors.update({prefix + k: v.detach().float().cpu().contiguous()
                        for k, v in module.state_dict().items()})
        config = dict(module.config)
        if module is mmsm:
            config["site"] = mmsm.site
        info[key] = json.dumps(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Whole or not at all: a run stopped while saving leaves the previous file.
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=info))
    return path


def _build(path: Path, cls, key: str, raw: str, tensors: dict[str, torch.Tensor]):
    prefix = ADAPTER_PREFIX if cls is MMAdapters else MMSM_PREFIX
    try:
        config = json.loads(raw)
        if not isinstance(config, dict):
            raise TypeError("not a JSON object")
        site = config.pop("site", None) if cls is MMSM else None
        module = cls(**config)
    except (ValueError, TypeError) as e:
        raise ModelLoadError(WHAT, path, f"its {key} settings {raw!r} do not make a "
                             f"module ({e})", MAKE) from e
    sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    own = module.state_dict()
    missing = sorted(set(own) - set(sd))
    extra = sorted(set(sd) - set(own))
    bad = [f"{k} {tuple(sd[k].shape)} (expected {tuple(own[k].shape)})"
           for k in set(own) & set(sd) if sd[k].shape != own[k].shape]
    if missing or extra or bad:
        problems = [f"missing {', '.join(prefix + k for k in missing[:4])}" if missing else "",
                    f"unexpected {', '.join(prefix + k for k in extra[:4])}" if extra else "",
                    f"wrong shape {', '.join(bad[:4])}" if bad else ""]
        raise ModelLoadError(WHAT, path, f"its {key} weights do not fit its settings: "
                             + "; ".join(p for p in problems if p), MAKE)
    module.load_state_dict(sd)
    if cls is MMSM:
        module.site = site
    return module.eval()


def load_mmig(path: Path | str) -> dict[str, Any]:
    """``{"adapters": MMAdapters | None, "mmsm": MMSM | None, "meta": dict}`` from a
    file written by :func:`save_mmig` (safetensors holds tensors only, so nothing in it
    runs). Every problem raises :class:`ModelLoadError` naming the file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(WHAT, path, "the file does not exist", MAKE)
    try:
        with safe_open(str(path), framework="pt") as f:
            info = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ModelLoadError(WHAT, path, f"it is not a readable safetensors file "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
                             MAKE) from e
    if info.get("kind") != KIND:
        raise ModelLoadError(WHAT, path, f"its metadata kind is {info.get('kind')!r}, not "
                             f"{KIND!r} (not a file save_mmig wrote)", MAKE)
    if info.get("format") != FORMAT:
        raise ModelLoadError(WHAT, path, f"its format is {info.get('format')!r}; this "
                             f"version reads format {FORMAT}", "Save it again with this "
                             "version of xmgie.")
    out: dict[str, Any] = {"adapters": None, "mmsm": None}
    prefixes = []
    for key, cls, name, prefix in (("mm_adapter", MMAdapters, "adapters", ADAPTER_PREFIX),
                                   ("mmsm", MMSM, "mmsm", MMSM_PREFIX)):
        if key in info:
            out[name] = _build(path, cls, key, info[key], tensors)
            prefixes.append(prefix)
    stray = sorted(k for k in tensors if not k.startswith(tuple(prefixes)))
    if stray:
        raise ModelLoadError(WHAT, path, f"it holds tensors of no module its metadata "
                             f"describes: {', '.join(stray[:4])}", MAKE)
    if out["adapters"] is None and out["mmsm"] is None:
        raise ModelLoadError(WHAT, path, "it holds neither an MM-Adapter nor an MMSM", MAKE)
    try:
        out["meta"] = json.loads(info.get("meta") or "{}")
    except ValueError:
        out["meta"] = {}
    return out


# --- on a loaded model, leaving it untouched -----------------------------------------------

def _shallow(module: nn.Module) -> nn.Module:
    """A new module object sharing ``module``'s children, parameters and buffers, with
    its own registries and hook tables, so replacing a child of the copy or hooking it
    leaves the original as it was."""
    from .models.mgie.trained import _shallow as shallow_registries

    new = shallow_registries(module)
    for hooks in ("_forward_hooks", "_forward_hooks_with_kwargs",
                  "_forward_hooks_always_called", "_forward_pre_hooks",
                  "_forward_pre_hooks_with_kwargs"):
        if hasattr(module, hooks):
            setattr(new, hooks, type(getattr(module, hooks))(getattr(module, hooks)))
    return new


def clone_path(root: nn.Module, names: list[str]) -> nn.Module:
    """A shallow copy of ``root`` in which every module on the dotted paths ``names``
    (and their parents) is a shallow copy too: the weights are shared, but modules
    replaced or hooked in the copy along those paths do not touch ``root``."""
    new_root = _shallow(root)
    done: dict[str, nn.Module] = {"": new_root}
    for name in names:
        parent_name = ""
        for part in name.split("."):
            child_name = f"{parent_name}.{part}" if parent_name else part
            if child_name not in done:
                parent = done[parent_name]
                child = _shallow(parent._modules[part])
                parent._modules[part] = child
                done[child_name] = child
            parent_name = child_name
    return new_root


def llm_with_mm_adapters(llm, adapters: MMAdapters):
    """A new LLM object with ``adapters`` injected; ``llm`` itself is unchanged (its
    layers are shallow-copied, the weights shared; see :func:`clone_path`)."""
    layers = _decoder_layers(llm)
    body = "model." if getattr(llm, "model", None) is not None and hasattr(llm.model, "layers") \
        else ""
    names = [f"{body}layers.{i}" for i in range(len(layers))]
    new = clone_path(llm, names)
    inject_mm_adapters(new, adapters=adapters)
    new.requires_grad_(False)       # θ_a too: the result is for inference
    return new


def unet_with_mmsm(unet, mmsm: MMSM, e0: torch.Tensor, text_mask: torch.Tensor | None = None,
                   site: str | None = None) -> tuple[nn.Module, MMSMHook]:
    """A new UNet object with ``mmsm`` hooked on ``site`` and its text set to ``e0``;
    ``unet`` is unchanged (the block's path is shallow-copied, the weights shared)."""
    site = site or mmsm.site or default_site(unet)
    new = clone_path(unet, [site])
    hook = attach_mmsm(new, mmsm, site)
    hook.set_text(e0, text_mask)
    return new, hook


def mgie_with_mm_adapters(mgie, adapters: MMAdapters, label: str = "MM-Adapter"):
    """A new MGIE model (``MGIEModel``) whose LLM has a copy of ``adapters`` injected
    (float32, on MGIE's device, frozen); ``mgie`` and ``adapters`` are unchanged. The
    adapted LLM is :func:`llm_with_mm_adapters`'s: its decoder layers are new module
    objects, every weight is shared, and the model is registered with the memory
    registry as a loader registers one (the shared parts keep their entries)."""
    from . import grad_mode, memory

    with grad_mode.loading():
        adapters = copy.deepcopy(adapters).to(mgie.device)
        adapters.default_has_image = True     # MGIE's prompt always holds the image
        llm = llm_with_mm_adapters(mgie.llm, adapters)
    new = dataclasses.replace(mgie, llm=llm)
    names = {e.module: e.name for e in memory.registry().entries_of(mgie)}
    return memory.manage(new, {
        f"MGIE {label} LLM": llm, names.get(mgie.vision, "MGIE vision tower"): mgie.vision,
        names.get(mgie.projector, "MGIE projector"): mgie.projector,
        names.get(mgie.edit_head, "MGIE edit head"): mgie.edit_head}, mgie.device)


def sd_with_mmsm(sd, mmsm: MMSM, e0: torch.Tensor, text_mask: torch.Tensor | None = None,
                 label: str = "MMSM", what: str = "e0"):
    """A new SD model (``SDModel``) whose UNet runs a copy of ``mmsm`` (float32, frozen)
    on the block it was trained at (its ``site``, else :func:`default_site`), with the
    text embedding ``e0`` [B, L, text_dim] for every forward; ``sd`` and ``mmsm`` are
    unchanged (:func:`unet_with_mmsm`: the UNet's path to the block is shallow-copied,
    the weights shared). ``what`` names ``e0`` in errors (a node's input)."""
    from . import grad_mode
    from .models.sd import with_unet

    unet = sd.unet
    site = mmsm.site or default_site(unet)
    try:
        channels = site_channels(unet, site)
    except ValueError as e:
        raise InputError("mmig", f"its MMSM was made for the UNet block {site!r}, which "
                         "this UNet does not have", "an MMSM made for this UNet") from e
    want = mmsm.config
    if channels != want["feature_channels"]:
        raise InputError("mmig", f"its MMSM reads {want['feature_channels']} channels at "
                         f"{site}, where this UNet has {channels}",
                         "an MMSM trained with this SD model", "Use the base model the "
                         "MMSM was trained on.")
    if e0.ndim != 3 or e0.shape[-1] != want["text_dim"]:
        raise InputError(what, f"has shape {tuple(e0.shape)}", f"[B, L, "
                         f"{want['text_dim']}] (the MMSM's text width)", "Connect the "
                         "conditioning of the model the MMSM was trained with.")
    device = next(unet.parameters()).device
    with grad_mode.loading():
        mmsm = copy.deepcopy(mmsm).to(device).requires_grad_(False).eval()
        e0 = e0.detach().to(device).clone()
        new_unet, _ = unet_with_mmsm(unet, mmsm, e0, text_mask, site)
    return with_unet(sd, new_unet, label)


__all__ = ["RepAdapterRouter", "MMAdapters", "inject_mm_adapters", "remove_mm_adapters",
           "adapter_parameter_count", "MMSM", "MMSMOut", "mmsm_loss", "attach_mmsm",
           "MMSMHook", "default_site", "site_channels", "save_mmig", "load_mmig",
           "clone_path", "llm_with_mm_adapters", "unet_with_mmsm",
           "mgie_with_mm_adapters", "sd_with_mmsm"]
