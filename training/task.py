"""What the engine trains: a task turns a batch of edit pairs into loss terms.

A task owns the models (frozen and trainable) and knows the paper's objective; the engine
owns everything generic (devices, accumulation, precision, optimisers, checkpoints,
logging). The engine never looks inside a task's model.

The batch (built by :mod:`.data`'s collate) is a dict:

    source                 float32 [B,3,H,W] in 0..1, the photo before the edit
    target                 float32 [B,3,H,W] in 0..1, the ground-truth edit
    mask                   float32 [B,1,H,W] in {0,1}, the edited region (all ones
                           where the pair has no mask; see has_mask)
    has_mask               bool [B]
    instruction            list[str], "make the carpet yellow"
    source_prompt          list[str] ("" where unknown)
    target_prompt          list[str] ("" where unknown)
    expressive_instruction list[str] ("" where unknown)
    edit_words             list[list[str]] (the words that carry the edit; [] where unknown)
    id                     list[str]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from torch import nn

from ..mgie_core.errors import InputError

M = TypeVar("M", bound=nn.Module)


class TrainTask(Protocol):
    """The engine's view of a task.

    ``model.forward(batch)`` returns a dict of float32 scalar tensors: ``"loss"`` (the
    weighted total the generator's optimiser minimises) and every unweighted term
    (``"l_recon"``, ``"l_id"``, ...), which the engine logs. When ``critic`` is not None
    the dict also holds ``"real"`` and ``"fake"`` (what the critic compares; ``fake``
    still attached to the generator's graph) and the engine adds ``weights["adv"]`` times
    :meth:`generator_adversarial` to the loss, then takes the critic's own step on
    :meth:`critic_loss`.
    """

    name: str                      # "xmgie" or "mgie"
    model: nn.Module               # everything the generator step runs; frozen parts
                                   # have requires_grad False
    critic: nn.Module | None       # the discriminator, or None
    weights: dict[str, float]      # loss weights, e.g. {"recon": 1.0, "adv": 0.1, "id": 0.5}

    def generator_adversarial(self, critic: nn.Module, fake: torch.Tensor) -> torch.Tensor:
        """The generator's adversarial term on ``fake`` (critic given unwrapped, its
        parameters not trained by this term)."""

    def critic_loss(self, critic: nn.Module, real: torch.Tensor, fake: torch.Tensor
                    ) -> torch.Tensor:
        """The critic's loss (``fake`` detached by the engine)."""

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Only what trains, by name (saved as safetensors in each checkpoint)."""

    def load_trainable_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Put back what :meth:`trainable_state` returned (exact resume)."""

    def validate(self, model: nn.Module, batches: list[dict[str, Any]]) -> dict[str, float]:
        """Validation metrics on held-out pairs (``val_`` prefixed names)."""

    def export(self, model: nn.Module, folder: Path) -> None:
        """Write ``folder`` (the run's ``final/``): what the nodes load."""


# --- what both tasks share -----------------------------------------------------------------

class NoCritic:
    """The two critic methods of a task whose objective has no adversarial term (MGIE's,
    MMIG's): ``critic`` is None, so the engine never calls them."""

    name: str
    critic = None

    def generator_adversarial(self, critic: nn.Module, fake: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{self.name}'s objective has no adversarial term")

    def critic_loss(self, critic: nn.Module, real: torch.Tensor, fake: torch.Tensor
                    ) -> torch.Tensor:
        raise NotImplementedError(f"{self.name}'s objective has no adversarial term")


def unwrap(model: nn.Module, cls: type[M]) -> M:
    """The task's own module ``cls`` inside what the engine hands back (DDP's and
    accelerate's ``.module``, torch.compile's ``._orig_mod`` wrappers peeled off)."""
    seen = model
    while not isinstance(model, cls):
        inner = getattr(model, "module", None)
        if inner is None:
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            raise TypeError(f"expected the task's {cls.__name__}, got {type(seen).__name__}")
        model = inner
    return model


def load_trainable_state(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Copy ``state`` (a checkpoint's trained tensors, by parameter name) into the
    parameters of ``module`` that require gradients; every one must be there with its
    shape, and nothing else (``what`` names the model in the error: "this xMGIE run")."""
    own = {n: p for n, p in module.named_parameters() if p.requires_grad}
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    bad = [n for n in own if n in state and tuple(state[n].shape) != tuple(own[n].shape)]
    if missing or extra or bad:
        raise InputError("checkpoint", f"does not fit {what} ({len(missing)} trained tensors "
                         f"missing, {len(extra)} unexpected, {len(bad)} of another shape; "
                         f"e.g. {(missing + extra + bad)[:3]})",
                         "a checkpoint of a run with the same model settings",
                         "Resume with the config that wrote it, or start a new run.")
    with torch.no_grad():
        for n, p in own.items():
            p.copy_(state[n].to(p.device, p.dtype))
