"""Time the GB seam blur (mgie_core.blur.gb_blur) on the example photos at 512x512.

    python bench/gb_bench.py [--repeat 5] [--sigma-max 5] [--sigma-s 10] [--threads N]

Prints one row per example and device (CPU, and CUDA when available): the median and the
best of ``--repeat`` runs after one warm-up, and the distance transform's share.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from xmgie.mgie_core import blur

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(folder: Path):
    manifest = json.loads((folder / "manifest.json").read_text())
    for ex in manifest["examples"]:
        img = np.asarray(Image.open(folder / ex["image"]).convert("RGB").resize((512, 512)))
        msk = np.asarray(Image.open(folder / ex["mask"]).convert("L").resize((512, 512)))
        yield (ex["name"], torch.from_numpy(img.copy()).float()[None] / 255,
               torch.from_numpy(msk.copy()).float()[None] / 255)


def timed(fn, repeat: int, sync) -> list[float]:
    fn()
    sync()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return times


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--sigma-max", type=float, default=5.0)
    ap.add_argument("--sigma-s", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--examples", type=Path, default=EXAMPLES)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"gb_blur 512x512, sigma_max={args.sigma_max}, sigma_s={args.sigma_s}, "
          f"{len(blur.default_levels(args.sigma_max))} levels, "
          f"{torch.get_num_threads()} CPU threads, repeat={args.repeat}")
    print(f"{'example':<12}{'device':<8}{'median ms':>10}{'best ms':>10}{'EDT ms':>9}")
    for name, image, mask in load(args.examples):
        for dev in devices:
            x, m = image.to(dev), mask.to(dev)
            sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
            t = timed(lambda: blur.gb_blur(x, m, args.sigma_max, args.sigma_s), args.repeat, sync)
            te = timed(lambda: blur.distance_to_boundary(m > 0.5), args.repeat, sync)
            print(f"{name:<12}{dev:<8}{statistics.median(t) * 1e3:>10.1f}"
                  f"{min(t) * 1e3:>10.1f}{statistics.median(te) * 1e3:>9.1f}")


if __name__ == "__main__":
    main()
