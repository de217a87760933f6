"""xmgie batch --ray: two local workers give byte-identical outputs and the same records
as one process, each worker loading the models once; without Ray, a clear error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_batch import ROOT, YELLOW, make_dataset

VOLATILE = ("times", "worker")  # wall times and which process ran the item


def _records(run: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text())
            for p in (run / "items").glob("*/record.json")}


def test_ray_two_workers_match_a_single_process(tmp_path, tiny_env, example_photos):
    try:
        import ray  # noqa: F401  (only: is it installed?)
    except ImportError:
        pytest.skip("Ray is not installed (pip install \"xmgie[scale]\"); CI installs it")
    from xmgie import cli

    data = make_dataset(tmp_path / "ds", sizes=(64, 96, 64, 96), shared=example_photos)
    common = ["batch", str(YELLOW), "--dataset", str(data), "--tiny", "--set", "4.steps=2",
              "--seed", "11"]
    single = tmp_path / "single"
    # Workers run one CPU thread each (--cpus-per-worker 1); PyTorch's CPU kernels may
    # round differently with another thread count, so the reference uses one thread too.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(common + ["--out", str(single)]) == 0
    finally:
        torch.set_num_threads(threads)

    distributed = tmp_path / "ray"
    env = {**os.environ, "XMGIE_NO_PROGRESS": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join([str(ROOT.parent)] + [
               p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    proc = subprocess.run([sys.executable, "-m", "xmgie", *common, "--out", str(distributed),
                           "--ray", "--workers", "2"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 Ray CPU worker(s)" in proc.stderr

    one, many = _records(single), _records(distributed)
    assert sorted(one) == sorted(many) == ["butterfly", "carpet", "cat_shirt", "corgi"]
    for item in one:
        a = {k: v for k, v in one[item].items() if k not in VOLATILE}
        b = {k: v for k, v in many[item].items() if k not in VOLATILE}
        assert a == b, item
        for out in a["outputs"]:
            assert (single / "items" / item / out["file"]).read_bytes() == \
                (distributed / "items" / item / out["file"]).read_bytes()
    # Same layout, and both workers were used; each loaded the model once.
    assert sorted(p.name for p in (single / "items").iterdir() if not p.name.startswith(".")) \
        == sorted(p.name for p in (distributed / "items").iterdir() if not p.name.startswith("."))
    by_pid: dict[int, list[dict]] = {}
    for rec in many.values():
        by_pid.setdefault(rec["worker"]["pid"], []).append(rec)
    assert len(by_pid) == 2 and os.getpid() not in by_pid
    for recs in by_pid.values():
        loads = [name for r in recs for name in r["worker"]["loaded_models"]]
        assert loads == ["XMGIELoadCheckpoint"], loads


def test_ray_missing_gives_a_clear_error(tmp_path, tiny_env, monkeypatch, capsys):
    from xmgie import cli

    monkeypatch.setitem(sys.modules, "ray", None)  # "import ray" now fails
    data = make_dataset(tmp_path / "ds", sizes=(64,))
    code = cli.main(["batch", str(YELLOW), "--dataset", str(data), "--tiny",
                     "--out", str(tmp_path / "run"), "--ray", "--workers", "2"])
    assert code == 101
    err = capsys.readouterr().err
    assert "--ray needs Ray, which is not installed" in err and 'pip install "xmgie[scale]"' in err
