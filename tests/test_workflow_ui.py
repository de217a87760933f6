"""UI-format workflows: the shipped templates, their API twins, the writer
(runner/workflow_ui.py) and `xmgie workflow`.

What ComfyUI lists as templates is `<pack>/workflows/*.json` (one level; its
app/custom_node_manager.py globs `*/workflows/*.json`), and its frontend opens only UI
files from there; the API twins live in workflows/api/."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from xmgie import cli
from xmgie.runner import engine
from xmgie.runner import workflow_ui as wui

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / "workflows"
TEMPLATES = sorted(WORKFLOWS.glob("*.json"))   # exactly what ComfyUI lists
NAMES = [p.stem for p in TEMPLATES]


@pytest.fixture(scope="module")
def registry():
    return cli.build_registry()


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


# --- the shipped files ------------------------------------------------------------------

def test_every_listed_template_is_a_ui_workflow_with_an_api_twin():
    assert NAMES == sorted(["vae_roundtrip", "edit_carpet_yellow", "edit_carpet_guided",
                            "edit_carpet_checkpoint", "mgie_instruct", "masks_and_seam",
                            "instruction_edit", "mgie_instruction_edit", "edit_trained",
                            "mmig_layered_edit", "edit_sdxl", "edit_sdxl_guided"])
    for path in TEMPLATES:
        data = _load(path)
        # The frontend's schema check: a version, nodes and links (API files have none).
        assert data["version"] == 0.4 and wui.is_ui_format(data), path.name
        assert isinstance(data["links"], list) and data["last_node_id"] >= 1
        assert (WORKFLOWS / "api" / f"{path.stem}_api.json").is_file()
        assert (WORKFLOWS / "api" / f"{path.stem}.layout.json").is_file()
    # No API-format file where ComfyUI would list it.
    assert not [p for p in TEMPLATES if not wui.is_ui_format(_load(p))]


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_converts_to_its_api_twin(name, registry):
    ui = _load(WORKFLOWS / f"{name}.json")
    twin = _load(WORKFLOWS / "api" / f"{name}_api.json")
    assert wui.to_api(ui, registry) == twin


def test_shipped_workflows_are_what_the_tool_writes(registry, capsys):
    # Regenerating changes nothing: the files come from `xmgie workflow sync` and the
    # writer is deterministic. After changing nodes or sources, run
    # `python -m xmgie workflow sync` and commit the result.
    assert cli.main(["workflow", "sync", str(WORKFLOWS), "--check"]) == 0, \
        capsys.readouterr().out


@pytest.mark.parametrize("name", NAMES)
def test_layout_no_overlap_every_node_in_its_stage_group(name, registry):
    ui = _load(WORKFLOWS / f"{name}.json")
    assert wui.layout_problems(ui, registry) == []
    layout = wui.Layout.load(WORKFLOWS / "api" / f"{name}.layout.json")
    groups = {g["title"]: g["bounding"] for g in ui["groups"]}
    assert list(groups) == [s.title for s in layout.stages]
    # Titled by stage, numbered left to right.
    xs = [b[0] for b in groups.values()]
    assert xs == sorted(xs)
    for i, title in enumerate(groups):
        assert title.startswith(f"{i + 1} ")
    boxes = {str(n["id"]): wui.node_box(n) for n in ui["nodes"]}
    for stage in layout.stages:
        gx, gy, gw, gh = groups[stage.title]
        for nid in stage.nodes:
            x, y, w, h = boxes[nid]
            assert gx < x and x + w < gx + gw and gy + wui.GROUP_TITLE_BAR <= y \
                and y + h < gy + gh, (name, nid, stage.title)


@pytest.mark.parametrize("name", NAMES)
def test_note_says_what_to_change_and_names_every_model_file(name, registry):
    ui = _load(WORKFLOWS / f"{name}.json")
    notes = [n for n in ui["nodes"] if n["type"] in wui.UI_NOTE_TYPES]
    assert len(notes) == 1
    text = notes[0]["widgets_values"][0]
    assert "**Change**" in text and "models/" in text
    specs = engine._Specs(registry)
    prompt = wui.to_api(ui, registry)
    for nid, node in prompt.items():
        spec = specs.get(node["class_type"])
        if not str(getattr(spec.cls, "CATEGORY", "")).endswith("loaders"):
            continue
        for inp in spec.inputs.values():
            value = node["inputs"].get(inp.name)
            if inp.choices is not None and inp.name not in ("dtype", "kind"):
                assert f"{value}" in text, f"{name}: the note does not name {value} (node {nid})"


@pytest.mark.parametrize("name", NAMES)
def test_ui_file_follows_the_frontend_format(name, registry):
    ui = _load(WORKFLOWS / f"{name}.json")
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert ui["last_node_id"] == max(nodes) and ui["last_link_id"] == len(ui["links"])
    for link_id, src, src_slot, dst, dst_slot, type_ in ui["links"]:
        assert nodes[dst]["inputs"][dst_slot]["link"] == link_id
        out = nodes[src]["outputs"][src_slot]
        assert link_id in out["links"] and out["slot_index"] == src_slot and out["type"] == type_
    specs = engine._Specs(registry)
    for n in ui["nodes"]:
        if n["type"] in wui.UI_NOTE_TYPES:
            continue
        spec = specs.get(n["type"])
        assert n["properties"]["Node name for S&R"] == n["type"]
        assert set(n["properties"]) <= {"Node name for S&R", "models"}   # models: files
        names = [e["name"] for e in n["inputs"]]
        sockets = [i.name for i in wui.sockets(spec)]
        widgets = [i.name for i in wui.widgets(spec)]
        extra = ["upload"] if any(w.options.get("image_upload") for w in wui.widgets(spec)) else []
        assert names == sockets + widgets + extra
        values = n["widgets_values"]
        expected_len = len(widgets) + sum(wui.control_values(w) for w in wui.widgets(spec)) \
            + len(extra)
        assert len(values) == expected_len, n["type"]
        assert n["size"][1] >= wui.min_height(spec)


def test_seed_control_and_upload_widgets_as_the_frontend_stores_them(registry):
    mgie = _load(WORKFLOWS / "mgie_instruct.json")
    sampler = next(n for n in mgie["nodes"] if n["type"] == "XMGIEInstructSampler")
    # steps, text_scale, image_scale, seed, control_after_generate, cam_in_words, ...
    assert sampler["widgets_values"][3:5] == [0, "fixed"]
    mask = next(n for n in mgie["nodes"] if n["type"] == "LoadImageMask")
    assert mask["widgets_values"] == ["carpet_mask.png", "red", "image"]
    assert mask["inputs"][-1]["type"] == "IMAGEUPLOAD"
    optional = [e for e in sampler["inputs"] if e.get("shape") == wui.OPTIONAL_SHAPE]
    assert [e["name"] for e in optional] == ["mask", "controls", "plan", "scheduler",
                                             "compile_unet", "fit"]


# --- the writer on every node type ----------------------------------------------------------

def test_every_node_type_round_trips_with_its_default_values(registry):
    """API -> UI -> API keeps every widget value of every node this pack and the runner
    know (seed controls, upload widgets and optional widgets included)."""
    specs = engine._Specs(registry)
    prompt = {}
    for i, class_type in enumerate(sorted(registry), start=1):
        spec = specs.get(class_type)
        prompt[str(i)] = {"class_type": class_type,
                          "inputs": {w.name: wui.default_value(w) for w in wui.widgets(spec)}}
    ui = wui.api_to_ui(prompt, registry, name="all")
    assert wui.to_api(ui, registry) == prompt
    assert wui.layout_problems(ui, registry) == []


class ForcedText:
    """A node with a forceInput STRING: a socket in the frontend, no stored value (an
    output node, so the runner, like ComfyUI, has something to run)."""
    RETURN_TYPES = ("STRING",)
    FUNCTION = "run"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"forceInput": True}),
                             "count": ("INT", {"default": 2})}}

    def run(self, text, count):
        return (text * count,)


class Words:
    RETURN_TYPES = ("STRING",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"word": ("STRING", {"default": "hi"})}}

    def run(self, word):
        return (word,)


def test_force_input_is_a_socket_in_writer_and_converter():
    registry = {"ForcedText": ForcedText, "Words": Words}
    prompt = {"1": {"class_type": "Words", "inputs": {"word": "ab"}},
              "2": {"class_type": "ForcedText", "inputs": {"text": ["1", 0], "count": 3}}}
    ui = wui.api_to_ui(prompt, registry)
    node = next(n for n in ui["nodes"] if n["id"] == 2)
    assert [e["name"] for e in node["inputs"]] == ["text", "count"]
    assert "widget" not in node["inputs"][0] and node["widgets_values"] == [3]
    assert ui["links"] == [[1, 1, 0, 2, 0, "STRING"]]
    assert wui.to_api(ui, registry) == prompt
    result = engine.execute(wui.to_api(ui, registry), registry)
    assert result.outputs["2"] == ("ababab",)


def test_layout_places_unnamed_nodes_after_their_inputs(registry):
    twin = _load(WORKFLOWS / "api" / "vae_roundtrip_api.json")
    twin["6"] = {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}}
    layout = wui.Layout.load(WORKFLOWS / "api" / "vae_roundtrip.layout.json")
    stages, added = wui._assign_stages(twin, layout)
    assert added == ["6"] and "6" in stages[-1].nodes
    ui = wui.api_to_ui(twin, registry, layout)
    assert wui.layout_problems(ui, registry) == []


def test_layout_problems_reports_overlap_and_stray_nodes(registry):
    ui = _load(WORKFLOWS / "vae_roundtrip.json")
    bad = copy.deepcopy(ui)
    a, b = (n for n in bad["nodes"] if n["id"] in (1, 2))
    b["pos"] = [a["pos"][0] + 10, a["pos"][1] + 10]
    problems = wui.layout_problems(bad, registry)
    assert any("overlaps node" in p for p in problems)
    bad = copy.deepcopy(ui)
    next(n for n in bad["nodes"] if n["id"] == 5)["pos"] = [5000, 5000]
    assert any("node 5 (SaveImage) is inside groups []" in p
               for p in wui.layout_problems(bad, registry))
    bad = copy.deepcopy(ui)
    next(n for n in bad["nodes"] if n["id"] == 2)["size"][1] = 40
    assert any("its widgets need" in p for p in wui.layout_problems(bad, registry))


def test_writer_refuses_what_it_cannot_show(registry):
    with pytest.raises(engine.WorkflowError, match="unknown class_type 'Nope'"):
        wui.api_to_ui({"1": {"class_type": "Nope", "inputs": {}}}, registry)
    with pytest.raises(engine.WorkflowError, match="declares no such input"):
        wui.api_to_ui({"1": {"class_type": "SaveImage", "inputs": {"colour": 1}}}, registry)
    layout = wui.Layout([wui.Stage("1 Load", ["1", "9"])])
    with pytest.raises(engine.WorkflowError, match="names node 9"):
        wui.api_to_ui({"1": {"class_type": "LoadImage", "inputs": {"image": "a.png"}}},
                      registry, layout)
    with pytest.raises(engine.WorkflowFileError, match="stage 0 must be"):
        wui.Layout.from_json({"stages": [{"nodes": ["1"]}]})


# --- the command --------------------------------------------------------------------------

def test_workflow_command_converts_both_ways(tmp_path, capsys, registry):
    src = WORKFLOWS / "api" / "edit_carpet_yellow_api.json"
    ui_path, api_path = tmp_path / "ui.json", tmp_path / "api.json"
    assert cli.main(["workflow", "ui", str(src), "-o", str(ui_path), "--layout",
                     str(WORKFLOWS / "api" / "edit_carpet_yellow.layout.json")]) == 0
    ui = _load(ui_path)
    shipped = _load(WORKFLOWS / "edit_carpet_yellow.json")
    assert ui["nodes"] == shipped["nodes"] and ui["groups"] == shipped["groups"]
    assert cli.main(["workflow", "api", str(ui_path), "-o", str(api_path)]) == 0
    assert api_path.read_text() == src.read_text()
    # Without a layout: one stage per depth, no note.
    assert cli.main(["workflow", "ui", str(src), "-o", str(ui_path)]) == 0
    auto = _load(ui_path)
    assert not [n for n in auto["nodes"] if n["type"] in wui.UI_NOTE_TYPES]
    assert wui.layout_problems(auto, registry) == []
    bad = tmp_path / "bad_api.json"
    bad.write_text(json.dumps({"1": {"class_type": "Nope", "inputs": {}}}))
    capsys.readouterr()
    assert cli.main(["workflow", "ui", str(bad), "-o", str(ui_path)]) == 1
    assert "unknown class_type 'Nope'" in capsys.readouterr().err


def test_sync_check_reports_a_stale_file(tmp_path, capsys):
    import shutil

    folder = tmp_path / "workflows"
    shutil.copytree(WORKFLOWS, folder)
    ui = folder / "vae_roundtrip.json"
    ui.write_text(ui.read_text().replace('"xmgie_vae_roundtrip"', '"edited"'))
    assert cli.main(["workflow", "sync", str(folder), "--check"]) == 1
    assert "out of date:" in capsys.readouterr().out
    assert cli.main(["workflow", "sync", str(folder)]) == 0
    assert ui.read_text() == (WORKFLOWS / "vae_roundtrip.json").read_text()


# --- the seed rule: one for reading and writing UI files, and for the batch ----------------
#
# ComfyUI's frontend (useIntWidget / useComboWidget) follows an INT widget with a
# control_after_generate combo when the input declares control_after_generate (true, or a
# default mode), or, when it declares nothing, when it is named seed or noise_seed; an
# explicit false turns it off. A combo declaring it gets the control and a filter list.

class _Rules:
    """One node with each case of the rule, and a STRING after each so a misplaced
    control value would show up in the wrong input."""
    RETURN_TYPES = ("STRING",)
    OUTPUT_NODE = True
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "noise_seed": ("INT", {}), "a": ("STRING", {}),                 # legacy name
            "variation_seed": ("INT", {}), "b": ("STRING", {}),             # not the name
            "count": ("INT", {"control_after_generate": True}), "c": ("STRING", {}),
            "seed": ("INT", {"control_after_generate": False}), "d": ("STRING", {}),
            "pick": (["x", "y"], {"control_after_generate": True}), "e": ("STRING", {}),
            "strength": ("FLOAT", {}), "f": ("STRING", {})}}

    def run(self, **kwargs):
        return ("|".join(f"{k}={v}" for k, v in sorted(kwargs.items())),)


def _rule_specs():
    return {i.name: i for i in engine.node_spec("Rules", _Rules).inputs.values()}


def test_the_seed_rule_is_the_frontends():
    specs = _rule_specs()
    assert {name: wui.control_values(s) for name, s in specs.items() if s.is_widget} == {
        "noise_seed": 1, "a": 0, "variation_seed": 0, "b": 0, "count": 1, "c": 0,
        "seed": 0, "d": 0, "pick": 2, "e": 0, "strength": 0, "f": 0}
    assert [name for name, s in specs.items() if wui.is_seed(s)] == ["noise_seed", "count"]


def test_ui_files_are_read_and_written_by_the_same_rule():
    registry = {"Rules": _Rules}
    # What the frontend stores: a control value after noise_seed and count, a control and
    # a filter after pick, and none after variation_seed or a seed declared without one
    # (whose next value merely looks like a control value).
    values = [1, "randomize", "A", 2, "fixed", 3, "randomize", "C", 4, "increment", "x",
              "fixed", "", "E", 0.5, "F"]
    ui = {"nodes": [{"id": 1, "type": "Rules", "mode": 0, "inputs": [], "outputs": [],
                     "widgets_values": values}], "links": []}
    api = wui.to_api(ui, registry)
    assert api["1"]["inputs"] == {"noise_seed": 1, "a": "A", "variation_seed": 2,
                                  "b": "fixed", "count": 3, "c": "C", "seed": 4,
                                  "d": "increment", "pick": "x", "e": "E", "strength": 0.5,
                                  "f": "F"}
    written = wui.api_to_ui(api, registry)
    node = next(n for n in written["nodes"] if n["type"] == "Rules")
    assert node["widgets_values"] == [1, "fixed", "A", 2, "fixed", 3, "fixed", "C", 4,
                                      "increment", "x", "fixed", "", "E", 0.5, "F"]
    assert wui.to_api(written, registry) == api


def test_the_batch_seeds_the_inputs_of_the_seed_rule():
    from xmgie.runner.mapping import seed_inputs

    prompt = {"1": {"class_type": "Rules", "inputs": {"noise_seed": 1, "variation_seed": 2,
                                                      "count": 3, "seed": 4}}}
    assert [name for _, name, _ in seed_inputs(prompt, {"Rules": _Rules})] == \
        ["noise_seed", "count"]


# --- the API twins find their inputs as they ship ---------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_every_api_twin_passes_check_as_shipped(name, tiny_env, tmp_path, monkeypatch, capsys):
    # From another folder and without --input-dir: the twin in workflows/api/ finds its
    # images in workflows/inputs/, the inputs/ folder beside its own folder.
    monkeypatch.chdir(tmp_path)
    twin = WORKFLOWS / "api" / f"{name}_api.json"
    code = cli.main(["check", str(twin), "--tiny"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.startswith("OK: ")


def test_inputs_beside_the_workflow_folder_are_found_and_nothing_outside(tmp_path):
    from xmgie.runner import core_nodes

    (tmp_path / "inputs").mkdir()
    (tmp_path / "inputs" / "a.png").write_bytes(b"x")
    (tmp_path / "secret.png").write_bytes(b"x")
    ctx = core_nodes.RunContext(input_dirs=[tmp_path / "none"], workflow_dir=tmp_path / "api")
    assert ctx.resolve_image("a.png") == (tmp_path / "inputs" / "a.png").resolve()
    with pytest.raises(Exception, match="outside the input folders"):
        ctx.resolve_image("../secret.png")
