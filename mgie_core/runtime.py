"""Runtime services the library needs from its host: device choice, progress,
interruption and memory. Standalone defaults use tqdm and Ctrl-C; the ComfyUI
adapter in ``nodes/`` installs ComfyUI's equivalents with :func:`set_hooks`.
The library never imports ComfyUI itself."""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Optional, Protocol

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
    """What the host provides. Every field has a standalone default."""

    device: Callable[[], torch.device] = _default_device
    offload_device: Callable[[], torch.device] = lambda: torch.device("cpu")
    progress: Callable[[int, str], Progress] = _TqdmProgress
    check_interrupt: Callable[[], None] = lambda: None
    # Ask the host to free this many bytes on `device` before a load.
    free_memory: Callable[[int, torch.device], None] = lambda nbytes, dev: None


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
        self._bar: Optional[Progress] = None

    def __enter__(self) -> "progress":
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


def free_memory_for(nbytes: int, dev: torch.device | None = None) -> None:
    _hooks.free_memory(int(nbytes), dev or device())
