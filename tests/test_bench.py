"""The bench scripts run and report what they promise. bench/edit_bench.py: a tiny CPU
run of the three modes, with UNet pass counts checked against counts derived here,
independently of the bench's own formula; bench/gb_bench.py and bench/sam_bench.py: one
example each. Timings are the bench's to report, never a test's to assert."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"
BENCH = BENCH_DIR / "edit_bench.py"
STEPS = 4
INNER = 10            # null-text inner iterations (official default)


def _load_bench(path: Path = BENCH):
    spec = importlib.util.spec_from_file_location(f"xmgie_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def expected(method: str, batched: bool, iters: int, cache: bool, truncate: bool,
             n_opt: int = 2) -> dict:
    """One full edit at STEPS steps; MAG optimises ``n_opt`` steps (MAG-Edit's half: 2).

    inversion  DDIM trajectory: N forwards. Null-text adds per step 1 conditional forward
               (no grad), INNER forward+backward pairs and 1 guided (batch-2) forward.
    sampling   N batch-4 forwards (batched) or 2N batch-2 (two guided calls per step);
               MAG per optimised step: `iters` edit-row forward+backward pairs, plus the
               source row once (cached) or once per iteration (recomputed): the reference
               pattern doubles MAG's forwards. Truncation stops those forwards early but
               does not change how many there are.
    """
    n = STEPS
    inv_fwd = n + (n * (1 + INNER + 1) if method == "null_text" else 0)
    inv_bwd = n * INNER if method == "null_text" else 0
    mag_edit = n_opt * iters
    mag_src = n_opt if cache else n_opt * iters
    samp = n if batched else 2 * n
    return {"inversion": {"fwd": inv_fwd, "bwd": inv_bwd, "truncated": 0,
                          "fwd_by_batch": ({"1": n + n * (1 + INNER), "2": n}
                                           if method == "null_text" else {"1": n})},
            "sampling": {"fwd": samp + mag_src + mag_edit, "bwd": mag_edit,
                         "truncated": mag_src + mag_edit if truncate else 0,
                         "fwd_by_batch": {"1": mag_src + mag_edit,
                                          ("4" if batched else "2"): samp}}}


@pytest.mark.timeout(300)
def test_edit_bench_tiny(example_photos, tmp_path, capsys):
    bench = _load_bench()
    out = tmp_path / "results.json"
    bench.main(["--size", "tiny", "--device", "cpu", "--steps", str(STEPS), "--limit", "1",
                "--examples", str(example_photos), "--out", str(out)])
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())

    assert not res["interrupted"]
    assert set(res["modes"]) == {"a", "b", "c"}
    fast = bench.FAST_MAG
    want = {"a": expected("null_text", False, 15, cache=False, truncate=False),
            "b": expected("direct", True, fast["iterations"], cache=True, truncate=True,
                          n_opt=round(fast["opt_fraction"] * STEPS)),
            "c": expected("null_text", True, 15, cache=True, truncate=True)}
    for key, mode in res["modes"].items():
        (row,) = mode["per_example"]
        assert all(row["times_s"][s] > 0 for s in ("encode", "inversion", "sampling",
                                                    "decode", "gb", "total"))
        assert row["counts"] == want[key], key
        assert mode["counts_match_theory"], key
        # MAG's own report agrees with the hook counts
        samp = want[key]["sampling"]
        assert row["mag_passes"]["edit"] == samp["bwd"]
        assert row["mag_passes"]["source"] == samp["fwd"] - samp["bwd"] - \
            (STEPS if key != "a" else 2 * STEPS)
        assert row["peaks_gib"]["diffusion"] is None          # CPU: n/a
        assert mode["overhead"]["sampling"]["model"] > 0

    # MAG's forwards: the reference pattern recomputes the source row at every iteration,
    # doubling them (one source + one edit per backward); the cached source costs one
    # forward per optimised step (2 here)
    a, c = res["modes"]["a"]["counts"]["sampling"], res["modes"]["c"]["counts"]["sampling"]
    assert a["fwd"] - 2 * STEPS == 2 * a["bwd"]
    assert c["fwd"] - STEPS == c["bwd"] + 2
    assert a["bwd"] == c["bwd"]
    p = res["unet_pass"]
    assert all(p[k] > 0 for k in ("fwd_b1_ms", "fwd_b2_ms", "fwd_b4_ms", "fwd_bwd_b1_ms"))

    assert "| mode |" in printed
    for label in ("a reference", "b fast", "c seed-faithful"):
        assert f"| {label} |" in printed
    assert "n/a" in printed

    # a and c share one null-text inversion (timed and counted once) and give the same
    # edit: their ratio is the sampler's call pattern alone; a / b is reference / fast
    a_row, c_row = res["modes"]["a"]["per_example"][0], res["modes"]["c"]["per_example"][0]
    assert c_row["inversion_shared"] and not a_row["inversion_shared"]
    assert a_row["times_s"]["inversion"] == c_row["times_s"]["inversion"]
    assert res["same_output_a_c"]["max_abs_latent"] < 1e-3
    r = res["ratios"]
    assert r["a_over_c"] == pytest.approx(res["modes"]["a"]["mean_s"]["total"]
                                          / res["modes"]["c"]["mean_s"]["total"])
    assert r["a_over_b"] == pytest.approx(res["modes"]["a"]["mean_s"]["total"]
                                          / res["modes"]["b"]["mean_s"]["total"])
    # (timings are the bench's to report, not a test's to assert: the UNet pass counts
    # below pin the call patterns that make the ratios)
    assert "a / c (reference call pattern / ours" in printed and "a / b (reference" in printed

    # host synchronisations per step (an untimed edit at --sync-steps steps per mode):
    # none in the fast mode's loops; null-text reads once per inner iteration (plus, on
    # the CPU, Adam's host step counter: a read per update and its state once a step)
    sync_steps = res["config"]["sync_steps"]
    b = res["modes"]["b"]["syncs"]
    assert b["DDIM inversion"]["max_per_step"] == 0 and b["editing"]["max_per_step"] == 0
    assert b["DDIM inversion"]["steps"] == b["editing"]["steps"] == sync_steps
    for key in ("a", "c"):
        sc = res["modes"][key]["syncs"]
        assert sc["editing"]["max_per_step"] == 0, key
        assert 1 <= sc["null-text inversion"]["max_per_step"] <= 2 * INNER + 1, key
    assert "| 0 / 0 |" in printed                              # mode b's syncs column


@pytest.mark.timeout(300)
def test_mag_frontier_tiny(example_photos, tmp_path, capsys):
    """bench/mag_frontier.py at 6 steps on one photo: each setting makes the passes it
    states (3 optimised steps in ref), ref is at distance 0 from itself, and the table and
    the JSON come out."""
    frontier = _load_bench(BENCH_DIR / "mag_frontier.py")
    out = tmp_path / "frontier.json"
    res = frontier.main(["--steps", "6", "--limit", "1", "--examples", str(example_photos),
                         "--settings", "none,it1,opt0.2,15>1@0.2", "--out", str(out)])
    # MAG pairs: 3 x 15; none; 3 x 1; round(0.2 x 6) = 1 step x 15; 15 then 1, 1
    pairs = {"ref": 45, "none": 0, "it1": 3, "opt0.2": 15, "15>1@0.2": 17}
    steps_optimised = {"ref": 3, "none": 0, "it1": 3, "opt0.2": 1, "15>1@0.2": 3}
    summary = res["summary"]
    assert list(summary) == list(pairs)
    for name, n in pairs.items():
        (row,) = res["per_example"][name]
        assert row["counts"]["bwd"] == row["mag_pairs"] == n, name
        # the sampler's 6 forwards, one source forward per optimised step, one per pair
        assert row["counts"]["fwd"] == 6 + steps_optimised[name] + n, name
        assert row["cpu_s"] > 0 and 0 < row["probe"]["act"] < 1, name
    ref = res["per_example"]["ref"][0]
    assert ref["latent_diff"] == {"inside": 0.0, "outside": 0.0}
    assert res["per_example"]["none"][0]["latent_diff"]["inside"] > 0
    assert json.loads(out.read_text())["config"]["steps"] == 6
    assert "| 15>1@0.2 |" in capsys.readouterr().out


def test_gb_bench_reports_time_and_kornias_distance_error(example_photos, capsys):
    gb = _load_bench(BENCH_DIR / "gb_bench.py")
    rows = gb.main(["--repeat", "1", "--limit", "1", "--examples", str(example_photos)])
    printed = capsys.readouterr().out
    cpu = [r for r in rows if r["device"] == "cpu"]
    assert len(cpu) == 1 and cpu[0]["example"] in printed
    assert cpu[0]["median_ms"] > 0 and cpu[0]["edt_ms"] > 0
    # kornia's approximate distance is measured against the exact one: the error is a
    # number of pixels (what the bench documents), and the share a fraction
    assert cpu[0]["kornia_max_err_px"] >= 0 and 0 <= cpu[0]["kornia_frac_over_1px"] <= 1
    assert "kornia max err px" in printed


def test_sam_bench_times_the_tiny_sam(example_photos, tiny_models, capsys):
    sam = _load_bench(BENCH_DIR / "sam_bench.py")
    rows = sam.main(["--checkpoint", str(tiny_models("sam")), "--device", "cpu",
                     "--repeat", "1", "--limit", "1", "--examples", str(example_photos)])
    printed = capsys.readouterr().out
    assert len(rows) == 1 and rows[0]["median_ms"] > 0
    assert math.isfinite(rows[0]["iou"])     # a random SAM's predicted IoU: any number
    assert "loaded in" in printed and rows[0]["example"] in printed


def test_train_gpu_memory_dry_run_on_cpu(tmp_path, capsys):
    """bench/train_gpu_memory.py's CPU dry run: one timed step of the xMGIE config through
    the real engine with checkpointing on and off; memory n/a, said to be a dry run."""
    bench = _load_bench(BENCH_DIR / "train_gpu_memory.py")
    out = tmp_path / "train_gpu.json"
    res = bench.main(["--size", "tiny", "--device", "cpu", "--steps", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    assert json.loads(out.read_text()) == json.loads(json.dumps(res, default=str))

    assert res["dry_run"] and not res["interrupted"]
    c = res["config"]
    assert c["device"] == "cpu" and c["gpu"] is None
    assert (c["resolution"], c["per_device"], c["steps"], c["warmup_steps"]) == (64, 4, 1, 1)
    assert c["accumulation"] * c["per_device"] == c["global_batch"]
    assert "readme_estimate_gib" not in res          # only for SD 1.5 size at 512 px
    assert [r["checkpointing"] for r in res["settings"]] == ["on", "off"]
    for r in res["settings"]:
        assert not r["oom"] and not r["interrupted"]
        # the timed steps hold one UNet: the task's copy, the bench's own freed
        assert r["given_unet_released"] is True
        assert r["max_allocated_gib"] is None and r["max_reserved_gib"] is None
        assert r["warmup"]["max_allocated_gib"] is None and r["warmup"]["seconds"] > 0
        assert r["steps"] == 1 and r["seconds"] > 0
        assert r["samples_per_s"] == pytest.approx(r["steps_per_s"] * c["global_batch"])
        assert len(r["losses"]) == 2 and all(math.isfinite(v) for v in r["losses"])
    # checkpointing recomputes the same call: the same losses, also after a step whose
    # gradients went through the recomputation
    on, off = (r["losses"] for r in res["settings"])
    assert on == pytest.approx(off, rel=1e-4, abs=1e-6)
    assert "DRY RUN on a CPU" in printed and res["table"] in printed
