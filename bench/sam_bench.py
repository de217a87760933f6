"""Time Segment Anything (mgie_core.models.sam.segment) on the example photos.

    python bench/sam_bench.py [--checkpoint sam_vit_b_01ec64.pth] [--device cpu|cuda]
                              [--repeat 5] [--limit N]

Without ``--checkpoint`` the tiny random-weight SAM of mgie_core/tiny is built in a
temporary folder: its times say what the pack's own code around SAM costs (prompt
checks, the image conversion, the predictor), not what a real encoder costs. With a real
checkpoint (a path, or a name found in the ``sams`` models folder) they are the cost a
user sees per mask.

Per example (512 x 512): one segment() call from a box prompt (the example mask's
bounding box) plus a positive point at its centre (prompts the SAM node takes). Each call
runs SAM's image encoder once (SamPredictor.set_image) and its mask decoder once. Prints
the load time, then per example the median and the best of ``--repeat`` calls after one
warm-up, and the predicted IoU of the kept mask.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from xmgie.mgie_core import tiny
from xmgie.mgie_core.masks import mask_bbox
from xmgie.mgie_core.models import sam as sam_lib

EXAMPLES = Path(__file__).resolve().parents[1] / "example_data"


def load(folder: Path, limit: int | None = None):
    manifest = json.loads((folder / "manifest.json").read_text())
    for ex in manifest["examples"][:limit]:
        img = np.asarray(Image.open(folder / ex["image"]).convert("RGB").resize((512, 512)))
        msk = np.asarray(Image.open(folder / ex["mask"]).convert("L").resize((512, 512)))
        yield ex["name"], torch.from_numpy(img.copy()).float() / 255, \
            torch.from_numpy(msk.copy()).float() / 255


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None,
                    help="SAM checkpoint (path or name); default: the tiny random SAM")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--examples", type=Path, default=EXAMPLES)
    ap.add_argument("--limit", type=int, default=None, help="first N examples only")
    args = ap.parse_args(argv)
    checkpoint = args.checkpoint
    if checkpoint is None:
        root = tiny.ensure_tiny_models(tempfile.mkdtemp(prefix="xmgie-sam-bench-"), ["sam"])
        checkpoint = str(tiny.tiny_path(root, "sam"))
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    t = time.perf_counter()
    model = sam_lib.load_sam(checkpoint, device=args.device)
    sync()
    print(f"SAM {model.model_type} from {model.path.name} on {args.device}: loaded in "
          f"{time.perf_counter() - t:.2f} s; repeat={args.repeat}")
    print(f"{'example':<12}{'median ms':>10}{'best ms':>10}{'IoU':>7}")
    rows = []
    for name, image, mask in load(args.examples, args.limit):
        x0, y0, x1, y1 = mask_bbox(mask)
        centre = ((x0 + x1) / 2, (y0 + y1) / 2)

        def call(image=image, box=(x0, y0, x1, y1), centre=centre):
            out = sam_lib.segment(model, image, points=[centre], labels=[1], box=box)
            sync()
            return out

        call()                                   # warm-up
        times, score = [], 0.0
        for _ in range(args.repeat):
            t = time.perf_counter()
            _, score = call()
            times.append(time.perf_counter() - t)
        row = {"example": name, "median_ms": statistics.median(times) * 1e3,
               "best_ms": min(times) * 1e3, "iou": score}
        rows.append(row)
        print(f"{name:<12}{row['median_ms']:>10.1f}{row['best_ms']:>10.1f}{score:>7.3f}")
    return rows


if __name__ == "__main__":
    main()
