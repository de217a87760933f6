"""Masks from attention (docs/algorithms.md section 11) on the tiny SD and the tiny SAM."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

PROMPT = "a photo of a cat on a sofa"
TINY_FACTOR4 = ["down_blocks.2.attentions.0.transformer_blocks.0.attn2",
                "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
                "up_blocks.1.attentions.1.transformer_blocks.0.attn2"]


@pytest.fixture(scope="module")
def sd(tiny_models, tiny_root):
    from xmgie.mgie_core import paths
    from xmgie.mgie_core.models import sd as sd_lib

    tiny_models("sd_diffusers")
    paths.configure(reset=True)
    paths.configure(models_dir=[tiny_root])
    try:
        model = sd_lib.load_sd_diffusers("tiny-sd15", device="cpu")
        assert not model.instruct
        yield model
    finally:
        paths.configure(reset=True)


@pytest.fixture(scope="module")
def sam(tiny_models):
    from xmgie.mgie_core.models import sam as sam_lib

    return sam_lib.load_sam(str(tiny_models("sam")), device="cpu")


@pytest.fixture(scope="module")
def masks():
    from xmgie.mgie_core import masks

    return masks


def _image(h=96, w=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(1, h, w, 3, generator=g) * 0.3
    img[:, 24:72, 40:100] += 0.6
    return img.clamp(0, 1)


# --- the map and the mask -----------------------------------------------------------

def test_mask_size_and_values(sd, masks):
    img = _image()                                   # non-square: 96x128, latents 12x16
    mask, amap = masks.attention_mask(sd, img, PROMPT, "cat", threshold=0.5)
    assert mask.shape == amap.shape == (96, 128)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert 0 < mask.sum() < mask.numel()
    assert amap.dtype == torch.float32 and amap.min() >= 0 and amap.max() <= 1
    assert torch.equal(mask, (amap > 0.5).float())
    # [H,W,3] input is accepted as one image
    assert torch.equal(masks.attention_map(sd, img[0], PROMPT, "cat"), amap)


def test_deterministic_for_a_seed(sd, masks):
    img = _image()
    a = masks.attention_map(sd, img, PROMPT, "cat", seed=3)
    b = masks.attention_map(sd, img, PROMPT, "cat", seed=3)
    c = masks.attention_map(sd, img, PROMPT, "cat", seed=4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_layers_at_factor_4(sd, masks):
    assert masks.map_layers(sd.unet) == TINY_FACTOR4
    from xmgie.mgie_core import attention
    from xmgie.mgie_core.diffusion import encode_prompt

    z = torch.randn(2, 4, 12, 16)
    maps = masks.capture_maps(sd, z, [501, 701], encode_prompt(sd, PROMPT),
                              masks.map_layers(sd.unet))
    assert sorted(maps) == TINY_FACTOR4
    heads = sd.unet.down_blocks[2].attentions[0].transformer_blocks[0].attn2.heads
    for probs in maps.values():
        assert probs.shape == (2, heads, 3 * 4, 77)             # 12x16 latent / 4
    # the controller is left as found
    ctl = attention.install(sd.unet)
    assert ctl.hooks == [] and ctl.context is None


def test_sd15_layers_are_the_five_16x16_maps(masks):
    from diffusers import UNet2DConditionModel

    from xmgie.mgie_core.architecture import architecture_of
    from xmgie.mgie_core.attention import attention_layers

    with torch.device("meta"):   # structure only, no weights
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
            attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    assert masks.map_layers(unet) == [
        "down_blocks.2.attentions.0.transformer_blocks.0.attn2",
        "down_blocks.2.attentions.1.transformer_blocks.0.attn2",
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
        "up_blocks.1.attentions.1.transformer_blocks.0.attn2",
        "up_blocks.1.attentions.2.transformer_blocks.0.attn2"]
    # and the 8x8 / 32x32 / 64x64 layers are at factors 8 / 2 / 1
    assert {architecture_of(unet).factor(l.name) for l in attention_layers(unet)
            if l.is_cross} == {1, 2, 4, 8}


def _reference_raw(sd, img, prompt, word_pos, t, seed):
    """Independent recomputation for one timestep: own noising, own hook, own UNet call,
    mean over heads / layers / tokens by hand. Returns the raw (un-normalised) map."""
    from xmgie.mgie_core import attention, attention_hooks, vae
    from xmgie.mgie_core.diffusion import encode_prompt

    z0 = vae.encode(sd, img).samples
    abar = float(sd.scheduler.alphas_cumprod[t])
    noise = torch.randn((1,) + tuple(z0.shape[1:]), generator=torch.Generator().manual_seed(seed))
    zt = abar ** 0.5 * z0 + (1 - abar) ** 0.5 * noise
    ctl = attention.install(sd.unet)
    hook = attention_hooks.CaptureHook(TINY_FACTOR4, rows=[("x", attention.COND)])
    ctl.hooks = [hook]
    ctl.reset_call(attention.AttnContext(0, 1, attention.BatchLayout((("x", attention.COND),)),
                                         tuple(zt.shape[-2:])))
    try:
        with torch.no_grad():
            sd.unet(zt, torch.tensor([t]), encoder_hidden_states=encode_prompt(sd, prompt))
    finally:
        ctl.hooks = []
        ctl.reset_call(None)
    h, w = z0.shape[-2] // 4, z0.shape[-1] // 4
    total = torch.zeros(h, w)
    for name in TINY_FACTOR4:
        p = hook.maps[name][0]                                  # (heads, HW, 77)
        acc = torch.zeros(h * w)
        for head in range(p.shape[0]):
            for k in word_pos:
                acc += p[head, :, k]
        total += (acc / (p.shape[0] * len(word_pos))).view(h, w)
    return total / len(TINY_FACTOR4)


def _finish(raw, size):
    m = (raw - raw.min()) / (raw.max() - raw.min())
    return F.interpolate(m[None, None], size=size, mode="bicubic",
                         align_corners=False)[0, 0].clamp(0, 1)


def test_map_equals_independent_recomputation(sd, masks):
    img = _image()
    pos = masks.word_tokens(sd, PROMPT, "cat")
    assert pos == [5]                                          # BOS a photo of a cat
    got = masks.attention_map(sd, img, PROMPT, "cat", timesteps=(601,), seed=7)
    want = _finish(_reference_raw(sd, img, PROMPT, pos, 601, seed=7), (96, 128))
    assert torch.allclose(got, want, atol=1e-5)


def test_batched_timesteps_equal_separate_calls(sd, masks):
    """Per-row timesteps in one call == one call per timestep, averaged."""
    img, ts = _image(), (501, 701)
    pos = masks.word_tokens(sd, PROMPT, "cat")
    got = masks.attention_map(sd, img, PROMPT, "cat", timesteps=ts, seed=1)
    from xmgie.mgie_core import vae
    from xmgie.mgie_core.diffusion import encode_prompt

    # the batched call draws noise for both rows from one generator: replay it
    zt = masks.noised_latents(sd, vae.encode(sd, img).samples, ts, seed=1)
    emb = encode_prompt(sd, PROMPT)
    raws = []
    for i, t in enumerate(ts):
        maps = masks.capture_maps(sd, zt[i:i + 1], [t], emb, TINY_FACTOR4)
        raws.append(torch.stack([p[0][..., pos].mean(dim=(0, 2)) for p in maps.values()])
                    .mean(0).view(3, 4))
    want = _finish(torch.stack(raws).mean(0), (96, 128))
    assert torch.allclose(got, want, atol=1e-5)


def test_missing_word(sd, masks):
    from xmgie.mgie_core.errors import InputError

    with pytest.raises(InputError) as e:
        masks.attention_map(sd, _image(), PROMPT, "dog")
    assert "'dog'" in str(e.value) and PROMPT in str(e.value)
    assert e.value.input_name == "word"
    with pytest.raises(InputError):
        masks.attention_map(sd, _image(), PROMPT, "  ")


def test_bad_inputs(sd, masks):
    from xmgie.mgie_core.errors import InputError

    with pytest.raises(InputError, match="instruction UNet"):
        masks.attention_map(types.SimpleNamespace(instruct=True), _image(), PROMPT, "cat")
    with pytest.raises(InputError, match="timesteps"):
        masks.attention_map(sd, _image(), PROMPT, "cat", timesteps=(1000,))
    with pytest.raises(InputError, match="threshold"):
        masks.attention_mask(sd, _image(), PROMPT, "cat", threshold=1.0)
    with pytest.raises(InputError, match="batch"):
        masks.attention_map(sd, torch.cat([_image()] * 2), PROMPT, "cat")


def test_capture_does_not_change_eps(sd, masks):
    from xmgie.mgie_core import attention, attention_hooks
    from xmgie.mgie_core.diffusion import encode_prompt, unet_eps

    z = torch.randn(1, 4, 12, 16, generator=torch.Generator().manual_seed(0))
    emb = encode_prompt(sd, PROMPT)
    ctl = attention.install(sd.unet)
    with torch.no_grad():
        plain = unet_eps(sd, z, 601, emb)
        hook = attention_hooks.CaptureHook(TINY_FACTOR4)
        ctl.hooks = [hook]
        ctl.reset_call(attention.AttnContext(0, 1, attention.BatchLayout(
            (("x", attention.COND),)), (12, 16)))
        try:
            captured = unet_eps(sd, z, 601, emb)
            explicit = set(ctl.explicit_layers)
        finally:
            ctl.hooks = []
            ctl.reset_call(None)
    assert sorted(explicit) == sorted(hook.maps) == TINY_FACTOR4   # probs were computed
    assert torch.allclose(plain, captured, atol=1e-5)


# --- boxes and SAM ------------------------------------------------------------------

def test_mask_bbox(masks):
    from xmgie.mgie_core.errors import InputError

    m = torch.zeros(40, 60)
    m[10:20, 5:31] = 1
    m[25, 40] = 1
    assert masks.mask_bbox(m) == (5, 10, 41, 26)
    assert masks.mask_bbox(m[None]) == (5, 10, 41, 26)
    with pytest.raises(InputError, match="empty"):
        masks.mask_bbox(torch.zeros(40, 60))


def test_sam_refinement(sd, sam, masks):
    img = _image()
    mask = masks.attention_mask_sam(sd, sam, img, PROMPT, "cat", threshold=0.5)
    assert mask.shape == (96, 128)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}


# --- node ---------------------------------------------------------------------------

def test_node(sd, sam):
    from xmgie.nodes import masks as node_masks

    (cls,) = node_masks.NODES
    assert cls.NODE_ID == "XMGIEAttentionMask"
    assert cls.DISPLAY_NAME == "xMGIE Attention Mask" and cls.CATEGORY == "xmgie/masks"
    assert cls.DESCRIPTION
    spec = cls.INPUT_TYPES()
    for group in spec.values():
        for name, (_, opts) in group.items():
            assert opts.get("tooltip"), name
    assert list(spec["optional"]) == ["sam", "plan"]

    img = _image()
    before = img.clone()
    node = cls()
    mask, preview = getattr(node, cls.FUNCTION)(sd, img, PROMPT, "cat", 0.5, 0)
    assert torch.equal(img, before)
    assert mask.shape == (1, 96, 128) and preview.shape == (1, 96, 128, 3)
    assert preview.min() >= 0 and preview.max() <= 1
    mask2, _ = getattr(node, cls.FUNCTION)(sd, img, PROMPT, "cat", 0.5, 0, sam=sam)
    assert mask2.shape == (1, 96, 128)
    assert set(mask2.unique().tolist()) <= {0.0, 1.0}
