"""LayerDiffusion's layered editing (docs/algorithms.md section 15): the object and the
background are described, optimised and fine-tuned as two layers of one photo.

The target caption is split into an object-attribute description and a background
description; their embeddings are optimised together with a masked noise loss (eq. 15),
mixed into one condition ``e_opt`` (eq. 16), and the UNet is fine-tuned on the photo with
a foreground loss inside the object and a background loss outside it (eqs. 17-18).
"""

from __future__ import annotations

import torch

from .errors import InputError
from .plan import EDGE_STOP, EditPlan, lower_words, replace_phrase

BACKGROUND_FALLBACK = "the background"


def _clean(text: str) -> str:
    text = " ".join(text.replace(" ,", ",").split())
    return text.strip(" ,;.")


def split_descriptions(plan: EditPlan) -> tuple[str, str]:
    """(object-attribute description, background description) of the plan's target.

    Object: "a photo of a <edit words> <object>" (the object left out when the edit words
    already name it). Background: the target prompt with the edit words and the object
    removed; when nothing but articles and prepositions is left, "the background"."""
    target = (plan.target_prompt or "").strip()
    if not target:
        raise InputError("plan.target_prompt", "is empty", "a caption of the edited image",
                         "Connect an edit plan that has a target prompt.")
    words = [w for w in plan.edit_words if lower_words(w)]
    obj = (plan.object or "").strip()
    if not words and not obj:
        raise InputError("plan", "has neither edit words nor an object",
                         "the words of the target prompt that carry the edit, or the "
                         "edited object", "Fill the plan's edit_words or object.")
    said = " ".join(words)
    if obj and not set(lower_words(obj)) <= set(lower_words(said)):
        said = f"{said} {obj}".strip()
    object_text = f"a photo of a {said}"
    background = target
    for phrase in sorted(words + ([obj] if obj else []), key=len, reverse=True):
        background, _ = replace_phrase(background, phrase, "")
    background = _clean(background)
    kept = [w for w in lower_words(background) if w not in EDGE_STOP
            and w not in ("photo", "picture", "image")]
    return object_text, (background if kept else BACKGROUND_FALLBACK)


def _latent_mask(mask: torch.Tensor, like: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """``mask`` as a float32 [B|1, 1, h, w] tensor broadcastable to ``like`` [B, C, h, w]."""
    if not isinstance(mask, torch.Tensor):
        raise InputError(name, f"is a {type(mask).__name__}", "a mask tensor")
    m = mask.float()
    while m.ndim < 4:
        m = m[None]
    if m.shape[-2:] != like.shape[-2:] or m.shape[1] not in (1, like.shape[1]):
        raise InputError(name, f"has shape {tuple(mask.shape)}",
                         f"a mask of the latent's size {tuple(like.shape[-2:])}",
                         "Resize the mask to the latent (latent_masks does it).")
    return m.to(like.device)


def _masked_mean_sq(residual: torch.Tensor, weight: torch.Tensor, name: str) -> torch.Tensor:
    w = weight.expand_as(residual)
    total = w.sum()
    if not bool(total > 0):
        raise InputError(name, "selects no latent position", "a region that is not empty",
                         "Check the object mask: it must neither be empty nor cover the "
                         "whole image.")
    return (w * residual.float() ** 2).sum() / total


def masked_noise_loss(eps: torch.Tensor, eps_pred: torch.Tensor,
                      mask: torch.Tensor) -> torch.Tensor:
    """Eq. 15's loss: the mean, over the mask's positions (and the latent's channels), of
    the squared noise residual ``(eps - eps_pred)^2``; float32."""
    m = _latent_mask(mask, eps)
    return _masked_mean_sq(eps.float() - eps_pred.float(), m, "mask")


def layered_losses(eps: torch.Tensor, eps_pred: torch.Tensor, mask_target: torch.Tensor,
                   mask_reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eqs. 17-18: (l_fg, l_bg). l_fg is the mean squared residual inside ``mask_target``
    (the object's region in the target), l_bg the mean squared residual outside
    ``mask_reference`` (everything but the reference's object). Each is normalised by
    its region's size so that the two are comparable whatever the object's area;
    float32."""
    r = eps.float() - eps_pred.float()
    mt = _latent_mask(mask_target, eps, "mask_target")
    mr = _latent_mask(mask_reference, eps, "mask_reference")
    return (_masked_mean_sq(r, mt, "mask_target"),
            _masked_mean_sq(r, 1.0 - mr, "mask_reference (its outside)"))


def mix_embeddings(e_a: torch.Tensor, e_b: torch.Tensor, alpha: float = 0.7) -> torch.Tensor:
    """Eq. 16: ``e_opt = alpha * e_a + (1 - alpha) * e_b`` (float32)."""
    if e_a.shape != e_b.shape:
        raise InputError("embeddings", f"have shapes {tuple(e_a.shape)} and "
                         f"{tuple(e_b.shape)}", "two embeddings of one shape",
                         "Mix the two outputs of one embedding optimisation.")
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise InputError("alpha", f"is {alpha}", "a weight between 0 and 1")
    return alpha * e_a.float() + (1.0 - alpha) * e_b.float()
