"""LayerDiffusion's layered editing (docs/algorithms.md section 15): the object and the
background are described, optimised and fine-tuned as two layers of one photo.

The target caption is split into an object-attribute description and a background
description; their embeddings are optimised together with a masked noise loss (eq. 15),
mixed into one condition ``e_opt`` (eq. 16), and the UNet is fine-tuned on the photo with
a foreground loss inside the object and a background loss outside it (eqs. 17-18).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time

import torch

from . import grad_mode, host, sampler
from .attention import Branch
from .control import Control, SamplingRun, check_controls
from .diffusion import encode_prompt, unet_eps
from .errors import GradientError, InputError, why_no_gradient
from .images import Fit, check_mask
from .inversion import invert
from .models.sd import SDModel, with_unet
from .plan import EDGE_STOP, WORD_RE, EditPlan, lower_words
from .report import UpdateReport
from .sampler import EditResult

log = logging.getLogger(__name__)

BACKGROUND_FALLBACK = "the background"
_PREPOSITIONS = ("in", "on", "at", "by", "under", "near", "behind", "beside", "inside",
                 "against", "over", "with")


def _phrase_pattern(phrase: str) -> str:
    """Whole words of ``phrase``, any separators between them."""
    body = r"[^A-Za-z0-9]+".join(re.escape(w) for w in WORD_RE.findall(phrase))
    return rf"(?<![A-Za-z0-9]){body}(?![A-Za-z0-9])"


def _clean(text: str) -> str:
    text = " ".join(text.replace(" ,", ",").split())
    return text.strip(" ,;.")


def _object_span(target: str, words: list[str], obj: str) -> tuple[int, int] | None:
    """Where the object phrase sits in ``target``, widened leftwards over the edit words
    just before it ("a yellow carpet": the span of "yellow carpet"); None when the
    target does not name the object."""
    m = re.search(_phrase_pattern(obj), target, flags=re.IGNORECASE) if obj else None
    if m is None:
        return None
    start, end = m.start(), m.end()
    for w in words:                  # an edit word that holds the object ("yellow carpet")
        for c in re.finditer(_phrase_pattern(w), target, flags=re.IGNORECASE):
            if c.start() <= start and c.end() >= end:
                start, end = c.start(), c.end()
    widened = True
    while widened:
        widened = False
        for w in words:
            left = re.search(rf"{_phrase_pattern(w)}[^A-Za-z0-9]+$", target[:start],
                             flags=re.IGNORECASE)
            if left:
                start, widened = left.start(), True
    return start, end


def split_descriptions(plan: EditPlan) -> tuple[str, str]:
    """(object-attribute description, background description) of the plan's target.

    The object-attribute phrase is the object as the target prompt names it with the
    edit words just before it ("yellow carpet"); without the object in the target, the
    edit words followed by the object. Object description: "a photo of a <phrase>"
    ("an" before a vowel).
    Background description: the target prompt without that phrase (and its article), so
    edit words elsewhere ("on the beach") stay with the background; a preposition left
    without its object gets "the scene"; when only articles and prepositions are left,
    "the background"."""
    target = " ".join((plan.target_prompt or "").split())
    if not target:
        raise InputError("plan.target_prompt", "is empty", "a caption of the edited image",
                         "Connect an edit plan that has a target prompt.")
    words = [w for w in plan.edit_words if lower_words(w)]
    obj = (plan.object or "").strip()
    if not words and not obj:
        raise InputError("plan", "has neither edit words nor an object",
                         "the words of the target prompt that carry the edit, or the "
                         "edited object", "Fill the plan's edit_words or object.")
    span = _object_span(target, words, obj)
    if span is not None:
        phrase = target[span[0]:span[1]]
        background = re.sub(r"(?:\b(?:a|an|the)\s+)?$", "", target[:span[0]],
                            flags=re.IGNORECASE) + " " + target[span[1]:]
    else:
        said = " ".join(words)
        phrase = f"{said} {obj}".strip() if obj and not set(lower_words(obj)) <= set(
            lower_words(said)) else said
        background = target
        for w in sorted(words, key=len, reverse=True):
            background = re.sub(rf"(?:\b(?:a|an|the)\s+)?{_phrase_pattern(w)}", " ",
                                background, flags=re.IGNORECASE)
    background = " ".join(background.split())
    # a preposition left without its object ("a photo of in a room")
    background = re.sub(rf"\b(of)(?=\s+(?:{'|'.join(_PREPOSITIONS)})\b|\s*$)",
                        r"\1 the scene", background, flags=re.IGNORECASE)
    background = _clean(background)
    kept = [w for w in lower_words(background) if w not in EDGE_STOP
            and w not in ("photo", "picture", "image", "scene")]
    article = "an" if phrase[:1].lower() in "aeiou" else "a"
    return f"a photo of {article} {phrase}", (background if kept else BACKGROUND_FALLBACK)


def _latent_mask(mask: torch.Tensor, like: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """``mask`` ([h,w], [B,h,w] or [B,1|C,h,w]) as a float32 [B|1, 1|C, h, w] tensor
    broadcastable to ``like`` [B, C, h, w]."""
    if not isinstance(mask, torch.Tensor):
        raise InputError(name, f"is a {type(mask).__name__}", "a mask tensor")
    m = mask.float()
    if m.ndim == 2:
        m = m[None, None]
    elif m.ndim == 3:
        m = m[:, None]
    if (m.ndim != 4 or m.shape[-2:] != like.shape[-2:] or m.shape[1] not in (1, like.shape[1])
            or m.shape[0] not in (1, like.shape[0])):
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


# --- masks at the latent's resolution --------------------------------------------------------

def cells(mask: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """A mask [B,H,W] (pixels, or already cells) as {0,1} float32 [B,1,h,w] latent cells:
    a cell is inside when any of its pixels is above 0.5 (max-pooled), so the object's
    region covers the whole object at every resolution (L_fg sees all of it, and L_bg
    none of it)."""
    m = (mask.float() > 0.5).float()
    h, w = int(hw[0]), int(hw[1])
    if tuple(m.shape[-2:]) != (h, w):
        m = torch.nn.functional.adaptive_max_pool2d(m[:, None], (h, w))[:, 0]
    return m[:, None]


def latent_mask(mask: torch.Tensor, latent_hw: tuple[int, int], name: str = "mask", *,
                fit: Fit | None = None, vae_scale: int = 8) -> torch.Tensor:
    """A MASK [B,H,W] (the photo's size, the fitted photo's, or the latent's) as the {0,1}
    float32 [B,1,h,w] mask of the latent (:func:`cells`), fitted as the photo was
    (``fit``; ``vae_scale``: pixels per latent cell). Any other size is an error. An
    empty mask, or one that covers every latent cell, is an error naming ``name`` (eq. 18
    needs an outside)."""
    m = check_mask(name, mask, allow_empty=False)
    h, w = int(latent_hw[0]), int(latent_hw[1])
    sizes = {(h, w), (h * vae_scale, w * vae_scale)} | ({fit.size} if fit else set())
    H, W = m.shape[-2:]
    if (H, W) not in sizes:
        photo = fit.size if fit is not None else (h * vae_scale, w * vae_scale)
        raise InputError(name, f"is {W}x{H} pixels but the photo is {photo[1]}x{photo[0]}",
                         "a mask of the photo's size",
                         "Make the mask from this photo, or resize it to the photo.")
    if fit is not None:
        m = fit.mask(m)
    m = cells(m, (h, w))
    if bool((m.flatten(1).sum(1) == h * w).all()):
        raise InputError(name, "covers the whole image", "an object region that leaves "
                         "some background (the background loss works outside it)",
                         "Use the object's mask, not a full one.")
    return m


# --- noising the photo's latent ---------------------------------------------------------------

def _alphas(sd: SDModel) -> torch.Tensor:
    return torch.as_tensor(sd.scheduler.alphas_cumprod, dtype=torch.float32)


def _draw(sd: SDModel, z0: torch.Tensor, gen: torch.Generator
          ) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(t, eps, z_t): t uniform over the training timesteps, eps ~ N(0, I), z_t the
    photo's latent noised to t (DDPM's forward process), on the latent's device."""
    abar = _alphas(sd)
    t = int(torch.randint(0, len(abar), (1,), generator=gen))
    eps = torch.randn(z0.shape, generator=gen).to(z0.device)
    a = float(abar[t])
    return t, eps, a ** 0.5 * z0 + (1 - a) ** 0.5 * eps


def _check_latents(z0: torch.Tensor, name: str = "image_latents") -> torch.Tensor:
    if not isinstance(z0, torch.Tensor) or z0.ndim != 4 or z0.shape[1] != 4:
        raise InputError(name, f"has shape {tuple(getattr(z0, 'shape', ()))}",
                         "SD latents [B,4,h,w] (scaled, as vae.encode_photo gives)")
    return z0


def _check_embedding(e: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(e, torch.Tensor) or e.ndim != 3:
        raise InputError(name, f"has shape {tuple(getattr(e, 'shape', ()))}",
                         "a text embedding [1, tokens, width]")
    return e


def _finite_grad(params: list[torch.Tensor], loss: torch.Tensor, stage: str, step: int
                 ) -> bool:
    for p in params:
        if p.grad is None:
            raise GradientError(stage, step, *why_no_gradient(loss, p))
    return bool(torch.stack([torch.isfinite(p.grad).all() for p in params]).all())


def _step(opt: torch.optim.Optimizer, loss: torch.Tensor, params: list[torch.Tensor],
          stage: str, k: int, report: UpdateReport) -> None:
    """One optimiser step of ``stage`` on ``loss``, counted in ``report``: applied, or
    skipped when a gradient is not finite (a loss without a graph raises)."""
    if not loss.requires_grad:
        raise GradientError(stage, k, *why_no_gradient(loss, params[0]))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if _finite_grad(params, loss, stage, k):
        opt.step()
        report.applied(stage)
    else:
        log.warning("%s: non-finite gradient at step %d; skipped", stage, k)
        report.skipped(stage, "non-finite gradient")


# --- eq. 15: the two embeddings --------------------------------------------------------------

EMBEDDINGS = "LayerDiffusion embeddings"     # the stage's name in reports and errors
FINETUNE = "LayerDiffusion LoRA"
EVAL_DRAWS = 4     # fixed (t, eps) draws on which a stage's loss is reported before/after


def joined_condition(e_a: torch.Tensor, e_b: torch.Tensor, pooled_rows: int = 0
                     ) -> torch.Tensor:
    """Eq. 15's condition ``[e_a, e_b]``: the two embeddings' token rows one after the
    other. On SDXL (``pooled_rows`` 1: each embedding ends with its pooled row, see
    :func:`mgie_core.diffusion.split_condition`) the token rows are joined and one pooled
    row follows, the mean of the two."""
    if not pooled_rows:
        return torch.cat([e_a, e_b], 1)
    return torch.cat([e_a[:, :-1], e_b[:, :-1], 0.5 * (e_a[:, -1:] + e_b[:, -1:])], 1)


def _pooled_rows(sd: SDModel) -> int:
    return 1 if getattr(sd, "text_encoder_2", None) is not None else 0


def embedding_loss(sd: SDModel, z0: torch.Tensor, mask: torch.Tensor, e_a: torch.Tensor,
                   e_b: torch.Tensor, *, draws: int = EVAL_DRAWS, seed: int = 1234
                   ) -> float:
    """Eq. 15's loss with the condition ``[e_a, e_b]``, averaged over ``draws`` fixed
    (t, eps) draws (the same for every call with one ``seed``): how a stage's report
    compares before and after."""
    gen = torch.Generator("cpu").manual_seed(seed)
    cond = joined_condition(e_a, e_b, _pooled_rows(sd))
    total = 0.0
    with torch.no_grad():
        for _ in range(draws):
            t, eps, zt = _draw(sd, z0, gen)
            total += float(masked_noise_loss(eps, unet_eps(sd, zt, t, cond), mask))
    return total / draws


def optimise_embeddings(sd: SDModel, image_latents: torch.Tensor, mask: torch.Tensor,
                        e_a: torch.Tensor, e_b: torch.Tensor, *, steps: int = 500,
                        lr: float = 1e-3, seed: int = 0,
                        report: UpdateReport | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, UpdateReport]:
    """Eq. 15: Adam on the object-attribute and background embeddings together, the
    UNet frozen, with the condition their concatenation along the token axis
    ``[e_a, e_b]`` (1, 2 x 77, D) and the masked noise loss inside the object's latent
    mask ``mask`` ([B,1,h,w] from :func:`latent_mask`), one (t, eps) draw per step.

    The embeddings and the loss are float32 whatever the model's precision; a step
    whose gradient is not finite is skipped and counted. Returns (ê_a, ê_b, report):
    the report counts the steps applied and notes the loss before and after on fixed
    draws (:func:`embedding_loss`)."""
    report = report if report is not None else UpdateReport()
    z0 = _check_latents(image_latents)
    _check_embedding(e_a, "e_a"), _check_embedding(e_b, "e_b")
    if e_a.shape != e_b.shape:
        raise InputError("embeddings", f"have shapes {tuple(e_a.shape)} and "
                         f"{tuple(e_b.shape)}", "two prompt encodings of one shape")
    _positive("steps", steps), _positive("lr", lr)
    grad_mode.differentiable(sd.unet, stage=EMBEDDINGS)
    with grad_mode.autograd():
        z0, mask, e_a, e_b = grad_mode.autograd_input((z0, mask, e_a, e_b))
        z0 = z0.to(sd.device, torch.float32)
        m = _latent_mask(mask, z0)
        ea = e_a.detach().to(sd.device, torch.float32).clone().requires_grad_(True)
        eb = e_b.detach().to(sd.device, torch.float32).clone().requires_grad_(True)
        before = embedding_loss(sd, z0, m, ea.detach(), eb.detach())
        opt = torch.optim.Adam([ea, eb], lr=lr)
        pooled = _pooled_rows(sd)
        gen = torch.Generator("cpu").manual_seed(int(seed))
        with host.progress(steps, EMBEDDINGS) as bar:
            for k in range(steps):
                t, eps, zt = _draw(sd, z0, gen)
                cond = joined_condition(ea, eb, pooled)
                loss = masked_noise_loss(eps, unet_eps(sd, zt, t, cond), m)
                _step(opt, loss, [ea, eb], EMBEDDINGS, k, report)
                bar.update()              # checks the host's interruption
        ea, eb = ea.detach(), eb.detach()
        after = embedding_loss(sd, z0, m, ea, eb)
    report.note(f"{EMBEDDINGS}: eq. 15 loss {before:.4f} -> {after:.4f} "
                f"(mean of {EVAL_DRAWS} fixed draws)")
    report.log(log, "layered")
    return ea, eb, report


def _positive(name: str, value) -> None:
    if not value > 0:
        raise InputError(name, f"is {value}", "a positive number")


# --- eqs. 17-18: per-image LoRA fine-tuning ----------------------------------------------

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")   # the attention projections


def layered_eval(sd: SDModel, z0: torch.Tensor, mask_target: torch.Tensor,
                 mask_reference: torch.Tensor, e_opt: torch.Tensor, *,
                 draws: int = EVAL_DRAWS, seed: int = 1234) -> tuple[float, float]:
    """(L_fg, L_bg) of eqs. 17-18 under ``e_opt``, averaged over ``draws`` fixed (t, eps)
    draws: how the fine-tuning's report compares the model before and after."""
    gen = torch.Generator("cpu").manual_seed(seed)
    fg = bg = 0.0
    z0 = z0.to(sd.device, torch.float32)
    with torch.no_grad():
        for _ in range(draws):
            t, eps, zt = _draw(sd, z0, gen)
            a, b = layered_losses(eps, unet_eps(sd, zt, t, e_opt), mask_target, mask_reference)
            fg, bg = fg + float(a), bg + float(b)
    return fg / draws, bg / draws


def finetune_lora(sd: SDModel, image_latents: torch.Tensor, mask: torch.Tensor,
                  e_opt: torch.Tensor, *, mask_target: torch.Tensor | None = None,
                  steps: int = 300, lr: float = 1e-4, rank: int = 4,
                  time_budget_s: float = 0.0, seed: int = 0,
                  report: UpdateReport | None = None) -> tuple[SDModel, UpdateReport]:
    """Eqs. 17-18 on one photo: peft LoRA adapters (rank ``rank``, on the UNet's
    attention projections) trained with Adam on ``L_fg + L_bg`` under the mixed
    condition ``e_opt``, one (t, eps) draw per step. ``mask`` is the reference's object
    (M_r: L_bg works outside it); ``mask_target`` the object's region in the target
    (M_t: L_fg works inside it; default ``mask``). Both are latent masks
    ([B,1,h,w], :func:`latent_mask`).

    The UNet trained is a copy of ``sd``'s: the adapters are merged into the copy's
    weights at the end and a new SD model is returned (:func:`models.sd.with_unet`,
    sharing the VAE and text encoder); ``sd`` is unchanged. The adapters, their
    gradients and the losses are float32 whatever the model's precision. Stops early
    once ``time_budget_s`` seconds have passed (0: no limit) and says so in the report,
    which counts the steps applied and notes both losses before and after on fixed
    draws (:func:`layered_eval`)."""
    import copy

    from peft import LoraConfig

    report = report if report is not None else UpdateReport()
    z0 = _check_latents(image_latents)
    _check_embedding(e_opt, "e_opt")
    _positive("steps", steps), _positive("lr", lr), _positive("rank", rank)
    if time_budget_s < 0:
        raise InputError("time_budget_s", f"is {time_budget_s}", "0 (no limit) or more")
    with grad_mode.loading():     # normal tensors even inside a host's inference mode
        unet = copy.deepcopy(sd.unet)
        grad_mode.differentiable(unet, stage=FINETUNE)
        unet.add_adapter(LoraConfig(r=int(rank), lora_alpha=int(rank),
                                    target_modules=list(LORA_TARGETS), init_lora_weights=True))
        params = [p for p in unet.parameters() if p.requires_grad]
        for p in params:          # the adapters train in float32 on a half-precision UNet
            p.data = p.data.float()
    tuned = dataclasses.replace(sd, unet=unet)
    stopped = None
    with grad_mode.autograd():
        z0, mask, e_opt = grad_mode.autograd_input((z0, mask, e_opt))
        mask_target = grad_mode.autograd_input(mask_target)
        z0 = z0.to(sd.device, torch.float32)
        m_r = _latent_mask(mask, z0, "mask")
        m_t = m_r if mask_target is None else _latent_mask(mask_target, z0, "mask_target")
        cond = e_opt.detach().to(sd.device, torch.float32)
        before = layered_eval(sd, z0, m_t, m_r, cond)
        opt = torch.optim.Adam(params, lr=lr)
        gen = torch.Generator("cpu").manual_seed(int(seed))
        start = time.monotonic()
        with host.progress(steps, FINETUNE) as bar:
            for k in range(steps):
                if time_budget_s and time.monotonic() - start > time_budget_s:
                    stopped = k
                    break
                t, eps, zt = _draw(sd, z0, gen)
                l_fg, l_bg = layered_losses(eps, unet_eps(tuned, zt, t, cond), m_t, m_r)
                loss = l_fg + l_bg
                _step(opt, loss, params, FINETUNE, k, report)
                bar.update()              # checks the host's interruption
    with grad_mode.loading():
        unet.fuse_lora()
        unet.unload_lora()
        unet.requires_grad_(False).eval()
        if sd.dtype != torch.float32:
            unet.to(dtype=sd.dtype)
    out = with_unet(sd, unet, "layered LoRA")
    after = layered_eval(out, z0, m_t, m_r, cond)
    if stopped is not None:
        report.note(f"{FINETUNE}: the time budget ({time_budget_s:g} s) ended the "
                    f"fine-tuning after {stopped} of {steps} steps")
    report.note(f"{FINETUNE}: L_fg {before[0]:.4f} -> {after[0]:.4f}, L_bg {before[1]:.4f} "
                f"-> {after[1]:.4f} (mean of {EVAL_DRAWS} fixed draws)")
    report.log(log, "layered")
    return out, report


# --- the edit: sampling with the fine-tuned model ----------------------------------------

class LayeredGuidance(Control):
    """The iterative guidance of the layered edit, as a sampler control: after each of
    the first ``fraction`` of the steps, the edit latent is recomposed from its two
    layers, the object layer (the edit branch inside the object's mask) over the
    background layer (the reconstruction branch, which follows the photo's trajectory,
    outside it): ``z_edit <- M z_edit + (1 - M) z_rec``, the mask resized to the
    latent as for the fine-tuning (:func:`cells`: the object layer holds all of the
    object). It optimises nothing, so it counts no updates."""

    name = "layered guidance"

    def __init__(self, fraction: float = 1.0, mask: torch.Tensor | None = None):
        if not 0.0 <= float(fraction) <= 1.0:
            raise InputError("guided_fraction", f"is {fraction}", "a share between 0 and 1")
        self.fraction, self.mask = float(fraction), mask
        self._m: torch.Tensor | None = None
        self._n = 0

    def setup(self, run: SamplingRun) -> None:
        m = self.resolve_mask(run, self.mask, required=True,
                              use="the object (its layer is composed over the photo's)")
        z = run.latents[Branch.EDIT]
        self._m = cells(m, tuple(z.shape[-2:])).to(z.device)
        self._n = int(round(self.fraction * run.schedule.num_steps))

    def after_step(self, run: SamplingRun, i: int) -> None:
        if i >= self._n or Branch.REC not in run.latents:
            return
        m = self._m
        run.latents[Branch.EDIT] = m * run.latents[Branch.EDIT] + (1 - m) * run.latents[
            Branch.REC]

    def teardown(self, run: SamplingRun) -> None:
        self._m = None


def target_condition(sd: SDModel, target_prompt: str, e_opt: torch.Tensor,
                     target_weight: float = 0.7) -> torch.Tensor:
    """The edit branch's condition: ``w e_tgt + (1 - w) e_opt``, Imagic's interpolation
    between the target prompt's encoding and the optimised condition (the fine-tuned
    model reproduces the photo under ``e_opt``; ``w`` moves it toward the target)."""
    w = float(target_weight)
    if not 0.0 <= w <= 1.0:
        raise InputError("target_weight", f"is {w}", "a weight between 0 and 1")
    e_tgt = encode_prompt(sd, target_prompt, "target_prompt")
    if tuple(e_opt.shape) != tuple(e_tgt.shape):
        raise InputError("e_opt", f"has shape {tuple(e_opt.shape)}",
                         f"a prompt's encoding {tuple(e_tgt.shape)} (the mix of eq. 16)")
    return w * e_tgt + (1 - w) * e_opt.to(e_tgt.device, torch.float32)


def layered_edit(sd: SDModel, image_latents: torch.Tensor, e_opt: torch.Tensor, *,
                 source_prompt: str, target_prompt: str, mask: torch.Tensor,
                 steps: int = 50, guidance_scale: float = 7.5, target_weight: float = 0.7,
                 guided_fraction: float = 1.0, cross_replace: float = 0.0,
                 self_replace: float = 0.0, controls=(), plan: EditPlan | None = None,
                 fit: Fit | None = None) -> EditResult:
    """The layered edit with the fine-tuned model ``sd`` (:func:`finetune_lora`): direct
    inversion of the photo's latent under ``source_prompt`` (exact reconstruction
    branch), then the pack's two-branch sampler with the edit branch conditioned on
    :func:`target_condition`, :class:`LayeredGuidance` composing the layers, and the
    chained ``controls`` (A-STAR's losses) acting on the edit branch inside ``mask``.

    No prompt-to-prompt injection by default (``cross_replace = self_replace = 0``): the
    edit branch's condition is not the target prompt's words alone, and LayerDiffusion's
    edits may change the object's pose."""
    z0 = _check_latents(image_latents)
    result = invert(sd, z0, source_prompt, method="direct", steps=steps,
                    guidance_scale=guidance_scale, fit=fit,
                    image_size=tuple(fit.fitted) if fit is not None else
                    (z0.shape[-2] * sd.vae_scale, z0.shape[-1] * sd.vae_scale))
    cond = target_condition(sd, target_prompt, e_opt, target_weight)
    chained = check_controls(controls) + [LayeredGuidance(guided_fraction)]
    out = sampler.edit(sd, result, target_prompt, mask=mask, controls=chained,
                       cross_replace=cross_replace, self_replace=self_replace,
                       guidance_scale=guidance_scale, plan=plan, target_embedding=cond)
    out.settings.update({"target_weight": target_weight, "guided_fraction": guided_fraction,
                         "method": "LayerDiffusion"})
    return out


@dataclasses.dataclass
class LayeredEmbeddings:
    """What the embedding optimisation hands on (custom socket type XMGIE_LAYERED): the
    optimised object-attribute and background embeddings (1, 77, D) with their texts,
    and, once mixed (eq. 16), ``e_opt`` and the ``alpha`` it was mixed with."""

    e_a: torch.Tensor
    e_b: torch.Tensor
    object_text: str
    background_text: str
    e_opt: torch.Tensor | None = None
    alpha: float | None = None

    def mixed(self, alpha: float = 0.7) -> LayeredEmbeddings:
        return dataclasses.replace(self, e_opt=mix_embeddings(self.e_a, self.e_b, alpha),
                                   alpha=float(alpha))

    def need_mix(self, name: str = "embeddings") -> torch.Tensor:
        if self.e_opt is None:
            raise InputError(name, "are not mixed", "the output of xMGIE Layered Mix "
                             "(e_opt of eq. 16)", "Put xMGIE Layered Mix between the "
                             "embedding optimisation and this node.")
        return self.e_opt

    def __repr__(self) -> str:
        mix = f", mixed at alpha {self.alpha:g}" if self.alpha is not None else ""
        return (f"LayeredEmbeddings('{self.object_text[:30]}' | "
                f"'{self.background_text[:30]}'{mix})")
