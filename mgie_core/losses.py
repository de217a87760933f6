"""The training objectives of xMGIE and MGIE as plain functions (docs/algorithms.md §14).

One idea: every loss term the papers name is a pure function of tensors that returns a
float32 scalar, whatever precision the model ran in, so the optimised quantity is never
rounded to half precision and each term can be checked against a hand computation.

xMGIE:  L = 1.0 * L_recon + 0.1 * L_adv + 0.5 * L_id        (:func:`xmgie_total`)
MGIE:   L_all = L_ins + 0.5 * L_edit                          (:func:`mgie_total`)

Reductions: the functions average by default (``"mean"``, what MGIE's release and
InstructPix2Pix train with: the loss scale does not grow with the sequence length or the
image size). MGIE's paper states its worked example as sums (11 tokens of cross-entropy
0.2 give L_ins = 2.2); ``reduction="sum"`` reproduces it exactly.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from .errors import InputError

GAN_KINDS = ("hinge", "lsgan", "vanilla")
XMGIE_WEIGHTS = {"recon": 1.0, "adv": 0.1, "id": 0.5}   # the xMGIE paper's lambdas
MGIE_EDIT_WEIGHT = 0.5                                   # MGIE: L_ins + 0.5 L_edit
IGNORE_INDEX = -100                                      # label of a token with no loss
REDUCTIONS = ("mean", "sum")


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 else x.float()


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise InputError("reduction", f"is {reduction!r}", " or ".join(REDUCTIONS))


def _check_kind(kind: str) -> None:
    if kind not in GAN_KINDS:
        raise InputError("kind", f"is {kind!r}", "an adversarial loss: " + ", ".join(GAN_KINDS))


def _same_shape(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise InputError(name, f"compares shapes {tuple(a.shape)} and {tuple(b.shape)}",
                         "two tensors of the same shape")


# -- xMGIE ---------------------------------------------------------------------------
def recon_l1(pred: torch.Tensor, target: torch.Tensor,
             mask: torch.Tensor | None = None) -> torch.Tensor:
    """L_recon: mean absolute difference between the edited image and the ground truth.

    ``mask`` (broadcastable to ``pred``, e.g. [B,1,H,W] against [B,3,H,W]) weights each
    element; the result is then the weighted mean sum(w |d|) / sum(w), so a term over a
    small region has the same scale as one over the whole image. A mask that is zero
    everywhere gives 0 (still attached to ``pred``'s graph)."""
    _same_shape("recon_l1", pred, target)
    d = (_f32(pred) - _f32(target)).abs()
    if mask is None:
        return d.mean()
    w = _f32(mask).expand_as(d)
    # no host sync on the mask's sum: an all-zero mask divides 0 by the floor
    return (d * w).sum() / w.sum().clamp_min(torch.finfo(torch.float32).tiny)


def adversarial_generator(fake_logits: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """L_adv for the generator: how far the critic is from calling the edits real.

    hinge: -mean(D(fake)); lsgan: mean((D(fake) - 1)^2); vanilla (the non-saturating
    GAN loss, binary cross-entropy with logits against label 1): mean(softplus(-D(fake)))."""
    _check_kind(kind)
    f = _f32(fake_logits)
    if kind == "hinge":
        return -f.mean()
    if kind == "lsgan":
        return (f - 1).square().mean()
    return F.binary_cross_entropy_with_logits(f, torch.ones_like(f))


def adversarial_critic(real_logits: torch.Tensor, fake_logits: torch.Tensor,
                       kind: str = "hinge") -> torch.Tensor:
    """The critic's loss: real patches towards "real", the (detached) edits towards "fake".

    The sum of a real and a fake term, each a mean over its logits:
    hinge: mean(relu(1 - D(real))) + mean(relu(1 + D(fake)));
    lsgan: mean((D(real) - 1)^2) + mean(D(fake)^2);
    vanilla: BCE-with-logits(D(real), 1) + BCE-with-logits(D(fake), 0).
    (pix2pix halves its critic's loss to slow the critic down; here that is the
    critic's learning rate's job, so the loss stays the textbook sum.)"""
    _check_kind(kind)
    r, f = _f32(real_logits), _f32(fake_logits)
    if kind == "hinge":
        return F.relu(1 - r).mean() + F.relu(1 + f).mean()
    if kind == "lsgan":
        return (r - 1).square().mean() + f.square().mean()
    return (F.binary_cross_entropy_with_logits(r, torch.ones_like(r))
            + F.binary_cross_entropy_with_logits(f, torch.zeros_like(f)))


def identity_l2(e_edit: torch.Tensor, e_gt: torch.Tensor) -> torch.Tensor:
    """L_id: squared L2 distance ||e_edit - e_gt||^2 between the frozen identity
    encoder's embeddings of the edit and of the ground truth, summed over the embedding
    and averaged over the batch ([B,D] or [D])."""
    _same_shape("identity_l2", e_edit, e_gt)
    d = (_f32(e_edit) - _f32(e_gt)).square()
    if d.ndim == 1:
        return d.sum()
    return d.flatten(1).sum(1).mean()


def xmgie_total(terms: Mapping[str, torch.Tensor],
                weights: Mapping[str, float] | None = None) -> torch.Tensor:
    """L = sum over the given terms of weight * term (default weights: the paper's
    recon 1.0, adv 0.1, id 0.5).

    A term may be left out (the training engine adds the adversarial term itself, after
    the critic has scored the edits); a term with no weight is an error, not a silent 0."""
    weights = XMGIE_WEIGHTS if weights is None else weights
    if not terms:
        raise InputError("terms", "are empty", "at least one of " + ", ".join(weights))
    unknown = [k for k in terms if k not in weights]
    if unknown:
        raise InputError("terms", f"include {unknown} with no weight",
                         "terms among " + ", ".join(weights),
                         "Give the term a weight (loss: in the training config).")
    total = None
    for k, v in terms.items():
        t = float(weights[k]) * _f32(v)
        total = t if total is None else total + t
    return total


# -- MGIE ----------------------------------------------------------------------------
def instruction_ce(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean",
                   *, shift: bool = False, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """L_ins: token cross-entropy of the expressive instruction.

    ``logits`` [..., T, V], ``labels`` [..., T]; a label ``ignore_index`` (-100, the
    prompt and padding) carries no loss. ``logits[..., t, :]`` must already predict
    ``labels[..., t]``: with ``shift=True`` the function does the causal shift itself
    (logits at t predict the token at t + 1, as a causal LM's raw output does).
    "mean" averages over the counted tokens (MGIE's release), "sum" adds them (the
    paper's worked example). No counted token gives 0, still attached to the graph."""
    _check_reduction(reduction)
    if shift:
        logits, labels = logits[..., :-1, :], labels[..., 1:]
    if logits.shape[:-1] != labels.shape:
        raise InputError("instruction_ce", f"has logits {tuple(logits.shape)} for labels "
                         f"{tuple(labels.shape)}", "logits [..., T, V] and labels [..., T]")
    flat = _f32(logits).reshape(-1, logits.shape[-1])
    y = labels.reshape(-1)
    per_token = F.cross_entropy(flat, y, ignore_index=ignore_index, reduction="none")
    if reduction == "sum":
        return per_token.sum()
    # every ignored entry is 0; with no counted token this is 0 / 1 (no host sync)
    return per_token.sum() / (y != ignore_index).sum().clamp_min(1)


def edit_noise_mse(pred: torch.Tensor, noise: torch.Tensor,
                   reduction: str = "mean") -> torch.Tensor:
    """L_edit: squared error between the UNet's noise prediction and the true noise,
    averaged ("mean", MGIE's and InstructPix2Pix's training) or summed ("sum", the
    paper's worked example) over every element."""
    _check_reduction(reduction)
    _same_shape("edit_noise_mse", pred, noise)
    d = (_f32(pred) - _f32(noise)).square()
    return d.mean() if reduction == "mean" else d.sum()


def mgie_total(l_ins: torch.Tensor, l_edit: torch.Tensor,
               weight: float = MGIE_EDIT_WEIGHT) -> torch.Tensor:
    """L_all = L_ins + weight * L_edit (MGIE: weight 0.5)."""
    return _f32(l_ins) + float(weight) * _f32(l_edit)
