"""SD 1.x loaders: every layout is written to disk and read back through the public
loaders; search order and error messages."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from xmgie.mgie_core import paths, tiny
from xmgie.mgie_core.errors import ModelLoadError, ModelNotFoundError
from xmgie.mgie_core.models import ldm_convert, sd
from xmgie.mgie_core.tiny import sd as tiny_sd


def _assert_same_weights(reference: torch.nn.Module, loaded: torch.nn.Module):
    ref, got = reference.state_dict(), loaded.state_dict()
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k].reshape(ref[k].shape)), k


@pytest.fixture(scope="module")
def sd_root(tiny_root, tiny_models):
    for fam in ("sd_diffusers", "sd_checkpoint", "ip2p_diffusers", "mgie_unet", "clip_tokenizer"):
        tiny_models(fam)
    return tiny_root


def test_diffusers_folder_by_name_and_by_path(sd_root, clean_paths):
    clean_paths.configure(models_dir=[sd_root])
    by_name = sd.load_sd_diffusers("tiny-sd15")
    by_path = sd.load_sd_diffusers(str(sd_root / "diffusers" / "tiny-sd15"))
    unet, vae, te = tiny_sd.build(4)
    for model in (by_name, by_path):
        assert not model.instruct and model.dtype == torch.float32
        _assert_same_weights(unet, model.unet)
        _assert_same_weights(vae, model.vae)
        _assert_same_weights(te, model.text_encoder)
    # docs/algorithms.md section 0 scheduler settings, whatever the folder's scheduler says.
    cfg = by_name.scheduler.config
    assert (cfg.beta_start, cfg.beta_end, cfg.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert cfg.clip_sample is False and cfg.set_alpha_to_one is False and cfg.steps_offset == 1
    by_name.scheduler.set_timesteps(50)
    assert by_name.scheduler.timesteps[0] == 981 and by_name.scheduler.timesteps[-1] == 1


def test_single_file_checkpoint_is_bit_exact(sd_root, clean_paths):
    clean_paths.configure(models_dir=[sd_root])
    model = sd.load_sd_checkpoint("tiny-sd15.safetensors")
    unet, vae, te = tiny_sd.build(4)
    _assert_same_weights(unet, model.unet)
    _assert_same_weights(vae, model.vae)
    _assert_same_weights(te, model.text_encoder)
    assert len(model.tokenizer) >= 1000
    # the file really is in the original LDM layout ComfyUI's checkpoints hold
    from safetensors import safe_open

    with safe_open(str(sd_root / "checkpoints" / "tiny-sd15.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "first_stage_model.decoder.up.0.block.0.conv1.weight" in keys
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in keys


def test_tiny_mode_answers_any_name(sd_root, clean_paths):
    clean_paths.configure(tiny_root=sd_root)
    model = sd.load_sd_checkpoint("v1-5-pruned-emaonly.safetensors")
    assert model.source.endswith("tiny-sd15.safetensors")
    # the SDXL and SD 2.x defaults too: the same loaders read them, tiny mode answers them
    assert paths.list_models(paths.SD_CHECKPOINT) == [
        *paths.SD_CHECKPOINT.default_names, *paths.SDXL_CHECKPOINT.default_names,
        *paths.SD2_CHECKPOINT.default_names]


def test_ldm_writer_matches_diffusers_reader_at_sd_structure():
    """Two layers per block as in SD 1.5 (the tiny model has one): the written LDM keys
    must convert back to the same diffusers weights with diffusers' own converter."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    torch.manual_seed(0)
    cfg = dict(tiny_sd.unet_config(), layers_per_block=2)
    unet = UNet2DConditionModel(**cfg)
    ldm = ldm_convert.unet_to_ldm(unet.state_dict(), unet.config)
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert back.keys() == unet.state_dict().keys()
    for k, v in unet.state_dict().items():
        assert torch.equal(back[k], v), k
    vae = AutoencoderKL(**dict(tiny_sd.vae_config(), layers_per_block=2))
    vldm = {k[len("first_stage_model."):]: v for k, v in
            ldm_convert.vae_to_ldm(vae.state_dict(), vae.config).items()}
    vback = convert_ldm_vae_checkpoint(vldm, dict(vae.config))
    for k, v in vae.state_dict().items():
        assert torch.equal(vback[k].reshape(v.shape), v), k


def test_shipped_sd15_config_has_sd15_sizes():
    """The configs the pack ships for single files describe SD 1.5 exactly (parameter
    counts of SD 1.5's UNet, VAE and CLIP ViT-L/14 text encoder)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(sd.CONFIG_DIR / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(sd.CONFIG_DIR / "vae"))
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(sd.CONFIG_DIR / "text_encoder"))

    def count(m):
        return sum(p.numel() for p in m.parameters())

    assert count(unet) == 859_520_964
    assert count(vae) == 83_653_863
    assert count(te) == 123_060_480


def test_instruct_loaders(sd_root, clean_paths):
    clean_paths.configure(models_dir=[sd_root])
    ip2p = sd.load_instruct_diffusers("tiny-ip2p")
    assert ip2p.instruct and ip2p.unet.config.in_channels == 8
    with pytest.raises(ModelLoadError, match="not 8"):
        sd.load_instruct_diffusers("tiny-sd15")
    with pytest.raises(ModelLoadError, match="not 4"):
        sd.load_sd_diffusers("tiny-ip2p")
    base = sd.load_sd_diffusers("tiny-sd15")
    mgie = sd.load_mgie_unet("unet.pt", base)
    assert mgie.instruct and mgie.vae is base.vae and mgie.text_encoder is base.text_encoder
    ref = tiny_sd.build(8, seed=1)[0]
    _assert_same_weights(ref, mgie.unet)


def test_mgie_unet_with_missing_weight_is_rejected(sd_root, clean_paths, tmp_path):
    state = torch.load(sd_root / "mgie" / "unet.pt", weights_only=True)
    del state["conv_out.weight"]
    (tmp_path / "mgie").mkdir()
    torch.save(state, tmp_path / "mgie" / "broken.pt")
    clean_paths.configure(models_dir=[sd_root, tmp_path])
    base = sd.load_sd_diffusers("tiny-sd15")
    with pytest.raises(ModelLoadError, match="conv_out.weight"):
        sd.load_mgie_unet("broken.pt", base)
    with pytest.raises(ModelLoadError, match="not 8"):
        torch.save(tiny_sd.build(4)[0].state_dict(), tmp_path / "mgie" / "four.pt")
        sd.load_mgie_unet("four.pt", base)


def test_missing_model_names_every_folder_searched(tmp_path, clean_paths, monkeypatch):
    a, b, c, comfy = (tmp_path / n for n in ("a", "b", "env", "comfy_models"))
    monkeypatch.setenv(paths.ENV_MODELS_DIR, str(c))
    clean_paths.configure(models_dir=[a, b])
    clean_paths.set_comfy_provider(lambda name: [str(comfy / name)])
    try:
        with pytest.raises(ModelNotFoundError) as err:
            sd.load_sd_checkpoint("v1-5-pruned-emaonly.safetensors")
    finally:
        clean_paths.set_comfy_provider(None)
    msg = str(err.value)
    order = [str(comfy / "checkpoints"), str(a / "checkpoints"), str(b / "checkpoints"),
             str(c / "checkpoints")]
    positions = [msg.index(p) for p in order]
    assert positions == sorted(positions), msg
    assert "huggingface.co/stable-diffusion-v1-5" in msg


def test_search_order_prefers_comfy_then_models_dir(sd_root, tmp_path, clean_paths):
    comfy = tmp_path / "comfy"
    (comfy / "checkpoints").mkdir(parents=True)
    shutil.copy(sd_root / "checkpoints" / "tiny-sd15.safetensors", comfy / "checkpoints")
    clean_paths.configure(models_dir=[sd_root])
    clean_paths.set_comfy_provider(lambda name: [str(comfy / name)])
    try:
        found = paths.resolve(paths.SD_CHECKPOINT, "tiny-sd15.safetensors")
        assert found == comfy / "checkpoints" / "tiny-sd15.safetensors"
        assert "tiny-sd15.safetensors" in paths.list_models(paths.SD_CHECKPOINT)
    finally:
        clean_paths.set_comfy_provider(None)


def test_hf_cache_is_searched_offline(sd_root, tmp_path, clean_paths, monkeypatch):
    """Step 4: a repository already in the local Hugging Face cache (real cache layout)."""
    snap = tmp_path / "hub" / "models--stable-diffusion-v1-5--stable-diffusion-v1-5"
    (snap / "refs").mkdir(parents=True)
    (snap / "refs" / "main").write_text("0123abcd")
    shutil.copytree(sd_root / "diffusers" / "tiny-sd15", snap / "snapshots" / "0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    found = paths.resolve(paths.SD_DIFFUSERS, "stable-diffusion-v1-5")
    assert found.resolve() == (snap / "snapshots" / "0123abcd").resolve()
    model = sd.load_sd_diffusers("stable-diffusion-v1-5")
    assert model.unet.config.in_channels == 4


@pytest.mark.parametrize("remove", [["vocab.json", "merges.txt"], ["tokenizer_config.json",
                                                                   "special_tokens_map.json"]])
def test_incomplete_tokenizer_folder_is_rejected(sd_root, tmp_path, clean_paths, remove):
    folder = tmp_path / "diffusers" / "broken"
    shutil.copytree(sd_root / "diffusers" / "tiny-sd15", folder)
    for name in remove:
        (folder / "tokenizer" / name).unlink()
    clean_paths.configure(models_dir=[tmp_path])
    with pytest.raises(ModelLoadError, match="tokenizer"):
        sd.load_sd_diffusers("broken")


def test_empty_tokenizer_folder_is_rejected(sd_root, tmp_path, clean_paths):
    folder = tmp_path / "diffusers" / "empty-tok"
    shutil.copytree(sd_root / "diffusers" / "tiny-sd15", folder)
    shutil.rmtree(folder / "tokenizer")
    (folder / "tokenizer").mkdir()
    clean_paths.configure(models_dir=[tmp_path])
    with pytest.raises(ModelLoadError, match="tokenizer"):
        sd.load_sd_diffusers("empty-tok")


def test_folder_missing_a_component_names_it(sd_root, tmp_path, clean_paths):
    folder = tmp_path / "diffusers" / "novae"
    shutil.copytree(sd_root / "diffusers" / "tiny-sd15", folder)
    shutil.rmtree(folder / "vae")
    clean_paths.configure(models_dir=[tmp_path])
    with pytest.raises(ModelLoadError, match="vae/config.json"):
        sd.load_sd_diffusers("novae")


def test_tiny_build_is_atomic_and_idempotent(tmp_path):
    root = tiny.ensure_tiny_models(tmp_path, ["clip_tokenizer"])
    target = tiny.tiny_path(root, "clip_tokenizer")
    stamp = (target / "vocab.json").stat().st_mtime_ns
    tiny.ensure_tiny_models(tmp_path, ["clip_tokenizer"])
    assert (target / "vocab.json").stat().st_mtime_ns == stamp
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".tmp-")]
    vocab = json.loads((target / "vocab.json").read_text())
    assert len(vocab) >= 1000


def test_clip_tokenizer_for_shipped_config_is_found(sd_root, tmp_path, clean_paths):
    """Single files with the shipped SD 1.5 config take their tokenizer from the
    clip_tokenizer family (ComfyUI's comfy/sd1_tokenizer is registered as 'sd1_tokenizer')."""
    shutil.copytree(sd_root / "clip_tokenizer" / "tiny-clip-tokenizer",
                    tmp_path / "clip_tokenizer" / "sd1_tokenizer")
    clean_paths.configure(models_dir=[tmp_path])
    assert sd.find_clip_tokenizer(sd.CONFIG_DIR) == tmp_path / "clip_tokenizer" / "sd1_tokenizer"
    clean_paths.configure(reset=True)
    with pytest.raises(ModelNotFoundError, match="clip-vit-large-patch14"):
        sd.find_clip_tokenizer(sd.CONFIG_DIR)
