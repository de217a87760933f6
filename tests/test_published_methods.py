"""Where the code follows the published methods exactly, each pinned against a
reference computed here independently: PFB-Diff's blend sites, dilation and reference
features; CAM under prompt-to-prompt injection; the scheduler's timestep spacing; P2P's
replace; Euler ancestral against diffusers' InstructPix2Pix pipeline; GB's kernel rule."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from xmgie.mgie_core import attention, attention_hooks, diffusion, inversion, pfb, sampler, vae
from xmgie.mgie_core.architecture import layer_hw
from xmgie.mgie_core.attention import MaskPyramid
from xmgie.mgie_core.control import Control
from xmgie.mgie_core.errors import InputError
from xmgie.mgie_core.models.sd import DDIM_SETTINGS, ddim_scheduler

SRC = "a photo of a red carpet in a room"
TGT = "a photo of a yellow carpet in a room"
STEPS = 4


@pytest.fixture(scope="module")
def sd(tiny_sd):
    return tiny_sd


@pytest.fixture(scope="module")
def mask():
    m = torch.zeros(1, 128, 128)
    m[:, 24:104, 40:120] = 1        # covers part of every feature resolution (16 .. 2)
    return m


@pytest.fixture(scope="module")
def z0(sd, image):
    return vae.encode(sd, image).samples


@pytest.fixture(scope="module")
def inv(sd, z0):
    return inversion.invert(sd, z0, SRC, method="negative_prompt", steps=STEPS,
                            image_size=(128, 128))


# --- 1. PFB blend sites --------------------------------------------------------------------

# The original LDM UNet of SD 1.x (what PFB-Diff's forward_fusion indexes), unit by unit,
# written out by hand: input block i starts with the module given, output block j ends
# with the module given, each with its resolution at 512 px.
LDM_INPUT = {1: ("down_blocks.0.resnets.0", 64), 2: ("down_blocks.0.resnets.1", 64),
             3: ("down_blocks.0.downsamplers.0", 64), 4: ("down_blocks.1.resnets.0", 32),
             5: ("down_blocks.1.resnets.1", 32), 6: ("down_blocks.1.downsamplers.0", 32),
             7: ("down_blocks.2.resnets.0", 16), 8: ("down_blocks.2.resnets.1", 16),
             9: ("down_blocks.2.downsamplers.0", 16), 10: ("down_blocks.3.resnets.0", 8),
             11: ("down_blocks.3.resnets.1", 8)}
LDM_OUTPUT_END = {0: ("up_blocks.0.resnets.0", 8), 1: ("up_blocks.0.resnets.1", 8),
                  2: ("up_blocks.0.upsamplers.0", 16), 3: ("up_blocks.1.attentions.0", 16),
                  4: ("up_blocks.1.attentions.1", 16), 5: ("up_blocks.1.upsamplers.0", 32),
                  6: ("up_blocks.2.attentions.0", 32), 7: ("up_blocks.2.attentions.1", 32),
                  8: ("up_blocks.2.upsamplers.0", 64), 9: ("up_blocks.3.attentions.0", 64),
                  10: ("up_blocks.3.attentions.1", 64), 11: ("up_blocks.3.attentions.2", 64)}
# fusion_layers of edit_coco_object.py / edit_coco_background.py
FUSION = {"object": dict(encoder=[8, 9, 10, 11, 12], decoder=[13, 14, 15, 16, 17]),
          "background": dict(encoder=[7, 8, 9, 10, 11, 12], decoder=[13, 14, 15, 16, 17])}


def pfb_diff_reference(preset):
    """forward_fusion: encoder index i blends the *input* of input block i (i <= 11; the
    loop never reaches 12); the middle blends its input with the reference's middle
    output; decoder index i blends the input of output block i - 12, i.e. the output of
    output block i - 13 (i = 12 would be the middle output)."""
    out = [("input", *LDM_INPUT[i]) for i in FUSION[preset]["encoder"] if i in LDM_INPUT]
    out.append(("input", "mid_block", 8))
    out += [("output", *LDM_OUTPUT_END[i - 13]) for i in FUSION[preset]["decoder"] if i >= 13]
    return out


def sd15_structure_unet():
    """SD 1.5's block structure (two layers per block) with tiny widths."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 32, 64, 64), norm_num_groups=8, cross_attention_dim=32,
        attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3).eval()


@pytest.mark.parametrize("preset", ["object", "background"])
def test_pfb_sites_are_pfb_diffs_on_sd15(preset):
    unet = sd15_structure_unet()
    sites = pfb.pfb_diff_sites(unet, preset)
    expected = pfb_diff_reference(preset)
    assert [(s.hook, s.module) for s in sites] == [(h, m) for h, m, _ in expected]
    assert all(s.ref == ("mid_output" if s.module == "mid_block" else "same") for s in sites)
    # resolutions measured in a forward pass at 64x64 latents (512 px)
    seen = {}
    mods = dict(unet.named_modules())
    handles = []

    def note(name, t):
        seen.setdefault(name, t.shape[-1])      # returns None: the hook changes nothing

    for s in sites:
        if s.hook == "input":
            handles.append(mods[s.module].register_forward_pre_hook(
                lambda m, a, s=s: note(s.module, a[0])))
        else:
            handles.append(mods[s.module].register_forward_hook(
                lambda m, a, o, s=s: note(s.module, o[0] if isinstance(o, tuple) else o)))
    with torch.no_grad():
        unet(torch.zeros(1, 4, 64, 64), 500, encoder_hidden_states=torch.zeros(1, 77, 32))
    for h in handles:
        h.remove()
    assert [seen[s.module] for s in sites] == [r for _, _, r in expected]
    assert [64 >> s.level for s in sites] == [seen[s.module] for s in sites]
    assert {seen[s.module] for s in sites} == {16, 8}


class _SiteCapture(Control):
    """Records what flows at each site (after the controls set up before this one)."""

    def __init__(self, sites, skips=()):
        self.sites, self.skips = sites, skips
        self.out: list = []
        self.handles: list = []

    def _rec(self, run, key, t):
        ctx = run.controller.context
        if ctx is not None:
            self.out.append((ctx.step, ctx.layout, key, t.detach().clone()))

    def _rec_all(self, run, name, tensors):
        for k, t in enumerate(tensors):
            self._rec(run, f"{name}#{k}", t)

    def setup(self, run):
        mods = dict(run.sd.unet.named_modules())
        for s in self.sites:
            if s.hook == "input":
                self.handles.append(mods[s.module].register_forward_pre_hook(
                    lambda m, a, s=s: self._rec(run, s.module, a[0])))
            else:
                self.handles.append(mods[s.module].register_forward_hook(
                    lambda m, a, o, s=s: self._rec(run, s.module,
                                                   o[0] if isinstance(o, tuple) else o)))
        for name in self.skips:        # a down block's skip tensors (its residual tuple)
            self.handles.append(mods[name].register_forward_hook(
                lambda m, a, o, name=name: self._rec_all(run, name, o[1])))
        self.handles.append(mods["mid_block"].register_forward_hook(
            lambda m, a, o: self._rec(run, "mid_block#out", o)))

    def teardown(self, run):
        for h in self.handles:
            h.remove()

    def get(self, step, key):
        return [(lay, t) for s, lay, k, t in self.out if s == step and k == key]


def _rows(t, layout, branch, half):
    b = t.shape[0] // len(layout)
    i = layout.index(branch, half)
    return t[i * b:(i + 1) * b]


@pytest.mark.parametrize("reference", ["cond", "per_half"])
def test_pfb_blends_inside_units_and_leaves_skips(sd, inv, mask, reference):
    sites = pfb.pfb_diff_sites(sd.unet, "object")
    before = _SiteCapture(sites, skips=("down_blocks.2", "down_blocks.3"))
    after = _SiteCapture(sites)
    ctl = pfb.PFBControl(mask[0], reference=reference, latent_blend=False)
    sampler.edit(sd, inv, TGT, controls=[before, ctl, after])
    pyr = MaskPyramid(mask)
    checked, partial = 0, set()
    for step in range(STEPS):
        for s in sites:
            (lay, hb), = before.get(step, s.module)
            (_, ha), = after.get(step, s.module)
            m = pyr.at(tuple(hb.shape[-2:]), hb.device)[:, None]
            if 0 < m.mean() < 1:
                partial.add(s.module)
            for half in ("uncond", "cond"):
                ref_half = "cond" if reference == "cond" else half
                if s.ref == "mid_output":
                    (_, mid_out), = after.get(step, "mid_block#out")
                    hr = _rows(mid_out, lay, "rec", ref_half)
                else:
                    hr = _rows(hb, lay, "rec", ref_half)
                he = _rows(hb, lay, "edit", half)
                torch.testing.assert_close(_rows(ha, lay, "edit", half),
                                           m * he + (1 - m) * hr, atol=2e-5, rtol=1e-5)
                assert torch.equal(_rows(ha, lay, "rec", half), _rows(hb, lay, "rec", half))
                checked += 1
        # skip connections are the edit's own features, saved before the blend: the
        # tiny UNet's down_blocks.2 keeps its attention output (= the unblended input of
        # its downsampler) and its downsampler output (= down_blocks.3's unblended input)
        (lay, skip0), = before.get(step, "down_blocks.2#0")
        (_, skip1), = before.get(step, "down_blocks.2#1")
        (_, in_down), = before.get(step, "down_blocks.2.downsamplers.0")
        (_, in_d3), = before.get(step, "down_blocks.3.resnets.0")
        (_, blended), = after.get(step, "down_blocks.2.downsamplers.0")
        assert torch.equal(skip0, in_down) and torch.equal(skip1, in_d3)
        assert not torch.equal(_rows(skip0, lay, "edit", "cond"),
                               _rows(blended, lay, "edit", "cond"))
    assert checked == STEPS * len(sites) * 2
    assert {"down_blocks.2.downsamplers.0", "up_blocks.1.attentions.0"} <= partial


def test_pfb_conditional_reference_in_unbatched_sampling(sd, inv, mask):
    """Unbatched, the unconditional call takes the conditional call's reference features
    of the same step: the result equals the batched one."""
    a = sampler.edit(sd, inv, TGT, mask=mask, controls=[pfb.PFBControl(mask[0])])
    b = sampler.edit(sd, inv, TGT, mask=mask, controls=[pfb.PFBControl(mask[0])],
                     batched=False)
    torch.testing.assert_close(a.edit, b.edit, atol=1e-4, rtol=1e-4)


def test_pfb_zero_mask_on_the_instruction_path(tiny_ip2p, image):
    ip = tiny_ip2p
    mode = vae.encode(ip, image)
    img = mode.samples / ip.vae.config.scaling_factor
    cond = sampler.encode_instruction(ip, "make the carpet yellow")
    sites = pfb.pfb_diff_sites(ip.unet, "object")
    cap = _SiteCapture([s for s in sites if s.ref == "same"])
    for scheduler in ("euler_ancestral", "ddim"):
        cap.out.clear()
        sampler.edit_instruct(ip, img, cond, steps=2, seed=3, source_latent=mode.samples,
                              controls=[pfb.PFBControl(torch.zeros(128, 128)), cap],
                              scheduler=scheduler)
        assert cap.out
        for _, lay, key, h in cap.out:
            if "#" in key:          # the mid block's output: not a site
                continue
            for half in ("cond", "img", "uncond"):
                assert torch.equal(_rows(h, lay, "edit", half), _rows(h, lay, "ref", "cond"))


def test_pfb_block_outputs_placement_is_an_option(sd, inv):
    blocks = ["down_blocks.2", "mid_block", "up_blocks.0", "up_blocks.1"]
    ctl = pfb.PFBControl(torch.zeros(128, 128), placement="block_outputs",
                         reference="per_half")
    sites = [pfb.Site(b, "output", 0) for b in blocks]
    cap = _SiteCapture(sites)
    sampler.edit(sd, inv, TGT, controls=[ctl, cap])
    out = [o for o in cap.out if "#" not in o[2]]
    assert len(out) == len(blocks) * STEPS
    for _, lay, name, h in out:
        for half in ("uncond", "cond"):
            assert torch.equal(_rows(h, lay, "edit", half), _rows(h, lay, "rec", half)), name
    with pytest.raises(InputError, match="blocks"):
        pfb.PFBControl(torch.zeros(128, 128), blocks=["mid_block"])
    with pytest.raises(InputError, match="reference"):
        pfb.PFBControl(torch.zeros(128, 128), reference="uncond")


# --- 2. background dilation ------------------------------------------------------------------

def cv2_dilate_reference(mask: np.ndarray, k: int) -> np.ndarray:
    """cv2.dilate(mask, ones((k, k))) by its definition: dst(y, x) = max of src over
    (y + dy, x + dx), dy, dx in [-anchor, k - 1 - anchor], anchor = k // 2; pixels outside
    the image do not count. Brute force over the k*k offsets."""
    h, w = mask.shape
    a = k // 2
    out = np.zeros_like(mask)
    for dy in range(-a, k - a):
        for dx in range(-a, k - a):
            ys, yd = (slice(dy, h), slice(0, h - dy)) if dy >= 0 else (slice(0, h + dy),
                                                                       slice(-dy, h))
            xs, xd = (slice(dx, w), slice(0, w - dx)) if dx >= 0 else (slice(0, w + dx),
                                                                       slice(-dx, w))
            out[yd, xd] = np.maximum(out[yd, xd], mask[ys, xs])
    return out


def test_background_dilation_is_a_36px_kernel():
    yy, xx = np.mgrid[0:512, 0:512]
    ellipse = (((yy - 250.5) / 140) ** 2 + ((xx - 270.5) / 90) ** 2 <= 1).astype(np.float32)
    ours = pfb.dilate(torch.from_numpy(ellipse)[None], 36)[0].numpy()
    ref = cv2_dilate_reference(ellipse, 36)
    assert np.array_equal(ours, ref)
    from scipy import ndimage  # a second reference: the same window, centre at k // 2
    assert np.array_equal(ours, ndimage.maximum_filter(ellipse, size=36, mode="constant"))
    added = int(ours.sum() - ellipse.sum())
    radius36 = torch.nn.functional.max_pool2d(torch.from_numpy(ellipse)[None, None], 73,
                                              stride=1, padding=36)[0, 0].numpy()
    assert added < 0.5 * (radius36.sum() - ellipse.sum())
    # the background preset uses it: mask = 1 - dilate(object, 36 px at 512)
    ctl = pfb.PFBControl(preset="background")   # its region, from the run's mask or its own
    assert np.array_equal(ctl.blend_region(torch.from_numpy(ellipse)[None])[0].numpy(), 1 - ref)
    # scaled with the image: 9 px at 128 px
    small = torch.from_numpy(ellipse[::4, ::4].copy())[None]
    assert np.array_equal(pfb.dilate(small, 36)[0].numpy(),
                          cv2_dilate_reference(small[0].numpy(), 9))


# --- 4. CAM under prompt-to-prompt injection ---------------------------------------------------

class _MapCapture(Control):
    """Captures the edit row's step-0 cross-attention maps after every other hook."""

    def __init__(self, layers):
        self.hook = attention_hooks.CaptureHook(layers, rows=[("edit", "cond")], steps={0})

    def attn_hooks(self, run):
        return [self.hook]


@pytest.mark.parametrize("mode", ["logits", "probs"])
def test_cam_holds_under_injection(sd, inv, mask, mode):
    """CAM words that also occur in the source prompt ("carpet" IN, "room" OUT) are
    aligned by refine, so injection copies their maps from the reconstruction inside the
    cross-replace window: CAM must still zero their mass on the wrong side."""
    from xmgie.mgie_core.tokens import find_word_tokens

    in_tok = find_word_tokens(sd.tokenizer, TGT, ["carpet"])
    out_tok = find_word_tokens(sd.tokenizer, TGT, ["room"])
    layers = [l.name for l in attention.attention_layers(sd.unet)
              if l.is_cross and l.in_set(attention_hooks.CAMHook.DEFAULT_LAYERS)]
    cap = _MapCapture(layers)
    sampler.edit(sd, inv, TGT, mask=mask, controls=[cap],
                 cam=sampler.CAMSettings(["carpet"], ["room"], mode))
    pyr = MaskPyramid(mask)
    inside_total = 0.0
    for name in layers:
        p = cap.hook.maps[name][0]                                   # (heads, HW, 77)
        hw = layer_hw((16, 16), p.shape[1])
        m = pyr.at(hw, p.device).flatten()
        assert p[:, m > 0.5][..., out_tok].sum() == 0, name
        assert p[:, m < 0.5][..., in_tok].sum() == 0, name
        inside_total += float(p[:, m > 0.5][..., in_tok].sum())
        if mode == "logits":
            torch.testing.assert_close(p.sum(-1), torch.ones_like(p.sum(-1)))
    assert inside_total > 0


# --- 5. timestep spacing ----------------------------------------------------------------------

@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_schedule_is_the_schedulers(sd, z0, spacing):
    from diffusers import DDIMScheduler

    model = dataclasses.replace(sd, scheduler=ddim_scheduler({"timestep_spacing": spacing}))
    for n in (7, 3):
        sch = diffusion.make_schedule(model, n)
        ref = DDIMScheduler(**DDIM_SETTINGS, timestep_spacing=spacing)
        ref.set_timesteps(n)
        assert torch.equal(sch.timesteps, ref.timesteps.long())
        g = torch.Generator().manual_seed(n)
        z, eps = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
        for i, t in enumerate(ref.timesteps):
            expected = ref.step(eps, t, z, eta=0.0).prev_sample
            stepped = diffusion.denoise_step(sch, i, z, eps)
            torch.testing.assert_close(stepped, expected, atol=1e-5, rtol=1e-5)
            # the inversion runs the same rule backwards
            torch.testing.assert_close(diffusion.invert_step(sch, i, stepped, eps), z,
                                       atol=1e-5, rtol=1e-5)
    # DDIM inversion (t - delta -> t) by the scheduler's rule, computed here by hand
    sch = diffusion.make_schedule(model, 3)
    cond = diffusion.encode_prompt(model, SRC)
    traj = inversion.ddim_trajectory(model, z0, cond, sch)
    abar = model.scheduler.alphas_cumprod.double()
    z = z0.double()
    with torch.no_grad():
        for t in reversed(sch.timesteps.tolist()):
            eps = model.unet(z.float(), t, encoder_hidden_states=cond).sample.double()
            prev = t - 1000 // 3
            a_from = abar[prev] if prev >= 0 else torch.tensor(
                float(model.scheduler.final_alpha_cumprod), dtype=torch.float64)
            x0 = (z - (1 - a_from).sqrt() * eps) / a_from.sqrt()
            z = abar[t].sqrt() * x0 + (1 - abar[t]).sqrt() * eps
    torch.testing.assert_close(traj[0], z.float(), atol=2e-4, rtol=1e-4)


# --- 6. prompt-to-prompt replace -----------------------------------------------------------------

def p2p_replace_matrix(tokenizer, src: str, tgt: str, shift_padding: bool = True):
    """P2P's replacement mapper, written here from its description: word i of the source
    maps onto word i of the target (1 / target token count per entry when the counts
    differ); past the words, padding maps k - d -> k (our shift) or k -> k (P2P's)."""
    words_s, words_t = src.split(), tgt.split()
    M = np.zeros((77, 77))
    M[0, 0] = 1
    i = j = 1
    for a, b in zip(words_s, words_t):
        na = len(tokenizer(a, add_special_tokens=False).input_ids)
        nb = len(tokenizer(b, add_special_tokens=False).input_ids)
        if na == nb:
            for q in range(na):
                M[i + q, j + q] = 1
        else:
            M[i:i + na, j:j + nb] = 1 / nb
        i, j = i + na, j + nb
    for k in range(j, 77):
        M[min(k - (j - i), 76) if shift_padding else k, k] = 1
    return torch.tensor(M, dtype=torch.float32)


def test_p2p_replace_against_an_independent_attention_replace(sd, z0):
    M = attention_hooks.replace_mapper(sd.tokenizer, SRC, TGT)
    ref_M = p2p_replace_matrix(sd.tokenizer, SRC, TGT)
    assert torch.equal(M, ref_M)
    assert torch.equal(M, p2p_replace_matrix(sd.tokenizer, SRC, TGT, shift_padding=False))
    # one UNet call: the edit row's maps are the reconstruction row's mixed by M
    z = torch.cat([z0] * 4)
    z[3] += 0.3 * torch.randn(z0.shape[1:], generator=torch.Generator().manual_seed(1))
    u, s, t = (diffusion.encode_prompt(sd, p) for p in ("", SRC, TGT))
    layout = attention.BatchLayout((("rec", "uncond"), ("edit", "uncond"),
                                    ("rec", "cond"), ("edit", "cond")))
    names = [l.name for l in attention.attention_layers(sd.unet) if l.is_cross]
    inj = attention_hooks.InjectionHook(M, cross_steps=1, self_steps=0)
    cap = attention_hooks.CaptureHook(names, rows=[("rec", "cond"), ("edit", "cond")])
    plain = attention_hooks.CaptureHook(names, rows=[("rec", "cond"), ("edit", "cond")])
    ctl = attention.install(sd.unet)
    try:
        for hooks in ([inj, cap], [plain]):
            ctl.hooks = hooks
            ctl.reset_call(attention.AttnContext(0, 1, layout, (16, 16)))
            with torch.no_grad():
                diffusion.unet_eps(sd, z, 981, torch.cat([u, u, s, t]))
    finally:
        ctl.hooks = []
        ctl.reset_call(None)
    for name in names:
        rec, edit = cap.maps[name]
        expected = torch.einsum("hpw,wn->hpn", rec, ref_M)
        torch.testing.assert_close(edit, expected, atol=1e-6, rtol=1e-5)
        if not name.startswith("down_blocks.0"):     # later layers see the changed edit row
            continue
        # refine keeps "yellow"'s own map; replace gives it "red"'s
        assert not torch.allclose(plain.maps[name][1][..., 5], rec[..., 5])
        torch.testing.assert_close(edit[..., 5], rec[..., 5])


def test_p2p_replace_with_unequal_token_counts_and_in_the_sampler(sd, inv):
    word = "xylophonics"
    n = len(sd.tokenizer(word, add_special_tokens=False).input_ids)
    assert n > 1
    tgt = SRC.replace("red", word)
    M = attention_hooks.replace_mapper(sd.tokenizer, SRC, tgt)
    assert torch.equal(M, p2p_replace_matrix(sd.tokenizer, SRC, tgt))
    torch.testing.assert_close(M[5, 5:5 + n], torch.full((n,), 1 / n))
    # past the prompt the alignment shifts: target padding k takes source k - (n - 1)
    assert M[20 - (n - 1), 20] == 1 and M[20, 20] == 0
    with pytest.raises(InputError, match="refine"):
        attention_hooks.replace_mapper(sd.tokenizer, SRC, "a photo of a carpet")
    res_replace = sampler.edit(sd, inv, TGT, p2p_mode="replace")
    res_refine = sampler.edit(sd, inv, TGT)
    assert res_replace.settings["p2p_mode"] == "replace"
    assert (res_replace.edit - res_refine.edit).abs().max() > 1e-5
    with pytest.raises(InputError, match="p2p_mode"):
        sampler.edit(sd, inv, TGT, p2p_mode="swap")


def test_cached_injection_replays_replace(sd, inv, mask):
    """MAG's cached replay of the injection uses the same replace rule as the batch."""
    from xmgie.mgie_core import guidance

    M = attention_hooks.replace_mapper(sd.tokenizer, SRC, TGT)
    inj = attention_hooks.InjectionHook(M, cross_steps=1, self_steps=0)
    rec = guidance.SourceRecorder()
    rec.probs["x"] = torch.rand(2, 4, 77)
    replay = guidance.CachedInjection(inj, rec)
    layout = attention.BatchLayout((("edit", "cond"),))
    ctx = attention.AttnContext(0, 1, layout, (16, 16))
    out = replay.edit_probs(attention.LayerInfo("x", True), ctx, torch.rand(1, 2, 4, 77))
    torch.testing.assert_close(out[0], torch.einsum("hpw,wn->hpn", rec.probs["x"], M))


# --- 7. Euler ancestral against diffusers' InstructPix2Pix pipeline -------------------------------

def test_euler_ancestral_matches_the_instructpix2pix_pipeline(tiny_ip2p, image):
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionInstructPix2PixPipeline

    ip = tiny_ip2p
    prompt, seed, steps = "make the carpet yellow", 7, 5
    x = image.permute(0, 3, 1, 2)
    with torch.no_grad():
        img_latent = ip.vae.encode(x * 2 - 1).latent_dist.mode()
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=ip.vae, text_encoder=ip.text_encoder, tokenizer=ip.tokenizer, unet=ip.unet,
        scheduler=EulerAncestralDiscreteScheduler.from_config(ip.scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(prompt, image=x, num_inference_steps=steps, guidance_scale=7.5,
                    image_guidance_scale=1.5, generator=torch.Generator().manual_seed(seed),
                    output_type="latent").images
    res = sampler.edit_instruct(ip, img_latent, sampler.encode_instruction(ip, prompt),
                                steps=steps, seed=seed, scheduler="euler_ancestral")
    torch.testing.assert_close(res.edit, expected, atol=1e-5, rtol=1e-5)
    other = sampler.edit_instruct(ip, img_latent, sampler.encode_instruction(ip, prompt),
                                  steps=steps, seed=seed + 1)
    assert (other.edit - expected).abs().max() > 1e-3
    import inspect

    assert inspect.signature(sampler.edit_instruct).parameters["scheduler"].default \
        == "euler_ancestral"
    with pytest.raises(InputError, match="scheduler"):
        sampler.edit_instruct(ip, img_latent, sampler.encode_instruction(ip, prompt),
                              steps=2, scheduler="pndm")


# --- 8. GB kernel truncation ---------------------------------------------------------------------

def test_gb_kernel_truncation_rule_is_ceil_not_scipys():
    from xmgie.mgie_core import blur

    for s in (0.3, 0.33, 1.0, 1.7, 5.0):
        k = blur.gaussian_kernel1d(s)
        r = math.ceil(4 * s)
        x = torch.arange(-r, r + 1, dtype=torch.float64)
        g = torch.exp(-x ** 2 / (2 * s * s))
        torch.testing.assert_close(k, g / g.sum())
    # scipy.ndimage truncates at int(4 sigma + 0.5): not the same rule (sigma 0.3: 1 vs 2)
    assert int(4 * 0.3 + 0.5) != (blur.gaussian_kernel1d(0.3).numel() - 1) // 2
    assert "scipy.ndimage's default" not in (blur.__doc__ or "")


# --- the nodes expose the options ----------------------------------------------------------

def test_nodes_expose_the_new_options_as_optional_inputs():
    from xmgie.nodes.editing import CAMSampler, InstructSampler, PFBControlNode

    for cls, name, default in ((PFBControlNode, "reference", "cond"),
                               (PFBControlNode, "placement", "pfb_diff"),
                               (CAMSampler, "p2p_mode", "refine"),
                               (InstructSampler, "scheduler", "euler_ancestral")):
        spec = cls.INPUT_TYPES()
        assert name not in spec["required"]     # saved workflows without it stay valid
        choices, opts = spec["optional"][name]
        assert opts["default"] == default and default in choices and opts["tooltip"]
    (ctl,), = PFBControlNode().make(torch.ones(1, 64, 64), "object", 1.0, True,
                                    reference="per_half", placement="block_outputs")
    assert (ctl.reference, ctl.placement) == ("per_half", "block_outputs")
    (ctl,), = PFBControlNode().make(torch.ones(1, 64, 64), "object", 1.0, True)
    assert (ctl.reference, ctl.placement) == ("cond", "pfb_diff")
