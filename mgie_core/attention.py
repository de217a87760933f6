"""One attention-control mechanism for every stage, built on diffusers attention processors.

Every attention layer of the UNet gets a :class:`ControlledAttnProcessor`. With no hook
asking for anything it runs exactly the computation of diffusers' ``AttnProcessor2_0``
(PyTorch SDPA). Hooks change a layer only where they need to:

* ``logit_bias``: an additive bias on the logits (CAM in logits mode), still SDPA;
* ``qk_source``: take queries/keys of one batch row from another (self-attention
  injection: softmax(Q_rec K_rec^T) V_edit is SDPA on swapped Q, K, and exact);
* ``needs_probs`` / ``edit_probs`` / ``observe``: explicit softmax probabilities, only in
  layers where a hook must read or rewrite them (capture, cross-attention injection,
  CAM on probabilities). Cross-attention maps are (HW x 77) and cheap; self-attention
  maps are never materialised by the built-in hooks.

A UNet call is described by an :class:`AttnContext`: the step, and the layout of the batch
(which row is which branch and which guidance half), so hooks address rows by meaning.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

from . import grad_mode, host

class _Name(str, enum.Enum):
    """A name that is also its plain string ("rec" == Branch.REC), so layouts, dict keys
    and logs read the same either way."""

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__


class Branch(_Name):
    """What a batch row denoises."""

    REC = "rec"     # reconstruction: the source prompt from the inverted latent
    EDIT = "edit"   # the edit: the target prompt (or the instruction)
    REF = "ref"     # instruction path: the source latent noised, PFB's reference


class Half(_Name):
    """Which guidance term a batch row computes."""

    COND = "cond"       # the prompt (or instruction) condition
    UNCOND = "uncond"   # the null condition
    IMG = "img"         # instruction path: null text, image-conditioned


COND, UNCOND = Half.COND, Half.UNCOND


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """Meaning of each batch row of one UNet call: (:class:`Branch`, :class:`Half`)."""

    rows: tuple[tuple[str, str], ...]

    def index(self, branch: str, half: str) -> Optional[int]:
        try:
            return self.rows.index((branch, half))
        except ValueError:
            return None

    def indices(self, half: Optional[str] = None, branch: Optional[str] = None) -> list[int]:
        return [i for i, (b, h) in enumerate(self.rows)
                if (half is None or h == half) and (branch is None or b == branch)]

    def __len__(self) -> int:
        return len(self.rows)


@dataclasses.dataclass
class AttnContext:
    step: int                    # denoising step index, 0 = noisiest
    num_steps: int
    layout: BatchLayout
    latent_hw: tuple[int, int]   # latent height, width of this call


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    name: str          # e.g. "down_blocks.2.attentions.0.transformer_blocks.0.attn2"
    is_cross: bool

    @property
    def block(self) -> str:
        """'down_blocks.2', 'mid_block', 'up_blocks.1' ..."""
        parts = self.name.split(".")
        return parts[0] if parts[0] == "mid_block" else ".".join(parts[:2])

    def in_set(self, prefixes: Iterable[str]) -> bool:
        return any(self.name == p or self.name.startswith(p + ".") for p in prefixes)


def layer_hw(ctx: AttnContext, tokens: int) -> tuple[int, int]:
    """Spatial size of a layer from its token count and the call's latent size."""
    h, w = ctx.latent_hw
    f = math.sqrt(h * w / tokens)
    return int(round(h / f)), int(round(w / f))


class AttnHook:
    """Base class: override what you need. Every method gets the layer and context.

    ``PROBS_ORDER`` orders the hooks' ``edit_probs`` calls (lower first; equal values keep
    the installation order): constraints that must hold whatever other hooks write, such
    as CAM's masking, come last."""

    PROBS_ORDER = 0

    def needs_probs(self, layer: LayerInfo, ctx: AttnContext) -> bool:
        return False

    def qk_override(self, layer: LayerInfo, ctx: AttnContext, query: torch.Tensor,
                    key: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """Return new (query, key) for the whole batch, or None (cached injection)."""
        return None

    def logit_bias(self, layer: LayerInfo, ctx: AttnContext, n_query: int, n_key: int,
                   device, dtype) -> Optional[torch.Tensor]:
        """Additive bias broadcastable to (batch, heads, n_query, n_key), or None."""
        return None

    def qk_source(self, layer: LayerInfo, ctx: AttnContext, n_query: int
                  ) -> Optional[dict[int, int]]:
        """{target row: source row}: the target row uses the source row's Q and K."""
        return None

    def edit_probs(self, layer: LayerInfo, ctx: AttnContext, probs: torch.Tensor) -> torch.Tensor:
        """Rewrite probabilities (batch, heads, n_query, n_key); return the new tensor."""
        return probs

    def observe(self, layer: LayerInfo, ctx: AttnContext, probs: torch.Tensor) -> None:
        """Read the final probabilities of a layer (capture)."""

    def prepare(self, device, latent_hw: tuple[int, int]) -> None:
        """Called by the samplers before the first step: put what the hook reads in every
        call (token positions, masks at each layer size) on ``device`` now, so no step
        copies host data to the device (each such copy waits for the GPU)."""


class AttentionController:
    """Owns the hooks and the context of the current UNet call."""

    def __init__(self):
        self.hooks: list[AttnHook] = []
        self.context: Optional[AttnContext] = None
        self.explicit_layers: set[str] = set()   # names computed explicitly this call

    def reset_call(self, ctx: Optional[AttnContext]) -> None:
        self.context = ctx
        self.explicit_layers.clear()


class ControlledAttnProcessor:
    """Diffusers attention processor that consults the controller's hooks."""

    def __init__(self, controller: AttentionController, layer: LayerInfo):
        self.controller = controller
        self.layer = layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        ctl, layer = self.controller, self.layer
        ctx = ctl.context
        hooks = ctl.hooks if ctx is not None else []

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, _, _ = hidden_states.shape
        seq_k = hidden_states.shape[1] if encoder_hidden_states is None \
            else encoder_hidden_states.shape[1]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_k, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        n_q, n_k = query.shape[2], key.shape[2]
        # Row substitutions of Q and K (self-attention injection).
        for hook in hooks:
            mapping = hook.qk_source(layer, ctx, query.shape[2])
            if mapping:
                query, key = query.clone(), key.clone()
                for dst, src in mapping.items():
                    query[dst] = query[src]
                    key[dst] = key[src]
        for hook in hooks:
            replaced = hook.qk_override(layer, ctx, query, key)
            if replaced is not None:
                query, key = replaced
        bias = attention_mask
        for hook in hooks:
            extra = hook.logit_bias(layer, ctx, n_q, n_k, query.device, query.dtype)
            if extra is not None:
                bias = extra if bias is None else bias + extra

        if any(hook.needs_probs(layer, ctx) for hook in hooks):
            ctl.explicit_layers.add(layer.name)
            logits = (query @ key.transpose(-1, -2)) * attn.scale
            if bias is not None:
                logits = logits + bias
            probs = logits.softmax(dim=-1)
            for hook in sorted(hooks, key=lambda h: h.PROBS_ORDER):
                probs = hook.edit_probs(layer, ctx, probs)
            for hook in hooks:
                hook.observe(layer, ctx, probs)
            out = probs.to(value.dtype) @ value
        else:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias,
                                                 dropout_p=0.0, is_causal=False)

        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def attention_layers(unet) -> list[LayerInfo]:
    return [LayerInfo(name[: -len(".processor")], name.endswith("attn2.processor"))
            for name in unet.attn_processors]


def install(unet) -> AttentionController:
    """Put controlled processors on every attention layer (idempotent per UNet)."""
    existing = getattr(unet, "_xmgie_controller", None)
    if existing is not None:
        return existing
    controller = AttentionController()
    unet.set_attn_processor({f"{l.name}.processor": ControlledAttnProcessor(controller, l)
                             for l in attention_layers(unet)})
    unet._xmgie_controller = controller
    return controller


def uninstall(unet) -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    if getattr(unet, "_xmgie_controller", None) is not None:
        unet.set_attn_processor(AttnProcessor2_0())
        del unet._xmgie_controller


# --- masks at layer resolution ------------------------------------------------------

def level_sizes(latent_hw: tuple[int, int], levels: int = 4) -> list[tuple[int, int]]:
    """The feature sizes of a UNet's levels for a latent of ``latent_hw``: each
    downsampler (a stride-2 3x3 convolution with padding 1) halves a side rounding up."""
    h, w = int(latent_hw[0]), int(latent_hw[1])
    out = []
    for _ in range(levels):
        out.append((h, w))
        h, w = (h + 1) // 2, (w + 1) // 2
    return out


class MaskPyramid:
    """A mask resized to each layer resolution (bicubic, then threshold 0.5:
    ALGORITHMS.md section 4), cached."""

    def __init__(self, mask: torch.Tensor):
        # mask: [H,W] or [B,H,W] float in 0..1 at image or latent resolution
        self.mask = mask if mask.ndim == 3 else mask[None]
        self._cache: dict[tuple[int, int, str], torch.Tensor] = {}

    def prepare(self, sizes, device, binary: bool = True) -> None:
        """Resize to every size in ``sizes`` and move to ``device`` now (before a loop)."""
        for hw in sizes:
            self.at(tuple(hw), device, binary)

    def at(self, hw: tuple[int, int], device, binary: bool = True) -> torch.Tensor:
        key = (hw[0], hw[1], host.device_key(device), binary)
        if key not in self._cache:
            with grad_mode.normal_tensors():     # MAG's backward may save it
                m = F.interpolate(self.mask[:, None].float(), size=hw, mode="bicubic",
                                  align_corners=False)[:, 0]
                m = (m > 0.5).float() if binary else m.clamp(0, 1)
                self._cache[key] = host.place(m, device)
        return self._cache[key]


# --- built-in hooks -----------------------------------------------------------------

class CaptureHook(AttnHook):
    """Keep cross-attention probabilities of chosen layers and rows for the current call.

    ``maps[layer_name]`` is (len(rows), heads, HW, 77). Gradients flow through when the
    UNet call is under autograd (MAG needs that)."""

    def __init__(self, layers: Sequence[str], rows: Optional[Sequence[tuple[str, str]]] = None,
                 cross: bool = True, steps: Optional[Iterable[int]] = None):
        self.layers = tuple(layers)
        self.rows = tuple(rows) if rows else None
        self.cross = cross
        self.steps = set(steps) if steps is not None else None
        self.maps: dict[str, torch.Tensor] = {}

    def _applies(self, layer, ctx) -> bool:
        return (layer.is_cross == self.cross and layer.in_set(self.layers)
                and (self.steps is None or ctx.step in self.steps))

    def needs_probs(self, layer, ctx):
        return self._applies(layer, ctx)

    def observe(self, layer, ctx, probs):
        if not self._applies(layer, ctx):
            return
        if self.rows is None:
            self.maps[layer.name] = probs
        else:
            idx = [i for i in (ctx.layout.index(*r) for r in self.rows) if i is not None]
            self.maps[layer.name] = _rows_of(probs, idx)


def _rows_of(x: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
    """x[rows] for a list of batch rows, by slicing (indexing with a Python list makes a
    host index tensor, copied to the device in every call)."""
    rows = list(rows)
    if rows and rows == list(range(rows[0], rows[0] + len(rows))):
        return x[rows[0]:rows[0] + len(rows)]
    return torch.cat([x[r:r + 1] for r in rows]) if rows else x[:0]


def _token_index(tokens, device) -> torch.Tensor:
    if isinstance(tokens, torch.Tensor):
        return host.place(tokens, device, torch.long)
    return torch.tensor(list(tokens), dtype=torch.long, device=device)


def cam_logit_bias(mask_hw: torch.Tensor, in_tokens, out_tokens, n_key: int,
                   dtype) -> torch.Tensor:
    """(B_mask, 1, HW, n_key) additive bias: IN tokens only inside the mask, OUT tokens
    only outside (PFB-Diff's CAM on the logits). Token positions: lists, or index
    tensors already on the mask's device (then no host data is used)."""
    m = mask_hw.flatten(1)[:, None, :, None]              # (B,1,HW,1)
    neg = torch.finfo(dtype).min
    bias = torch.zeros(m.shape[0], 1, m.shape[2], n_key, dtype=dtype, device=m.device)
    for tokens, inside, outside in ((in_tokens, 0.0, neg), (out_tokens, neg, 0.0)):
        if len(tokens):
            idx = _token_index(tokens, m.device)
            col = torch.where(m > 0.5, inside, outside).to(dtype)
            bias.index_copy_(-1, idx, col.expand(-1, -1, -1, idx.shape[0]))
    return bias


class CAMHook(AttnHook):
    """Cross-attention masking (ALGORITHMS.md section 4) on the conditional rows.

    ``mode="logits"`` (PFB-Diff's code): the IN/OUT tokens' logits are pushed to -inf
    before the softmax, so each row renormalises over the tokens left. ``mode="probs"``
    (the paper's A * M): the probabilities are multiplied by the mask, not renormalised.

    CAM holds whatever other hooks write into the maps. Where a layer's probabilities are
    explicit (prompt-to-prompt injection, capture), CAM also edits them after every other
    hook (``PROBS_ORDER``): in logits mode the masked entries are zeroed and the row
    renormalised, which is what -inf logits do to a softmax, so a map that injection
    copied from the reconstruction branch is masked too. Without that, injection would
    overwrite the masked maps of any CAM word that also occurs in the source prompt
    during the cross-replace window (an OUT word kept probability 0.019 inside the mask at
    step 0 on the tiny model)."""

    DEFAULT_LAYERS = ("down_blocks.2", "mid_block", "up_blocks.1",
                      "up_blocks.2.attentions.0", "up_blocks.2.attentions.1")
    PROBS_ORDER = 100   # after injection and any other rewrite of the maps

    def __init__(self, mask: torch.Tensor, in_tokens: Sequence[int], out_tokens: Sequence[int] = (),
                 layers: Sequence[str] = DEFAULT_LAYERS, mode: str = "logits",
                 branches: Sequence[str] = ("edit",), steps: Optional[Iterable[int]] = None):
        if mode not in ("logits", "probs"):
            raise ValueError(f"CAM mode must be 'logits' or 'probs', not {mode!r}")
        self.pyramid = mask if isinstance(mask, MaskPyramid) else MaskPyramid(mask)
        self.in_tokens, self.out_tokens = list(in_tokens), list(out_tokens)
        self.layers, self.mode = tuple(layers), mode
        self.branches = tuple(branches)
        self.steps = set(steps) if steps is not None else None

    def _rows(self, layer, ctx) -> list[int]:
        if not layer.is_cross or not layer.in_set(self.layers):
            return []
        if self.steps is not None and ctx.step not in self.steps:
            return []
        return [i for i, (b, h) in enumerate(ctx.layout.rows) if h == COND and b in self.branches]

    def prepare(self, device, latent_hw):
        self._tokens(device)
        self.pyramid.prepare(level_sizes(latent_hw), device)

    def _tokens(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        idx = getattr(self, "_idx", None)
        if idx is None or not host.same_device(idx["in"].device, device):
            with grad_mode.normal_tensors():
                self._idx = idx = {"in": _token_index(self.in_tokens, device),
                                   "out": _token_index(self.out_tokens, device)}
        return idx["in"], idx["out"]

    def _cached(self, key, make):
        """One tensor per key for the hook's life, made outside inference mode (MAG's
        and A-STAR's backward passes save it)."""
        cache = self.__dict__.setdefault("_cache", {})
        if key not in cache:
            with grad_mode.normal_tensors():
                cache[key] = make()
        return cache[key]

    def logit_bias(self, layer, ctx, n_query, n_key, device, dtype):
        """The bias of this call, made once per (size, layout, dtype) and reused: it
        depends on nothing that changes between steps."""
        rows = self._rows(layer, ctx)
        if self.mode != "logits" or not rows:
            return None
        hw = layer_hw(ctx, n_query)

        def make():
            m = self.pyramid.at(hw, device)
            cam = cam_logit_bias(m, *self._tokens(device), n_key, dtype)
            bias = torch.zeros(len(ctx.layout), 1, n_query, n_key, dtype=dtype, device=device)
            for k, r in enumerate(rows):
                bias[r] = cam[0] if cam.shape[0] == 1 else cam[k]
            return bias

        return self._cached(("bias", hw, n_key, str(dtype), host.device_key(device),
                             tuple(rows), len(ctx.layout)), make)

    def needs_probs(self, layer, ctx):
        return self.mode == "probs" and bool(self._rows(layer, ctx))

    def edit_probs(self, layer, ctx, probs):
        rows = self._rows(layer, ctx)
        if not rows:
            return probs
        hw = layer_hw(ctx, probs.shape[2])
        n_key, dev, dtype = probs.shape[-1], probs.device, probs.dtype

        def make():
            m = self.pyramid.at(hw, dev).flatten(1)[:, None, :, None].to(dtype)  # (B,1,HW,1)
            keep = torch.ones(m.shape[0], 1, m.shape[2], n_key, dtype=dtype, device=dev)
            for idx, col in zip(self._tokens(dev), (m, 1 - m)):
                if idx.numel():
                    keep.index_copy_(-1, idx, col.expand(-1, -1, -1, idx.shape[0]))
            return keep

        keep = self._cached(("keep", hw, n_key, str(dtype), str(dev)), make)
        sub = _rows_of(probs, rows) * keep
        if self.mode == "logits":
            # -inf logits: the row renormalises over the tokens left
            sub = sub / sub.sum(-1, keepdim=True).clamp_min(torch.finfo(sub.dtype).tiny)
        probs = probs.clone()
        for k, r in enumerate(rows):
            probs[r] = sub[k]
        return probs


class ConditionCAMHook(AttnHook):
    """CAM for a condition without word positions (MGIE's visual tokens through its edit
    head): the whole condition may act only inside the mask, the null condition outside.

    The sampler gives the conditional rows the keys [cond; null] (2n tokens) and every
    other row [null; null]. Softmax over a key set written twice is softmax over it once
    (each probability halves, each value counts twice), so the other rows compute exactly
    what they would with [null]. On the conditional rows this hook adds logit biases: in
    the CAM ``layers``, edit-branch pixels inside the mask see only the condition and
    pixels outside only the null condition (CAM's -inf logits, with the condition as the
    IN group and its null copy as the OUT group); everywhere else (other cross-attention
    layers, the reference branch) the null copy is masked out, which leaves the
    attention of the plain condition. Word CAM (:class:`CAMHook`) cannot do this:
    masking every token of a row outside the mask leaves nothing to attend to."""

    def __init__(self, mask: torch.Tensor, n_tokens: int,
                 layers: Sequence[str] = CAMHook.DEFAULT_LAYERS,
                 branches: Sequence[str] = ("edit",)):
        self.pyramid = mask if isinstance(mask, MaskPyramid) else MaskPyramid(mask)
        self.n = int(n_tokens)
        self.layers, self.branches = tuple(layers), tuple(branches)

    def logit_bias(self, layer, ctx, n_query, n_key, device, dtype):
        if not layer.is_cross:
            return None
        rows = ctx.layout.indices(half=COND)
        if not rows:
            return None
        if n_key != 2 * self.n:
            raise ValueError(f"condition CAM expects {2 * self.n} keys ([cond; null]) in "
                             f"{layer.name}, got {n_key}")
        n, neg = self.n, torch.finfo(dtype).min
        bias = torch.zeros(len(ctx.layout), 1, n_query, n_key, dtype=dtype, device=device)
        bias[rows, ..., n:] = neg
        edit = [i for i in rows if ctx.layout.rows[i][0] in self.branches]
        if edit and layer.in_set(self.layers):
            m = self.pyramid.at(layer_hw(ctx, n_query), device)
            cam = cam_logit_bias(m, range(n), range(n, 2 * n), n_key, dtype)
            bias[edit] = cam.expand(len(edit), -1, -1, -1) if cam.shape[0] == 1 else cam
        return bias


def replace_mapper(tokenizer, source_prompt: str, target_prompt: str) -> torch.Tensor:
    """Prompt-to-prompt "replace" for word swaps: an (L, L) matrix M (L = 77) with
    target map k = sum_s M[s, k] * source map s (P2P's ``get_replacement_mapper``).

    The prompts must have the same number of words (split on whitespace). Equal words map
    token for token; a swapped word's tokens map onto the new word's tokens, one to one
    when their token counts are equal, otherwise every source token of the word to every
    target token with weight 1 / (target token count), as P2P does.

    Past the last word (end-of-text and padding) the alignment keeps the offset the swaps
    built up: target position k takes source position k - (length difference), clamped to
    the window. P2P instead maps position k to k after its last swapped word, which, when
    a swap changes the token count, pairs the words after it with shifted source positions
    and can map the source's padding onto target words; we shift deliberately. With equal
    token counts both rules are the same matrix."""
    from .errors import InputError

    max_len = int(getattr(tokenizer, "model_max_length", 77) or 77)
    if max_len > 10_000:
        max_len = 77
    ws, wt = source_prompt.split(), target_prompt.split()
    if len(ws) != len(wt):
        raise InputError("target_prompt", f"has {len(wt)} words and the source prompt "
                         f"{len(ws)}", "a word swap of the source prompt (the same number of "
                         "words) for prompt-to-prompt replace",
                         "Use p2p_mode 'refine' to add or remove words.")
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    per_s, per_t = [ids(w) for w in ws], [ids(w) for w in wt]
    for prompt, per in ((source_prompt, per_s), (target_prompt, per_t)):
        if [i for p in per for i in p] != ids(" ".join(prompt.split())):
            raise InputError("target_prompt", "tokenizes differently word by word than as "
                             "a whole", "a tokenizer that splits at spaces (CLIP)",
                             "Use p2p_mode 'refine'.")
    M = torch.zeros(max_len, max_len)
    M[0, 0] = 1.0                                              # start of text
    i = j = 1
    for a, b in zip(per_s, per_t):
        if len(a) == len(b):
            for q in range(len(a)):
                if i + q < max_len and j + q < max_len:
                    M[i + q, j + q] = 1.0
        else:
            rows = [r for r in range(i, i + len(a)) if r < max_len]
            cols = [c for c in range(j, j + len(b)) if c < max_len]
            if rows and cols:
                M[torch.tensor(rows)[:, None], torch.tensor(cols)[None, :]] = 1.0 / len(b)
        i, j = i + len(a), j + len(b)
    for k in range(min(j, max_len), max_len):                  # end of text and padding
        M[min(max(k - (j - i), 0), max_len - 1), k] = 1.0
    return M


def token_alignment(source_ids: Sequence[int], target_ids: Sequence[int]) -> torch.Tensor:
    """For each target token position, the aligned source position, or -1 for a new token
    (prompt-to-prompt refine's alignment of the two token sequences).

    The alignment runs over the padded sequences, so past the prompt the end-of-text and
    padding tokens align with the source's shifted by the length difference."""
    import difflib

    mapper = torch.full((len(target_ids),), -1, dtype=torch.long)
    sm = difflib.SequenceMatcher(a=list(source_ids), b=list(target_ids), autojunk=False)
    for block in sm.get_matching_blocks():
        for k in range(block.size):
            mapper[block.b + k] = block.a + k
    return mapper


class InjectionHook(AttnHook):
    """Prompt-to-prompt injection (ALGORITHMS.md section 3) on the conditional rows.

    Cross-attention, steps < cross_steps, every layer: with a 1-D ``mapper`` ("refine",
    from :func:`token_alignment`) the edit row's maps of tokens aligned with the source
    take the reconstruction row's maps and new tokens keep their own; with a 2-D mapper
    ("replace", from :func:`replace_mapper`) the edit row's maps are all the source maps
    mixed by the matrix. Self-attention, steps < self_steps, layers at ``self_max_res``
    and below: the edit row attends with the reconstruction row's queries and keys (its
    maps, exactly), in both modes."""

    def __init__(self, mapper: torch.Tensor, cross_steps: int, self_steps: int,
                 self_max_res: int = 32, source: str = "rec", target: str = "edit",
                 base_latent_res: int = 64):
        if mapper.ndim not in (1, 2):
            raise ValueError("mapper must be a token alignment (1-D) or a replace matrix (2-D)")
        self.mapper = mapper
        self.mode = "replace" if mapper.ndim == 2 else "refine"
        self.cross_steps, self.self_steps = cross_steps, self_steps
        self.self_max_res = self_max_res
        self.source, self.target = source, target
        self.base_latent_res = base_latent_res
        # Host copy for host-side questions (which target tokens are aligned), so no
        # caller reads the mapper tensor element by element.
        self.aligned: Optional[list[int]] = mapper.tolist() if mapper.ndim == 1 else None
        self._on: dict = {}

    def prepare(self, device, latent_hw):
        self._device_mapper(torch.device(device), torch.float32)

    def _device_mapper(self, device, dtype):
        """The mapper on ``device`` (made once: a host tensor would be copied to the
        device in every layer of every step)."""
        key = ((host.device_key(device), str(dtype)) if self.mode == "replace"
               else (host.device_key(device),))
        got = self._on.get(key)
        if got is None:
            with grad_mode.normal_tensors():    # the edit rows' backward saves it
                if self.mode == "replace":
                    got = self.mapper.to(device, dtype)
                else:
                    m = self.mapper.to(device)
                    got = (m < 0, m.clamp(min=0))
            self._on[key] = got
        return got

    def inject_cross(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        """The edit row's cross-attention probabilities (..., HW, L) after injection from
        the source row's ``src``; ``tgt`` are its own (kept for new tokens in refine)."""
        if self.mode == "replace":
            return src @ self._device_mapper(src.device, src.dtype)
        new, index = self._device_mapper(src.device, None)
        return torch.where(new, tgt, src.index_select(-1, index))

    def _pair(self, ctx):
        s, t = ctx.layout.index(self.source, COND), ctx.layout.index(self.target, COND)
        return (s, t) if s is not None and t is not None else None

    def qk_source(self, layer, ctx, n_query):
        pair = self._pair(ctx)
        if pair is None or layer.is_cross or ctx.step >= self.self_steps:
            return None
        # "32x32 and below" at 512 px, i.e. layers downsampled at least 2x from the
        # latent: compare the downsampling factor so the rule holds at any image size.
        h, _ = layer_hw(ctx, n_query)
        factor = ctx.latent_hw[0] / h
        return {pair[1]: pair[0]} if self.base_latent_res / factor <= self.self_max_res else None

    def needs_probs(self, layer, ctx):
        return layer.is_cross and ctx.step < self.cross_steps and self._pair(ctx) is not None

    def edit_probs(self, layer, ctx, probs):
        if not self.needs_probs(layer, ctx):
            return probs
        s, t = self._pair(ctx)
        new_t = self.inject_cross(probs[s], probs[t])
        probs = probs.clone()
        probs[t] = new_t
        return probs
