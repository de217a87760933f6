"""MGIE's training task on the tiny models: the teacher-forced sequence, the condition it
trains is the one inference computes, InstructPix2Pix's dropout rule, what trains and
what stays frozen (with and without LoRA), a tiny run whose loss falls, the trained-MGIE
folder applied to new models (the given ones untouched), and the errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch


@pytest.fixture(scope="module")
def env(tiny_root):
    """--tiny finds the tiny MGIE, SD and MGIE UNet in the session's tiny folder."""
    from xmgie.mgie_core import tiny
    from xmgie.training.mgie_task import TINY_FAMILIES

    tiny.ensure_tiny_models(tiny_root, TINY_FAMILIES)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(tiny.ENV_TINY_DIR, str(tiny_root))
        yield tiny_root


@pytest.fixture(scope="module")
def task_mod():
    from xmgie.training import mgie_task

    return mgie_task


def _config(**overrides):
    from xmgie.training.config import load_config

    return load_config("mgie", tiny=True, overrides=overrides or None)


@pytest.fixture(scope="module")
def models(env, task_mod):
    """The tiny MGIE and its SD with the 8-channel UNet, loaded once (given to tasks,
    which must leave them as they are)."""
    mgie, sd = task_mod._load_models(task_mod.settings(_config()), True)
    return {"mgie": mgie, "sd": sd}



def _accelerator(mixed_precision: str = "no"):
    """A real one-process CPU accelerator (the engine resets accelerate's process-wide
    state before each run, so one made here does not leak into the engine's)."""
    from accelerate import Accelerator

    from xmgie.training.engine import _reset_accelerate_state

    _reset_accelerate_state()
    return Accelerator(cpu=True, mixed_precision=mixed_precision)


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    from xmgie.training.data import collate, load_pairs
    from xmgie.training.synthetic import make_synthetic

    folder = make_synthetic(tmp_path_factory.mktemp("pairs") / "syn", n=4, size=64, seed=3)
    pairs = load_pairs(folder, resolution=64)
    b = collate([pairs[i] for i in range(4)])
    b["expressive_instruction"][1] = ""          # falls back to the instruction
    return b


def _snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _given_state(models):
    mgie, sd = models["mgie"], models["sd"]
    out = {f"llm.{k}": v.clone() for k, v in mgie.llm.state_dict().items()}
    out.update({f"head.{k}": v.clone() for k, v in mgie.edit_head.state_dict().items()})
    out.update({f"unet.{k}": v.clone() for k, v in sd.unet.state_dict().items()})
    out["emb"] = mgie.emb.clone()
    return out


def _same(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def _steps(task, batch, n=3, lr=1e-2):
    model = task.model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for i in range(n):
        torch.manual_seed(i)
        out = model(batch)
        opt.zero_grad()
        out["loss"].backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters()
                   if p.requires_grad and p.grad is not None)
        opt.step()
    return out


# --- the sequence and the condition --------------------------------------------------------

def test_sequence_labels_and_img_positions(env, models, batch, task_mod):
    task = task_mod.build_task(_config(), _accelerator(), True, models=models)
    m, mgie = task.model, models["mgie"]
    ids, mask, labels, starts = m.sequences(batch)
    tok = mgie.tokenizer
    for i in range(4):
        prompt = tok(mgie.prompt(batch["instruction"][i]))["input_ids"]
        text = batch["expressive_instruction"][i] or batch["instruction"][i]
        answer = tok(" " + text, add_special_tokens=False)["input_ids"]
        n = len(prompt) + len(answer) + 9
        assert ids[i, :n].tolist() == prompt + answer + mgie.img_ids + [tok.eos_token_id]
        assert (labels[i, :len(prompt)] == -100).all() and (labels[i, n:] == -100).all()
        assert labels[i, len(prompt):n].tolist() == answer + mgie.img_ids + [tok.eos_token_id]
        assert int(starts[i]) == len(prompt) + len(answer)
        assert mask[i].sum() == n
    # the pair without an expressive instruction is answered with its instruction
    assert tok.decode(ids[1, int(starts[1]) - 8:int(starts[1])]).strip() in \
        batch["instruction"][1]


def test_trained_condition_is_the_one_inference_computes(env, models, batch, task_mod):
    """Untrained, the training module's condition for MGIE's own answer equals
    MGIEModel.run's (same hidden-state positions, edit head and emb); the batched CLIP
    preprocessing matches the PIL path up to 8-bit rounding."""
    task = task_mod.build_task(_config(), _accelerator(), True, models=models)
    m, mgie = task.model, models["mgie"]
    image = batch["source"][:1].permute(0, 2, 3, 1).contiguous()
    out = mgie.run(image, batch["instruction"][0], max_new_tokens=6)
    prompt = mgie.tokenizer(mgie.prompt(batch["instruction"][0]))["input_ids"]
    text_ids, _ = mgie.answer_ids(out.generated_ids)
    ids = torch.tensor([prompt + text_ids + mgie.img_ids])
    with torch.no_grad():
        feats = mgie.image_features(image)
        hidden = m.hidden_states(ids, torch.ones_like(ids), feats)
        cond = m.condition(hidden, torch.tensor([len(prompt) + len(text_ids)]))
        torch.testing.assert_close(cond, out.conditioning.cond, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(m.null(1), out.conditioning.null, atol=1e-5, rtol=1e-4)
        batched = m.image_features(batch["source"][:1])
    assert (batched - feats).abs().max() < 0.05 * feats.abs().max()


def test_conditioning_dropout_rule(task_mod):
    u = (torch.arange(10_000) + 0.5) / 10_000
    text, image = task_mod.dropout_masks(u, 0.1, 0.1)
    assert text.float().mean() == pytest.approx(0.1, abs=1e-3)
    assert image.float().mean() == pytest.approx(0.1, abs=1e-3)
    assert (text & image).float().mean() == pytest.approx(0.05, abs=1e-3)
    text, image = task_mod.dropout_masks(u, 0.0, 0.0)
    assert not text.any() and not image.any()


def test_a_text_to_image_unet_starts_as_instruct_pix2pix_does(env, batch, task_mod):
    """model.unet null over a 4-channel base: the UNet gets 4 zero-initialised input
    channels for the source latent, so the untrained 8-channel copy predicts exactly what
    the text-to-image UNet does, whatever the source latent."""
    task = task_mod.build_task(_config(**{"model.unet": None}), _accelerator(), True)
    unet8 = task.model.unet
    assert unet8.config.in_channels == 8
    from xmgie.mgie_core import tiny
    from xmgie.mgie_core.models import sd as sdm

    base = sdm.load_sd_diffusers(str(tiny.tiny_path(env, "sd_diffusers")), dtype="fp32",
                                 device="cpu")
    g = torch.Generator().manual_seed(0)
    x, src = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    c = torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        torch.testing.assert_close(unet8(torch.cat([x, src], 1), t, c).sample,
                                   base.unet(x, t, c).sample, atol=1e-5, rtol=1e-4)
    out = _steps(task, batch, n=1)
    assert torch.isfinite(out["loss"])


# --- what trains ---------------------------------------------------------------------------

TRAINED = ("embed.", "lm_head.", "edit_head.", "unet.")


def test_trained_parts_change_frozen_parts_and_given_models_do_not(env, models, batch,
                                                                  task_mod):
    given = _given_state(models)
    task = task_mod.build_task(_config(), _accelerator(), True, models=models)
    m = task.model
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert names and all(n.startswith(TRAINED) for n in names)
    assert {n.split(".")[0] for n in names} == {"embed", "lm_head", "edit_head", "unet"}
    assert all(p.dtype == torch.float32 for n, p in m.named_parameters() if n in names)
    assert set(task.trainable_state(m)) == names
    before = _snapshot(m)
    out = _steps(task, batch)
    assert set(out) == {"loss", "l_ins", "l_edit"}
    assert out["loss"].dtype == torch.float32
    torch.testing.assert_close(out["loss"], out["l_ins"] + 0.5 * out["l_edit"])
    after = _snapshot(m)
    frozen = [n for n in before if n not in names]
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)
    for prefix in TRAINED:
        assert any(not torch.equal(before[n], after[n]) for n in names if n.startswith(prefix))
    assert _same(given, _given_state(models))


def test_validation_scores_edits_of_the_trained_condition_and_unet(env, models, batch,
                                                                   task_mod):
    """validate() returns the held-out L_all terms and the sampled edits' PSNR, SSIM and
    L1 (finite, the same on a second call); the edit metrics move when only the
    teacher-forced condition moves (embeddings but the [IMG] rows: the null condition
    stays) and when only the UNet moves; the process's random state and the UNet's
    attention processors are as before."""
    import math
    import random

    task = task_mod.build_task(_config(), _accelerator(), True, models=models)
    m = task.model
    assert task.settings.validation["steps"] == 4 and task.settings.validation["pairs"] == 2
    processors = {k: type(v) for k, v in m.unet.attn_processors.items()}
    torch.manual_seed(5)
    random.seed(5)
    rng, py = torch.get_rng_state(), random.getstate()
    first = task.validate(m, [batch])
    assert set(first) == set(task_mod.VAL_METRICS)
    assert all(math.isfinite(v) for v in first.values()), first
    assert 0 < first["val_l1"] < 1 and -1 <= first["val_ssim"] <= 1
    assert torch.equal(torch.get_rng_state(), rng) and random.getstate() == py
    assert {k: type(v) for k, v in m.unet.attn_processors.items()} == processors
    assert not hasattr(m.unet, "_xmgie_controller")
    assert task.validate(m, [batch]) == first
    edit_keys = ("val_psnr", "val_ssim", "val_l1")

    g = torch.Generator().manual_seed(0)
    null = m.null(1).detach().clone()
    with torch.no_grad():
        keep = m.embed.weight[m.img_ids].clone()
        m.embed.weight.add_(torch.randn(m.embed.weight.shape, generator=g))
        m.embed.weight[m.img_ids] = keep
    assert torch.equal(m.null(1), null)
    cond_moved = task.validate(m, [batch])
    assert all(cond_moved[k] != first[k] for k in edit_keys), (first, cond_moved)

    with torch.no_grad():
        w = m.unet.conv_out.weight
        w.add_(0.5 * w.abs().mean() * torch.randn(w.shape, generator=g))
    unet_moved = task.validate(m, [batch])
    assert all(unet_moved[k] != cond_moved[k] for k in edit_keys), (cond_moved, unet_moved)


def test_lora_trains_adapters_embeddings_head_edit_head_and_unet(env, models, batch, task_mod,
                                                               tmp_path):
    given = _given_state(models)
    cfg = _config(**{"model.lora": {"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]}})
    task = task_mod.build_task(cfg, _accelerator(), True, models=models)
    m = task.model
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    lora = {n for n in names if "lora_" in n}
    assert lora and all(n.startswith("body.") for n in lora)
    assert all(n.startswith(TRAINED) for n in names - lora)
    assert all(p.dtype == torch.float32 for n, p in m.named_parameters() if n in lora)
    before = _snapshot(m)
    _steps(task, batch, n=2)
    after = _snapshot(m)
    assert any(not torch.equal(before[n], after[n]) for n in lora if "lora_B" in n)
    base = [n for n in before if n.startswith("body.") and "lora_" not in n]
    assert base and all(torch.equal(before[n], after[n]) for n in base)
    # the given LLM got no adapters and kept its weights
    assert not any("lora" in n for n, _ in models["mgie"].llm.named_modules())
    assert _same(given, _given_state(models))

    from xmgie.mgie_core.models.mgie import trained

    task.export(m, tmp_path / "final")
    assert (tmp_path / "final" / "adapter" / "adapter_config.json").is_file()
    new_mgie, _ = trained.apply_mgie_trained(models["mgie"], models["sd"], tmp_path / "final")
    q = "layers.0.self_attn.q_proj.weight"
    merged = dict(new_mgie.llm.model.named_parameters())[q]
    assert not torch.equal(merged, dict(models["mgie"].llm.model.named_parameters())[q])
    assert not any("lora" in n for n, _ in new_mgie.llm.named_modules())
    assert _same(given, _given_state(models))


def test_mixed_precision_keeps_trained_tensors_float32(env, batch, task_mod):
    """bf16 with gradient checkpointing and LoRA (models loaded for the run): the frozen
    parts compute in bf16, everything that trains is float32 with finite gradients."""
    cfg = _config(**{"precision": "bf16", "gradient_checkpointing": True,
                     "model.lora": {"r": 2, "alpha": 4}})
    task = task_mod.build_task(cfg, _accelerator("bf16"), True)
    m = task.model
    trained = {n: p for n, p in m.named_parameters() if p.requires_grad}
    assert all(p.dtype == torch.float32 for p in trained.values())
    frozen = {n: p.dtype for n, p in m.named_parameters() if not p.requires_grad}
    assert {frozen[n] for n in frozen if n.startswith(("body.", "vision.", "projector.",
                                                       "vae."))} == {torch.bfloat16}
    assert m.body_trains and m.unet.is_gradient_checkpointing
    assert any(getattr(x, "gradient_checkpointing", False) for x in m.body.modules())
    m.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(batch)
    out["loss"].backward()
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    grads = [p.grad for p in trained.values() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(n for n in trained if "lora_A" in n and trained[n].grad is not None)


# --- a tiny run, its export, and the export applied -----------------------------------------

def _falls(rows):
    losses = [r["loss"] for r in rows if "loss" in r]
    k = max(1, len(losses) // 10)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    return last < 0.9 * first, first, last


def test_tiny_run_loss_falls_and_its_export_changes_mgie_and_the_unet(env, models, tmp_path):
    from xmgie.mgie_core.models.mgie import trained
    from xmgie.training import engine

    steps = 20
    result = engine.train(_config(), tmp_path / "run", max_steps=steps)
    ok, first, last = _falls(result.metrics)
    assert ok, f"the loss did not fall: first 10 % {first:.4f}, last 10 % {last:.4f}"
    from xmgie.training.mgie_task import VAL_METRICS

    vals = [r for r in result.metrics if "val_loss" in r]
    assert vals and all({k for k in r if k.startswith("val_")} == set(VAL_METRICS)
                        for r in vals)
    rows = [json.loads(line) for line in
            (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all({"step", "loss", "l_ins", "l_edit"} <= set(r) for r in rows)
    # the criterion can fail: the same run (same steps, same draws) without learning
    # does not pass it
    still = engine.train(_config(**{"optim.lr": 1e-9, "steps.val_every": 0,
                                    "early_stopping.metric": None}),
                         tmp_path / "still", max_steps=steps)
    assert still.steps == result.steps == steps
    assert not _falls(still.metrics)[0]

    final = result.final_dir
    meta = json.loads((final / "trained.json").read_text())
    assert meta["kind"] == "mgie" and meta["format"] == 1 and meta["lora"] is None
    mgie, sd = models["mgie"], models["sd"]
    given = _given_state(models)
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    old = mgie.run(image, "make the square red", max_new_tokens=4).conditioning
    new_mgie, new_sd = trained.apply_mgie_trained(mgie, sd, final)
    assert new_mgie is not mgie and new_sd is not sd and new_sd.unet is not sd.unet
    new = new_mgie.run(image, "make the square red", max_new_tokens=4).conditioning
    assert not torch.allclose(new.cond, old.cond) and not torch.allclose(new.null, old.null)
    w = "conv_in.weight"
    assert not torch.equal(new_sd.unet.state_dict()[w], sd.unet.state_dict()[w])
    assert new_sd.vae is sd.vae and new_mgie.vision is mgie.vision
    assert _same(given, _given_state(models))
    again = mgie.run(image, "make the square red", max_new_tokens=4).conditioning
    assert torch.equal(again.cond, old.cond)


def test_resume_with_lora_gives_the_same_later_losses(env, tmp_path):
    """Checkpoints hold the adapters with the rest of what trains: a run stopped after
    step 2 and resumed logs exactly the losses of the uninterrupted run. That run also
    validates at every step and stops early on val_psnr (max): validation's edits leave
    the training stream as it was."""
    from xmgie.training import engine

    lora = {"model.lora": {"r": 2, "alpha": 4}}
    # the same held-out split, no validation within the 4 steps
    cfg = _config(**lora, **{"steps.val_every": 100, "early_stopping.metric": None})
    whole = engine.train(_config(**lora, **{
        "steps.val_every": 1, "early_stopping": {"metric": "val_psnr", "mode": "max",
                                                 "patience": 10}}),
        tmp_path / "whole", max_steps=4)
    assert [r["step"] for r in whole.metrics if "val_psnr" in r] == [1, 2, 3, 4]
    assert (tmp_path / "whole" / "best" / "trained.json").is_file()
    polls = iter(range(1, 100))
    first = engine.train(cfg, tmp_path / "cut", max_steps=4,
                         should_stop=lambda: next(polls) == 2)
    assert first.interrupted and first.steps == 2
    engine.train(cfg, tmp_path / "cut", max_steps=4, resume=True)
    rows = [json.loads(line) for line in
            (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows] == [r["loss"] for r in whole.metrics if "loss" in r]


# --- errors ---------------------------------------------------------------------------------

def _export(tmp_path, env, models, task_mod):
    task = task_mod.build_task(_config(), _accelerator(), True, models=models)
    folder = tmp_path / "final"
    task.export(task.model, folder)
    return folder


def test_trained_folder_errors(env, models, task_mod, tmp_path):
    from xmgie.mgie_core.errors import ModelLoadError
    from xmgie.mgie_core.models.mgie import trained

    mgie, sd = models["mgie"], models["sd"]
    with pytest.raises(ModelLoadError, match="does not exist.*xmgie train configs/train/mgie"):
        trained.apply_mgie_trained(mgie, sd, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no trained.json"):
        trained.apply_mgie_trained(mgie, sd, tmp_path / "empty")

    good = _export(tmp_path, env, models, task_mod)

    def variant(name, edit):
        folder = tmp_path / name
        shutil.copytree(good, folder)
        edit(folder)
        return folder

    def kind(folder):
        meta = json.loads((folder / "trained.json").read_text())
        (folder / "trained.json").write_text(json.dumps({**meta, "kind": "xmgie"}))

    with pytest.raises(ModelLoadError, match="kind is 'xmgie'.*xMGIE"):
        trained.apply_mgie_trained(mgie, sd, variant("kind", kind))

    def fmt(folder):
        meta = json.loads((folder / "trained.json").read_text())
        (folder / "trained.json").write_text(json.dumps({**meta, "format": 7}))

    with pytest.raises(ModelLoadError, match="format is 7"):
        trained.apply_mgie_trained(mgie, sd, variant("format", fmt))
    with pytest.raises(ModelLoadError, match="mgie_trained.safetensors is missing"):
        trained.apply_mgie_trained(mgie, sd, variant(
            "noweights", lambda f: (f / "mgie_trained.safetensors").unlink()))
    with pytest.raises(ModelLoadError, match="unet/config.json is missing"):
        trained.apply_mgie_trained(mgie, sd, variant(
            "nounet", lambda f: shutil.rmtree(f / "unet")))

    def rows(folder):
        from safetensors.torch import load_file, save_file

        sd_ = load_file(str(folder / "mgie_trained.safetensors"))
        for k in ("model.embed_tokens.weight", "lm_head.weight"):
            sd_[k] = torch.cat([sd_[k], sd_[k][:3]])
        save_file(sd_, str(folder / "mgie_trained.safetensors"))

    with pytest.raises(ModelLoadError, match=r"mgie_trained.safetensors.*embeddings are "
                       r"\(\d+, 32\).*Apply it to the MGIE model it was trained from"):
        trained.apply_mgie_trained(mgie, sd, variant("rows", rows))

    def unet_in(folder):
        cfg = json.loads((folder / "unet" / "config.json").read_text())
        (folder / "unet" / "config.json").write_text(json.dumps({**cfg, "in_channels": 4}))

    with pytest.raises(ModelLoadError, match="UNet does not fit: it takes 4 input channels"):
        trained.apply_mgie_trained(mgie, sd, variant("unet4", unet_in))


def test_shipped_config_holds_the_release_settings(task_mod):
    from xmgie.training.config import load_config

    cfg = load_config("mgie")
    s = task_mod.settings(cfg)
    assert (cfg.task, cfg.precision, cfg.batch.global_, cfg.data.resolution) == \
        ("mgie", "bf16", 32, 256)
    assert (cfg.optim.lr, cfg.optim.schedule, cfg.optim.warmup_ratio) == (5e-4, "cosine", 0.03)
    assert (s.p_text, s.p_image, s.edit_weight, s.lora) == (0.1, 0.1, 0.5, None)
    assert (cfg.early_stopping.metric, cfg.early_stopping.mode) == ("val_loss", "min")
    assert s.validation == {"pairs": 8, "steps": 20, "guidance": 7.5, "image_guidance": 1.5,
                            "scheduler": "euler_ancestral"}
    tiny = load_config("mgie", tiny=True)
    assert tiny.precision == "no" and tiny.data.resolution <= 64 and tiny.steps.max <= 50


def test_config_errors_name_the_key(env, models, task_mod):
    from xmgie.training.config import TrainConfigError

    for overrides, key in (({"model.lorra": 1}, "model.lorra"),
                           ({"model.conditioning_dropout": {"text": 2}},
                            "model.conditioning_dropout.text"),
                           ({"model.base": {"loader": "hub"}}, "model.base.loader"),
                           ({"model.lora": {"r": 0}}, "model.lora.r"),
                           ({"loss.edit": -1}, "loss.edit"),
                           ({"model.validation": {"steps": 0}}, "model.validation.steps"),
                           ({"model.validation": {"scheduler": "pndm"}},
                            "model.validation.scheduler"),
                           ({"model.validation": {"guidance": -1}},
                            "model.validation.guidance"),
                           ({"loss.recon": 1.0}, "loss.recon")):
        with pytest.raises(TrainConfigError, match=key.replace(".", r"\.")):
            task_mod.build_task(_config(**overrides), _accelerator(), True, models=models)
