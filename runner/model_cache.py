"""Per-process model reuse and UNet pass counting for ``xmgie batch``.

A batch's :class:`~.batch.Session` (one per process, one per Ray worker) wraps every
loader node (CATEGORY ``xmgie/loaders``) so its outputs are cached, keyed by the loader's
inputs, the model folders, tiny mode and the device: models load once per process and
stay loaded across items and variants (``ModelCache.MAX_ENTRIES`` most recent sets are
kept). UNet passes are counted with hooks on the cached models' UNets.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import torch

from ..mgie_core import host, paths
from . import engine

LOADER_CATEGORY = "xmgie/loaders"


class _TapBackward(torch.autograd.Function):
    """Identity on a UNet input; its backward counts one backward pass through the UNet."""

    @staticmethod
    def forward(ctx, counter, x):
        ctx.counter = counter
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.counter.backward += 1
        return None, grad


class PassCounter:
    """UNet forward and backward passes of the models a process loaded.

    Forwards are counted by a forward pre-hook (so a forward stopped early, as MAG's
    truncated loss does, still counts); backwards by passing a grad-requiring input
    through :class:`_TapBackward`, one count per backward pass that reaches the UNet."""

    def __init__(self):
        self.forward = 0
        self.backward = 0
        self._watched: set[int] = set()
        self._handles: list = []

    def watch(self, value: Any) -> None:
        unet = getattr(value, "unet", None)
        if isinstance(unet, torch.nn.Module) and id(unet) not in self._watched:
            self._watched.add(id(unet))
            self._handles.append(unet.register_forward_pre_hook(self._pre, with_kwargs=True))

    def totals(self) -> tuple[int, int]:
        return self.forward, self.backward

    # UNet2DConditionModel.forward(sample, timestep, encoder_hidden_states, ...)
    _TAPPED = (("sample", 0), ("encoder_hidden_states", 2))

    def _pre(self, module, args, kwargs):
        self.forward += 1
        if not torch.is_grad_enabled():
            return None
        for name, position in self._TAPPED:  # the latent first (MAG), else the text (null-text)
            in_args = len(args) > position
            value = args[position] if in_args else kwargs.get(name)
            if isinstance(value, torch.Tensor) and value.requires_grad:
                tapped = _TapBackward.apply(self, value)
                if in_args:
                    return (*args[:position], tapped, *args[position + 1:]), kwargs
                return args, {**kwargs, name: tapped}
        return None

    def close(self) -> None:
        """Remove the hooks (the models stay as they were)."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._watched = [], set()


def _literal_key(value: Any, keep: list) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    keep.append(value)  # keeps the object alive, so its id is not reused
    return ("object", id(value))


class ModelCache:
    """Outputs of loader nodes, keyed by class, inputs and the model search settings.

    Linked inputs (e.g. the SD model a LoadMGIEUNet wraps) are keyed by object identity:
    they are themselves cached loader outputs, so the key is stable across items."""

    MAX_ENTRIES = 6

    def __init__(self, on_load: Callable[[Any], None] | None = None):
        self._entries: collections.OrderedDict = collections.OrderedDict()
        self.on_load = on_load
        self.loads: list[str] = []        # loader classes that loaded (missed) since reset
        self.hits: list[str] = []

    def reset_log(self) -> None:
        self.loads, self.hits = [], []

    def _key(self, class_type: str, kwargs: dict, keep: list) -> tuple:
        env = (str(paths.tiny_root()), tuple(str(p) for p in paths.models_dirs()),
               str(host.device()))
        items = tuple(sorted((k, _literal_key(v, keep)) for k, v in kwargs.items()
                             if k not in ("unique_id", "prompt", "extra_pnginfo")))
        return (class_type, items, env)

    def call(self, class_type: str, compute: Callable[[], Any], kwargs: dict) -> Any:
        keep: list = []
        key = self._key(class_type, kwargs, keep)
        if key in self._entries:
            self._entries.move_to_end(key)
            self.hits.append(class_type)
            return self._entries[key][0]
        result = compute()
        self.loads.append(class_type)
        self._entries[key] = (result, keep)
        while len(self._entries) > self.MAX_ENTRIES:
            self._entries.popitem(last=False)
        if self.on_load is not None:
            outputs = result.get("result", ()) if isinstance(result, dict) else result
            for value in outputs if isinstance(outputs, (tuple, list)) else (outputs,):
                self.on_load(value)
        return result

    def wrap(self, registry: engine.Registry) -> dict[str, type]:
        """A registry whose loader nodes answer from the cache."""
        return {ct: (self._cached_class(ct, cls)
                     if getattr(cls, "CATEGORY", "") == LOADER_CATEGORY else cls)
                for ct, cls in registry.items()}

    def _cached_class(self, class_type: str, cls: type) -> type:
        cache, fn_name = self, cls.FUNCTION
        original = getattr(cls, fn_name)

        def cached(self, **kwargs):
            return cache.call(class_type, lambda: original(self, **kwargs), kwargs)

        return type(cls.__name__, (cls,), {fn_name: cached, "__module__": cls.__module__,
                                           "__doc__": cls.__doc__})

