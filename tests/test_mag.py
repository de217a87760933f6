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


# --- fewer passes: schedule, fewer optimised steps, early exit ------------------------------

def _counted_edit(sd, inv, mask, **settings):
    """An edit with MAG (4 iterations unless set): (control, result, UNet forwards,
    backwards) counted by the batch runner's pass counter."""
    from xmgie.runner.model_cache import PassCounter

    ctl = mag.MAGControl(mask, ["yellow"], **{"iterations": 4, **settings})
    counter = PassCounter()
    counter.watch(sd)
    try:
        res = sampler.edit(sd, inv, TGT, mask=mask, controls=[ctl])
    finally:
        counter.close()
    return ctl, res, counter.forward, counter.backward


def test_iteration_schedule_by_hand():
    """iterations_at: full in the first late_start share, then a drop or a straight line
    (rounded half up), over the k-th of n_opt optimised steps."""
    def per_step(n_opt=25, **kw):
        ctl = mag.MAGControl(None, ["w"], **kw)
        return [ctl.iterations_at(k, n_opt) for k in range(n_opt)]

    assert per_step() == [15] * 25                                   # MAG-Edit: off
    assert per_step(late_iterations=5) == [15] * 13 + [5] * 12       # 0.5 x 25 = 12.5 -> 13
    assert per_step(late_iterations=1, late_start=0.2) == [15] * 5 + [1] * 20
    lin = per_step(iterations=5, late_iterations=1, late_start=0.0, schedule="linear",
                   n_opt=5)
    assert lin == [5, 4, 3, 2, 1]
    lin = per_step(iterations=4, late_iterations=1, late_start=0.5, schedule="linear",
                   n_opt=6)                                           # full 0..2, then down
    assert lin == [4, 4, 4, 3, 2, 1]
    assert sum(per_step(late_iterations=1, late_start=0.0, schedule="linear")) == 201


def test_each_option_changes_the_passes_as_stated(sd, inv, mask):
    """Per optimised step: one reconstruction forward (cached source) and the step's
    iterations as edit-row forward+backward pairs; the sampler adds one forward per step."""
    n_opt = round(0.5 * STEPS)                                       # 3 of 6
    base = _counted_edit(sd, inv, mask)
    assert base[2:] == (STEPS + n_opt + 4 * n_opt, 4 * n_opt)        # (21, 12)
    cases = {
        # late_start 0.34 of 3 -> 1 full step, then 1 iteration: 4 + 1 + 1
        "step": (dict(late_iterations=1, late_start=0.34), [4, 1, 1], n_opt),
        # linear from step 0: 4, 2.5 -> 3, 1
        "linear": (dict(late_iterations=1, late_start=0.0, schedule="linear"), [4, 3, 1],
                   n_opt),
        # fewer optimised steps: 0.34 x 6 -> 2
        "opt_fraction": (dict(opt_fraction=0.34), [4, 4], 2),
        "fewer iterations": (dict(iterations=2), [2, 2, 2], n_opt),
    }
    for name, (settings, per_step, n) in cases.items():
        ctl, res, fwd, bwd = _counted_edit(sd, inv, mask, **settings)
        assert bwd == sum(per_step), name
        assert fwd == STEPS + n + sum(per_step), name
        assert ctl.passes == {"source": n, "edit": sum(per_step)}, name
        assert [sum(1 for h in ctl.history if h["step"] == i) for i in range(n)] == \
            per_step, name
        assert res.report.get("MAG").applied == sum(per_step), name


def test_defaults_and_neutral_options_reproduce_the_edit_exactly(sd, inv, mask):
    """With the new options off (the defaults), or set so they change nothing (a late
    count equal to the full one; an exit target never reached), the edit, the history and
    the passes are those of MAG-Edit's schedule, bit for bit."""
    ctl = mag.MAGControl(mask, ["yellow"])
    assert (ctl.late_iterations, ctl.stop_activation, ctl.stop_improvement) == (None, 0, 0)
    assert not ctl.early_exit
    base_ctl, base, fwd, bwd = _counted_edit(sd, inv, mask)
    top = max(h["activation"] for h in base_ctl.history)
    for settings in (dict(late_iterations=4, late_start=0.0),
                     dict(late_iterations=4, late_start=0.0, schedule="linear"),
                     dict(stop_activation=min(1.0, top + 1e-3))):
        ctl, res, f, b = _counted_edit(sd, inv, mask, **settings)
        assert torch.equal(res.edit, base.edit), settings
        assert ctl.history == base_ctl.history, settings
        assert (f, b) == (fwd, bwd) and not ctl.stops, settings


class _FixedLoop(mag.MAGControl):
    """MAG-Edit's loop as it was before the schedule and the early exit: ``iterations``
    updates in every optimised step, nothing read (the yardstick for the defaults)."""

    def before_step(self, run, i):
        if i >= self._n_opt:
            return
        from xmgie.mgie_core import grad_mode
        from xmgie.mgie_core.attention import Branch

        with grad_mode.autograd():
            z = grad_mode.autograd_input(run.latents[Branch.EDIT]).float()
            step = guidance.sigma(run, i)
            for it in range(self.iterations):
                zv = z.detach().requires_grad_(True)
                maps = guidance.edit_maps(run, zv, i, self._layers)
                loss, act = self.loss(maps, tuple(z.shape[-2:]))
                grad = guidance.gradient(self.scale * loss, zv, self.name, i)
                self._records.append((i, it, loss.detach(), act))
                ok = guidance.count_update(run, self.name, grad, i)
                z = guidance.masked_update(z, grad.float(), self._m64, step, ok)
            run.latents[Branch.EDIT] = z.detach()


def test_default_loop_is_the_fixed_loop(sd, inv, mask):
    fixed = _FixedLoop(mask, ["yellow"], iterations=3)
    want = sampler.edit(sd, inv, TGT, mask=mask, controls=[fixed])
    ctl = mag.MAGControl(mask, ["yellow"], iterations=3)
    got = sampler.edit(sd, inv, TGT, mask=mask, controls=[ctl])
    assert torch.equal(got.edit, want.edit)
    assert ctl.history == fixed.history and len(ctl.history) == 3 * round(0.5 * STEPS)


def test_early_exit_stops_when_the_ratio_is_reached(sd, inv, mask):
    """The target set to the activation the full run measures at step 0, iteration 1: the
    exit run makes the same two updates there (the same latent), reads that activation,
    finds it reached, and ends step 0 after iteration 1's update."""
    base_ctl, base, _, base_bwd = _counted_edit(sd, inv, mask)
    first = [h for h in base_ctl.history if h["step"] == 0]
    target = first[1]["activation"]
    assert first[1]["activation"] < first[-1]["activation"]    # the full run goes further
    ctl, res, fwd, bwd = _counted_edit(sd, inv, mask, stop_activation=target,
                                       check_iteration=1)
    assert ctl.stops.get(0) == 1
    assert [h for h in ctl.history if h["step"] == 0] == first[:2]
    # every step that exits makes two pairs instead of four
    n_opt = round(0.5 * STEPS)
    assert bwd == 4 * n_opt - 2 * len(ctl.stops) < base_bwd
    assert not torch.equal(res.edit, base.edit)
    # an unreachable target reads every step and never stops
    ctl, res, _, bwd = _counted_edit(sd, inv, mask, stop_activation=1.0)
    assert not ctl.stops and bwd == base_bwd
    torch.testing.assert_close(res.edit, base.edit, rtol=0, atol=0)


def test_early_exit_on_a_loss_that_stops_improving(sd, inv, mask):
    """A required 99% fall of the loss per iteration is never met: every optimised step
    ends after its check iteration (2 here: three pairs instead of four)."""
    n_opt = round(0.5 * STEPS)
    ctl, _, _, bwd = _counted_edit(sd, inv, mask, stop_improvement=0.99, check_iteration=2)
    assert ctl.stops == {i: 2 for i in range(n_opt)}
    assert bwd == 3 * n_opt
    # a check at the last iteration has nothing left to save: no read, no exit
    ctl, _, _, bwd = _counted_edit(sd, inv, mask, stop_improvement=0.99, check_iteration=3)
    assert not ctl.stops and bwd == 4 * n_opt


def test_early_exit_reads_the_device_once_per_optimised_step(sd, inv, mask):
    """The exit's data-dependent branch: exactly one host read in each optimised step
    (activation and losses in one transfer), none in the other steps; without the exit,
    none at all (tests/test_syncs.py checks the whole fast path)."""
    import sys
    from pathlib import Path

    bench = str(Path(__file__).resolve().parent.parent / "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    import syncs

    n_opt = round(0.5 * STEPS)
    for settings, reads in ((dict(stop_activation=1.0), 1), ({}, 0)):
        ctl = mag.MAGControl(mask, ["yellow"], iterations=3, **settings)
        with syncs.SyncCounter(trace=True) as c:
            sampler.edit(sd, inv, TGT, mask=mask, controls=[ctl])
        per = [sum(s[k] for k in syncs.KINDS + ("placement",))
               for s in c.stage("editing").steps]
        assert per == [reads] * n_opt + [0] * (STEPS - n_opt), (settings, per, c.events)


def test_bad_schedule_and_exit_settings_are_named():
    bad = [(dict(late_iterations=0), "late_iterations"), (dict(schedule="cosine"), "schedule"),
           (dict(late_start=1.5), "late_start"), (dict(stop_activation=2.0), "stop_activation"),
           (dict(stop_improvement=1.0), "stop_improvement"), (dict(iterations=0), "iterations"),
           (dict(stop_improvement=0.1, check_iteration=0), "check_iteration")]
    for settings, name in bad:
        with pytest.raises(InputError, match=f"^{name}:"):
            mag.MAGControl(None, ["w"], **settings)


def test_node_takes_the_new_inputs_and_loads_old_values():
    """The node's new inputs are optional with tooltips; a workflow saved before them (the
    eight widget values of the required inputs) makes MAG-Edit's schedule."""
    from xmgie.nodes.editing import MAGControlNode

    optional = MAGControlNode.INPUT_TYPES()["optional"]
    new = ("late_iterations", "late_start", "schedule", "stop_activation", "stop_improvement",
           "check_iteration")
    assert all(optional[k][1]["tooltip"] for k in new)
    required = list(MAGControlNode.INPUT_TYPES()["required"])
    saved = ["yellow", "", 0.5, 15, 2.5, False, 5.5, 0.3]      # a v0.2 workflow's widgets
    (ctls,) = MAGControlNode().make(**dict(zip(required, saved, strict=True)))
    assert ctls[0].late_iterations is None and not ctls[0].early_exit
    (ctls,) = MAGControlNode().make(words="yellow", late_iterations=2, schedule="linear",
                                    stop_activation=0.3, check_iteration=2)
    c = ctls[0]
    assert (c.late_iterations, c.schedule, c.stop_activation, c.check_iteration) == \
        (2, "linear", 0.3, 2)
