"""What the sampler's and MAG's captured calls need to know about the hooks and controls
above the attention layer (:mod:`.graphs` is the mechanism, a layer below): the regimes
of the guidance's cached injection, PFB and MAG, PFB's references as state, and MAG's
truncated forward and gradient as one captured call."""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import graphs, guidance, mag, pfb
from .architecture import architecture_of
from .attention import AttnContext, Branch


def _own_reference(layout) -> bool:
    """Whether a call holds its reference rows (PFB then blends from them); a call
    without them (MAG's edit row) reads the references an earlier call of the step
    cached."""
    return any(b in (Branch.REC, Branch.REF) for b, _ in layout.rows)


def _pfb_regime(c: pfb.PFBControl, ctx):
    active = c._run is not None and c._active_steps[ctx.step]
    return ("pfb", active, c.reference,
            None if _own_reference(ctx.layout) else tuple(sorted(c._cache)))


graphs.HOOK_REGIMES[guidance.CachedInjection] = lambda h, ctx: (
    "cinj", ctx.step < h.inj.cross_steps, ctx.step < h.inj.self_steps,
    tuple(sorted(h.rec.probs)), tuple(sorted(h.rec.qk)))
graphs.CONTROL_REGIMES[mag.MAGControl] = lambda c, ctx: ("mag",)   # acts between calls
graphs.CONTROL_REGIMES[pfb.PFBControl] = _pfb_regime
graphs.CONTROL_STATE[pfb.PFBControl] = lambda c, layout: (
    [] if _own_reference(layout) else [c._cache])
graphs.PATCH_OWNERS.add(pfb.PFBControl)


def for_run(sd, controls=()) -> graphs.GraphCache:
    """A sampling run's graph cache (:func:`graphs.for_run`), with the regimes above
    registered."""
    return graphs.for_run(sd, controls)


def mag_gradient(cache: graphs.GraphCache, control, run, z: torch.Tensor, i: int, fn: Callable):
    """``fn(control, run, z, i)`` (``mag.truncated_gradient``: the truncated forward,
    the loss and ``autograd.grad`` to ``z``) as one captured call. The reconstruction's
    recording for the step is made first, eagerly (once per step); the captured call
    reads it, and PFB's references, as state."""
    passes = run.edit_passes
    inputs = {"z": z, "t": graphs._timestep_tensor(run.sd, z, run.schedule.t(i))}

    def call(z, t):
        with graphs.timestep_input(run.sd.unet, t):
            return fn(control, run, z, i)

    try:
        if not control.cache_source:
            return cache.call("MAG", None, call, inputs, "cache_source=False records the "
                              "reconstruction inside every call")
        unet = run.sd.unet
        stop = architecture_of(unet).last_in_execution(control._layers) \
            if control.truncate else None
        rec = guidance.source_cache(run, i, stop) if run.injection is not None else None
        hooks = guidance.sampler_hooks_for_edit(run)
        if run.injection is not None:
            hooks = [*hooks, run.injection]
        ctx = AttnContext(i, run.schedule.num_steps, guidance.EDIT_COND, tuple(z.shape[-2:]))
        key, why = graphs.regime(hooks, cache.controls, ctx, run.controller.patches)
        if key is None:
            return cache.call("MAG", None, call, inputs, why)
        key = (key, stop, tuple(control._layers),
               None if rec is None else (tuple(sorted(rec.probs)), tuple(sorted(rec.qk))))
        state = [hooks, rec, graphs.control_state(cache.controls, guidance.EDIT_COND),
                 [control._groups_on, control._neg_on, list(control._insides.values())]]
        return cache.call("MAG", key, call, inputs, state,
                          (int(z.shape[0]), True, not control.truncate))
    finally:
        run.edit_passes = passes + 1       # the warm-up and the capture ran it too
