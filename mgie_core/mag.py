"""MAG: mask-based attention-adjusted guidance (MAG-Edit; docs/algorithms.md section 6).

A sampling control. In the first steps (default 25 of 50) it runs 15 gradient updates of
the edit branch's latent per step, inside the mask only, from losses on the edit
branch's five 16x16 cross-attention maps (after injection):

  token ratio   r_h(p) = mean_{k in word} A_h(p,k) / sum_k A_h(p,k);
                act_h = mean_{p in M16} r_h(p);
                L_TR = sum_words sum_maps mean_h (1 - act_h)^2 / (n_maps n_words)
  spatial ratio act = attention of the word inside M / over the whole map; mean(3 - 4 act)
  negative      weight x the token ratio of words that must leave the region (5.5)

  g = d(2.5 L)/dz;  sigma_t = sqrt((1 - abar_t)/abar_t);
  z <- z (1 - M64) + (z - sigma_t g) M64

and, in the last steps (default 15 of 50), blends the latent with the reconstruction
through the mask dilated by a 3x3 max-pool. The reconstruction's maps are computed once
per step and the loss's forward stops after the last 16x16 layer (see guidance.py).

The maps are the UNet architecture's (``LayerChoices.map_level``: the cross-attention
layers at latent / 4 in the down and up blocks). MAG-Edit's "16x16 at 512 px" on SD 1.5
is latent / 4, 1/32 of the image side, read in the down and up blocks
(``from_where=("up", "down")``); at 1024 px on SDXL latent / 4 is 32x32, the same 1/32
of the image and the level of SDXL's 10-deep transformers: 50 maps (down_blocks.2 and
up_blocks.0) instead of SD 1.5's five. SDXL's middle block is at 32x32 too and stays out
by the same rule (SD 1.5's is at 8x8). The loss averages over the maps. The truncated
forward then stops after up_blocks.0, so its backward skips SDXL's two finest up blocks.

Fewer passes for a close edit (all off by default, which is MAG-Edit's schedule): fewer
iterations in the later optimised steps (``late_iterations``, dropped at once or decayed
linearly), fewer optimised steps (``opt_fraction``), and an early exit that ends a step's
iterations once the token ratio reaches a target or the loss stops improving (one host
read per optimised step, at ``check_iteration``; none without it).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence

import torch

from . import grad_mode, guidance
from .architecture import architecture_of, layer_hw
from .attention import Branch, MaskPyramid
from .control import Control
from .errors import InputError, names_list
from .plan import EditPlan, find_phrase
from .tokens import word_token_groups

log = logging.getLogger(__name__)

SCHEDULES = ("step", "linear")

# The fast setting, chosen from the frontier of passes against distance from MAG-Edit's
# edit (bench/RESULTS.md, "MAG frontier"; docs/algorithms.md section 6): MAG-Edit's 15
# updates per step, in the first 8 of 50 steps only (120 forward+backward pairs instead of
# 375). The update's size sigma_t falls 8x over the first 25 steps, so the early ones
# carry most of the edit. The defaults of MAGControl stay MAG-Edit's (seed-faithful).
FAST_SETTINGS = {"opt_fraction": 0.16, "iterations": 15}


def _round(x: float) -> int:
    """Half up (Python's round() rounds half to even: 2.5 -> 2)."""
    return int(math.floor(x + 0.5))


# --- losses on maps (heads, HW, 77) -----------------------------------------------------

def _columns(A: torch.Tensor, tokens) -> torch.Tensor:
    """A[..., tokens]; ``tokens`` a list, or an index tensor on A's device (no host data)."""
    if isinstance(tokens, torch.Tensor):
        return A.index_select(-1, tokens)
    return A[..., list(tokens)]


def _mean_inside(x: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """Mean over the positions where ``inside`` holds, as a weighted sum (selecting them,
    ``x[:, inside]``, needs their count on the host: a synchronisation on a GPU)."""
    w = inside.to(x.dtype)
    return (x * w).sum(-1) / w.sum()


def token_ratio_activation(A: torch.Tensor, tokens, inside: torch.Tensor) -> torch.Tensor:
    """act_h for one map and one word: (heads,). ``inside`` is a bool (HW,) mask."""
    ratio = _columns(A, tokens).mean(-1) / A.sum(-1).clamp_min(1e-12)       # (heads, HW)
    return _mean_inside(ratio, inside)


def token_ratio_loss(maps: Sequence[torch.Tensor], groups: Sequence[Sequence[int]],
                     insides: Sequence[torch.Tensor]) -> torch.Tensor:
    total = maps[0].new_zeros((), dtype=torch.float32)
    for A, inside in zip(maps, insides):
        for tokens in groups:
            act = token_ratio_activation(A.float(), tokens, inside)
            total = total + ((1 - act) ** 2).mean()
    return total / (len(maps) * len(groups))


def spatial_ratio_loss(maps: Sequence[torch.Tensor], groups: Sequence[Sequence[int]],
                       insides: Sequence[torch.Tensor]) -> torch.Tensor:
    terms = []
    for A, inside in zip(maps, insides):
        for tokens in groups:
            w = _columns(A.float(), tokens).mean(-1)                           # (heads, HW)
            act = (w * inside.to(w.dtype)).sum(-1) / w.sum(-1).clamp_min(1e-12)
            terms.append((3 - 4 * act).mean())
    return torch.stack(terms).mean()


def negative_loss(maps: Sequence[torch.Tensor], groups: Sequence[Sequence[int]],
                  insides: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean token ratio of the negative words inside the mask (to be pushed down)."""
    terms = [token_ratio_activation(A.float(), tokens, inside).mean()
             for A, inside in zip(maps, insides) for tokens in groups]
    return torch.stack(terms).mean()


# --- the control ---------------------------------------------------------------------------

@dataclasses.dataclass
class MAGControl(Control):
    """MAG as a sampler control (see the module docstring).

    One mask for all three uses (loss region, update region, late blend): ``mask`` when
    given (an override for this control), else the sampler's; one of them is required.
    ``words``/``negative_words`` empty take the edit plan's (``plan``, else the
    sampler's): its edit words, and those of its source words that also occur in the
    target prompt (a source word still in the target, e.g. 'red' of 'a red sofa on a
    yellow carpet', is what must leave the region; the others have no map to push).
    Words with no plan to take them from: an error naming both."""

    name = "MAG"

    mask: torch.Tensor | None = None      # own [H,W]/[B,H,W] edit region; None: the run's
    words: Sequence[str] = ()                # words of the target prompt to pull in
    negative_words: Sequence[str] = ()       # words of the target prompt to push out
    opt_fraction: float = 25 / 50            # first 25 of 50 steps
    iterations: int = 15
    scale: float = 2.5
    use_token_ratio: bool = True
    use_spatial_ratio: bool = False
    negative_weight: float = 5.5
    blend_fraction: float = 15 / 50          # latent blend in the last 15 of 50 steps
    truncate: bool = True                    # stop the loss forward after the last map
    cache_source: bool = True                # reconstruction maps once per step (exact)
    plan: EditPlan | None = None          # own edit plan; None: the sampler's
    # Fewer passes (off by default; see iterations_at and the early exit in before_step).
    late_iterations: int | None = None       # iterations of the late optimised steps
    late_start: float = 0.5                  # share of optimised steps at full iterations
    schedule: str = "step"                   # step: drop at late_start; linear: decay
    stop_activation: float = 0.0             # early exit at this token ratio; 0: off
    stop_improvement: float = 0.0            # early exit below this relative loss drop
    check_iteration: int = 1                 # the iteration whose result the exit reads

    def __post_init__(self):
        if self.iterations < 1:
            raise InputError("iterations", f"is {self.iterations}", "1 or more")
        if self.late_iterations is not None and self.late_iterations < 1:
            raise InputError("late_iterations", f"is {self.late_iterations}",
                             "1 or more, or None for `iterations` in every optimised step",
                             "To optimise fewer steps lower opt_fraction instead.")
        if not 0.0 <= self.late_start <= 1.0:
            raise InputError("late_start", f"is {self.late_start}", "a fraction in 0..1")
        if self.schedule not in SCHEDULES:
            raise InputError("schedule", f"is {self.schedule!r}", " or ".join(SCHEDULES))
        if not 0.0 <= self.stop_activation <= 1.0:
            raise InputError("stop_activation", f"is {self.stop_activation}",
                             "a token ratio in 0..1 (0: no early exit on the ratio)")
        if not 0.0 <= self.stop_improvement < 1.0:
            raise InputError("stop_improvement", f"is {self.stop_improvement}",
                             "a relative loss decrease in [0, 1) (0: no early exit on it)")
        if self.check_iteration < 0 or (self.stop_improvement > 0
                                        and self.check_iteration < 1):
            raise InputError("check_iteration", f"is {self.check_iteration}",
                             "1 or more with stop_improvement (it compares the loss with "
                             "the iteration before), else 0 or more")
        self._pyramid: MaskPyramid | None = None   # set up per run
        self.history: list[dict] = []        # per update: step, loss, activation
        self._records: list[tuple] = []      # the run's device records (setup resets)
        self.stops: dict[int, int] = {}      # early exits: step -> its last iteration

    @property
    def early_exit(self) -> bool:
        return self.stop_activation > 0 or self.stop_improvement > 0

    def iterations_at(self, k: int, n_opt: int) -> int:
        """Iterations of the k-th of ``n_opt`` optimised steps: ``iterations`` in the
        first ``late_start`` share of them; after that ``late_iterations`` ("step"), or a
        straight line from ``iterations`` at the last full step (the first optimised step
        when late_start is 0) down to ``late_iterations`` at the last one ("linear")."""
        full, late = self.iterations, self.late_iterations
        n_full = _round(self.late_start * n_opt)
        if late is None or k < n_full:
            return full
        if self.schedule == "step":
            return late
        start = max(n_full - 1, 0)
        span = n_opt - 1 - start
        frac = (k - start) / span if span > 0 else 1.0
        return _round(full + (late - full) * frac)

    def setup(self, run) -> None:
        prompt = run.target_prompt
        if not run.two_branch:
            raise InputError("controls", "include MAG on a sampler without a target prompt",
                             "the two-branch (inversion) sampler")
        grad_mode.differentiable(run.sd.unet, stage="MAG")
        self._pyramid = MaskPyramid(self.resolve_mask(
            run, self.mask, required=True, use="the edit region (MAG pulls the edit words' "
            "attention into it, updates the latent inside it and blends outside it)"))
        self.used_words = self.resolve_words(run, self.words, self.plan, "edit_words",
                                             "words")
        negative = list(self.negative_words)
        if not negative:
            planned = self.resolve_words(run, "", self.plan, "source_words",
                                         "negative words", required=False)
            negative = [w for w in planned if find_phrase(prompt, w)]
            if len(negative) < len(planned):
                log.info("MAG: the plan's source words %s are not in the target prompt: "
                         "no negative term for them", names_list(
                             [w for w in planned if w not in negative]))
        self.used_negative_words = negative
        tok = run.sd.tokenizer
        self._groups = word_token_groups(tok, prompt, list(self.used_words))
        self._neg = word_token_groups(tok, prompt, negative) if negative else []
        self._layers = guidance.map_layers(run.sd.unet)
        n = run.schedule.num_steps
        self._n_opt = int(round(self.opt_fraction * n))
        self._n_blend = int(round(self.blend_fraction * n))
        self.history = []                    # per run (a cached node output is reused)
        self._records: list[tuple] = []      # (step, iteration, loss, activation) on device
        self.stops = {}
        # Everything the loss reads besides the maps, on the device now: token positions
        # and the mask at the maps' size (checked here, once: it must not vanish there).
        z = run.latents[Branch.EDIT]
        dev, hw = z.device, tuple(z.shape[-2:])
        self._insides: dict[tuple[int, int], torch.Tensor | None] = {}
        if self._n_opt > 0:
            # the maps' size (16x16 at 512 px on SD 1.x, 32x32 at 1024 px on SDXL)
            self._inside_at(architecture_of(run.sd.unet).map_size(hw), dev)
        put = lambda g: grad_mode.autograd_input(torch.tensor(list(g), device=dev))  # noqa
        self._groups_on = [put(g) for g in self._groups]
        self._neg_on = [put(g) for g in self._neg]
        self._m64 = self._pyramid.at(hw, dev)[:, None]   # one mask: loss, update, blend
        self._blend = guidance.dilate3(self._pyramid.at(hw, dev)[:, None])

    def _inside_at(self, hw: tuple[int, int], device) -> torch.Tensor | None:
        """The mask inside a map of size ``hw`` as a flat bool (HW,), or None when it is
        empty there; made (and checked, one host read) once per size. Normal tensors
        (not inference ones): the loss saves them for its backward."""
        if hw not in self._insides:
            inside = self._pyramid.at(hw, device)[0].flatten() > 0.5
            self._insides[hw] = grad_mode.autograd_input(inside) if bool(inside.any()) \
                else None
            if all(v is None for v in self._insides.values()):
                raise InputError("mask", f"vanishes at the {hw[1]}x{hw[0]} attention "
                                 "resolution", "a larger edit region",
                                 "MAG reads maps at 1/32 of the image's side (16x16 at "
                                 "512 px, 32x32 at 1024 px).")
        return self._insides[hw]

    def loss(self, maps: dict[str, torch.Tensor], latent_hw) -> tuple[torch.Tensor,
                                                                      torch.Tensor]:
        """(loss, mean token-ratio activation), both 0-dim float32 tensors on the device
        (the activation is for the history, read once at the end of the run)."""
        pairs = []
        for name in self._layers:
            A = maps[name]
            hw = layer_hw(latent_hw, A.shape[1])
            inside = self._inside_at(hw, A.device)
            if inside is not None:
                pairs.append((A, inside))
        As, insides = [p[0] for p in pairs], [p[1] for p in pairs]
        groups = self._groups_on
        neg = getattr(self, "_neg_on", None) or self._neg
        total = As[0].new_zeros((), dtype=torch.float32)
        if self.use_token_ratio:
            total = total + token_ratio_loss(As, groups, insides)
        if self.use_spatial_ratio:
            total = total + spatial_ratio_loss(As, groups, insides)
        if self._neg:
            total = total + self.negative_weight * negative_loss(As, neg, insides)
        with torch.no_grad():
            act = torch.stack([token_ratio_activation(A.float(), g, i).mean()
                               for A, i in zip(As, insides) for g in groups]).mean()
        return total, act

    def before_step(self, run, i: int) -> None:
        """MAG's inner loop: without the early exit no value comes back to the host. A
        skipped update (a non-finite or zero gradient) is a ``torch.where`` on the device,
        counted and warned about at the end of the run (see report.py); the history is
        read then.

        The early exit is a data-dependent branch, so it reads the device once per
        optimised step: after iteration ``check_iteration`` (its update applied), the
        activation and loss that iteration measured. Reached (activation >=
        ``stop_activation``, or a loss that fell by less than ``stop_improvement`` of the
        previous iteration's): that update is the step's last. Not reached: the step runs
        its remaining iterations without another read."""
        if i >= self._n_opt:
            return
        n_it = self.iterations_at(i, self._n_opt)
        check = self.check_iteration if self.early_exit else -1
        with grad_mode.autograd():
            z = grad_mode.autograd_input(run.latents[Branch.EDIT]).float()
            m64 = self._m64
            step = guidance.sigma(run, i)
            prev = None
            for it in range(n_it):
                zv = z.detach().requires_grad_(True)
                grad, loss, act = _gradient(self, run, zv, i)
                self._records.append((i, it, loss.detach(), act))
                ok = guidance.count_update(run, self.name, grad, i)
                z = guidance.masked_update(z, grad.float(), m64, step, ok)
                if it == check and it + 1 < n_it and self._reached(act, loss, prev):
                    self.stops[i] = it
                    break
                prev = loss.detach()
            run.latents[Branch.EDIT] = z.detach()

    def _reached(self, act: torch.Tensor, loss: torch.Tensor,
                 prev: torch.Tensor | None) -> bool:
        """The early exit's test: the step's one host read (activation, loss and the
        previous loss in one transfer)."""
        vals = torch.stack([act.detach().float(), loss.detach().float(),
                            (prev if prev is not None else loss).detach().float()]).tolist()
        a, cur, before = vals
        if self.stop_activation > 0 and a >= self.stop_activation:
            return True
        return (self.stop_improvement > 0 and prev is not None
                and before - cur < self.stop_improvement * abs(before))

    def teardown(self, run) -> None:
        # UNet passes spent: the reconstruction once per optimised step, the edit row
        # once per iteration (forward + backward).
        self.passes = {"source": run.source_cache.passes, "edit": run.edit_passes}
        self.history = _read_history(self._records, ("loss", "activation"))
        self._records = []

    def after_step(self, run, i: int) -> None:
        n = run.schedule.num_steps
        if i < n - self._n_blend or Branch.REC not in run.latents:
            return
        z = run.latents[Branch.EDIT]
        m = self._blend
        run.latents[Branch.EDIT] = m * z + (1 - m) * run.latents[Branch.REC]


def truncated_gradient(control: MAGControl, run, zv: torch.Tensor, i: int):
    """(gradient to ``zv``, loss, activation) of one MAG update: the edit row's truncated
    forward, the loss on its maps and the backward to the latent. With
    ``compile_unet="graphs"`` the whole function is one captured CUDA graph, replayed
    every iteration (``graph_calls.mag_gradient``)."""
    maps = guidance.edit_maps(run, zv, i, control._layers, truncate=control.truncate,
                              cache_source=control.cache_source)
    loss, act = control.loss(maps, tuple(zv.shape[-2:]))
    grad = guidance.gradient(control.scale * loss, zv, control.name, i)
    return grad, loss.detach(), act


def _gradient(control: MAGControl, run, zv: torch.Tensor, i: int):
    cache = run.graphs
    if cache is None or not cache.active:
        return truncated_gradient(control, run, zv, i)
    from . import graph_calls

    return graph_calls.mag_gradient(cache, control, run, zv, i, truncated_gradient)


def _read_history(records, names: Sequence[str]) -> list[dict]:
    """History dicts from (step, iteration, *0-dim tensors) records, read in one transfer
    at the end of the run (a read per iteration would wait for the device each time)."""
    if not records:
        return []
    values = torch.stack([v.detach().float().reshape(()) for r in records
                          for v in r[2:]]).tolist()
    k = len(names)
    return [{"step": r[0], "iteration": r[1],
             **{n: values[j * k + q] for q, n in enumerate(names)}}
            for j, r in enumerate(records)]

