"""Tiny MMIG modules (an MM-Adapter for the tiny MGIE LLM and an MMSM for the tiny SD
UNet) in the one-file layout of :func:`mgie_core.mmig.save_mmig`, so ``--tiny`` runs a
graph that loads and applies them.

The layers that start at zero (the adapters' up-projections, MMSM's last decoder layer)
get seeded random values, so applying the file changes the LLM's answer and the UNet's
prediction, as trained modules do; like every tiny model they mean nothing. A real
MMIG run writes the same layout."""

from __future__ import annotations

from pathlib import Path

import torch

from .mgie import HIDDEN
from .sd import unet_config

TINY_LLM_LAYERS = 2          # make_mgie's LLaMA depth
TINY_MMSM_HIDDEN = 32


def make_mmig(path: Path | str, seed: int = 0) -> None:
    from ..mmig import MMSM, MMAdapters, save_mmig

    torch.manual_seed(seed)
    config = unet_config()
    site = "up_blocks.0"        # default_site of the tiny UNet (its output at latent/4)
    channels = config["block_out_channels"][::-1][0]
    adapters = MMAdapters(HIDDEN, TINY_LLM_LAYERS)
    mmsm = MMSM(config["cross_attention_dim"], channels, hidden=TINY_MMSM_HIDDEN, heads=4)
    mmsm.site = site
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in adapters.adapters:
            for up in (a.up1, a.up2):
                up.weight.copy_(torch.randn(up.weight.shape, generator=g) * 0.2)
        last = mmsm.domain_decoder[-1]
        last.weight.copy_(torch.randn(last.weight.shape, generator=g) * 0.2)
    save_mmig(path, adapters, mmsm, meta={"tiny": True})
