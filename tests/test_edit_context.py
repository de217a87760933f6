"""One edit context: the sampler owns the mask and the edit plan of a run, and every
control reads them from the run unless it was given its own (mgie_core/control.py).
Also the plan's words reaching the controls, identity guidance standing aside for a
subject that is not a person, and whole-condition CAM on the instruction path."""

from __future__ import annotations

import pytest
import torch

from xmgie.mgie_core import (
    attention,
    attention_hooks,
    diffusion,
    inversion,
    plan_rules,
    sampler,
    vae,
)
from xmgie.mgie_core.astar import AStarControl
from xmgie.mgie_core.control import Control
from xmgie.mgie_core.errors import InputError
from xmgie.mgie_core.identity_guidance import IdentityGuidance
from xmgie.mgie_core.mag import MAGControl
from xmgie.mgie_core.models import identity as id_lib
from xmgie.mgie_core.pfb import PFBControl

SRC, TGT = "a red sofa on a red carpet", "a red sofa on a yellow carpet"
PLAN = plan_rules.plan_from_prompts("make the carpet yellow", SRC, TGT)
PERSON = plan_rules.plan_from_prompts("make her hair blonde", "a woman with brown hair",
                                      "a woman with blonde hair")


@pytest.fixture(scope="module")
def inv(tiny_sd):
    g = torch.Generator().manual_seed(0)
    z0 = vae.encode(tiny_sd, torch.rand(1, 64, 64, 3, generator=g)).samples
    return inversion.invert(tiny_sd, z0, SRC, method="direct", steps=3, image_size=(64, 64))


@pytest.fixture(scope="module")
def encoder(tiny_models):
    return id_lib.load_clip_vision(str(tiny_models("clip_vision")), device="cpu")


def _mask(y0, y1, x0, x1):
    m = torch.zeros(1, 64, 64)
    m[:, y0:y1, x0:x1] = 1
    return m


RUN_MASK, OWN_MASK = _mask(8, 40, 8, 40), _mask(24, 56, 20, 60)


class _Stop(Exception):
    pass


class Seen(Control):
    """Chained after the control under test: records what the run holds once every
    earlier control is set up, then stops the run (no step is sampled)."""

    name = "seen"

    def __init__(self, before: Control):
        self.before = before

    def setup(self, run):
        self.mask, self.plan = run.mask, run.plan
        self.source, self.target = run.source_prompt, run.target_prompt
        self.region = _region(self.before)
        raise _Stop


def _set_up(sd, inv, control, *, mask=None, plan_=None, target=TGT):
    """Run the sampler until every control is set up; return what the run held."""
    seen = Seen(control)
    with pytest.raises(_Stop):
        sampler.edit(sd, inv, target, mask=mask, controls=[control, seen], plan=plan_)
    return seen


def _region(control) -> torch.Tensor:
    """The full-resolution mask a control resolved in its setup (None: none)."""
    pyr = {PFBControl: "_blend_mask", MAGControl: "_pyramid", AStarControl: "_pyramid",
           IdentityGuidance: "_pyramid"}.get(type(control))
    p = getattr(control, pyr) if pyr else None
    return None if p is None else p.mask


def _identity(encoder, mask=None, **kw):
    with torch.no_grad():
        dim = encoder.embed(torch.rand(1, 32, 32, 3)).shape[-1]
    return IdentityGuidance(encoder, torch.ones(1, dim), mask=mask, **kw)


def _all(encoder, mask=None):
    return [PFBControl(mask), MAGControl(mask, ["yellow"]), AStarControl(["yellow"], mask=mask),
            _identity(encoder, mask)]


# --- the run carries the sampler's mask and plan ----------------------------------------------

def test_the_run_carries_the_samplers_mask_plan_and_the_plans_target(tiny_sd, inv):
    seen = _set_up(tiny_sd, inv, Control(), mask=RUN_MASK, plan_=PLAN, target="")
    assert seen.plan is PLAN and seen.target == PLAN.target_prompt == TGT
    assert seen.source == SRC and torch.equal(seen.mask, RUN_MASK)
    # A typed target prompt wins over the plan's.
    seen = _set_up(tiny_sd, inv, Control(), plan_=PLAN, target="a red sofa on a blue carpet")
    assert seen.target == "a red sofa on a blue carpet"
    with pytest.raises(InputError, match="target_prompt: is empty and no plan is connected"):
        sampler.edit(tiny_sd, inv, "")


# --- one mask rule for every control ----------------------------------------------------------

@pytest.mark.parametrize("which", range(4), ids=["PFB", "MAG", "A-STAR", "identity"])
def test_every_control_uses_the_runs_mask_unless_given_its_own(tiny_sd, inv, encoder, which):
    seen = _set_up(tiny_sd, inv, _all(encoder)[which], mask=RUN_MASK)
    assert torch.equal(seen.region, RUN_MASK)
    # Its own mask overrides the run's; alone it is used too.
    seen = _set_up(tiny_sd, inv, _all(encoder, OWN_MASK)[which], mask=RUN_MASK)
    assert torch.equal(seen.region, OWN_MASK)
    seen = _set_up(tiny_sd, inv, _all(encoder, OWN_MASK)[which])
    assert torch.equal(seen.region, OWN_MASK)


@pytest.mark.parametrize("which", [0, 1, 3], ids=["PFB", "MAG", "identity"])
def test_a_control_that_needs_a_mask_and_has_neither_names_both(tiny_sd, inv, encoder, which):
    ctrl = _all(encoder)[which]
    with pytest.raises(InputError) as err:
        sampler.edit(tiny_sd, inv, TGT, controls=[ctrl])
    msg = str(err.value)
    assert msg.startswith(f"{ctrl.name} mask: is missing")
    assert "no mask of its own" in msg and "the sampler has none" in msg


def test_astar_without_any_mask_updates_everywhere(tiny_sd, inv):
    assert _set_up(tiny_sd, inv, AStarControl(["yellow"])).region is None


def test_mag_update_region_is_its_own_mask_not_the_samplers(tiny_sd, inv):
    """The old rule took MAG's update region from the sampler's mask and its loss region
    and blend from its own; now all three are one mask. Outside its own mask the edit
    latent of the optimised steps is untouched even where the sampler's mask is set."""

    class Latents(Control):
        name = "latents"

        def __init__(self):
            self.before, self.after = [], []

        def before_step(self, run, i):
            self.before.append(run.latents[attention.Branch.EDIT].clone())

    mag_own = MAGControl(OWN_MASK, ["yellow"], opt_fraction=1.0, iterations=1,
                         blend_fraction=0.0, scale=50.0)
    probe = Latents()
    sampler.edit(tiny_sd, inv, TGT, mask=RUN_MASK, controls=[mag_own, probe])
    ref = Latents()
    sampler.edit(tiny_sd, inv, TGT, mask=RUN_MASK, controls=[ref])
    # step 0: both start from z_T; MAG's first update is applied before the probe reads
    changed = (probe.before[0] - ref.before[0]).abs().sum(1)[0] > 0
    own64 = torch.nn.functional.interpolate(OWN_MASK[None], size=changed.shape,
                                            mode="bicubic")[0, 0] > 0.5
    assert changed.any() and not changed[~own64].any()


# --- the plan's words reach the controls ---------------------------------------------------------

def test_controls_take_words_from_the_runs_plan_unless_typed_or_own_plan(tiny_sd, inv):
    mag, astar = MAGControl(RUN_MASK), AStarControl()
    _set_up(tiny_sd, inv, mag, plan_=PLAN)
    _set_up(tiny_sd, inv, astar, plan_=PLAN)
    assert mag.used_words == ["yellow"] and astar.used_words == ["yellow"]
    # The source word 'red' is still in the target (the sofa): pushed out of the region.
    assert mag.used_negative_words == ["red"]

    other = plan_rules.plan_from_prompts("make the sofa blue", SRC, "a blue sofa on a red carpet")
    mag = MAGControl(RUN_MASK, plan=other)                 # its own plan overrides the run's
    _set_up(tiny_sd, inv, mag, plan_=PLAN, target=other.target_prompt)
    assert mag.used_words == ["blue"] and mag.used_negative_words == ["red"]

    mag = MAGControl(RUN_MASK, ["sofa"], ["carpet"])       # typed words win
    _set_up(tiny_sd, inv, mag, plan_=PLAN)
    assert mag.used_words == ["sofa"] and mag.used_negative_words == ["carpet"]


def test_negative_words_drop_source_words_that_left_the_target(tiny_sd, inv):
    p = plan_rules.plan_from_prompts("make the carpet yellow", "a photo of a red carpet",
                                     "a photo of a yellow carpet")
    mag = MAGControl(RUN_MASK)
    _set_up(tiny_sd, inv, mag, plan_=p, target=p.target_prompt)
    assert p.source_words == ["red"] and mag.used_negative_words == []


# --- identity guidance and the plan's subject -------------------------------------------------

def test_identity_guidance_stands_aside_when_the_subject_is_not_a_person(tiny_sd, inv, encoder):
    assert PLAN.subject_is_person is False and PERSON.subject_is_person is True
    ctrl = _identity(encoder, start=0.0, end=1.0, weight=0.5)
    res = sampler.edit(tiny_sd, inv, "", controls=[ctrl], plan=PLAN)   # no mask needed
    counts = res.report.get("identity guidance")
    assert counts.applied == 0 and counts.total_skipped == 3
    assert "stood aside: the edit plan's subject 'carpet' is not a person" in counts.line()
    assert ctrl.history == []
    plain = sampler.edit(tiny_sd, inv, TGT)
    assert torch.equal(res.edit, plain.edit)               # it changed nothing

    # A person: it acts (and needs its mask again).
    ctrl = _identity(encoder, start=0.0, end=1.0, weight=0.5)
    res = sampler.edit(tiny_sd, inv, "", mask=RUN_MASK, controls=[ctrl], plan=PERSON)
    assert res.report.get("identity guidance").applied == 3 and not ctrl.stood_aside
    # only_people off, or no plan: it acts whatever the subject.
    ctrl = _identity(encoder, start=0.0, end=1.0, weight=0.5, only_people=False)
    res = sampler.edit(tiny_sd, inv, "", mask=RUN_MASK, controls=[ctrl], plan=PLAN)
    assert res.report.get("identity guidance").applied == 3
    ctrl = _identity(encoder, start=0.0, end=1.0, weight=0.5, plan=PLAN)   # its own plan
    res = sampler.edit(tiny_sd, inv, TGT, mask=RUN_MASK, controls=[ctrl])
    assert res.report.get("identity guidance").applied == 0


# --- whole-condition CAM (the instruction path with MGIE's condition) -------------------------

def test_condition_cam_is_exactly_the_condition_inside_and_null_outside(tiny_ip2p):
    """The conditional row with keys [cond; null]: where the mask is 1 it computes what
    [cond] computes, where it is 0 what [null] computes, in every cross-attention layer
    (layers = all); the other rows with [null; null] compute what [null] computes."""
    sd = tiny_ip2p
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 8, 8, 8, generator=g)
    cond = diffusion.encode_prompt(sd, "make the carpet yellow")
    null = diffusion.encode_prompt(sd, "")
    layout = attention.BatchLayout(((attention.Branch.EDIT, attention.Half.COND),
                                    (attention.Branch.EDIT, attention.Half.IMG)))
    everywhere = ("down_blocks", "mid_block", "up_blocks")

    def call(emb, hooks):
        ctl = attention.install(sd.unet)
        ctl.hooks = hooks
        ctl.reset_call(attention.AttnContext(0, 1, layout, (8, 8)))
        try:
            with torch.no_grad():
                return diffusion.unet_eps(sd, torch.cat([z, z]), 501, emb)
        finally:
            ctl.hooks = []
            ctl.reset_call(None)

    plain = call(torch.cat([cond, null]), [])
    doubled = torch.cat([torch.cat([cond, null], 1), torch.cat([null, null], 1)])
    for fill, want in ((1.0, plain[0]), (0.0, plain[1])):
        hook = attention_hooks.ConditionCAMHook(torch.full((1, 8, 8), fill), 77, layers=everywhere)
        out = call(doubled, [hook])
        assert torch.allclose(out[0], want, atol=1e-5), fill
        assert torch.allclose(out[1], plain[1], atol=1e-5)
    # The default CAM layers: the condition still acts outside the mask elsewhere.
    hook = attention_hooks.ConditionCAMHook(torch.zeros(1, 8, 8), 77)
    out = call(doubled, [hook])
    assert not torch.allclose(out[0], plain[1], atol=1e-5)


def test_instruction_cam_from_typed_words_or_the_plan():
    from xmgie.mgie_core.models.conditioning import Conditioning

    clip = Conditioning(torch.zeros(1, 77, 8), torch.zeros(1, 77, 8),
                        "make the carpet yellow", "clip")
    mgie = Conditioning(torch.zeros(1, 77, 8), torch.zeros(1, 77, 8), "Paint it.", "mgie")
    assert sampler.instruction_cam(clip, "", None) is None
    assert sampler.instruction_cam(clip, "carpet", PLAN).in_words == ["carpet"]
    assert sampler.instruction_cam(clip, "", PLAN).in_words == ["yellow"]
    assert sampler.instruction_cam(mgie, "", PLAN).whole_condition
    assert sampler.instruction_cam(clip, "*", None).whole_condition
    other = Conditioning(clip.cond, clip.null, "paint the floor", "clip")
    assert sampler.instruction_cam(other, "", PLAN).whole_condition


def test_instruction_sampler_refuses_words_on_an_mgie_condition(tiny_ip2p):
    """Words name positions an MGIE condition does not have: refused, naming the input.
    What the sampler takes instead, whole-condition CAM, is checked against a reference:
    with a mask that covers the image the condition acts everywhere, so CAM (and PFB,
    whose blend region is then everything) must leave the edit exactly as the plain
    run's; with half the image masked, CAM must change it."""
    from xmgie.mgie_core.models.conditioning import Conditioning

    sd = tiny_ip2p
    cond = diffusion.encode_prompt(sd, "make it yellow")
    mgie = Conditioning(cond, diffusion.encode_prompt(sd, ""), "make it yellow", "mgie")
    img = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with pytest.raises(InputError, match="cam_in_words: names words, but this mgie"):
        sampler.edit_instruct(sd, img, mgie, steps=1, mask=torch.ones(1, 64, 64),
                              cam=sampler.CAMSettings(["yellow"]))
    whole = sampler.CAMSettings(whole_condition=True)

    def run(mask=None, cam=None, controls=()):
        return sampler.edit_instruct(sd, img, mgie, steps=2, mask=mask, cam=cam,
                                     source_latent=img, controls=list(controls),
                                     plan=PLAN).edit

    plain = run()
    full = run(torch.ones(1, 64, 64), whole, [PFBControl()])
    assert torch.allclose(full, plain, atol=1e-5), float((full - plain).abs().max())
    half = run(_mask(0, 32, 0, 64), whole)
    assert (half - plain).abs().max() > 1e-3


# --- nodes: one fill rule, errors naming both ----------------------------------------------

def _result(r):
    return r["result"] if isinstance(r, dict) else r


def test_nodes_fill_from_the_plan_and_name_both_when_given_neither(tiny_sd, tiny_models):
    from xmgie.mgie_core.models import sam as sam_lib
    from xmgie.nodes import editing
    from xmgie.nodes import masks as mask_nodes
    from xmgie.nodes import sam as sam_nodes

    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    invert = editing.Invert()
    args = dict(method="direct", steps=2, guidance=7.5, inner_steps=1)
    with pytest.raises(InputError, match="source_prompt: is empty and no plan is connected"):
        invert.invert(tiny_sd, image, "", **args)
    inv_, _, _ = _result(invert.invert(tiny_sd, image, "", plan=PLAN, **args))
    assert inv_.source_prompt == PLAN.source_prompt
    inv_, _, _ = _result(invert.invert(tiny_sd, image, "a sofa", plan=PLAN, **args))  # typed wins
    assert inv_.source_prompt == "a sofa"

    cam = editing.CAMSampler()
    kw = dict(cam_out_words="", cam_mode="logits", cross_replace=0.8, self_replace=0.5,
              batched=True)
    with pytest.raises(InputError, match="target_prompt: is empty and no plan is connected"):
        cam.sample(tiny_sd, inv_, "", "", **kw)
    # Without a mask the plan's edit words do not turn CAM on (CAM needs a mask); typed
    # ones ask for it.
    edited, _, _ = _result(cam.sample(tiny_sd, inv_, "", "", plan=PLAN, **kw))
    assert edited["samples"].shape[0] == 1
    with pytest.raises(InputError, match="mask: is missing"):
        cam.sample(tiny_sd, inv_, "", "yellow", plan=PLAN, **kw)

    enc = editing.EncodeInstruction()
    with pytest.raises(InputError, match="instruction: is empty and no plan is connected"):
        enc.encode(tiny_sd, "")
    (c,) = enc.encode(tiny_sd, "", plan=PLAN)
    assert c.text == PLAN.expressive_instruction

    att = mask_nodes.AttentionMask()
    with pytest.raises(InputError, match="word: is empty and no plan is connected"):
        att.run(tiny_sd, image, "a cat", "", 0.5, 0)
    with pytest.raises(InputError, match="prompt: is empty and no plan is connected"):
        att.run(tiny_sd, image, "", "cat", 0.5, 0)
    m, _ = att.run(tiny_sd, image, "", "", 0.5, 0, plan=PLAN)
    assert m.shape == (1, 64, 64) and m.sum() > 0

    sam = sam_lib.load_sam(str(tiny_models("sam")), device="cpu")
    seg = sam_nodes.SAMSegment()
    with pytest.raises(InputError, match="sd_model: is not connected"):
        seg.segment(image, sam, "", "", "", True, plan=PLAN)
    (m,) = seg.segment(image, sam, "", "", "", True, plan=PLAN, sd_model=tiny_sd)
    assert m.shape == (1, 64, 64)
