"""Helpers the dataset adapter tests share: photos for fixtures, and ``xmgie batch --tiny``
run on a dataset folder with its masks checked against the adapter's mask descriptions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
VAE = ROOT / "workflows" / "api" / "vae_roundtrip_api.json"


def photo(path: Path, size: tuple[int, int] = (48, 32), seed: int = 0) -> Path:
    """A random RGB photo of ``size`` (width, height) at ``path`` (folders made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def batch(folder: Path, run: Path, *options: str) -> int:
    """``xmgie batch`` of the VAE round trip over the dataset ``folder`` with the tiny
    models; the exit code."""
    from xmgie import cli

    return cli.main(["batch", str(VAE), "--dataset", str(folder), "--tiny", *options,
                     "--out", str(run)])


def run_records(folder: Path, run: Path, *options: str) -> dict[str, dict]:
    """Run :func:`batch` (it must succeed) and return each item's record.json by id."""
    assert batch(folder, run, *options) == 0
    return {p.parent.name: json.loads(p.read_text()) for p in run.glob("items/*/record.json")}


def check_run_masks(run: Path, items, size: tuple[int, int]) -> list[np.ndarray]:
    """Each item ran and, when it has a mask description, the batch wrote it as
    ``masks/<id>.png`` at the photo's ``size`` (width, height), equal to
    ``render_mask``; returns the masks read back (bool [H, W]; None without one)."""
    from xmgie.runner.datasets import render_mask

    out = []
    for item in items:
        rec = json.loads((run / "items" / item.id / "record.json").read_text())
        assert rec["status"] == "ok" and rec["outputs"], rec
        if item.mask_spec is None:
            assert "mask" not in rec["inputs"]
            out.append(None)
            continue
        mask_file = run / "masks" / f"{item.id}.png"
        assert rec["inputs"]["mask"] == str(mask_file.resolve())
        with Image.open(mask_file) as im:
            mask = np.asarray(im) > 127
        assert mask.shape == (size[1], size[0])
        np.testing.assert_array_equal(mask, render_mask(item.mask_spec, size) > 0)
        out.append(mask)
    return out


def batch_error(folder: Path, run: Path, capsys, *options: str) -> str:
    """Run :func:`batch` expecting a user error (exit 101) and return its message, which
    names the problem without a traceback."""
    capsys.readouterr()
    assert batch(folder, run, *options) == 101
    err = capsys.readouterr().err
    assert "error: " in err and "Traceback" not in err
    return err
