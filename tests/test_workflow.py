"""Headless workflow runner: conversion, validation, overrides, execution and the CLI.

The engine is generic, so most tests use the small node classes defined here (test
fixtures); image I/O uses the real core stand-ins on real PNG files."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from xmgie import cli
from xmgie.mgie_core import host, paths
from xmgie.runner import core_nodes, engine, workflow_ui

# --- test nodes ---------------------------------------------------------------------------

CALLS: list[str] = []      # class names, in execution order
COLLECTED: dict = {}       # what Collect received, by unique_id


class Number:
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 1, "min": 0, "max": 100})}}

    def run(self, value):
        CALLS.append("Number")
        return (value,)


class Add:
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"a": ("INT", {"default": 0}),
                             "b": ("INT", {"default": 0, "min": -1000, "max": 1000})}}

    def run(self, a, b):
        CALLS.append("Add")
        return (a + b,)


class Seeded:
    RETURN_TYPES = ("STRING",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        seed = ("INT", {"min": 0, "max": 2**32, "control_after_generate": True})
        return {"required": {"seed": seed,
                             "mode": (["fast", "slow"], {}),
                             "scale": ("FLOAT", {"min": 0.0, "max": 2.0}),
                             "enabled": ("BOOLEAN", {"default": True})},
                "optional": {"label": ("STRING", {"default": ""})}}

    def run(self, seed, mode, scale, enabled, label=""):
        CALLS.append("Seeded")
        return (f"{seed}|{mode}|{scale}|{enabled}|{label}",)


class NamedSeed:
    """A seed without control_after_generate: the control value is recognized by name."""
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"noise_seed": ("INT", {}), "steps": ("INT", {})}}

    def run(self, noise_seed, steps):
        return (noise_seed + steps,)


class MakeImage:
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"min": 0, "max": 255})}}

    def run(self, value):
        CALLS.append("MakeImage")
        return (torch.full((1, 4, 6, 3), value / 255.0),)


class Boom:
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"x": ("INT", {})}}

    def run(self, x):
        raise ValueError("kaboom")


class Collect:
    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("*", {})},
                "hidden": {"unique_id": "UNIQUE_ID", "prompt": "PROMPT",
                           "extra_pnginfo": "EXTRA_PNGINFO"}}

    def run(self, value, unique_id=None, prompt=None, extra_pnginfo=None):
        CALLS.append("Collect")
        COLLECTED[unique_id] = {"value": value, "prompt": prompt, "extra_pnginfo": extra_pnginfo}
        return {"ui": {"value": [str(value)]}}


class TinyOnly:
    """Its dropdown depends on tiny mode, like the pack's model loaders."""
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": (["tiny-model"] if paths.tiny_root() else [], {})}}

    def run(self, model):
        return (1,)


TEST_NODES = {c.__name__: c for c in
              (Number, Add, Seeded, NamedSeed, MakeImage, Boom, Collect, TinyOnly)}
REGISTRY = {**core_nodes.STANDINS, **TEST_NODES}


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Fresh call log, the test registry behind the CLI, and tmp_path as the cwd (the
    CLI's default input/output folders are relative to it)."""
    CALLS.clear()
    COLLECTED.clear()
    monkeypatch.setattr(cli, "build_registry", lambda: dict(REGISTRY))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("XMGIE_DEVICE", raising=False)


def write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return str(path)


def node(class_type, **inputs):
    return {"class_type": class_type, "inputs": inputs}


def write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


# --- check: each rejection through the CLI -----------------------------------------------

def test_check_ok_prints_node_count(tmp_path, capsys):
    wf = {"1": node("Number", value=3), "2": node("Add", a=["1", 0], b=4),
          "3": node("Collect", value=["2", 0])}
    assert cli.main(["check", write_json(tmp_path / "wf.json", wf)]) == 0
    assert "OK: 3 nodes" in capsys.readouterr().out
    assert CALLS == []  # check runs nothing


@pytest.mark.parametrize("wf, expected", [
    pytest.param({"1": node("Nope")},
                 ["node 1 (Nope)", "unknown class_type 'Nope'"], id="unknown-class"),
    pytest.param({"1": node("Number", value=1), "2": node("Add", b=1)},
                 ["node 2 (Add), input 'a'", "required input is missing", "expected"],
                 id="missing-input"),
    pytest.param({"1": node("MakeImage", value=1), "2": node("Add", a=["1", 0], b=1)},
                 ["node 2 (Add), input 'a'", "IMAGE", "expected INT"], id="wrong-link-type"),
    pytest.param({"1": node("Number", value=500)},
                 ["node 1 (Number), input 'value'", "out of range", "between 0 and 100"],
                 id="out-of-range"),
    pytest.param({"1": node("Add", a=["2", 0], b=0), "2": node("Add", a=["1", 0], b=0)},
                 ["(Add), input 'a'", "cycle", "expected a graph without cycles"], id="cycle"),
])
def test_check_rejects(tmp_path, capsys, wf, expected):
    assert cli.main(["check", write_json(tmp_path / "wf.json", wf)]) == 1
    err = capsys.readouterr().err
    for text in expected:
        assert text in err


def test_validate_reports_every_problem_at_once_and_runs_nothing():
    prompt = {
        "1": node("Number", value=2.5),                         # INT not an integer
        "2": node("Seeded", seed=1, mode="medium", scale=0.5, enabled="yes"),  # combo, bool
        "3": node("Add", a=["9", 0], b=1),                      # missing node
        "4": node("Add", a=["1", 3], b=1),                      # output index out of range
        "5": node("Add", a=["1", 0], b="x"),                    # STRING for INT
        "6": node("Collect", value=["5", 0]),
    }
    errors = engine.validate(prompt, REGISTRY)
    assert len(errors) == 6, errors
    text = "\n".join(errors)
    assert "node 1 (Number), input 'value': 2.5 is not an integer" in text
    assert "node 2 (Seeded), input 'mode'" in text and '"fast", "slow"' in text
    assert "node 2 (Seeded), input 'enabled'" in text and "BOOLEAN" in text
    assert "node 3 (Add), input 'a': links to node 9, which does not exist" in text
    assert "node 4 (Add), input 'a'" in text and "1 output(s)" in text
    assert "node 5 (Add), input 'b'" in text
    with pytest.raises(engine.WorkflowError) as info:
        engine.execute(prompt, REGISTRY)
    assert len(info.value.errors) == 6
    assert CALLS == []


def test_integral_float_is_accepted_for_int():
    prompt = engine.check({"1": node("Number", value=8.0)}, REGISTRY)
    assert prompt["1"]["inputs"]["value"] == 8 and isinstance(prompt["1"]["inputs"]["value"], int)


# --- UI format ----------------------------------------------------------------------------

def ui_node(id_, type_, widgets=(), inputs=(), outputs=(), mode=0):
    return {"id": id_, "type": type_, "mode": mode, "widgets_values": list(widgets),
            "inputs": list(inputs), "outputs": list(outputs)}


def socket(name, type_, link, widget=False):
    entry = {"name": name, "type": type_, "link": link}
    if widget:
        entry["widget"] = {"name": name}
    return entry


def test_ui_conversion_widgets_seed_control_reroute_primitive_note_mute():
    ui = {
        "nodes": [
            ui_node(1, "Number", [5], outputs=[{"name": "INT", "type": "INT", "links": [1]}]),
            ui_node(2, "Reroute", inputs=[socket("", "*", 1)],
                    outputs=[{"name": "", "type": "INT", "links": [2]}]),
            # "a" is a linked widget: it keeps its slot in widgets_values, the link wins.
            ui_node(4, "Add", [999, 7], inputs=[socket("a", "INT", 2, widget=True)],
                    outputs=[{"name": "INT", "type": "INT", "links": [4]}]),
            # seed, its control value, mode, scale (fed by the primitive), enabled, label
            ui_node(5, "Seeded", [42, "randomize", "slow", 1.5, False, "hello"],
                    inputs=[socket("scale", "FLOAT", 3, widget=True)],
                    outputs=[{"name": "STRING", "type": "STRING", "links": [5]}]),
            ui_node(6, "Note", ["just a note"]),
            ui_node(7, "PrimitiveNode", [0.25],
                    outputs=[{"name": "FLOAT", "type": "FLOAT", "links": [3],
                              "widget": {"name": "scale"}}]),
            ui_node(8, "Number", [1], mode=2),  # muted
            ui_node(9, "Collect", inputs=[socket("value", "*", 4)]),
            ui_node(10, "Collect", inputs=[socket("value", "*", 5)]),
        ],
        "links": [[1, 1, 0, 2, 0, "INT"], [2, 2, 0, 4, 0, "INT"], [3, 7, 0, 5, 2, "FLOAT"],
                  [4, 4, 0, 9, 0, "INT"], [5, 5, 0, 10, 0, "STRING"]],
    }
    api = workflow_ui.to_api(ui, REGISTRY)
    assert api == {
        "1": node("Number", value=5),
        "4": node("Add", a=["1", 0], b=7),
        "5": node("Seeded", seed=42, mode="slow", scale=0.25, enabled=False, label="hello"),
        "9": node("Collect", value=["4", 0]),
        "10": node("Collect", value=["5", 0]),
    }
    engine.execute(api, REGISTRY)
    assert COLLECTED["9"]["value"] == 12
    assert COLLECTED["10"]["value"] == "42|slow|0.25|False|hello"


@pytest.mark.parametrize("widgets", [[3, "fixed", 4], [3, 4]])
def test_ui_seed_named_input_skips_control_value_only_when_present(widgets):
    ui = {"nodes": [ui_node(1, "NamedSeed", widgets)], "links": []}
    assert workflow_ui.to_api(ui, REGISTRY)["1"]["inputs"] == {"noise_seed": 3, "steps": 4}


def test_ui_bypassed_node_passes_its_input_through():
    ui = {
        "nodes": [
            ui_node(1, "Number", [5], outputs=[{"name": "INT", "type": "INT", "links": [1]}]),
            ui_node(2, "Add", [0, 100], inputs=[socket("a", "INT", 1, widget=True)],
                    outputs=[{"name": "INT", "type": "INT", "links": [2]}], mode=4),
            ui_node(3, "Collect", inputs=[socket("value", "*", 2)]),
        ],
        "links": [[1, 1, 0, 2, 0, "INT"], [2, 2, 0, 3, 0, "INT"]],
    }
    api = workflow_ui.to_api(ui, REGISTRY)
    assert "2" not in api and api["3"]["inputs"]["value"] == ["1", 0]
    engine.execute(api, REGISTRY)
    assert COLLECTED["3"]["value"] == 5


def test_ui_input_fed_by_muted_node_is_reported_missing():
    ui = {
        "nodes": [ui_node(1, "Number", [5], outputs=[{"name": "INT", "type": "INT", "links": [1]}],
                          mode=2),
                  ui_node(3, "Collect", inputs=[socket("value", "*", 1)])],
        "links": [[1, 1, 0, 3, 0, "INT"]],
    }
    errors = engine.validate(workflow_ui.to_api(ui, REGISTRY), REGISTRY)
    assert errors == ["node 3 (Collect), input 'value': required input is missing; "
                      "expected a link from an output of type *"]


def test_ui_workflow_runs_through_cli_and_embeds_the_workflow(tmp_path, capsys):
    pixels = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    write_png(tmp_path / "input" / "cat.png", pixels)
    ui = {
        "nodes": [
            # LoadImage stores the upload button's value after the file name.
            ui_node(1, "LoadImage", ["cat.png", "image"],
                    outputs=[{"name": "IMAGE", "type": "IMAGE", "links": [1]},
                             {"name": "MASK", "type": "MASK", "links": []}]),
            ui_node(2, "Reroute", inputs=[socket("", "*", 1)],
                    outputs=[{"name": "", "type": "IMAGE", "links": [2]}]),
            ui_node(3, "SaveImage", ["edit"], inputs=[socket("images", "IMAGE", 2)]),
        ],
        "links": [[1, 1, 0, 2, 0, "IMAGE"], [2, 2, 0, 3, 0, "IMAGE"]],
    }
    assert cli.main(["run", write_json(tmp_path / "ui.json", ui)]) == 0
    saved = tmp_path / "output" / "edit_00001_.png"
    with Image.open(saved) as img:
        assert np.array_equal(np.asarray(img.convert("RGB")), pixels)
        assert json.loads(img.text["workflow"]) == ui
        assert json.loads(img.text["prompt"])["3"]["class_type"] == "SaveImage"


# --- overrides ----------------------------------------------------------------------------

def test_overrides_parse_json_and_keep_text_for_strings():
    prompt = {"1": node("Number", value=1),
              "2": node("Seeded", seed=1, mode="fast", scale=1.0, enabled=True),
              "3": node("Collect", value=["2", 0])}
    out = engine.apply_overrides(prompt, ["1.value=9", "2.label=123", "2.mode=slow",
                                            "2.enabled=false", "3.value=[\"1\", 0]"], REGISTRY)
    assert prompt["1"]["inputs"]["value"] == 1  # the original is not changed
    assert out["1"]["inputs"]["value"] == 9
    assert out["2"]["inputs"]["label"] == "123"  # a STRING input keeps the text
    assert out["2"]["inputs"]["mode"] == "slow"
    assert out["2"]["inputs"]["enabled"] is False
    assert out["3"]["inputs"]["value"] == ["1", 0]  # a link
    engine.execute(out, REGISTRY)
    assert COLLECTED == {"3": COLLECTED["3"]} and COLLECTED["3"]["value"] == 9


def test_set_override_through_cli(tmp_path, capsys):
    wf = {"1": node("Number", value=1), "2": node("Collect", value=["1", 0])}
    assert cli.main(["run", write_json(tmp_path / "wf.json", wf), "--set", "1.value=42"]) == 0
    assert COLLECTED["2"]["value"] == 42


@pytest.mark.parametrize("override, expected, code", [
    # A --set that names nothing is a usage error (exit 2, like argparse's own errors);
    # a value the input refuses is a workflow validation error (exit 1).
    ("99.value=1", "there is no node 99", 2),
    ("1.nope=1", "node 1 (Number) has no input 'nope'; expected one of value", 2),
    ("garbage", "expected NODE_ID.INPUT=VALUE", 2),
    ("1.value=1000", "node 1 (Number), input 'value': 1000 is out of range", 1),
])
def test_bad_set_override_is_rejected(tmp_path, capsys, override, expected, code):
    wf = {"1": node("Number", value=1), "2": node("Collect", value=["1", 0])}
    assert cli.main(["check", write_json(tmp_path / "wf.json", wf), "--set", override]) == code
    assert expected in capsys.readouterr().err


# --- core stand-ins -----------------------------------------------------------------------

def test_run_loads_png_and_saves_identical_pixels(tmp_path, capsys):
    pixels = np.random.default_rng(0).integers(0, 256, (9, 13, 3), dtype=np.uint8)
    # The workflow's inputs/ folder is searched after the (empty) input dirs.
    write_png(tmp_path / "flows" / "inputs" / "photo.png", pixels)
    wf = {"1": node("LoadImage", image="photo.png"),
          "2": node("SaveImage", images=["1", 0], filename_prefix="result")}
    path = write_json(tmp_path / "flows" / "wf.json", wf)
    out_dir = tmp_path / "out"
    assert cli.main(["run", path, "--output-dir", str(out_dir)]) == 0
    assert cli.main(["run", path, "--output-dir", str(out_dir)]) == 0
    stdout = capsys.readouterr().out
    assert re.search(r"^\[1\] LoadImage: \d+\.\d\d s$", stdout, re.M)
    assert re.search(r"^\[2\] SaveImage: \d+\.\d\d s$", stdout, re.M)
    first, second = out_dir / "result_00001_.png", out_dir / "result_00002_.png"
    assert str(first) in stdout and str(second) in stdout  # numbering continues
    with Image.open(first) as img:
        assert img.mode == "RGB" and np.array_equal(np.asarray(img), pixels)


def test_load_image_rgba_follows_comfyui_mask_convention(tmp_path):
    rng = np.random.default_rng(2)
    rgba = rng.integers(0, 256, (6, 5, 4), dtype=np.uint8)
    write_png(tmp_path / "input" / "rgba.png", rgba)
    write_png(tmp_path / "input" / "rgb.png", rgba[..., :3].copy())
    with core_nodes.using_context(core_nodes.RunContext(input_dirs=[tmp_path / "input"])):
        image, mask = core_nodes.LoadImage().load_image("rgba.png")
        assert image.shape == (1, 6, 5, 3) and image.dtype == torch.float32
        assert mask.shape == (1, 6, 5) and mask.dtype == torch.float32
        alpha = torch.from_numpy(rgba[..., 3].astype(np.float32) / 255.0)
        assert torch.allclose(image[0], torch.from_numpy(rgba[..., :3] / 255.0).float())
        assert torch.allclose(mask[0], 1.0 - alpha)  # transparent = masked

        _, no_alpha = core_nodes.LoadImage().load_image("rgb.png")
        assert no_alpha.shape == (1, 6, 5) and not no_alpha.any()

        (alpha_mask,) = core_nodes.LoadImageMask().load_image("rgba.png", "alpha")
        (red_mask,) = core_nodes.LoadImageMask().load_image("rgba.png", "red")
        assert torch.allclose(alpha_mask[0], 1.0 - alpha)
        assert torch.allclose(red_mask[0], torch.from_numpy(rgba[..., 0] / 255.0).float())


def test_missing_image_is_caught_by_check_naming_every_folder(tmp_path, capsys):
    wf = {"1": node("LoadImage", image="absent.png"),
          "2": node("PreviewImage", images=["1", 0])}
    path = write_json(tmp_path / "flows" / "wf.json", wf)
    assert cli.main(["check", path, "--input-dir", str(tmp_path / "pics")]) == 1
    err = capsys.readouterr().err
    assert "node 1 (LoadImage)" in err and "'absent.png' was not found" in err
    for folder in (tmp_path / "pics", tmp_path / "flows", tmp_path / "flows" / "inputs"):
        assert str(folder) in err


def test_preview_image_writes_into_preview_subfolder(tmp_path):
    wf = {"1": node("MakeImage", value=255), "2": node("PreviewImage", images=["1", 0])}
    ctx = core_nodes.RunContext(output_dir=tmp_path / "out")
    with core_nodes.using_context(ctx):
        result = engine.execute(wf, REGISTRY)
    assert ctx.written == [tmp_path / "out" / "preview" / "preview_00001_.png"]
    assert result.ui["2"]["images"] == [{"filename": "preview_00001_.png",
                                         "subfolder": "preview", "type": "temp"}]


def test_save_image_refuses_a_prefix_outside_the_output_folder(tmp_path):
    wf = {"1": node("MakeImage", value=1),
          "2": node("SaveImage", images=["1", 0], filename_prefix="../escape")}
    with core_nodes.using_context(core_nodes.RunContext(output_dir=tmp_path / "out")):
        with pytest.raises(engine.WorkflowError, match="outside the output folder"):
            engine.execute(wf, REGISTRY)


# --- execution ----------------------------------------------------------------------------

def test_node_exception_is_wrapped_with_node_id(tmp_path, capsys):
    wf = {"1": node("Number", value=1), "7": node("Boom", x=["1", 0]),
          "8": node("Collect", value=["7", 0])}
    with pytest.raises(engine.WorkflowError) as info:
        engine.execute(wf, REGISTRY)
    err = info.value
    assert (err.node_id, err.class_type) == ("7", "Boom")
    assert "node 7 (Boom) failed: ValueError: kaboom" in str(err)
    assert isinstance(err.__cause__, ValueError)
    assert cli.main(["run", write_json(tmp_path / "wf.json", wf)]) == 1
    assert "node 7 (Boom) failed" in capsys.readouterr().err


def test_only_nodes_feeding_outputs_run_each_once():
    wf = {"1": node("Number", value=2),
          "2": node("Add", a=["1", 0], b=1), "3": node("Add", a=["1", 0], b=2),
          "4": node("Add", a=["2", 0], b=["3", 0]),
          "5": node("Collect", value=["4", 0]),
          "6": node("MakeImage", value=3)}                     # feeds no output
    result = engine.execute(wf, REGISTRY)
    assert result.executed == ["1", "2", "3", "4", "5"]
    assert CALLS.count("Number") == 1 and "MakeImage" not in CALLS
    assert COLLECTED["5"]["value"] == 7
    assert result.outputs["2"][0] == 3


def test_prompt_without_output_node_is_refused_as_comfyui_does(tmp_path, capsys):
    """ComfyUI's validate_prompt: type prompt_no_outputs, "Prompt has no outputs"."""
    wf = {"1": node("Number", value=2), "2": node("MakeImage", value=3)}
    with pytest.raises(engine.NoOutputsError) as info:
        engine.execute(wf, REGISTRY)
    assert info.value.type == "prompt_no_outputs"
    assert "Prompt has no outputs" in str(info.value) and "SaveImage" in str(info.value)
    assert CALLS == []
    path = write_json(tmp_path / "wf.json", wf)
    for command in ("check", "run"):
        assert cli.main([command, path]) == 1
        assert "prompt_no_outputs: Prompt has no outputs" in capsys.readouterr().err
    # with other problems, every one is reported together
    bad = {"1": node("Number", value=500)}
    with pytest.raises(engine.WorkflowError) as info:
        engine.execute(bad, REGISTRY)
    assert len(info.value.errors) == 2 and "out of range" in info.value.errors[0]
    assert "Prompt has no outputs" in info.value.errors[1]


def test_nodes_run_inside_inference_mode_as_in_comfyui():
    seen = {}

    class Probe:
        RETURN_TYPES = ("INT",)
        FUNCTION = "run"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

        def run(self):
            seen["inference"] = torch.is_inference_mode_enabled()
            seen["tensor"] = torch.zeros(1).is_inference()
            return (1,)

    wf = {"1": node("Probe"), "2": node("Collect", value=["1", 0])}
    engine.execute(wf, {**REGISTRY, "Probe": Probe})
    assert seen == {"inference": True, "tensor": True}
    assert not torch.is_inference_mode_enabled()


def test_outputs_are_passed_by_reference_and_hidden_inputs_supplied():
    wf = {"1": node("MakeImage", value=3), "2": node("Collect", value=["1", 0]),
          "3": node("Collect", value=["1", 0])}
    result = engine.execute(wf, REGISTRY, extra_pnginfo={"workflow": {"x": 1}})
    assert COLLECTED["2"]["value"] is result.outputs["1"][0] is COLLECTED["3"]["value"]
    assert COLLECTED["2"]["prompt"]["1"]["class_type"] == "MakeImage"
    assert COLLECTED["2"]["extra_pnginfo"] == {"workflow": {"x": 1}}
    assert result.ui["3"] == {"value": [str(result.outputs["1"][0])]}


def test_interrupt_between_nodes_stops_the_run(tmp_path, capsys):
    def stop_after_first():
        if CALLS:
            raise host.Interrupted("stop")

    previous = host.set_hooks(check_interrupt=stop_after_first)
    try:
        wf = {"1": node("Number", value=1), "2": node("Collect", value=["1", 0])}
        with pytest.raises(host.Interrupted):
            engine.execute(wf, REGISTRY)
        assert CALLS == ["Number"]
        CALLS.clear()
        assert cli.main(["run", write_json(tmp_path / "wf.json", wf)]) == 130
        assert "Interrupted" in capsys.readouterr().err
    finally:
        host.set_hooks(**vars(previous))


# --- CLI ----------------------------------------------------------------------------------

def test_missing_or_invalid_workflow_file_exits_2(tmp_path, capsys):
    assert cli.main(["run", str(tmp_path / "absent.json")]) == 2
    assert "workflow file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert cli.main(["check", str(bad)]) == 2
    assert "is not valid JSON" in capsys.readouterr().err
    broken_ui = write_json(tmp_path / "ui.json", {"nodes": [{"id": 1, "type": "Number"}],
                                                  "links": [[1, 2]]})
    assert cli.main(["check", broken_ui]) == 2
    assert "the UI workflow is malformed" in capsys.readouterr().err


def test_tiny_configures_models_before_validation(tmp_path, capsys, monkeypatch, clean_paths):
    from xmgie.mgie_core import tiny

    monkeypatch.setattr(tiny, "ensure_tiny_models", lambda *a, **k: tmp_path / "tiny")
    path = write_json(tmp_path / "wf.json", {"1": node("TinyOnly", model="tiny-model"),
                                             "2": node("Collect", value=["1", 0])})
    assert cli.main(["check", path]) == 1
    capsys.readouterr()
    assert cli.main(["check", path, "--tiny"]) == 0
    captured = capsys.readouterr()
    assert "OK: 2 nodes" in captured.out and "meaningless" in captured.err
    assert paths.tiny_root() == tmp_path / "tiny"


def test_device_and_models_dir_options(tmp_path, capsys, clean_paths, monkeypatch):
    monkeypatch.setenv("XMGIE_DEVICE", "meta")  # restored after the test; the CLI sets it
    wf = {"1": node("Number", value=1), "2": node("Collect", value=["1", 0])}
    path = write_json(tmp_path / "wf.json", wf)
    assert cli.main(["run", path, "--device", "cpu", "--models-dir", str(tmp_path / "m")]) == 0
    assert host.device().type == "cpu"
    assert paths.models_dirs()[0] == tmp_path / "m"


def test_real_registry_is_the_pack_plus_standins(monkeypatch):
    monkeypatch.undo()  # the real build_registry, not the test one
    from xmgie.nodes import NODE_CLASS_MAPPINGS

    registry = cli.build_registry()
    assert set(NODE_CLASS_MAPPINGS) <= set(registry)
    assert set(core_nodes.STANDINS) <= set(registry)
    assert not set(core_nodes.STANDINS) & set(NODE_CLASS_MAPPINGS)
