"""MMIG's five training stages on the tiny models, through the engine (``xmgie train
configs/train/mmig_stageN.yaml --tiny``): each stage starts from the previous stage's
final/, its total loss falls on a fixed batch, its trainable parameters per module are
exactly what the module shapes give, its frozen weights do not move, and the weighted
terms are the paper's; a resumed run repeats the uninterrupted one; A-STAR's terms and
BLIP-2's captioning loss reach what trains."""

from __future__ import annotations

import json

import pytest
import torch

STEPS = 8
TRAINS = {1: {"mmsm"}, 2: {"llm", "mmsm"}, 3: {"mmsm", "dem"}, 4: {"llm", "mmsm", "dem"},
          5: {"llm", "mmsm", "dem"}}
# the terms each stage weights (docs/algorithms.md §15's stage table)
TERMS_ON = {1: {"sdm", "mmsm"}, 2: {"sdm", "mmt", "mmsm"},
            3: {"sdm", "as", "ar", "fg", "bg", "mmsm"},
            4: {"sdm", "as", "ar", "fg", "bg", "mmt", "mmsm"},
            5: {"sdm", "as", "ar", "fg", "bg", "mmt", "blip2", "mmsm"}}


@pytest.fixture(scope="module")
def env(tiny_root):
    from xmgie.mgie_core import tiny
    from xmgie.training.mmig_task import TINY_FAMILIES

    tiny.ensure_tiny_models(tiny_root, TINY_FAMILIES)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(tiny.ENV_TINY_DIR, str(tiny_root))
        yield tiny_root


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """Two of the synthetic pairs the --tiny runs train on (the engine writes the same
    set: 8 pairs, 64 px, seed 0): the fixed batch the losses are compared on."""
    from xmgie.training.data import collate, load_pairs
    from xmgie.training.synthetic import make_synthetic

    folder = make_synthetic(tmp_path_factory.mktemp("pairs") / "syn", n=8, size=64, seed=0)
    pairs = load_pairs(folder, resolution=64)
    return collate([pairs[0], pairs[1]])


def _config(n: int, **overrides):
    from xmgie.training.config import load_config

    return load_config(f"mmig_stage{n}", tiny=True, overrides=overrides or None)


def _run(config, out, batch) -> dict:
    """``config`` trained through the engine into ``out``; the engine's build_task is
    wrapped to keep the task and to score the fixed batch before the first step
    (validate() seeds its own draws and puts the random state back, so the run is the
    same with or without it), and the batch is scored again after the last step."""
    from xmgie.training import engine
    from xmgie.training.mmig_task import trainable_counts

    original = engine.build_task
    rec: dict = {}

    def build(config, accelerator, tiny, models=None):
        task = original(config, accelerator, tiny, models)
        m = task.model
        rec.update(task=task, counts=trainable_counts(m),
                   before={k: p.detach().clone() for k, p in m.named_parameters()},
                   val_before=task.validate(m, [batch]))
        return task

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "build_task", build)
        result = engine.train(config, out, max_steps=STEPS)
    task = rec["task"]
    rec.update(result=result, final=result.final_dir,
               val_after=task.validate(task.model, [batch]),
               rows=[json.loads(line) for line in
                     (out / "metrics.jsonl").read_text().splitlines()])
    return rec


def _fell(rec) -> bool:
    """The fixed batch's total loss (same draws before and after) fell by more than
    0.1 %: more than float noise, less than the smallest stage's fall on the tiny models
    (stage 2's and 5's, where the tiny LLM's L_MMT of about 7 dominates the total)."""
    return rec["val_after"]["val_loss"] < (1 - 1e-3) * rec["val_before"]["val_loss"]


@pytest.fixture(scope="module")
def stages(env, batch, tmp_path_factory):
    """``stages(n)``: stage n trained for STEPS steps from stage n-1's final/ (run first
    when needed), as :func:`_run` records it."""
    root = tmp_path_factory.mktemp("mmig-stages")
    done: dict[int, dict] = {}

    def run(n: int) -> dict:
        if n not in done:
            init = str(run(n - 1)["final"]) if n > 1 else None
            done[n] = _run(_config(n, **{"model.init": init}), root / f"stage{n}", batch)
        return done[n]

    return run


# --- what each module holds, from its shapes -------------------------------------------------

def _adapter_count(llm_config, hidden: int = 8, groups: int = 2) -> int:
    """LaVIN's RepAdapter router per decoder layer: a 1x1 down-projection d -> h (bias),
    two grouped 1x1 up-projections h -> d (bias), a router d -> 2; plus the 2 x d
    modality embedding."""
    d, layers = llm_config.hidden_size, llm_config.num_hidden_layers
    per_layer = (d * hidden + hidden) + 2 * (hidden // groups * d + d) + (d * 2 + 2)
    return layers * per_layer + 2 * d


def _mmsm_count(text_dim: int, channels: int, hidden: int) -> int:
    """MLP text_dim -> h -> h, DE = GroupNorm(C) + 1x1 conv C -> h, CA = multi-head
    attention at width h (in- and out-projections), DD h -> h -> C."""
    mlp = text_dim * hidden + hidden + hidden * hidden + hidden
    de = 2 * channels + channels * hidden + hidden
    ca = 3 * hidden * hidden + 3 * hidden + hidden * hidden + hidden
    dd = hidden * hidden + hidden + hidden * channels + channels
    return mlp + de + ca + dd


def _lora_count(unet_folder, r: int, targets=("to_q", "to_k", "to_v", "to_out.0")) -> int:
    """r x (in + out) for every targeted linear projection of the base UNet's attention."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(unet_folder))
    total = 0
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(tuple("." + t for t in targets)):
            total += r * (module.in_features + module.out_features)
    return total


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_stage_trains_what_it_names_and_its_loss_falls(stages, env, n):
    from xmgie.mgie_core import tiny
    from xmgie.mgie_core.mmig import load_mmig

    rec = stages(n)
    task = rec["task"]
    m = task.model
    cfg = _config(n)
    # the config's weights: the stage's terms and no other
    assert {k for k, w in task.weights.items() if w > 0} == TERMS_ON[n]
    assert set(task.settings.train) == TRAINS[n]

    # trainable parameters per module, from the shapes
    unet_cfg = m.unet.config
    channels = list(unet_cfg.block_out_channels)[-1]     # up_blocks.0's output width
    hidden = cfg.model["mmsm"]["hidden"]
    expected = {
        "llm_adapters": _adapter_count(m.llm.config) if "llm" in TRAINS[n] else 0,
        "mmsm": _mmsm_count(unet_cfg.cross_attention_dim, channels, hidden),
        "dem_lora": (_lora_count(tiny.tiny_path(env, "sd_diffusers") / "unet",
                                 cfg.model["unet_lora"]["r"]) if "dem" in TRAINS[n] else 0),
        "other": 0}
    assert rec["counts"] == expected, (rec["counts"], expected)

    # frozen weights unchanged; every trained module moved
    after = {k: p.detach() for k, p in m.named_parameters()}
    trained = {k for k, p in m.named_parameters() if p.requires_grad}
    frozen = set(after) - trained
    assert frozen and all(torch.equal(rec["before"][k], after[k]) for k in frozen)
    assert all(p.dtype == torch.float32 for k, p in m.named_parameters() if k in trained)
    for prefix in ({"llm": "llm.", "mmsm": "mmsm.", "dem": "unet."}[t] for t in TRAINS[n]):
        names = [k for k in trained if k.startswith(prefix)]
        assert names and any(not torch.equal(rec["before"][k], after[k]) for k in names)

    # the total loss on the fixed batch (same draws) fell
    assert _fell(rec), (rec["val_before"], rec["val_after"])

    # every term logged each step, unweighted; the unweighted-zero ones are skipped (0)
    rows = rec["rows"]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        terms = {k[2:] for k in r if k.startswith("l_")}
        assert terms == {"sdm", "as", "ar", "fg", "bg", "mmt", "blip2", "mmsm"}
        assert all(r[f"l_{t}"] == 0.0 for t in terms - TERMS_ON[n])
        on = TERMS_ON[n] - {"as", "blip2"}    # one edit word: no pair to segregate
        assert all(r[f"l_{t}"] > 0 for t in on), r
        total = sum(task.weights[t] * r[f"l_{t}"] for t in TERMS_ON[n])
        assert r["loss"] == pytest.approx(total, rel=1e-5)

    # the previous stage's final/ was the start: its adapters and MMSM were loaded
    if n > 1:
        prev = load_mmig(stages(n - 1)["final"] / "mmig.safetensors")
        start = rec["before"]
        for k, v in prev["mmsm"].state_dict().items():
            assert torch.equal(start[f"mmsm.{k}"], v)
        if n >= 4:     # stage 3 and 4 wrote a LoRA: it is where stage 4 and 5 start
            lora_b = [k for k in start if "lora_B" in k]
            assert lora_b and all(start[k].abs().sum() > 0 for k in lora_b)


def test_the_criterion_can_fail(env, batch, tmp_path):
    """Stage 1's run with a learning rate of 1e-9 (same steps, same draws) does not pass
    the loss criterion."""
    rec = _run(_config(1, **{"optim.lr": 1e-9}), tmp_path / "still", batch)
    assert len(rec["rows"]) == STEPS and not _fell(rec)


def test_blip2_and_astar_terms_reach_what_trains(stages, batch):
    """Stage 5's L_BLIP2 (every row a low-noise one) and L_AS with two concepts (the
    target caption's colour and shape as edit words) are positive, and each alone gives
    finite gradients to the UNet's LoRA, MMSM and the MM-Adapters."""
    task = stages(5)["task"]
    m = task.model
    two = dict(batch, edit_words=[p.split()[1:3] for p in batch["target_prompt"]])
    assert all(len(w) == 2 for w in two["edit_words"])    # "a red square on ..."
    keep_weights, keep_fraction = m.weights, m.settings.model["image_fraction"]
    trained = [(k, p) for k, p in m.named_parameters() if p.requires_grad]
    m.train()
    try:
        m.settings.model["image_fraction"] = 1.0
        for term in ("blip2", "as"):
            m.weights = {t: float(t == term) for t in keep_weights}
            torch.manual_seed(0)
            out = m(two)
            assert out[f"l_{term}"] > 0 and out["loss"] == out[f"l_{term}"]
            if term == "blip2":
                assert out["low_t_rows"] == 2
            grads = torch.autograd.grad(out["loss"], [p for _, p in trained],
                                        allow_unused=True)
            got = {k: g for (k, _), g in zip(trained, grads) if g is not None}
            assert all(torch.isfinite(g).all() for g in got.values())
            for prefix in ("unet.", "mmsm.", "llm."):
                assert any(k.startswith(prefix) and g.abs().sum() > 0
                           for k, g in got.items()), (term, prefix)
    finally:
        m.weights, m.settings.model["image_fraction"] = keep_weights, keep_fraction


def test_resume_gives_the_same_later_losses(env, tmp_path):
    """Stage 3 (LoRA and MMSM, A-STAR's extra pass) stopped after step 2 and resumed logs
    exactly the losses of the uninterrupted run."""
    from xmgie.training import engine

    whole = engine.train(_config(3), tmp_path / "whole", max_steps=4)
    polls = iter(range(1, 100))
    cut = engine.train(_config(3), tmp_path / "cut", max_steps=4,
                       should_stop=lambda: next(polls) == 2)
    assert cut.interrupted and cut.steps == 2
    engine.train(_config(3), tmp_path / "cut", max_steps=4, resume=True)
    rows = [json.loads(line) for line in
            (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows] == [r["loss"] for r in whole.metrics]


def test_config_errors_name_the_key(env):
    from xmgie.training.config import TrainConfigError
    from xmgie.training.mmig_task import settings

    for overrides, key in (({"model.train": ["dem"]}, "model.train"),   # no unet_lora
                           ({"model.train": ["unet"]}, "model.train"),
                           ({"loss.sdmm": 1.0}, "loss.sdmm"),
                           ({"loss.as": -1}, "loss.as"),
                           ({"model.alpha": 1.5}, "model.alpha"),
                           ({"model.mmsm": {"hidden": 10, "heads": 4}}, "model.mmsm.heads"),
                           ({"model.astar": {"factor": 0}}, "model.astar.factor")):
        with pytest.raises(TrainConfigError, match=key.replace(".", r"\.")):
            settings(_config(1, **overrides))


def test_command_line_runs_a_stage_and_refuses_a_bad_init(env, tmp_path, capsys):
    """`xmgie train mmig_stage1 --tiny` trains and writes final/mmig.safetensors; a
    stage whose model.init is no stage's output is one line naming the key, exit status
    2, before anything is written."""
    from xmgie import cli
    from xmgie.training.config import SHIPPED_DIR

    out = tmp_path / "run"
    assert cli.main(["train", "mmig_stage1", "--tiny", "--max-steps", "2",
                     "--out", str(out)]) == 0
    assert (out / "final" / "mmig.safetensors").is_file()
    assert not (out / "final" / "unet_lora").exists()      # stage 1 has no LoRA
    capsys.readouterr()
    bad = tmp_path / "stage2.yaml"
    bad.write_text((SHIPPED_DIR / "mmig_stage2.yaml").read_text().replace(
        "model: {init: null,", f"model: {{init: {tmp_path}/nowhere,"))
    assert cli.main(["train", str(bad), "--tiny", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "model.init" in err and "holds no mmig.safetensors" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()


def test_mixed_precision_with_checkpointing_keeps_trained_tensors_float32(env, batch):
    """Stage 5 under bf16 with gradient checkpointing (UNet and LLaMA layers): the frozen
    models compute in bf16, everything that trains is float32 with finite gradients, and
    the loss is float32."""
    from accelerate import Accelerator

    from xmgie.training.engine import _reset_accelerate_state
    from xmgie.training.mmig_task import build_task

    _reset_accelerate_state()
    cfg = _config(5, **{"model.init": None, "precision": "bf16",
                        "gradient_checkpointing": True})
    task = build_task(cfg, Accelerator(cpu=True, mixed_precision="bf16"), True)
    m = task.model
    trained = {k: p for k, p in m.named_parameters() if p.requires_grad}
    assert trained and all(p.dtype == torch.float32 for p in trained.values())
    frozen = {k.split(".")[0]: p.dtype for k, p in m.named_parameters() if not p.requires_grad}
    assert {frozen[k] for k in ("llm", "vision", "unet", "text_encoder", "blip2")} == \
        {torch.bfloat16}
    assert m.unet.is_gradient_checkpointing and m.llm_checkpointing
    m.train()
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(batch)
    out["loss"].backward()
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    grads = {k: p.grad for k, p in trained.items() if p.grad is not None}
    assert all(torch.isfinite(g).all() for g in grads.values())
    # llm.: the adapters inside the layers; adapters.: the modality embedding
    assert {k.split(".")[0] for k in grads} == {"llm", "adapters", "mmsm", "unet"}


def test_a_lora_missing_a_tensor_is_refused_at_init(stages, tmp_path):
    """A stage's model.init whose unet_lora lacks one adapter tensor is refused naming
    the key (peft would load the rest and leave that adapter at its initialisation)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from xmgie.training import engine
    from xmgie.training.config import TrainConfigError
    from xmgie.training.xmgie_task import LORA_FOLDER, LORA_WEIGHTS

    init = tmp_path / "final"
    shutil.copytree(stages(3)["final"], init)
    weights = init / LORA_FOLDER / LORA_WEIGHTS
    state = load_file(str(weights))
    dropped = sorted(state)[0]
    del state[dropped]
    save_file(state, str(weights))
    with pytest.raises(TrainConfigError, match=r"model\.init.*lacks"):
        engine.train(_config(4, **{"model.init": str(init)}), tmp_path / "run", max_steps=1)
