"""Every workflow under workflows/ validates and runs under --tiny, as a user runs it:
through the real `xmgie` CLI, with small inputs and few steps set by --set overrides."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))

# Cheap values for inputs that only cost time, applied wherever a node has them.
FAST = {"steps": 3, "max_new_tokens": 4, "iterations": 2, "inner_steps": 2}


def _inputs(tmp_path: Path) -> tuple[Path, Path]:
    img, mask = tmp_path / "small.png", tmp_path / "small_mask.png"
    Image.new("RGB", (128, 128), (180, 40, 40)).save(img)
    m = Image.new("L", (128, 128), 0)
    m.paste(255, (32, 40, 96, 104))
    m.save(mask)
    return img, mask


def _overrides(wf: Path, tmp_path: Path) -> list[str]:
    from xmgie import cli
    from xmgie.runner import engine

    registry = cli.build_registry()
    prompt = engine.to_api(json.loads(wf.read_text()), registry)
    img, mask = _inputs(tmp_path)
    sets = []
    for node_id, node in prompt.items():
        inputs = node["inputs"]
        # Names in the input folder (--input-dir below): LoadImage reads nowhere else.
        if node["class_type"] == "LoadImage":
            sets.append(f"{node_id}.image={img.name}")
        elif node["class_type"] == "LoadImageMask":
            sets.append(f"{node_id}.image={mask.name}")
        elif node["class_type"] == "XMGIESAMSegment":
            sets += [f"{node_id}.points=64,64", f"{node_id}.negative_points=10,10"]
        for name, value in FAST.items():
            if name in inputs and not engine.is_link(inputs[name]):
                sets.append(f"{node_id}.{name}={value}")
    return [a for s in sets for a in ("--set", s)]


@pytest.mark.parametrize("wf", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_checks_and_runs_under_tiny(wf, tmp_path, tiny_root, clean_paths, capsys):
    from xmgie import cli
    from xmgie.mgie_core import tiny

    old = os.environ.get(tiny.ENV_TINY_DIR)
    os.environ[tiny.ENV_TINY_DIR] = str(tiny_root)
    try:
        assert cli.main(["check", str(wf), "--tiny"]) == 0
        out_dir = tmp_path / "out"
        rc = cli.main(["run", str(wf), "--tiny", "--output-dir", str(out_dir),
                       "--input-dir", str(tmp_path), *_overrides(wf, tmp_path)])
    finally:
        if old is None:
            os.environ.pop(tiny.ENV_TINY_DIR, None)
        else:
            os.environ[tiny.ENV_TINY_DIR] = old
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    pngs = list(out_dir.rglob("*.png"))
    assert pngs, printed.out
    for p in pngs:
        with Image.open(p) as im:
            assert im.mode == "RGB" and im.size == (128, 128)
