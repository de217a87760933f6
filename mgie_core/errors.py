"""Errors that tell the user what was wrong, what was expected and how to fix it."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path


class XMGIEError(Exception):
    """Base class for every error the library raises on purpose."""


class InputError(XMGIEError, ValueError):
    """Bad user input: names the input, says what was expected and how to fix it."""

    def __init__(self, name: str, problem: str, expected: str, fix: str = ""):
        self.input_name = name
        msg = f"{name}: {problem}; expected {expected}."
        if fix:
            msg += f" {fix}"
        super().__init__(msg)


class ModelNotFoundError(XMGIEError, FileNotFoundError):
    """A model file or folder could not be found in any searched location."""

    def __init__(self, what: str, name: str, searched: Sequence[Path | str],
                 published: str = "", hint: str = ""):
        self.what = what
        self.name = name
        self.searched = [str(p) for p in searched]
        lines = [f"{what} '{name}' was not found."]
        if self.searched:
            lines.append("Searched, in this order:")
            lines += [f"  - {p}" for p in self.searched]
        else:
            lines.append("No folder was configured to search.")
        if published:
            lines.append(f"Where to get it: {published}")
        if hint:
            lines.append(hint)
        super().__init__("\n".join(lines))


class ModelLoadError(XMGIEError, RuntimeError):
    """Files were found but do not make a usable model (missing parts, stub tokenizer...)."""

    def __init__(self, what: str, path: Path | str, problem: str, fix: str = ""):
        self.path = str(path)
        msg = f"{what} at {path} could not be loaded: {problem}."
        if fix:
            msg += f" {fix}"
        super().__init__(msg)


def names_list(items: Iterable[str]) -> str:
    items = list(items)
    return ", ".join(repr(i) for i in items) if items else "(none)"


class GradientError(XMGIEError, RuntimeError):
    """A gradient-based stage could not compute its gradient: it refuses to go on as if
    it had (a silent zero update would leave the image unchanged without a word)."""

    def __init__(self, stage: str, step: int, reason: str, fix: str = ""):
        self.stage = stage
        self.step = step
        msg = f"{stage}: no gradient at step {step}: {reason}."
        if fix:
            msg += f" {fix}"
        super().__init__(msg)


def why_no_gradient(loss, wrt) -> tuple[str, str]:
    """(reason, fix) for a loss that carries no gradient to ``wrt``: the usual causes are
    the caller's inference mode or no_grad, inference-tensor inputs or weights, or a loss
    that does not depend on ``wrt``."""
    import torch

    if torch.is_inference_mode_enabled():
        return ("it was computed inside torch.inference_mode()",
                "Run the optimisation inside mgie_core.grad_mode.autograd().")
    if not torch.is_grad_enabled():
        return ("gradients are disabled (torch.no_grad())",
                "Run the optimisation inside mgie_core.grad_mode.autograd().")
    if getattr(wrt, "is_inference", lambda: False)():
        return ("the optimised tensor is an inference tensor",
                "Pass it through mgie_core.grad_mode.autograd_input() first.")
    if not getattr(wrt, "requires_grad", False):
        return ("the optimised tensor does not require a gradient",
                "Call requires_grad_(True) on it inside the autograd block.")
    if not getattr(loss, "requires_grad", False):
        return ("the loss carries no autograd graph (it was computed under torch.no_grad() "
                "or inference mode, or from detached values)",
                "Compute it inside mgie_core.grad_mode.autograd() from the optimised tensor.")
    return ("the loss does not depend on the optimised tensor",
            "Check that the loss reads the model's output for this tensor.")
