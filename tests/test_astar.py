"""A-STAR: segregation and retention losses on hand-built maps, and the control on the
tiny SD two-branch sampler (docs/algorithms.md section 7)."""

from __future__ import annotations

import logging

import pytest
import torch

from xmgie.mgie_core import astar, guidance, inversion, sampler, vae
from xmgie.mgie_core.control import Control
from xmgie.mgie_core.errors import InputError

SRC = "a photo of a red carpet in a room"
TGT = "a cat and a dog in a room"          # cat, dog: new tokens, not injected
WORDS = ["cat", "dog"]
STEPS = 6


# --- losses on hand-built maps -----------------------------------------------------------

def _maps(*arrays):
    return torch.stack([torch.as_tensor(a, dtype=torch.float32) for a in arrays])


def test_disjoint_concepts_do_not_segregate():
    a = torch.zeros(4, 4)
    a[:2] = 1.0
    b = torch.zeros(4, 4)
    b[2:] = 0.7
    assert astar.segregation_loss(_maps(a, b)).item() == 0.0


def test_identical_maps_give_half_per_pair():
    a = torch.rand(5, 3, generator=torch.Generator().manual_seed(0)) + 0.1  # non-square
    # sum min(A, A) / sum (A + A) = 1/2 exactly (up to rounding)
    assert astar.segregation_loss(_maps(a, a)).item() == pytest.approx(0.5, abs=1e-7)
    # three concepts: three pairs; two identical, the third disjoint from both
    c = torch.zeros(5, 3)
    c[0, 0] = 2.0
    a[0, 0] = 0.0
    assert astar.segregation_loss(_maps(a, a, c)).item() == pytest.approx(0.5, abs=1e-7)
    assert astar.segregation_loss(_maps(a, a, a)).item() == pytest.approx(1.5, abs=1e-6)


def test_segregation_sums_over_pairs_by_hand():
    a = _maps([[1.0, 0.0], [0.0, 0.0]])[0]
    b = _maps([[0.5, 0.5], [0.0, 0.0]])[0]
    c = _maps([[0.0, 1.0], [1.0, 0.0]])[0]
    # (a,b): min=0.5, sum=2 -> 0.25; (a,c): 0 -> 0; (b,c): min=0.5, sum=3 -> 1/6
    expected = 0.25 + 0.0 + 1 / 6
    assert astar.segregation_loss(_maps(a, b, c)).item() == pytest.approx(expected, abs=1e-7)
    assert astar.segregation_loss(_maps(a)).item() == 0.0     # one concept: nothing to do


def test_retention_values():
    b = torch.zeros(2, 4, 4)
    b[0, :2, :2] = 1
    b[1, 2:, 1:] = 1
    # A == B binary: 1 - |B| / (2 |B|) = 1/2 per concept, the term's minimum for this B
    assert astar.retention_loss(b.clone(), b).item() == pytest.approx(1.0, abs=1e-7)
    disjoint = torch.zeros(2, 4, 4)
    disjoint[0, 3, 3] = 1
    disjoint[1, 0, 0] = 0.5
    assert astar.retention_loss(disjoint, b).item() == pytest.approx(2.0, abs=1e-7)
    # more of the map inside the previous region: a lower loss
    half = b * 0.5
    assert astar.retention_loss(b.clone(), b) < astar.retention_loss(half, b) \
        < astar.retention_loss(disjoint, b)
    with pytest.raises(ValueError):
        astar.retention_loss(b[:1], b)


def _confined_map(cells: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A concept's peak-normalised map from logits (16 pixels x 3 tokens) with CAM's -inf
    bias outside the first ``cells`` pixels (the word's mask), and the logits."""
    logits = torch.randn(16, 3, generator=torch.Generator().manual_seed(1)).requires_grad_()
    bias = torch.zeros(16, 3)
    bias[cells:, 1] = torch.finfo(torch.float32).min        # token 1 only inside the mask
    A = torch.softmax(logits + bias, -1)[:, 1].reshape(1, 4, 4)
    return astar.peak_normalise(A), logits


@pytest.mark.parametrize("cells", [1, 3])
def test_one_confined_concept_has_a_retention_gradient_only_over_several_cells(cells):
    """Why A-STAR with one word that CAM confines to the mask applied no update on a
    small image: where the mask covers a single cell of the map, the peak-normalised map
    is that cell at 1 and exact zeros elsewhere whatever the latent, so retention (the
    only term with one concept) is constant; over several cells it has a gradient."""
    A, logits = _confined_map(cells)
    B = astar.binarise(A.detach())
    (grad,) = torch.autograd.grad(astar.retention_loss(A, B), logits)
    if cells == 1:
        assert A.detach().flatten().tolist() == [1.0] + [0.0] * 15
        assert grad.abs().max().item() == 0.0
    else:
        assert grad.abs().max().item() > 1e-4


def test_binarise_relative_to_each_peak():
    A = _maps([[0.1, 0.6], [1.0, 0.4]], [[0.02, 0.01], [0.0, 0.005]], [[0.0, 0.0], [0.0, 0.0]])
    B = astar.binarise(A, 0.5)
    assert B.dtype == torch.float32 and set(B.unique().tolist()) <= {0.0, 1.0}
    assert B[0].tolist() == [[0, 1], [1, 0]]
    assert B[1].tolist() == [[1, 1], [0, 0]]     # scale-free: same rule at 50x smaller
    assert B[2].sum() == 0                       # an all-zero map has no region
    assert astar.binarise(A, 1.0)[0].tolist() == [[0, 0], [1, 0]]


def test_concept_maps_average_heads_layers_tokens():
    hw = (2, 3)
    m1 = torch.zeros(2, 6, 77)
    m2 = torch.zeros(2, 6, 77)
    m1[0, :, 5] = 1.0                 # head 0 only -> head mean 0.5
    m2[:, :, 6] = torch.arange(6.0)   # token 6, both heads
    m2[:, :, 7] = 1.0
    A = astar.concept_maps({"l1": m1, "l2": m2}, [[5], [6, 7]], hw)
    assert A.shape == (2, 2, 3) and A.dtype == torch.float32
    torch.testing.assert_close(A[0], torch.full(hw, 0.25))
    torch.testing.assert_close(A[1], ((torch.arange(6.0) + 1) / 2 / 2).reshape(hw))
    with pytest.raises(ValueError):
        astar.concept_maps({"l1": m1, "l3": torch.zeros(2, 16, 77)}, [[5]], hw)
    assert astar.map_hw((16, 24), 24) == (4, 6)
    N = astar.peak_normalise(A)
    torch.testing.assert_close(N.flatten(1).amax(1), torch.ones(2))


# --- the control on the tiny SD --------------------------------------------------------------

@pytest.fixture(scope="module")
def sd(tiny_sd):
    return tiny_sd


@pytest.fixture(scope="module")
def inv(sd):
    g = torch.Generator().manual_seed(0)
    z0 = vae.encode(sd, torch.rand(1, 128, 128, 3, generator=g)).samples
    return inversion.invert(sd, z0, SRC, method="negative_prompt", steps=STEPS,
                            image_size=(128, 128))


class SegProbe(Control):
    """Measures L_seg (peak-normalised maps, as the control sees them) on the edit
    latent at every step, without gradient and without changing anything; with a
    ``target`` tap, also L_ret against the retention region the control used at that step,
    so ``total`` is the very objective the control descends."""

    def __init__(self, target: TargetTap | None = None):
        self.seg: dict[int, float] = {}
        self.total: dict[int, float] = {}
        self.target = target

    def setup(self, run):
        from xmgie.mgie_core.tokens import word_token_groups

        self.groups = word_token_groups(run.sd.tokenizer, run.target_prompt, WORDS)
        self.layers = guidance.layers_at_factor(run.sd.unet, 4)

    def before_step(self, run, i):
        with torch.no_grad():
            z = run.latents["edit"]
            maps = guidance.edit_maps(run, z, i, self.layers)
            hw = astar.map_hw(z.shape[-2:], next(iter(maps.values())).shape[-2])
            A = astar.peak_normalise(astar.concept_maps(maps, self.groups, hw))
            self.seg[i] = float(astar.segregation_loss(A))
            B = self.target.regions.get(i) if self.target is not None else None
            self.total[i] = self.seg[i] + (float(astar.retention_loss(A, B))
                                           if B is not None else 0.0)


class TargetTap(Control):
    """Chained before the A-STAR control: keeps the retention region it will use at each
    step (the previous step's binarised maps), before the control replaces it."""

    def __init__(self, control):
        self.control, self.regions = control, {}

    def before_step(self, run, i):
        prev = self.control._prev
        self.regions[i] = prev.clone() if prev is not None else None


@pytest.fixture(scope="module")
def runs(sd, inv):
    """The same edit without and with A-STAR (defaults); the probe runs after the
    control, so at step i it sees the latent the sampler denoises (after the update)."""
    base_probe = SegProbe()
    base = sampler.edit(sd, inv, TGT, controls=[base_probe])
    ctl = astar.AStarControl(WORDS)
    tap = TargetTap(ctl)
    probe = SegProbe(tap)
    res = sampler.edit(sd, inv, TGT, controls=[tap, ctl, probe])
    return base, base_probe, res, probe, ctl


def test_segregation_lower_than_without_control(runs):
    base, base_probe, res, probe, ctl = runs
    n_opt = round(0.5 * STEPS)
    assert [h["step"] for h in ctl.history] == list(range(n_opt))    # one update a step
    assert all(h["applied"] for h in ctl.history)
    # retention is 0 only at the first optimised step (no previous map yet)
    assert ctl.history[0]["ret"] == 0.0 and all(h["ret"] > 0 for h in ctl.history[1:])
    # the first step starts from the same latent as the run without the control
    assert ctl.history[0]["seg"] == pytest.approx(base_probe.seg[0], abs=1e-6)
    for i in range(n_opt):
        # each update lowers the objective it descends (L_seg + L_ret, retention against
        # the region of the step before) at that step's latent
        before = ctl.history[i]["seg"] + ctl.history[i]["ret"]
        assert probe.total[i] < before, (i, probe.total, ctl.history)
    # the first update (no retention term yet) lowers segregation itself, below the run
    # without the control at the same step; later steps trade it against retention
    assert probe.seg[0] < ctl.history[0]["seg"] and probe.seg[0] < base_probe.seg[0]
    assert not torch.equal(res.edit, base.edit)
    assert res.edit.dtype == torch.float32 and torch.isfinite(res.edit).all()


class LatentWatch(Control):
    def __init__(self, store, key):
        self.store, self.key = store, key

    def before_step(self, run, i):
        self.store.setdefault(i, {})[self.key] = run.latents["edit"].clone()


def test_update_only_inside_the_mask(sd, inv, mask):
    seen: dict[int, dict] = {}
    ctl = astar.AStarControl(WORDS, use_mask=True)
    sampler.edit(sd, inv, TGT, mask=mask, controls=[LatentWatch(seen, "pre"), ctl,
                                                    LatentWatch(seen, "post")])
    inside = attention_mask_at_latent(mask, seen[0]["pre"])
    n_opt = round(0.5 * STEPS)
    for i, d in seen.items():
        pre, post = d["pre"], d["post"]
        assert torch.equal(pre[~inside], post[~inside]), i        # bit-identical outside
        if i < n_opt:
            assert not torch.equal(pre[inside], post[inside]), i
        else:
            assert torch.equal(pre, post), i


def attention_mask_at_latent(mask, z):
    from xmgie.mgie_core.attention import MaskPyramid

    m = MaskPyramid(mask).at(tuple(z.shape[-2:]), z.device)[:, None] > 0.5
    return m.expand_as(z)


def test_without_use_mask_updates_everywhere(sd, inv, mask):
    seen: dict[int, dict] = {}
    ctl = astar.AStarControl(WORDS, use_mask=False, steps_fraction=1 / STEPS)
    sampler.edit(sd, inv, TGT, mask=mask, controls=[LatentWatch(seen, "pre"), ctl,
                                                    LatentWatch(seen, "post")])
    inside = attention_mask_at_latent(mask, seen[0]["pre"])
    assert not torch.equal(seen[0]["pre"][~inside], seen[0]["post"][~inside])
    assert torch.equal(seen[1]["pre"], seen[1]["post"])


def test_non_finite_gradient_is_skipped_with_a_warning(sd, inv, runs, monkeypatch, caplog):
    base = runs[0]
    real = astar.segregation_loss
    monkeypatch.setattr(astar, "segregation_loss", lambda A: real(A) * float("nan"))
    ctl = astar.AStarControl(WORDS)
    with caplog.at_level(logging.WARNING, logger="xmgie.mgie_core.guidance"):
        res = sampler.edit(sd, inv, TGT, controls=[ctl])
    n_opt = round(0.5 * STEPS)
    warnings = [r for r in caplog.records if "non-finite gradient" in r.getMessage()]
    assert len(warnings) == n_opt and all("A-STAR" in r.getMessage() for r in warnings)
    assert len(ctl.history) == n_opt and not any(h["applied"] for h in ctl.history)
    # every update skipped: exactly the edit without the control
    assert torch.equal(res.edit, base.edit)


def test_words_missing_from_the_prompt(sd, inv):
    with pytest.raises(InputError, match="horse"):
        sampler.edit(sd, inv, TGT, controls=[astar.AStarControl(["cat", "horse"])])
    with pytest.raises(InputError, match="A-STAR concept words: is empty and there is no "
                                         "edit plan"):
        sampler.edit(sd, inv, TGT, controls=[astar.AStarControl([" ", ""])])
    with pytest.raises(InputError, match="threshold"):
        astar.AStarControl(WORDS, threshold=0.0)


def test_node_chains_controls(mask):
    from xmgie.nodes._common import CONTROLS
    from xmgie.nodes.astar import NODES, AStarControlNode

    assert NODES == [AStarControlNode]
    assert AStarControlNode.NODE_ID == "XMGIEAStarControl"
    assert AStarControlNode.CATEGORY == "xmgie/editing/controls"
    assert AStarControlNode.RETURN_TYPES == (CONTROLS,)
    spec = AStarControlNode.INPUT_TYPES()
    for group in spec.values():
        for name, (_, opts) in group.items():
            assert opts.get("tooltip"), name
    assert spec["optional"]["controls"][0] == CONTROLS
    first = object()
    (out,) = AStarControlNode().make(" cat, dog ,", 0.4, 1.5, 0.6, mask=mask,
                                     controls=[first])
    assert out[0] is first and len(out) == 2
    ctl = out[1]
    assert isinstance(ctl, astar.AStarControl)
    assert ctl.words == ["cat", "dog"] and ctl.steps_fraction == 0.4
    assert ctl.step_size == 1.5 and ctl.threshold == 0.6 and ctl.mask is not None
    (alone,) = AStarControlNode().make("cat", 0.5, 2.5, 0.5)
    assert len(alone) == 1 and alone[0].mask is None


def test_single_concept_first_step_is_a_no_op_not_an_error(sd, inv):
    """One concept: no pair to segregate and no previous map at step 0 -> constant loss."""
    ctl = astar.AStarControl(["cat"], steps_fraction=0.34)
    res = sampler.edit(sd, inv, TGT, controls=[ctl])
    assert torch.isfinite(res.edit).all()
    first = [h for h in ctl.history if h["step"] == 0]
    assert first and all(h["seg"] == 0 and h["ret"] == 0 for h in first)
    assert any(h["ret"] > 0 for h in ctl.history if h["step"] > 0)
