"""SD 1.x from LDM-layout tensors (what ComfyUI's loaded models hold): bit-exact with the
single-file loader, tensors shared rather than copied, configs read from shapes, and
clear refusals of what is not SD 1.x."""

from __future__ import annotations

import json

import pytest
import torch

from xmgie.mgie_core.errors import InputError, ModelLoadError
from xmgie.mgie_core.models import from_ldm, ldm_convert, sd
from xmgie.mgie_core.models.validate import read_sd_configs
from xmgie.mgie_core.tiny import sd as tiny_sd

CKPT = "tiny-sd15.safetensors"


@pytest.fixture(scope="module")
def ckpt_root(tiny_root, tiny_models):
    tiny_models("sd_checkpoint")
    return tiny_root


@pytest.fixture
def parts(ckpt_root, clean_paths):
    clean_paths.configure(models_dir=[ckpt_root])
    return from_ldm.read_ldm_checkpoint(CKPT)


def _same(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    ba, bb = dict(a.named_buffers()), dict(b.named_buffers())
    assert ba.keys() == bb.keys()
    for k in ba:
        assert torch.equal(ba[k], bb[k]), k


def _outputs(model: sd.SDModel):
    g = torch.Generator().manual_seed(0)
    ids = model.tokenizer(["a red carpet"], padding="max_length",
                          max_length=model.tokenizer.model_max_length,
                          return_tensors="pt").input_ids
    with torch.no_grad():
        ctx = model.text_encoder(ids)[0]
        x = torch.randn(1, 4, 16, 16, generator=g)
        eps = model.unet(x, 500, encoder_hidden_states=ctx).sample
        img = model.vae.decode(x).sample
        lat = model.vae.encode(img).latent_dist.mode()
    return ids, ctx, eps, img, lat


def test_parts_give_the_single_file_model_bit_exact_and_share_tensors(parts, ckpt_root):
    reference = sd.load_sd_checkpoint(CKPT)
    unet, clip, vae = parts
    model = from_ldm.sd_from_ldm(unet, vae, clip)
    for name in ("unet", "vae", "text_encoder"):
        _same(getattr(reference, name), getattr(model, name))
    for a, b in zip(_outputs(reference), _outputs(model)):
        assert torch.equal(a, b)
    assert (model.device, model.dtype) == (torch.device("cpu"), torch.float32)
    assert model.tokenizer.get_vocab() == reference.tokenizer.get_vocab()
    assert model.scheduler.config == reference.scheduler.config
    # Nothing copied: every parameter is one of the part's tensors (same storage) ...
    assert from_ldm.shares_storage(model.unet, unet) == 1.0
    assert from_ldm.shares_storage(model.vae, vae) == 1.0
    assert from_ldm.shares_storage(model.text_encoder, clip) == 1.0
    # ... so a change to the source tensor is seen by the module (a LoRA'd weight would be).
    key = "input_blocks.0.0.bias"
    unet.state[key].add_(1.0)
    assert torch.equal(model.unet.conv_in.bias, unet.state[key])
    # the VAE's 1x1 attention convolutions are shared as linear views
    q = vae.state["encoder.mid.attn_1.q.weight"]
    assert q.ndim == 4 and model.vae.encoder.mid_block.attentions[0].to_q.weight.data_ptr() \
        == q.data_ptr()


def test_configs_read_from_shapes_rebuild_the_same_model(parts):
    unet, clip, vae = parts
    ucfg = from_ldm.unet_config_from_ldm(unet.state, num_heads=2, norm_num_groups=8)
    vcfg = from_ldm.vae_config_from_ldm(vae.state, norm_num_groups=8)
    tcfg = from_ldm.text_config_from_ldm(clip.state, num_attention_heads=2)
    want_u, want_v, want_t = tiny_sd.unet_config(), tiny_sd.vae_config(), tiny_sd.text_config()
    for key in ("in_channels", "out_channels", "layers_per_block", "cross_attention_dim",
                "attention_head_dim", "norm_num_groups"):
        assert ucfg[key] == want_u[key], key
    assert list(ucfg["block_out_channels"]) == list(want_u["block_out_channels"])
    assert list(ucfg["down_block_types"]) == list(want_u["down_block_types"])
    assert list(ucfg["up_block_types"]) == list(want_u["up_block_types"])
    for key in ("latent_channels", "layers_per_block", "norm_num_groups"):
        assert vcfg[key] == want_v[key], key
    assert list(vcfg["block_out_channels"]) == list(want_v["block_out_channels"])
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "max_position_embeddings"):
        assert tcfg[key] == want_t[key], key
    reference = from_ldm.sd_from_ldm(unet, vae, clip)
    inferred = from_ldm.sd_from_ldm(
        from_ldm.LDMPart("unet", unet.state, ucfg, "shapes"),
        from_ldm.LDMPart("vae", vae.state, vcfg, "shapes"),
        from_ldm.LDMPart("text_encoder", clip.state, tcfg, "shapes", tokenizer=clip.tokenizer))
    for a, b in zip(_outputs(reference), _outputs(inferred)):
        assert torch.equal(a, b)


def test_configs_from_shapes_at_full_sd15_structure():
    """The shipped SD 1.5 configs (2 res blocks per level, 320..1280 channels) come back
    from the LDM names and shapes alone: built on the meta device, no memory used."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    configs = sd.read_sd_configs(sd.CONFIG_DIR, "SD 1.5")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
    u_state = {k.removeprefix("model.diffusion_model."): v
               for k, v in ldm_convert.unet_to_ldm(unet.state_dict(), unet.config).items()}
    v_state = {k.removeprefix("first_stage_model."): v
               for k, v in ldm_convert.vae_to_ldm(vae.state_dict(), vae.config).items()}
    ucfg = from_ldm.unet_config_from_ldm(u_state)
    vcfg = from_ldm.vae_config_from_ldm(v_state)
    for key, value in configs["unet"].items():
        if not key.startswith("_"):
            assert json.loads(json.dumps(ucfg[key])) == value, key
    for key, value in configs["vae"].items():
        if not key.startswith("_"):
            assert json.loads(json.dumps(vcfg[key])) == value, key


def test_eight_channel_instruction_unet(ckpt_root):
    unet, _, _ = tiny_sd.build(8)
    state = {k.removeprefix("model.diffusion_model."): v.clone()
             for k, v in ldm_convert.unet_to_ldm(unet.state_dict(), unet.config).items()}
    cfg = from_ldm.unet_config_from_ldm(state, num_heads=2, norm_num_groups=8)
    assert cfg["in_channels"] == 8
    built = from_ldm.build_module(from_ldm.LDMPart("unet", state, cfg, "ip2p"))
    _same(unet, built)


def test_unknown_layouts_are_refused_naming_what_was_found(parts):
    unet, clip, vae = parts
    # SD 2.x's linear attention projections are read as such (tests/test_sdxl_loaders.py)
    sd2 = dict(unet.state)
    for k in [k for k in sd2 if k.endswith("proj_in.weight")]:
        sd2[k] = sd2[k][:, :, 0, 0]
    assert from_ldm.unet_config_from_ldm(sd2)["use_linear_projection"] is True
    # a class embedding that is not SDXL's added conditioning
    with pytest.raises(ModelLoadError, match="class label embedding"):
        from_ldm.unet_config_from_ldm({**unet.state, "label_emb.0.weight": torch.zeros(1)})
    # a missing weight is named, as the checkpoint spells it
    broken = {k: v for k, v in unet.state.items() if k != "out.2.weight"}
    with pytest.raises(ModelLoadError, match="model.diffusion_model.out.2.weight"):
        from_ldm.build_module(from_ldm.LDMPart("unet", broken, unet.config, "mine"))
    # parts in the wrong sockets
    with pytest.raises(InputError, match="vae"):
        from_ldm.sd_from_ldm(unet, clip, vae)
    # a text encoder whose width the UNet does not attend to
    wide = dict(clip.config, hidden_size=64, intermediate_size=128)
    from transformers import CLIPTextConfig, CLIPTextModel

    te = CLIPTextModel(CLIPTextConfig.from_dict(wide))
    wide_state = {k.removeprefix("cond_stage_model.transformer."): v
                  for k, v in ldm_convert.text_encoder_to_ldm(te.state_dict()).items()}
    with pytest.raises(InputError, match="64-wide"):
        from_ldm.sd_from_ldm(unet, vae, from_ldm.LDMPart("text_encoder", wide_state, wide,
                                                         "wide", tokenizer=clip.tokenizer))


def test_another_dtype_is_a_documented_copy(parts):
    unet, clip, vae = parts
    model = from_ldm.sd_from_ldm(unet, vae, clip, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in model.unet.parameters())
    assert from_ldm.shares_storage(model.unet, unet) == 0.0
    assert unet.state["input_blocks.0.0.weight"].dtype == torch.float32  # source untouched


def test_long_tokenizer_is_fitted_to_the_position_table_without_touching_the_original(parts):
    unet, clip, vae = parts
    clip.tokenizer.model_max_length = 8192      # ComfyUI's comfy/sd1_tokenizer says so
    model = from_ldm.sd_from_ldm(unet, vae, clip)
    assert model.tokenizer.model_max_length == 77
    assert clip.tokenizer.model_max_length == 8192


def test_text_encoder_keeps_its_own_precision_and_its_tensors(parts):
    """ComfyUI keeps CLIP in fp16 even on the CPU: the bridge shares those tensors (the
    pack casts the prompt features to float32), while the VAE follows the UNet."""
    from xmgie.mgie_core import diffusion

    unet, clip, vae = parts
    half = from_ldm.LDMPart("text_encoder", {k: v.half() for k, v in clip.state.items()},
                            clip.config, "fp16 CLIP", tokenizer=clip.tokenizer)
    bf16_vae = from_ldm.LDMPart("vae", {k: v.bfloat16() for k, v in vae.state.items()},
                                vae.config, "bf16 VAE")
    model = from_ldm.sd_from_ldm(unet, bf16_vae, half)
    assert model.dtype == torch.float32
    assert {p.dtype for p in model.text_encoder.parameters()} == {torch.float16}
    assert from_ldm.shares_storage(model.text_encoder, half) == 1.0
    assert {p.dtype for p in model.vae.parameters()} == {torch.float32}   # converted: a copy
    assert from_ldm.shares_storage(model.vae, bf16_vae) == 0.0
    emb = diffusion.encode_prompt(model, "a red carpet")
    full = diffusion.encode_prompt(from_ldm.sd_from_ldm(unet, vae, clip), "a red carpet")
    assert emb.dtype == torch.float32 and torch.allclose(emb, full, atol=2e-2)


def _comfy_sd15_ldm_on_meta() -> dict:
    """The LDM state dict of the ComfyUI-detectable tiny checkpoint, on the meta device
    (shapes only: nothing is allocated)."""
    with torch.device("meta"):
        unet, vae, text_encoder = tiny_sd.build(4, comfy_sd15=True)
    return ldm_convert.pipeline_to_ldm(unet, vae, text_encoder)


def test_comfy_checkpoint_has_sd15_layout_read_back_without_hints():
    """The checkpoint for a real ComfyUI: SD 1.5's blocks at 320 channels and a 768-wide
    context (what ComfyUI detects SD 1.5 by), SD 1.5's full-size VAE and CLIP-L (which
    ComfyUI builds whatever the file holds), and the bridge reads it back from its
    shapes with SD 1.5's defaults (8 heads, 32 groups, 12 text heads), no hints."""
    state = _comfy_sd15_ldm_on_meta()
    u_state = {k.removeprefix("model.diffusion_model."): v for k, v in state.items()
               if k.startswith("model.diffusion_model.")}
    t_state = {k.removeprefix("cond_stage_model.transformer."): v for k, v in state.items()
               if k.startswith("cond_stage_model.transformer.")}
    assert u_state["input_blocks.0.0.weight"].shape[0] == 320               # model_channels
    assert u_state["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape[1] == 768
    ucfg = from_ldm.unet_config_from_ldm(u_state)
    want = tiny_sd.unet_config(comfy_sd15=True)
    for key in ("in_channels", "layers_per_block", "cross_attention_dim",
                "attention_head_dim", "norm_num_groups"):
        assert ucfg[key] == want[key], key
    assert list(ucfg["block_out_channels"]) == [320] * 4
    assert list(ucfg["down_block_types"]) == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert list(ucfg["up_block_types"]) == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    tcfg = from_ldm.text_config_from_ldm(t_state)
    sd15 = read_sd_configs(sd.CONFIG_DIR, "SD 1.5 config")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "max_position_embeddings"):
        assert tcfg[key] == sd15["text_encoder"][key] == tiny_sd.text_config(True)[key], key
    assert tcfg["num_hidden_layers"] == 12 and tcfg["vocab_size"] == 49408
    v_state = {k.removeprefix("first_stage_model."): v for k, v in state.items()
               if k.startswith("first_stage_model.")}
    vcfg = from_ldm.vae_config_from_ldm(v_state)
    assert list(vcfg["block_out_channels"]) == sd15["vae"]["block_out_channels"] \
        == [128, 256, 512, 512]
    assert vcfg["layers_per_block"] == sd15["vae"]["layers_per_block"] == 2
