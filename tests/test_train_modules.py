"""xMGIE's trainable modules on the tiny models (docs/algorithms.md §14): PFB's learned
a_l and IE reproduce today's edits exactly while untrained, change them once moved,
train in float32 under a half-precision UNet; the critic's shape; the trained-modules
folder's round trip and its errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from xmgie.mgie_core import inversion, sampler, trained, vae
from xmgie.mgie_core.errors import InputError, XMGIEError
from xmgie.mgie_core.pfb import PFBControl, blend_features, pfb_diff_sites
from xmgie.mgie_core.trainable import (
    IdentityEmbeddingControl,
    IdentityInjection,
    LatentPatchDiscriminator,
    PFBWeights,
    clamp01,
    default_ie_sites,
    min_latent_size,
)

SRC = "a photo of a red carpet in a room"
TGT = "a photo of a yellow carpet in a room"
STEPS = 4
ID_DIM = 16


@pytest.fixture(scope="module")
def inv(tiny_sd, image):
    z0 = vae.encode(tiny_sd, image).samples
    return inversion.invert(tiny_sd, z0, SRC, method="negative_prompt", steps=STEPS,
                            image_size=(128, 128))


@pytest.fixture(scope="module")
def e_id():
    return torch.nn.functional.normalize(
        torch.randn(1, ID_DIM, generator=torch.Generator().manual_seed(2)), dim=-1)


def _edit(sd, inv, mask, controls):
    return sampler.edit(sd, inv, TGT, mask=mask, controls=controls).edit


# --- PFB's a_l ------------------------------------------------------------------------

def test_pfb_weights_sites_follow_the_control(tiny_sd):
    w = PFBWeights.for_unet(tiny_sd.unet)
    assert list(w.sites) == [s.module for s in pfb_diff_sites(tiny_sd.unet, "object")]
    assert w.raw.dtype == torch.float32 and torch.equal(w.raw, torch.ones(len(w.sites)))
    bg = PFBWeights.for_unet(tiny_sd.unet, preset="background")
    assert len(bg.sites) > len(w.sites)
    blocks = PFBWeights.for_unet(tiny_sd.unet, placement="block_outputs")
    assert "mid_block" in blocks.sites
    with pytest.raises(InputError, match="placement"):
        PFBWeights.for_unet(tiny_sd.unet, placement="everywhere")
    with pytest.raises(InputError, match="no PFB weight"):
        w.alpha("up_blocks.3")


def test_untrained_pfb_weights_reproduce_the_fixed_blend_exactly(tiny_sd, inv, mask):
    with torch.no_grad():
        fixed = _edit(tiny_sd, inv, mask, [PFBControl(mask[0])])
        w = PFBWeights.for_unet(tiny_sd.unet)
        ctl = PFBControl(mask[0], alpha=w)
        learned = _edit(tiny_sd, inv, mask, [ctl])
    assert torch.equal(learned, fixed)
    with torch.inference_mode():      # as a host that samples in inference mode
        assert torch.equal(_edit(tiny_sd, inv, mask, [ctl]), fixed)
    # through the sampler with a gradient recorded (a_l read at every call): the same
    with torch.enable_grad():
        live = _edit(tiny_sd, inv, mask, [PFBControl(mask[0], alpha=w)])
    assert live.requires_grad
    assert torch.equal(live.detach(), fixed)
    # a moved a_l changes the edit, as the same fixed alpha does
    with torch.no_grad():
        w.raw.fill_(0.5)
    with torch.no_grad():
        moved = _edit(tiny_sd, inv, mask, [PFBControl(mask[0], alpha=w)])
        half = _edit(tiny_sd, inv, mask, [PFBControl(mask[0], alpha=0.5)])
    assert not torch.equal(moved, fixed)
    torch.testing.assert_close(moved, half)


def test_untrained_pfb_weights_on_the_instruction_path(tiny_ip2p, image, mask):
    cond = sampler.encode_instruction(tiny_ip2p, "make the carpet yellow")

    def run(ctl):
        return sampler.edit_instruct_photo(tiny_ip2p, image, cond, steps=3, mask=mask,
                                           controls=[ctl]).edit

    w = PFBWeights.for_unet(tiny_ip2p.unet)
    assert torch.equal(run(PFBControl(mask[0], alpha=w)), run(PFBControl(mask[0])))


def test_pfb_weights_of_another_preset_are_refused(tiny_sd, inv, mask):
    w = PFBWeights.for_unet(tiny_sd.unet, preset="object")
    with pytest.raises(InputError, match="preset 'background'"):
        _edit(tiny_sd, inv, mask, [PFBControl(mask[0], preset="background", alpha=w)])


def test_blend_features_by_hand():
    he, hr = torch.full((1, 1, 1, 2), 4.0), torch.full((1, 1, 1, 2), 2.0)
    m = torch.tensor([[[[1.0, 0.0]]]])
    # inside: 0.25 * 4 + 0.75 * 2 = 2.5; outside: the reference, 2
    assert blend_features(he, hr, m, 0.25).flatten().tolist() == [2.5, 2.0]
    a = torch.tensor(0.25, requires_grad=True)
    out = blend_features(he, hr, m, a)
    assert out.flatten().tolist() == [2.5, 2.0]
    out.sum().backward()
    assert a.grad.item() == 2.0        # d/da inside: he - hr
    # a tensor a = 1 is exactly the edit's features inside
    x = torch.randn(2, 3, 4, 4)
    y = torch.randn(2, 3, 4, 4)
    mm = (torch.rand(2, 1, 4, 4) > 0.5).float()
    assert torch.equal(blend_features(x, y, mm, torch.tensor(1.0)), blend_features(x, y, mm))
    # half-precision features: the result keeps their dtype, a's gradient is float32
    a = torch.tensor(1.0, requires_grad=True)
    xb, yb = x.bfloat16(), y.bfloat16()
    out = blend_features(xb, yb, mm.bfloat16(), a)
    assert out.dtype == torch.bfloat16 and torch.equal(out, blend_features(xb, yb, mm))
    out.float().sum().backward()
    assert a.grad.dtype == torch.float32
    want = ((xb.float() - yb.float()) * mm).sum()
    torch.testing.assert_close(a.grad, want)


def test_clamp_keeps_a_in_unit_interval_and_gradient_recovers():
    w = PFBWeights(["a", "b", "c", "d"])
    with torch.no_grad():
        w.raw.copy_(torch.tensor([1.5, -0.5, 1.0, 0.3]))
    a = w()
    assert a.tolist() == [1.0, 0.0, 1.0, pytest.approx(0.3)]
    assert all(0.0 <= w.alpha(s).item() <= 1.0 for s in w.sites)
    # loss sum(a): gradient +1 everywhere. Descent lowers raw: passes at 1.5 (back
    # inside), blocked at -0.5 (further out), passes at the end 1.0 and inside.
    a.sum().backward()
    assert w.raw.grad.tolist() == [1.0, 0.0, 1.0, 1.0]
    w.raw.grad = None
    (-w()).sum().backward()           # gradient -1: descent raises raw
    assert w.raw.grad.tolist() == [0.0, -1.0, -1.0, -1.0]
    # torch's clamp on the same values
    assert torch.equal(clamp01(w.raw), w.raw.clamp(0, 1))
    w.project_()
    assert w.raw.tolist() == [1.0, 0.0, 1.0, pytest.approx(0.3)]


# --- IE -----------------------------------------------------------------------------------

def test_ie_sites_and_zero_init(tiny_sd):
    ie = IdentityInjection.for_unet(tiny_sd.unet, ID_DIM, encoder_kind="clip_vision")
    assert ie.sites == tuple(default_ie_sites(tiny_sd.unet))
    assert ie.sites[0] == "mid_block" and len(ie.sites) >= 2
    modules = dict(tiny_sd.unet.named_modules())
    assert all(s in modules for s in ie.sites)
    assert all(p.dtype == torch.float32 and not p.any() for p in ie.parameters())
    assert ie.proj[0].in_channels == ie.channels[0] + ID_DIM
    with pytest.raises(InputError, match="does not have"):
        IdentityInjection.for_unet(tiny_sd.unet, ID_DIM, sites=["up_blocks.9"])


def test_untrained_ie_reproduces_todays_edit_exactly(tiny_sd, inv, mask, e_id):
    plain = _edit(tiny_sd, inv, mask, [PFBControl(mask[0])])
    ie = IdentityInjection.for_unet(tiny_sd.unet, ID_DIM)
    ctl = IdentityEmbeddingControl(ie, embedding=e_id)
    both = _edit(tiny_sd, inv, mask, [ctl, PFBControl(mask[0], alpha=PFBWeights.for_unet(
        tiny_sd.unet))])
    assert torch.equal(both, plain)
    # a nonzero projection changes the edit, and only the edit branch
    moved = copy.deepcopy(ie)
    with torch.no_grad():
        for p in moved.proj:
            p.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
    res = sampler.edit(tiny_sd, inv, TGT, mask=mask,
                       controls=[IdentityEmbeddingControl(moved, embedding=e_id)])
    ref = sampler.edit(tiny_sd, inv, TGT, mask=mask)
    assert not torch.equal(res.edit, ref.edit)
    assert torch.equal(res.reconstruction, ref.reconstruction)
    # the given module was not moved or changed by the run
    assert all(not p.any() for p in ie.parameters())


def test_ie_control_errors(tiny_sd, inv, mask):
    ie = IdentityInjection.for_unet(tiny_sd.unet, ID_DIM)
    with pytest.raises(InputError, match="width 16"):
        _edit(tiny_sd, inv, mask, [IdentityEmbeddingControl(ie, embedding=torch.ones(1, 8))])
    with pytest.raises(InputError, match="encoder"):
        _edit(tiny_sd, inv, mask, [IdentityEmbeddingControl(ie)])
    other = IdentityInjection(["mid_block"], [999], ID_DIM)
    with pytest.raises(InputError, match="does not fit"):
        _edit(tiny_sd, inv, mask, [IdentityEmbeddingControl(other,
                                                             embedding=torch.ones(1, ID_DIM))])


def test_ie_control_embeds_the_source_with_the_encoder(tiny_sd, tiny_models, inv, mask,
                                                       image):
    from xmgie.mgie_core.models import identity as id_lib
    from xmgie.mgie_core.trainable import embed_sources

    encoder = id_lib.load_clip_vision(str(tiny_models("clip_vision")), device="cpu")
    dim = int(encoder.embed(image).shape[-1])
    ie = IdentityInjection.for_unet(tiny_sd.unet, dim, encoder_kind=encoder.kind)
    with torch.no_grad():
        for p in ie.proj:
            p.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(7))
    plain = _edit(tiny_sd, inv, mask, []).detach()
    # the photo given: its whole-photo embedding (embed_sources, as training makes e_id);
    # the same edit as with that embedding precomputed
    a = _edit(tiny_sd, inv, mask, [IdentityEmbeddingControl(ie, encoder, source=image)])
    c = _edit(tiny_sd, inv, mask, [IdentityEmbeddingControl(
        ie, embedding=embed_sources(encoder, image))])
    assert torch.equal(a, c) and not torch.equal(a.detach(), plain)
    # no photo given: the run's clean source latent, decoded, is embedded
    b = _edit(tiny_sd, inv, mask, [IdentityEmbeddingControl(ie, encoder)]).detach()
    assert torch.isfinite(b).all() and not torch.equal(b, plain)
    other = IdentityInjection.for_unet(tiny_sd.unet, dim, encoder_kind="face_recognition")
    with pytest.raises(InputError, match="face_recognition"):
        _edit(tiny_sd, inv, mask, [IdentityEmbeddingControl(other, encoder)])


def test_ie_hook_injects_the_rows_its_selector_names_and_deep_copies(tiny_sd, e_id):
    """IE's one hook (the sampler's control and training both use it): only the rows the
    selector returns change, None leaves the call alone, and a deep-copied module's hooks
    use the copy's IE."""
    unet = copy.deepcopy(tiny_sd.unet)
    ie = IdentityInjection.for_unet(unet, ID_DIM)
    with torch.no_grad():
        for p in ie.proj:
            p.bias.fill_(0.1)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    emb = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([500, 500])

    def call(u):
        with torch.no_grad():
            return u(z, t, encoder_hidden_states=emb).sample

    before = call(unet)
    state = {"rows": None}

    def select(h):
        return None if state["rows"] is None else (state["rows"], e_id)

    modules = dict(unet.named_modules())
    handles = [modules[s].register_forward_hook(ie.hook(k, select))
               for k, s in enumerate(ie.sites)]
    holder = torch.nn.ModuleDict({"unet": unet, "ie": ie})
    try:
        assert torch.equal(call(unet), before)             # the selector said no
        state["rows"] = slice(0, 1)
        edited = call(unet)
        assert not torch.equal(edited[0], before[0])
        assert torch.equal(edited[1], before[1])            # only the given rows
        twin = copy.deepcopy(holder)
        with torch.no_grad():
            for p in twin["ie"].proj:
                p.bias.zero_()
        assert torch.equal(call(twin["unet"]), before)      # the copy's (zero) IE acts
        assert torch.equal(call(unet), edited)              # the original's is untouched
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(call(unet), before)                  # hooks removed
    assert not hasattr(ie, "attach")


def _half_sd(sd, dtype=torch.bfloat16):
    half = copy.deepcopy(sd)
    half.unet.to(dtype)
    half.dtype = dtype
    return half


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_reach_a_and_ie_in_float32(tiny_sd, inv, mask, e_id, dtype):
    """Training through the sampler (two steps recorded): the loss's gradient reaches
    every learned a_l of an active site and every IE projection, in float32, finite,
    with the UNet in float32 or bfloat16 (half precision on a CPU)."""
    sd = tiny_sd if dtype == torch.float32 else _half_sd(tiny_sd, dtype)
    w = PFBWeights.for_unet(sd.unet)
    ie = IdentityInjection.for_unet(sd.unet, ID_DIM)
    with torch.enable_grad():
        out = sampler.edit(sd, inv, TGT, mask=mask, controls=[
            IdentityEmbeddingControl(ie, embedding=e_id), PFBControl(mask[0], alpha=w)]).edit
        loss = out.float().square().mean()
        loss.backward()
    assert w.raw.grad is not None and w.raw.grad.dtype == torch.float32
    assert torch.isfinite(w.raw.grad).all()
    # every site where the mask is not empty at its size gets a gradient (at 128 px the
    # mask's box covers no whole 8x8 cell of the 2x2 level-3 features: m = 0 there)
    level = {s.module: s.level for s in pfb_diff_sites(sd.unet, "object")}
    got = dict(zip(w.sites, w.raw.grad.tolist()))
    assert all(got[s] != 0 for s in w.sites if level[s] == 2), got
    for p in ie.parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32
        assert torch.isfinite(p.grad).all()
    assert any(p.grad.abs().sum() > 0 for p in ie.parameters())
    assert all(p.grad is None for p in sd.unet.parameters())     # the UNet stays frozen


# --- the critic -------------------------------------------------------------------------

def test_latent_patchgan_shape():
    d = LatentPatchDiscriminator()
    z = torch.randn(2, 4, 64, 64)
    out = d(z)
    assert out.shape == (2, 1, 6, 6) and out.dtype == torch.float32
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert all(c.kernel_size == (4, 4) for c in convs)
    acts = [m for m in d.modules() if isinstance(m, torch.nn.LeakyReLU)]
    assert len(acts) == 4 and all(a.negative_slope == 0.2 for a in acts)
    assert min_latent_size(3) == 24
    with pytest.raises(InputError, match="at least 24x24"):
        d(torch.randn(1, 4, 16, 16))
    small = LatentPatchDiscriminator(ndf=8, n_layers=1)
    assert small(torch.randn(1, 4, 8, 8)).shape == (1, 1, 2, 2)
    # gradients flow to the critic and, through it, to a generated latent
    fake = torch.randn(1, 4, 8, 8, requires_grad=True)
    small(fake.bfloat16()).mean().backward()
    assert fake.grad is not None and torch.isfinite(fake.grad).all()
    inst = LatentPatchDiscriminator(ndf=8, n_layers=2, norm="instance")
    assert inst(torch.randn(2, 4, 32, 32)).shape == (2, 1, 6, 6)


# --- the trained-modules folder ------------------------------------------------------------

def _moved(unet):
    w = PFBWeights.for_unet(unet)
    ie = IdentityInjection.for_unet(unet, ID_DIM, encoder_kind="clip_vision")
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        w.raw.copy_(torch.rand(len(w.sites), generator=g))
        for p in ie.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return w, ie


def test_trained_round_trip(tmp_path, tiny_sd):
    w, ie = _moved(tiny_sd.unet)
    folder = trained.save_xmgie(tmp_path / "final", w, ie, extra={"steps": 7})
    assert (folder / trained.WEIGHTS).exists() and (folder / trained.MANIFEST).exists()
    meta = json.loads((folder / trained.MANIFEST).read_text())
    assert meta["kind"] == "xmgie" and meta["format"] == 1 and meta["steps"] == 7
    assert trained.read_kind(folder) == "xmgie"
    got = trained.load_xmgie(folder, unet=tiny_sd.unet)
    assert got.pfb.sites == w.sites and torch.equal(got.pfb.raw, w.raw)
    assert got.pfb.preset == "object" and got.pfb.placement == "pfb_diff"
    assert got.ie.sites == ie.sites and got.ie.encoder_kind == "clip_vision"
    for a, b in zip(got.ie.state_dict().values(), ie.state_dict().values()):
        assert torch.equal(a, b)
    # one of the two alone
    only = trained.load_xmgie(trained.save_xmgie(tmp_path / "pfb", w, None))
    assert only.ie is None and torch.equal(only.pfb.raw, w.raw)


def test_trained_folder_errors(tmp_path, tiny_sd):
    hint = "xmgie train configs/train/xmgie.yaml"
    with pytest.raises(XMGIEError, match="no folder") as err:
        trained.load_xmgie(tmp_path / "nothing")
    assert hint in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(XMGIEError, match="trained.json") as err:
        trained.read_kind(empty)
    assert hint in str(err.value) and str(empty) in str(err.value)
    w, ie = _moved(tiny_sd.unet)
    folder = trained.save_xmgie(tmp_path / "f", w, ie)
    meta = json.loads((folder / trained.MANIFEST).read_text())
    (folder / trained.MANIFEST).write_text(json.dumps({**meta, "kind": "mgie"}))
    with pytest.raises(XMGIEError, match="MGIE"):
        trained.load_xmgie(folder)
    (folder / trained.MANIFEST).write_text(json.dumps(meta))
    (folder / trained.WEIGHTS).unlink()
    with pytest.raises(XMGIEError, match=trained.WEIGHTS) as err:
        trained.load_xmgie(folder)
    assert str(folder) in str(err.value)
    with pytest.raises(InputError, match="nothing"):
        trained.save_xmgie(tmp_path / "none", None, None)


def test_trained_keys_that_do_not_fit_the_unet(tmp_path, tiny_sd):
    other = IdentityInjection(["mid_block", "up_blocks.9.resnets.0"], [64, 8], ID_DIM)
    folder = trained.save_xmgie(tmp_path / "f", None, other)
    with pytest.raises(XMGIEError, match="up_blocks.9") as err:
        trained.load_xmgie(folder, unet=tiny_sd.unet)
    assert trained.WEIGHTS in str(err.value) and "xmgie train" in str(err.value)
    w = PFBWeights(["down_blocks.7.resnets.0"])
    folder = trained.save_xmgie(tmp_path / "g", w, None)
    with pytest.raises(XMGIEError, match="down_blocks.7"):
        trained.load_xmgie(folder, unet=tiny_sd.unet)
    # a file whose tensors disagree with trained.json
    w, ie = _moved(tiny_sd.unet)
    folder = trained.save_xmgie(tmp_path / "h", w, ie)
    from safetensors.torch import load_file, save_file

    state = load_file(folder / trained.WEIGHTS)
    state.pop(next(k for k in state if k.startswith("ie.")))
    save_file(state, folder / trained.WEIGHTS)
    with pytest.raises(XMGIEError, match="missing"):
        trained.load_xmgie(folder)


# --- the memory bench's counter ------------------------------------------------------------

def _bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "train_memory.py"
    spec = importlib.util.spec_from_file_location("train_memory", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_memory_bench_counts_saved_bytes_by_hand():
    bench = _bench()
    lin = torch.nn.Linear(8, 16)
    x = torch.randn(4, 8, requires_grad=True)
    with bench.SavedBytes(exclude=[lin]) as saved:
        saved.keep.append(lin(x).relu())
    # the linear keeps its input (4 x 8 floats; its weight is a parameter, not counted),
    # the ReLU its output (4 x 16 floats)
    assert saved.total == (4 * 8 + 4 * 16) * 4
    rows = {r["critic"]: r for r in bench.measure(192, "meta")}
    assert rows["latent"]["gen_saved"] < rows["pixel"]["gen_critic_own"] \
        < rows["pixel"]["gen_saved"]
    assert rows["pixel+ckpt"]["gen_saved"] < rows["pixel"]["gen_saved"]
    assert 0 < rows["pixel+ckpt"]["recompute"] < rows["pixel"]["gen_saved"]
    assert rows["latent"]["critic_trained"] == 4 * rows["latent"]["critic_weights"]


def test_loading_trained_modules_leaves_the_callers_random_state(tmp_path):
    # A host (ComfyUI) loading trained modules must draw the same numbers afterwards as
    # if it had not: the modules' initial weights are overwritten by the file anyway.
    import torch

    from xmgie.mgie_core.trainable import IdentityInjection
    from xmgie.mgie_core.trained import load_xmgie, save_xmgie

    ie = IdentityInjection(["mid_block"], [8], 4, "clip_vision")
    save_xmgie(tmp_path / "t", None, ie)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    load_xmgie(tmp_path / "t")
    assert torch.equal(torch.rand(3), expected)
