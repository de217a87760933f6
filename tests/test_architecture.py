"""The UNet's layer geometry (mgie_core/architecture.py) against the real forward of a
diffusers UNet: every attention layer's resolution and call order, and every block's
output size, recorded with forward hooks for latents of odd, non-square sizes."""

from __future__ import annotations

import pytest
import torch

from xmgie.mgie_core import attention
from xmgie.mgie_core.architecture import SD1, architecture_of, layer_hw

SIZES = [(16, 16), (13, 10), (9, 17)]


@pytest.fixture(scope="module")
def unet(tiny_sd):
    return tiny_sd.unet


def _forward(unet, hw):
    emb = torch.zeros(1, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        unet(torch.zeros(1, 4, *hw), torch.tensor([500]), encoder_hidden_states=emb)


def _record(unet, hw):
    """(attention layers in call order with their (tokens, h, w) from the hidden states,
    block name -> output (h, w))."""
    layers = {l.name: l for l in attention.attention_layers(unet)}
    calls: list[tuple[str, int]] = []
    blocks: dict[str, tuple[int, int]] = {}
    handles = []
    mods = dict(unet.named_modules())
    for name in layers:
        handles.append(mods[name].register_forward_pre_hook(
            lambda m, a, kw, name=name: calls.append((name, a[0].shape[1] if a else
                                                      kw["hidden_states"].shape[1])),
            with_kwargs=True))
    block_names = [f"down_blocks.{i}" for i in range(len(unet.down_blocks))] + ["mid_block"] \
        + [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]
    for b in block_names:
        def out_hw(m, a, o, b=b):
            o = o[0] if isinstance(o, tuple) else o
            blocks[b] = tuple(o.shape[-2:])
        handles.append(mods[b].register_forward_hook(out_hw))
    try:
        _forward(unet, hw)
    finally:
        for h in handles:
            h.remove()
    return calls, blocks


def test_the_tiny_and_the_sd15_unets_are_sd1():
    from diffusers import UNet2DConditionModel

    from xmgie.mgie_core.models.sd import CONFIG_DIR

    cfg = UNet2DConditionModel.load_config(CONFIG_DIR / "unet")
    with torch.device("meta"):
        sd15 = UNet2DConditionModel.from_config(cfg)
    assert architecture_of(sd15) is SD1 and SD1.levels == 4


@pytest.mark.parametrize("hw", SIZES)
def test_layer_levels_sizes_and_order_follow_the_forward(unet, hw):
    arch = architecture_of(unet)
    assert arch is SD1
    calls, blocks = _record(unet, hw)
    sizes = arch.level_sizes(hw)
    for name, tokens in calls:
        want = sizes[arch.level(name)]
        assert tokens == want[0] * want[1], (name, tokens, want)
        assert layer_hw(hw, tokens) == want, name
        assert arch.factor(name) == 2 ** arch.level(name)
    # the forward calls the layers in execution_rank order, and the last one last
    names = [n for n, _ in calls]
    assert names == sorted(names, key=arch.execution_rank)
    assert arch.last_in_execution(names) == names[-1]
    for block, out in blocks.items():
        assert out == sizes[arch.block_output_level(block)], (block, out)


def test_size_at_factor_is_the_level_size(unet):
    for hw in SIZES:
        for level, size in enumerate(SD1.level_sizes(hw)):
            assert SD1.size_at_factor(hw, 2 ** level) == size


def test_an_unknown_block_layout_gets_the_same_rules():
    from types import SimpleNamespace

    unet = SimpleNamespace(config=SimpleNamespace(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        sample_size=128))
    arch = architecture_of(unet)
    assert arch is not SD1 and arch.levels == 3 and arch.base_latent == 128
    assert arch.level("mid_block.attentions.0") == 2 and arch.level("up_blocks.2.x") == 0
    with pytest.raises(ValueError, match="unknown UNet block"):
        arch.level("conv_in")
