"""Fitting into ComfyUI graphs, headless: ComfyUI's LATENT convention at the pack's
boundary, the bridge node fed by the runner's Load Checkpoint stand-in (the same edit as
the pack's own loader, bit for bit), and the core stand-ins (VAE Decode/Encode, Preview
Any, a LoRA loader that refuses clearly). The bridge's ComfyUI side is verified in a real
ComfyUI server (README, "Your own checkpoint and LoRAs")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from xmgie import cli
from xmgie.mgie_core import paths, vae
from xmgie.mgie_core.errors import InputError
from xmgie.mgie_core.models import from_ldm
from xmgie.runner import core_nodes, engine

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "workflows" / "api" / "edit_carpet_checkpoint_api.json"
SF = 0.18215


@pytest.fixture
def tiny(tiny_root, tiny_models, clean_paths):
    tiny_models("sd_checkpoint")
    clean_paths.configure(tiny_root=tiny_root)
    return tiny_root


@pytest.fixture
def ctx(tmp_path):
    g = torch.Generator().manual_seed(0)
    img = (torch.rand(128, 128, 3, generator=g) * 255).to(torch.uint8).numpy()
    Image.fromarray(img).save(tmp_path / "photo.png")
    mask = Image.new("L", (128, 128), 0)
    mask.paste(255, (32, 40, 96, 104))
    mask.save(tmp_path / "mask.png")
    with core_nodes.using_context(core_nodes.RunContext(input_dirs=[tmp_path],
                                                        output_dir=tmp_path / "out")) as c:
        yield c


@pytest.fixture
def fp32_text_enc(ctx):
    """The run as ``xmgie run --fp32-text-enc`` (ComfyUI's flag of the same name)."""
    ctx.text_encoder_dtype = torch.float32
    yield ctx


def _run(prompt: dict) -> engine.RunResult:
    registry = cli.build_registry()
    return engine.execute(engine.check(prompt, registry), registry)


def _shipped(steps: int = 3) -> dict:
    prompt = json.loads(SHIPPED.read_text())
    prompt["1"]["inputs"]["image"] = "photo.png"
    prompt["2"]["inputs"]["image"] = "mask.png"
    prompt["7"]["inputs"]["steps"] = steps
    return prompt


def test_load_checkpoint_gives_clip_in_comfyuis_text_encoder_precision(tiny, ctx):
    """As ComfyUI's own Load Checkpoint (text_encoder_dtype: fp16 on every device unless
    --fp32-text-enc), and the bridge keeps it, as it does inside ComfyUI."""
    unet, clip, vae_part = core_nodes.CheckpointLoaderSimple().load_checkpoint("x.safetensors")
    assert {v.dtype for v in clip.state.values() if v.is_floating_point()} == {torch.float16}
    assert {v.dtype for v in unet.state.values()} == {torch.float32}
    (model,) = __import__("xmgie.nodes.loaders", fromlist=["x"]).SDModelFromComfy().convert(
        unet, clip, vae_part, "auto")
    assert model.text_encoder.dtype == torch.float16 and model.unet.dtype == torch.float32
    ctx.text_encoder_dtype = torch.float32
    _, clip32, _ = core_nodes.CheckpointLoaderSimple().load_checkpoint("x.safetensors")
    assert {v.dtype for v in clip32.state.values() if v.is_floating_point()} == {torch.float32}



def test_load_checkpoint_gives_an_fp16_files_unet_in_fp32_on_the_cpu(tiny, ctx, tmp_path):
    """ComfyUI loads an SD 1.x UNet in its weight dtype for the device, not the file's:
    fp32 on the CPU. An fp16 file (as most SD 1.5 downloads are) must not make the bridge
    run fp16 matrix products on the CPU, which ComfyUI never does."""
    from safetensors.torch import load_file, save_file

    src = paths.resolve(paths.SD_CHECKPOINT, "x.safetensors")
    models = tmp_path / "models" / "checkpoints"
    models.mkdir(parents=True)
    state = {k: v.half() if v.is_floating_point() else v for k, v in load_file(src).items()}
    save_file(state, models / "half.safetensors")
    side = src.with_name(src.stem + ".config")
    if side.is_dir():
        import shutil

        shutil.copytree(side, models / "half.config")
    paths.configure(models_dir=[tmp_path / "models"])
    unet, clip, vae_part = core_nodes.CheckpointLoaderSimple().load_checkpoint("half.safetensors")
    assert {v.dtype for v in unet.state.values() if v.is_floating_point()} == {torch.float32}
    assert {v.dtype for v in clip.state.values() if v.is_floating_point()} == {torch.float16}
    assert core_nodes.unet_weight_dtype(torch.device("cuda")) == torch.float16
    (model,) = __import__("xmgie.nodes.loaders", fromlist=["x"]).SDModelFromComfy().convert(
        unet, clip, vae_part, "auto")
    assert model.unet.dtype == torch.float32

def test_shipped_checkpoint_edit_equals_the_pack_loader_edit(tiny, fp32_text_enc):
    """Load Checkpoint -> bridge -> edit -> core VAE Decode gives, bit for bit, what the
    pack's own loader and decoder give for the same edit (with the text encoder in fp32,
    as the pack's loader has it: ComfyUI's --fp32-text-enc)."""
    bridged = _shipped()
    own = _shipped()
    own["3"] = {"class_type": "XMGIELoadCheckpoint",
                "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors", "dtype": "auto"}}
    own["4"] = {"class_type": "XMGIEVAEEncode", "inputs": {"sd_model": ["3", 0],
                                                          "image": ["1", 0]}}  # unused
    for node in own.values():
        for name, value in node["inputs"].items():
            if value == ["4", 0]:
                node["inputs"][name] = ["3", 0]
    own["10"] = {"class_type": "XMGIEVAEDecode", "inputs": {"sd_model": ["3", 0],
                                                           "latent": ["9", 0]}}
    own["12"] = {"class_type": "XMGIEVAEDecode", "inputs": {"sd_model": ["3", 0],
                                                           "latent": ["9", 1]}}
    a, b = _run(bridged), _run(own)
    for node in ("9",):
        for i in (0, 1):
            assert set(a.outputs[node][i]) == {"samples"}
            assert torch.equal(a.outputs[node][i]["samples"], b.outputs[node][i]["samples"])
    assert torch.equal(a.outputs["10"][0], b.outputs["10"][0])
    assert torch.equal(a.outputs["12"][0], b.outputs["12"][0])
    assert a.outputs["10"][0].shape == (1, 128, 128, 3)
    # the text outputs are plain STRINGs a core text display shows
    shown = json.loads(a.ui["14"]["text"][0])
    assert shown["edit_words"] == ["yellow"] and shown["object"] == "carpet"


def test_latents_follow_comfyui_convention(tiny, ctx):
    """The pack's VAE Encode gives ComfyUI's LATENT (the raw posterior mode), the same
    as core VAE Encode; both decoders read it; the sampler's latents are the library's
    divided by the scaling factor."""
    image = torch.rand(1, 128, 128, 3, generator=torch.Generator().manual_seed(1))
    unet, clip, vae_part = core_nodes.CheckpointLoaderSimple().load_checkpoint("x.safetensors")
    (model,) = __import__("xmgie.nodes.loaders", fromlist=["x"]).SDModelFromComfy().convert(
        unet, clip, vae_part, "auto")
    from xmgie.nodes import latents as latent_nodes

    (pack,) = latent_nodes.VAEEncode().encode(model, image)
    (core,) = core_nodes.VAEEncode().encode(vae_part, image)
    assert set(pack) == {"samples"} and torch.equal(pack["samples"], core["samples"])
    scaled = vae.encode(model, image).samples
    assert torch.allclose(pack["samples"] * SF, scaled, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(pack["samples"], scaled)          # really unscaled
    (a,) = latent_nodes.VAEDecode().decode(model, pack)
    (b,) = core_nodes.VAEDecode().decode(vae_part, core)
    assert torch.equal(a, b)
    assert torch.allclose(a, vae.decode(model, scaled), atol=1e-5)   # the library's way
    # ComfyUI crops sides that are not multiples of 8, centred
    odd = torch.rand(1, 133, 130, 3)
    (cropped,) = core_nodes.VAEEncode().encode(vae_part, odd)
    (direct,) = core_nodes.VAEEncode().encode(vae_part, odd[:, 2:130, 1:129])
    assert torch.equal(cropped["samples"], direct["samples"])
    # a latent of another family is refused by name
    with pytest.raises(InputError, match="latent"):
        latent_nodes.VAEDecode().decode(model, {"samples": torch.zeros(1, 16, 8, 8)})
    with pytest.raises(InputError, match="LATENT"):
        latent_nodes.VAEDecode().decode(model, torch.zeros(1, 4, 8, 8))


def test_node_types_at_the_boundary():
    import xmgie

    nodes = xmgie.NODE_CLASS_MAPPINGS
    assert nodes["XMGIEInvert"].RETURN_TYPES == ("XMGIE_INVERSION", "LATENT", "STRING")
    assert nodes["XMGIECAMSampler"].RETURN_TYPES == ("LATENT", "LATENT", "STRING")
    assert nodes["XMGIEInstructSampler"].RETURN_TYPES == ("LATENT", "STRING")
    assert nodes["XMGIEVAEEncode"].RETURN_TYPES == ("LATENT",)
    assert nodes["XMGIEVAEDecode"].INPUT_TYPES()["required"]["latent"][0] == "LATENT"
    assert nodes["XMGIECaption"].RETURN_TYPES == ("STRING",)
    assert nodes["XMGIEAskVLM"].RETURN_TYPES == ("STRING",)
    assert nodes["XMGIEIdentityScore"].RETURN_TYPES[0] == "FLOAT"
    assert set(nodes["XMGIEPlanToText"].RETURN_TYPES) == {"STRING"}
    bridge = nodes["XMGIESDModelFromComfy"].INPUT_TYPES()["required"]
    assert [bridge[k][0] for k in ("model", "clip", "vae")] == ["MODEL", "CLIP", "VAE"]
    assert nodes["XMGIESDModelFromComfy"].RETURN_TYPES == ("XMGIE_SD",)
    # no pack node passes the old private latent type any more
    for cls in nodes.values():
        spec = cls.INPUT_TYPES()
        types = [v[0] for s in ("required", "optional") for v in spec.get(s, {}).values()]
        assert "XMGIE_LATENT" not in list(cls.RETURN_TYPES) + types, cls.NODE_ID


def test_bridge_outside_comfyui_names_what_it_got(tiny):
    from xmgie.nodes.loaders import SDModelFromComfy

    with pytest.raises(InputError, match="model: got a str"):
        SDModelFromComfy().convert("model.safetensors", None, None, "auto")
    unet, clip, _ = core_nodes.CheckpointLoaderSimple().load_checkpoint("x.safetensors")
    with pytest.raises(InputError, match="vae"):
        SDModelFromComfy().convert(unet, clip, clip, "auto")


def test_lora_loader_is_refused_before_anything_runs(tiny, ctx):
    prompt = _shipped()
    prompt["20"] = {"class_type": "LoraLoader", "inputs": {
        "model": ["3", 0], "clip": ["3", 1], "lora_name": "style.safetensors",
        "strength_model": 1.0, "strength_clip": 1.0}}
    prompt["4"]["inputs"].update(model=["20", 0], clip=["20", 1])
    with pytest.raises(engine.WorkflowError) as err:
        engine.check(prompt, cli.build_registry())
    text = str(err.value)
    assert "LoraLoader" in text and "does not apply LoRAs" in text and "bypass" in text


@pytest.mark.parametrize("value, shown", [
    ("a yellow carpet", "a yellow carpet"), (0.875, "0.875"), (3, "3"), (True, "True"),
    ({"a": [1, 2]}, '{"a": [1, 2]}'), (None, "None")])
def test_preview_any_shows_values_as_core_does(value, shown):
    assert core_nodes.PreviewAny().main(value) == {"ui": {"text": (shown,)}}


def test_runner_checkpoint_parts_are_the_files_tensors(tiny):
    unet, clip, vae_part = core_nodes.CheckpointLoaderSimple().load_checkpoint("x.safetensors")
    assert [p.kind for p in (unet, clip, vae_part)] == ["unet", "text_encoder", "vae"]
    assert "input_blocks.0.0.weight" in unet.state
    assert "encoder.conv_in.weight" in vae_part.state
    assert "text_model.embeddings.token_embedding.weight" in clip.state
    assert clip.tokenizer is not None and unet.scheduler_config is not None
    assert paths.tiny_root() is not None and unet.source.endswith("tiny-sd15.safetensors")
    assert isinstance(unet, from_ldm.LDMPart)


def test_gradient_stages_run_on_the_bridged_model(tiny, ctx, caplog):
    """The bridge shares weights made in inference mode (ComfyUI loads inside it; so does
    the runner's Load Checkpoint stand-in): null-text inversion and MAG still get their
    gradients, by copying those weights once, and say so in the log."""
    import logging

    prompt = _shipped(steps=3)
    prompt["7"]["inputs"].update(method="null_text", inner_steps=2)
    prompt["15"] = {"class_type": "XMGIEMAGControl", "inputs": {
        "mask": ["2", 0], "words": "yellow", "negative_words": "", "opt_fraction": 0.67,
        "iterations": 2, "scale": 2.5, "spatial_ratio": False, "negative_weight": 5.5,
        "blend_fraction": 0.3, "controls": ["8", 0]}}
    prompt["9"]["inputs"]["controls"] = ["15", 0]
    registry = cli.build_registry()
    prompt = engine.check(prompt, registry)
    with caplog.at_level(logging.INFO, logger="xmgie.mgie_core.grad_mode"):
        res = engine.execute(prompt, registry)
    assert torch.isfinite(res.outputs["9"][0]["samples"]).all()
    copied = [r.getMessage() for r in caplog.records if "made in inference mode" in r.getMessage()]
    assert copied and copied[0].startswith("null-text inversion"), copied
    assert res.outputs["7"][0].updates.counts("null-text inversion").applied > 0
