"""Shared conventions for the pack's nodes (classic ComfyUI style).

Every node class:
  * has an id starting with ``PREFIX`` (registered in ``nodes/__init__.py``),
  * a ``CATEGORY`` under ``ROOT_CATEGORY``, a ``DESCRIPTION`` and a ``DISPLAY_NAME``,
  * a ``"tooltip"`` in the options of every input (``inp`` below helps),
  * a short ``FUNCTION`` that calls into ``mgie_core`` (no logic here).
Images are float32 [B,H,W,3] in 0..1, masks [B,H,W]; inputs are cloned before any
in-place change; results go back to the CPU.

Models: every node's FUNCTION runs inside ``memory.use(...)`` of the loaded models among
its inputs (:func:`uses_models`, applied to every node by the registry), so the host (or
the standalone registry) puts them on the compute device first and, standalone with
``--offload``, back on the CPU afterwards. Loader nodes set ``LOADS_MODELS = True``:
their model inputs (the SD 1.5 model under MGIE's UNet) are only read, not run.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from ..mgie_core import memory
from ..mgie_core.images import FITS, check_mask
from ..mgie_core.plan import PLAN_RULE, from_plan

PREFIX = "XMGIE"
ROOT_CATEGORY = "xmgie"

# Custom socket types (transparent dataclasses from mgie_core).
SD_MODEL = "XMGIE_SD"            # mgie_core.models.sd.SDModel (4- or 8-channel UNet)

# ComfyUI's own LATENT {"samples": [B,4,h,w]}: RAW VAE latents (no 0.18215), as core
# VAEEncode gives and VAEDecode takes (mgie_core.vae.to_comfy_latent / comfy_latent_samples).
# Before 0.2.0 the pack passed its own scaled "XMGIE_LATENT"; saved graphs keep working
# because node ids, input names and output indices did not change.
LATENT = "LATENT"
SAM_MODEL = "XMGIE_SAM"
CAPTIONER = "XMGIE_CAPTIONER"
VLM_MODEL = "XMGIE_VLM"
IDENTITY_ENCODER = "XMGIE_IDENTITY"
INVERSION = "XMGIE_INVERSION"    # mgie_core.inversion.InversionResult
CONTROLS = "XMGIE_CONTROLS"      # list of sampling controls (PFB, MAG, identity ...)
CONDITIONING = "XMGIE_CONDITIONING"  # mgie_core.models.conditioning.Conditioning
MGIE_MODEL = "XMGIE_MGIE"        # mgie_core.models.mgie.MGIEModel
PLAN = "XMGIE_PLAN"              # mgie_core.plan.EditPlan


def plan_input(fills: str) -> tuple:
    """The optional ``plan`` input of an editing node: what it fills, and the one rule
    (``mgie_core.plan.PLAN_RULE``) by which typed inputs override it."""
    return (PLAN, inp(f"Optional edit plan (xMGIE Edit Plan From VLM / From Instruction / "
                      f"From Prompts). It fills {fills}. {PLAN_RULE}"))


def fill(name: str, typed, plan, field: str, expected: str, required: bool = True):
    """``typed`` or the plan's ``field`` by ``mgie_core.plan.PLAN_RULE``."""
    return from_plan(name, typed, plan, field, expected, required=required)


def category(sub: str = "") -> str:
    return f"{ROOT_CATEGORY}/{sub}" if sub else ROOT_CATEGORY


def inp(tooltip: str, **opts: Any) -> dict:
    """Options dict for an input, always carrying a tooltip."""
    return {"tooltip": tooltip, **opts}


def fit_input(step: str = "the model's size step (64 px for SD 1.x)") -> tuple:
    """The optional ``fit`` input of a node that encodes a photo: how a photo whose sides
    are not multiples of ``step`` is fitted (``mgie_core.images.FITS``). Optional with a
    default, so workflows saved before it existed load unchanged."""
    return (list(FITS), inp(
        f"How a photo whose sides are not multiples of {step} is fitted. pad (default): "
        "reflect-pad it, work on it, and crop the result back, so the output has the "
        "photo's exact size (the padded border is never edited: masks are padded with "
        "zeros). crop: centre-crop it (the output is smaller, as with ComfyUI's VAE "
        "Encode). refuse: stop with an error naming the size.", default="pad"))


FIT_INPUT = fit_input()


def uses_models(cls: type) -> type:
    """Wrap ``cls``'s FUNCTION so it runs inside ``memory.use`` of the loaded models among
    its arguments (models, and controls holding models, e.g. an identity encoder)."""
    if getattr(cls, "LOADS_MODELS", False):
        return cls
    fn = getattr(cls, cls.FUNCTION)
    if getattr(fn, "uses_models", False):
        return cls

    @functools.wraps(fn)
    def run(self, *args, **kwargs):
        with memory.use(*args, *kwargs.values()):
            return fn(self, *args, **kwargs)

    run.uses_models = True
    setattr(cls, cls.FUNCTION, run)
    return cls


NO_UPDATES = "no optimising stage ran"
UPDATES_TOOLTIP = ("The updates each optimising stage applied and skipped in this run, one "
                   "line per stage (e.g. 'MAG: 375 update(s) applied, 0 skipped'); wire it to "
                   "Preview Any to see it in ComfyUI.")


def report_output(result: tuple, report) -> Any:
    """A node's return value with the update counts of its run (``report``, a
    ``mgie_core.report.UpdateReport``) appended as a STRING output (its last socket,
    ``updates``) and as text in its UI output: ComfyUI keeps the UI text in the prompt's
    history, ``xmgie run`` prints it, and the STRING can be wired to a text display."""
    text = "\n".join(report.lines()) if report else NO_UPDATES
    full = (*result, text)
    if not report:
        return full
    return {"ui": {"text": report.lines(), "updates": report.as_dicts()}, "result": full}


# --- control nodes ------------------------------------------------------------------------

# A control's own mask and plan: an override of the sampler's (mgie_core/control.py).
MASK_RULE = ("Empty (not connected): the sampler's mask is used, as by every control; a mask "
             "connected here overrides it for this control only.")
PLAN_RULE_CONTROL = ("Not connected: the sampler's plan is used (a plan connected here "
                     "overrides it for this control only).")


class ControlNode:
    """The glue every control node shares: it makes one ``mgie_core`` control from its
    inputs (:meth:`control`, the subclass's one job) with its own ``mask`` checked, and
    appends it to the ``controls`` chained in before it. The sampler, not the node,
    applies the run's mask and plan to every control (``mgie_core.control``).

    ``make`` takes the node's inputs as :meth:`control` declares them (ComfyUI passes
    them by name; a Python caller may pass the leading ones in that order) plus
    ``controls``."""

    CATEGORY = category("editing/controls")
    RETURN_TYPES = (CONTROLS,)
    RETURN_NAMES = ("controls",)
    FUNCTION = "make"

    CHAIN_INPUT = (CONTROLS, inp("Controls to chain before this one."))

    @staticmethod
    def mask_input(before: str, after: str = "") -> tuple:
        """The optional own-mask input: what the mask is for, the override rule, and
        what happens with neither mask."""
        return ("MASK", inp(f"{before} {MASK_RULE}" + (f" {after}" if after else "")))

    @staticmethod
    def plan_input(what: str) -> tuple:
        return (PLAN, inp(f"{what} {PLAN_RULE_CONTROL}"))

    def control(self, *args, **kwargs):
        """The control made from this node's inputs, among them ``mask``: its own mask
        (checked) or None."""
        raise NotImplementedError

    def make(self, *args, controls=None, **kwargs):
        bound = inspect.signature(self.control).bind(*args, **kwargs)
        mask = bound.arguments.get("mask")
        if mask is not None:
            bound.arguments["mask"] = check_mask("mask", mask.clone())
        return (list(controls or []) + [self.control(*bound.args, **bound.kwargs)],)
