"""A-STAR: attention segregation and retention for multi-concept prompts
(Agarwal et al., ICCV 2023; docs/algorithms.md section 7), as a sampling control.

In the first optimised steps, the edit branch's latent takes one gradient step per
sampling step on two losses over the 16x16 (at 512 px) cross-attention maps of each
concept word of the target prompt (each map divided by its peak, see peak_normalise).
The maps are the UNet architecture's (MAG's: the cross-attention layers at latent / 4 in
the down and up blocks, 32x32 at 1024 px on SDXL; see mag.py):

  segregation  L_seg = sum_{m>n} sum_ij min(A_m, A_n) / sum_ij (A_m + A_n)
  retention    L_ret = sum_m [1 - sum_ij min(A_m, B_m) / sum_ij (A_m + B_m)]
               with B_m the binarised high-activation region of concept m's map at the
               previous sampling step (no retention term at the first optimised step)

  z <- z - alpha_t grad_z (L_seg + L_ret)

Note the normalisation by sum(A_m + A_n) (not an IoU's union): two identical maps give
0.5 per pair, and a map equal to its binary region gives a retention term of 0.5, the
term's minimum over A for a given B; disjoint maps give 0 and 1.

Choices the paper does not publish (defaults of :class:`AStarControl`):
  * step size alpha_t = step_size * sigma_t, sigma_t = sqrt((1 - abar_t)/abar_t), the
    update rule MAG-Edit uses in this pack (section 6) with its constant 2.5: large steps
    while the layout forms, vanishing ones as noise goes; one knob shared by the pack's
    latent-optimising controls.
  * threshold: B_m = [A_m >= 0.5 max A_m], the half-maximum region of each map. Relative
    to each map's own peak, so it does not depend on the scale of the raw attention
    probabilities (which differs between words, steps and models), and keeps the core of
    the concept without its diffuse tail.
  * first 50% of the steps (25 of 50, as Attend-and-Excite, which A-STAR builds on, and
    MAG do): the layout is decided early; later updates only disturb details.

Maps come from :func:`guidance.edit_maps`, i.e. after prompt-to-prompt injection: the maps
of words aligned with the source prompt are the reconstruction's (no gradient) while
cross-attention injection runs, so A-STAR moves only words new in the target there.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import torch

from . import grad_mode, guidance
from .architecture import layer_hw
from .attention import Branch, MaskPyramid
from .control import Control
from .errors import InputError
from .plan import EditPlan
from .tokens import word_token_groups

log = logging.getLogger(__name__)

_TINY = 1e-12


# --- maps and losses ------------------------------------------------------------------------

def map_hw(latent_hw: Sequence[int], n_tokens: int) -> tuple[int, int]:
    """Spatial size of an attention map with ``n_tokens`` queries for a latent of
    ``latent_hw`` (:func:`.architecture.layer_hw`; non-square latents work), checked."""
    h, w = int(latent_hw[0]), int(latent_hw[1])
    hw = layer_hw((h, w), n_tokens)
    if hw[0] * hw[1] != n_tokens:
        raise ValueError(f"cannot lay {n_tokens} attention queries out on a latent of {h}x{w}")
    return hw


def concept_maps(maps: dict[str, torch.Tensor], groups: Sequence[Sequence[int]],
                 hw: Sequence[int]) -> torch.Tensor:
    """(n_concepts, H, W) float32: each concept's map averaged over heads, layers and the
    concept's tokens. ``maps`` holds (heads, HW, 77) per layer, all at the same HW."""
    if not maps:
        raise ValueError("no attention maps given")
    h, w = int(hw[0]), int(hw[1])
    per_layer = []
    for name, A in maps.items():
        if A.shape[-2] != h * w:
            raise ValueError(f"layer {name} has {A.shape[-2]} queries, not {h}x{w}; "
                             "average only maps of one resolution")
        A = A.float().mean(0)                                            # (HW, 77)
        per_layer.append(torch.stack([_columns(A, g).mean(-1) for g in groups]))
    return torch.stack(per_layer).mean(0).reshape(len(groups), h, w)


def _columns(A: torch.Tensor, tokens) -> torch.Tensor:
    """A[..., tokens]: ``tokens`` a list, or an index tensor on A's device (no host data
    in the loop)."""
    if isinstance(tokens, torch.Tensor):
        return A.index_select(-1, tokens)
    return A[..., list(tokens)]


def peak_normalise(A: torch.Tensor) -> torch.Tensor:
    """Each (H, W) map divided by its own peak (differentiable), so maps lie in [0, 1].

    Raw cross-attention probabilities of a word are small (the start token takes most of
    each row), while B is {0,1}: without this, sum min(A, B) / sum (A + B) would be ~0
    whatever the overlap, and retention would only ask for more attention mass. A-STAR
    works on Attend-and-Excite's rescaled maps for the same reason."""
    return A / A.amax((-2, -1), keepdim=True).clamp_min(_TINY)


def _soft_overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_ij min(a, b) / sum_ij (a + b), over the last two dims."""
    num = torch.minimum(a, b).sum((-2, -1))
    return num / (a + b).sum((-2, -1)).clamp_min(_TINY)


def segregation_loss(A: torch.Tensor) -> torch.Tensor:
    """L_seg over all pairs m > n of the (n, H, W) concept maps (0 with one concept)."""
    n = A.shape[0]
    if n < 2:
        return A.new_zeros(())
    m_idx, n_idx = torch.triu_indices(n, n, offset=1, device=A.device)
    return _soft_overlap(A[m_idx], A[n_idx]).sum()


def retention_loss(A_now: torch.Tensor, B_prev: torch.Tensor) -> torch.Tensor:
    """L_ret = sum_m [1 - sum min(A_m, B_m) / sum (A_m + B_m)] for (n, H, W) maps and
    the previous step's binary regions B (same shape)."""
    if A_now.shape != B_prev.shape:
        raise ValueError(f"maps {tuple(A_now.shape)} and regions {tuple(B_prev.shape)} differ")
    return (1 - _soft_overlap(A_now, B_prev.to(A_now.dtype))).sum()


def binarise(A: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """{0,1} float regions [A_m >= threshold * max A_m] of (n, H, W) maps (no gradient).
    A map that is zero everywhere gives an empty region."""
    A = A.detach().float()
    peak = A.flatten(1).amax(1)[:, None, None]
    return ((A >= threshold * peak) & (peak > 0)).float()


# --- the control ------------------------------------------------------------------------------

@dataclasses.dataclass
class AStarControl(Control):
    """A-STAR as a sampler control (see the module docstring).

    ``words`` empty take the edit plan's edit words (``plan``, else the sampler's); with
    neither, an error naming both. The update region is ``mask`` when given (an
    override), else the sampler's mask, else everywhere (``use_mask=False``: always
    everywhere)."""

    name = "A-STAR"

    words: Sequence[str] = ()                # concept words of the target prompt
    steps_fraction: float = 0.5              # optimise the first 50% of the steps
    iterations: int = 1                      # updates per step (A-STAR: one)
    step_size: float = 2.5                   # alpha_t = step_size * sigma_t (MAG's rule)
    threshold: float = 0.5                   # B = [A >= threshold * max A]
    use_mask: bool = True                    # update only inside the mask, if there is one
    mask: torch.Tensor | None = None      # own region; else the sampler's mask
    plan: EditPlan | None = None          # own edit plan; else the sampler's

    def __post_init__(self):
        self.words = [w.strip() for w in self.words if w and w.strip()]
        if not 0.0 <= self.steps_fraction <= 1.0:
            raise InputError("steps_fraction", f"is {self.steps_fraction}", "a value in 0..1")
        if not 0.0 < self.threshold <= 1.0:
            raise InputError("threshold", f"is {self.threshold}",
                             "a fraction of each map's peak in (0, 1]")
        if self.iterations < 1:
            raise InputError("iterations", f"is {self.iterations}", "1 or more")
        self._pyramid: MaskPyramid | None = None   # set up per run
        self.history: list[dict] = []        # per update: step, iteration, losses, applied
        self._records: list[tuple] = []      # the run's device records (setup resets)
        self._prev: torch.Tensor | None = None

    def setup(self, run) -> None:
        prompt = run.target_prompt
        if not run.two_branch:
            raise InputError("controls", "include A-STAR on a sampler without a target "
                             "prompt", "the two-branch (inversion) sampler")
        grad_mode.differentiable(run.sd.unet, stage="A-STAR")
        # Words: typed, else the edit plan's edit words (own plan, else the sampler's).
        self.used_words = self.resolve_words(run, self.words, self.plan, "edit_words",
                                             "concept words")
        # Region: own mask, else the sampler's, else none (the latent changes everywhere).
        m = self.resolve_mask(run, self.mask, required=False, use="the region to update") \
            if self.use_mask else None
        self._pyramid = MaskPyramid(m) if m is not None else None
        self._groups = word_token_groups(run.sd.tokenizer, prompt, list(self.used_words))
        self._layers = guidance.map_layers(run.sd.unet)
        self._n_opt = int(round(self.steps_fraction * run.schedule.num_steps))
        self._prev = None
        self.history = []
        self._records: list[tuple] = []      # (step, iteration, seg, ret, applied, reason)
        z = run.latents[Branch.EDIT]
        self._groups_on = [grad_mode.autograd_input(torch.tensor(list(g), device=z.device))
                           for g in self._groups]
        self._region(run, z)                 # the mask on the device before the loop
        if len(self._groups) < 2:
            log.info("A-STAR with one concept word: retention only, nothing to segregate")
        inj = run.injection
        if inj is not None and inj.cross_steps > 0 and self._n_opt > 0:
            frozen = [w for w, g in zip(self.used_words, self._groups) if _injected(inj, g)]
            if frozen:
                log.warning("A-STAR: %s also in the source prompt: their maps are injected "
                            "from the reconstruction for the first %d steps and cannot be "
                            "moved there", ", ".join(map(repr, frozen)),
                            min(inj.cross_steps, self._n_opt))

    def _region(self, run, z: torch.Tensor) -> torch.Tensor | None:
        if self._pyramid is None:
            return None
        return self._pyramid.at(tuple(z.shape[-2:]), z.device)[:, None]

    def constant_loss_reason(self, run, i: int) -> str | None:
        """Why the loss at step i is a constant by construction (so there is no gradient
        to follow and the update is skipped, counted with this reason), or None.

        * one concept at the first optimised step: no pair to segregate and no previous
          region to retain;
        * every concept word is also in the source prompt and its map is injected from
          the reconstruction at this step (cross-attention injection), so no map depends
          on the latent."""
        if len(self._groups) < 2 and self._prev is None:
            return "constant loss: one concept and no previous region (first step)"
        inj = run.injection
        if inj is not None and i < inj.cross_steps:
            if all(_injected(inj, g) for g in self._groups):
                return ("constant loss: every concept map is injected from the "
                        "reconstruction at this step")
        return None

    def before_step(self, run, i: int) -> None:
        """No value comes back to the host in the loop: the update is applied or skipped
        on the device (``torch.where``), counted and warned about at the end of the run,
        and the history is read then (see report.py)."""
        if i >= self._n_opt:
            return
        with grad_mode.autograd():
            z = grad_mode.autograd_input(run.latents[Branch.EDIT]).float()
            region = self._region(run, z)
            alpha = self.step_size * guidance.sigma(run, i)
            groups = self._groups_on
            A = None
            for it in range(self.iterations):
                zv = z.detach().requires_grad_(True)
                maps = guidance.edit_maps(run, zv, i, self._layers)
                hw = map_hw(z.shape[-2:], next(iter(maps.values())).shape[-2])
                A = peak_normalise(concept_maps(maps, groups, hw))
                l_seg = segregation_loss(A)
                l_ret = retention_loss(A, self._prev) if self._prev is not None \
                    else A.new_zeros(())
                total = l_seg + l_ret
                constant = self.constant_loss_reason(run, i)
                if constant is not None:
                    # A legitimate no-op, counted; the forward above still gives this
                    # step's maps for the next step's retention term.
                    self._records.append((i, it, l_seg.detach(), l_ret.detach(), None,
                                          constant))
                    run.report.skipped(self.name, constant)
                    continue
                # Anything else without a gradient is a failure, not a zero update.
                grad = guidance.gradient(total, zv, self.name, i)
                ok = guidance.count_update(run, self.name, grad, i)
                self._records.append((i, it, l_seg.detach(), l_ret.detach(), ok, None))
                z = guidance.masked_update(z, grad.float(), region, alpha, ok)
            # Retention's B for the next step: this step's maps (of the last iteration's
            # input latent; recomputing after the update would cost one more forward).
            self._prev = binarise(A, self.threshold)
            run.latents[Branch.EDIT] = z.detach()

    def teardown(self, run) -> None:
        self._prev = None
        self.history = _read_history(self._records)
        self._records = []


def _injected(inj, group: Sequence[int]) -> bool:
    """Whether every token of a word is aligned with the source prompt (its map is
    injected from the reconstruction while cross-attention injection runs); a host-side
    question, answered from the injection's host copy of its alignment."""
    aligned = inj.aligned
    if aligned is None:                      # "replace" mapper: every map is injected
        return True
    return all(p < len(aligned) and aligned[p] >= 0 for p in group)


def _read_history(records) -> list[dict]:
    """History dicts (step, iteration, seg, ret, applied[, skipped]) from the device
    records, read in one transfer at the end of the run."""
    if not records:
        return []
    flat = []
    for _, _, seg, ret, ok, _ in records:
        flat += [seg.float().reshape(()), ret.float().reshape(()),
                 (ok if ok is not None else torch.zeros((), dtype=torch.bool,
                                                       device=seg.device)).float()]
    values = torch.stack([v.to(flat[0].device) for v in flat]).tolist()
    out = []
    for k, (step, it, _, _, _, reason) in enumerate(records):
        rec = {"step": step, "iteration": it, "seg": values[3 * k],
               "ret": values[3 * k + 1], "applied": bool(values[3 * k + 2])}
        if reason is not None:
            rec["skipped"] = reason
        out.append(rec)
    return out
