"""Host services: what the library asks of the program it runs in -- the compute and
offload devices, progress bars, interruption, and placing tensors on a device. Standalone
defaults use tqdm and Ctrl-C; the ComfyUI adapter in ``nodes/`` installs ComfyUI's
equivalents with :func:`set_hooks`. The library never imports ComfyUI itself.

The memory fields of :class:`Hooks` (freeing memory, loading models together) are read
by the model registry (:mod:`.memory`); autograd inside a host's inference mode is
:mod:`.grad_mode`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch


class Interrupted(Exception):
    """Raised when the user asked to stop (ComfyUI's cancel, or Ctrl-C standalone)."""


class Progress(Protocol):
    def update(self, n: int = 1) -> None: ...
    def close(self) -> None: ...


class _TqdmProgress:
    def __init__(self, total: int, desc: str):
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, desc=desc, leave=False,
                         disable=os.environ.get("XMGIE_NO_PROGRESS") == "1")

    def update(self, n: int = 1) -> None:
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()


class _NoProgress:
    def __init__(self, total: int, desc: str):
        pass

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


@contextlib.contextmanager
def no_progress() -> Iterator[None]:
    """Inner loops show no progress bar inside the block (a training run's validation
    edits: the training bar is the one that tells the user where the run is); the host's
    interruption is still checked at every update."""
    previous = set_hooks(progress=_NoProgress)
    try:
        yield
    finally:
        set_hooks(progress=previous.progress)


def _default_device() -> torch.device:
    forced = os.environ.get("XMGIE_DEVICE")
    if forced:
        return torch.device(forced)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@dataclasses.dataclass
class Hooks:
    """What the host provides. Every field has a standalone default; for the memory
    fields that default is ``None``: the pack's own model registry decides
    (:mod:`.memory`, which reads these fields)."""

    device: Callable[[], torch.device] = _default_device
    offload_device: Callable[[], torch.device] = lambda: torch.device("cpu")
    progress: Callable[[int, str], Progress] = _TqdmProgress
    check_interrupt: Callable[[], None] = lambda: None
    # Ask the host to free this many bytes on `device` before a load (standalone: the
    # registry offloads the pack's models not in use, on accelerators only).
    free_memory: Callable[[int, torch.device], None] | None = None
    # Whether a freshly loaded model goes straight to its compute device: yes standalone
    # (no with offload-after-use on); no in ComfyUI, whose loader moves it on use.
    load_on_register: Callable[[Any], bool] | None = None
    # Wrap a newly registered module for the host (ComfyUI: a ModelPatcher); the result
    # is kept as ``entry.handle`` (standalone: no wrapper).
    wrap_model: Callable[[Any], Any] | None = None
    # Put these modules on their compute device, together (they are used together).
    load_models: Callable[[list], None] | None = None
    # Whether a module is on its compute device (ComfyUI: its patcher is fully loaded;
    # standalone: the registry's own record).
    is_loaded: Callable[[Any], bool] | None = None


_hooks = Hooks()


def set_hooks(**kwargs) -> Hooks:
    """Replace some hooks (used by the ComfyUI adapter); returns the previous set."""
    global _hooks
    previous = _hooks
    _hooks = dataclasses.replace(_hooks, **kwargs)
    return previous


def hooks() -> Hooks:
    return _hooks


def device() -> torch.device:
    return _hooks.device()


def offload_device() -> torch.device:
    return _hooks.offload_device()


def check_interrupt() -> None:
    _hooks.check_interrupt()


class progress:
    """Context manager: ``with progress(50, "sampling") as p: ... p.update()``.

    Checks for interruption on every update so long loops stop promptly."""

    def __init__(self, total: int, desc: str = ""):
        self.total = total
        self.desc = desc
        self._bar: Progress | None = None

    def __enter__(self) -> progress:
        check_interrupt()
        self._bar = _hooks.progress(self.total, self.desc)
        return self

    def update(self, n: int = 1) -> None:
        assert self._bar is not None
        self._bar.update(n)
        check_interrupt()

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()


def same_device(a: torch.device, b: torch.device) -> bool:
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    return a.index is None or b.index is None or a.index == b.index


def device_key(device) -> str:
    """One name per device for caches keyed by device: "cuda" and "cuda:0" (the current
    device) are the same device, and a cache filled before a loop with the model's
    ``sd.device`` ("cuda") must serve a lookup with a tensor's ``.device`` ("cuda:0"),
    or the loop's first step builds and copies everything a second time."""
    d = torch.device(device)
    if d.type in ("cpu", "meta"):          # one of each: "cpu:0" is the CPU
        return d.type
    if d.index is not None:
        return str(d)
    index = 0
    module = getattr(torch, d.type, None)
    try:
        if module is not None and module.is_available():
            index = module.current_device()
    except Exception:
        index = 0
    return f"{d.type}:{index}"


def place(x: torch.Tensor, device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x`` on ``device`` (and in ``dtype``): the tensor itself when it is there already,
    a dtype cast when only the dtype differs, a copy only when it lives elsewhere. Loops
    use this instead of ``x.to(device)`` so that the sync counter (bench/syncs.py) sees an
    explicit move only where one happens ("cuda" and "cuda:0" are the same device)."""
    if not same_device(x.device, device):
        return x.to(device=device, dtype=dtype)
    return x if dtype is None or x.dtype == dtype else x.to(dtype=dtype)
