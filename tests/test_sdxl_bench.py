"""The SDXL bench: ``bench/edit_bench.py --size tiny_sdxl`` runs the SDXL code paths
(two text encoders, the packed conditioning) with pass counts equal to the theory, and
``bench/sdxl_memory.py``'s estimate counts what it says (weights byte for byte, live
tensors freed when their last reference goes). Timings and the GPU's peak are the
bench's to report, never a test's to assert."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"
CONFIGS = Path(__file__).resolve().parent.parent / "mgie_core" / "configs"


def _load(name: str):
    path = BENCH_DIR / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"xmgie_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_edit_bench_runs_the_tiny_sdxl(example_photos, tmp_path):
    bench = _load("edit_bench")
    out = tmp_path / "sdxl.json"
    # 7 steps: the fast MAG schedule (the first 16 % of the steps) optimises one
    bench.main(["--size", "tiny_sdxl", "--device", "cpu", "--steps", "7", "--limit", "1",
                "--modes", "b", "--fast-mag-iterations", "2", "--sync-steps", "0",
                "--warmup-steps", "0",
                "--pass-repeat", "1", "--examples", str(example_photos), "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["config"]["family"] == "SDXL" and res["config"]["image_px"] == 128
    (row,) = res["modes"]["b"]["per_example"]
    assert res["modes"]["b"]["counts_match_theory"]
    assert row["counts"]["sampling"]["fwd_by_batch"]["4"] == 7      # the two-branch batch
    assert row["counts"]["sampling"]["bwd"] == 2                    # MAG's backward ran
    assert res["modes"]["b"]["peak_reserved_gib"] is None            # CPU: not measured
    assert bench.SIZES["sdxl"] == 1024


def test_live_bytes_counts_each_storage_once_and_frees_it():
    mem = _load("sdxl_memory")
    with mem.LiveBytes() as mode:
        a = torch.empty(1024, dtype=torch.float32, device="meta")     # 4 KiB
        b = a.view(32, 32)                                             # same storage
        c = torch.empty(256, dtype=torch.float16, device="meta")       # 512 B
        assert mode.live == 4096 + 512
        del a, c
        assert mode.live == 4096                                       # b keeps a's storage
        del b
        assert mode.live == 0
    assert mode.peak == 4096 + 512


def test_memory_estimate_counts_sdxls_weights_and_grows_with_the_image():
    """SDXL's full-size weights byte for byte (UNet 2.567 B parameters in fp16; both
    text encoders; the VAE in fp32 as its config asks), and activations that grow with
    the image (meta device: no memory is used)."""
    mem = _load("sdxl_memory")
    small = mem.estimate(CONFIGS / "sdxl", px=256)
    larger = mem.estimate(CONFIGS / "sdxl", px=512)
    w = small["weights_gib"]
    assert round(w["unet"] * 2 ** 30) == 2 * 2_567_463_684
    assert set(w) == {"unet", "text_encoder", "text_encoder_2", "vae"}
    assert small["vae_dtype"] == "torch.float32"
    a, b = small["stage_activations_gib"], larger["stage_activations_gib"]
    for stage in a:
        assert b[stage] > a[stage] > 0, stage
    # MAG's truncated forward keeps less for its backward than the whole UNet's
    assert a["mag_truncated_forward_backward_batch1"] < a["mag_forward_backward_batch1"]
    assert small["simulated_peak_gib"] == small["weights_total_gib"] + max(a.values())
