"""SDXL and SD 2.x in the core (docs/algorithms.md section 0): which architecture a UNet
is, and what each control reads on it; SDXL's packed conditioning against diffusers'
own SDXL pipeline; the UNet call with SDXL's added conditioning; v-prediction turned
into epsilon, and a DDIM inversion that reconstructs on the tiny SD 2.x (768-v); the
tiny SDXL, SDXL InstructPix2Pix and SD 2.x models in their real on-disk layouts."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from xmgie.mgie_core import diffusion, tiny
from xmgie.mgie_core.architecture import SD1, SD2, SDXL, architecture_of, layer_hw
from xmgie.mgie_core.errors import InputError
from xmgie.mgie_core.models import sd as sdm

PROMPT = "a photo of a red cat on a wooden table"


def _load(tiny_models, family):
    return sdm.load_diffusers_folder(tiny_models(family), f"tiny {family}")


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl):
    return tiny_sdxl


@pytest.fixture(scope="module")
def sd2(tiny_sd2):
    return tiny_sd2


# --- which architecture ------------------------------------------------------------------

def _meta_unet(config: dict):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def _shipped(family: str) -> dict:
    """The full-size UNet config the pack ships for single files (mgie_core/configs)."""
    return json.loads((sdm.CONFIG_DIR.parent / family / "unet" / "config.json").read_text())


# The real UNets' configs, as their diffusers folders hold them (the fields that matter).
SD21_768V = dict(
    sample_size=96, cross_attention_dim=1024, use_linear_projection=True,
    upcast_attention=True, attention_head_dim=[5, 10, 20, 20],
    block_out_channels=[320, 640, 1280, 1280],
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
SDXL_BASE = dict(
    sample_size=128, cross_attention_dim=2048, use_linear_projection=True,
    attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280],
    transformer_layers_per_block=[1, 2, 10], addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"])


def test_each_family_is_recognised_tiny_and_full_size(tiny_models):
    from diffusers import UNet2DConditionModel

    for family, arch in (("sd_diffusers", SD1), ("ip2p_diffusers", SD1), ("sd2", SD2),
                         ("sdxl", SDXL), ("sdxl_ip2p", SDXL)):
        config = UNet2DConditionModel.load_config(tiny_models(family) / "unet")
        assert architecture_of(_meta_unet(config)) is arch, family
    sd15 = UNet2DConditionModel.load_config(sdm.CONFIG_DIR / "unet")
    assert architecture_of(_meta_unet(sd15)) is SD1
    assert architecture_of(_meta_unet(SD21_768V)) is SD2
    assert architecture_of(_meta_unet(SDXL_BASE)) is SDXL
    for family, arch in (("sd15", SD1), ("sd2", SD2), ("sdxl", SDXL), ("sdxl_ip2p", SDXL)):
        assert architecture_of(_meta_unet(_shipped(family))) is arch, family
    # SD 2.x base (512 px, epsilon) has the same UNet layout as 768-v
    assert architecture_of(_meta_unet({**SD21_768V, "sample_size": 64})) is SD2


def test_the_real_sdxl_geometry_and_each_controls_layers():
    """SDXL: 70 cross-attention layers, none at the latent's resolution, the 10-deep
    transformers at latent / 4; the maps are the 50 down/up layers there (32x32 at
    1024 px), CAM's layers are cross layers of the UNet at latent / 2 and / 4."""
    unet = _meta_unet(_shipped("sdxl"))
    assert unet.config.transformer_layers_per_block == [1, 2, 10]
    arch = architecture_of(unet)
    cross = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
    assert len(cross) == 70
    assert [len(arch.cross_layers_at(unet, lv)) for lv in range(3)] == [0, 10, 60]
    maps = arch.map_layers(unet)
    assert len(maps) == 50 and not any(n.startswith("mid_block") for n in maps)
    assert maps == sorted(maps, key=arch.execution_rank)
    assert arch.map_size((128, 128)) == (32, 32)
    names = [n[: -len(".processor")] for n in cross]
    for prefix in arch.layers.cam_layers:
        hit = [n for n in names if n == prefix or n.startswith(prefix + ".")]
        assert hit, prefix
        assert {arch.level(n) for n in hit} <= {1, 2}
    assert arch.injects_self_attention(1) and not arch.injects_self_attention(0)
    # SD 1.5: the five 16x16 layers at 512 px, as the published methods read them
    sd15 = _meta_unet(_shipped("sd15"))
    sd1_maps = SD1.map_layers(sd15)
    assert len(sd1_maps) == 5 and SD1.map_size((64, 64)) == (16, 16)
    assert {n.split(".attentions")[0] for n in sd1_maps} == {"down_blocks.2", "up_blocks.1"}


def _record_levels(unet, hw, emb, added):
    """(layer, query tokens) of every attention call, in call order."""
    calls, handles = [], []
    mods = dict(unet.named_modules())
    for name in unet.attn_processors:
        layer = name[: -len(".processor")]
        handles.append(mods[layer].register_forward_pre_hook(
            lambda m, a, kw, layer=layer: calls.append(
                (layer, (a[0] if a else kw["hidden_states"]).shape[1])), with_kwargs=True))
    try:
        with torch.no_grad():
            unet(torch.zeros(1, unet.config.in_channels, *hw), torch.tensor([500]),
                 encoder_hidden_states=emb, added_cond_kwargs=added)
    finally:
        for h in handles:
            h.remove()
    return calls


@pytest.mark.parametrize("hw", [(16, 16), (13, 10)])
def test_layer_levels_follow_the_forward_on_tiny_sdxl_and_sd2(sdxl, sd2, hw):
    for sd in (sdxl, sd2):
        arch = architecture_of(sd.unet)
        emb = diffusion.encode_prompt(sd, PROMPT)
        tokens, added = diffusion.split_condition(sd, emb, hw)
        calls = _record_levels(sd.unet, hw, tokens, added)
        sizes = arch.level_sizes(hw)
        for name, n in calls:
            want = sizes[arch.level(name)]
            assert n == want[0] * want[1] and layer_hw(hw, n) == want, (sd.family, name)
        names = [c[0] for c in calls]
        assert names == sorted(names, key=arch.execution_rank)
        # SDXL has no attention at the latent's own resolution, SD 2.x has
        assert any(arch.level(n) == 0 for n in names) == (arch is SD2)


# --- the packed conditioning ---------------------------------------------------------

def test_sdxl_encode_prompt_is_the_two_encoders_penultimate_states_and_the_pooled_row(sdxl):
    emb = diffusion.encode_prompt(sdxl, PROMPT)
    w1 = sdxl.text_encoder.config.hidden_size
    w2 = sdxl.text_encoder_2.config.hidden_size
    assert emb.shape == (1, 78, w1 + w2) and emb.dtype == torch.float32
    with torch.no_grad():
        ids1 = sdxl.tokenizer(PROMPT, padding="max_length", max_length=77,
                              return_tensors="pt").input_ids
        ids2 = sdxl.tokenizer_2(PROMPT, padding="max_length", max_length=77,
                                return_tensors="pt").input_ids
        h1 = sdxl.text_encoder(ids1, output_hidden_states=True).hidden_states
        out2 = sdxl.text_encoder_2(ids2, output_hidden_states=True)
    # the tokenizers pad differently (OpenCLIP's with "!"), as SDXL's do
    assert ids1[0, -1] != ids2[0, -1] and sdxl.tokenizer_2.pad_token == "!"
    torch.testing.assert_close(emb[0, :77, :w1], h1[-2][0])
    torch.testing.assert_close(emb[0, :77, w1:], out2.hidden_states[-2][0])
    assert not torch.allclose(emb[0, :77, :w1], h1[-1][0])      # penultimate, not last
    pooled = out2.text_embeds[0]
    assert pooled.shape == (diffusion.pooled_width(sdxl.unet),)
    torch.testing.assert_close(emb[0, 77, : pooled.shape[0]], pooled)
    assert torch.count_nonzero(emb[0, 77, pooled.shape[0]:]) == 0


def test_sdxl_conditioning_equals_diffusers_sdxl_pipeline(sdxl, tiny_models):
    """Our encoding of a prompt and diffusers' StableDiffusionXLPipeline.encode_prompt on
    the same folder: the same tokens and the same pooled embedding."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_models("sdxl"), local_files_only=True)
    with torch.no_grad():
        tokens, _, pooled, _ = pipe.encode_prompt(PROMPT, device="cpu",
                                                  do_classifier_free_guidance=False)
    emb = diffusion.encode_prompt(sdxl, PROMPT)
    torch.testing.assert_close(emb[:, :77], tokens.float())
    torch.testing.assert_close(emb[:, 77, : pooled.shape[-1]], pooled.float())


def test_split_condition_round_trip_and_time_ids(sdxl, tiny_sd):
    emb = diffusion.encode_prompt(sdxl, PROMPT).expand(3, -1, -1)
    tokens, added = diffusion.split_condition(sdxl, emb, (16, 12))
    assert tokens.shape == (3, 77, emb.shape[-1])
    p = diffusion.pooled_width(sdxl.unet)
    torch.testing.assert_close(diffusion.pack_condition(tokens, added["text_embeds"]), emb)
    assert added["text_embeds"].shape == (3, p)
    # (original h, w; crop top, left; target h, w) in pixels: latent x the VAE's 8
    assert added["time_ids"].tolist() == [[128.0, 96.0, 0.0, 0.0, 128.0, 96.0]] * 3
    # the gradient reaches the pooled row (null-text on SDXL optimises it)
    u = emb[:1].clone().requires_grad_(True)
    t, a = diffusion.split_condition(sdxl, u, (16, 16))
    (t.sum() + a["text_embeds"].sum()).backward()
    assert u.grad[0, 77, :p].eq(1).all() and u.grad[0, 77, p:].eq(0).all()
    # two token sets before one pooled row (whole-condition CAM's [cond; null] keys)
    two = diffusion.pack_condition(torch.cat([tokens[:1], tokens[:1]], 1),
                                   added["text_embeds"][:1])
    t2, a2 = diffusion.split_condition(sdxl, two, (16, 16))
    assert t2.shape[1] == 154 and torch.equal(a2["text_embeds"], added["text_embeds"][:1])
    # SD 1.x: the tensor itself, nothing added
    e1 = diffusion.encode_prompt(tiny_sd, PROMPT)
    t1, a1 = diffusion.split_condition(tiny_sd, e1)
    assert t1 is e1 and a1 is None and e1.shape[1] == 77
    assert (tiny_sd.family, tiny_sd.prediction_type) == ("SD 1.x", "epsilon")
    assert tiny_sd.text_encoder_2 is None and tiny_sd.tokenizer_2 is None
    with pytest.raises(InputError, match="packed"):
        diffusion.split_condition(sdxl, emb[:, :77])


# --- the UNet call -----------------------------------------------------------------------

def test_unet_eps_on_tiny_sdxl_equals_a_direct_diffusers_call(sdxl):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 4, 16, 12, generator=g)
    emb = torch.cat([diffusion.encode_prompt(sdxl, PROMPT), diffusion.encode_prompt(sdxl, "")])
    eps = diffusion.unet_eps(sdxl, z, 601, emb)
    p = diffusion.pooled_width(sdxl.unet)
    added = {"text_embeds": emb[:, 77, :p],
             "time_ids": torch.tensor([[128.0, 96.0, 0.0, 0.0, 128.0, 96.0]] * 2)}
    with torch.no_grad():
        want = sdxl.unet(z, torch.tensor([601, 601]), encoder_hidden_states=emb[:, :77],
                         added_cond_kwargs=added).sample
    torch.testing.assert_close(eps, want)
    # the added conditioning matters: other time ids give another prediction
    other = {**added, "time_ids": torch.tensor([[1024.0, 768.0, 0.0, 0.0, 1024.0, 768.0]] * 2)}
    with torch.no_grad():
        moved = sdxl.unet(z, torch.tensor([601, 601]), encoder_hidden_states=emb[:, :77],
                          added_cond_kwargs=other).sample
    assert (moved - want).abs().max() > 1e-4


def test_v_prediction_is_returned_as_epsilon(sd2):
    assert sd2.prediction_type == "v_prediction" and sd2.family == "SD 2.x"
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(2, 1, 4, 8, 8, generator=g)
    a = float(sd2.scheduler.alphas_cumprod[700])
    xt = a ** 0.5 * x0 + (1 - a) ** 0.5 * noise
    v = a ** 0.5 * noise - (1 - a) ** 0.5 * x0           # the v target (Salimans & Ho)
    torch.testing.assert_close(diffusion.v_to_eps(v, xt, a), noise, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(diffusion.v_to_eps(v, xt, torch.tensor(a)), noise,
                               atol=1e-5, rtol=1e-5)
    # unet_eps on the v model: the formula applied to the UNet's own output
    emb = diffusion.encode_prompt(sd2, PROMPT)
    z = torch.randn(1, 4, 16, 16, generator=g)
    with torch.no_grad():
        out = sd2.unet(z, torch.tensor([700]), encoder_hidden_states=emb).sample
    want = a ** 0.5 * out + (1 - a) ** 0.5 * z
    torch.testing.assert_close(diffusion.unet_eps(sd2, z, 700, emb), want)
    assert (want - out).abs().max() > 1e-3
    with pytest.raises(InputError, match="fractional"):
        diffusion.unet_eps(sd2, z, 700.5, emb)


def test_ddim_inversion_reconstructs_on_tiny_sd2_with_v_prediction(sd2):
    """Invert and denoise with the same prompt (guidance 1): the reconstruction comes back
    close; read as epsilon, the same v model's output would not."""
    from xmgie.mgie_core import inversion

    g = torch.Generator().manual_seed(3)
    z0 = torch.randn(1, 4, 16, 16, generator=g) * 0.5
    steps = 20
    inv = inversion.invert(sd2, z0, PROMPT, method="ddim", steps=steps)
    emb = diffusion.encode_prompt(sd2, PROMPT)
    sch = diffusion.make_schedule(sd2, steps)
    assert inv.latents.shape[0] == steps + 1
    torch.testing.assert_close(inv.latents[-1], z0)
    z = inv.latents[0]                                      # z_T (latents[0] = noisiest)
    with torch.no_grad():
        for i in range(steps):
            z = diffusion.denoise_step(sch, i, z, diffusion.unet_eps(sd2, z, sch.t(i), emb))
    err = (z - z0).abs().mean().item()
    # the same round trip reading the v output as epsilon
    wrong = dict(sd2.scheduler.config)
    wrong["prediction_type"] = "epsilon"
    eps_read = dataclasses.replace(sd2, scheduler=sdm.ddim_scheduler(wrong))
    inv_bad = inversion.invert(eps_read, z0, PROMPT, method="ddim", steps=steps)
    zb = inv_bad.latents[0]
    with torch.no_grad():
        for i in range(steps):
            zb = diffusion.denoise_step(sch, i, zb, diffusion.unet_eps(eps_read, zb, sch.t(i),
                                                                       emb))
    err_bad = (zb - z0).abs().mean().item()
    # measured: 0.033 against 0.74, for latents of mean magnitude 0.40
    assert err < 0.1 * z0.abs().mean().item(), err
    assert err < err_bad / 10, (err, err_bad)


# --- the tiny models on disk -------------------------------------------------------------

@pytest.mark.parametrize("family, pipeline, in_channels", [
    ("sdxl", "StableDiffusionXLPipeline", 4),
    ("sdxl_ip2p", "StableDiffusionXLInstructPix2PixPipeline", 8),
    ("sd2", "StableDiffusionPipeline", 4)])
def test_tiny_models_are_in_the_real_layouts(tiny_models, family, pipeline, in_channels):
    import diffusers

    folder = tiny_models(family)
    assert folder == tiny.tiny_path(folder.parent.parent, family)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == pipeline
    xl = family.startswith("sdxl")
    parts = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] + \
        (["text_encoder_2", "tokenizer_2"] if xl else [])
    for part in parts:
        assert part in index and (folder / part).is_dir(), part
        if part not in ("tokenizer", "tokenizer_2", "scheduler"):
            assert (folder / part / "model.safetensors").exists() or \
                (folder / part / "diffusion_pytorch_model.safetensors").exists(), part
    # diffusers' own pipeline class reads the folder (no code from it, local files only)
    pipe = getattr(diffusers, pipeline).from_pretrained(folder, local_files_only=True)
    assert pipe.unet.config.in_channels == in_channels
    if xl:
        assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
        assert pipe.vae.config.scaling_factor == pytest.approx(0.13025)
    else:
        assert pipe.scheduler.config.prediction_type == "v_prediction"
    # and the pack's loader gives an SDModel of the family
    model = _load(tiny_models, family)
    assert model.family == ("SDXL" if xl else "SD 2.x")
    assert model.instruct == (in_channels == 8)
    assert (model.text_encoder_2 is not None) == xl and (model.tokenizer_2 is not None) == xl
    assert model.prediction_type == ("epsilon" if xl else "v_prediction")


# --- the attention masks read the architecture's maps -----------------------------------

def test_attention_masks_read_the_architectures_maps_on_sdxl_and_sd2(sdxl, sd2, image):
    from xmgie.mgie_core import masks

    layers = masks.map_layers(sdxl.unet)
    # tiny SDXL at latent / 4: down_blocks.2 (2 x 2 deep) and up_blocks.0 (3 x 2 deep)
    assert len(layers) == 10 and layers == architecture_of(sdxl.unet).map_layers(sdxl.unet)
    assert {n.split(".attentions")[0] for n in layers} == {"down_blocks.2", "up_blocks.0"}
    for sd in (sdxl, sd2):
        z = torch.randn(2, 4, 12, 16, generator=torch.Generator().manual_seed(5))
        maps = masks.capture_maps(sd, z, [501, 701], diffusion.encode_prompt(sd, PROMPT),
                                  masks.map_layers(sd.unet))
        assert sorted(maps) == sorted(masks.map_layers(sd.unet))
        for probs in maps.values():
            assert probs.shape[0] == 2 and probs.shape[2:] == (3 * 4, 77)   # 12x16 / 4
            torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs[..., 0]))
        m = masks.attention_map(sd, image, PROMPT, "cat")
        assert m.shape == (128, 128) and 0 <= float(m.min()) and float(m.max()) <= 1
        assert float(m.max()) - float(m.min()) > 0.5      # min-max normalised: a map


# --- the graph cache's calls (eager on the CPU: the same functions a capture records) --

@pytest.mark.parametrize("which", ["sdxl", "sd2", "sdxl_ip2p"])
def test_graph_cache_calls_equal_unet_eps_and_the_null_text_gradient(which, sdxl, sd2,
                                                                     tiny_sdxl_ip2p):
    from xmgie.mgie_core import graphs

    sd = {"sdxl": sdxl, "sd2": sd2, "sdxl_ip2p": tiny_sdxl_ip2p}[which]
    g = torch.Generator().manual_seed(6)
    z = torch.randn(1, sd.unet.config.in_channels, 16, 12, generator=g)
    cond = diffusion.encode_prompt(sd, PROMPT)
    cache = graphs.for_run(sd)
    torch.testing.assert_close(graphs.unet_eps(cache, "test", sd, z, 601, cond),
                               diffusion.unet_eps(sd, z, 601, cond))
    if sd.instruct:
        return
    # null-text's loss and gradient w.r.t. the unconditional embedding (SDXL: its pooled
    # row too), against autograd through diffusion.unet_eps
    sch = diffusion.make_schedule(sd, 10)
    i, scale = 3, 7.5
    coef = graphs.ddim_coefficients(sch, sd.device)[i]
    eps_c = diffusion.unet_eps(sd, z, sch.t(i), cond)
    target = torch.randn(z.shape, generator=g)
    u = diffusion.encode_prompt(sd, "").clone().requires_grad_(True)
    loss, grad = graphs.null_text_gradient(cache, sd, u, z, sch.t(i), eps_c, target, coef,
                                           scale, i)
    u2 = u.detach().clone().requires_grad_(True)
    eps_u = diffusion.unet_eps(sd, z, sch.t(i), u2)
    want = torch.nn.functional.mse_loss(
        diffusion.denoise_step(sch, i, z, eps_u + scale * (eps_c - eps_u)), target)
    want.backward()
    torch.testing.assert_close(loss, want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, u2.grad, rtol=1e-4, atol=1e-7)
    if which == "sdxl":
        p = diffusion.pooled_width(sd.unet)
        assert grad[0, 77, :p].abs().max() > 0 and grad[0, 77, p:].abs().max() == 0


def test_the_vae_runs_in_its_own_dtype_under_a_half_precision_unet(sdxl, image):
    """SDXL's VAE asks for float32 (force_upcast); a model whose UNet runs in half
    precision encodes and decodes with the VAE's own dtype."""
    import copy

    from xmgie.mgie_core import vae

    assert sdxl.vae.config.force_upcast
    half = dataclasses.replace(sdxl, unet=copy.deepcopy(sdxl.unet).to(torch.bfloat16),
                               dtype=torch.bfloat16)
    assert half.vae_dtype == torch.float32 and sdxl.vae_dtype == torch.float32
    lat = vae.encode(half, image)
    torch.testing.assert_close(lat.samples, vae.encode(sdxl, image).samples)
    out = vae.decode(half, lat)
    assert out.shape == (1, 128, 128, 3) and out.dtype == torch.float32
