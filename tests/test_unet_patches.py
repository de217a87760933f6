"""One way of patching the UNet: the run's controller holds the attention hooks and every
module patch (PFB's blend sites), MAG's truncated forward is a hook in that list, and
when a run ends -- finished or failed -- nothing of the pack is left on the UNet."""

from __future__ import annotations

import pytest

from xmgie.mgie_core import attention, inversion, sampler, vae
from xmgie.mgie_core.control import Control
from xmgie.mgie_core.errors import InputError
from xmgie.mgie_core.mag import MAGControl
from xmgie.mgie_core.pfb import PFBControl

SRC, TGT = "a photo of a red carpet", "a photo of a yellow carpet"


@pytest.fixture(scope="module")
def inv(tiny_sd, image):
    z0 = vae.encode(tiny_sd, image).samples
    return inversion.invert(tiny_sd, z0, SRC, method="direct", steps=4,
                            image_size=tuple(image.shape[1:3]))


def _torch_hooks(unet) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(m._backward_pre_hooks) for m in unet.modules())


def _assert_clean(unet):
    ctl = unet._xmgie_controller
    assert _torch_hooks(unet) == 0
    assert ctl.hooks == [] and ctl.context is None and ctl.patches == 0


class Watch(Control):
    """Records, in every step, what is on the UNet while the run goes on."""

    def __init__(self, fail_at=None):
        super().__init__()
        self.seen, self.fail_at = [], fail_at

    def before_step(self, run, i):
        unet = run.sd.unet
        self.seen.append((_torch_hooks(unet), run.controller.patches,
                          len(run.controller.hooks)))
        if i == self.fail_at:
            raise InputError("watch", "stops the run", "nothing")


def test_nothing_stays_on_the_unet_after_a_run(tiny_sd, inv, mask):
    pfb, mag = PFBControl(mask[0]), MAGControl(mask, ["yellow"], iterations=2)
    watch = Watch()
    sampler.edit(tiny_sd, inv, TGT, mask=mask, controls=[pfb, mag, watch],
                 cam=sampler.CAMSettings(["yellow"]))
    # During the run PFB's sites were patched through the controller and nothing else
    # hooked a module; MAG's truncated passes went through the hook list.
    assert watch.seen and all(t == p > 0 and h > 0 for t, p, h in watch.seen)
    assert mag.passes["edit"] > 0
    _assert_clean(tiny_sd.unet)


def test_nothing_stays_on_the_unet_after_a_failed_run(tiny_sd, inv, mask):
    watch = Watch(fail_at=1)
    with pytest.raises(InputError, match="watch"):
        sampler.edit(tiny_sd, inv, TGT, mask=mask, controls=[PFBControl(mask[0]), watch])
    assert watch.seen[0][1] > 0
    _assert_clean(tiny_sd.unet)


def test_uninstall_removes_the_patches_and_the_processors(tiny_sd):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(tiny_sd.unet.config)
    ctl = attention.install(unet)
    ctl.patch_module(unet.mid_block, post=lambda m, a, o: o)
    assert _torch_hooks(unet) == 1 and ctl.patches == 1
    attention.uninstall(unet)
    assert _torch_hooks(unet) == 0 and ctl.patches == 0
    assert not hasattr(unet, "_xmgie_controller")
    assert not any(isinstance(p, attention.ControlledAttnProcessor)
                   for p in unet.attn_processors.values())
