"""Count what would stall a GPU inside the per-step loops: host synchronisations and
host-device traffic, per stage and per step (a diagnostic for the tests and the
benchmark, outside the library: the editing code never uses it).

Both import it as the top-level module ``syncs`` with this folder on ``sys.path``: run
as a script, ``bench/edit_bench.py`` has it there already; ``tests/test_syncs.py`` and
the benchmark loaded as a module put it there. It counts the ``xmgie`` its importer
already imported.

On a GPU the host queues kernels and runs ahead; anything that needs a value back on
the host waits for every queued kernel first. With UNet passes that are launch-bound
(an eager SD 1.5 forward costs about the same at batch 1, 2 and 4 on an H100), a wait
per step or per inner iteration costs the overlap of host and device. The counter
classifies, at the dispatcher (``TorchDispatchMode``) and at the Python API
(``TorchFunctionMode``):

``scalar_read``
    a value read back on the host or an output whose size depends on the data:
    ``.item()``, ``float(t)``, ``int(t)``, ``bool(t)`` (``if t:``, ``not t``),
    ``t.tolist()``, ``t.numpy()``, ``torch.equal``, boolean-mask indexing, ``nonzero``,
    ``masked_select``, ``unique``, tensor ``repeat_interleave`` (``aten::_local_scalar_dense``
    and friends);
``to_host``
    a copy to the host: ``.cpu()``, ``.to("cpu")``, a device-to-host ``_to_copy``/``copy_``;
``host_tensor``
    a tensor made from host data or on the host (``torch.tensor(list)``, indexing with a
    Python list, a factory such as ``torch.arange(n)`` without a ``device``), and real
    host-to-device copies. PyTorch copies host memory to a GPU with ``non_blocking=False``
    and waits for the copy (``cudaMemcpyAsync`` + stream synchronise), so each of these
    is a synchronisation too once it meets a device tensor.

On the CPU every tensor lives on the host, so the counter cannot tell device tensors
from host ones: it counts the operations that *would* synchronise on a GPU, whatever
tensor they read. Code on the fast path therefore keeps host-side numbers (timesteps,
alphas, token positions) as Python numbers, not as CPU tensors read in the loop. On a
GPU (``device`` given), reads of CPU tensors are not synchronisations and are counted
apart as ``host_read``.

Steps are told apart through the host's progress bars: the counter wraps the
``progress`` hook, so every loop that reports progress (DDIM inversion, null-text
inversion, editing, ...) is a stage named by its bar, and the events between two
updates are one step. Everything outside a bar is counted under ``outside``.
"""

from __future__ import annotations

import collections
import dataclasses

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from xmgie.mgie_core import host

KINDS = ("scalar_read", "to_host", "host_tensor")
# Counted too, apart from the synchronisations: an explicit move to the model's device
# (free when the tensor is already there; see SyncCounter._classify_to), and on a GPU a
# read of a host tensor (no synchronisation).
INFO_KINDS = ("placement", "host_read")
OUTSIDE = "outside"

_aten = torch.ops.aten
# Ops whose output the host must see (a value, or a size that depends on the data).
_SCALAR_OPS = {_aten._local_scalar_dense.default, _aten.equal.default,
               _aten.nonzero.default, _aten.masked_select.default,
               _aten._unique2.default, _aten.unique_consecutive.default,
               _aten.unique_dim.default, _aten.repeat_interleave.Tensor,
               _aten.is_nonzero.default}
_INDEX_OPS = {_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default,
              _aten._index_put_impl_.default}
_COPY_OPS = {_aten._to_copy.default, _aten.copy_.default}
_FACTORIES = {torch.tensor, torch.as_tensor, torch.arange, torch.zeros, torch.ones,
              torch.full, torch.empty, torch.rand, torch.randn, torch.randint,
              torch.linspace, torch.eye, torch.randperm}


def _device_arg(args, kwargs):
    """The device a ``Tensor.to(...)`` call names, or None (a dtype-only cast)."""
    value = kwargs.get("device")
    if value is None:
        for a in args[1:]:
            if isinstance(a, (str, torch.device, int)) and not isinstance(a, bool):
                value = a
                break
    return value


@dataclasses.dataclass
class StageCounts:
    """One stage's counts: per step (a list of dicts by kind) and in total."""

    name: str
    steps: list = dataclasses.field(default_factory=list)

    def at(self, step: int) -> collections.Counter:
        while len(self.steps) <= step:
            self.steps.append(collections.Counter())
        return self.steps[step]

    def per_step(self, kind: str | None = None) -> list[int]:
        kinds = KINDS if kind is None else (kind,)
        return [sum(c[k] for k in kinds) for c in self.steps]

    def summary(self) -> dict:
        per = self.per_step()
        return {"steps": len(per), "total": sum(per), "max_per_step": max(per, default=0),
                "by_kind": {k: sum(c[k] for c in self.steps) for k in KINDS + INFO_KINDS},
                "per_step": per}


class _FunctionMode(TorchFunctionMode):
    def __init__(self, owner: SyncCounter):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        owner = self.owner
        kind = None
        if func in (torch.Tensor.tolist, torch.Tensor.numpy):
            kind = "scalar_read"
        elif func is torch.Tensor.cpu:
            kind = "to_host"
        elif func in (torch.Tensor.to, torch.Tensor.cuda):
            kind = owner._classify_to(func, args, kwargs)
        elif func in _FACTORIES and kwargs.get("device") is None:
            kind = "host_tensor"
        if kind is None:
            return func(*args, **kwargs)
        owner._event(kind, getattr(func, "__name__", str(func)))
        if kind == "placement":               # a real copy is counted by the dispatcher
            return func(*args, **kwargs)
        owner._quiet += 1                     # the dispatcher must not count it again
        try:
            return func(*args, **kwargs)
        finally:
            owner._quiet -= 1


class _DispatchMode(TorchDispatchMode):
    def __init__(self, owner: SyncCounter):
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        owner = self.owner
        if not owner._quiet:
            kind = self._classify(func, args, kwargs)
            if kind is not None:
                owner._event(kind, str(func))
        return func(*args, **kwargs)

    def _classify(self, func, args, kwargs) -> str | None:
        dev = self.owner.device
        if func in _SCALAR_OPS:
            t = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if dev is not None and dev.type != "cpu" and t is not None \
                    and t.device.type == "cpu":
                return "host_read"
            return "scalar_read"
        if func is _aten.lift_fresh.default:
            return "host_tensor"
        if func in _INDEX_OPS:
            idx = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in idx or ()):
                return "scalar_read"           # boolean mask: a nonzero() inside
            return None
        if func in _COPY_OPS:
            src = args[0] if func is _aten._to_copy.default else args[1]
            if func is _aten._to_copy.default:
                target = kwargs.get("device")
                target = torch.device(target) if target is not None else src.device
            else:
                target = args[0].device
            if src.device != target:
                return "to_host" if target.type == "cpu" else "host_tensor"
        return None


class _CountingProgress:
    """Wraps the host's progress bar; its updates mark the counter's steps."""

    def __init__(self, owner: SyncCounter, inner, total: int, desc: str):
        self.owner, self.inner, self.desc, self.total = owner, inner, desc, total
        owner._stack.append([desc, 0])
        owner._stage(desc).at(0)

    def update(self, n: int = 1) -> None:
        self.inner.update(n)
        top = self.owner._stack[-1] if self.owner._stack else None
        if top is not None and top[0] == self.desc:
            top[1] += n
            if top[1] < self.total:           # every step is listed, counted or not
                self.owner._stage(self.desc).at(top[1])

    def close(self) -> None:
        self.inner.close()
        stack = self.owner._stack
        for k in range(len(stack) - 1, -1, -1):
            if stack[k][0] == self.desc:
                del stack[k]
                break


class SyncCounter:
    """Context manager counting synchronising operations per stage and step.

    ``with SyncCounter() as c: run(...)``, then ``c.stage("editing").per_step()`` or
    ``c.summary()``. ``device``: the model's device; on a GPU, reads of CPU tensors are
    counted apart (``host_read``). ``trace``: keep the op names of every event (for
    finding where they come from)."""

    def __init__(self, device: torch.device | None = None, trace: bool = False):
        self.device = torch.device(device) if device is not None else None
        self.trace = trace
        self.stages: dict[str, StageCounts] = {}
        self.events: list[tuple[str, int, str, str]] = []
        self._stack: list[list] = []
        self._quiet = 0
        self._modes = []
        self._previous_hooks = None

    # -- counting -------------------------------------------------------------------
    def _classify_to(self, func, args, kwargs) -> str | None:
        """``.to("cpu")`` (a string naming the host) is a copy to the host. A
        ``torch.device`` is how the library names the model's device (``sd.device``): on
        the CPU it is the host too, so such a call counts as a ``placement`` (a no-op when
        the tensor is already there; a host-to-device copy when it lives on the host),
        unless the counter was told the model's device is not the CPU."""
        if func is torch.Tensor.cuda:
            return "placement"
        dev = _device_arg(args, kwargs)
        if dev is None:
            return None
        if isinstance(dev, str) and dev.split(":")[0] == "cpu":
            return "to_host"
        dev = torch.device(dev) if not isinstance(dev, torch.device) else dev
        if dev.type == "cpu" and self.device is not None and self.device.type != "cpu":
            return "to_host"
        return "placement"

    def _event(self, kind: str, what: str) -> None:
        if self._stack:
            name, step = self._stack[-1]
        else:
            name, step = OUTSIDE, 0
        self._stage(name).at(step)[kind] += 1
        if self.trace:
            self.events.append((name, step, kind, what))

    def _stage(self, name: str) -> StageCounts:
        if name not in self.stages:
            self.stages[name] = StageCounts(name)
        return self.stages[name]

    def stage(self, name: str) -> StageCounts:
        """The counts of a stage (an empty one when nothing was counted there)."""
        return self.stages.get(name) or StageCounts(name)

    def summary(self) -> dict:
        return {name: s.summary() for name, s in self.stages.items()}

    # -- context --------------------------------------------------------------------
    def __enter__(self) -> SyncCounter:
        prev = host.hooks()
        factory = prev.progress
        self._previous_hooks = host.set_hooks(
            progress=lambda total, desc: _CountingProgress(self, factory(total, desc), total, desc))
        self._modes = [_FunctionMode(self), _DispatchMode(self)]
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for m in reversed(self._modes):
            m.__exit__(*exc)
        self._modes = []
        if self._previous_hooks is not None:
            host.set_hooks(progress=self._previous_hooks.progress)
            self._previous_hooks = None
