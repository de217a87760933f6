"""bench/edit_bench.py (issue #6): a tiny CPU run of the three modes, with UNet pass counts
checked against counts derived here, independently of the bench's own formula."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "edit_bench.py"
STEPS = 4
INNER = 10            # null-text inner iterations (official default)


def _load_bench():
    spec = importlib.util.spec_from_file_location("xmgie_edit_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def expected(method: str, batched: bool, iters: int, cache: bool, truncate: bool) -> dict:
    """One full edit at STEPS steps; MAG optimises round(STEPS / 2) = 2 steps.

    inversion  DDIM trajectory: N forwards. Null-text adds per step 1 conditional forward
               (no grad), INNER forward+backward pairs and 1 guided (batch-2) forward.
    sampling   N batch-4 forwards (batched) or 2N batch-2 (two guided calls per step);
               MAG per optimised step: `iters` edit-row forward+backward pairs, plus the
               source row once (cached) or once per iteration (recomputed): the reference
               pattern doubles MAG's forwards. Truncation stops those forwards early but
               does not change how many there are.
    """
    n, n_opt = STEPS, 2
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
def test_edit_bench_tiny(shared_examples, tmp_path, capsys):
    bench = _load_bench()
    out = tmp_path / "results.json"
    bench.main(["--size", "tiny", "--device", "cpu", "--steps", str(STEPS), "--limit", "1",
                "--examples", str(shared_examples), "--out", str(out)])
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())

    assert not res["interrupted"]
    assert set(res["modes"]) == {"a", "b", "c"}
    fast_iters = bench.FAST_MAG["iterations"]
    want = {"a": expected("null_text", False, 15, cache=False, truncate=False),
            "b": expected("direct", True, fast_iters, cache=True, truncate=True),
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
