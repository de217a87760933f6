"""What a sampler control is, and the run it acts on.

A control (PFB, MAG, A-STAR, identity guidance, ...) is a :class:`Control`: typed hooks
with no-op defaults, called by the sampler at fixed points of its loop, in the order the
controls were chained (diffusers' ``PipelineCallback`` has the same shape)::

    setup(run)                 once, before the first step
    attn_hooks(run) -> list    attention hooks to install for the whole run
    before_step(run, i)        before step i's UNet call (latent optimisation goes here)
    after_step(run, i)         after step i's DDIM update (latent blending goes here)
    teardown(run)              once, always, even when the run fails or is interrupted

A subclass whose public method looks like a misspelt hook (``before_setp``,
``on_step_end``) is refused when the class is created, so a typo fails loudly instead
of never being called.

:class:`SamplingRun` is the edit context a sampler owns for one run: the model, the
schedule, the branch latents, the mask, the prompts and embeddings, the per-step
caches controls share, and ``report``, where optimising controls count the updates they
applied and skipped (``run.report.applied(self.name)``, ``run.report.skipped(self.name,
reason)``; see :mod:`.report`). A host that caches node outputs (ComfyUI) hands the
same control object to later runs, so a control resets whatever it keeps between hooks
in ``setup`` (each run's state is set there, not in ``__init__``); runs are sequential.

One edit context. The sampler owns the edit mask and the edit plan of the run
(``run.mask``, ``run.plan``: its mask and plan inputs). Every control reads them from the
run, by one rule:

* **mask**: the control's own mask when it was given one (an explicit override, for this
  control only), else the run's. A control that needs a mask (PFB, MAG, identity
  guidance unless ``use_mask=False``) and has neither raises an ``InputError`` naming
  both; A-STAR without either updates everywhere. Either mask is binarised at 0.5, then
  resized to each resolution (bicubic, threshold 0.5). :meth:`Control.resolve_mask`.
  A photo padded to the model's size step pads an own mask of its size the same way
  (``run.fit``), as the sampler does with the run's.
* **plan**: likewise the control's own plan, else the run's (:meth:`Control.resolve_plan`);
  a control's typed words win over the plan's, an empty one takes the plan's
  (``plan.PLAN_RULE``), and with neither the control raises naming both.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import ClassVar

import torch

from . import attention, attention_hooks, host
from .attention import AttnHook, BatchLayout, Branch
from .diffusion import Schedule
from .errors import InputError
from .graphs import GraphCache
from .guidance import SourceCache
from .images import Fit
from .inversion import InversionResult
from .models.sd import SDModel
from .plan import EditPlan, from_plan
from .report import UpdateReport

HOOKS = ("setup", "attn_hooks", "before_step", "after_step", "teardown")
# Public method names a hook-like typo tends to have.
_HOOKISH_PREFIXES = ("before_", "after_", "on_", "setup", "teardown", "attn_hook")


def _misspelt_hooks(cls: type) -> list[str]:
    problems = []
    for name, value in vars(cls).items():
        if name.startswith("_") or name in HOOKS or not callable(value) \
                or isinstance(value, (staticmethod, classmethod, type)):
            continue
        close = difflib.get_close_matches(name, HOOKS, n=1, cutoff=0.75)
        if close or name.startswith(_HOOKISH_PREFIXES):
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append(f"{name}{hint}")
    return problems


class Control:
    """Base class of every sampler control: override the hooks you need.

    ``name`` is how errors and run reports refer to the control (e.g. the node's name)."""

    name: ClassVar[str] = "control"
    # Extra public methods a subclass may define whose names look hook-like on purpose.
    NOT_HOOKS: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        bad = [p for p in _misspelt_hooks(cls) if p.split(" ")[0] not in cls.NOT_HOOKS]
        if bad:
            raise TypeError(f"{cls.__name__} defines {', '.join(bad)}, which is not a sampler "
                            f"hook; the hooks are {', '.join(HOOKS)}. A misspelt hook would "
                            f"never be called: rename it, or list it in NOT_HOOKS.")

    def setup(self, run: SamplingRun) -> None:
        """Once before the first step: read the run, check inputs, patch UNet modules
        through ``run.controller.patch_module`` (removed when the run ends)."""

    def attn_hooks(self, run: SamplingRun) -> list[AttnHook]:
        """Attention hooks this control adds for the whole run."""
        return []

    def before_step(self, run: SamplingRun, i: int) -> None:
        """Before step i's UNet call."""

    def after_step(self, run: SamplingRun, i: int) -> None:
        """After step i's update of every branch."""

    def teardown(self, run: SamplingRun) -> None:
        """Once at the end, also after an error or an interruption: undo what setup did."""

    # -- the edit context (see the module docstring) -------------------------------------
    def resolve_mask(self, run: SamplingRun, own: torch.Tensor | None, *,
                     required: bool, use: str) -> torch.Tensor | None:
        """The mask this control acts on, (B, H, W) in {0, 1}: ``own`` (the control's own
        mask, an explicit override) when given, else the run's. Neither: None, or an
        :class:`InputError` naming both when the control ``required`` one (``use`` says
        what for)."""
        if own is not None and run.fit is not None:
            own = run.fit.mask(own if own.ndim == 3 else own[None])   # as the photo was
        m = own if own is not None else run.mask
        if m is None:
            if required:
                raise InputError(f"{self.name} mask", "is missing: the control has no mask "
                                 "of its own and the sampler has none", f"a mask of {use}",
                                 "Connect the edit mask to the sampler's mask input (every "
                                 "control then uses it), or to this control's own mask "
                                 "input to override it for this control only.")
            return None
        m = m if m.ndim == 3 else m[None]
        return (m.float() > 0.5).float()

    def resolve_plan(self, run: SamplingRun, own: EditPlan | None) -> EditPlan | None:
        """The edit plan this control reads: ``own`` when given, else the run's."""
        return own if own is not None else run.plan

    def resolve_words(self, run: SamplingRun, typed, own_plan: EditPlan | None,
                      field: str, what: str, *, required: bool = True) -> list[str]:
        """Words by ``plan.PLAN_RULE``: ``typed`` when not empty, else the plan's ``field``
        (own plan, else the run's); with neither, an error naming both (``required``)."""
        return from_plan(f"{self.name} {what}", typed, self.resolve_plan(run, own_plan),
                         field, f"comma-separated words of the target prompt ({what})",
                         required=required,
                         no_plan="there is no edit plan (neither on this control nor on "
                                 "the sampler)")


def check_controls(controls) -> list[Control]:
    """The controls list a sampler was given, each checked to be a :class:`Control`."""
    out = list(controls or ())
    for c in out:
        if not isinstance(c, Control):
            raise InputError("controls", f"holds a {type(c).__name__}, which is not a sampler "
                             "control", "controls made by the control nodes (PFB, MAG, A-STAR, "
                             "identity guidance), chained through their 'controls' input",
                             "Subclass mgie_core.control.Control for a control of your own.")
    return out


@dataclasses.dataclass
class SamplingRun:
    """The edit context of one sampling run, shared with its controls.

    The sampler owns the mask and the edit plan; a control uses ``run.mask`` and
    ``run.plan`` unless it was built with its own (see the module docstring)."""

    sd: SDModel
    schedule: Schedule
    layout: BatchLayout
    latents: dict[Branch, torch.Tensor]          # branch -> current latent (float32)
    controller: attention.AttentionController
    mask: torch.Tensor | None = None          # [B,H,W] edit mask, any resolution
    inversion: InversionResult | None = None
    reference: torch.Tensor | None = None     # (N+1, B, 4, h, w) reference trajectory
    step: int = 0
    plan: EditPlan | None = None              # the edit plan the sampler was given
    # How the photo was fitted to the model's size step (images.Fit): a control's own
    # mask of the photo's size is fitted the same way (zero-padded) in resolve_mask.
    fit: Fit | None = None

    # Two-branch (inversion) sampler only; None on the instruction path.
    source_prompt: str | None = None
    target_prompt: str | None = None
    cond_src: torch.Tensor | None = None      # (1, 77, D) source prompt embedding
    cond_tgt: torch.Tensor | None = None      # (1, 77, D) target prompt embedding
    null: torch.Tensor | None = None          # (B, 77, D) this step's unconditional row
    guidance_scale: float = 7.5
    injection: attention_hooks.InjectionHook | None = None
    sampler_hooks: list[AttnHook] = dataclasses.field(default_factory=list)

    # Shared by latent-optimising controls within a step (see guidance.py).
    source_cache: SourceCache = dataclasses.field(default_factory=SourceCache)
    edit_passes: int = 0                          # edit-row passes for losses
    # Updates each optimising control applied and skipped in this run (see report.py).
    report: UpdateReport = dataclasses.field(default_factory=UpdateReport)
    # compile_unet="graphs": the run's captured UNet calls (graphs.py); None: eager.
    graphs: GraphCache | None = None

    @property
    def two_branch(self) -> bool:
        return self.cond_tgt is not None and Branch.REC in self.latents

    def reference_at(self, i: int) -> torch.Tensor | None:
        """Reference latent before step i (i = N: the clean latent). The samplers keep
        the reference on the model's device, so this is a view, never a copy per step."""
        if self.reference is None:
            return None
        return host.place(self.reference[i], self.latents[Branch.EDIT].device)
