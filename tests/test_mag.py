"""MAG (docs/algorithms.md section 6): losses on hand-built maps, and the control on the tiny
SD model: rising activation, masked updates, truncation, caching, precision, NaNs."""

from __future__ import annotations

import logging

import pytest
import torch

from xmgie.mgie_core import guidance, inversion, mag, sampler, vae
from xmgie.mgie_core.errors import InputError

SRC = "a photo of a red carpet in a room"
TGT = "a photo of a yellow carpet in a room"
STEPS = 6


# --- losses with known answers ------------------------------------------------------------

def _map(heads=2, hw=4, word=5, inside_val=1.0, outside_val=0.0, inside=(0, 1)):
    """Rows sum to 1: ``word`` gets inside_val at inside pixels, the rest goes to BOS."""
    A = torch.zeros(heads, hw, 77)
    for p in range(hw):
        v = inside_val if p in inside else outside_val
        A[:, p, word] = v
        A[:, p, 0] = 1 - v
    return A


def test_token_ratio_all_mass_inside_gives_zero():
    inside = torch.tensor([True, True, False, False])
    A = _map()
    assert mag.token_ratio_loss([A], [[5]], [inside]) == 0


def test_token_ratio_half_gives_quarter_per_map():
    inside = torch.tensor([True, True, False, False])
    A = _map(inside_val=0.5)
    loss = mag.token_ratio_loss([A, A.clone()], [[5]], [inside, inside])
    torch.testing.assert_close(loss, torch.tensor(0.25))


def test_token_ratio_multi_word_multi_map():
    inside = torch.tensor([True, False, True, False])
    A1 = torch.zeros(1, 4, 77)
    A1[:, :, 0] = 1.0
    A1[:, [0, 2], 0] = 0.2
    A1[:, [0, 2], 5] = 0.8        # word 1: ratio 0.8 inside
    A2 = torch.zeros(1, 4, 77)
    A2[:, :, 0] = 1.0
    A2[:, [0, 2], 0] = 0.6
    A2[:, [0, 2], 7] = 0.4        # word 2 on map 2: 0.4 inside
    # word 1 spans tokens 5 and 6: mean over its tokens halves the ratio
    groups = [[5, 6], [7]]
    got = mag.token_ratio_loss([A1, A2], groups, [inside, inside])
    act = {(0, 0): 0.4, (0, 1): 0.0, (1, 0): 0.0, (1, 1): 0.4}
    expected = sum((1 - a) ** 2 for a in act.values()) / 4
    torch.testing.assert_close(got, torch.tensor(expected))


def test_token_ratio_divides_by_the_row_sum():
    """After CAM in probability mode rows may not sum to 1: r = word / row sum."""
    inside = torch.tensor([True, True])
    A = torch.zeros(1, 2, 77)
    A[:, :, 5] = 0.3
    A[:, :, 0] = 0.3
    torch.testing.assert_close(mag.token_ratio_activation(A, [5], inside), torch.tensor([0.5]))


def test_spatial_and_negative_terms():
    inside = torch.tensor([True, True, False, False])
    A = _map()
    torch.testing.assert_close(mag.spatial_ratio_loss([A], [[5]], [inside]), torch.tensor(-1.0))
    A_out = _map(inside=(2, 3))
    torch.testing.assert_close(mag.spatial_ratio_loss([A_out], [[5]], [inside]),
                               torch.tensor(3.0))
    torch.testing.assert_close(mag.negative_loss([A], [[5]], [inside]), torch.tensor(1.0))
    torch.testing.assert_close(mag.negative_loss([A_out], [[5]], [inside]), torch.tensor(0.0))


# --- on the tiny model ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd(tiny_sd):
    return tiny_sd


@pytest.fixture(scope="module")
def mask():
    m = torch.zeros(128, 128)
    m[32:96, 40:104] = 1
    return m


@pytest.fixture(scope="module")
def inv(sd):
    g = torch.Generator().manual_seed(0)
    z0 = vae.encode(sd, torch.rand(1, 128, 128, 3, generator=g)).samples
    return inversion.invert(sd, z0, SRC, method="direct", steps=STEPS, image_size=(128, 128))


def test_activation_rises_and_outside_stays_bit_identical(sd, inv, mask, monkeypatch):
    real = guidance.masked_update
    seen = []

    def checked(z, grad, m, step_size, ok=None):
        out = real(z, grad, m, step_size, ok)
        outside = (m <= 0.5).expand_as(z)
        assert torch.equal(out[outside], z[outside])
        assert (out[~outside] != z[~outside]).any()
        seen.append(step_size)
        return out

    monkeypatch.setattr(guidance, "masked_update", checked)
    ctl = mag.MAGControl(mask, ["yellow"], iterations=6)
    sampler.edit(sd, inv, TGT, mask=mask, controls=[ctl])
    n_opt = round(0.5 * STEPS)
    assert len(seen) == n_opt * 6
    for i in range(n_opt):
        acts = [h["activation"] for h in ctl.history if h["step"] == i]
        assert acts[-1] > acts[0], (i, acts)
    # sigma_t = sqrt((1 - abar)/abar) is the step size, decreasing with t
    assert seen[0] > seen[-1]


def test_reconstruction_maps_once_per_step(sd, inv, mask):
    ctl = mag.MAGControl(mask, ["yellow"], iterations=4)
    cached = sampler.edit(sd, inv, TGT, mask=mask, controls=[ctl])
    n_opt = round(0.5 * STEPS)
    assert ctl.passes == {"source": n_opt, "edit": n_opt * 4}
    # the reference pattern (recompute every iteration) gives the same result
    ref = mag.MAGControl(mask, ["yellow"], iterations=4, cache_source=False)
    again = sampler.edit(sd, inv, TGT, mask=mask, controls=[ref])
    assert ref.passes == {"source": n_opt * 4, "edit": n_opt * 4}
    torch.testing.assert_close(again.edit, cached.edit, atol=1e-6, rtol=0)


def test_truncated_forward_matches_full_forward(sd, inv, mask):
    """Same maps and the same gradient whether the loss forward stops after the last
    16x16 layer or runs the whole UNet."""
    grabbed = {}

    class Probe(mag.MAGControl):
        def before_step(self, run, i):
            if i == 1:
                results = []
                for truncate in (True, False):
                    z = run.latents["edit"].detach().clone().requires_grad_(True)
                    maps = guidance.edit_maps(run, z, i, self._layers, truncate=truncate)
                    loss, _ = self.loss(maps, tuple(z.shape[-2:]))
                    (g,) = torch.autograd.grad(loss, z)
                    results.append((maps, g))
                grabbed["results"] = results
            super().before_step(run, i)

    ctl = Probe(mask, ["yellow"], iterations=1)
    sampler.edit(sd, inv, TGT, mask=mask, controls=[ctl])
    (m_t, g_t), (m_f, g_f) = grabbed["results"]
    assert m_t.keys() == m_f.keys() and len(m_t) == 3     # tiny UNet: 3 maps at factor 4
    for k in m_t:
        torch.testing.assert_close(m_t[k], m_f[k], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(g_t, g_f, atol=1e-6, rtol=1e-4)
    assert g_t.abs().sum() > 0


def test_truncation_really_stops_the_forward(sd, inv, mask):
    calls = []
    handle = sd.unet.up_blocks[3].register_forward_hook(lambda *a: calls.append(1))
    try:
        ctl = mag.MAGControl(mask, ["yellow"], iterations=2)
        sampler.edit(sd, inv, TGT, mask=mask, controls=[ctl])
    finally:
        handle.remove()
    # up_blocks.3 runs only in the sampler's own calls: one per step, none for MAG's
    assert len(calls) == STEPS


def test_late_steps_blend_background_from_reconstruction(sd, inv, mask):
    ctl = mag.MAGControl(mask, ["yellow"], iterations=1, blend_fraction=0.5)
    res = sampler.edit(sd, inv, TGT, mask=mask, controls=[ctl])
    m = guidance.dilate3(ctl._pyramid.at((16, 16), "cpu")[:, None]) > 0.5
    out = ~m.expand_as(res.edit)
    assert torch.equal(res.edit[out], res.reconstruction[out])
    assert not torch.equal(res.edit[~out], res.reconstruction[~out])


def test_half_precision_unet_keeps_float32_latent_and_loss(sd, inv, mask):
    """bf16 UNet (CPU has no fast fp16): the optimised latent and loss stay float32."""
    import copy

    half = copy.deepcopy(sd)
    half.unet.to(torch.bfloat16)
    half.dtype = torch.bfloat16
    seen = {}

    class Probe(mag.MAGControl):
        def loss(self, maps, hw):
            total, act = super().loss(maps, hw)
            seen["loss"] = total.dtype
            seen["map"] = next(iter(maps.values())).dtype
            return total, act

    ctl = Probe(mask, ["yellow"], iterations=2, opt_fraction=0.34)
    res = sampler.edit(half, inv, TGT, mask=mask, controls=[ctl])
    assert seen == {"loss": torch.float32, "map": torch.bfloat16}
    assert res.edit.dtype == torch.float32 and torch.isfinite(res.edit).all()


def test_non_finite_gradient_skips_the_update(sd, inv, mask, monkeypatch, caplog):
    real = mag.token_ratio_loss
    monkeypatch.setattr(mag, "token_ratio_loss",
                        lambda *a: real(*a) * torch.tensor(float("nan")))
    before = []

    class Probe(mag.MAGControl):
        def before_step(self, run, i):
            before.append(run.latents["edit"].clone())
            super().before_step(run, i)
            if i < self._n_opt:
                assert torch.equal(run.latents["edit"], before[-1])

    with caplog.at_level(logging.WARNING):
        res = sampler.edit(sd, inv, TGT, mask=mask, controls=[Probe(mask, ["yellow"],
                                                                    iterations=2)])
    assert "non-finite gradient" in caplog.text
    assert torch.isfinite(res.edit).all()


def test_bad_words(sd, inv, mask):
    with pytest.raises(InputError):
        sampler.edit(sd, inv, TGT, mask=mask, controls=[mag.MAGControl(mask, ["purple"])])
    # No words and no plan (neither on the control nor on the sampler): an error naming
    # both, when the sampler sets the control up.
    with pytest.raises(InputError, match="MAG words: is empty and there is no edit plan"):
        sampler.edit(sd, inv, TGT, mask=mask, controls=[mag.MAGControl(mask, [])])


def test_controls_stopping_at_different_layers_share_the_step_cache(sd, inv, mask):
    """Two cache users in one step (different stop layers) do not evict each other."""
    from xmgie.mgie_core import guidance

    class TwoReaders(mag.MAGControl):
        def before_step(self, run, i):
            if i < self._n_opt:
                for _ in range(2):
                    guidance.source_cache(run, i, self._layers[-1])
                    guidance.source_cache(run, i, None)
            super().before_step(run, i)

    ctl = TwoReaders(mask, ["yellow"], iterations=2)
    sampler.edit(sd, inv, TGT, mask=mask, controls=[ctl])
    n_opt = round(0.5 * STEPS)
    # per optimised step: one truncated and one full reconstruction pass, no more
    assert ctl.passes["source"] == 2 * n_opt
