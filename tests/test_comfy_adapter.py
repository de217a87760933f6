"""The ComfyUI adapter (nodes/_comfy.py) against a real ComfyUI: skipped unless
``XMGIE_COMFYUI_DIR`` names a ComfyUI checkout whose requirements this Python can import
(CI has no ComfyUI; the runner-level behaviour is covered by test_comfy_semantics.py).

    XMGIE_COMFYUI_DIR=/path/to/ComfyUI python -m pytest tests/test_comfy_adapter.py

ComfyUI runs on the CPU here (``--cpu``): its model management then keeps every model on
the CPU, but it still registers, loads and unloads them through the same code paths
(``load_models_gpu``, ``free_memory``), which is what this checks: the pack's models are
ModelPatchers in ComfyUI's list of loaded models while a node uses them, ComfyUI's
free-memory path releases them, and the gradient-based stages run inside inference mode
with ComfyUI's hooks installed.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

COMFY_DIR = os.environ.get("XMGIE_COMFYUI_DIR")
pytestmark = pytest.mark.skipif(not COMFY_DIR, reason="set XMGIE_COMFYUI_DIR to a ComfyUI "
                                "checkout to check the adapter against it")


@pytest.fixture(scope="module")
def comfy(tiny_root, tiny_models):
    """ComfyUI's model management (CPU mode) with the adapter's hooks installed; the
    library's standalone hooks and model folders are restored afterwards."""
    from xmgie.mgie_core import host, memory, paths

    sys.path.insert(0, COMFY_DIR)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True          # as `python main.py --cpu`
    import comfy.model_management as mm
    import comfy.model_patcher

    from xmgie.nodes import _comfy

    tiny_models("sd_diffusers")
    previous = host.hooks()
    previous_registry = memory._registry
    memory._registry = memory.ModelRegistry()
    _comfy._installed = False
    assert _comfy.install()
    paths.configure(tiny_root=tiny_root)
    try:
        yield mm
    finally:
        mm.unload_all_models()
        host.set_hooks(**vars(previous))
        memory._registry = previous_registry
        _comfy._installed = False
        paths.set_comfy_provider(None)
        paths.configure(reset=True)


def _load_sd():
    from xmgie.mgie_core import paths
    from xmgie.nodes import NODE_CLASS_MAPPINGS

    with torch.inference_mode():   # as ComfyUI runs a loader node
        (sd,) = NODE_CLASS_MAPPINGS["XMGIELoadDiffusers"]().load(   # by name, as ComfyUI
            model=paths.list_models(paths.SD_DIFFUSERS)[0], dtype="fp32")
    return sd


def test_models_are_comfyui_managed_and_released_by_its_free_memory(comfy):
    from comfy.model_patcher import ModelPatcher

    from xmgie.mgie_core import memory

    mm = comfy
    sd = _load_sd()
    entries = memory.registry().entries_of(sd)
    assert len(entries) == 3 and all(isinstance(e.handle, ModelPatcher) for e in entries)
    assert not any(e.is_loaded() for e in entries)           # waits on the offload device
    with torch.inference_mode(), memory.use(sd):
        loaded = mm.loaded_models()
        assert all(any(m is e.handle for m in loaded) for e in entries)
        assert all(e.is_loaded() for e in entries)
        assert not any(p.is_inference() for e in entries for p in e.module.parameters())
    unloaded = mm.free_memory(1e30, mm.get_torch_device())
    assert {id(e.handle) for e in entries} <= {id(u.model) for u in unloaded}
    assert not any(e.is_loaded() for e in entries)
    assert not any(m is e.handle for m in mm.loaded_models() for e in entries)
    # the pack asking for memory goes through ComfyUI too
    with torch.inference_mode(), memory.use(sd):
        pass
    assert all(e.is_loaded() for e in entries)
    memory.free_memory_for(10**15, mm.get_torch_device())
    assert not any(e.is_loaded() for e in entries)


def test_gradient_stage_runs_under_comfyui_hooks_in_inference_mode(comfy):
    from xmgie.mgie_core import inversion, mag, memory, sampler, vae

    sd = _load_sd()
    mask = torch.zeros(1, 128, 128)
    mask[:, 32:96, 40:104] = 1
    with torch.inference_mode(), memory.use(sd):
        image = torch.rand(1, 128, 128, 3, generator=torch.Generator().manual_seed(0))
        z0 = vae.encode(sd, image).samples
        inv = inversion.invert(sd, z0, "a photo of a red carpet", method="null_text",
                               steps=2, inner_steps=2, image_size=(128, 128))
        ctl = mag.MAGControl(mask, ["yellow"], iterations=2)
        res = sampler.edit(sd, inv, "a photo of a yellow carpet", mask=mask, controls=[ctl])
    assert inv.updates.get("null-text inversion").applied > 0
    assert res.report.get("MAG").applied > 0
    assert torch.isfinite(res.edit).all()


def test_comfyuis_sd1_tokenizer_is_registered_for_single_files(comfy):
    """ComfyUI's ``comfy`` is a namespace package (no __file__): the adapter still finds
    comfy/sd1_tokenizer, and installing never fails on it."""
    import folder_paths

    from xmgie.mgie_core import paths

    folders = folder_paths.get_folder_paths(paths.CLIP_TOKENIZER.folder)
    tok = [f for f in folders if os.path.isdir(os.path.join(f, "sd1_tokenizer"))]
    assert tok and os.path.isfile(os.path.join(tok[0], "sd1_tokenizer", "vocab.json"))


@pytest.fixture(scope="module")
def comfy_checkpoint(tmp_path_factory):
    """The random-weight SD 1.5-shaped checkpoint made for a real ComfyUI (fp16, about
    560 MB), with its config folder beside it."""
    from xmgie.mgie_core.tiny import sd as tiny_sd

    path = tmp_path_factory.mktemp("comfy-checkpoints") / "tiny-sd15-comfy.safetensors"
    tiny_sd.make_comfy_sd15_checkpoint(path)
    return path


def test_core_detection_takes_the_tiny_checkpoint_for_sd15(tmp_path, comfy_checkpoint):
    """ComfyUI's own model detection (what its core Load Checkpoint runs) finds SD 1.5
    in the tiny checkpoint made for it, and the narrow tiny checkpoint the tests use is
    what it cannot detect."""
    sys.path.insert(0, COMFY_DIR)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_detection
    import comfy.supported_models
    import comfy.utils

    from xmgie.mgie_core.tiny import sd as tiny_sd

    prefix = "model.diffusion_model."
    state = comfy.utils.load_torch_file(str(comfy_checkpoint))
    config = comfy.model_detection.model_config_from_unet(state, prefix)
    assert type(config) is comfy.supported_models.SD15
    assert config.unet_config["model_channels"] == 320
    assert config.unet_config["channel_mult"] == [1, 1, 1, 1]
    assert config.unet_config["transformer_depth"] == [1, 1, 1, 0]
    narrow = tmp_path / "tiny-sd15.safetensors"
    tiny_sd.make_sd_checkpoint(narrow)
    assert comfy.model_detection.model_config_from_unet(
        comfy.utils.load_torch_file(str(narrow)), prefix) is None


def _photo(name: str, size: int = 128) -> torch.Tensor:
    """A shipped template input at ``size`` px, as ComfyUI's LoadImage gives it."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    path = Path(__file__).resolve().parent.parent / "workflows" / "inputs" / name
    image = Image.open(path).convert("RGB").resize((size, size), Image.NEAREST)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]


def test_core_load_checkpoint_feeds_the_bridge_and_the_pack_edits(comfy, comfy_checkpoint,
                                                                  monkeypatch):
    """The bridge template's path inside ComfyUI, in-process: ComfyUI's own Load
    Checkpoint code loads the tiny SD 1.5 checkpoint (its VAE and CLIP-L at SD 1.5's full
    sizes, which a narrower file fails with size mismatches); the bridge node takes
    ComfyUI's MODEL, CLIP and VAE, sharing the UNet's weights; the pack's nodes invert
    and edit a photo, and ComfyUI's VAE decodes the pack's latent. The pack's own
    Load Checkpoint node, finding the file through ComfyUI's checkpoint folders, reads
    the same UNet."""
    import comfy.sd
    import comfy.supported_models
    import folder_paths

    from xmgie.mgie_core import paths
    from xmgie.nodes import NODE_CLASS_MAPPINGS

    model, clip, vae = comfy.sd.load_checkpoint_guess_config(
        str(comfy_checkpoint), output_vae=True, output_clip=True)[:3]
    assert type(model.model.model_config) is comfy.supported_models.SD15
    image, mask = _photo("carpet.png"), _photo("carpet_mask.png")[..., 0]
    nodes = NODE_CLASS_MAPPINGS
    with torch.inference_mode():            # as ComfyUI runs every node
        (sd,) = nodes["XMGIESDModelFromComfy"]().convert(model, clip, vae, "auto")
        comfy_unet = model.model.diffusion_model
        assert sd.unet.conv_in.weight.data_ptr() == \
            comfy_unet.input_blocks[0][0].weight.data_ptr()           # shared, not copied
        inversion, latent, _ = nodes["XMGIEInvert"]().invert(
            sd, image, "there is a set of sofas on the red carpet in the living room",
            "direct", 2, 7.5, 1)
        (controls,) = nodes["XMGIEPFBControl"]().make(mask=mask)
        out = nodes["XMGIECAMSampler"]().sample(
            sd, inversion, "there is a set of sofas on the yellow carpet in the living room",
            "yellow", "", "logits", 0.8, 0.5, True, mask=mask, controls=controls)
        edited, reconstruction = (out["result"] if isinstance(out, dict) else out)[:2]
        decoded = vae.decode(edited["samples"])
    assert latent["samples"].shape == edited["samples"].shape == (1, 4, 16, 16)
    assert decoded.shape == (1, 128, 128, 3) and torch.isfinite(decoded).all()
    assert not torch.equal(edited["samples"], reconstruction["samples"])

    # The pack's own loader, finding the file as ComfyUI's Load Checkpoint does.
    folder = str(comfy_checkpoint.parent)
    folder_paths.add_model_folder_path("checkpoints", folder)
    monkeypatch.setattr(paths, "_tiny_root", None)
    try:
        assert comfy_checkpoint.name in paths.list_models(paths.SD_CHECKPOINT)
        with torch.inference_mode():
            (own,) = nodes["XMGIELoadCheckpoint"]().load(ckpt_name=comfy_checkpoint.name,
                                                        dtype="fp32")
    finally:
        folder_paths.folder_names_and_paths["checkpoints"][0].remove(folder)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500])
    with torch.inference_mode():
        ours = own.unet.to(sd.device)(x, t, context).sample
        bridged = sd.unet(x.to(sd.dtype), t, context.to(sd.dtype)).sample
    assert torch.allclose(ours.float(), bridged.float(), atol=1e-4, rtol=1e-4)
