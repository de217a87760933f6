"""Every workflow ComfyUI lists from workflows/ (the UI files; their API twins in
workflows/api/ convert to the same prompt, tests/test_workflow_ui.py) validates and runs
under --tiny, as a user runs it: through the real `xmgie` CLI, with small inputs and few
steps set by --set overrides. And the README's first command: the shipped edit."""

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
    from xmgie.runner import engine, workflow_ui

    registry = cli.build_registry()
    prompt = workflow_ui.to_api(json.loads(wf.read_text()), registry)
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


# --- the README's first command ---------------------------------------------------------

FIRST_COMMAND = "xmgie run workflows/edit_carpet_yellow.json --tiny --output-dir output"


def test_readme_and_ci_run_the_edit_first():
    readme = (ROOT / "README.md").read_text()
    try_it = readme.split("## Try it")[1].split("\n## ")[0]
    commands = [l.strip() for l in try_it.splitlines() if l.strip().startswith("xmgie ")]
    assert commands and commands[0] == FIRST_COMMAND
    assert FIRST_COMMAND in (ROOT / ".ci" / "run").read_text()


def test_readme_first_command_edits_at_128_px(tmp_path, tiny_root, clean_paths, capsys,
                                              monkeypatch):
    """The command exactly as the README gives it, from a fresh folder: the shipped edit
    finds its images beside the workflow, runs small under --tiny and saves 128 px."""
    from xmgie import cli
    from xmgie.mgie_core import tiny

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(tiny.ENV_TINY_DIR, str(tiny_root))
    args = FIRST_COMMAND.split()[1:]
    args[1] = str(ROOT / args[1])
    assert cli.main(args) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "images downscaled to at most 128 px, 4.steps 50 -> 10" in err
    with Image.open(tmp_path / "output" / "xmgie_carpet_yellow_00001_.png") as im:
        assert im.size == (128, 128)


def test_tiny_caps_apply_before_set_overrides(tmp_path, tiny_root, clean_paths):
    from xmgie import cli
    from xmgie.runner import core_nodes, engine, workflow_ui

    wf = ROOT / "workflows" / "edit_carpet_guided.json"
    args = cli.build_parser().parse_args(["check", str(wf), "--tiny", "--set", "4.steps=3"])
    registry = cli.build_registry()
    with core_nodes.using_context(cli.run_context(args)):
        prompt, _ = cli.prepare(args, json.loads(wf.read_text()), registry)
    assert prompt["4"]["inputs"]["steps"] == 3                       # --set wins
    assert prompt["4"]["inputs"]["inner_steps"] == cli.TINY_CAPS["inner_steps"]
    assert prompt["6"]["inputs"]["iterations"] == cli.TINY_CAPS["iterations"]
    untouched = workflow_ui.to_api(json.loads(wf.read_text()), registry)
    assert untouched["4"]["inputs"]["steps"] == 50


def test_tiny_context_downscales_loaded_images(tmp_path):
    from xmgie.runner import core_nodes

    Image.new("RGBA", (512, 384), (200, 10, 10, 128)).save(tmp_path / "big.png")
    with core_nodes.using_context(core_nodes.RunContext(input_dirs=[tmp_path], max_side=128)):
        image, mask = core_nodes.LoadImage().load_image("big.png")
        (channel,) = core_nodes.LoadImageMask().load_image("big.png", "red")
    assert image.shape == (1, 96, 128, 3) and mask.shape == (1, 96, 128)
    assert channel.shape == (1, 96, 128)
    assert abs(float(mask.mean()) - (1 - 128 / 255)) < 1e-3   # alpha kept through the resize
    with core_nodes.using_context(core_nodes.RunContext(input_dirs=[tmp_path])):
        image, _ = core_nodes.LoadImage().load_image("big.png")
    assert image.shape == (1, 384, 512, 3)
