"""Every workflow ComfyUI lists from workflows/ (the UI files; their API twins in
workflows/api/ convert to the same prompt, tests/test_workflow_ui.py) validates and runs
under --tiny, as a user runs it: through the real `xmgie` CLI, on the photo and mask it
ships with (found beside it), with few steps set by --set overrides; and every optimising
control in it applies updates. And the README's first command: the shipped edit."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))

# Cheap values for inputs that only cost time, applied wherever a node has them. And
# only_people off: identity guidance stands aside (by design, reported as such) when the
# plan's subject is not a person, and the photo the templates ship is a carpet.
FAST = {"steps": 3, "max_new_tokens": 4, "iterations": 2, "inner_steps": 2,
        "only_people": False}

# The optimising stages, by the node that adds them (with a condition on its inputs), as
# named in the update report ("MAG: 12 update(s) applied, 0 skipped").
OPTIMISING = {
    "XMGIEInvert": ("null-text inversion", lambda inputs: inputs.get("method") == "null_text"),
    "XMGIEMAGControl": ("MAG", None),
    "XMGIEAStarControl": ("A-STAR", None),
    "XMGIEIdentityGuidance": ("identity guidance", None),
    "XMGIELayeredEmbeddings": ("LayerDiffusion embeddings", None),
    "XMGIELayeredFineTune": ("LayerDiffusion LoRA", None),
}
UPDATES = re.compile(r"^(?:\[\d+\] )?([^:\n]+): (\d+) update\(s\) applied, (\d+) skipped",
                     re.M)


def _prompt(wf: Path) -> dict:
    from xmgie import cli
    from xmgie.runner import workflow_ui

    return workflow_ui.to_api(json.loads(wf.read_text()), cli.build_registry())


def _overrides(prompt: dict) -> list[str]:
    from xmgie.runner import engine

    sets = []
    for node_id, node in prompt.items():
        for name, value in FAST.items():
            if name in node["inputs"] and not engine.is_link(node["inputs"][name]):
                sets.append(f"{node_id}.{name}={json.dumps(value)}")
    return [a for s in sets for a in ("--set", s)]


def _optimising(prompt: dict) -> set[str]:
    stages = set()
    for node in prompt.values():
        stage, when = OPTIMISING.get(node["class_type"], (None, None))
        if stage and (when is None or when(node["inputs"])):
            stages.add(stage)
    return stages


def test_every_control_node_is_classified():
    """A new control or guidance node must be listed in OPTIMISING (or as not
    optimising), so that the run below checks its updates."""
    from xmgie import cli

    controls = {c for c in cli.build_registry()
                if c.startswith("XMGIE") and c.endswith(("Control", "Guidance"))}
    assert controls - set(OPTIMISING) == {"XMGIEPFBControl"}      # PFB blends, no updates


@pytest.mark.parametrize("wf", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_checks_runs_and_optimises_under_tiny(wf, tmp_path, tiny_root, clean_paths,
                                                       capsys):
    from xmgie import cli
    from xmgie.mgie_core import tiny

    prompt = _prompt(wf)
    old = os.environ.get(tiny.ENV_TINY_DIR)
    os.environ[tiny.ENV_TINY_DIR] = str(tiny_root)
    try:
        assert cli.main(["check", str(wf), "--tiny"]) == 0
        out_dir = tmp_path / "out"
        rc = cli.main(["run", str(wf), "--tiny", "--output-dir", str(out_dir),
                       *_overrides(prompt)])
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
    # Every optimising control applies updates (a control that only skips is a template
    # that does nothing it claims to).
    reported: dict[str, list[int]] = {}
    for stage, applied, _ in UPDATES.findall(printed.out):
        reported.setdefault(stage.strip(), []).append(int(applied))
    for stage in _optimising(prompt):
        assert stage in reported, f"{wf.name}: no update report for {stage}\n{printed.out}"
        assert min(reported[stage]) > 0, f"{wf.name}: {stage} applied no update\n{printed.out}"


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
    from xmgie.runner import core_nodes, workflow_ui

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


# --- how a template opens in the frontend ---------------------------------------------------

UI_FILES = [p for p in WORKFLOWS]
# The canvas assumed: a 1920x1080 screen less ComfyUI's side bar, top menu and browser
# chrome (a larger canvas shows more of the graph, never less).
CANVAS = (1500.0, 880.0)
READABLE = 0.6          # below this zoom the frontend draws no text on nodes


def _inside(box, view) -> bool:
    x, y, w, h = box
    vx, vy, vw, vh = view
    return vx <= x and vy <= y and x + w <= vx + vw and y + h <= vy + vh


@pytest.mark.parametrize("wf", UI_FILES, ids=lambda p: p.name)
def test_template_opens_readable_on_its_load_group_and_note(wf):
    """Saved at a zoom where the frontend draws text, and the first group (the loads)
    and the note lie inside the view it opens on: screen = (world + offset) * scale."""
    data = json.loads(wf.read_text())
    ds = data["extra"]["ds"]
    assert ds["scale"] >= READABLE, f"{wf.name} opens at zoom {ds['scale']}"
    view = (-ds["offset"][0], -ds["offset"][1], CANVAS[0] / ds["scale"],
            CANVAS[1] / ds["scale"])
    load = data["groups"][0]
    assert load["title"].startswith("1 "), load["title"]
    assert _inside(load["bounding"], view), (wf.name, load["bounding"], view)
    notes = [n for n in data["nodes"] if n["type"] == "MarkdownNote"]
    assert len(notes) == 1
    (note,) = notes
    title_h = 30                              # the title bar is drawn above pos
    box = (note["pos"][0], note["pos"][1] - title_h, note["size"][0], note["size"][1] + title_h)
    assert _inside(box, view), (wf.name, box, view)


MODEL_FILE = (".safetensors", ".ckpt", ".pth", ".pt")


@pytest.mark.parametrize("wf", UI_FILES, ids=lambda p: p.name)
def test_template_declares_its_model_files_for_the_missing_models_dialog(wf):
    """Every model file a node names is declared in that node's properties.models as
    the frontend reads it ({name, url, directory}), in the folder the pack's loader
    searches, so ComfyUI names a missing file, its folder and where it is published."""
    from xmgie.mgie_core import paths

    folder_of = {name: fam.comfy_names[0] for fam in paths.FAMILIES.values()
                 if fam.kind == "file" for name in fam.default_names}
    data = json.loads(wf.read_text())
    named = 0
    for node in data["nodes"]:
        files = [v for v in node.get("widgets_values") or []
                 if isinstance(v, str) and v.endswith(MODEL_FILE)]
        declared = {m["name"]: m for m in node["properties"].get("models", [])}
        assert set(declared) == set(files), (wf.name, node["id"], files, declared)
        for name, m in declared.items():
            assert set(m) == {"name", "url", "directory"}
            assert m["url"].startswith("https://") and " " not in m["url"]
            assert m["directory"] == folder_of[name], (name, m["directory"])
        named += len(files)
    assert named >= 1, f"{wf.name} names no model file"


@pytest.mark.parametrize("wf", UI_FILES, ids=lambda p: p.name)
def test_template_ships_its_thumbnail(wf):
    """The template browser asks for <name>.jpg beside <name>.json (the frontend fixes
    the extension to jpg for a pack's templates): a real JPEG, small."""
    thumb = wf.with_suffix(".jpg")
    assert thumb.is_file(), f"{thumb.name} is missing (run `xmgie workflow sync`)"
    assert thumb.stat().st_size < 60_000
    with Image.open(thumb) as im:
        assert im.format == "JPEG" and im.size == (384, 384) and im.mode == "RGB"


def test_sync_draws_a_missing_thumbnail(tmp_path):
    import shutil

    from xmgie import cli
    from xmgie.runner import workflow_ui

    folder = tmp_path / "workflows"
    shutil.copytree(ROOT / "workflows", folder)
    (folder / "masks_and_seam.jpg").unlink()
    registry = cli.build_registry()
    assert workflow_ui.sync(folder, registry, check=True, log=lambda *a: None) == \
        [folder / "masks_and_seam.jpg"]
    assert not (folder / "masks_and_seam.jpg").exists()          # check writes nothing
    workflow_ui.sync(folder, registry, log=lambda *a: None)
    with Image.open(folder / "masks_and_seam.jpg") as im:
        assert im.format == "JPEG" and im.size == (384, 384)
        # the SAM points are drawn: green on the object, red off it
        px = im.convert("RGB").load()
        colours = {px[x, y] for x in range(384) for y in range(288)}
    assert any(g > 180 and r < 110 and b < 150 for r, g, b in colours)
    assert any(r > 200 and g < 90 and b < 90 for r, g, b in colours)
    assert workflow_ui.sync(folder, registry, check=True, log=lambda *a: None) == []
