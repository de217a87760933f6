"""Identity guidance (docs/algorithms.md section 8) on tiny models: the control raises IPS,
updates only inside the mask, keeps a float32 finite gradient path, skips non-finite
gradients, bounds memory (checkpoint / downscale), and the nodes chain."""

from __future__ import annotations

import logging

import pytest
import torch

from xmgie.mgie_core import identity_guidance as idg
from xmgie.mgie_core import inversion, sampler, vae
from xmgie.mgie_core.errors import InputError
from xmgie.mgie_core.models import identity as id_lib

SRC = "a photo of a red carpet in a room"
TGT = "a photo of a yellow carpet in a room"
STEPS = 6


@pytest.fixture(scope="module")
def sd(tiny_sd):
    return tiny_sd   # shared session model: these tests change no weights


@pytest.fixture(scope="module")
def encoder(tiny_models):
    return id_lib.load_clip_vision(str(tiny_models("clip_vision")), device="cpu")


@pytest.fixture(scope="module")
def inv(sd, image):
    z0 = vae.encode(sd, image).samples
    return inversion.invert(sd, z0, SRC, method="direct", steps=STEPS, image_size=(128, 128))


@pytest.fixture(scope="module")
def embedding(encoder, image, mask):
    return idg.embed_identity(encoder, image, mask)


def _ips(sd, encoder, latent, image, mask):
    edited = vae.decode(sd, latent)
    with torch.no_grad():
        return float(id_lib.ips(encoder, id_lib.crop_to_mask(edited, mask),
                                id_lib.crop_to_mask(image, mask)))


class Probe(idg.IdentityGuidance):
    """Changes nothing: at one step, computes the loss gradient in every memory mode."""

    probe_step = 2

    def before_step(self, run, i):
        if i != self.probe_step:
            return
        z = run.latents["edit"].clone()
        self.grads = {}
        for mode in idg.MEMORY_MODES:
            self.memory = mode
            self.grads[mode] = self.loss_and_grad(run, z, i)[1]
        self.decoder_forward_left = [
            "forward" in b.__dict__ for b in [run.sd.vae.decoder.mid_block,
                                              *run.sd.vae.decoder.up_blocks]]
        assert torch.equal(run.latents["edit"], z)


class Recording(idg.IdentityGuidance):
    """The real control, recording z before/after each update and each gradient."""

    def setup(self, run):
        super().setup(run)
        self.records, self.grads = [], []

    def loss_and_grad(self, run, z, i):
        loss, grad = super().loss_and_grad(run, z, i)
        self.grads.append(grad)
        return loss, grad

    def before_step(self, run, i):
        before = run.latents["edit"].clone()
        super().before_step(run, i)
        self.records.append((i, before, run.latents["edit"].clone()))


@pytest.fixture(scope="module")
def baseline(sd, inv, encoder, embedding, mask):
    probe = Probe(encoder, embedding)
    res = sampler.edit(sd, inv, TGT, mask=mask, controls=[probe])
    return res, probe


@pytest.fixture(scope="module")
def guided(sd, inv, encoder, embedding, mask):
    ctrl = Recording(encoder, embedding, start=0.0, end=0.8, weight=0.3)
    return sampler.edit(sd, inv, TGT, mask=mask, controls=[ctrl]), ctrl


# --- the acceptance point -----------------------------------------------------------

def test_guidance_raises_ips_and_lowers_the_loss(sd, encoder, image, mask, baseline, guided):
    (base, _probe), (res, ctrl) = baseline, guided
    # The baseline is the same seeded run; its probe changes nothing (next test).
    ips_base = _ips(sd, encoder, base.edit, image, mask)
    ips_guided = _ips(sd, encoder, res.edit, image, mask)
    assert ips_guided > ips_base + 0.02, (ips_guided, ips_base)
    losses = [h["loss"] for h in ctrl.history]
    assert [h["step"] for h in ctrl.history] == [0, 1, 2, 3, 4]   # window 0 .. 0.8 * 6
    half = len(losses) // 2
    assert sum(losses[half:]) / (len(losses) - half) < sum(losses[:half]) / half, losses
    assert losses[-1] < losses[0]


def test_probe_baseline_equals_the_plain_run(sd, inv, mask, baseline):
    plain = sampler.edit(sd, inv, TGT, mask=mask)
    assert torch.equal(plain.edit, baseline[0].edit)


def test_updates_stay_inside_the_mask_with_float32_gradients(guided, mask):
    _, ctrl = guided
    assert len(ctrl.records) == STEPS
    m = torch.nn.functional.interpolate(mask[:, None], size=(16, 16), mode="bicubic",
                                        align_corners=False) > 0.5
    changed = 0
    for i, before, after in ctrl.records:
        outside = ~m.expand_as(before)
        assert torch.equal(before[outside], after[outside]), f"step {i} changed outside"
        if i in range(0, 5):
            assert not torch.equal(before[~outside], after[~outside])
            changed += 1
        else:
            assert torch.equal(before, after)
        assert after.dtype == torch.float32
    assert changed == 5
    assert ctrl.grads and all(g.dtype == torch.float32 and torch.isfinite(g).all()
                              and g.abs().sum() > 0 for g in ctrl.grads)


# --- memory modes -------------------------------------------------------------------

def test_memory_modes_give_finite_gradients_and_checkpoint_is_exact(baseline):
    _, probe = baseline
    g = probe.grads
    for mode in idg.MEMORY_MODES:
        assert g[mode].dtype == torch.float32 and torch.isfinite(g[mode]).all(), mode
        assert g[mode].abs().sum() > 0, mode
    torch.testing.assert_close(g["checkpoint"], g["none"], rtol=1e-4, atol=1e-7)
    # downscale's gradient is an approximation: constant over 2x2 latent blocks
    assert torch.equal(g["downscale"][..., ::2, ::2], g["downscale"][..., 1::2, 1::2])
    assert probe.decoder_forward_left == [False] * len(probe.decoder_forward_left)


def test_checkpointed_decode_matches_plain_decode(sd):
    x0 = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    a = idg.decode_for_grad(sd, x0, "none")
    b = idg.decode_for_grad(sd, x0, "checkpoint")
    torch.testing.assert_close(a, b)
    assert idg.decode_for_grad(sd, x0, "downscale").shape == (1, 64, 64, 3)
    with pytest.raises(InputError, match="memory"):
        idg.decode_for_grad(sd, x0, "tiles")


def test_half_precision_vae_gives_a_float32_gradient(sd):
    import copy
    import dataclasses

    half = dataclasses.replace(sd, vae=copy.deepcopy(sd.vae).to(torch.bfloat16),
                               dtype=torch.bfloat16)
    x0 = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2),
                     requires_grad=True)
    img = idg.decode_for_grad(half, x0, "checkpoint")
    assert img.dtype == torch.float32
    (grad,) = torch.autograd.grad(img.mean(), x0)
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all() and grad.abs().sum() > 0


# --- non-finite gradients -------------------------------------------------------------

def test_non_finite_gradient_is_skipped_with_a_warning(sd, inv, encoder, embedding, mask,
                                                        monkeypatch, caplog):
    real = idg.decode_for_grad

    def poisoned(sd_, x0, memory="checkpoint"):
        return real(sd_, x0, memory) * torch.tensor(float("nan"))

    monkeypatch.setattr(idg, "decode_for_grad", poisoned)
    ctrl = Recording(encoder, embedding, start=0.0, end=0.2, weight=0.3)
    with caplog.at_level(logging.WARNING):
        res = sampler.edit(sd, inv, TGT, mask=mask, controls=[ctrl])
    assert "non-finite gradient" in caplog.text
    assert len(ctrl.grads) == 1 and not torch.isfinite(ctrl.grads[0]).all()
    for _, before, after in ctrl.records:
        assert torch.equal(before, after)
    assert torch.isfinite(res.edit).all()


# --- embedding, crops, errors -------------------------------------------------------------

def test_embedding_and_box_crop_match_the_identity_module(encoder, image, mask, embedding):
    with torch.no_grad():
        expected = encoder.embed(id_lib.crop_to_mask(image, mask, 0.1))
    torch.testing.assert_close(embedding.vector, expected)
    assert embedding.cropped and embedding.kind == "clip_vision"
    assert embedding.vector.dtype == torch.float32 and embedding.vector.device.type == "cpu"
    box = idg.mask_box(mask, 0.1)
    assert torch.equal(idg.crop_box(image, box), id_lib.crop_to_mask(image, mask, 0.1))
    plain = idg.embed_identity(encoder, image)
    assert not plain.cropped and "128x128" in plain.source


def test_errors_say_what_to_do(sd, inv, encoder, embedding, tiny_models):
    with pytest.raises(InputError, match="mask"):
        sampler.edit(sd, inv, TGT, controls=[idg.IdentityGuidance(encoder, embedding)])
    with pytest.raises(InputError, match="memory"):
        idg.IdentityGuidance(encoder, embedding, memory="tiles")
    with pytest.raises(InputError, match="start/end"):
        idg.IdentityGuidance(encoder, embedding, start=0.8, end=0.2)
    face = id_lib.load_face_recognition(str(tiny_models("face_recognition")), device="cpu")
    with pytest.raises(InputError, match="same identity encoder"):
        idg.IdentityGuidance(face, embedding)


# --- nodes ------------------------------------------------------------------------------

def test_nodes_embed_and_chain(encoder, image, mask):
    from xmgie.nodes import identity_guidance as nodes
    from xmgie.nodes.editing import PFBControlNode

    assert [n.__name__ for n in nodes.NODES] == ["IdentityEmbed", "IdentityGuidanceNode"]
    for cls in nodes.NODES:
        assert cls.NODE_ID.startswith("XMGIE") and cls.DESCRIPTION
        spec = cls.INPUT_TYPES()
        for group in spec.values():
            for name, (_, opts) in group.items():
                assert opts.get("tooltip"), (cls.NODE_ID, name)
    assert nodes.IdentityEmbed.CATEGORY == "xmgie/identity"
    assert nodes.IdentityGuidanceNode.CATEGORY == "xmgie/editing/controls"
    assert nodes.IdentityEmbed.RETURN_TYPES == ("XMGIE_ID_EMBEDDING",)

    (emb,) = nodes.IdentityEmbed().embed(encoder, image, mask, 0.1)
    assert isinstance(emb, idg.IdentityEmbedding) and emb.cropped
    (pfb,) = PFBControlNode().make(mask, "object", 1.0, True)
    (chain,) = nodes.IdentityGuidanceNode().make(encoder, emb, 0.2, 0.7, 0.05, "downscale",
                                                  mask=mask, controls=pfb)
    assert len(chain) == 2 and chain[0] is pfb[0]
    ctrl = chain[1]
    assert isinstance(ctrl, idg.IdentityGuidance)
    assert (ctrl.start, ctrl.end, ctrl.weight, ctrl.memory) == (0.2, 0.7, 0.05, "downscale")
    assert ctrl.mask is not mask and torch.equal(ctrl.mask, mask)
    (alone,) = nodes.IdentityGuidanceNode().make(encoder, emb, 0.2, 0.7, 0.05, "checkpoint")
    assert len(alone) == 1

