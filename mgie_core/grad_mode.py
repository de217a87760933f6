"""Autograd under a host's inference mode: the gradient-based stages and the loaders
get normal tensors even when the host runs them inside ``torch.inference_mode()``.

ComfyUI executes every node inside ``torch.inference_mode()`` (its ``execution.py``).
Tensors made there are inference tensors: autograd can neither record operations on them
nor save them for a backward pass, and ``torch.inference_mode(False)`` around the
optimisation alone does not help when the model's weights or the block's inputs are
inference tensors. So:

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
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator

import torch

log = logging.getLogger(__name__)


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


def differentiable(*modules: torch.nn.Module | None, stage: str = "") -> int:
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
