"""Every stage on SDXL and SD 2.x (docs/algorithms.md sections 0 and 2-8): on the tiny
SDXL the properties the SD 1.5 tests pin (inversions, CAM under injection, MAG's and
A-STAR's losses by hand on SDXL's maps, PFB at its sites, each control's updates), on
the tiny SD 2.x (768-v) an inversion that reconstructs through the sampler with
v-prediction, and the instruction sampler on the tiny SDXL InstructPix2Pix.

The tiny SDXL has SDXL's levels at a small width: a 128 px image gives a 16x16 latent
and levels 16, 8 and 4 (SDXL at 1024 px: 128, 64, 32); attention only at levels 1 and 2;
transformer depths 1 and 2 where SDXL has 2 and 10."""

from __future__ import annotations

import pytest
import torch
from test_editing import _layout, _one_call
from test_published_methods import SRC, STEPS, TGT, _MapCapture, _rows, _SiteCapture

from xmgie.mgie_core import (
    attention,
    attention_hooks,
    diffusion,
    guidance,
    inversion,
    pfb,
    sampler,
    vae,
)
from xmgie.mgie_core import identity_guidance as idg
from xmgie.mgie_core.architecture import SDXL, architecture_of, layer_hw
from xmgie.mgie_core.astar import AStarControl
from xmgie.mgie_core.attention import MaskPyramid
from xmgie.mgie_core.errors import InputError
from xmgie.mgie_core.mag import MAGControl
from xmgie.mgie_core.models import identity as id_lib
from xmgie.mgie_core.models import sd as sdm
from xmgie.mgie_core.tokens import find_word_tokens, word_token_groups


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl):
    return tiny_sdxl   # shared session model: these tests change no weights


@pytest.fixture(scope="module")
def z0(sdxl, image):
    return vae.encode(sdxl, image).samples


@pytest.fixture(scope="module")
def inv(sdxl, z0):
    """The photo's negative-prompt inversion, as the SD 1.5 suite's fixture."""
    return inversion.invert(sdxl, z0, SRC, method="negative_prompt", steps=STEPS,
                            image_size=(128, 128))


# --- inversions ------------------------------------------------------------------------

def test_sdxl_ddim_inversion_is_the_stepwise_reference_with_sdxls_added_conditioning(sdxl,
                                                                                       z0):
    """Guidance 1, source prompt only: the trajectory equals DDIM steps through the UNet
    called by hand as diffusers' SDXL pipeline calls it (both encoders' penultimate
    states, the pooled embedding and the six time ids as added conditioning)."""
    res = inversion.invert(sdxl, z0, SRC, method="ddim", steps=STEPS)
    sch = diffusion.make_schedule(sdxl, STEPS)
    ids = [sdxl.tokenizer(SRC, padding="max_length", max_length=77, return_tensors="pt"),
           sdxl.tokenizer_2(SRC, padding="max_length", max_length=77, return_tensors="pt")]
    with torch.no_grad():
        first = sdxl.text_encoder(ids[0].input_ids, output_hidden_states=True)
        second = sdxl.text_encoder_2(ids[1].input_ids, output_hidden_states=True)
    tokens = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], -1)
    added = {"text_embeds": second.text_embeds,
             "time_ids": torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]])}
    z, expected = z0.clone().double(), [z0.clone().double()]
    with torch.no_grad():
        for i in reversed(range(STEPS)):
            t = sch.t(i)
            eps = sdxl.unet(z.float(), t, encoder_hidden_states=tokens,
                            added_cond_kwargs=added).sample.double()
            a_from, a_to = sch.abar(sch.prev_t(i)), sch.abar(t)
            z = a_to ** 0.5 * (z - (1 - a_from) ** 0.5 * eps) / a_from ** 0.5 \
                + (1 - a_to) ** 0.5 * eps
            expected.append(z)
    torch.testing.assert_close(res.latents, torch.stack(expected[::-1]).float(),
                               atol=2e-4, rtol=1e-4)


def _as_v_prediction(sd):
    """The same model read as a v-prediction one (a copy sharing the modules): a random
    UNet read as v gives eps = sqrt(abar) v + sqrt(1 - abar) x_t, which follows the
    latent at high noise as a trained denoiser's does. Read as epsilon, a random UNet's
    output is unrelated to the noise in x_t, and a DDIM round trip through t = 981 does
    not come back on the tiny SDXL (relative error 0.6-1.9 for 20-50 steps, measured);
    the SD 1.5 suite checks its epsilon model's trajectory step by step instead, as the
    test above does on SDXL."""
    import dataclasses

    config = {**sd.scheduler.config, "prediction_type": "v_prediction"}
    return dataclasses.replace(sd, scheduler=sdm.ddim_scheduler(config))


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_ddim_inversion_reconstructs_through_the_sampler_with_v_prediction(tiny_sd2, sdxl,
                                                                          family):
    """Invert with DDIM, sample back with the same prompt at guidance 1: the two-branch
    sampler's reconstruction comes back to the latent, closer with more steps, on the
    tiny SD 2.x (768-v) and on the tiny SDXL read as v-prediction (SDXL's conditioning,
    time ids and v turned into epsilon, the path of SDXL v-prediction fine-tunes); the
    edit branch with the same prompt equals the reconstruction."""
    sd = tiny_sd2 if family == "sd2" else _as_v_prediction(sdxl)
    assert sd.prediction_type == "v_prediction"
    assert sd.family == {"sd2": "SD 2.x", "sdxl": "SDXL"}[family]
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    errors = []
    for steps in (10, 20):
        inv_ = inversion.invert(sd, z, SRC, method="ddim", steps=steps)
        res = sampler.edit(sd, inv_, SRC, guidance_scale=1.0, cross_replace=0.0,
                           self_replace=0.0)
        errors.append((res.reconstruction - z).abs().mean().item() / z.abs().mean().item())
        assert torch.equal(res.edit, res.reconstruction)
    # measured (1 and 2 threads): SD 2.x 0.079, 0.042; SDXL 0.086, 0.046
    assert errors[1] < 0.1 and errors[1] < 0.7 * errors[0], errors
    # direct inversion on the same model is exact whatever the guidance
    direct = inversion.invert(sd, z, SRC, method="direct", steps=STEPS)
    back = sampler.edit(sd, direct, TGT)
    torch.testing.assert_close(back.reconstruction, z, atol=1e-5, rtol=0)


def test_sdxl_direct_inversion_is_exact_on_the_photo(sdxl, z0):
    inv_d = inversion.invert(sdxl, z0, SRC, method="direct", steps=STEPS,
                             image_size=(128, 128))
    res = sampler.edit(sdxl, inv_d, TGT, mask=torch.ones(1, 128, 128),
                       cam=sampler.CAMSettings(["yellow"]))
    torch.testing.assert_close(res.reconstruction, z0, atol=1e-5, rtol=0)


def _reconstruction_error(sd, inv_, z):
    res = sampler.edit(sd, inv_, inv_.source_prompt, cross_replace=0.0, self_replace=0.0)
    return (res.reconstruction - z).abs().mean().item()


def test_sdxl_null_text_converges_and_optimises_the_pooled_row(sdxl, z0):
    """The optimised embedding is the packed conditioning: its 77 token rows and the
    pooled row (row 77) both move, the pooled row's zero padding stays zero, and the
    pooled row is part of what brings the reconstruction back (putting the empty
    prompt's pooled row back makes it worse)."""
    steps = 8
    ddim = inversion.invert(sdxl, z0, SRC, method="ddim", steps=steps)
    null = inversion.invert(sdxl, z0, SRC, method="null_text", steps=steps, inner_steps=20)
    e_ddim = _reconstruction_error(sdxl, ddim, z0)
    e_null = _reconstruction_error(sdxl, null, z0)
    # measured 0.695 (1 and 2 threads); the tiny random UNet is chaotic under guidance
    assert e_null < 0.8 * e_ddim, (e_null, e_ddim)
    counts = null.updates.counts(inversion.NULL_TEXT)
    assert counts.applied > steps and counts.total_skipped == 0
    nulls, empty = null.null_embeddings, diffusion.encode_prompt(sdxl, "")
    width = diffusion.pooled_width(sdxl.unet)
    assert nulls.shape == (steps, 1, 78, empty.shape[-1]) and nulls.dtype == torch.float32
    assert (nulls[:, 0, 77, :width] - empty[0, 77, :width]).abs().amax(-1).min() > 1e-3
    assert (nulls[:, 0, :77] - empty[0, :77]).abs().amax((-2, -1)).min() > 1e-3
    assert torch.equal(nulls[:, 0, 77, width:], torch.zeros_like(nulls[:, 0, 77, width:]))
    reset = nulls.clone()
    reset[:, 0, 77] = empty[0, 77]
    e_reset = _reconstruction_error(
        sdxl, inversion.InversionResult(**{**null.__dict__, "null_embeddings": reset}), z0)
    assert e_null < e_reset, (e_null, e_reset)      # measured 1.44 against 1.85


def test_sdxl_negative_prompt_inversion_uses_the_packed_source_condition(sdxl, inv):
    cond = diffusion.encode_prompt(sdxl, SRC)
    assert inv.null_embeddings.shape == (STEPS, 1, 78, cond.shape[-1])
    assert torch.equal(inv.null_embeddings[2], cond)
    res = sampler.edit(sdxl, inv, SRC, cross_replace=0.0, self_replace=0.0)
    assert torch.equal(res.edit, res.reconstruction)


# --- prompt-to-prompt and CAM -------------------------------------------------------------

def _cross_layers(unet, prefixes=None):
    return [l.name for l in attention.attention_layers(unet)
            if l.is_cross and (prefixes is None or l.in_set(prefixes))]


def test_sdxl_layer_choices_are_read_from_the_architecture(sdxl, mask):
    arch = architecture_of(sdxl.unet)
    assert arch is SDXL
    # CAM: latent/4 (down_blocks.2, the middle, up_blocks.0) and two latent/2 layers
    cam = attention_hooks.CAMHook(mask, [5])
    assert cam.layers == attention_hooks.CAMHook.DEFAULT_LAYERS     # SD 1.x's until prepared
    cam.prepare("cpu", (16, 16), arch)
    assert cam.layers == SDXL.layers.cam_layers
    blocks = {n.split(".transformer_blocks")[0] for n in _cross_layers(sdxl.unet, cam.layers)}
    assert blocks == {"down_blocks.2.attentions.0", "down_blocks.2.attentions.1",
                      "mid_block.attentions.0", "up_blocks.0.attentions.0",
                      "up_blocks.0.attentions.1", "up_blocks.0.attentions.2",
                      "up_blocks.1.attentions.0", "up_blocks.1.attentions.1"}
    # MAG's and A-STAR's maps: every latent/4 layer of the down and up blocks
    maps = guidance.map_layers(sdxl.unet)
    assert maps == [n for n in _cross_layers(sdxl.unet)
                    if n.startswith(("down_blocks.2.", "up_blocks.0."))]
    assert arch.map_size((16, 16)) == (4, 4) and arch.map_size((128, 128)) == (32, 32)


def test_full_size_sdxl_layer_choices_are_the_documented_ones():
    """On SDXL base's own UNet config (built on the meta device: no weights): 70
    cross-attention layers; MAG's and A-STAR's 50 maps at 32x32 for 1024 px (the 10-deep
    transformers of down_blocks.2 and up_blocks.0), their truncated forward stopping in
    up_blocks.0; CAM's 64 layers; PFB's four sites at 32x32 (docs/algorithms.md §0)."""
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionModel.load_config(sdm.CONFIG_DIR.parent / "sdxl" / "unet")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    arch = architecture_of(unet)
    assert arch is SDXL
    assert len(_cross_layers(unet)) == 70
    maps = guidance.map_layers(unet)
    assert len(maps) == 50 and {SDXL.level(n) for n in maps} == {2}
    assert arch.map_size((128, 128)) == (32, 32)
    assert arch.last_in_execution(maps) == \
        "up_blocks.0.attentions.2.transformer_blocks.9.attn2"
    assert len(_cross_layers(unet, SDXL.layers.cam_layers)) == 64
    assert [(s.hook, s.module) for s in pfb.pfb_diff_sites(unet)] == SDXL_PFB_SITES


def test_sdxl_token_rules_address_the_77_token_rows(sdxl):
    """Prompt-to-prompt's alignment and replace matrix, and the words' positions, are
    over the 77 token rows (the keys of cross-attention), never the pooled row 77; both
    SDXL tokenizers put a word at the same positions, so one set of positions addresses
    both encoders' halves of each row."""
    ids = diffusion.token_ids(sdxl, SRC)
    assert len(ids) == 77 == diffusion.encode_prompt(sdxl, SRC).shape[1] - 1
    assert attention_hooks.token_alignment(ids, diffusion.token_ids(sdxl, TGT)).shape == (77,)
    assert attention_hooks.replace_mapper(sdxl.tokenizer, SRC, TGT).shape == (77, 77)
    words = ["red", "carpet", "room"]
    assert find_word_tokens(sdxl.tokenizer, SRC, words) == \
        find_word_tokens(sdxl.tokenizer_2, SRC, words)
    assert max(find_word_tokens(sdxl.tokenizer, SRC, words)) < 77


def test_sdxl_self_attention_injection_reaches_every_attention_level(sdxl, z0):
    """SDXL has no attention at the latent's own resolution, so "latent/2 and coarser"
    (P2P's 32x32 and below at 512 px) is every self-attention layer: the edit row's maps
    are the reconstruction's in all of them."""
    u, s, t = (diffusion.encode_prompt(sdxl, p) for p in ("", SRC, TGT))
    z = torch.cat([z0] * 4)
    z[3] = z[3] + 0.1 * torch.randn_like(z[3])
    inj = attention_hooks.InjectionHook(torch.arange(77), cross_steps=0, self_steps=1)
    inj.prepare("cpu", (16, 16), SDXL)
    names = [l.name for l in attention.attention_layers(sdxl.unet) if not l.is_cross]
    cap = attention_hooks.CaptureHook(names, rows=[("rec", "cond"), ("edit", "cond")],
                                      cross=False)
    _one_call(sdxl, [inj, cap], z, torch.cat([u, u, s, t]), _layout())
    assert len(cap.maps) == len(names) == 17          # 2 + 4 down, 2 middle, 6 + 3 up
    for name in names:
        rec, edit = cap.maps[name]
        assert torch.equal(rec, edit), name
    # a map side stated at 512 px (self_max_res 16: latent/4 and coarser) leaves latent/2
    only4 = attention_hooks.InjectionHook(torch.arange(77), 0, 1, self_max_res=16)
    only4.prepare("cpu", (16, 16), SDXL)
    cap = attention_hooks.CaptureHook(names, rows=[("rec", "cond"), ("edit", "cond")],
                                      cross=False)
    _one_call(sdxl, [only4, cap], z, torch.cat([u, u, s, t]), _layout())
    for name in names:
        rec, edit = cap.maps[name]
        assert torch.equal(rec, edit) == (SDXL.level(name) == 2), name
    with pytest.raises(InputError, match="self_max_res"):
        attention_hooks.InjectionHook(torch.arange(77), 0, 1, self_max_res=0)


@pytest.mark.parametrize("mode", ["logits", "probs"])
def test_sdxl_cam_holds_under_injection(sdxl, inv, mask, mode):
    """As on SD 1.5 (test_published_methods): CAM words also in the source prompt are
    injected from the reconstruction, and CAM still zeroes their mass on the wrong side,
    in SDXL's CAM layers (the architecture's, the sampler's default); the maps have the
    77 token keys (the pooled row is no key)."""
    in_tok = find_word_tokens(sdxl.tokenizer, TGT, ["carpet"])
    out_tok = find_word_tokens(sdxl.tokenizer, TGT, ["room"])
    layers = _cross_layers(sdxl.unet, SDXL.layers.cam_layers)
    others = [n for n in _cross_layers(sdxl.unet) if n not in layers]
    cap = _MapCapture(layers + others)
    sampler.edit(sdxl, inv, TGT, mask=mask, controls=[cap],
                 cam=sampler.CAMSettings(["carpet"], ["room"], mode))
    pyr = MaskPyramid(mask)
    inside_total = 0.0
    for name in layers:
        p = cap.hook.maps[name][0]                                   # (heads, HW, 77)
        assert p.shape[-1] == 77
        m = pyr.at(layer_hw((16, 16), p.shape[1]), p.device).flatten()
        assert p[:, m > 0.5][..., out_tok].sum() == 0, name
        assert p[:, m < 0.5][..., in_tok].sum() == 0, name
        inside_total += float(p[:, m > 0.5][..., in_tok].sum())
        if mode == "logits":
            torch.testing.assert_close(p.sum(-1), torch.ones_like(p.sum(-1)))
    assert inside_total > 0
    # the layers outside CAM's (down_blocks.1, the third latent/2 up layer) are not masked
    assert others and all(cap.hook.maps[n][0][..., in_tok].sum() > 0 for n in others)


# --- MAG and A-STAR: their losses by hand on SDXL's maps ---------------------------------

def _inside(mask, hw):
    return MaskPyramid(mask).at(hw, "cpu")[0].flatten() > 0.5


def test_sdxl_mag_loss_is_its_formula_on_the_sdxl_maps(sdxl, inv, mask, monkeypatch):
    """Every loss MAG followed, recomputed from the maps it read: token ratio
    L_TR = sum_words sum_maps mean_h (1 - act_h)^2 / (n_maps n_words) with
    act_h = mean_{p in M} A_h(p, word) / sum_k A_h(p, k), plus 5.5 x the negative words'
    mean token ratio; the maps are SDXL's latent/4 maps (4x4 here, 32x32 at 1024 px)."""
    seen = []
    real = MAGControl.loss

    def recording(self, maps, latent_hw):
        loss, act = real(self, maps, latent_hw)
        seen.append(({k: v.detach().clone() for k, v in maps.items()}, loss.detach()))
        return loss, act

    monkeypatch.setattr(MAGControl, "loss", recording)
    ctl = MAGControl(words=["yellow", "carpet"], negative_words=["room"], iterations=2)
    res = sampler.edit(sdxl, inv, TGT, mask=mask, controls=[ctl])
    n_opt = round(ctl.opt_fraction * STEPS)
    assert len(seen) == n_opt * 2 and res.report.counts("MAG").applied == n_opt * 2
    groups = word_token_groups(sdxl.tokenizer, TGT, ["yellow", "carpet"])
    neg = word_token_groups(sdxl.tokenizer, TGT, ["room"])
    inside = _inside(mask, (4, 4))
    assert 0 < inside.sum() < 16

    def act(A, g):                                   # (heads,)
        ratio = A[..., g].mean(-1) / A.sum(-1)
        return ratio[:, inside].mean(-1)

    for maps, loss in seen:
        assert list(maps) == guidance.map_layers(sdxl.unet)
        assert all(A.shape[1:] == (16, 77) for A in maps.values())
        tr = sum(((1 - act(A, g)) ** 2).mean() for A in maps.values() for g in groups)
        tr = tr / (len(maps) * len(groups))
        nterm = torch.stack([act(A, g).mean() for A in maps.values() for g in neg]).mean()
        torch.testing.assert_close(loss, tr + 5.5 * nterm, atol=1e-6, rtol=1e-5)


def test_sdxl_astar_losses_are_their_formulas_on_the_sdxl_maps(sdxl, inv, mask,
                                                               monkeypatch):
    """Segregation and retention recomputed from the maps A-STAR read: each concept's map
    averaged over heads, layers and tokens and divided by its peak;
    L_seg = sum_{m>n} sum min(A_m, A_n) / sum (A_m + A_n); L_ret = sum_m [1 - sum
    min(A_m, B_m) / sum (A_m + B_m)] with B_m = [A_m(previous step) >= 0.5 max]."""
    seen = []
    real = guidance.edit_maps

    def recording(run, z, step, layers, *args, **kwargs):
        maps = real(run, z, step, layers, *args, **kwargs)
        seen.append((step, {k: v.detach().clone() for k, v in maps.items()}))
        return maps

    monkeypatch.setattr(guidance, "edit_maps", recording)
    ctl = AStarControl(words=["yellow", "room"], steps_fraction=0.75)
    res = sampler.edit(sdxl, inv, TGT, mask=mask, controls=[ctl])
    n_opt = round(0.75 * STEPS)
    assert [s for s, _ in seen] == list(range(n_opt))
    assert res.report.counts("A-STAR").applied == n_opt
    groups = word_token_groups(sdxl.tokenizer, TGT, ["yellow", "room"])
    prev = None
    for (step, maps), rec in zip(seen, ctl.history):
        assert list(maps) == guidance.map_layers(sdxl.unet) and rec["step"] == step
        per_layer = [torch.stack([A.mean(0)[:, g].mean(-1) for g in groups])
                     for A in maps.values()]
        A = torch.stack(per_layer).mean(0).reshape(len(groups), 4, 4)
        A = A / A.amax((-2, -1), keepdim=True)
        seg = torch.minimum(A[0], A[1]).sum() / (A[0] + A[1]).sum()
        assert rec["seg"] == pytest.approx(float(seg), rel=1e-5, abs=1e-7)
        if prev is None:
            assert rec["ret"] == 0
        else:
            B = (prev >= 0.5 * prev.amax((-2, -1), keepdim=True)).float()
            ret = sum(1 - torch.minimum(A[m], B[m]).sum() / (A[m] + B[m]).sum()
                      for m in range(2))
            assert rec["ret"] == pytest.approx(float(ret), rel=1e-5, abs=1e-7)
        prev = A


def test_sdxl_half_precision_unet_keeps_what_is_optimised_float32(sdxl, z0, mask,
                                                                 monkeypatch):
    """A bf16 SDXL UNet (CPU has no fast fp16): null-text's packed embedding (tokens and
    pooled row) and MAG's latent and loss stay float32, their updates all applied."""
    import copy
    import dataclasses

    half = dataclasses.replace(sdxl, unet=copy.deepcopy(sdxl.unet).to(torch.bfloat16),
                               dtype=torch.bfloat16)
    null = inversion.invert(half, z0, SRC, method="null_text", steps=STEPS, inner_steps=2)
    nulls = null.null_embeddings
    assert nulls.dtype == torch.float32 and torch.isfinite(nulls).all()
    assert null.updates.counts(inversion.NULL_TEXT).applied == 2 * STEPS
    empty = diffusion.encode_prompt(sdxl, "")
    assert (nulls[-1, 0, 77] - empty[0, 77]).abs().max() > 0
    seen = {}
    real = MAGControl.loss

    def probe(self, maps, latent_hw):
        total, act = real(self, maps, latent_hw)
        seen["loss"], seen["map"] = total.dtype, next(iter(maps.values())).dtype
        return total, act

    monkeypatch.setattr(MAGControl, "loss", probe)
    res = sampler.edit(half, null, TGT, mask=mask,
                       controls=[MAGControl(words=["yellow"], iterations=2)])
    assert seen == {"loss": torch.float32, "map": torch.bfloat16}
    assert res.edit.dtype == torch.float32 and torch.isfinite(res.edit).all()
    assert res.report.counts("MAG").applied == 2 * 2


# --- PFB ------------------------------------------------------------------------------------

SDXL_PFB_SITES = [("input", "down_blocks.2.resnets.1"), ("input", "mid_block"),
                  ("output", "up_blocks.0.attentions.0"), ("output", "up_blocks.0.attentions.1")]


def test_sdxl_pfb_blends_at_the_documented_sites(sdxl, inv, mask):
    """The sites pfb.py documents for SDXL (latent/4 only: SDXL has no latent/8), each
    blended h = m h_edit + (1 - m) h_ref in every step and guidance half, the
    reconstruction rows untouched."""
    sites = pfb.pfb_diff_sites(sdxl.unet, "object")
    assert [(s.hook, s.module) for s in sites] == SDXL_PFB_SITES
    assert [(s.hook, s.module) for s in pfb.pfb_diff_sites(sdxl.unet, "background")] == \
        [("input", "down_blocks.2.resnets.0")] + SDXL_PFB_SITES
    before, after = _SiteCapture(sites), _SiteCapture(sites)
    ctl = pfb.PFBControl(mask[0], latent_blend=False)
    sampler.edit(sdxl, inv, TGT, controls=[before, ctl, after])
    m = MaskPyramid(mask).at((4, 4), "cpu")[:, None]
    assert 0 < m.mean() < 1
    checked = 0
    for step in range(STEPS):
        for s in sites:
            (lay, hb), = before.get(step, s.module)
            (_, ha), = after.get(step, s.module)
            assert hb.shape[-2:] == (4, 4)
            if s.ref == "mid_output":
                hr = _rows(after.get(step, "mid_block#out")[0][1], lay, "rec", "cond")
            else:
                hr = _rows(hb, lay, "rec", "cond")
            for half in ("uncond", "cond"):
                torch.testing.assert_close(_rows(ha, lay, "edit", half),
                                           m * _rows(hb, lay, "edit", half) + (1 - m) * hr,
                                           atol=2e-5, rtol=1e-5)
                assert torch.equal(_rows(ha, lay, "rec", half), _rows(hb, lay, "rec", half))
                checked += 1
    assert checked == STEPS * len(sites) * 2
    # the block_outputs placement names SDXL's blocks (the architecture's preset)
    out = pfb.PFBControl(mask[0], placement="block_outputs")
    sampler.edit(sdxl, inv, TGT, controls=[out])
    assert [s.module for s in out.sites] == ["down_blocks.2", "mid_block", "up_blocks.0"]


# --- every control in one run: its updates counted -------------------------------------

@pytest.mark.parametrize("family", ["sdxl", "sd2"])
def test_every_control_applies(sdxl, inv, tiny_sd2, mask, tiny_models, image, family):
    """CAM, injection, PFB, MAG, A-STAR and identity guidance chained on the tiny SDXL
    and the tiny SD 2.x (v-prediction): each optimising control's updates are all
    applied (counted in the run's report)."""
    sd = sdxl if family == "sdxl" else tiny_sd2
    if family == "sd2":
        inv = inversion.invert(sd, vae.encode(sd, image).samples, SRC,
                               method="negative_prompt", steps=STEPS, image_size=(128, 128))
    encoder = id_lib.load_clip_vision(str(tiny_models("clip_vision")), device="cpu")
    emb = idg.embed_identity(encoder, image, mask)
    mag = MAGControl(words=["yellow"], iterations=2)
    star = AStarControl(words=["yellow", "carpet"])
    ident = idg.IdentityGuidance(encoder, emb, start=0.25, end=0.75)
    blend = pfb.PFBControl()
    res = sampler.edit(sd, inv, TGT, mask=mask, cam=sampler.CAMSettings(["yellow"]),
                       controls=[blend, mag, star, ident])
    counts = {name: res.report.counts(name) for name in ("MAG", "A-STAR",
                                                         "identity guidance")}
    assert counts["MAG"].applied == 2 * 2 and counts["A-STAR"].applied == 2
    assert counts["identity guidance"].applied == 2
    assert all(c.total_skipped == 0 for c in counts.values()), counts
    assert torch.isfinite(res.edit).all() and blend.sites
    assert all(h["loss"] > 0 for h in ident.history) and len(mag.history) == 4


# --- the instruction sampler on SDXL InstructPix2Pix -------------------------------------

@pytest.fixture(scope="module")
def ip2p_xl(tiny_sdxl_ip2p):
    return tiny_sdxl_ip2p


def test_instruction_sampler_on_tiny_sdxl_ip2p(ip2p_xl, image, mask):
    """Diffusers' SDXL InstructPix2Pix layout (8 input channels, two text encoders): the
    three-way guidance with its image latent (unscaled), word CAM batched and unbatched,
    whole-condition CAM (the keys [cond; null] of the packed conditioning: 154 token rows
    and one pooled row) and PFB on the reference branch."""
    ip = ip2p_xl
    assert ip.instruct and ip.family == "SDXL"
    mode = vae.encode(ip, image)
    img = mode.samples / ip.vae.config.scaling_factor
    cond = sampler.encode_instruction(ip, "make the carpet yellow")
    assert cond.cond.shape[1] == cond.null.shape[1] == 78
    kw = dict(steps=3, seed=3, mask=mask, source_latent=mode.samples)
    cam = sampler.CAMSettings(["yellow"])
    a = sampler.edit_instruct(ip, img, cond, cam=cam, controls=[pfb.PFBControl()], **kw)
    b = sampler.edit_instruct(ip, img, cond, cam=cam, controls=[pfb.PFBControl()],
                              batched=False, **kw)
    torch.testing.assert_close(a.edit, b.edit, atol=1e-4, rtol=1e-4)
    plain = sampler.edit_instruct(ip, img, cond, **kw)
    whole = sampler.edit_instruct(ip, img, cond, cam=sampler.CAMSettings(["*"]), **kw)
    assert torch.isfinite(whole.edit).all() and not torch.equal(whole.edit, plain.edit)
    # the whole-condition keys: the condition's tokens then the null's, one pooled row
    c2, n2, n = sampler._condition_cam_keys(ip, cond.cond, cond.null)
    assert n == 77 and c2.shape[1] == n2.shape[1] == 155
    assert torch.equal(c2[:, :77], cond.cond[:, :77]) and torch.equal(c2[:, 77:154],
                                                                      cond.null[:, :77])
    assert torch.equal(c2[:, 154], cond.cond[:, 77]) and torch.equal(n2[:, 154],
                                                                     cond.null[:, 77])


def test_instruction_guidance_formula_on_sdxl_ip2p(ip2p_xl, image):
    """eps = e_u + s_T (e_text - e_img) + s_I (e_img - e_u), rows [cond, img], [null, img],
    [null, 0], as on SD 1.5's InstructPix2Pix."""
    ip = ip2p_xl
    img = vae.encode(ip, image).samples / ip.vae.config.scaling_factor
    cond = sampler.encode_instruction(ip, "make it snow")
    res = sampler.edit_instruct(ip, img, cond, steps=1, seed=5, text_scale=3.0,
                                image_scale=2.0, scheduler="ddim")
    sch = diffusion.make_schedule(ip, 1)
    noise = torch.randn(img.shape, generator=torch.Generator().manual_seed(5))
    t = sch.t(0)
    with torch.no_grad():
        et = diffusion.unet_eps(ip, torch.cat([noise, img], 1), t, cond.cond)
        ei = diffusion.unet_eps(ip, torch.cat([noise, img], 1), t, cond.null)
        eu = diffusion.unet_eps(ip, torch.cat([noise, torch.zeros_like(img)], 1), t, cond.null)
    expected = diffusion.denoise_step(sch, 0, noise, eu + 3.0 * (et - ei) + 2.0 * (ei - eu))
    torch.testing.assert_close(res.edit, expected, atol=1e-4, rtol=1e-4)


def test_sd2_explicit_attention_scores_are_float32_under_a_half_precision_unet(tiny_sd2,
                                                                              mask):
    """SD 2.x asks for float32 attention scores (``upcast_attention``: its half-precision
    logits overflow); where a hook needs explicit maps (CAM, injection, capture) they
    are computed, masked and read in float32, and CAM still holds."""
    import copy
    import dataclasses

    assert tiny_sd2.unet.config.upcast_attention
    unet = copy.deepcopy(tiny_sd2.unet).to(torch.bfloat16)
    sd = dataclasses.replace(tiny_sd2, unet=unet, dtype=torch.bfloat16)
    u, s, t = (diffusion.encode_prompt(tiny_sd2, p) for p in ("", SRC, TGT))
    z = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    in_tok = find_word_tokens(sd.tokenizer, TGT, ["yellow"])
    cam = attention_hooks.CAMHook(mask, in_tok, mode="probs")
    cam.prepare("cpu", (16, 16), architecture_of(unet))
    layers = _cross_layers(unet, cam.layers)
    cap = attention_hooks.CaptureHook(layers, rows=[("edit", "cond")])
    out = _one_call(sd, [cam, cap], z, torch.cat([u, u, s, t]), _layout())
    assert torch.isfinite(out).all()
    pyr = MaskPyramid(mask)
    for name in layers:
        p = cap.maps[name][0]
        assert p.dtype == torch.float32, name
        m = pyr.at(layer_hw((16, 16), p.shape[1]), p.device).flatten()
        assert p[:, m < 0.5][..., in_tok].sum() == 0, name


def test_sdxl_ip2p_matches_diffusers_sdxl_instructpix2pix_pipeline(ip2p_xl, image):
    """The instruction sampler on the tiny SDXL InstructPix2Pix gives, with the same seed,
    what diffusers' StableDiffusionXLInstructPix2PixPipeline gives (Euler ancestral, the
    image latent unscaled, both encoders' penultimate states, the pooled embedding and
    the size time ids), with an empty negative prompt encoded as the null condition
    (the pipeline's default replaces it by zeros)."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionXLInstructPix2PixPipeline

    ip = ip2p_xl
    prompt, seed, steps = "make the carpet yellow", 7, 4
    x = image.permute(0, 3, 1, 2)
    with torch.no_grad():
        img_latent = ip.vae.encode(x * 2 - 1).latent_dist.mode()
    pipe = StableDiffusionXLInstructPix2PixPipeline(
        vae=ip.vae, text_encoder=ip.text_encoder, text_encoder_2=ip.text_encoder_2,
        tokenizer=ip.tokenizer, tokenizer_2=ip.tokenizer_2, unet=ip.unet,
        scheduler=EulerAncestralDiscreteScheduler.from_config(ip.scheduler.config),
        add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(prompt, image=x, negative_prompt="", num_inference_steps=steps,
                    guidance_scale=7.5, image_guidance_scale=1.5,
                    generator=torch.Generator().manual_seed(seed),
                    output_type="latent").images
    res = sampler.edit_instruct(ip, img_latent, sampler.encode_instruction(ip, prompt),
                                steps=steps, seed=seed)
    torch.testing.assert_close(res.edit, expected, atol=1e-5, rtol=1e-5)
    other = sampler.edit_instruct(ip, img_latent, sampler.encode_instruction(ip, prompt),
                                  steps=steps, seed=seed + 1)
    assert (other.edit - expected).abs().max() > 1e-3
