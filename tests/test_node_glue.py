"""The node glue: one loader class, one control-node base, the library applying the
mask and the plan (the nodes pass inputs as given), loaders that list only models that
exist inside ComfyUI with a hint for the host, and prompts past the text encoder's
window named in the nodes' text output."""

from __future__ import annotations

import logging

import pytest
import torch

from xmgie.mgie_core import inversion, paths, plan_rules, sampler, vae
from xmgie.mgie_core.errors import InputError, ModelNotFoundError
from xmgie.nodes import _common, editing, identity_guidance, loaders
from xmgie.nodes import astar as astar_nodes

SRC, TGT = "a red sofa on a red carpet", "a red sofa on a yellow carpet"
PLAN = plan_rules.plan_from_prompts("make the carpet yellow", SRC, TGT)
LONG = " ".join(["a very"] * 45) + " zebra hat"      # past 75 tokens: 'zebra hat' is cut


@pytest.fixture(scope="module")
def photo():
    return torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def box():
    m = torch.zeros(1, 64, 64)
    m[:, 8:40, 8:40] = 1
    return m


@pytest.fixture(scope="module")
def inv(tiny_sd, photo):
    z0 = vae.encode(tiny_sd, photo).samples
    return inversion.invert(tiny_sd, z0, SRC, method="direct", steps=3, image_size=(64, 64))


def _result(r):
    return r["result"] if isinstance(r, dict) else r


# --- the library applies the plan and checks the mask, once ------------------------------

def test_empty_cam_words_take_the_plans_edit_words_in_the_library(tiny_sd, inv, box):
    def run(cam, **kw):
        return sampler.edit(tiny_sd, inv, TGT, cam=cam, **kw).edit

    typed = run(sampler.CAMSettings(["yellow"]), mask=box)
    from_plan = run(sampler.CAMSettings(), mask=box, plan=PLAN)
    plain = run(sampler.CAMSettings(), mask=box)
    assert torch.equal(from_plan, typed)
    assert not torch.equal(plain, typed)           # CAM acted
    # Without a mask the plan's words do not ask for CAM (it needs one).
    assert torch.equal(run(sampler.CAMSettings(), plan=PLAN), run(None))


def test_instruction_sampler_takes_the_plans_words_in_the_library(tiny_ip2p, box, photo):
    cond = sampler.encode_instruction(tiny_ip2p, "make the carpet yellow")
    lat = vae.encode(tiny_ip2p, photo).samples / tiny_ip2p.vae.config.scaling_factor

    def run(cam, **kw):
        return sampler.edit_instruct(tiny_ip2p, lat, cond, steps=2, cam=cam, mask=box,
                                     **kw).edit

    assert torch.equal(run(sampler.CAMSettings(), plan=PLAN),
                       run(sampler.CAMSettings(["yellow"])))
    assert torch.equal(run(sampler.CAMSettings(["*"])),
                       run(sampler.CAMSettings(whole_condition=True)))


def test_the_instruction_sampler_checks_the_mask_size(tiny_ip2p, photo):
    cond = sampler.encode_instruction(tiny_ip2p, "make the carpet yellow")
    lat = vae.encode(tiny_ip2p, photo).samples / tiny_ip2p.vae.config.scaling_factor
    with pytest.raises(InputError, match="mask: is 32x32 pixels but the image is 64x64"):
        sampler.edit_instruct(tiny_ip2p, lat, cond, steps=1, mask=torch.ones(1, 32, 32))


# --- control nodes ------------------------------------------------------------------------

CONTROL_NODES = [editing.PFBControlNode, editing.MAGControlNode,
                 astar_nodes.AStarControlNode, identity_guidance.IdentityGuidanceNode]


@pytest.mark.parametrize("node", CONTROL_NODES)
def test_control_nodes_share_the_glue(node):
    assert issubclass(node, _common.ControlNode)
    spec = node.INPUT_TYPES()
    assert spec["optional"]["controls"][0] == _common.CONTROLS
    assert spec["optional"]["mask"][0] == "MASK"
    assert _common.MASK_RULE in spec["optional"]["mask"][1]["tooltip"]
    assert node.RETURN_TYPES == (_common.CONTROLS,) and node.FUNCTION == "make"


def test_control_nodes_chain_in_order_and_check_their_own_mask(box):
    (chain,) = editing.PFBControlNode().make(mask=box)
    (chain,) = editing.MAGControlNode().make(words="yellow", controls=chain)
    (chain,) = astar_nodes.AStarControlNode().make(words="sofa, carpet", steps_fraction=0.5,
                                                   step_size=2.5, threshold=0.5,
                                                   controls=chain)
    assert [type(c).__name__ for c in chain] == ["PFBControl", "MAGControl", "AStarControl"]
    assert chain[1].words == ["yellow"]
    bad = box.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="mask: holds 1 NaN"):
        astar_nodes.AStarControlNode().make(words="", steps_fraction=0.5, step_size=2.5,
                                            threshold=0.5, mask=bad)


# --- loaders: one class; only what exists inside ComfyUI; a hint for the host -------------

def test_the_three_sd_loaders_are_one_class_with_their_saved_inputs():
    names = {loaders.LoadCheckpoint: "ckpt_name", loaders.LoadDiffusers: "model",
             loaders.LoadInstructPix2Pix: "model"}
    for node, name in names.items():
        assert issubclass(node, loaders.SDLoader)
        assert list(node.INPUT_TYPES()["required"]) == [name, "dtype"]
        assert node.RETURN_TYPES == (_common.SD_MODEL,) and node.FUNCTION == "load"


def test_sd_loaders_load_under_their_input_names(tiny_root, tiny_models, clean_paths):
    for family in ("sd_checkpoint", "sd_diffusers", "ip2p_diffusers", "clip_tokenizer"):
        tiny_models(family)
    clean_paths.configure(tiny_root=tiny_root)
    (m,) = loaders.LoadCheckpoint().load(ckpt_name="v1-5-pruned-emaonly.safetensors",
                                         dtype="fp32")
    assert not m.instruct
    (m,) = loaders.LoadInstructPix2Pix().load(model="instruct-pix2pix", dtype="fp32")
    assert m.instruct


def test_inside_comfyui_loaders_list_only_models_that_exist(tmp_path, clean_paths):
    comfy = tmp_path / "comfy"
    (comfy / "checkpoints").mkdir(parents=True)
    clean_paths.set_comfy_provider(lambda name: [str(comfy / name)])
    try:
        assert paths.list_models(paths.SD_CHECKPOINT) == []
        assert loaders.LoadCheckpoint.INPUT_TYPES()["required"]["ckpt_name"][0] == []
        (comfy / "checkpoints" / "mine.safetensors").write_bytes(b"")
        assert paths.list_models(paths.SD_CHECKPOINT) == ["mine.safetensors"]
        with pytest.raises(ModelNotFoundError) as err:
            paths.resolve(paths.SD_CHECKPOINT, "v1-5-pruned-emaonly.safetensors")
        text = str(err.value)
        assert "models/checkpoints" in text and "extra_model_paths.yaml" in text
        assert "--models-dir" not in text and "XMGIE_MODELS_DIR" not in text
    finally:
        clean_paths.set_comfy_provider(None)


def test_the_mgie_unet_list_leaves_out_the_mgie_folders_weights(tmp_path, clean_paths):
    # models/mgie holds unet.pt and the MGIE folder (mllm.pt, the LLaVA and CLIP weights);
    # only UNets belong in Load MGIE UNet's list (Apple's folder keeps unet.pt beside
    # mllm.pt, and that one is listed).
    comfy = tmp_path / "comfy"
    mgie = comfy / "mgie"
    for rel in ("unet.pt", "mgie_7b/mllm.pt", "mgie_7b/unet.pt",
                "mgie_7b/LLaVA-7B-v1/model-00001-of-00002.safetensors",
                "mgie_7b/clip-vit-large-patch14/model.safetensors", "other/unet_v2.pt"):
        (mgie / rel).parent.mkdir(parents=True, exist_ok=True)
        (mgie / rel).write_bytes(b"")
    clean_paths.set_comfy_provider(lambda name: [str(comfy / name)])
    try:
        assert paths.list_models(paths.MGIE_UNET) == ["mgie_7b/unet.pt", "other/unet_v2.pt",
                                                      "unet.pt"]
        assert paths.list_models(paths.MGIE) == ["mgie_7b"]
        names = loaders.LoadMGIEUNet.INPUT_TYPES()["required"]["unet_name"][0]
        assert "mgie_7b/mllm.pt" not in names and "unet.pt" in names
    finally:
        clean_paths.set_comfy_provider(None)


def test_standalone_lists_the_defaults_and_hints_the_models_dir(tmp_path, clean_paths):
    clean_paths.configure(models_dir=[tmp_path])
    assert paths.list_models(paths.SD_CHECKPOINT) == [
        "v1-5-pruned-emaonly.safetensors", "sd_xl_base_1.0.safetensors",
        "v2-1_768-ema-pruned.safetensors"]
    with pytest.raises(ModelNotFoundError) as err:
        paths.resolve(paths.SD_CHECKPOINT, "v1-5-pruned-emaonly.safetensors")
    text = str(err.value)
    assert "--models-dir" in text and "XMGIE_MODELS_DIR" in text
    assert "extra_model_paths" not in text


# --- prompts past the text encoder's window -----------------------------------------------

def test_a_cut_target_prompt_is_named_in_the_samplers_output_and_log(tiny_sd, inv, caplog):
    with caplog.at_level(logging.WARNING):
        out = editing.CAMSampler().sample(tiny_sd, inv, TGT + " " + LONG, "", "", "logits",
                                          0.8, 0.5, True)
    text = _result(out)[-1]
    assert "target_prompt" in text and "zebra hat" in text and "dropped" in text
    assert "zebra hat" in " ".join(out["ui"]["text"])
    assert "zebra hat" in caplog.text


def test_a_cut_source_prompt_is_named_in_the_inversions_output(tiny_sd, photo):
    out = editing.Invert().invert(tiny_sd, photo, SRC + " " + LONG, "direct", 2, 7.5, 1)
    assert "source_prompt" in _result(out)[-1] and "zebra hat" in _result(out)[-1]


def test_a_cut_instruction_is_named_by_both_instruction_nodes(tiny_ip2p, photo):
    out = editing.EncodeInstruction().encode(tiny_ip2p, "make the carpet yellow " + LONG)
    (cond,) = _result(out)
    assert "zebra hat" in out["ui"]["text"][0] and cond.dropped.endswith("zebra hat")
    sampled = editing.InstructSampler().sample(tiny_ip2p, photo, cond, 1, 7.5, 1.5, 0, "",
                                               True)
    assert "instruction" in _result(sampled)[-1] and "zebra hat" in _result(sampled)[-1]
    # A prompt that fits says nothing.
    (short,) = _result(editing.EncodeInstruction().encode(tiny_ip2p, "make it yellow"))
    assert short.dropped == ""
