"""The sampler-control contract: a Control base class with no-op hooks, misspelt hooks
refused when the class is made, non-controls refused by the samplers, typed run fields,
and teardown of what was set up when a later control fails."""

from __future__ import annotations

import pytest
import torch

from xmgie.mgie_core import attention_hooks, inversion, sampler, vae
from xmgie.mgie_core.attention import Branch, Half
from xmgie.mgie_core.control import HOOKS, Control
from xmgie.mgie_core.errors import InputError
from xmgie.mgie_core.pfb import PFBControl

SRC, TGT = "a photo of a red carpet", "a photo of a yellow carpet"


@pytest.fixture(scope="module")
def inv(tiny_sd):
    g = torch.Generator().manual_seed(0)
    z0 = vae.encode(tiny_sd, torch.rand(1, 64, 64, 3, generator=g)).samples
    return inversion.invert(tiny_sd, z0, SRC, method="direct", steps=3, image_size=(64, 64))


@pytest.mark.parametrize("typo", ["before_setp", "afterstep", "set_up", "tear_down",
                                  "on_step_end", "before_each_step", "attn_hook"])
def test_a_misspelt_hook_fails_when_the_control_is_made(typo):
    with pytest.raises(TypeError, match=typo):
        type("Typo", (Control,), {typo: lambda self, run, i=0: None})


def test_hooks_and_ordinary_methods_are_accepted():
    class Fine(Control):
        def before_step(self, run, i): ...
        def loss_and_grad(self, run, z, i): ...
        def blend(self, h): ...

    class Deliberate(Control):
        NOT_HOOKS = ("on_cache",)
        def on_cache(self): ...

    assert Fine().attn_hooks(None) == [] and Deliberate()


def test_the_base_class_has_every_hook_as_a_no_op():
    c = Control()
    for name in HOOKS:
        assert callable(getattr(c, name))


def test_samplers_refuse_objects_that_are_not_controls(tiny_sd, inv):
    class DuckTyped:             # the old duck-typed protocol: no longer accepted
        def before_setp(self, run, i): ...

    with pytest.raises(InputError, match="controls.*DuckTyped.*not a sampler control"):
        sampler.edit(tiny_sd, inv, TGT, controls=[DuckTyped()])


def test_run_fields_are_typed_and_branches_are_an_enum(tiny_sd, inv):
    seen = {}

    class Reader(Control):
        def setup(self, run):
            seen.update(src=run.source_prompt, tgt=run.target_prompt, two=run.two_branch,
                        scale=run.guidance_scale, inj=run.injection, branches=set(run.latents))

        def before_step(self, run, i):
            seen.setdefault("null", run.null.shape)

    sampler.edit(tiny_sd, inv, TGT, controls=[Reader()], guidance_scale=5.0)
    assert seen["src"] == SRC and seen["tgt"] == TGT and seen["two"] and seen["scale"] == 5.0
    assert isinstance(seen["inj"], attention_hooks.InjectionHook)
    assert seen["branches"] == {Branch.REC, Branch.EDIT} and seen["null"][0] == 1
    assert Branch.REC == "rec" and f"{Half.COND}" == "cond"  # plain strings in logs and keys


def test_a_failing_setup_tears_down_the_controls_already_set_up(tiny_sd, inv):
    pfb = PFBControl(torch.ones(64, 64))

    class Broken(Control):
        def setup(self, run):
            raise InputError("words", "are bad", "good words")

    with pytest.raises(InputError):
        sampler.edit(tiny_sd, inv, TGT, controls=[pfb, Broken()])
    assert all(not m._forward_pre_hooks for m in tiny_sd.unet.modules())  # PFB's removed
    assert all(not m._forward_hooks for m in tiny_sd.unet.modules())
    assert tiny_sd.unet._xmgie_controller.patches == 0
