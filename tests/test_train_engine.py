"""The training engine on the shipped xMGIE config (tiny models, synthetic pairs): exact
resume (also after a Ctrl-C inside a step), two processes against one, what a checkpoint
holds, metrics.jsonl, and the failures that must leave nothing behind or name what is
wrong (a bad config, bad data, a damaged checkpoint)."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "configs" / "train" / "xmgie.yaml"
STEPS = 4

# Four steps of two micro-batches of 2 (global batch 4) with a checkpoint every 2 steps.
# The critic uses instance norm here: spectral norm advances its power-iteration vector
# on every critic forward, so it legitimately depends on how many micro-batches one
# process ran (two in one process against one in each of two), which is not what the
# two-process check is about.
TEST_TINY = {
    "steps": {"max": STEPS, "log_every": 1, "val_every": 0, "checkpoint_every": 2},
    "early_stopping": {"metric": None},
    "model": {"critic": {"norm": "instance"}},
    "batch": {"global": 4, "per_device": 2},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_until_ctrl_c_in_forward(cfg, out: Path, n: int) -> None:
    """Train until KeyboardInterrupt is raised inside the ``n``-th forward of the task's
    model (a micro-batch half done), through a real forward hook on every module."""
    import torch

    from xmgie.training.engine import train
    from xmgie.training.xmgie_task import XMGIEModel

    forwards = []

    def ctrl_c(module, args):
        if isinstance(module, XMGIEModel):
            forwards.append(1)
            if len(forwards) == n:
                raise KeyboardInterrupt

    hook = torch.nn.modules.module.register_module_forward_pre_hook(ctrl_c)
    try:
        with pytest.raises(KeyboardInterrupt):
            train(cfg, out)
    finally:
        hook.remove()
    assert len(forwards) == n and not (out / "final").exists()


def _rows(run: Path) -> list[dict]:
    # Throughput is wall-clock: everything else of a row must be reproducible.
    return [{k: v for k, v in json.loads(line).items() if k != "samples_per_s"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def env(tiny_root):
    """Tiny models in the session's folder, for this process and the launched ones
    (built once here rather than inside the first run)."""
    from xmgie.mgie_core import tiny

    tiny.ensure_tiny_models(tiny_root, ["sd_diffusers", "clip_vision"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XMGIE_TINY_DIR", str(tiny_root))
        yield mp


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    """The shipped xMGIE config with the test's tiny settings merged into its tiny:."""
    from xmgie.training.config import deep_merge

    data = yaml.safe_load(SHIPPED.read_text())
    data["tiny"] = deep_merge(data["tiny"], TEST_TINY)
    path = tmp_path_factory.mktemp("cfg") / "xmgie-test.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def full_run(env, config_file, tmp_path_factory):
    """One uninterrupted run (one process), the reference of the other tests."""
    from xmgie.training.config import load_config
    from xmgie.training.engine import train

    out = tmp_path_factory.mktemp("full") / "run"
    result = train(load_config(config_file, tiny=True), out)
    assert result.steps == STEPS and not result.interrupted
    return out, result


def test_metrics_log_every_term(full_run):
    out, result = full_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for row in rows:
        for key in ("loss", "l_recon", "l_id", "l_adv", "l_diffusion", "critic_loss", "lr",
                    "samples_per_s"):
            assert key in row and math.isfinite(row[key]), (key, row)
        # the logged total is the task's weighted sum plus 0.1 x the adversarial term
        assert row["loss"] == pytest.approx(row["l_recon"] + 0.5 * row["l_id"]
                                            + row["l_diffusion"] + 0.1 * row["l_adv"],
                                            rel=1e-5, abs=1e-6)
    assert result.metrics[-1]["loss"] == rows[-1]["loss"]
    assert (out / "final" / "trained.json").is_file()
    assert (out / "logs").is_dir()    # TensorBoard, through accelerate's tracker


def test_checkpoints_hold_only_what_trains(env, full_run, config_file):
    import torch
    from safetensors.torch import load_file

    from xmgie.training import checkpoint as ckpt
    from xmgie.training.config import load_config
    from xmgie.training.engine import build_task

    out, _ = full_run
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2, 4]
    assert not list(out.glob(".checkpoint-*"))          # no temporary folder left
    folder = out / "checkpoint-4"
    saved = load_file(str(folder / "trainable.safetensors"))

    task = build_task(load_config(config_file, tiny=True), None, True)
    trainable = {n: p for n, p in task.model.named_parameters() if p.requires_grad}
    frozen = sum(p.numel() for p in task.model.parameters() if not p.requires_grad)
    assert set(saved) == set(task.trainable_state(task.model))
    assert sum(t.numel() for t in saved.values()) == sum(p.numel() for p in trainable.values())
    assert frozen > 10 * sum(t.numel() for t in saved.values())   # the frozen SD is not there
    assert set(load_file(str(folder / "critic.safetensors"))) == set(task.critic.state_dict())
    # every .pt loads without unpickling code
    for name in ("optimizer.pt", "critic_optimizer.pt", "scheduler.pt", "rng-0.pt"):
        torch.load(folder / name, weights_only=True)
    state = json.loads((folder / "state.json").read_text())
    assert state["step"] == 4 and state["processes"] == 1


def test_resume_gives_the_same_later_losses(env, full_run, config_file, tmp_path):
    """Ctrl-C inside step 2's second micro-batch (its forward), resumed; stopped by
    should_stop after step 3, resumed: the four logged steps equal the uninterrupted
    run's. The interrupted step left nothing behind: the checkpoint is step 1's, at the
    data position after step 1's two micro-batches."""
    from xmgie.training.config import load_config
    from xmgie.training.engine import train

    ref, _ = full_run
    out = tmp_path / "run"
    cfg = load_config(config_file, tiny=True)
    _train_until_ctrl_c_in_forward(cfg, out, 4)
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-1"]
    state = json.loads((out / "checkpoint-1" / "state.json").read_text())
    assert (state["step"], state["epoch"], state["index"]) == (1, 0, 2)
    seen = []
    first = train(cfg, out, resume=True, progress=lambda step, total, logs: seen.append(step),
                  should_stop=lambda: len(seen) >= 2)
    assert first.interrupted and first.steps == 3 and first.final_dir is None
    assert (out / "checkpoint-3").is_dir() and not (out / "final").exists()
    second = train(cfg, out, resume=True)
    assert second.steps == STEPS and [r["step"] for r in second.metrics] == [4]
    # exactly: the same data order, the same draws, the same optimiser state
    assert _rows(out) == _rows(ref)


def test_resume_after_ctrl_c_keeps_the_spectral_critic_exact(env, config_file, tmp_path):
    """The shipped critic (spectral norm: every critic forward advances its power
    iteration's vectors, buffers saved with the critic): Ctrl-C inside step 2's second
    micro-batch, after the first micro-batch's critic forwards, then resumed, logs step 2
    as the uninterrupted run does."""
    from xmgie.training.config import load_config
    from xmgie.training.engine import train

    cfg = load_config(config_file, tiny=True, overrides={
        "model.critic.norm": "spectral", "steps.max": 2, "steps.checkpoint_every": 0})
    assert cfg.raw["model"]["critic"]["norm"] == "spectral"
    train(cfg, tmp_path / "ref")
    _train_until_ctrl_c_in_forward(cfg, tmp_path / "run", 4)
    train(cfg, tmp_path / "run", resume=True)
    assert _rows(tmp_path / "run") == _rows(tmp_path / "ref")


def test_two_processes_match_one(env, full_run, config_file, tmp_path):
    """``accelerate launch`` with two CPU processes (gloo), each a micro-batch of 2, against
    the one-process run accumulating two micro-batches of 2: the same global batch.

    Tolerance 1e-5 (relative, 1e-6 absolute): both runs see the same pairs in the same
    steps (an epoch's order depends only on the seed) and the same draws for each pair
    (the generators are seeded per micro-batch from its index in the global stream), so
    the losses differ only by float32 summation order (gradients all-reduced by gloo
    rather than accumulated in one process, one thread rather than two): measured at most
    1.2e-7 absolute over four steps. A pair seen twice, a pair's other noise or timestep
    moves a loss by 1e-3 or more."""
    ref, _ = full_run
    out = tmp_path / "run"
    env_vars = {**os.environ,
                "PYTHONPATH": os.pathsep.join([str(ROOT.parent)] + [
                    p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
                "XMGIE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    # accelerate's --cpu launcher starts one process (several only through mpirun); its
    # --multi_gpu launcher (torchrun) starts two, on CPUs with ACCELERATE_USE_CPU.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "xmgie", "train", str(config_file), "--tiny", "--out", str(out)]
    proc = subprocess.run(cmd, env=env_vars, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((out / "checkpoint-4" / "state.json").read_text())
    assert state["processes"] == 2 and (out / "checkpoint-4" / "rng-1.pt").is_file()
    one, two = _rows(ref), _rows(out)
    assert [r["step"] for r in two] == [r["step"] for r in one]
    for a, b in zip(one, two, strict=True):
        assert set(a) == set(b)
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)


def test_bad_data_fails_and_writes_nothing(env, config_file, tmp_path, capsys):
    from xmgie import cli
    from xmgie.training.synthetic import make_synthetic

    data = tmp_path / "pairs"
    make_synthetic(data, n=4, size=32)
    missing = sorted((data / "images").glob("*_target.png"))[1]
    missing.unlink()
    out = tmp_path / "run"
    code = cli.main(["train", str(config_file), "--tiny", "--dataset", str(data),
                     "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err.startswith("error:") and missing.name in err and "Traceback" not in err
    assert not out.exists()   # no checkpoint, no metrics, no folder at all


def test_bad_config_and_options_exit_2(env, config_file, tmp_path, capsys):
    from xmgie import cli

    bad = tmp_path / "bad.yaml"
    bad.write_text(SHIPPED.read_text().replace("  schedule: constant", "  shedule: constant"))
    assert cli.main(["train", str(bad), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "optim.shedule" in err and str(bad) in err and "Traceback" not in err
    assert cli.main(["train", "no-such-config", "--out", str(tmp_path / "b")]) == 2
    assert "no-such-config" in capsys.readouterr().err
    assert cli.main(["train", str(config_file), "--tiny", "--resume",
                     "--out", str(tmp_path / "c")]) == 2
    assert "--resume" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()
    # A bad task setting fails before the synthetic data of --tiny is written.
    task_bad = tmp_path / "task-bad.yaml"
    task_bad.write_text(SHIPPED.read_text().replace("critic: {kind: hinge",
                                                    "critic: {kind: wasserstein"))
    assert cli.main(["train", str(task_bad), "--tiny", "--out", str(tmp_path / "d")]) == 2
    assert "model.critic.kind" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
    # So does an early-stopping metric the task's validation does not return.
    metric_bad = tmp_path / "metric-bad.yaml"
    metric_bad.write_text(SHIPPED.read_text().replace("metric: val_psnr", "metric: val_pnsr"))
    assert cli.main(["train", str(metric_bad), "--tiny", "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "early_stopping.metric" in err and "'val_pnsr'" in err and "val_psnr" in err
    assert not (tmp_path / "e").exists()


def test_a_damaged_checkpoint_fails_in_one_line(env, full_run, config_file, tmp_path,
                                                capsys):
    """--resume from a checkpoint with a damaged file: exit 1, one line naming the
    checkpoint folder and the file, no traceback, the run folder's metrics untouched."""
    import shutil

    from xmgie import cli

    ref, _ = full_run
    out = tmp_path / "run"
    shutil.copytree(ref / "checkpoint-4", out / "checkpoint-4")
    (out / "metrics.jsonl").write_text((ref / "metrics.jsonl").read_text())
    folder = out / "checkpoint-4"
    good = {name: (folder / name).read_bytes()
            for name in ("state.json", "trainable.safetensors", "optimizer.pt")}
    state = json.loads(good["state.json"])
    del state["index"]
    damages = [("state.json", good["state.json"][:-9]),          # cut short
               ("state.json", json.dumps(state).encode()),        # a key missing
               ("trainable.safetensors", good["trainable.safetensors"][:200]),
               ("optimizer.pt", good["optimizer.pt"][:-100])]
    for name, damaged in damages:
        (folder / name).write_bytes(damaged)
        code = cli.main(["train", str(config_file), "--tiny", "--resume", "--out", str(out)])
        err = capsys.readouterr().err
        line = err.strip().splitlines()[-1]
        assert code == 1 and "Traceback" not in err, (name, err[-2000:])
        assert line.startswith("error: cannot resume from ") and str(folder) in line \
            and name in line, (name, line)
        (folder / name).write_bytes(good[name])
    assert (out / "metrics.jsonl").read_text() == (ref / "metrics.jsonl").read_text()


def test_a_step_saved_twice_replaces_its_checkpoint_whole(tmp_path):
    """The same step committed again: the new folder is in place, the old one gone, and
    no hidden folder is left (the old one is moved aside, not deleted, before the rename)."""
    from xmgie.training import checkpoint as ckpt

    for content in ("old", "new"):
        tmp = ckpt.begin(tmp_path, 3)
        (tmp / "state.json").write_text(content)
        assert ckpt.commit(tmp_path, 3) == tmp_path / "checkpoint-3"
    assert (tmp_path / "checkpoint-3" / "state.json").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-3"]


def test_config_checks():
    from xmgie.mgie_core.errors import InputError
    from xmgie.training.config import load_config, resolve_config_path

    # the installed package's copy (a wheel install ships configs/train/ as package data)
    shipped = resolve_config_path("xmgie")
    assert shipped.parts[-3:] == ("configs", "train", "xmgie.yaml")
    assert shipped.read_bytes() == SHIPPED.read_bytes()
    base = {"task": "xmgie", "batch": {"global": 8, "per_device": 2},
            "tiny": {"batch": {"global": 4}, "precision": "no"}}
    cfg = load_config(base)
    assert cfg.batch.accumulation(1) == 4 and cfg.batch.accumulation(2) == 2
    with pytest.raises(InputError, match="batch.global"):
        cfg.batch.accumulation(3)
    tiny = load_config(base, tiny=True, overrides={"steps.max": 7})
    assert tiny.batch.global_ == 4 and tiny.batch.per_device == 2 and tiny.steps.max == 7
    for bad, key in [({"task": "sdxl"}, "task"), ({"task": "mgie", "steps": {"max": 0}},
                     "steps.max"), ({"task": "mgie", "data": {"resolution": 60}},
                     "data.resolution"), ({"task": "mgie", "extra": 1}, "extra"),
                     ({"task": "mgie", "early_stopping": {"metric": "psnr"}},
                      "early_stopping.metric")]:
        with pytest.raises(InputError, match=key.replace(".", r"\.")):
            load_config(bad)


def test_early_stopping_ema_and_best_on_mgie(env, tmp_path):
    """The MGIE config (validation: its held-out L_all and edit metrics), with EMA: early
    stopping on a metric that must rise (val_loss, mode max, patience 1) stops at the
    first validation that does not beat the best, and final/ is best/, the export at the
    best step."""
    from xmgie.training.config import load_config
    from xmgie.training.engine import train

    cfg = load_config("mgie", tiny=True, overrides={
        "steps": {"max": 6, "log_every": 1, "val_every": 1, "checkpoint_every": 0},
        "early_stopping": {"metric": "val_loss", "mode": "max", "patience": 1},
        "ema": {"enabled": True, "decay": 0.5}})
    out = tmp_path / "run"
    result = train(cfg, out)
    vals = [r["val_loss"] for r in result.metrics]
    assert len(vals) == result.steps and result.stopped_early and result.steps < 6
    assert vals[-1] <= max(vals[:-1]) and all(b > a for a, b in zip(vals, vals[1:-1]))
    state = json.loads((out / f"checkpoint-{result.steps}" / "state.json").read_text())
    assert state["early_stopping"]["best"] == max(vals)
    assert (out / f"checkpoint-{result.steps}" / "ema.safetensors").is_file()
    best_files = sorted(p.relative_to(out / "best") for p in (out / "best").rglob("*")
                        if p.is_file())
    assert best_files == sorted(p.relative_to(out / "final") for p in
                                (out / "final").rglob("*") if p.is_file())
    for rel in best_files:
        assert (out / "best" / rel).read_bytes() == (out / "final" / rel).read_bytes()



def test_validation_edits_show_no_progress_bar_of_their_own(env, tmp_path):
    # The training bar is the run's one bar: the validation edits' inner bars (inversion,
    # editing) stay quiet, and the host's progress hook is back afterwards.
    from xmgie.mgie_core import host
    from xmgie.training.config import load_config
    from xmgie.training.engine import train

    opened = []

    class Recording:
        def __init__(self, total, desc):
            opened.append(desc)

        def update(self, n=1):
            pass

        def close(self):
            pass

    cfg = load_config(SHIPPED, tiny=True, overrides={
        "steps": {"max": 1, "log_every": 1, "val_every": 1, "checkpoint_every": 0},
        "early_stopping": {"metric": None}})
    previous = host.set_hooks(progress=Recording)
    try:
        result = train(cfg, tmp_path / "run")
        assert host.hooks().progress is Recording
    finally:
        host.set_hooks(progress=previous.progress)
    assert any("val_psnr" in row for row in result.metrics)   # validation did run
    assert opened == []


def test_a_cpu_launch_that_started_one_process_says_so(monkeypatch):
    # accelerate's --cpu launcher without mpirun runs the script once, with MASTER_ADDR
    # set for a rendezvous that never comes: the run says how to get N processes.
    from xmgie.training.engine import single_cpu_launch_note

    for var in ("ACCELERATE_USE_CPU", "MASTER_ADDR", "WORLD_SIZE", "OMPI_COMM_WORLD_SIZE",
                "PMI_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert single_cpu_launch_note() is None                 # a plain `xmgie train`
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    assert single_cpu_launch_note() is None                 # accelerate launch --cpu
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")          # ... --num_processes 2
    note = single_cpu_launch_note()
    assert note and "ONE process" in note and "--multi_gpu --num_processes N" in note
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")         # through mpirun: N processes
    assert single_cpu_launch_note() is None
