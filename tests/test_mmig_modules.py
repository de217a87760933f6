"""MMIG's MM-Adapter and MMSM (docs/algorithms.md §15): shapes, the identity at
initialisation (and that one training step breaks it, so that test can fail), what
trains, L_MMSM by hand, the safetensors file, and the nodes that load and apply them."""

from __future__ import annotations

import pytest
import torch

from xmgie.mgie_core import mmig, paths
from xmgie.mgie_core.errors import InputError, ModelLoadError, ModelNotFoundError

IDS = torch.tensor([[1, 5, 9, 13, 17, 21, 25], [1, 30, 31, 32, 33, 34, 35]])


@pytest.fixture(scope="module")
def mgie(tiny_models):
    from xmgie.mgie_core.models import mgie as lib

    return lib.load_mgie(str(tiny_models("mgie")), dtype="fp32", device="cpu")


@pytest.fixture
def llm(mgie):
    """A fresh object around the tiny MGIE's LLM (its weights shared, never changed: the
    tests inject into this copy, which leaves ``mgie.llm`` as it is)."""
    layers = [f"model.layers.{i}" for i in range(len(mgie.llm.model.layers))]
    return mmig.clone_path(mgie.llm, layers)


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def latent_call(unet, seed=0, batch=2, side=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4 if unet.config.in_channels == 4 else 8, side, side, generator=g)
    c = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)
    return x, torch.full((batch,), 500), c


def randomise(module, seed=1, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


# --- MM-Adapter ----------------------------------------------------------------------------

def test_router_adapter_shapes_and_hand_computation():
    a = mmig.RepAdapterRouter(4, hidden=2, temperature=2.0, scale=0.5, groups=2, dropout=0.0)
    x, m = torch.randn(3, 5, 4), torch.randn(3, 4)
    assert torch.equal(a(x, m), x)                      # zero up-projections: the identity
    randomise(a)
    out = a(x, m)
    assert out.shape == (3, 5, 4)
    w = torch.softmax((m @ a.router.weight.T + a.router.bias) / 2.0, -1)
    assert torch.allclose(w.sum(-1), torch.ones(3)) and w.shape == (3, 2)
    h = x @ a.down.weight[:, :, 0].T + a.down.bias     # [3,5,2]

    def up(conv):        # groups=2: hidden unit g feeds outputs 2g, 2g+1
        wt = conv.weight[:, :, 0]                        # [4, 1]
        return torch.stack([h[..., k // 2] * wt[k, 0] for k in range(4)], -1) + conv.bias

    expected = x + 0.5 * (w[:, None, 0:1] * up(a.up1) + w[:, None, 1:2] * up(a.up2))
    assert torch.allclose(out, expected, atol=1e-6)


def test_low_precision_inputs_keep_their_dtype_and_the_identity():
    a = mmig.RepAdapterRouter(8, hidden=4)
    x = torch.randn(2, 3, 8).bfloat16()
    out = a(x, torch.randn(2, 8))
    assert out.dtype == torch.bfloat16 and torch.equal(out, x)
    assert a.down.weight.dtype == torch.float32         # θ_a stays float32
    m = mmig.MMSM(8, 16, hidden=8, heads=2)
    e1 = torch.randn(1, 16, 3, 3).bfloat16()
    res = m(torch.randn(1, 4, 8).bfloat16(), e1)
    assert res.e6.dtype == torch.bfloat16 and torch.equal(res.e6, e1)
    assert res.e2.dtype == res.e3.dtype == torch.float32


def test_adapters_change_nothing_at_initialisation_in_both_modalities(mgie, llm):
    ref = logits(mgie.llm)
    adapters = mmig.inject_mm_adapters(llm)
    assert all(type(layer.input_layernorm).__name__ == "_AdaptedNorm"
               for layer in llm.model.layers)
    for has_image in (True, False, torch.tensor([True, False])):
        with adapters.modality(has_image):
            assert torch.equal(logits(llm), ref)
    assert torch.equal(logits(llm), ref)               # the default modality (image + text)
    # θ_a's size is the formula's (2 layers of width 32 here; §15 gives 7B's).
    assert adapters.trainable_count() == mmig.adapter_parameter_count(32, 2) == 1364
    assert mmig.adapter_parameter_count(4096, 32) == 2_629_952


def test_one_step_on_the_adapters_changes_the_llm_and_only_theta_a_trains(mgie, llm):
    ref = logits(mgie.llm)
    base = {n: p.detach().clone() for n, p in mgie.llm.named_parameters()}
    adapters = mmig.inject_mm_adapters(llm)
    trainable = {id(p) for p in llm.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in adapters.parameters()} - {
        id(adapters.modality_embedding.weight)}        # the embedding is not in the LLM
    assert all(p.requires_grad for p in adapters.parameters())
    opt = torch.optim.AdamW(adapters.parameters(), lr=1e-2, betas=(0.9, 0.95),
                            weight_decay=0.02)
    llm.train()
    with adapters.modality(torch.tensor([True, False])):
        loss = llm(input_ids=IDS, labels=IDS).loss
    loss.backward()
    assert all(p.grad is None for p in mgie.llm.parameters())
    assert all(torch.isfinite(p.grad).all() for p in adapters.parameters()
               if p.grad is not None)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in adapters.parameters())
    opt.step()
    llm.eval()
    assert not torch.equal(logits(llm), ref)           # so the identity test can fail
    for n, p in mgie.llm.named_parameters():           # the base weights did not move
        assert torch.equal(p, base[n]), n


def test_the_router_reads_the_modality(llm):
    adapters = mmig.inject_mm_adapters(llm, dropout=0.0)
    for a in adapters.adapters:
        randomise(a.up1, seed=2)
        randomise(a.up2, seed=3)
        randomise(a.router, seed=4, std=5.0)
    with adapters.modality(True):
        image = logits(llm)
    with adapters.modality(False):
        text = logits(llm)
    with adapters.modality(torch.tensor([True, False])):
        mixed = logits(llm)
    assert not torch.allclose(image, text)
    assert torch.allclose(mixed[0], image[0], atol=1e-5)
    assert torch.allclose(mixed[1], text[1], atol=1e-5)
    with pytest.raises(InputError, match="has_image"), adapters.modality([True, False, True]):
        logits(llm)


def test_remove_restores_and_the_clone_leaves_the_given_llm_untouched(mgie, llm):
    ref = logits(mgie.llm)
    norms = [layer.input_layernorm for layer in llm.model.layers]
    adapters = mmig.inject_mm_adapters(llm)
    randomise(adapters.adapters[0].up1)
    assert not torch.equal(logits(llm), ref)
    with pytest.raises(InputError, match="already has MM-Adapters"):
        mmig.inject_mm_adapters(llm)
    mmig.remove_mm_adapters(llm)
    assert [layer.input_layernorm for layer in llm.model.layers] == norms
    assert torch.equal(logits(llm), ref)
    # A new LLM with the adapters; the given one (the fixture's clone) is unchanged.
    adapted = mmig.llm_with_mm_adapters(llm, adapters)
    assert not torch.equal(logits(adapted), ref)
    assert torch.equal(logits(llm), ref) and torch.equal(logits(mgie.llm), ref)
    with pytest.raises(InputError, match="width"):
        mmig.inject_mm_adapters(mmig.clone_path(mgie.llm, ["model.layers.0", "model.layers.1"]),
                                adapters=mmig.MMAdapters(16, 2))


# --- MMSM ----------------------------------------------------------------------------------

def test_mmsm_shapes_and_no_effect_at_initialisation(tiny_sd):
    unet = tiny_sd.unet
    site = mmig.default_site(unet)
    assert site == "up_blocks.0"       # output at latent/4: 16x16 at 512 px
    channels = mmig.site_channels(unet, site)
    m = mmig.MMSM(unet.config.cross_attention_dim, channels, hidden=32, heads=4)
    x, t, c = latent_call(unet)
    ref = unet(x, t, encoder_hidden_states=c).sample
    hook = mmig.attach_mmsm(unet, m)
    try:
        hook.set_text(torch.randn(1, 6, 32), torch.tensor([[True] * 4 + [False] * 2]))
        out = unet(x, t, encoder_hidden_states=c).sample
        last = hook.last
    finally:
        hook.remove()
    assert torch.equal(out, ref)
    assert last.e2.shape == (2, 16, 32) and last.e4.shape == (2, 16, 32)   # 16 / 4 = 4x4
    assert last.e3.shape == (2, 6, 32) and last.e6.shape == (2, channels, 4, 4)
    assert torch.equal(unet(x, t, encoder_hidden_states=c).sample, ref)    # removed
    with pytest.raises(InputError, match="site: 'up_blocks.9'"):
        mmig.attach_mmsm(unet, m, "up_blocks.9")
    hook = mmig.attach_mmsm(unet, m)
    try:
        with pytest.raises(InputError, match="set_text"):
            unet(x, t, encoder_hidden_states=c)
    finally:
        hook.remove()


def test_mmsm_on_sdxl_sits_on_the_middle_block(tiny_sdxl):
    """SDXL's lowest level is latent/4, so no up block outputs there: MMSM's default site
    is the middle block, whose output the 10-deep up blocks at that level read. MMSM is
    the identity there at initialisation and changes the UNet once DD moves."""
    from xmgie.mgie_core.diffusion import encode_prompt, unet_eps

    sd = tiny_sdxl
    site = mmig.default_site(sd.unet)
    assert site == "mid_block"
    channels = mmig.site_channels(sd.unet, site)
    assert channels == sd.unet.config.block_out_channels[-1]
    m = mmig.MMSM(16, channels, hidden=16, heads=2)
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    emb = encode_prompt(sd, "a photo of a yellow carpet")
    ref = unet_eps(sd, z, 500, emb)
    hook = mmig.attach_mmsm(sd.unet, m)
    try:
        hook.set_text(torch.randn(1, 5, 16))
        assert torch.equal(unet_eps(sd, z, 500, emb), ref)
        assert hook.last.e6.shape[-2:] == (4, 4)             # latent/4
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn_like(p))
        assert not torch.allclose(unet_eps(sd, z, 500, emb), ref)
    finally:
        hook.remove()
    assert torch.equal(unet_eps(sd, z, 500, emb), ref)


def test_one_step_on_mmsm_changes_the_unet_and_only_mmsm_trains(tiny_sd):
    unet = tiny_sd.unet
    m = mmig.MMSM(32, mmig.site_channels(unet, "up_blocks.0"), hidden=32, heads=4)
    x, t, c = latent_call(unet)
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=c).sample
    new, hook = mmig.unet_with_mmsm(unet, m, torch.randn(1, 77, 32))
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    out = new(x, t, encoder_hidden_states=c).sample
    loss = (out - torch.randn_like(out)).pow(2).mean() \
        + mmig.mmsm_loss(hook.last.e2, hook.last.e3)
    loss.backward()
    assert all(p.grad is None for p in unet.parameters())
    assert m.domain_decoder[-1].weight.grad.abs().sum() > 0
    opt.step()
    with torch.no_grad():
        after = new(x, t, encoder_hidden_states=c).sample
        assert not torch.equal(after, ref)
        assert torch.equal(unet(x, t, encoder_hidden_states=c).sample, ref)   # untouched
    assert not unet.up_blocks[0]._forward_hooks


def test_mmsm_loss_by_hand():
    e2 = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])                  # ē2 = (2, 3)
    e3 = torch.tensor([[[0.0, 0.0], [4.0, 2.0], [100.0, 100.0]]])
    # Masked: ē3 = (2, 1); ē3 - ē2 = (0, -2); ½ mean(0, 4) = 1.
    assert mmig.mmsm_loss(e2, e3, torch.tensor([[True, True, False]])).item() == 1.0
    # Unmasked: ē3 = (104/3, 34); differences 98/3 and 31; ½ (9604/9 + 961) / 2 = 18253/36.
    loss = mmig.mmsm_loss(e2, e3)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert loss.item() == pytest.approx(18253 / 36, rel=1e-6)
    # A batch of two is the mean of the rows' losses; half precision in, float32 out.
    e2b = torch.cat([e2, torch.zeros(1, 2, 2)]).half()
    e3b = torch.cat([e3, torch.ones(1, 3, 2)]).half()
    both = mmig.mmsm_loss(e2b, e3b, torch.tensor([[True, True, False], [True] * 3]))
    assert both.dtype == torch.float32 and both.item() == pytest.approx((1.0 + 0.5) / 2)
    with pytest.raises(InputError, match="text_mask"):
        mmig.mmsm_loss(e2, e3, torch.tensor([[False, False, False]]))


# --- the file -------------------------------------------------------------------------------

def test_save_and_load_round_trip(tmp_path, mgie, llm):
    adapters = mmig.MMAdapters(32, 2)
    randomise(adapters, seed=5)
    m = mmig.MMSM(32, 64, hidden=32, heads=4)
    randomise(m, seed=6)
    m.site = "up_blocks.0"
    path = mmig.save_mmig(tmp_path / "m.safetensors", adapters, m, meta={"stage": 2})
    got = mmig.load_mmig(path)
    assert got["meta"] == {"stage": 2} and got["mmsm"].site == "up_blocks.0"
    for a, b in ((adapters, got["adapters"]), (m, got["mmsm"])):
        assert a.config == b.config
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    # The loaded adapters act as the saved ones.
    mmig.inject_mm_adapters(llm, adapters=got["adapters"])
    twin = mmig.llm_with_mm_adapters(mgie.llm, adapters.eval())
    assert torch.allclose(logits(llm), logits(twin))
    only = mmig.load_mmig(mmig.save_mmig(tmp_path / "a.safetensors", adapters=adapters))
    assert only["mmsm"] is None and only["adapters"] is not None


def test_a_bad_file_is_named_in_the_error(tmp_path):
    from safetensors.torch import save_file

    missing = tmp_path / "nope.safetensors"
    with pytest.raises(ModelLoadError, match="nope.safetensors.*does not exist"):
        mmig.load_mmig(missing)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ModelLoadError, match="corrupt.safetensors.*not a readable"):
        mmig.load_mmig(corrupt)
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(ModelLoadError, match="other.safetensors.*kind"):
        mmig.load_mmig(other)
    bad = mmig.save_mmig(tmp_path / "bad.safetensors", mmig.MMAdapters(32, 2))
    tensors = {k: v for k, v in _read(bad).items() if "adapters.1." not in k}
    save_file(tensors, str(bad), metadata=_meta(bad))
    with pytest.raises(ModelLoadError, match="bad.safetensors.*missing mm_adapter.adapters.1"):
        mmig.load_mmig(bad)
    good = mmig.save_mmig(tmp_path / "stray.safetensors", mmig.MMAdapters(32, 2))
    save_file({**_read(good), "mmsm.x": torch.zeros(1)}, str(good), metadata=_meta(good))
    with pytest.raises(ModelLoadError, match="stray.safetensors.*no module .*mmsm.x"):
        mmig.load_mmig(good)
    with pytest.raises(InputError, match="no module"):
        mmig.save_mmig(tmp_path / "empty.safetensors")


def _read(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def _meta(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


# --- nodes ----------------------------------------------------------------------------------

PHOTO = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(3))


def test_the_nodes_load_and_apply_under_inference_mode(tiny_root, tiny_models, clean_paths,
                                                       tiny_ip2p):
    from xmgie.nodes import NODE_CLASS_MAPPINGS as nodes

    tiny_models("mgie")
    tiny_models("mmig")
    paths.configure(models_dir=[tiny_root])
    with torch.inference_mode():                        # as ComfyUI runs every node
        (modules,) = nodes["XMGIELoadMMIG"]().load("tiny-mmig.safetensors")
        (base,) = nodes["XMGIELoadMGIE"]().load("tiny-mgie", "fp32")
        ids = IDS[:1]
        ref = base.llm(input_ids=ids).logits
        (adapted,) = nodes["XMGIEApplyMMAdapter"]().apply(base, modules)
        assert adapted is not base and adapted.llm is not base.llm
        assert not torch.equal(adapted.llm(input_ids=ids).logits, ref)
        assert torch.equal(base.llm(input_ids=ids).logits, ref)   # the given model as it was
        instruct = nodes["XMGIEMGIEInstruction"]()
        cond, _ = instruct.instruct(adapted, PHOTO, "make it red", 3)   # it generates
        cond_base, _ = instruct.instruct(base, PHOTO, "make it red", 3)

        sampler = nodes["XMGIEInstructSampler"]()

        def edit(sd):
            out = sampler.sample(sd, PHOTO, cond_base, 2, 7.5, 1.5, 0, "", True)
            return (out["result"] if isinstance(out, dict) else out)[0]["samples"]

        before = edit(tiny_ip2p)
        (with_mmsm,) = nodes["XMGIEApplyMMSM"]().apply(tiny_ip2p, modules, cond)
        assert with_mmsm.unet is not tiny_ip2p.unet
        assert not torch.equal(edit(with_mmsm), before)
        assert torch.equal(edit(tiny_ip2p), before)              # the given model as it was
        assert not tiny_ip2p.unet.up_blocks[0]._forward_hooks
        wrong = type(cond)(cond=torch.zeros(1, 77, 16), null=torch.zeros(1, 77, 16))
        with pytest.raises(InputError, match="conditioning.*text width"):
            nodes["XMGIEApplyMMSM"]().apply(tiny_ip2p, modules, wrong)
    with pytest.raises(ModelNotFoundError, match="missing.safetensors"):
        nodes["XMGIELoadMMIG"]().load("missing.safetensors")
    corrupt = tiny_root / "xmgie_mmig" / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    try:
        with pytest.raises(ModelLoadError, match="corrupt.safetensors"):
            nodes["XMGIELoadMMIG"]().load("corrupt.safetensors")
    finally:
        corrupt.unlink()


def test_tiny_mode_finds_the_tiny_file(tiny_root, tiny_models, clean_paths, tiny_sd):
    from xmgie.mgie_core import tiny
    from xmgie.nodes import mmig as mmig_nodes

    tiny_models("mmig")
    paths.configure(tiny_root=tiny_root)
    listed = mmig_nodes.LoadMMIG.INPUT_TYPES()["required"]["mmig_name"][0]
    assert listed == ["mmig.safetensors"]
    (modules,) = mmig_nodes.LoadMMIG().load("any name")
    assert modules.path == tiny.tiny_path(tiny_root, "mmig")
    assert modules.mmsm.site == mmig.default_site(tiny_sd.unet)
    assert modules.adapters.config["num_layers"] == 2 and modules.meta == {"tiny": True}
    assert not any(p.requires_grad for p in modules.mmsm.parameters())
