"""Whole UNet calls captured as CUDA graphs and replayed: one launch per pass instead
of the hundreds of kernel launches an eager SD 1.5 pass makes (the passes of an edit
are launch-bound: ~30 ms eager at batch 1, 2 and 4 alike on an H200).

Why hand-captured ``torch.cuda.CUDAGraph`` and not ``torch.compile(mode="reduce-
overhead")``. The pack's attention processors run Python hooks whose choices change
with the step (injection windows, PFB's active steps, MAG's truncation), and they pass
tensors between calls through Python objects (the reconstruction's recorded maps and
Q/K, PFB's reference features). Dynamo would guard on all of that and recompile per
step, or, compiling only the leaf modules (models/compile.py), leave the attention
layers and the hooks eager between dozens of small graphs. A captured call instead
records the kernels the hooks launch for one *regime* (the hooks' step-dependent
choices) and replays them; what it needs is that the hooks are pure tensor code once
their choices are fixed, which the pack's hooks are (they never read a value back to
the host inside a step: tests/test_syncs.py). So:

* a graph is keyed by the call site, the inputs' shapes and dtypes, the batch layout
  and the regime every hook and control reports (:func:`regime`); a hook or a control
  this module does not know cannot say its regime, and the call runs eagerly (logged
  with its name);
* inputs (latent, timestep, embedding) are copied into static buffers before a replay;
  tensors the hooks hold (masks, biases, the reconstruction's recordings, PFB's
  references) are *state*: found by walking the hooks (:func:`state_tensors`) before
  the capture, and before each replay the current ones are copied into the captured
  ones where they are other tensors (a new step's recordings), so a replay reads this
  call's data;
* outputs are cloned on return: the next replay overwrites the graph's own (the
  "tensor output of CUDAGraphs that has been overwritten" error of cudagraph trees is
  the same hazard);
* the first call of a key warms up eagerly on a side stream (lazy initialisation,
  cuDNN's algorithm choice, the hooks' per-size caches), captures, replays, and checks
  the replay against the warm-up's result. A mismatch is warned about once and that key
  runs eagerly from then on; a capture that raises (an operation not allowed while
  capturing, a host read, no usable CUDA) is warned about once and turns captures off
  for the process, since a failed stream capture may leave the allocator in an odd
  state. Either way the call's result comes from an eager call: the edit never fails
  because a capture did (the pack's own errors, a missing gradient say, still raise);
* a site that keeps seeing new keys (shapes that change) stops capturing after
  :data:`MAX_KEYS_PER_SITE`; a key whose hooks' tensors change form from call to call
  after :data:`MAX_RECAPTURES`.

A 50-step edit captures few graphs: the fast edit 5 (the inversion's forward, three
sampler regimes, one MAG call serving all 25 optimised steps), the seed-faithful one 8
(null-text's three calls besides). Each costs a warm-up pass, the capture and a
checked replay, once per run.

MAG's truncated forward and its ``autograd.grad`` to the latent are captured together,
in the same way, as one call (``mag.truncated_gradient``): the backward's kernels are
launched by the autograd engine on the capturing stream, and the static latent is a leaf
that requires grad. Cudagraph trees (reduce-overhead) were not chosen for it: they
capture forward and backward as separate graphs tied to AOT autograd's compiled
backward, which the pack's Python hooks would break into pieces.

Selection (:func:`select`): ``compile_unet="graphs"`` and a CUDA device with CUDA
graphs; anything else (a CPU, MPS, torch without CUDA) runs eagerly, with the reason
logged once. Graphs live for one run (:class:`GraphCache` on the sampling run, or one
inversion): the hooks' tensors belong to the run, and run-level numbers (MAG's scale,
PFB's alpha, the guidance scale) are frozen into the kernels, so a graph kept for the
next edit would need every one of them in its key; a cache held between runs would also
keep GPU memory a host such as ComfyUI does not know about.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Callable, Iterable

import torch

from . import attention_hooks as ah
from . import host
from .diffusion import abar_of, call_unet, takes_added_condition, time_ids
from .errors import XMGIEError

log = logging.getLogger(__name__)

GRAPH_MODE = "graphs"
MAX_KEYS_PER_SITE = 6          # distinct regimes/shapes per call site before giving up
WARMUP = 1                     # eager runs on a side stream before a capture
MAX_RECAPTURES = 2             # captures again of one key whose hooks' tensors changed
# Largest relative difference between the warm-up's result and the first replay's.
# Replays run the very kernels the eager call chose, so they agree to rounding; a stale
# input or state would differ by far more.
CHECK_TOLERANCE = 1e-2


# Every cache's counts together (benchmarks read the difference around an edit), the
# observers told of each replay (a pass no module hook sees: ``fn(site, batch, backward,
# completed)``), and whether a warm-up or capture is under way (its passes are not the
# edit's: a pass counter skips them).
TOTALS: Counter = Counter()
OBSERVERS: list[Callable] = []
_capturing = [0]


def capturing() -> bool:
    return _capturing[0] > 0


@dataclasses.dataclass(frozen=True)
class Decision:
    captured: bool
    reason: str


# Set by a capture that raised: no capture is attempted again in this process (a failed
# stream capture can leave the device's allocator mid-capture; eager calls are safe).
_broken = ""

# Tests set this to attempt captures on any device: off CUDA, torch itself refuses them,
# which exercises the fallback of a failed capture.
ATTEMPT_ANYWHERE = False


def select(mode: str, device, *, anywhere: bool | None = None,
           cuda: bool | None = None) -> Decision:
    """Whether the UNet calls run as captured CUDA graphs, and why (not). ``cuda``:
    whether torch can use a CUDA device (None: ask torch)."""
    if mode != GRAPH_MODE:
        return Decision(False, f"compile_unet is {mode!r}, not {GRAPH_MODE!r}")
    if _broken:
        return Decision(False, _broken)
    if ATTEMPT_ANYWHERE if anywhere is None else anywhere:   # tests (fails off CUDA)
        return Decision(True, "capture attempted on any device (test setting)")
    dev = torch.device(device)
    if dev.type != "cuda":
        return Decision(False, f"the model runs on {dev.type}: CUDA graphs need a CUDA GPU")
    if not (torch.cuda.is_available() if cuda is None else cuda):
        return Decision(False, "this torch has no usable CUDA")
    if not hasattr(torch.cuda, "CUDAGraph"):
        return Decision(False, "this torch has no CUDA graphs")
    return Decision(True, "CUDA device")


def unet_mode(unet) -> str:
    from .models.compile import compiled_mode

    return compiled_mode(unet)


_said: set[str] = set()


def _once(level: int, msg: str) -> None:
    """Log a message once per process (a fallback reason, not once per step)."""
    if msg not in _said:
        _said.add(msg)
        log.log(level, msg)


# --- regimes: the hooks' step-dependent choices ----------------------------------------
#
# A hook or control class is known when a function that says its regime is registered
# for it (exactly that class: a subclass may keep state of its own). The pack's
# attention hooks are registered here; the guidance's cached injection, PFB and MAG by
# graph_calls.py, a layer above (the sampler imports it).

HOOK_REGIMES: dict[type, Callable] = {}      # class -> fn(hook, ctx) -> hashable
CONTROL_REGIMES: dict[type, Callable] = {}   # class -> fn(control, ctx) -> hashable
CONTROL_STATE: dict[type, Callable] = {}     # class -> fn(control, layout) -> roots
PATCH_OWNERS: set[type] = set()              # controls whose module patches are known


def _window(steps, step):
    return None if steps is None else step in steps


HOOK_REGIMES.update({
    ah.InjectionHook: lambda h, ctx: ("inj", h.mode, ctx.step < h.cross_steps,
                                      ctx.step < h.self_steps),
    ah.CAMHook: lambda h, ctx: ("cam", h.mode, _window(h.steps, ctx.step)),
    ah.CaptureHook: lambda h, ctx: ("cap", h.layers, h.rows, h.cross,
                                    _window(h.steps, ctx.step)),
    ah.StopAfter: lambda h, ctx: ("stop", h.layer_name),
})


def regime(hooks: Iterable, controls: Iterable, ctx, patches: int) -> tuple[tuple | None, str]:
    """(key, "") for a call whose hooks and controls are all known, else (None, why)."""
    parts = []
    for h in hooks:
        fn = HOOK_REGIMES.get(type(h))
        if fn is None:
            return None, (f"the attention hook {type(h).__name__} is not known to be pure "
                          "tensor code: its call runs eagerly")
        parts.append(fn(h, ctx))
    owners = False
    for c in controls:
        fn = CONTROL_REGIMES.get(type(c))
        if fn is None:
            return None, (f"the control {type(c).__name__} is not known to be pure tensor "
                          "code inside the UNet: its run's calls run eagerly")
        owners = owners or type(c) in PATCH_OWNERS
        parts.append(fn(c, ctx))
    if patches and not owners:
        return None, "the UNet carries module patches of an unknown owner"
    return (ctx.layout.rows, ctx.latent_hw, tuple(parts)), ""


def control_state(controls: Iterable, layout) -> list:
    """The controls' tensors a call with ``layout`` reads from earlier calls (PFB's cached
    references, for MAG's edit row), as roots for :func:`state_tensors`."""
    roots = []
    for c in controls:
        fn = CONTROL_STATE.get(type(c))
        if fn is not None:
            roots += fn(c, layout)
    return roots


# --- the hooks' tensors (state) --------------------------------------------------------

def _walkable(obj) -> bool:
    from .attention import AttnHook, MaskPyramid

    return isinstance(obj, (AttnHook, MaskPyramid))


def state_tensors(roots: Iterable, device=None) -> dict[tuple, torch.Tensor]:
    """Every tensor reachable from ``roots`` through dicts, lists, tuples, attention hooks
    and mask pyramids (not through models or runs), by path; only those on ``device``
    when given (host copies such as a mapper's are never read by a captured call)."""
    from . import host

    out: dict[tuple, torch.Tensor] = {}

    def walk(obj, path, depth):
        if depth > 6:
            return
        if isinstance(obj, torch.Tensor):
            # "cuda" (the model's device) and "cuda:0" (a tensor's) are one device
            if device is None or host.same_device(obj.device, device):
                out[path] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, (*path, repr(k)), depth + 1)
        elif isinstance(obj, (list, tuple)):
            for k, v in enumerate(obj):
                walk(v, (*path, k), depth + 1)
        elif _walkable(obj):
            walk(vars(obj), (*path, type(obj).__name__), depth + 1)

    for k, root in enumerate(roots):
        walk(root, (k,), 0)
    return out


def refresh_state(captured: dict[tuple, torch.Tensor],
                  current: dict[tuple, torch.Tensor]) -> bool:
    """Copy the hooks' current tensors into those a graph was captured with, path by
    path (a tensor that is the captured one is left alone); False, copying nothing
    more, where a captured path is gone or changed shape or dtype (capture again)."""
    if any(path not in current or current[path].shape != t.shape
           or current[path].dtype != t.dtype for path, t in captured.items()):
        return False
    with torch.no_grad():
        for path, t in captured.items():
            c = current[path]
            if c is not t and (c.data_ptr() != t.data_ptr() or c.stride() != t.stride()):
                t.copy_(c)
    return True


# --- captured calls ----------------------------------------------------------------------

def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flat(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _flat(v)]
    return []


def _clone(out):
    if isinstance(out, torch.Tensor):
        return out.detach().clone()
    if isinstance(out, dict):
        return {k: _clone(v) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return type(out)(_clone(v) for v in out)
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


class _Mismatch(Exception):
    """A captured call's first replay disagrees with its eager warm-up."""


class _Graph:
    def __init__(self, graph, inputs, outputs, state):
        self.graph, self.inputs, self.outputs, self.state = graph, inputs, outputs, state


class GraphCache:
    """Captured calls of one run (see the module docstring). ``call`` runs ``fn`` on
    ``inputs`` either eagerly or as the replay of a graph captured for ``(site, key)``;
    ``stats`` counts replays, captures and eager calls per site, ``reasons`` holds why a
    site or key ran eagerly."""

    def __init__(self, decision: Decision, device=None):
        self.decision = decision
        self.device = torch.device(device) if device is not None else None
        self._graphs: dict[tuple, _Graph] = {}
        self._failed: dict[tuple, str] = {}
        self._keys: dict[str, set] = {}
        self._recaptures: dict[tuple, int] = {}
        self.stats: Counter = Counter()
        self.reasons: dict[str, str] = {}
        if not decision.captured:
            _once(logging.INFO, f"CUDA graphs off: {decision.reason}")

    @property
    def active(self) -> bool:
        return self.decision.captured

    def _count(self, what: str) -> None:
        self.stats[what] += 1
        TOTALS[what] += 1

    def eager(self, site: str, why: str, fn: Callable, inputs: dict):
        self._count(f"{site}.eager")
        self.reasons.setdefault(site, why)
        _once(logging.INFO, f"CUDA graphs: {site} runs eagerly: {why}")
        return fn(**inputs)

    def call(self, site: str, key, fn: Callable, inputs: dict[str, torch.Tensor],
             state: Iterable = (), passes: tuple = (1, False, True)):
        """``fn(**inputs)``, replayed from a graph when possible. ``key`` None: the call
        cannot be captured (its reason is in ``state`` then: pass a string). ``passes``:
        (batch, whether it runs a backward, whether its forward completes), for
        :data:`OBSERVERS`."""
        if not self.active:
            return self.eager(site, self.decision.reason, fn, inputs)
        if key is None:
            return self.eager(site, state if isinstance(state, str) else "no key", fn, inputs)
        full = (site, key, tuple((k, tuple(v.shape), v.dtype, v.requires_grad)
                                 for k, v in inputs.items()))
        if full in self._failed:
            return self.eager(site, self._failed[full], fn, inputs)
        g = self._graphs.get(full)
        if g is not None:
            out = self._replay(g, inputs, state)
            if out is not None:
                self._replayed(site, passes)
                return out
            del self._graphs[full]          # the hooks' tensors changed form: capture again
            self._recaptures[full] = self._recaptures.get(full, 0) + 1
            if self._recaptures[full] > MAX_RECAPTURES:
                why = ("the hooks' tensors change form from call to call (shapes, or "
                       "entries that come and go): not captured any more")
                self._failed[full] = why
                return self.eager(site, why, fn, inputs)
        why = self.admit(site, full)
        if why:
            return self.eager(site, why, fn, inputs)
        try:
            out = self._capture(full, fn, inputs, state)
        except XMGIEError:                 # the call's own error (bad input, no gradient)
            raise
        except _Mismatch as exc:          # this key only: the others may be fine
            why = f"the capture's first replay differs from the eager call ({exc})"
            self._failed[full] = why
            _once(logging.WARNING, f"CUDA graphs: {site}: {why}; running it eagerly")
            self.reasons[site] = why
            return self.eager(site, why, fn, inputs)
        except Exception as exc:           # the edit must never fail because a capture did
            global _broken
            why = f"the capture failed ({type(exc).__name__}: {exc})"
            _broken = (f"a capture failed earlier in this process, at {site} "
                       f"({type(exc).__name__}: {exc})")
            self.decision = Decision(False, _broken)
            _once(logging.WARNING, f"CUDA graphs: {site}: {why}; every UNet call runs "
                  "eagerly from now on")
            self.reasons[site] = why
            return self.eager(site, why, fn, inputs)
        self._count(f"{site}.capture")
        self._replayed(site, passes)        # the first result is a replay's
        return out

    def admit(self, site: str, full: tuple) -> str:
        """Whether a new key may be captured at ``site``: "" when it may, else why not
        (the key then runs eagerly for the rest of the run)."""
        seen = self._keys.setdefault(site, set())
        if full in seen or len(seen) < MAX_KEYS_PER_SITE:
            seen.add(full)
            return ""
        why = (f"more than {MAX_KEYS_PER_SITE} different shapes or hook regimes at this "
               "call site (shapes that change): not captured any more")
        self._failed[full] = why
        return why

    def _replayed(self, site: str, passes: tuple) -> None:
        self._count(f"{site}.replay")
        for fn in OBSERVERS:
            fn(site, *passes)

    def _replay(self, g: _Graph, inputs, state):
        if not refresh_state(g.state, state_tensors(state, self.device)):
            return None
        with torch.no_grad():
            for k, v in inputs.items():
                g.inputs[k].copy_(v)
        g.graph.replay()
        return _clone(g.outputs)

    def _capture(self, full, fn, inputs, state):
        _capturing[0] += 1
        try:
            side = torch.cuda.Stream()         # off CUDA, torch raises here
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP):
                    reference = _clone(fn(**inputs))
            torch.cuda.current_stream().wait_stream(side)
            static = {}
            with torch.no_grad():
                for k, v in inputs.items():
                    static[k] = v.detach().clone().requires_grad_(v.requires_grad)
            snapshot = state_tensors(state, self.device)      # after the warm-up's caches
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outputs = fn(**static)
        finally:
            _capturing[0] -= 1
        g = _Graph(graph, static, outputs, snapshot)
        graph.replay()
        got = _clone(outputs)
        for a, b in zip(_flat(got), _flat(reference)):
            same_finite = bool(torch.isfinite(a).all()) == bool(torch.isfinite(b).all())
            if a.shape != b.shape or not same_finite or _rel(a, b) > CHECK_TOLERANCE:
                raise _Mismatch(f"relative difference {_rel(a, b):.2e}")
        self._graphs[full] = g
        return got


# --- the call sites' helpers -------------------------------------------------------------

def for_run(sd, controls: Iterable = ()) -> GraphCache:
    """The graph cache of one sampling run (or one inversion) on ``sd``'s UNet."""
    cache = GraphCache(select(unet_mode(sd.unet), sd.device), sd.device)
    cache.controls = list(controls)
    return cache


def _timestep_tensor(sd, z: torch.Tensor, t) -> torch.Tensor:
    """The timestep as a device tensor, as ``diffusion.unet_eps`` makes it."""
    frac = isinstance(t, float) and not t.is_integer()
    return torch.full((z.shape[0],), t if frac else int(t), device=sd.device,
                      dtype=torch.float32 if frac else torch.long)


def unet_eps(cache: GraphCache, site: str, sd, z: torch.Tensor, t, emb: torch.Tensor,
             controller=None) -> torch.Tensor:
    """``diffusion.unet_eps`` through the graph cache: the call's hooks are the
    controller's (none: a plain UNet), its context the controller's current one."""
    inputs = {"z": host.place(z, sd.device, sd.dtype), "t": _timestep_tensor(sd, z, t),
              "emb": host.place(emb, sd.device, sd.dtype), **_model_inputs(sd, z, t)}

    def fn(z, t, emb, ids=None, abar=None, x=None):
        return call_unet(sd, z, t, emb, ids, abar, x)

    ctl, passes = controller, (int(z.shape[0]), False, True)
    if ctl is None or (ctl.context is None and not ctl.patches):
        return cache.call(site, ("plain",), fn, inputs, passes=passes)
    if ctl.context is None:
        return cache.call(site, None, fn, inputs, "module patches outside a sampler call")
    key, why = regime(ctl.hooks, getattr(cache, "controls", ()), ctl.context, ctl.patches)
    if key is None:
        return cache.call(site, None, fn, inputs, why)
    state = [list(ctl.hooks), *control_state(cache.controls, ctl.context.layout)]
    return cache.call(site, key, fn, inputs, state, passes)


def _model_inputs(sd, z: torch.Tensor, t) -> dict[str, torch.Tensor]:
    """What a captured UNet call needs besides (z, t, emb), made outside the capture as
    device tensors: SDXL's time ids for the latent's size, and for a v-prediction model
    abar_t and the float32 latent for the conversion to epsilon (``diffusion.call_unet``).
    Nothing for an SD 1.x epsilon model."""
    out = {}
    if takes_added_condition(sd.unet):
        out["ids"] = time_ids(sd, tuple(z.shape[-2:]))
    abar = abar_of(sd, t)
    if abar is not None:
        out["abar"] = torch.full((1,), abar, device=sd.device, dtype=torch.float32)
        out["x"] = host.place(z, sd.device, torch.float32)
    return out


class timestep_input:
    """Within the block, every call of ``unet`` takes its timestep from the tensor ``t``
    (broadcast to the batch) instead of the one its caller made: a captured call then
    reads the timestep from a static buffer, where a number made into a tensor inside the
    call would be frozen into the graph."""

    def __init__(self, unet, t: torch.Tensor):
        self.unet, self.t = unet, t

    def __enter__(self):
        def pre(module, args, kwargs):
            if len(args) >= 2:
                return (args[0], self.t.expand(args[0].shape[0]), *args[2:]), kwargs
            return args, {**kwargs, "timestep": self.t.expand(args[0].shape[0])}
        self.handle = self.unet.register_forward_pre_hook(pre, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()
        return False


def ddim_coefficients(sch, device) -> torch.Tensor:
    """(N, 4) float32 on ``device``: per step i, sqrt(1 - abar_t), sqrt(abar_t),
    sqrt(abar_prev), sqrt(1 - abar_prev) (``diffusion.ddim_step``'s numbers, computed the
    same way in double and rounded once): a captured DDIM step reads them from a buffer,
    where Python numbers would be frozen into the graph. One copy, before the loop."""
    rows = []
    for i in range(sch.num_steps):
        a, ap = sch.abar(sch.t(i)), sch.abar(sch.prev_t(i))
        rows.append([(1 - a) ** 0.5, a ** 0.5, ap ** 0.5, (1 - ap) ** 0.5])
    return torch.tensor(rows, dtype=torch.float32, device=device)


def null_text_gradient(cache: GraphCache, sd, u: torch.Tensor, z: torch.Tensor, t,
                       eps_c: torch.Tensor, target: torch.Tensor, coef: torch.Tensor,
                       scale: float, step: int, stage: str = "null-text inversion"):
    """(loss, d loss / d u) of one null-text iteration (``inversion.
    null_text_optimisation``'s guided DDIM step against the trajectory), as one captured
    call: the unconditional forward with the embedding ``u`` and its backward to ``u``.
    The step's numbers come in as inputs (``coef``: a row of :func:`ddim_coefficients`,
    ``t``), so one graph serves every step."""
    from .errors import GradientError, why_no_gradient

    def fn(u, z, t, eps_c, target, coef, ids=None, abar=None, x=None):
        b = z.shape[0]
        eps_u = call_unet(sd, z.to(sd.dtype), t.expand(b), u.expand(b, -1, -1).to(sd.dtype),
                          ids, abar, z if x is None else x)
        eps = eps_u + scale * (eps_c - eps_u)
        x0 = (z - coef[0] * eps) / coef[1]
        loss = torch.nn.functional.mse_loss(coef[2] * x0 + coef[3] * eps, target)
        if not loss.requires_grad:
            raise GradientError(stage, step, *why_no_gradient(loss, u))
        (grad,) = torch.autograd.grad(loss, u)
        return loss.detach(), grad

    inputs = {"u": u, "z": z, "t": _timestep_tensor(sd, z, t)[:1], "eps_c": eps_c,
              "target": target, "coef": coef,
              **{k: v for k, v in _model_inputs(sd, z, t).items() if k != "x"}}
    return cache.call("null-text", ("scale", scale), fn, inputs,
                      passes=(int(z.shape[0]), True, True))
