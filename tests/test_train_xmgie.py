"""xMGIE's training task on the tiny models: a tiny run's loss falls (and a run that
cannot learn does not), the logged total is the weighted sum of the logged terms, the
gradients are finite float32 on exactly the trained parts while every frozen weight
stays as it was, L_id alone reaches IE and LoRA, the critic's real and fake samples are
pasted alike, CAM's words come from the pair's prompts, validation leaves the trained
modules trainable, the export (with the UNet's LoRA adapter) loads back, given models
are left untouched, and bad settings name their key."""

from __future__ import annotations

import json
import types

import pytest
import torch


def _accelerator():
    """A real one-process CPU accelerator (the engine resets accelerate's process-wide
    state before each run, so one made here does not leak into the engine's)."""
    from accelerate import Accelerator

    from xmgie.training.engine import _reset_accelerate_state

    _reset_accelerate_state()
    return Accelerator(cpu=True)


@pytest.fixture(scope="module")
def env(tiny_root):
    """--tiny finds the tiny SD and CLIP vision encoder in the test run's tiny folder."""
    from xmgie.mgie_core import tiny
    from xmgie.training.xmgie_task import TINY_FAMILIES

    tiny.ensure_tiny_models(tiny_root, TINY_FAMILIES)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(tiny.ENV_TINY_DIR, str(tiny_root))
        yield tiny_root


def _config(**overrides):
    from xmgie.training.config import load_config

    return load_config("xmgie", tiny=True, overrides=overrides or None)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    from xmgie.training.data import load_pairs
    from xmgie.training.synthetic import make_synthetic

    folder = make_synthetic(tmp_path_factory.mktemp("pairs") / "syn", n=4, size=64, seed=5)
    return load_pairs(folder, resolution=64)


@pytest.fixture(scope="module")
def batch(pairs):
    from xmgie.training.data import collate

    return collate([pairs[i] for i in range(4)])


@pytest.fixture(scope="module")
def task(env):
    from xmgie.training.xmgie_task import build_task

    return build_task(_config(), _accelerator(), True)


def _run(tmp_path, name, steps, **overrides):
    from xmgie.training.engine import train

    return train(_config(**overrides), tmp_path / name, max_steps=steps)


def _means(rows, key="loss"):
    values = [r[key] for r in rows if key in r]
    n = max(1, len(values) // 10)
    return sum(values[:n]) / n, sum(values[-n:]) / n


STEPS = 120
# Observed over 120 steps of 2 pairs (means of the first and last 12 steps, seeds 0, 1,
# 2): the total falls by 0.067 to 0.10 (about 0.95 -> 0.87; the adversarial term, a
# two-player game, may rise meanwhile) and l_diffusion by 0.097 to 0.114 (0.84 -> 0.73);
# with nothing learning the total rose by 0.054 and l_diffusion by 0.015. The image L1
# (l_recon: one low-noise row a step, the photo pasted outside the mask) is 0.03 to 0.05
# and moves within its noise at this scale (0.049 -> 0.050, 0.043 -> 0.034, 0.050 ->
# 0.046), so the test does not claim it falls.
MARGIN = 0.03
ONE_PAIR_STEPS = {"batch.global": 2, "steps.checkpoint_every": 0}


@pytest.fixture(scope="module")
def run(env, tmp_path_factory):
    """One tiny run on the synthetic pairs: every step logged, validation at 60 and 120."""
    return _run(tmp_path_factory.mktemp("xmgie-run"), "run", STEPS,
                **{**ONE_PAIR_STEPS, "steps.val_every": STEPS // 2})


def test_tiny_run_loss_falls_and_a_run_that_cannot_learn_does_not(run, env, tmp_path):
    rows = [json.loads(line) for line in (run.out_dir / "metrics.jsonl").read_text()
            .splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    first, last = _means(rows)
    assert last < first - MARGIN, (first, last)
    first, last = _means(rows, "l_diffusion")
    assert last < first - MARGIN, (first, last)
    # the control: the same run with a learning rate too small to move anything
    frozen = _run(tmp_path, "control", STEPS,
                  **{**ONE_PAIR_STEPS, "optim.lr": 1e-12, "optim.critic_lr": 1e-12,
                     "steps.val_every": 0, "early_stopping.metric": None})
    for key in ("loss", "l_diffusion"):
        c_first, c_last = _means(frozen.metrics, key)
        assert not c_last < c_first - MARGIN, (key, c_first, c_last)


def test_logged_total_is_the_weighted_sum_of_the_terms(run):
    """The paper's three weighted terms plus the diffusion term's, with the shipped
    config's weights."""
    w = {"recon": 1.0, "adv": 0.1, "id": 0.5, "diffusion": 1.0}
    for r in run.metrics:
        if "loss" not in r:
            continue
        total = (w["recon"] * r["l_recon"] + w["adv"] * r["l_adv"] + w["id"] * r["l_id"]
                 + w["diffusion"] * r["l_diffusion"])
        assert r["loss"] == pytest.approx(total, rel=1e-5, abs=1e-6)
        # 2 pairs per step, half of them low-noise: one image row per step
        assert r["low_t_rows"] == 1.0 and r["l_recon"] > 0 and r["l_id"] > 0
        assert r["l_diffusion"] > 0


def test_validation_and_export(run, env):
    from xmgie.mgie_core.trained import load_xmgie, read_kind

    vals = [r for r in run.metrics if "val_psnr" in r]
    assert [r["step"] for r in vals] == [STEPS // 2, STEPS]
    from xmgie.training.xmgie_task import VAL_METRICS

    for r in vals:
        assert {k for k in r if k.startswith("val_")} == set(VAL_METRICS)
        assert all(r[k] == r[k] for k in VAL_METRICS)   # not NaN
    final = run.final_dir
    assert read_kind(final) == "xmgie"
    trained = load_xmgie(final)
    assert trained.pfb is not None and trained.ie is not None
    assert float(trained.ie.proj[0].weight.abs().sum()) > 0      # IE moved from zero
    meta = json.loads((final / "trained.json").read_text())
    assert meta["unet_lora"]["folder"] == "unet_lora"
    assert (final / "unet_lora").is_dir()


def test_gradients_finite_float32_on_trained_parts_frozen_weights_unchanged(task, batch):
    m = task.model
    trained = {n: p for n, p in m.named_parameters() if p.requires_grad}
    assert {n.split(".")[0] for n in trained} == {"unet", "pfb", "ie"}
    assert all("lora" in n for n in trained if n.startswith("unet."))
    frozen = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    frozen.update({f"buffer {n}": b.clone() for n, b in m.named_buffers()})
    before = {n: p.detach().clone() for n, p in trained.items()}
    opt = torch.optim.Adam(trained.values(), lr=1e-2)
    copt = torch.optim.Adam(task.critic.parameters(), lr=1e-2)
    for seed in range(2):
        torch.manual_seed(seed)
        out = m(batch)
        assert all(v.dtype == torch.float32 for k, v in out.items() if v.dim() == 0)
        loss = out["loss"] + task.weights["adv"] * task.generator_adversarial(
            task.critic, out["fake"])
        opt.zero_grad()
        loss.backward()
        for n, p in trained.items():
            assert p.grad is not None and p.grad.dtype == torch.float32, n
            assert torch.isfinite(p.grad).all(), n
        assert float(m.pfb.raw.grad.abs().sum()) > 0
        assert all(float(p.grad.abs().sum()) > 0 for p in m.ie.parameters())
        opt.step()
        c = task.critic_loss(task.critic, out["real"].detach(), out["fake"].detach())
        copt.zero_grad()
        c.backward()
        assert all(torch.isfinite(p.grad).all() for p in task.critic.parameters())
        copt.step()
    now = {n: p for n, p in m.named_parameters() if not p.requires_grad}
    now.update({f"buffer {n}": b for n, b in m.named_buffers()})
    assert set(now) == set(frozen)
    assert all(torch.equal(now[n], frozen[n]) for n in frozen)
    assert all(not torch.equal(trained[n].detach(), before[n]) for n in trained
               if "lora_A" not in n)   # B, a_l and IE move from their zero-effect starts


def test_trainable_state_round_trips_through_a_wrapper_and_refuses_another_run(task):
    """The shared helpers of training/task.py: the task's model is found inside a
    DDP-like wrapper (``.module``); a state loads back exactly; one with a tensor missing
    or of another shape is refused, naming the checkpoint."""
    from xmgie.mgie_core.errors import InputError
    from xmgie.training.task import unwrap
    from xmgie.training.xmgie_task import XMGIEModel

    wrapper = torch.nn.Module()
    wrapper.module = task.model
    assert unwrap(wrapper, XMGIEModel) is task.model
    with pytest.raises(TypeError, match="XMGIEModel"):
        unwrap(torch.nn.Linear(1, 1), XMGIEModel)
    state = task.trainable_state(wrapper)
    assert "pfb.raw" in state and all(not v.requires_grad for v in state.values())
    moved = {k: v + 1 for k, v in state.items()}
    try:
        task.load_trainable_state(wrapper, moved)
        now = task.trainable_state(task.model)
        assert all(torch.equal(now[k], moved[k]) for k in state)
        short = {k: v for k, v in state.items() if k != "pfb.raw"}
        with pytest.raises(InputError, match=r"checkpoint.*1 trained tensors missing"):
            task.load_trainable_state(wrapper, short)
        with pytest.raises(InputError, match=r"checkpoint.*1 of another shape"):
            task.load_trainable_state(wrapper, {**state, "pfb.raw": torch.zeros(1)})
    finally:
        task.load_trainable_state(task.model, state)
    assert all(torch.equal(v, state[k]) for k, v in task.trainable_state(task.model).items())


def test_no_low_noise_row_gives_zero_image_terms_and_finite_adversarial(task, batch):
    m = task.model
    settings = m.settings
    m.settings = type(settings)({**settings.model, "image_fraction": 0.0}, settings.weights,
                                settings.lora)
    try:
        out = m(batch)
    finally:
        m.settings = settings
    assert float(out["low_t_rows"]) == 0 and out["fake"].shape[0] == 0
    assert float(out["l_recon"]) == 0 and float(out["l_id"]) == 0
    assert float(out["l_diffusion"]) > 0
    g = task.generator_adversarial(task.critic, out["fake"])
    c = task.critic_loss(task.critic, out["real"], out["fake"])
    assert float(g) == 0 and float(c) == 0
    (out["loss"] + g).backward()
    c.backward()


def test_cam_acts_on_the_new_words_inside_the_mask_only(task):
    from xmgie.mgie_core.attention import MaskPyramid
    from xmgie.training.xmgie_task import _Call, _RowCAM

    m = task.model
    tok = m.sd_info.tokenizer
    src, tgt = "a blue square on a grey wall", "a red square on a grey wall"
    tokens = m._cam_tokens([tgt, "make it red"], [src, src], [True, False])
    red = tok("red", add_special_tokens=False)["input_ids"]
    ids = m.tokens([tgt])[0].tolist()
    assert [ids[k] for k in torch.nonzero(tokens[0]).flatten().tolist()] == red
    assert not tokens[1].any()                      # no target prompt: no CAM
    mask = torch.zeros(2, 8, 8)
    mask[:, :4] = 1
    call = _Call(2, MaskPyramid(mask), torch.ones(2, dtype=torch.bool), torch.zeros(2, 4),
                 MaskPyramid(mask), tokens)
    hook = _RowCAM(m)
    m._call = call
    try:
        layer = types.SimpleNamespace(is_cross=True, in_set=lambda layers: True)
        ctx = types.SimpleNamespace(latent_hw=(8, 8))
        hook.qk_override(layer, ctx, torch.zeros(4, 1, 64, 2), None)
        bias = hook.logit_bias(layer, ctx, 64, 77, "cpu", torch.float32)
        assert bias.shape == (4, 1, 64, 77)
        k = int(torch.nonzero(tokens[0])[0])
        inside, outside = bias[0, 0, :32], bias[0, 0, 32:]
        assert (inside == 0).all() and (outside[:, k] < -1e30).all()
        assert (outside.sum(0)[torch.arange(77) != k] == 0).all()
        assert (bias[1:] == 0).all()                # other rows, reference rows: nothing
        hook.qk_override(layer, ctx, torch.zeros(2, 1, 64, 2), None)   # reference pass
        assert hook.logit_bias(layer, ctx, 64, 77, "cpu", torch.float32) is None
    finally:
        m._call = None


def test_validation_keeps_the_modules_trainable_and_lora_export_loads_back(task, batch,
                                                                            tmp_path, env):
    from diffusers import UNet2DConditionModel

    from xmgie.mgie_core import tiny

    m = task.model
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.requires_grad and "lora_B" in n:
                p.add_(0.05)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    with torch.no_grad():
        metrics = task.validate(m, [batch])
    assert {"val_psnr", "val_ssim", "val_l1"} <= set(metrics)
    assert {n for n, p in m.named_parameters() if p.requires_grad} == trainable
    task.export(m, tmp_path / "final")
    fresh = UNet2DConditionModel.from_pretrained(
        tiny.tiny_path(env, "sd_diffusers") / "unet").eval()
    meta = json.loads((tmp_path / "final" / "trained.json").read_text())["unet_lora"]
    assert meta["alpha"] != meta["r"]             # the adapter's scale travels with it
    fresh.load_lora_adapter(str(tmp_path / "final" / meta["folder"]), prefix=None,
                            weight_name=meta["weight_name"], local_files_only=True)
    m._call = None
    m.controller.clear()
    z, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    emb = torch.randn(1, 77, 32)
    with torch.no_grad():
        want = m.unet(z, t, encoder_hidden_states=emb).sample
        got = fresh(z, t, encoder_hidden_states=emb).sample
    assert torch.allclose(got, want, atol=1e-5)


def test_given_models_are_left_untouched(env, tiny_sd, batch):
    from xmgie.mgie_core import tiny
    from xmgie.mgie_core.models.identity import load_identity_encoder
    from xmgie.training.xmgie_task import build_task

    enc = load_identity_encoder("clip_vision", str(tiny.tiny_path(env, "clip_vision")))
    state = {k: v.clone() for k, v in tiny_sd.unet.state_dict().items()}
    hooks = len(tiny_sd.unet._forward_hooks) + len(tiny_sd.unet._forward_pre_hooks)
    t = build_task(_config(), _accelerator(), True, models={"sd": tiny_sd, "identity": enc})
    assert t.model.unet is not tiny_sd.unet and t.model.vae is tiny_sd.vae
    out = t.model(batch)
    out["loss"].backward()
    assert {k: v for k, v in tiny_sd.unet.state_dict().items()}.keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in tiny_sd.unet.state_dict().items())
    assert not any(p.requires_grad for p in tiny_sd.unet.parameters())
    assert len(tiny_sd.unet._forward_hooks) + len(tiny_sd.unet._forward_pre_hooks) == hooks
    assert not any(n for n, _ in tiny_sd.unet.named_modules() if "lora" in n)


@pytest.mark.parametrize("model,key", [
    ({"unknown": 1}, "model.unknown"),
    ({"identity": {"kind": "dino", "name": "x"}}, "model.identity.kind"),
    ({"pfb": {"preset": "middle"}}, "model.pfb.preset"),
    ({"image_fraction": 2}, "model.image_fraction"),
    ({"critic": {"kind": "wgan"}}, "model.critic.kind"),
    ({"critic": 3}, "model.critic"),
    ({"critic": {"n_layers": 0}}, "model.critic.n_layers"),
    ({"validation": {"inversion": "exact"}}, "model.validation.inversion"),
    ({"ie": {"sites": "mid_block"}}, "model.ie.sites"),
    ({"unet_lora": {"r": 0}}, "model.unet_lora.r"),
])
def test_bad_settings_name_the_file_and_their_key(model, key):
    from xmgie.training.config import TrainConfigError
    from xmgie.training.xmgie_task import Settings

    cfg = types.SimpleNamespace(model=model, loss={}, precision="no", source="runs/my.yaml")
    with pytest.raises(TrainConfigError, match="runs/my.yaml: " + key.replace(".", r"\.")):
        Settings.from_config(cfg)
    for loss, bad in (({"style": 1.0}, "style"), ({"diffusion": -1}, "diffusion")):
        with pytest.raises(TrainConfigError, match=rf"runs/my.yaml: loss\.{bad}"):
            Settings.from_config(types.SimpleNamespace(model={}, loss=loss,
                                                       source="runs/my.yaml"))


def test_shipped_config_holds_the_papers_settings_and_tiny_shrinks_it():
    from xmgie.training.config import load_config
    from xmgie.training.xmgie_task import Settings

    paper = load_config("xmgie")
    assert paper.task == "xmgie"
    assert (paper.optim.lr, paper.optim.betas, paper.optim.weight_decay) == \
        (1e-4, (0.9, 0.999), 0.0)
    assert paper.batch.global_ == 32
    assert (paper.early_stopping.metric, paper.early_stopping.mode) == ("val_psnr", "max")
    s = Settings.from_config(paper)
    assert s.weights == {"recon": 1.0, "adv": 0.1, "id": 0.5, "diffusion": 1.0}
    assert s.lora is not None and s.model["image_max_t"] == 300
    tiny = load_config("xmgie", tiny=True)
    assert tiny.data.resolution == 64 and tiny.precision == "no"
    assert tiny.batch.per_device == 2 and tiny.steps.max <= 100


def test_critic_too_deep_for_the_resolution_is_refused_before_loading(env):
    from xmgie.mgie_core.errors import InputError
    from xmgie.training.xmgie_task import build_task

    with pytest.raises(InputError, match=r"xmgie\.yaml: model\.critic\.n_layers.*"
                                         r"data\.resolution is 64"):
        build_task(_config(**{"model.critic.n_layers": 3}), _accelerator(), True)


def _with(m, weights=None, **model):
    """``m`` with other settings (restore ``m.settings`` afterwards)."""
    s = m.settings
    m.settings = type(s)({**s.model, **model}, {**s.weights, **(weights or {})}, s.lora)
    return s


def test_identity_loss_alone_reaches_ie_and_lora(task, batch):
    """L_id alone (every other weight 0) sends a finite, non-zero float32 gradient to IE
    (through the decoder, the UNet's features at IE's sites and the identity encoder)
    and to the UNet's LoRA adapters."""
    m = task.model
    saved = _with(m, {"recon": 0.0, "adv": 0.0, "id": 1.0, "diffusion": 0.0},
                  image_fraction=1.0)
    try:
        m.zero_grad()
        torch.manual_seed(4)
        out = m(batch)
        assert float(out["low_t_rows"]) == 4 and float(out["l_id"]) > 0
        assert float(out["loss"]) == pytest.approx(float(out["l_id"]), rel=1e-6)
        out["loss"].backward()
        ie = list(m.ie.named_parameters())
        lora_b = [(n, p) for n, p in m.unet.named_parameters() if "lora_B" in n]
        assert ie and lora_b
        for n, p in ie + lora_b:
            assert p.grad is not None and p.grad.dtype == torch.float32, n
            assert torch.isfinite(p.grad).all() and float(p.grad.abs().sum()) > 0, n
    finally:
        m.settings = saved
        m.zero_grad()


def test_the_critic_compares_real_and_fake_pasted_alike(task, batch):
    """real and fake are both pasted into the source latent: outside the (latent) mask
    they are the source latent, inside they are the target and the prediction."""
    from xmgie.mgie_core.attention import MaskPyramid

    m = task.model
    saved = _with(m, image_fraction=1.0)
    try:
        with torch.no_grad():
            out = m(batch)
            z_src = m.encode_images(batch["source"].float())
            z_tgt = m.encode_images(batch["target"].float())
    finally:
        m.settings = saved
    ml = MaskPyramid((batch["mask"][:, 0] > 0.5).float()).at(tuple(z_src.shape[-2:]),
                                                             z_src.device)[:, None]
    real, fake = out["real"], out["fake"]
    assert real.shape == fake.shape == z_src.shape
    outside, inside = (ml == 0).expand_as(real), (ml == 1).expand_as(real)
    assert outside.any() and inside.any()
    assert torch.equal(real[outside], z_src[outside])
    assert torch.equal(fake[outside], z_src[outside])
    assert torch.equal(real[inside], z_tgt[inside])
    assert not torch.allclose(real[inside], fake[inside])


@pytest.fixture(scope="module", params=["tiny", "sd15-blocks"])
def unet_model(request, task):
    """The task's model, and one over a UNet with SD 1.5's block layout (two resnets and
    attentions per level, so every one of PFB-Diff's ten sites exists) at the tiny
    widths, random weights."""
    import dataclasses

    from diffusers import UNet2DConditionModel

    from xmgie.mgie_core.tiny.sd import unet_config
    from xmgie.mgie_core.trainable import IdentityInjection, PFBWeights
    from xmgie.training.xmgie_task import XMGIEModel, _add_lora

    m = task.model
    if request.param == "tiny":
        return m
    torch.manual_seed(1)
    unet = UNet2DConditionModel(**{**unet_config(), "layers_per_block": 2})
    unet.requires_grad_(False)
    _add_lora(unet, m.settings.lora)
    sd = dataclasses.replace(m.sd_info, unet=unet)
    pfb = PFBWeights.for_unet(unet)
    ie = IdentityInjection.for_unet(unet, m.ie.id_dim, encoder_kind="clip_vision")
    assert len(pfb.sites) == 10 and "down_blocks.2.resnets.1" in pfb.sites
    return XMGIEModel(sd, m.encoder_info, pfb, ie, m.settings)


def test_training_call_blends_and_injects_as_the_sampler_controls_do(unet_model, batch):
    """The training hooks against the sampler's own PFB and IE controls on the same
    batched call ([edit rows; reference rows]), with a_l and IE away from their starts:
    the controls change the edit rows (and not the reference rows), and the training
    call computes what they compute."""
    from xmgie.mgie_core.attention import AttnContext, Branch, MaskPyramid
    from xmgie.mgie_core.control import SamplingRun
    from xmgie.mgie_core.diffusion import make_schedule
    from xmgie.mgie_core.models.sd import SDModel
    from xmgie.mgie_core.pfb import PFBControl
    from xmgie.mgie_core.trainable import IdentityEmbeddingControl
    from xmgie.training.xmgie_task import LAYOUT, _Call

    m = unet_model
    saved = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        m.pfb.raw.copy_(torch.rand(m.pfb.raw.shape, generator=g))
        for p in m.ie.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    b = 2
    mask = (batch["mask"][:b, 0] > 0.5).float()
    z = torch.randn(2 * b, 4, 8, 8, generator=g)
    t = torch.tensor([600] * (2 * b))
    emb = torch.randn(2 * b, 77, 32, generator=g)
    e_id = torch.nn.functional.normalize(torch.randn(b, m.ie.id_dim, generator=g), dim=-1)
    info = m.sd_info
    sd = SDModel(m.unet, m.vae, m.text_encoder, info.tokenizer, info.scheduler,
                 torch.device("cpu"), torch.float32, "tiny")
    ctl = m.controller
    try:
        m._call = None
        run = SamplingRun(sd, make_schedule(sd, 5), LAYOUT, {Branch.EDIT: z[:b]}, ctl,
                          mask=mask, reference=torch.zeros(6, b, 4, 8, 8))
        controls = [IdentityEmbeddingControl(m.ie, embedding=e_id),
                    PFBControl(alpha=m.pfb, preset="object")]
        for c in controls:
            c.setup(run)
        ctl.hooks = []
        ctl.reset_call(AttnContext(0, 5, LAYOUT, (8, 8)))
        sampled = m.unet(z, t, encoder_hidden_states=emb).sample
        ctl.clear()
        for c in controls:
            c.teardown(run)
        plain = m.unet(z, t, encoder_hidden_states=emb).sample
        m._call = _Call(b, MaskPyramid(mask), torch.ones(b, dtype=torch.bool), e_id, None,
                        None)
        ctl.reset_call(AttnContext(0, 1, LAYOUT, (8, 8)))
        trained = m.unet(z, t, encoder_hidden_states=emb).sample
    finally:
        m._call = None
        ctl.clear()
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n in saved:
                    p.copy_(saved[n])
    assert not torch.allclose(sampled[:b], plain[:b], atol=1e-4)   # the controls act
    assert torch.equal(sampled[b:], plain[b:])                     # not on the reference
    # equal up to float32 summation order (measured: 6.6e-7 at most on the tiny UNet,
    # 0 on the other)
    assert torch.allclose(trained, sampled, rtol=0, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(unet_model, batch):
    """The UNet's checkpointed blocks are recomputed in the backward pass, after the
    forward returned: the blend, injection and CAM of that call must hold then too."""
    m = unet_model
    assert m._cam_tokens(list(batch["target_prompt"]), list(batch["source_prompt"]),
                         [True] * 4) is not None          # CAM is on in this batch
    grads = []
    try:
        for on in (False, True):
            if on:
                m.unet.enable_gradient_checkpointing()
            m.zero_grad()
            torch.manual_seed(3)
            out = m(batch)
            out["loss"].backward()
            grads.append({n: p.grad.clone() for n, p in m.named_parameters()
                          if p.requires_grad})
    finally:
        m.unet.disable_gradient_checkpointing()
        m.zero_grad()
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-7), n
