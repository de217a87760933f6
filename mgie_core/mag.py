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
"""

from __future__ import annotations

import dataclasses
import logging
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

    def __post_init__(self):
        self._pyramid: MaskPyramid | None = None   # set up per run
        self.history: list[dict] = []        # per update: step, loss, activation
        self._records: list[tuple] = []      # the run's device records (setup resets)

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
        self._layers = guidance.layers_at_factor(run.sd.unet, 4)
        n = run.schedule.num_steps
        self._n_opt = int(round(self.opt_fraction * n))
        self._n_blend = int(round(self.blend_fraction * n))
        self.history = []                    # per run (a cached node output is reused)
        self._records: list[tuple] = []      # (step, iteration, loss, activation) on device
        # Everything the loss reads besides the maps, on the device now: token positions
        # and the mask at the maps' size (checked here, once: it must not vanish there).
        z = run.latents[Branch.EDIT]
        dev, hw = z.device, tuple(z.shape[-2:])
        self._insides: dict[tuple[int, int], torch.Tensor | None] = {}
        if self._n_opt > 0:
            # the 16x16 maps at 512 px
            self._inside_at(architecture_of(run.sd.unet).feature_size(hw, 2), dev)
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
                raise InputError("mask", "vanishes at the 16x16 attention resolution",
                                 "a larger edit region", "MAG reads 16x16 maps (at 512 px).")
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
        """MAG's inner loop: no value comes back to the host. A skipped update (a
        non-finite or zero gradient) is a ``torch.where`` on the device, counted and
        warned about at the end of the run (see report.py); the history is read then."""
        if i >= self._n_opt:
            return
        with grad_mode.autograd():
            z = grad_mode.autograd_input(run.latents[Branch.EDIT]).float()
            m64 = self._m64
            step = guidance.sigma(run, i)
            for it in range(self.iterations):
                zv = z.detach().requires_grad_(True)
                grad, loss, act = _gradient(self, run, zv, i)
                self._records.append((i, it, loss.detach(), act))
                ok = guidance.count_update(run, self.name, grad, i)
                z = guidance.masked_update(z, grad.float(), m64, step, ok)
            run.latents[Branch.EDIT] = z.detach()

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
    cache = getattr(run, "graphs", None)
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

