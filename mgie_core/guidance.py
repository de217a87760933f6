"""Shared machinery for test-time latent optimisation inside the sampler (MAG, A-STAR,
identity guidance): re-run the edit branch with gradients, cheaply and exactly.

* The reconstruction branch does not change within a step: its conditional row is run
  ONCE per step (no gradient) and its cross-attention maps and self-attention queries and
  keys are cached; every optimisation iteration replays the injection from that cache
  onto a single edit row (MAG-Edit's reference code recomputes it every iteration).
* The forward pass for a loss stops right after the last attention layer the loss reads
  (``attention_hooks.StopAfter`` in the call's hook list), so the backward goes only
  through that prefix.
* Optimised latents and losses stay float32 whatever the UNet's precision; a non-finite
  gradient skips the update with a warning and never touches the latent.
* The controls optimise inside :func:`grad_mode.autograd` (ComfyUI runs nodes inside
  inference mode) and take the latent through :func:`grad_mode.autograd_input`;
  :func:`gradient` raises :class:`GradientError` naming the control when the loss carries
  no gradient, and :func:`count_update` records every update applied or skipped (with
  its reason) in the run's report.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from . import attention_hooks
from .architecture import architecture_of
from .attention import COND, AttnContext, AttnHook, BatchLayout, Branch
from .diffusion import unet_eps
from .errors import GradientError, why_no_gradient

log = logging.getLogger(__name__)

EDIT_COND = BatchLayout(((Branch.EDIT, COND),))
REC_COND = BatchLayout(((Branch.REC, COND),))


class SourceRecorder(AttnHook):
    """Caches the reconstruction row's cross-attention maps and self-attention Q/K."""

    def __init__(self):
        self.probs: dict[str, torch.Tensor] = {}
        self.qk: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def needs_probs(self, layer, ctx):
        return layer.is_cross

    def observe(self, layer, ctx, probs):
        if layer.is_cross:
            self.probs[layer.name] = probs[ctx.layout.index(Branch.REC, COND)].detach()

    def qk_override(self, layer, ctx, query, key):
        if not layer.is_cross:
            r = ctx.layout.index(Branch.REC, COND)
            self.qk[layer.name] = (query[r].detach(), key[r].detach())
        return None


class SourceCache:
    """The reconstruction row's recordings (a :class:`SourceRecorder` each) for the
    current step, one per stop layer, shared by a run's latent-optimising controls, and
    the UNet passes spent filling it.

    Controls that stop at different layers share a step (MAG and identity guidance must
    not evict each other's recording), so a step keeps every stop layer's entry; storing
    an entry of a new step drops the older steps' ones."""

    def __init__(self):
        self._step: int | None = None
        self._by_stop: dict[str | None, SourceRecorder] = {}
        self.passes = 0            # reconstruction-row passes made to fill the cache

    def get(self, step: int, stop_layer: str | None) -> SourceRecorder | None:
        return self._by_stop.get(stop_layer) if step == self._step else None

    def put(self, step: int, stop_layer: str | None, recorder: SourceRecorder) -> None:
        if step != self._step:
            self._step, self._by_stop = step, {}
        self._by_stop[stop_layer] = recorder
        self.passes += 1

    def forget(self, step: int, stop_layer: str | None) -> None:
        """Drop one entry, so the next :func:`source_cache` call records it again."""
        if step == self._step:
            self._by_stop.pop(stop_layer, None)

    def __len__(self) -> int:
        return len(self._by_stop)


class CachedInjection(AttnHook):
    """Prompt-to-prompt injection replayed onto edit rows from a :class:`SourceRecorder`
    (same rule as :class:`attention_hooks.InjectionHook`, without the source row in the batch)."""

    def __init__(self, injection: attention_hooks.InjectionHook, recorder: SourceRecorder):
        self.inj, self.rec = injection, recorder

    def _edit_rows(self, ctx):
        return ctx.layout.indices(half=COND, branch=Branch.EDIT)

    def qk_override(self, layer, ctx, query, key):
        if layer.is_cross or ctx.step >= self.inj.self_steps or layer.name not in self.rec.qk:
            return None
        if not self.inj.injects_self(ctx, query.shape[2]):
            return None
        q_src, k_src = self.rec.qk[layer.name]
        query, key = query.clone(), key.clone()
        for r in self._edit_rows(ctx):
            query[r], key[r] = q_src.to(query.dtype), k_src.to(key.dtype)
        return query, key

    def needs_probs(self, layer, ctx):
        return layer.is_cross and ctx.step < self.inj.cross_steps and layer.name in self.rec.probs

    def edit_probs(self, layer, ctx, probs):
        if not self.needs_probs(layer, ctx):
            return probs
        src = self.rec.probs[layer.name].to(probs.dtype)
        probs = probs.clone()
        for r in self._edit_rows(ctx):
            probs[r] = self.inj.inject_cross(src, probs[r])
        return probs


def _call_unet(run, layout: BatchLayout, z: torch.Tensor, emb: torch.Tensor, step: int,
               hooks: Sequence[AttnHook], stop_layer: str | None) -> torch.Tensor | None:
    ctl = run.controller
    saved_hooks, saved_ctx = ctl.hooks, ctl.context
    # The forward stops after ``stop_layer`` (None: it runs whole).
    ctl.hooks = list(hooks) + ([attention_hooks.StopAfter(stop_layer)] if stop_layer else [])
    ctl.reset_call(AttnContext(step, run.schedule.num_steps, layout, tuple(z.shape[-2:])))
    try:
        return unet_eps(run.sd, z, run.schedule.t(step), emb)
    except attention_hooks.StopForward:
        return None
    finally:
        ctl.hooks, ctl.context = saved_hooks, saved_ctx


def source_cache(run, step: int, stop_layer: str | None = None) -> SourceRecorder:
    """The reconstruction row's maps and Q/K at ``step``: computed once per step."""
    cached = run.source_cache.get(step, stop_layer)
    if cached is None:
        cached = SourceRecorder()
        with torch.no_grad():
            _call_unet(run, REC_COND, run.latents[Branch.REC], run.cond_src, step,
                       [cached], stop_layer)
        run.source_cache.put(step, stop_layer, cached)
    return cached


def sampler_hooks_for_edit(run) -> list[AttnHook]:
    """The sampler's own hooks that act on the edit row (CAM), without the in-batch
    injection (replayed from the cache instead)."""
    return [h for h in run.sampler_hooks if not isinstance(h, attention_hooks.InjectionHook)]


def edit_maps(run, z: torch.Tensor, step: int, layers: Sequence[str],
              extra_hooks: Sequence[AttnHook] = (), truncate: bool = True,
              cache_source: bool = True) -> dict[str, torch.Tensor]:
    """Cross-attention maps (heads, HW, 77: the token rows of the conditioning, in every
    family) of the edit branch's conditional pass at the given layers, differentiable
    w.r.t. ``z``, after injection and CAM, with the forward stopped after the last of
    ``layers``.

    ``truncate=False`` / ``cache_source=False`` reproduce the reference call pattern (full
    forward; reconstruction recomputed for every call) for benchmarks and tests."""
    layers = list(layers)
    stop = architecture_of(run.sd.unet).last_in_execution(layers) if truncate else None
    if not cache_source:
        run.source_cache.forget(step, stop)
    hooks: list[AttnHook] = []
    inj = run.injection
    if inj is not None:
        hooks.append(CachedInjection(inj, source_cache(run, step, stop)))
    hooks += sampler_hooks_for_edit(run)
    capture = attention_hooks.CaptureHook(layers, rows=[(Branch.EDIT, COND)])
    hooks += [capture, *extra_hooks]
    _call_unet(run, EDIT_COND, z, run.cond_tgt, step, hooks, stop)
    run.edit_passes += 1
    missing = [l for l in layers if l not in capture.maps]
    if missing:
        raise RuntimeError(f"layers {missing} produced no maps (not cross-attention?)")
    return {name: capture.maps[name][0] for name in layers}


def layers_at_factor(unet, factor: int) -> list[str]:
    """Cross-attention layers working at latent/factor resolution (factor 4: the 16x16
    maps at 512 px), in execution order."""
    from .masks import map_layers as at_factor

    return sorted(at_factor(unet, factor), key=architecture_of(unet).execution_rank)


def map_layers(unet) -> list[str]:
    """The cross-attention layers whose maps MAG and A-STAR read, as the UNet's
    architecture chooses them (``LayerChoices.map_level``, latent / 4, in the down and up
    blocks: the five 16x16 layers at 512 px on SD 1.x and 2.x; on SDXL the 50 layers of
    the 10-deep transformers of down_blocks.2 and up_blocks.0, 32x32 at 1024 px), in
    execution order."""
    return architecture_of(unet).map_layers(unet)


def sigma(run, step: int) -> float:
    """sigma_t = sqrt((1 - abar_t) / abar_t)  (MAG-Edit's step size)."""
    a = run.schedule.abar(run.schedule.t(step))
    return ((1 - a) / a) ** 0.5


def gradient(loss: torch.Tensor, wrt: torch.Tensor, stage: str, step: int) -> torch.Tensor:
    """d loss / d wrt; raises :class:`GradientError` naming ``stage`` (the control) and
    the reason when autograd cannot give it (inference mode, no_grad, inference-tensor
    inputs, a loss that does not depend on ``wrt``) instead of letting a zero or missing
    gradient pass for an update. These are facts of the autograd graph, known on the
    host without reading any value."""
    if not loss.requires_grad:
        raise GradientError(stage, step, *why_no_gradient(loss, wrt))
    (grad,) = torch.autograd.grad(loss, wrt, allow_unused=True)
    if grad is None:
        raise GradientError(stage, step, *why_no_gradient(loss, wrt))
    return grad


def count_update(run, stage: str, grad: torch.Tensor, step: int) -> torch.Tensor:
    """Whether to apply an update with ``grad``: a 0-dim bool tensor on the gradient's
    device, to apply the update with (``torch.where``, see :func:`masked_update`).
    Skipped: a non-finite gradient (warned) and an all-zero one (the update would change
    nothing). The verdict is counted in ``run.report`` without reading it now
    (:meth:`UpdateReport.defer`; read once at the end of the run), so an iteration never
    waits for the device. (``if count_update(...)`` still works, with that wait.)"""
    finite = torch.isfinite(grad).all()
    nonzero = grad.ne(0).any()
    run.report.defer(stage, step, finite, nonzero, log)
    return finite & nonzero


def masked_update(z: torch.Tensor, grad: torch.Tensor, mask: torch.Tensor | None,
                  step_size: float, ok: torch.Tensor | None = None) -> torch.Tensor:
    """z - step * grad inside the mask (everywhere when ``mask`` is None) and where
    ``ok`` (the verdict of :func:`count_update`) holds; elsewhere the very same values
    (torch.where, not arithmetic, so they stay bit-identical, and a skipped non-finite
    gradient never reaches the latent)."""
    keep = None if mask is None else mask > 0.5
    if ok is not None:
        keep = ok if keep is None else keep & ok
    if keep is None:
        return z - step_size * grad
    return torch.where(keep, z - step_size * grad, z)


def dilate3(mask: torch.Tensor) -> torch.Tensor:
    """MAG-Edit's 3x3 max-pool dilation of a (B,1,h,w) mask (kornia's dilation, a centred
    3x3 kernel of ones; outside the image ignored)."""
    from kornia.morphology import dilation

    return dilation(mask, torch.ones(3, 3, device=mask.device, dtype=mask.dtype),
                    border_type="geodesic")
