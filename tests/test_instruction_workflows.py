"""The instruction-only workflows: a photo and an instruction are all a user sets, and
the edit plan reaches every stage.

Each shipped workflow runs as `xmgie run WORKFLOW --tiny --set <photo> --set
<instruction>` would run it (tiny models, the --tiny caps), with two probes added: every
node's inputs and outputs are recorded, and a recording control, spliced at the end of
the sampler's control chain, reads the run's edit context (prompts, plan, mask, hooks)
and what each control resolved from it. The tiny VLM answers noise, so the instruction
workflow's plan comes from the VLM node's documented fallback (the instruction's rules).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from xmgie import cli
from xmgie.mgie_core import attention_hooks, masks
from xmgie.mgie_core import plan as plan_mod
from xmgie.mgie_core.control import Control
from xmgie.mgie_core.tokens import find_word_tokens
from xmgie.runner import core_nodes, engine, workflow_ui

ROOT = Path(__file__).resolve().parent.parent
CONTROLS = "XMGIE_CONTROLS"


class RecordRun(Control):
    """Reads the run and the controls chained before it, once they are set up."""

    name = "record"

    def __init__(self, before):
        self.before = list(before)
        self.seen: dict = {}

    def setup(self, run):
        self.seen = {"plan": run.plan, "mask": run.mask, "source": run.source_prompt,
                     "target": run.target_prompt, "sampler_hooks": list(run.sampler_hooks),
                     "controls": {c.name: c for c in self.before},
                     "regions": {c.name: getattr(c, "_pyramid", None)
                                 or getattr(c, "_blend_mask", None) for c in self.before}}

    def before_step(self, run, i):
        if i == 0:
            self.seen["hooks"] = list(run.controller.hooks)


class RecordRunNode:
    NODE_ID = "TestRecordRun"
    RETURN_TYPES = (CONTROLS,)
    FUNCTION = "make"
    probe: RecordRun | None = None

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"controls": (CONTROLS, {"tooltip": "the chain"})}}

    def make(self, controls):
        RecordRunNode.probe = RecordRun(controls)
        return (list(controls) + [RecordRunNode.probe],)


def _recording(registry: dict, calls: dict) -> dict:
    """The registry with every node class wrapped to record (inputs, outputs)."""
    out = {}
    for kind, cls in registry.items():
        def run(self, __cls=cls, __kind=kind, **kwargs):
            result = getattr(__cls(), __cls.FUNCTION)(**kwargs)
            calls.setdefault(__kind, []).append((kwargs, result))
            return result

        out[kind] = type(cls.__name__, (cls,), {"FUNCTION": "_record", "_record": run})
    out[RecordRunNode.NODE_ID] = RecordRunNode
    return out


def _result(r):
    return r["result"] if isinstance(r, dict) else r


def _run(name, tmp_path, instruction, plan_node, monkeypatch):
    """Run workflows/NAME.json as `xmgie run --tiny` with only the photo and the
    instruction set; return (run result, recorded calls, the probe, object_mask calls)."""
    Image.new("RGB", (128, 128), (180, 40, 40)).save(tmp_path / "photo.png")
    wf = ROOT / "workflows" / f"{name}.json"
    args = cli.build_parser().parse_args(
        ["run", str(wf), "--tiny", "--input-dir", str(tmp_path), "--output-dir",
         str(tmp_path / "out"), "--set", "1.image=photo.png",
         "--set", f"{plan_node}.instruction={instruction}"])
    cli.configure_models(args)
    registry = cli.build_registry()
    calls: dict = {}
    object_masks = []
    real = masks.object_mask

    def spy(sd, image, prompt, word, *a, **kw):
        object_masks.append((prompt, word))
        return real(sd, image, prompt, word, *a, **kw)

    monkeypatch.setattr(masks, "object_mask", spy)
    with core_nodes.using_context(cli.run_context(args)):
        prompt, _ = cli.prepare(args, json.loads(wf.read_text()), registry)
        # The only values a user set are the photo and the instruction (and --tiny's caps).
        sampler_id = next(k for k, n in prompt.items()
                          if n["class_type"] in ("XMGIECAMSampler", "XMGIEInstructSampler"))
        prompt["99"] = {"class_type": RecordRunNode.NODE_ID,
                        "inputs": {"controls": prompt[sampler_id]["inputs"]["controls"]}}
        prompt[sampler_id]["inputs"]["controls"] = ["99", 0]
        result = engine.execute(prompt, _recording(registry, calls))
    return prompt, result, calls, RecordRunNode.probe.seen, object_masks


def _only(calls, kind):
    assert len(calls[kind]) == 1, kind
    return calls[kind][0]


@pytest.mark.parametrize("instruction,person", [("make the carpet yellow", False),
                                                ("make her hair blonde", True)])
def test_instruction_edit_photo_and_instruction_only(instruction, person, tmp_path, tiny_env,
                                                     monkeypatch):
    prompt, result, calls, seen, object_masks = _run("instruction_edit", tmp_path,
                                                     instruction, "8", monkeypatch)
    # The plan: from the VLM node (its answer is noise under --tiny: the fallback).
    (plan, src, tgt) = _result(_only(calls, "XMGIEEditPlanFromVLM")[1])[:3]
    assert plan.instruction == instruction and plan.target_prompt == tgt
    assert plan.notes[0].startswith("the model's answer could not be read")
    assert plan.subject_is_person is person
    # Every text input it fills was left empty in the workflow...
    for kind, names in {"XMGIEInvert": ["source_prompt"],
                        "XMGIEAttentionMask": ["prompt", "word"],
                        "XMGIECAMSampler": ["target_prompt", "cam_in_words"],
                        "XMGIEMAGControl": ["words", "negative_words"]}.items():
        kwargs = _only(calls, kind)[0]
        assert all(kwargs[n] == "" for n in names), kind
    # ... and was filled from the plan: the mask of the plan's object,
    assert object_masks == [(plan.object_prompt(), plan.object)]
    mask = _result(_only(calls, "XMGIEAttentionMask")[1])[0]
    # the inversion's source prompt,
    inversion = _result(_only(calls, "XMGIEInvert")[1])[0]
    assert inversion.source_prompt == plan.source_prompt == seen["source"]
    # the sampler's run: its plan, target prompt, mask and CAM words,
    assert seen["plan"] is plan and seen["target"] == plan.target_prompt
    assert torch.equal(seen["mask"], mask)
    cam = [h for h in seen["sampler_hooks"] if isinstance(h, attention_hooks.CAMHook)]
    sd = _result(_only(calls, "XMGIELoadCheckpoint")[1])[0]
    assert len(cam) == 1 and cam[0].in_tokens == find_word_tokens(
        sd.tokenizer, plan.target_prompt, plan.edit_words)
    # the controls: the run's mask and the plan's words,
    ctl = seen["controls"]
    assert ctl["MAG"].used_words == plan.edit_words
    assert ctl["MAG"].used_negative_words == [w for w in plan.source_words
                                              if plan_mod.find_phrase(plan.target_prompt, w)]
    for name in ("MAG", "PFB"):
        assert torch.equal(seen["regions"][name].mask, (mask > 0.5).float()), name
    # identity guidance: only for a person; the sampler's text output says so otherwise.
    idg = ctl["identity guidance"]
    report = "\n".join(result.ui[next(k for k, n in prompt.items()
                                      if n["class_type"] == "XMGIECAMSampler")]["text"])
    if person:
        assert not idg.stood_aside and "identity guidance: 0 update" not in report
        assert torch.equal(seen["regions"]["identity guidance"].mask, (mask > 0.5).float())
    else:
        assert "stood aside: the edit plan's subject 'carpet' is not a person" in report
    assert torch.equal(_only(calls, "XMGIEIdentityEmbed")[0]["mask"], mask)
    assert torch.equal(_only(calls, "XMGIEGBBlur")[0]["mask"], mask)
    # The plan and the caption are shown as text, and the edit is saved.
    assert plan_mod.EditPlan.from_json(_shown(prompt, result, "XMGIEPlanToText")) == plan
    assert _caption_of_the_edit(prompt, result) is not None
    assert list((tmp_path / "out").glob("xmgie_instruction_edit_*.png"))


def _shown(prompt, result, source_kind):
    """The text a Preview Any node fed by a ``source_kind`` node showed."""
    (nid,) = [k for k, n in prompt.items() if n["class_type"] == "PreviewAny"
              and prompt[n["inputs"]["source"][0]]["class_type"] == source_kind]
    return result.ui[nid]["text"][0]


def _caption_of_the_edit(prompt, result):
    (nid,) = [k for k, n in prompt.items() if n["class_type"] == "XMGIECaption"
              and prompt[n["inputs"]["image"][0]]["class_type"] == "XMGIEGBBlur"]
    return result.ui[nid]["text"][0]


def test_mgie_instruction_edit_photo_and_instruction_only(tmp_path, tiny_env, monkeypatch):
    from xmgie.mgie_core.models.mgie import model as mgie_model

    instructed = []
    real = mgie_model.MGIEModel.instruct

    def spy(self, image, instruction, **kw):
        instructed.append(instruction)
        return real(self, image, instruction, **kw)

    monkeypatch.setattr(mgie_model.MGIEModel, "instruct", spy)
    prompt, result, calls, seen, object_masks = _run("mgie_instruction_edit", tmp_path,
                                                     "make the sofa green", "8", monkeypatch)
    plan = _result(_only(calls, "XMGIEEditPlanFromInstruction")[1])[0]
    assert plan.instruction == "make the sofa green" and plan.object == "sofa"
    # MGIE reads the instruction from the plan (typed once, in the plan node).
    assert _only(calls, "XMGIEMGIEInstruction")[0]["instruction"] == ""
    assert instructed == ["make the sofa green"]
    # The mask of the plan's object drives the instruction sampler's run, its CAM (the
    # whole MGIE condition inside the mask) and PFB.
    assert object_masks == [(plan.object_prompt(), "sofa")]
    mask = _result(_only(calls, "XMGIEAttentionMask")[1])[0]
    assert seen["plan"] is plan and torch.equal(seen["mask"], mask)
    cam = [h for h in seen["hooks"] if isinstance(h, attention_hooks.ConditionCAMHook)]
    assert len(cam) == 1 and torch.equal(cam[0].pyramid.mask, mask)
    assert torch.equal(seen["regions"]["PFB"].mask, (mask > 0.5).float())
    assert torch.equal(_only(calls, "XMGIEGBBlur")[0]["mask"], mask)
    assert plan_mod.EditPlan.from_json(_shown(prompt, result, "XMGIEPlanToText")) == plan
    expressive = _result(_only(calls, "XMGIEMGIEInstruction")[1])[1]
    assert _shown(prompt, result, "XMGIEMGIEInstruction") == expressive
    assert _caption_of_the_edit(prompt, result) is not None
    assert list((tmp_path / "out").glob("xmgie_mgie_instruction_edit_*.png"))


def test_saved_workflow_from_before_the_plan_inputs_still_converts_and_runs(
        tmp_path, tiny_env, capsys):
    """A UI file saved before the plan inputs existed (and before the controls' masks
    became optional) converts to the very prompt it did then, validates and runs."""
    saved = ROOT / "tests" / "data" / "edit_carpet_guided_saved_v0_2.json"
    registry = cli.build_registry()
    api = workflow_ui.to_api(json.loads(saved.read_text()), registry)
    assert api["6"]["inputs"]["mask"] == ["2", 0] and "plan" not in api["11"]["inputs"]
    assert api["10"]["inputs"].get("only_people") is None
    Image.new("RGB", (64, 64), (180, 40, 40)).save(tmp_path / "carpet.png")
    m = Image.new("L", (64, 64), 0)
    m.paste(255, (16, 16, 56, 56))
    m.save(tmp_path / "carpet_mask.png")
    rc = cli.main(["run", str(saved), "--tiny", "--input-dir", str(tmp_path),
                   "--output-dir", str(tmp_path / "out"), "--set", "4.steps=3"])
    assert rc == 0, capsys.readouterr().err


def test_instruction_edit_runs_without_the_identity_nodes(tmp_path, tiny_env, capsys):
    """What the workflow's note tells a user without an ArcFace file: bypass Load
    Identity Encoder, Identity Embed and Identity Guidance, and the edit still runs."""
    ui = json.loads((ROOT / "workflows" / "instruction_edit.json").read_text())
    by_id = {n["id"]: n for n in ui["nodes"]}
    assert [by_id[i]["type"] for i in (6, 15, 16)] == [
        "XMGIELoadIdentityEncoder", "XMGIEIdentityEmbed", "XMGIEIdentityGuidance"]
    for i in (6, 15, 16):
        by_id[i]["mode"] = 4                                  # ComfyUI's Bypass
    note = next(n for n in ui["nodes"] if n["type"] in ("Note", "MarkdownNote"))
    assert "nodes 6, 15 and 16" in note["widgets_values"][0]
    path = tmp_path / "no_identity.json"
    path.write_text(json.dumps(ui))
    rc = cli.main(["run", str(path), "--tiny", "--input-dir", str(ROOT / "workflows" / "inputs"),
                   "--output-dir", str(tmp_path / "out")])
    assert rc == 0, capsys.readouterr().err
    assert list((tmp_path / "out").glob("*.png"))
