"""Runtime services the library needs from its host: device choice, progress,
interruption, memory, and autograd inside a host's inference mode. Standalone defaults
use tqdm, Ctrl-C and the pack's own model registry; the ComfyUI adapter in ``nodes/``
installs ComfyUI's equivalents with :func:`set_hooks`. The library never imports
ComfyUI itself.

Autograd (:func:`autograd`, :func:`autograd_input`, :func:`loading`). ComfyUI executes
every node inside ``torch.inference_mode()`` (its ``execution.py``). Tensors made there
are inference tensors: autograd can neither record operations on them nor save them for
a backward pass, and ``torch.inference_mode(False)`` around the optimisation alone does
not help when the model's weights or the block's inputs are inference tensors. So:

* every loader builds its weights inside :func:`loading` (inference mode off, no
  gradient), so parameters and buffers are normal tensors wherever the loader runs;
* every gradient-based stage (null-text inversion, MAG, A-STAR, identity guidance) runs
  its optimisation inside :func:`autograd`, and passes the tensors that come from outside
  the block through :func:`autograd_input`, which clones inference tensors into normal
  ones (outside inference mode) and returns everything else as it is;
* :func:`normal_weights` replaces inference-tensor weights of a module (a host may move a
  module between devices inside inference mode, which makes its weights inference
  tensors again); the model registry calls it whenever it loads a model for use.

ComfyUI itself does not avoid inference tensors for weights: its loaders run inside
inference mode, and its LoRA trainer (``comfy_extras/nodes_train.py``) re-materialises
the weights by loading the model onto the GPU inside ``torch.inference_mode(False)``.

Memory (:func:`manage`, :func:`use`, :func:`free_memory_for`). Every loader registers
the torch modules of what it loaded with :func:`manage`; code that runs a model wraps the
work in ``with use(model):``, which asks the host to put the model's modules on the
compute device (freeing memory for them first). Standalone, the registry does this itself:
before a load it moves the pack's models that are not in use to the CPU until the device
has room (:func:`free_memory_for`), and with :func:`set_offload_after_use` (``xmgie run
--offload``, ``XMGIE_OFFLOAD=1``) models go back to the CPU as soon as the block that used
them ends. Inside ComfyUI each module is wrapped in a ``comfy.model_patcher.ModelPatcher``
and loaded with ``comfy.model_management.load_models_gpu``, so ComfyUI offloads it like
its own models when another model needs the memory (see ``nodes/_comfy.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import logging
import os
import weakref
from typing import Any, Callable, Iterable, Iterator, Optional, Protocol

import torch

log = logging.getLogger(__name__)


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
    free_memory: Callable[[int, torch.device], None] = \
        lambda nbytes, dev: registry().free(nbytes, dev) if dev.type != "cpu" else None
    # Whether a freshly loaded model goes straight to its compute device: yes standalone
    # (no with offload-after-use on); no in ComfyUI, whose loader moves it on use.
    load_on_register: Callable[["ManagedModule"], bool] = \
        lambda entry: not offload_after_use()
    # Wrap a newly registered module for the host (ComfyUI: a ModelPatcher); the result
    # is kept as ``entry.handle``.
    wrap_model: Callable[["ManagedModule"], Any] = lambda entry: None
    # Put these modules on their compute device, together (they are used together).
    load_models: Callable[[list["ManagedModule"]], None] = \
        lambda entries: registry().load(entries)
    # Whether a module is on its compute device (ComfyUI: its patcher is fully loaded).
    is_loaded: Callable[["ManagedModule"], bool] = lambda entry: entry.loaded


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
    """Ask the host to make ``nbytes`` free on ``dev`` (standalone: offload the pack's
    models that are not in use, least recently used first; ComfyUI: its free_memory,
    which offloads its own models and the pack's alike)."""
    _hooks.free_memory(int(nbytes), torch.device(dev) if dev is not None else device())


# --- autograd inside a host's inference mode ------------------------------------------

@contextlib.contextmanager
def autograd() -> Iterator[None]:
    """The block needs autograd: inference mode off and gradients on, whatever the caller
    (ComfyUI runs nodes inside ``torch.inference_mode()``, a library user may be in
    ``torch.no_grad()``). Pass tensors made outside the block through
    :func:`autograd_input` before they take part in a differentiated computation."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def autograd_input(x):
    """``x`` made usable in an :func:`autograd` block: an inference tensor is cloned into
    a normal tensor (the clone happens outside inference mode, else it would be one
    again); lists, tuples and dicts are converted item by item; anything else is
    returned as it is (a normal tensor is not copied)."""
    if isinstance(x, torch.Tensor):
        if not x.is_inference():
            return x
        with torch.inference_mode(False):
            return x.clone()
    if isinstance(x, dict):
        return {k: autograd_input(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(autograd_input(v) for v in x)
    return x


@contextlib.contextmanager
def normal_tensors() -> Iterator[None]:
    """Make state for a whole run here (device caches of masks, token positions, the
    injection's mapper): inference mode off and no gradient, so the tensors are normal
    ones that a later :func:`autograd` block may save for its backward, even when the
    run started inside a host's inference mode (ComfyUI). Inference tensors may be read
    inside; what is made is normal."""
    with torch.inference_mode(False), torch.no_grad():
        yield


@contextlib.contextmanager
def loading() -> Iterator[None]:
    """Build model weights inside this block: inference mode off (so parameters are
    normal tensors that autograd can pass through, even when the loader runs inside a
    ComfyUI node) and no gradient tracking."""
    with torch.inference_mode(False), torch.no_grad():
        yield


def builds_weights(fn):
    """Decorator for loaders: the whole loader runs inside :func:`loading`."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with loading():
            return fn(*args, **kwargs)

    return wrapper


def normal_weights(module: torch.nn.Module) -> int:
    """Replace every parameter and buffer of ``module`` that is an inference tensor by a
    normal copy (same device, dtype and requires_grad); returns how many were replaced.

    Setting ``.data`` is not enough: a Parameter object created in inference mode keeps
    no version counter, so it must be a new Parameter."""
    replaced = 0
    with torch.inference_mode(False), torch.no_grad():
        for mod in module.modules():
            for name, p in list(mod._parameters.items()):
                if p is not None and p.is_inference():
                    mod._parameters[name] = torch.nn.Parameter(p.clone(),
                                                               requires_grad=p.requires_grad)
                    replaced += 1
            for name, b in list(mod._buffers.items()):
                if b is not None and b.is_inference():
                    mod._buffers[name] = b.clone()
                    replaced += 1
    return replaced


def differentiable(*modules: Optional[torch.nn.Module], stage: str = "") -> int:
    """Make sure gradients can pass through ``modules``: weights made in inference mode
    are replaced by normal copies (:func:`normal_weights`); returns how many tensors were
    copied (0 for the pack's own loaders, which build normal weights).

    Weights can be inference tensors when the model is not the pack's: the bridge node
    (xMGIE SD Model From ComfyUI) shares ComfyUI's own tensors, and ComfyUI loads and
    moves its models inside ``torch.inference_mode()``. Autograd cannot save such tensors
    for the backward pass, so a gradient stage (null-text, MAG, A-STAR, identity
    guidance) copies them once, the first time it runs on that model: the module then
    holds its own copy, and memory for it is spent once (logged)."""
    copied, nbytes = 0, 0
    for m in modules:
        if m is None:
            continue
        before = sum(t.numel() * t.element_size() for t in _inference_tensors(m))
        n = normal_weights(m)
        copied, nbytes = copied + n, nbytes + (before if n else 0)
    if copied:
        log.info("%s: %d weight tensors (%.1f MB) were made in inference mode (a model whose "
                 "weights are ComfyUI's); copied once so gradients can pass through them",
                 stage or "gradient stage", copied, nbytes / 2**20)
    return copied


def _inference_tensors(module: torch.nn.Module):
    for mod in module.modules():
        for t in list(mod._parameters.values()) + list(mod._buffers.values()):
            if t is not None and t.is_inference():
                yield t


# --- the pack's loaded models --------------------------------------------------------------

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


def _module_device(module: torch.nn.Module) -> Optional[torch.device]:
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
    def device(self) -> Optional[torch.device]:
        return _module_device(self.module)

    def is_loaded(self) -> bool:
        return bool(_hooks.is_loaded(self))

    def on(self, dev: torch.device) -> bool:
        """Whether the module's weights are on ``dev`` ("cuda" matches "cuda:0")."""
        here = self.device
        return here is None or _same_device(here, torch.device(dev))

    def move(self, dev: torch.device) -> None:
        with loading():
            self.module.to(dev)
        normal_weights(self.module)

    def __repr__(self) -> str:
        state = "loaded" if self.is_loaded() else "offloaded"
        return (f"ManagedModule({self.name}, {self.nbytes / 2**20:.1f} MiB, {state}, "
                f"{self.load_device} / {self.offload_device})")


def _free_bytes(dev: torch.device) -> Optional[int]:
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

    def __init__(self, free_bytes: Callable[[torch.device], Optional[int]] = _free_bytes,
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
                entry.handle = _hooks.wrap_model(entry)
                if _hooks.load_on_register(entry):
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
                             if e.users == 0 and e.loaded and _same_device(e.load_device, dev)),
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


def _same_device(a: torch.device, b: torch.device) -> bool:
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
    except Exception:  # noqa: BLE001 - a backend without current_device(): index 0
        index = 0
    return f"{d.type}:{index}"


def place(x: torch.Tensor, device, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``x`` on ``device`` (and in ``dtype``): the tensor itself when it is there already,
    a dtype cast when only the dtype differs, a copy only when it lives elsewhere. Loops
    use this instead of ``x.to(device)`` so that the sync counter (bench/syncs.py) sees an
    explicit move only where one happens ("cuda" and "cuda:0" are the same device)."""
    if not _same_device(x.device, device):
        return x.to(device=device, dtype=dtype)
    return x if dtype is None or x.dtype == dtype else x.to(dtype=dtype)


_registry = ModelRegistry()


def registry() -> ModelRegistry:
    return _registry


def manage(owner: Any, modules: dict[str, torch.nn.Module],
           load_device: torch.device | str | None = None) -> Any:
    """Register the modules of a loaded model (``owner``: the object loaders return) and
    place them (standalone: on the compute device, or the CPU with offload-after-use;
    ComfyUI: on its offload device until :func:`use`). Returns ``owner``."""
    dev = torch.device(load_device) if load_device is not None else device()
    _registry.manage(owner, modules, dev, offload_device())
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
            _hooks.load_models(in_use)
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
