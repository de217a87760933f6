"""A synthetic paired-edit dataset: a coloured shape on a smooth textured wall, recoloured.

Each pair is a photo of one square or circle on a softly shaded wall and its edit, the
same photo with only the shape's colour changed ("make the square red"). The mask is the
shape, so the target equals the source outside it, the edit is learnable by a tiny model
in a few steps, and every loss of the training tasks has a real signal (L1 inside the
mask, an unchanged background, a text that names the change). Nothing is downloaded: the
pictures come from a seeded NumPy generator, so the same arguments always write the same
bytes.

The folder is a batch manifest dataset (``runner.dataset``) whose items also have a
``target`` image, the layout :func:`xmgie.training.data.load_pairs` reads:

    DIR/manifest.jsonl         one JSON object per pair
    DIR/images/0000_source.png the photo
    DIR/images/0000_target.png the edit
    DIR/images/0000_mask.png   the shape, white on black

``python -m xmgie.training.synthetic DIR [--n N] [--size S] [--seed K]`` writes one.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..runner.dataset import write_pair_manifest
from ..runner.datasets import with_article

# Saturated, well separated colours, so a recolouring is obvious at any size.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 35),
    "green": (40, 170, 60),
    "blue": (40, 75, 215),
    "yellow": (235, 205, 35),
    "purple": (135, 50, 175),
    "orange": (240, 130, 25),
}
# Muted backgrounds: the shape is always the most saturated thing in the picture.
WALLS: dict[str, tuple[int, int, int]] = {
    "grey wall": (128, 128, 128),
    "beige wall": (196, 182, 156),
    "white wall": (214, 214, 208),
}
SHAPES = ("square", "circle")


def _wall(rng: np.random.Generator, size: int, base: tuple[int, int, int]) -> np.ndarray:
    """A smooth texture: the wall colour times a low-frequency shading (a gentle gradient
    plus two slow waves), float32 [H, W, 3] in 0..1. Low frequencies only, so it is easy
    to reproduce and any high-frequency error in an edit is the model's."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    angle = rng.uniform(0, 2 * np.pi)
    shade = 0.08 * (np.cos(angle) * xx + np.sin(angle) * yy - 0.5)
    for _ in range(2):
        fx, fy = rng.uniform(0.5, 2.0, size=2)
        phase = rng.uniform(0, 2 * np.pi)
        shade += 0.04 * np.sin(2 * np.pi * (fx * xx + fy * yy) + phase)
    colour = np.asarray(base, np.float32) / 255.0
    return np.clip(colour[None, None, :] * (1.0 + shade[..., None]), 0.0, 1.0)


def _shape_mask(rng: np.random.Generator, size: int, shape: str) -> np.ndarray:
    """A binary mask (bool [H, W]) of one square or circle, 30-50 % of the side wide,
    placed at random fully inside the picture."""
    side = int(round(size * rng.uniform(0.3, 0.5)))
    side = max(side, 2)
    x0 = int(rng.integers(0, size - side + 1))
    y0 = int(rng.integers(0, size - side + 1))
    if shape == "square":
        mask = np.zeros((size, size), bool)
        mask[y0:y0 + side, x0:x0 + side] = True
        return mask
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx, r = y0 + (side - 1) / 2, x0 + (side - 1) / 2, side / 2
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _paint(wall: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """The wall with the shape painted in ``colour``, lit by the same shading as the wall
    (so source and target share the light and differ only in the shape's colour)."""
    out = wall.copy()
    light = wall.mean(axis=2, keepdims=True) / max(float(wall.mean()), 1e-6)
    paint = np.asarray(colour, np.float32)[None, None, :] / 255.0 * light
    out[mask] = np.clip(paint, 0.0, 1.0)[mask]
    return out


def make_pair(index: int, size: int = 64, seed: int = 0) -> dict:
    """One synthetic pair as arrays and texts: ``source``/``target`` uint8 [H,W,3],
    ``mask`` uint8 [H,W] (255 inside), and the manifest fields. Pair ``index`` depends only
    on (``index``, ``size``, ``seed``), so a larger ``n`` extends a smaller one."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    wall_name = list(WALLS)[int(rng.integers(len(WALLS)))]
    names = list(COLOURS)
    before = names[int(rng.integers(len(names)))]
    after = [c for c in names if c != before][int(rng.integers(len(names) - 1))]
    wall = _wall(rng, size, WALLS[wall_name])
    mask = _shape_mask(rng, size, shape)
    source = _paint(wall, mask, COLOURS[before])
    target = _paint(wall, mask, COLOURS[after])
    return {
        "source": np.round(source * 255.0).astype(np.uint8),
        "target": np.round(target * 255.0).astype(np.uint8),
        "mask": (mask * 255).astype(np.uint8),
        "fields": {
            "instruction": f"make the {shape} {after}",
            "source_prompt": f"{with_article(f'{before} {shape}')} on a {wall_name}",
            "target_prompt": f"{with_article(f'{after} {shape}')} on a {wall_name}",
            "expressive_instruction": (
                f"Repaint the {before} {shape} {after}, keeping its size, position and "
                f"shading, and leave the {wall_name} around it unchanged."),
            "edit_words": [after],
            "object": shape,
        },
    }


def make_synthetic(folder: Path | str, n: int = 16, size: int = 64, seed: int = 0) -> Path:
    """Write ``n`` synthetic pairs of ``size`` x ``size`` pixels into ``folder`` (created
    if needed; files of an earlier run with the same names are overwritten) and return
    the path of its ``manifest.jsonl``. Deterministic: the same (n, size, seed) give the
    same files."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"synthetic dataset: n={n!r}; expected a whole number of pairs >= 1")
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise ValueError(f"synthetic dataset: size={size!r}; expected a whole number of "
                         "pixels >= 8")
    return write_pair_manifest(
        Path(folder).expanduser(),
        ((p["source"], p["target"], p["mask"], p["fields"])
         for p in (make_pair(i, size, seed) for i in range(n))), "synthetic")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m xmgie.training.synthetic",
        description="Write a synthetic paired-edit dataset (a shape recoloured on a wall).")
    parser.add_argument("folder", help="where to write manifest.jsonl and images/")
    parser.add_argument("--n", type=int, default=16, help="number of pairs (default 16)")
    parser.add_argument("--size", type=int, default=64, help="side in pixels (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    try:
        manifest = make_synthetic(args.folder, n=args.n, size=args.size, seed=args.seed)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(manifest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
