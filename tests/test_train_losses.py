"""The training losses against hand computations (docs/algorithms.md §14), MGIE's worked
example included: L_ins = 11 x 0.2 = 2.2, L_edit = 0.4^2 + 0.2^2 + 0^2 = 0.20, L_all = 2.3."""

from __future__ import annotations

import math

import pytest
import torch

from xmgie.mgie_core import losses as L
from xmgie.mgie_core.errors import InputError


def _ce_logits(n_tokens: int, ce: float, vocab: int = 5, label: int = 3):
    """Logits whose cross-entropy at each of ``n_tokens`` positions is exactly ``ce``: the
    label's logit is log p with p = exp(-ce), the others share 1 - p, so the softmax
    normaliser is 1 and log_softmax(label) = -ce."""
    p = math.exp(-ce)
    row = torch.full((vocab,), math.log((1 - p) / (vocab - 1)), dtype=torch.float64)
    row[label] = math.log(p)
    logits = row.expand(n_tokens, vocab).clone()
    labels = torch.full((n_tokens,), label)
    return logits, labels


# -- MGIE: the worked example ------------------------------------------------------------
def test_worked_example_sum():
    logits, labels = _ce_logits(11, 0.2)
    # a prompt of 4 tokens before the instruction, ignored (-100), as the caller masks it
    prompt_logits = torch.randn(4, logits.shape[1], dtype=torch.float64)
    logits = torch.cat([prompt_logits, logits])[None].float()
    labels = torch.cat([torch.full((4,), L.IGNORE_INDEX), labels])[None]
    l_ins = L.instruction_ce(logits, labels, reduction="sum")
    assert l_ins.dtype == torch.float32
    assert l_ins.item() == pytest.approx(2.2, abs=1e-5)

    noise = torch.full((3,), 0.2)
    pred = torch.tensor([0.6, 0.4, 0.2])
    l_edit = L.edit_noise_mse(pred, noise, reduction="sum")
    assert l_edit.item() == pytest.approx(0.20, abs=1e-6)

    l_all = L.mgie_total(l_ins, l_edit)
    assert l_all.item() == pytest.approx(2.3, abs=1e-5)
    assert l_all.dtype == torch.float32


def test_worked_example_mean_default():
    logits, labels = _ce_logits(11, 0.2)
    labels = torch.cat([torch.full((4,), L.IGNORE_INDEX), labels])
    logits = torch.cat([torch.zeros(4, logits.shape[1], dtype=logits.dtype), logits]).float()
    # the mean is over the 11 counted tokens, not the 15 positions
    assert L.instruction_ce(logits, labels).item() == pytest.approx(0.2, abs=1e-6)
    l_edit = L.edit_noise_mse(torch.tensor([0.6, 0.4, 0.2]), torch.full((3,), 0.2))
    assert l_edit.item() == pytest.approx(0.20 / 3, abs=1e-7)
    assert L.mgie_total(torch.tensor(0.2), l_edit).item() == pytest.approx(0.2 + 0.1 / 3)


def test_instruction_ce_by_hand_and_shift():
    # one token, logits (0, ln 3) over two classes, label 1: p = 3/4, CE = ln(4/3)
    logits = torch.tensor([[0.0, math.log(3.0)]])
    assert L.instruction_ce(logits, torch.tensor([1])).item() == pytest.approx(math.log(4 / 3))
    assert L.instruction_ce(logits, torch.tensor([0])).item() == pytest.approx(math.log(4))
    # shift=True: logits at t predict the label at t + 1; the first label is never scored
    # and the last logits predict nothing
    seq = torch.tensor([[[0.0, math.log(3.0)], [math.log(3.0), 0.0], [5.0, -5.0]]])
    labels = torch.tensor([[0, 1, 0]])
    got = L.instruction_ce(seq, labels, shift=True, reduction="sum")
    assert got.item() == pytest.approx(math.log(4 / 3) + math.log(4 / 3), abs=1e-6)
    # all tokens ignored: 0, not NaN, and still differentiable
    x = torch.zeros(1, 3, 4, requires_grad=True)
    out = L.instruction_ce(x, torch.full((1, 3), L.IGNORE_INDEX))
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_instruction_ce_half_precision_logits_give_float32():
    logits, labels = _ce_logits(11, 0.2)
    got = L.instruction_ce(logits.to(torch.bfloat16), labels, reduction="sum")
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(2.2, abs=0.05)   # bf16 rounding of the logits


def test_edit_noise_mse_by_hand():
    pred = torch.tensor([[1.0, -1.0], [0.5, 2.0]])
    noise = torch.tensor([[0.0, 0.0], [0.5, 0.0]])
    # squares 1, 1, 0, 4
    assert L.edit_noise_mse(pred, noise, "sum").item() == 6.0
    assert L.edit_noise_mse(pred, noise).item() == 1.5
    assert L.edit_noise_mse(pred.half(), noise.half()).dtype == torch.float32


# -- xMGIE -------------------------------------------------------------------------------
def test_recon_l1_by_hand():
    pred = torch.tensor([[[[0.0, 1.0], [0.5, 0.25]]]])      # [1,1,2,2]
    target = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    # |d| = 1, 0, 0.5, 0.25 -> mean 1.75 / 4
    assert L.recon_l1(pred, target).item() == pytest.approx(0.4375)
    mask = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    # masked: (1 + 0.5) / 2
    assert L.recon_l1(pred, target, mask).item() == pytest.approx(0.75)
    # a [B,1,H,W] mask weights every channel of an RGB image
    p3, t3 = pred.expand(1, 3, 2, 2), target.expand(1, 3, 2, 2)
    assert L.recon_l1(p3, t3, mask).item() == pytest.approx(0.75)
    # an empty mask: 0, no NaN
    assert L.recon_l1(pred, target, torch.zeros_like(mask)).item() == 0.0
    with pytest.raises(InputError, match="recon_l1"):
        L.recon_l1(pred, target[..., :1])


def test_gan_generator_by_hand():
    fake = torch.tensor([2.0, -1.0, 0.0, 1.0])
    assert L.adversarial_generator(fake, "hinge").item() == pytest.approx(-0.5)
    # (1^2 + 2^2 + 1^2 + 0^2) / 4
    assert L.adversarial_generator(fake, "lsgan").item() == pytest.approx(1.5)
    # -log sigmoid(x) = log(1 + e^-x)
    want = sum(math.log1p(math.exp(-x)) for x in (2.0, -1.0, 0.0, 1.0)) / 4
    assert L.adversarial_generator(fake, "vanilla").item() == pytest.approx(want)
    assert L.adversarial_generator(fake.half(), "hinge").dtype == torch.float32
    with pytest.raises(InputError, match="kind"):
        L.adversarial_generator(fake, "wgan")


def test_gan_critic_by_hand():
    real = torch.tensor([2.0, 0.5])
    fake = torch.tensor([-2.0, 0.5])
    # hinge: relu(1-2)=0, relu(1-0.5)=0.5 -> 0.25; relu(1-2)=0, relu(1.5)=1.5 -> 0.75
    assert L.adversarial_critic(real, fake, "hinge").item() == pytest.approx(1.0)
    # lsgan: ((1)^2 + (-0.5)^2)/2 = 0.625; (4 + 0.25)/2 = 2.125
    assert L.adversarial_critic(real, fake, "lsgan").item() == pytest.approx(2.75)
    want = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(-0.5))) / 2 \
        + (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(0.5))) / 2
    assert L.adversarial_critic(real, fake, "vanilla").item() == pytest.approx(want)
    # a perfect critic under the hinge has loss 0
    assert L.adversarial_critic(torch.tensor([3.0]), torch.tensor([-3.0])).item() == 0.0


def test_identity_l2_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    # rows: 1 and 4 -> mean 2.5
    assert L.identity_l2(a, b).item() == pytest.approx(2.5)
    assert L.identity_l2(a[0], b[0]).item() == pytest.approx(1.0)
    assert L.identity_l2(a.half(), b.half()).dtype == torch.float32


def test_xmgie_total_paper_weights():
    terms = {"recon": torch.tensor(0.4), "adv": torch.tensor(2.0), "id": torch.tensor(0.6)}
    # 1.0 * 0.4 + 0.1 * 2.0 + 0.5 * 0.6
    assert L.xmgie_total(terms).item() == pytest.approx(0.9)
    # the engine adds the adversarial term itself: a term may be left out
    assert L.xmgie_total({"recon": terms["recon"], "id": terms["id"]}).item() \
        == pytest.approx(0.7)
    assert L.xmgie_total(terms, {"recon": 2.0, "adv": 0.0, "id": 1.0}).item() \
        == pytest.approx(1.4)
    with pytest.raises(InputError, match="no weight"):
        L.xmgie_total({"lpips": torch.tensor(1.0)})
    with pytest.raises(InputError, match="reduction"):
        L.edit_noise_mse(torch.zeros(1), torch.zeros(1), reduction="none")


def test_gradients_are_float32_and_finite_from_half_inputs():
    x = torch.randn(2, 4, dtype=torch.bfloat16, requires_grad=True)
    y = torch.randn(2, 4, dtype=torch.bfloat16)
    loss = L.xmgie_total({"recon": L.recon_l1(x, y), "id": L.identity_l2(x, y),
                          "adv": L.adversarial_generator(x, "vanilla")})
    assert loss.dtype == torch.float32
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad.float()).all()
