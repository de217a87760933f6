"""SDXL and SD 2.x loaders: single files in ComfyUI's models/checkpoints layout (offline,
local configs only, every tensor checked), diffusers folders, the runner's Load
Checkpoint and the bridge node. The tiny single files hold the weights of the tiny
diffusers models, so each loaded model must equal the one it was written from."""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from xmgie.mgie_core import diffusion, paths, tiny
from xmgie.mgie_core.errors import ModelLoadError
from xmgie.mgie_core.models import from_ldm, ldm_convert, sd
from xmgie.nodes import _comfy
from xmgie.nodes.loaders import SDModelFromComfy
from xmgie.runner import core_nodes

XL_NAME = "sd_xl_base_1.0.safetensors"
SD2_NAME = "v2-1_768-ema-pruned.safetensors"
FAMILIES = ("sdxl", "sd2", "sdxl_ip2p", "sdxl_checkpoint", "sd2_checkpoint", "clip_tokenizer")


@pytest.fixture(scope="module")
def root(tiny_root, tiny_models):
    for family in FAMILIES:
        tiny_models(family)
    return tiny_root


@pytest.fixture(autouse=True)
def no_hub(monkeypatch):
    """Nothing may be fetched: the Hub's download functions fail the test if called
    (conftest already refuses every network connection)."""
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError("a loader tried to download from the Hub")

    for name in ("hf_hub_download", "snapshot_download"):
        monkeypatch.setattr(huggingface_hub, name, refuse)


def _folder(root, family: str) -> sd.SDModel:
    return sd.load_diffusers_folder(tiny.tiny_path(root, family), "test", dtype="fp32")


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _same_outputs(got: sd.SDModel, ref: sd.SDModel, exact: bool = True) -> None:
    """Both text encoders' outputs (the packed conditioning) and the UNet's output.
    ``exact=False`` against a diffusers folder: its weights are equal, but read from the
    file at arbitrary byte offsets, where CPU matrix kernels round differently (~1e-7)."""
    def same(a, b):
        if exact:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            assert not torch.equal(a, torch.zeros_like(a))

    emb, emb_ref = (diffusion.encode_prompt(m, "a red car on a street") for m in (got, ref))
    same(emb, emb_ref)
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    out, out_ref = (diffusion.unet_eps(m, z, 501, emb_ref) for m in (got, ref))
    assert torch.isfinite(out).all()
    same(out, out_ref)


def _copy_checkpoint(root, tmp_path, tiny_name: str, new_name: str, with_config=True):
    src = root / "checkpoints" / tiny_name
    dst_dir = tmp_path / "checkpoints"
    dst_dir.mkdir(exist_ok=True)
    shutil.copy(src, dst_dir / new_name)
    side = src.with_name(src.stem + sd.SIDE_CONFIG_SUFFIX)
    if with_config:
        shutil.copytree(side, dst_dir / (new_name.rsplit(".", 1)[0] + sd.SIDE_CONFIG_SUFFIX))
    return dst_dir / new_name


def test_sdxl_single_file_in_comfyuis_layout_equals_its_diffusers_model(root, clean_paths,
                                                                          tmp_path):
    path = _copy_checkpoint(root, tmp_path, "tiny-sdxl.safetensors", "my-sdxl.safetensors")
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    # ComfyUI's SDXL layout: CLIP-L, OpenCLIP-bigG with fused attention, label_emb
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in keys
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert "conditioner.embedders.1.model.text_projection" in keys
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    clean_paths.configure(models_dir=[tmp_path])
    got = sd.load_sd_checkpoint("my-sdxl.safetensors", dtype="fp32")
    ref = _folder(root, "sdxl")
    assert got.family == "SDXL" and got.prediction_type == "epsilon"
    assert type(got.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert got.tokenizer_2.pad_token == "!" and got.tokenizer.pad_token == "<|endoftext|>"
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        _same_weights(getattr(got, name), getattr(ref, name))
    assert got.vae.config.scaling_factor == ref.vae.config.scaling_factor == 0.13025
    _same_outputs(got, ref, exact=False)


def test_sdxl_file_with_a_missing_tensor_is_refused_naming_it(root, clean_paths, tmp_path):
    path = _copy_checkpoint(root, tmp_path, "tiny-sdxl.safetensors", "broken-xl.safetensors")
    state = load_file(str(path))
    for key in ("conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight",
                "model.diffusion_model.label_emb.0.2.bias"):
        broken = {k: v for k, v in state.items() if k != key}
        save_file(broken, str(path))
        clean_paths.configure(models_dir=[tmp_path])
        for load in (lambda: sd.load_sd_checkpoint("broken-xl.safetensors"),
                     lambda: from_ldm.read_ldm_checkpoint("broken-xl.safetensors")):
            with pytest.raises(ModelLoadError, match="1 weights missing") as err:
                load()
            assert key in str(err.value) and "broken-xl.safetensors" in str(err.value)
    # a tensor of the wrong shape, and a stray one, are named too
    bad = dict(state)
    bad["conditioner.embedders.1.model.text_projection"] = torch.zeros(3, 3)
    bad["conditioner.embedders.2.model.extra"] = torch.zeros(1)
    save_file(bad, str(path))
    with pytest.raises(ModelLoadError) as err:
        sd.load_sd_checkpoint("broken-xl.safetensors")
    assert "conditioner.embedders.1.model.text_projection: (3, 3) in the file" in str(err.value)
    assert "conditioner.embedders.2.model.extra" in str(err.value)


def test_sdxl_file_without_config_uses_the_shipped_full_size_configs(root, clean_paths,
                                                                     tmp_path):
    """No ``<stem>.config/``: the pack's SDXL base config (nothing fetched), which the
    tiny file's tensors do not fit: every shape is named against the real SDXL's."""
    _copy_checkpoint(root, tmp_path, "tiny-sdxl.safetensors", "juggernaut.safetensors",
                     with_config=False)
    # single files carry no tokenizer: CLIP's from models/clip_tokenizer (bigG's pads "!")
    shutil.copytree(tiny.tiny_path(root, "clip_tokenizer"),
                    tmp_path / "clip_tokenizer" / "clip-vit-large-patch14")
    clean_paths.configure(models_dir=[tmp_path])
    with pytest.raises(ModelLoadError, match="wrong shape") as err:
        sd.load_sd_checkpoint("juggernaut.safetensors")
    assert str(err.value).startswith("SDXL checkpoint")
    assert "(49408, 768) in the model" in str(err.value)    # the real CLIP-L's vocabulary


def test_shipped_configs_have_the_real_sizes():
    """The shipped configs build the published models (parameter counts of SDXL base's
    UNet, CLIP-L, OpenCLIP-bigG with projection and VAE; SD 2.x's UNet and its 23-layer
    OpenCLIP-H), on the meta device."""
    def count(family, kind):
        cfg = from_ldm.shipped_configs(family)[kind]
        module = from_ldm._meta_build(kind, cfg, family)
        return sum(p.numel() for p in module.parameters())

    assert count("sdxl", "unet") == 2_567_463_684
    assert count("sdxl", "text_encoder") == 123_060_480
    assert count("sdxl", "text_encoder_2") == 694_659_840
    assert count("sdxl", "vae") == 83_653_863
    assert count("sd2", "unet") == 865_910_724
    assert count("sd2", "text_encoder") == 340_387_840
    assert from_ldm.shipped_configs("sd2")["scheduler"]["prediction_type"] == "v_prediction"
    ip2p = sd.read_sd_configs(from_ldm.CONFIGS_ROOT / "sdxl_ip2p", "shipped")
    assert ip2p["unet"]["in_channels"] == 8 and ip2p["unet"]["sample_size"] == 96


def test_sd2_single_file_loads_with_v_prediction(root, clean_paths):
    clean_paths.configure(tiny_root=root)    # tiny mode: the name says SD 2.x
    got = sd.load_sd_checkpoint(SD2_NAME, dtype="fp32")
    ref = _folder(root, "sd2")
    assert got.source.endswith("tiny-sd2.safetensors")
    assert got.family == "SD 2.x" and got.prediction_type == "v_prediction"
    assert got.text_encoder_2 is None and got.tokenizer.pad_token == "!"
    for name in ("unet", "vae", "text_encoder"):
        _same_weights(getattr(got, name), getattr(ref, name))
    _same_outputs(got, ref, exact=False)
    with safe_open(str(root / "checkpoints" / "tiny-sd2.safetensors"), "pt") as f:
        assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in f.keys()


def test_sdxl_vae_stays_float32_under_a_float16_unet(root, clean_paths, tmp_path):
    """SDXL's VAE overflows in float16 (its config says force_upcast): every loader keeps
    it in float32 next to a float16 UNet; SD 2.x's VAE follows the UNet."""
    clean_paths.configure(tiny_root=root)
    xl = sd.load_sd_checkpoint(XL_NAME, dtype="fp16", device="cpu")
    assert xl.unet.dtype == torch.float16 and xl.vae_dtype == torch.float32
    assert sd.load_sd_checkpoint(SD2_NAME, dtype="fp16", device="cpu").vae_dtype == \
        torch.float16
    with core_nodes.using_context(core_nodes.RunContext(input_dirs=[tmp_path])):
        parts = core_nodes.CheckpointLoaderSimple().load_checkpoint(XL_NAME)
    (bridged,) = SDModelFromComfy().convert(*parts, "fp16")
    assert bridged.unet.dtype == torch.float16 and bridged.vae_dtype == torch.float32


def test_sd2_file_with_openclips_unused_tensors_loads(root, clean_paths, tmp_path):
    """Published SD 2.x files hold OpenCLIP-H whole: a last layer SD 2.x does not read
    (it takes the penultimate one), the text projection and the logit scale. They are
    allowed, and left out; a missing tensor of a layer it reads is still refused."""
    path = _copy_checkpoint(root, tmp_path, "tiny-sd2.safetensors", "sd21-like.safetensors")
    state = load_file(str(path))
    pre = "cond_stage_model.model."
    last = f"{pre}transformer.resblocks.1."
    extra = {k.replace(last, f"{pre}transformer.resblocks.2."): v.clone()
             for k, v in state.items() if k.startswith(last)}
    extra[pre + "text_projection"] = torch.randn(48, 32)
    extra[pre + "logit_scale"] = torch.tensor(4.6)
    save_file({**state, **extra}, str(path))
    clean_paths.configure(models_dir=[tmp_path])
    got = sd.load_sd_checkpoint("sd21-like.safetensors", dtype="fp32")
    assert got.text_encoder.config.num_hidden_layers == 2
    _same_weights(got.text_encoder, _folder(root, "sd2").text_encoder)
    missing = f"{pre}transformer.resblocks.1.mlp.c_fc.weight"
    save_file({k: v for k, v in {**state, **extra}.items() if k != missing}, str(path))
    with pytest.raises(ModelLoadError, match="SD 2.x checkpoint") as err:
        sd.load_sd_checkpoint("sd21-like.safetensors")
    assert missing in str(err.value)


def test_prediction_type_of_a_file_without_config():
    """What the shipped configs' scheduler takes from the file: the v_pred key, else for
    SD 2.x ComfyUI's rule on one norm bias (768-v models spread it, 512-base ones not)."""
    probe = from_ldm.SD2_V_PROBE
    spread = torch.linspace(-1, 1, 320)
    assert from_ldm.file_prediction_type(from_ldm.SD2_LAYOUT, {probe: spread}) == "v_prediction"
    assert from_ldm.file_prediction_type(from_ldm.SD2_LAYOUT, {probe: spread * 0.01}) == "epsilon"
    assert from_ldm.file_prediction_type(from_ldm.SDXL_LAYOUT, {}) is None
    assert from_ldm.file_prediction_type(from_ldm.SDXL_LAYOUT, {"v_pred": torch.zeros(0)}) \
        == "v_prediction"
    # an SDXL UNet taking 8 channels gets the shipped SDXL InstructPix2Pix config
    conv_in = "model.diffusion_model.input_blocks.0.0.weight"
    assert from_ldm._shipped_config(from_ldm.SDXL_LAYOUT, {conv_in: torch.zeros(320, 8, 3, 3)}) \
        == from_ldm.CONFIGS_ROOT / "sdxl_ip2p"
    assert from_ldm._shipped_config(from_ldm.SDXL_LAYOUT, {conv_in: torch.zeros(320, 4, 3, 3)}) \
        == from_ldm.CONFIGS_ROOT / "sdxl"
    with pytest.raises(ModelLoadError, match="zero-terminal-SNR"):
        from_ldm.detect_layout({"ztsnr": torch.zeros(0)}, "checkpoint", "x.safetensors")
    with pytest.raises(ModelLoadError, match="refiner"):
        from_ldm.detect_layout({"conditioner.embedders.0.model.ln_final.weight": torch.zeros(1)},
                               "checkpoint", "x.safetensors")


def test_diffusers_folders_of_sdxl_sd2_and_sdxl_ip2p(root, clean_paths, tmp_path):
    clean_paths.configure(models_dir=[root])
    xl = sd.load_sd_diffusers("tiny-sdxl", dtype="fp32")
    assert xl.family == "SDXL" and not xl.instruct and xl.text_encoder_2 is not None
    assert xl.tokenizer_2.pad_token == "!"
    v = sd.load_sd_diffusers("tiny-sd2", dtype="fp32")
    assert v.family == "SD 2.x" and v.prediction_type == "v_prediction"
    ip2p = sd.load_instruct_diffusers("tiny-sdxl-ip2p", dtype="fp32")
    assert ip2p.instruct and ip2p.family == "SDXL" and ip2p.text_encoder_2 is not None
    # an SDXL folder without its second text encoder names what is missing
    broken = tmp_path / "diffusers" / "broken-xl"
    shutil.copytree(tiny.tiny_path(root, "sdxl"), broken)
    shutil.rmtree(broken / "text_encoder_2")
    clean_paths.configure(models_dir=[tmp_path])
    with pytest.raises(ModelLoadError, match="text_encoder_2"):
        sd.load_sd_diffusers("broken-xl")
    # model_index.json may name only Stable Diffusion's classes
    index = json.loads((broken / "model_index.json").read_text())
    index["text_encoder_2"] = ["my_package", "MyEncoder"]
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="text_encoder_2"):
        sd.load_sd_diffusers("broken-xl")


def test_bridge_from_the_runners_load_checkpoint_gives_a_working_sdxl(root, clean_paths,
                                                                       tmp_path):
    clean_paths.configure(tiny_root=root)
    ctx = core_nodes.RunContext(input_dirs=[tmp_path], output_dir=tmp_path / "out")
    ctx.text_encoder_dtype = torch.float32          # as xmgie run --fp32-text-enc
    with core_nodes.using_context(ctx):
        model, clip, vae = core_nodes.CheckpointLoaderSimple().load_checkpoint(XL_NAME)
    assert clip.second is not None and clip.second.kind == "text_encoder_2"
    (bridged,) = SDModelFromComfy().convert(model, clip, vae, "auto")
    ref = sd.load_sd_checkpoint(XL_NAME, dtype="fp32")
    assert bridged.family == "SDXL" and bridged.dtype == torch.float32
    # the modules ARE the Load Checkpoint output's tensors (nothing copied)
    assert from_ldm.shares_storage(bridged.unet, model) == 1.0
    assert from_ldm.shares_storage(bridged.text_encoder_2, clip.second) == 1.0
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        _same_weights(getattr(bridged, name), getattr(ref, name))
    _same_outputs(bridged, ref)
    # and the SD 2.x file
    with core_nodes.using_context(ctx):
        parts = core_nodes.CheckpointLoaderSimple().load_checkpoint(SD2_NAME)
    (bridged2,) = SDModelFromComfy().convert(*parts, "auto")
    assert bridged2.prediction_type == "v_prediction" and bridged2.text_encoder_2 is None


def test_sdxl_parts_mismatched_with_another_familys_clip_are_refused(root, clean_paths):
    clean_paths.configure(tiny_root=root)
    xl_unet, xl_clip, xl_vae = from_ldm.read_ldm_checkpoint(XL_NAME)
    _, sd2_clip, _ = from_ldm.read_ldm_checkpoint(SD2_NAME)
    from xmgie.mgie_core.errors import InputError

    with pytest.raises(InputError, match="one text encoder but the UNet is an SDXL"):
        from_ldm.sd_from_ldm(xl_unet, xl_vae, sd2_clip)


def test_configs_from_shapes_read_sdxl_and_sd2(root):
    """What the bridge does inside ComfyUI, where there is no config file: every size from
    the tensors (heads are the caller's), the result building the same model."""
    for family, name in (("sdxl", "tiny-sdxl"), ("sd2", "tiny-sd2")):
        ref = _folder(root, family)
        state = {k.removeprefix("model.diffusion_model."): v for k, v in
                 ldm_convert.unet_to_ldm(ref.unet.state_dict(), ref.unet.config).items()}
        cfg = from_ldm.unet_config_from_ldm(
            state, norm_num_groups=ref.unet.config.norm_num_groups,
            addition_time_embed_dim=ref.unet.config.addition_time_embed_dim or 256)
        for key in ("block_out_channels", "down_block_types", "up_block_types",
                    "cross_attention_dim", "use_linear_projection", "addition_embed_type",
                    "projection_class_embeddings_input_dim", "layers_per_block"):
            assert json.dumps(cfg.get(key)) == json.dumps(ref.unet.config.get(key)), key
        depth = ref.unet.config.transformer_layers_per_block      # SDXL (1, 1, 2), SD 2.x 1
        assert cfg.get("transformer_layers_per_block", 1) == (
            list(depth) if isinstance(depth, (list, tuple)) else depth)
        cfg["attention_head_dim"] = ref.unet.config.attention_head_dim
        built = from_ldm.build_module(from_ldm.LDMPart("unet", state, cfg, name))
        _same_weights(ref.unet, built)
    # ComfyUI's text encoders: CLIP-L as is, OpenCLIP-bigG with its projection, SD 2.x's
    # OpenCLIP-H up to its penultimate layer
    held = {"clip_g.transformer.text_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(1),
            "clip_g.transformer.text_model.encoder.layers.1.mlp.fc1.weight": torch.zeros(1),
            "clip_g.transformer.text_projection.weight": torch.zeros(1),
            "clip_g.logit_scale": torch.zeros(1)}
    assert set(_comfy._text_state(held, "clip_g", projection=True, drop_last=False)) == {
        "text_model.encoder.layers.0.mlp.fc1.weight",
        "text_model.encoder.layers.1.mlp.fc1.weight", "text_projection.weight"}
    assert set(_comfy._text_state(held, "clip_g", projection=False, drop_last=True)) == {
        "text_model.encoder.layers.0.mlp.fc1.weight"}


def test_tiny_mode_gives_each_familys_tiny_file(root, clean_paths):
    clean_paths.configure(tiny_root=root)
    assert sd.resolve_checkpoint(XL_NAME).name == "tiny-sdxl.safetensors"
    assert sd.resolve_checkpoint(SD2_NAME).name == "tiny-sd2.safetensors"
    assert paths.list_models(paths.SD_CHECKPOINT)[1:] == [XL_NAME, SD2_NAME]


# --- inside a real ComfyUI ------------------------------------------------------------------

COMFY_DIR = os.environ.get("XMGIE_COMFYUI_DIR")
needs_comfy = pytest.mark.skipif(not COMFY_DIR, reason="set XMGIE_COMFYUI_DIR to a ComfyUI "
                                 "checkout to check the bridge against it")


def _comfy_loaded(tmp_path_factory, maker: str):
    """ComfyUI (CPU mode, text encoders in fp32 as with --fp32-text-enc) and its own Load
    Checkpoint's MODEL, CLIP and VAE of a random-weight checkpoint written by ``maker``
    (:mod:`mgie_core.tiny.sdxl_checkpoint`)."""
    sys.path.insert(0, COMFY_DIR)
    import comfy.cli_args

    args = comfy.cli_args.args
    previous = (args.cpu, args.fp32_text_enc)
    args.cpu, args.fp32_text_enc = True, True
    import comfy.model_management as mm
    import comfy.sd

    from xmgie.mgie_core.tiny import sdxl_checkpoint

    path = tmp_path_factory.mktemp("comfy") / f"{maker}.safetensors"
    getattr(sdxl_checkpoint, maker)(path)
    try:
        yield comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True,
                                                    output_clip=True)[:3]
    finally:
        mm.unload_all_models()
        args.cpu, args.fp32_text_enc = previous


@pytest.fixture(scope="module")
def comfy_sdxl(tmp_path_factory):
    yield from _comfy_loaded(tmp_path_factory, "make_comfy_sdxl_checkpoint")


@pytest.fixture(scope="module")
def comfy_sd2(tmp_path_factory):
    yield from _comfy_loaded(tmp_path_factory, "make_comfy_sd2_checkpoint")


def _shares(ours: torch.nn.Module, theirs: torch.nn.Module) -> bool:
    ptrs = {t.untyped_storage().data_ptr() for t in theirs.state_dict().values()}
    return all(p.untyped_storage().data_ptr() in ptrs for p in ours.parameters())


@needs_comfy
def test_bridge_takes_comfyuis_sdxl_model_clip_and_vae(comfy_sdxl):
    """ComfyUI's own SDXL objects: the bridge shares the UNet's and both text encoders'
    tensors, its packed conditioning is ComfyUI's (CLIP-L and OpenCLIP-bigG penultimate
    states side by side; bigG's pooled projection), and its UNet call with that
    conditioning and the time ids is ComfyUI's."""
    import comfy.supported_models

    model, clip, vae = comfy_sdxl
    assert type(model.model.model_config) is comfy.supported_models.SDXL
    with torch.inference_mode():                      # as ComfyUI runs every node
        (bridged,) = SDModelFromComfy().convert(model, clip, vae, "auto")
        assert bridged.family == "SDXL" and bridged.prediction_type == "epsilon"
        assert bridged.vae.config.scaling_factor == pytest.approx(0.13025)
        for ours, theirs in ((bridged.unet, model.model.diffusion_model),
                             (bridged.text_encoder, clip.cond_stage_model.clip_l),
                             (bridged.text_encoder_2, clip.cond_stage_model.clip_g)):
            assert _shares(ours, theirs)
        prompt = "a photo of a red car"
        cond, pooled = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)
        emb = diffusion.encode_prompt(bridged, prompt)
        torch.testing.assert_close(emb[:, :77], cond.float(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(emb[:, 77, :1280], pooled.float(), rtol=1e-4, atol=1e-4)
        z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        y = model.model.encode_adm(pooled_output=pooled, width=64, height=64, crop_w=0,
                                   crop_h=0, target_width=64, target_height=64)
        unet = model.model.diffusion_model
        dtype = next(unet.parameters()).dtype
        theirs = unet(z.to(dtype), torch.tensor([501]), context=cond.to(dtype),
                      y=y.to(dtype)).float()
        ours = diffusion.unet_eps(bridged, z, 501, diffusion.pack_condition(cond.float(),
                                                                           pooled.float()))
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@needs_comfy
def test_bridge_takes_comfyuis_sd2_768_v(comfy_sd2):
    """ComfyUI's own SD 2.x objects, detected as 768-v: the bridge's model predicts v,
    reads OpenCLIP-H to its penultimate layer (23 of ComfyUI's 24, shared), and its text
    features and raw UNet output are ComfyUI's."""
    import comfy.model_sampling
    import comfy.supported_models

    model, clip, vae = comfy_sd2
    assert type(model.model.model_config) is comfy.supported_models.SD20
    assert isinstance(model.get_model_object("model_sampling"), comfy.model_sampling.V_PREDICTION)
    with torch.inference_mode():
        (bridged,) = SDModelFromComfy().convert(model, clip, vae, "auto")
        assert bridged.family == "SD 2.x" and bridged.prediction_type == "v_prediction"
        assert bridged.text_encoder.config.num_hidden_layers == 23
        assert _shares(bridged.unet, model.model.diffusion_model)
        assert _shares(bridged.text_encoder, clip.cond_stage_model.clip_h)
        prompt = "a photo of a red car"
        cond, _ = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)
        emb = diffusion.encode_prompt(bridged, prompt)
        torch.testing.assert_close(emb, cond.float(), rtol=1e-4, atol=1e-4)
        z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        unet = model.model.diffusion_model
        dtype = next(unet.parameters()).dtype
        theirs = unet(z.to(dtype), torch.tensor([501]), context=cond.to(dtype)).float()
        ours = bridged.unet(z.to(bridged.dtype), 501,
                            encoder_hidden_states=cond.to(bridged.dtype)).sample.float()
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_a_new_unet_on_an_sdxl_model_keeps_both_text_encoders_managed(root, clean_paths):
    """with_unet (LoRA fine-tuning, MGIE's UNet, MMIG) registers every shared module of
    an SDXL model with the memory registry, the second text encoder included."""
    import copy

    from xmgie.mgie_core import memory

    clean_paths.configure(tiny_root=root)
    base = sd.load_sd_checkpoint(XL_NAME, dtype="fp32")
    new = sd.with_unet(base, copy.deepcopy(base.unet), "tuned")
    managed = {e.module for e in memory.registry().entries_of(new)}
    assert {new.unet, base.vae, base.text_encoder, base.text_encoder_2} <= managed
    assert new.text_encoder_2 is base.text_encoder_2 and new.tokenizer_2 is base.tokenizer_2
