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

This module is the mechanism (the processor, the hook protocol, installing it, masks at
layer resolution); the pack's own hooks (capture, CAM, prompt-to-prompt injection) are in
:mod:`.attention_hooks`.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from . import grad_mode, host
from .architecture import SD1, UNetArchitecture


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

    def index(self, branch: str, half: str) -> int | None:
        try:
            return self.rows.index((branch, half))
        except ValueError:
            return None

    def indices(self, half: str | None = None, branch: str | None = None) -> list[int]:
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


class AttnHook:
    """Base class: override what you need. Every method gets the layer and context.

    ``PROBS_ORDER`` orders the hooks' ``edit_probs`` calls (lower first; equal values keep
    the installation order): constraints that must hold whatever other hooks write, such
    as CAM's masking, come last."""

    PROBS_ORDER = 0

    def needs_probs(self, layer: LayerInfo, ctx: AttnContext) -> bool:
        return False

    def qk_override(self, layer: LayerInfo, ctx: AttnContext, query: torch.Tensor,
                    key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Return new (query, key) for the whole batch, or None (cached injection)."""
        return None

    def logit_bias(self, layer: LayerInfo, ctx: AttnContext, n_query: int, n_key: int,
                   device, dtype) -> torch.Tensor | None:
        """Additive bias broadcastable to (batch, heads, n_query, n_key), or None."""
        return None

    def qk_source(self, layer: LayerInfo, ctx: AttnContext, n_query: int
                  ) -> dict[int, int] | None:
        """{target row: source row}: the target row uses the source row's Q and K."""
        return None

    def edit_probs(self, layer: LayerInfo, ctx: AttnContext, probs: torch.Tensor) -> torch.Tensor:
        """Rewrite probabilities (batch, heads, n_query, n_key); return the new tensor."""
        return probs

    def observe(self, layer: LayerInfo, ctx: AttnContext, probs: torch.Tensor) -> None:
        """Read the final probabilities of a layer (capture)."""

    def after_layer(self, layer: LayerInfo, ctx: AttnContext) -> None:
        """Called when the layer's output is computed (truncation stops the forward here,
        see :class:`.attention_hooks.StopAfter`)."""

    def prepare(self, device, latent_hw: tuple[int, int],
                architecture: UNetArchitecture = SD1) -> None:
        """Called by the samplers before the first step: put what the hook reads in every
        call (token positions, masks at each layer size of the UNet's ``architecture``) on
        ``device`` now, so no step copies host data to the device (each such copy waits
        for the GPU)."""


class AttentionController:
    """Everything the pack puts on a UNet: the attention hooks and the context of the
    current call, and the forward patches of modules that are not attention layers (PFB's
    blend sites). One lifecycle for both: a run sets them up, and :meth:`clear` (the
    sampler, when the run ends, whatever happened) removes them all."""

    def __init__(self):
        self.hooks: list[AttnHook] = []
        self.context: AttnContext | None = None
        self.explicit_layers: set[str] = set()   # names computed explicitly this call
        self._patches: list = []                 # torch hook handles of patch_module

    def reset_call(self, ctx: AttnContext | None) -> None:
        self.context = ctx
        self.explicit_layers.clear()

    def patch_module(self, module: torch.nn.Module, *, pre=None, post=None) -> None:
        """Patch a UNet module's forward for the rest of the run: ``pre(module, args,
        kwargs)`` runs before it (returning ``(args, kwargs)`` or None), ``post(module,
        args, output)`` after it (returning a new output or None)."""
        if pre is not None:
            self._patches.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        if post is not None:
            self._patches.append(module.register_forward_hook(post))

    @property
    def patches(self) -> int:
        """How many module patches are in place."""
        return len(self._patches)

    def clear(self) -> None:
        """The end of a run: no hooks, no call context, no module patches."""
        self.hooks = []
        self.reset_call(None)
        for handle in self._patches:
            handle.remove()
        self._patches.clear()


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
            # SD 2.x's UNet asks for float32 attention scores (``upcast_attention``: its
            # half-precision logits overflow), as diffusers' explicit processor does; the
            # hooks then read and write float32 maps.
            q, k = (query.float(), key.float()) if getattr(attn, "upcast_attention", False) \
                else (query, key)
            logits = (q @ k.transpose(-1, -2)) * attn.scale
            if bias is not None:
                logits = logits + bias.to(logits.dtype)
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
        out = out / attn.rescale_output_factor
        for hook in hooks:
            hook.after_layer(layer, ctx)
        return out


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
        unet._xmgie_controller.clear()
        unet.set_attn_processor(AttnProcessor2_0())
        del unet._xmgie_controller


# --- masks at layer resolution ------------------------------------------------------

class MaskPyramid:
    """A mask resized to each layer resolution (bicubic, then threshold 0.5:
    docs/algorithms.md section 4), cached."""

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
