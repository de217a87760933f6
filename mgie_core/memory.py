"""The memory registry: the pack's loaded models, where they are, and the policy that
loads and offloads them.

Every loader registers the torch modules of what it loaded with :func:`manage`; code
that runs a model wraps the work in ``with use(model):``, which asks the host to put the
model's modules on the compute device (freeing memory for them first). Standalone, the
registry does this itself: before a load it moves the pack's models that are not in use
to the CPU until the device has room (:func:`free_memory_for`), and with
:func:`set_offload_after_use` (``xmgie run --offload``, ``XMGIE_OFFLOAD=1``) models go
back to the CPU as soon as the block that used them ends. Inside ComfyUI each module is
wrapped in a ``comfy.model_patcher.ModelPatcher`` and loaded with
``comfy.model_management.load_models_gpu``, so ComfyUI offloads it like its own models
when another model needs the memory (see ``nodes/_comfy.py``).

A host replaces the standalone policy through the memory fields of
:class:`.host.Hooks`; a field left ``None`` means this registry decides.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from . import host
from .grad_mode import loading, normal_weights
from .host import same_device

log = logging.getLogger(__name__)


_offload_after_use = os.environ.get("XMGIE_OFFLOAD", "") == "1"


def set_offload_after_use(on: bool) -> bool:
    """Standalone: move models to the CPU when the :func:`use` block (a node) that used
    them ends, and place newly loaded models on the CPU. Returns the previous setting."""
    global _offload_after_use
    previous, _offload_after_use = _offload_after_use, bool(on)
    return previous


def offload_after_use() -> bool:
    return _offload_after_use


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers (what moving it moves)."""
    return sum(t.numel() * t.element_size()
               for t in itertools.chain(module.parameters(), module.buffers()))


def _module_device(module: torch.nn.Module) -> torch.device | None:
    for t in itertools.chain(module.parameters(), module.buffers()):
        return t.device
    return None


@dataclasses.dataclass(eq=False)
class ManagedModule:
    """One torch module of a loaded model (a UNet, a VAE, an LLM...), as the registry
    and the host see it. A module shared by several loaded models (the VAE of SD 1.5 and
    of the MGIE UNet put over it) has one entry."""

    name: str
    module: torch.nn.Module
    load_device: torch.device        # where it computes
    offload_device: torch.device     # where it waits
    nbytes: int
    loaded: bool = False             # standalone state; hosts answer through is_loaded
    handle: Any = None               # the host's wrapper (ComfyUI: a ModelPatcher)
    last_used: int = 0
    users: int = 0                   # open use() blocks
    owners: int = 0                  # loaded models holding it (the registry lets go at 0)

    @property
    def device(self) -> torch.device | None:
        return _module_device(self.module)

    def is_loaded(self) -> bool:
        is_loaded = host.hooks().is_loaded
        return bool(is_loaded(self) if is_loaded is not None else self.loaded)

    def on(self, dev: torch.device) -> bool:
        """Whether the module's weights are on ``dev`` ("cuda" matches "cuda:0")."""
        here = self.device
        return here is None or same_device(here, torch.device(dev))

    def move(self, dev: torch.device) -> None:
        with loading():
            self.module.to(dev)
        normal_weights(self.module)

    def __repr__(self) -> str:
        state = "loaded" if self.is_loaded() else "offloaded"
        return (f"ManagedModule({self.name}, {self.nbytes / 2**20:.1f} MiB, {state}, "
                f"{self.load_device} / {self.offload_device})")


def _free_bytes(dev: torch.device) -> int | None:
    """Free memory on ``dev`` as the driver reports it, None when unknown (CPU, MPS)."""
    if dev.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free)
    return None


class ModelRegistry:
    """The pack's loaded models: which modules each owner (an SDModel, a Captioner...)
    holds, where they are, and the standalone policy that loads and offloads them.

    ``free_bytes(device)`` measures free memory (None: unknown, then freeing offloads
    every model not in use on that device, as the only safe answer); the default asks
    the CUDA driver. ``reserve`` bytes are kept free on top of each request."""

    def __init__(self, free_bytes: Callable[[torch.device], int | None] = _free_bytes,
                 reserve: int = 256 * 2**20):
        self.free_bytes = free_bytes
        self.reserve = reserve
        self._modules: dict[int, ManagedModule] = {}
        self._owners: dict[int, tuple[weakref.ref, list[ManagedModule]]] = {}
        self._finalizers: dict[int, weakref.finalize] = {}
        self._clock = itertools.count(1)
        self.released: list[str] = []     # names offloaded by free(), for reports

    # -- registration ---------------------------------------------------------------
    def manage(self, owner: Any, modules: dict[str, torch.nn.Module],
               load_device: torch.device, offload_device: torch.device) -> list[ManagedModule]:
        """Register ``owner``'s modules (a module already registered by another owner is
        shared, not registered twice). An entry lives as long as one of its owners: the
        registry never keeps a model alive that nothing else uses."""
        entries = []
        for name, module in modules.items():
            entry = self._modules.get(id(module))
            if entry is None:
                entry = ManagedModule(name, module, torch.device(load_device),
                                      torch.device(offload_device), module_bytes(module))
                self._modules[id(module)] = entry
                wrap, on_register = host.hooks().wrap_model, host.hooks().load_on_register
                entry.handle = wrap(entry) if wrap is not None else None
                if (on_register(entry) if on_register is not None
                        else not offload_after_use()):
                    self.load([entry])
                else:
                    self.offload(entry)
            entry.owners += 1
            entries.append(entry)
        key = id(owner)
        if key in self._owners:                   # registered again: replace
            self._finalizers.pop(key).detach()
            self._release_owner(key)
        self._owners[key] = (weakref.ref(owner), entries)
        self._finalizers[key] = weakref.finalize(owner, self._release_owner, key)
        return entries

    def _release_owner(self, key: int) -> None:
        self._finalizers.pop(key, None)
        found = self._owners.pop(key, None)
        for entry in found[1] if found else ():
            entry.owners -= 1
            if entry.owners <= 0 and self._modules.get(id(entry.module)) is entry:
                del self._modules[id(entry.module)]
                entry.handle = None            # lets the host's wrapper go too

    def entries_of(self, owner: Any) -> list[ManagedModule]:
        found = self._owners.get(id(owner))
        if found is None or found[0]() is not owner:
            return []
        return list(found[1])

    def entries(self) -> list[ManagedModule]:
        return list(self._modules.values())

    def find(self, values: Iterable[Any], depth: int = 3) -> list[ManagedModule]:
        """The managed modules of every registered owner among ``values``, looking into
        lists, tuples, dicts and dataclass fields (a chain of controls holding an
        identity encoder) ``depth`` levels deep; in order, without repeats."""
        out: list[ManagedModule] = []
        seen: set[int] = set()

        def visit(v, d):
            if v is None or isinstance(v, (str, bytes, int, float, bool, torch.Tensor)) \
                    or id(v) in seen:
                return
            seen.add(id(v))
            for e in self.entries_of(v):
                if e not in out:
                    out.append(e)
            if d == 0:
                return
            if isinstance(v, dict):
                items = list(v.values())
            elif isinstance(v, (list, tuple, set)):
                items = list(v)
            elif dataclasses.is_dataclass(v) and not isinstance(v, type):
                items = [getattr(v, f.name, None) for f in dataclasses.fields(v)]
            else:
                items = []
            for item in items:
                visit(item, d - 1)

        for value in values:
            visit(value, depth)
        return out

    # -- the standalone policy --------------------------------------------------------
    def load(self, entries: list[ManagedModule]) -> None:
        """Put ``entries`` on their compute devices, freeing room for them first."""
        need: dict[torch.device, int] = {}
        for e in entries:
            if not e.on(e.load_device):
                need[e.load_device] = need.get(e.load_device, 0) + e.nbytes
        for dev, nbytes in need.items():
            free_memory_for(nbytes, dev)     # the entries in use are never offloaded
        for e in entries:
            if not e.on(e.load_device):
                e.move(e.load_device)
            e.loaded = True

    def offload(self, entry: ManagedModule) -> None:
        """Move ``entry`` to its offload device; it counts as offloaded from now on (the
        next :func:`use` loads it again)."""
        if not entry.on(entry.offload_device):
            entry.move(entry.offload_device)
        entry.loaded = False

    def free(self, nbytes: int, dev: torch.device) -> list[ManagedModule]:
        """Offload the models loaded on ``dev`` that no :func:`use` block holds, least
        recently used first, until ``free_bytes(dev)`` reports ``nbytes`` (+ the reserve)
        free (all of them when it reports nothing). Returns the entries offloaded.
        (:func:`free_memory_for` calls this for accelerators only: on the CPU, moving a
        model to the CPU frees nothing.)"""
        dev = torch.device(dev)
        candidates = sorted((e for e in self._modules.values()
                             if e.users == 0 and e.loaded and same_device(e.load_device, dev)),
                            key=lambda e: e.last_used)
        released = []
        for e in candidates:
            free = self.free_bytes(dev)
            if free is not None and free >= nbytes + self.reserve:
                break
            self.offload(e)
            released.append(e)
            self.released.append(e.name)
            log.info("offloaded %s (%.0f MiB) to %s to free memory on %s", e.name,
                     e.nbytes / 2**20, e.offload_device, dev)
        return released


_registry = ModelRegistry()


def registry() -> ModelRegistry:
    return _registry


def manage(owner: Any, modules: dict[str, torch.nn.Module],
           load_device: torch.device | str | None = None) -> Any:
    """Register the modules of a loaded model (``owner``: the object loaders return) and
    place them (standalone: on the compute device, or the CPU with offload-after-use;
    ComfyUI: on its offload device until :func:`use`). Returns ``owner``."""
    dev = torch.device(load_device) if load_device is not None else host.device()
    _registry.manage(owner, modules, dev, host.offload_device())
    return owner


@contextlib.contextmanager
def use(*values: Any) -> Iterator[list[ManagedModule]]:
    """Run a block with the models among ``values`` (owners, or lists / dataclasses
    holding them) on their compute devices. Nested blocks load what they add together
    with what outer blocks hold, as ComfyUI needs every model of a computation in one
    ``load_models_gpu`` call. With offload-after-use, models go back to the CPU when the
    outermost block using them ends."""
    entries = _registry.find(values)
    for e in entries:
        e.users += 1
    try:
        if entries:
            in_use = [e for e in _registry.entries() if e.users > 0]
            load_models = host.hooks().load_models
            (load_models if load_models is not None else _registry.load)(in_use)
            tick = next(_registry._clock)
            for e in entries:
                e.last_used = tick
        yield entries
    finally:
        for e in entries:
            e.users -= 1
        if _offload_after_use:
            for e in entries:
                if e.users == 0 and e.handle is None:
                    _registry.offload(e)


def free_memory_for(nbytes: int, dev: torch.device | None = None) -> None:
    """Ask the host to make ``nbytes`` free on ``dev`` (standalone: offload the pack's
    models that are not in use, least recently used first; ComfyUI: its free_memory,
    which offloads its own models and the pack's alike)."""
    dev = torch.device(dev) if dev is not None else host.device()
    host_free = host.hooks().free_memory
    if host_free is not None:
        host_free(int(nbytes), dev)
    elif dev.type != "cpu":      # on the CPU, moving a model to the CPU frees nothing
        registry().free(int(nbytes), dev)
