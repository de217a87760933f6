"""Tiny trained xMGIE modules: PFB weights and an identity injection made for the tiny SD
UNet and the tiny CLIP vision encoder, written in the trained-modules folder layout
(:mod:`..trained`), with a LoRA adapter for the UNet's attention projections in
``unet_lora/`` (diffusers' LoRA layout), so ``--tiny`` runs a template that edits with
trained modules.

The values are seeded random ones away from the initial ones (a_l below 1, non-zero
projections and LoRA up-projections), so loading them changes an edit, as trained
modules do; like every tiny model they mean nothing. A real run's ``final/`` has the
same layout (``xmgie train configs/train/xmgie.yaml``)."""

from __future__ import annotations

from pathlib import Path

import torch

from .sd import unet_config

UNET_LORA = "unet_lora"
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]   # the shipped xMGIE config's
# The embedding width of identity.make_clip_vision (its projection_dim): the encoder the
# tiny template embeds the source photo with.
TINY_CLIP_EMBED_DIM = 16


def make_xmgie_trained(folder: Path | str, seed: int = 0) -> None:
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from ..trainable import IdentityInjection, PFBWeights
    from ..trained import save_xmgie

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config())
    pfb = PFBWeights.for_unet(unet, preset="object", placement="pfb_diff")
    ie = IdentityInjection.for_unet(unet, TINY_CLIP_EMBED_DIM, encoder_kind="clip_vision")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        pfb.raw.copy_(torch.rand(pfb.raw.shape, generator=g) * 0.6 + 0.2)   # a_l in [0.2, 0.8]
        for p in ie.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    save_xmgie(Path(folder), pfb, ie)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=LORA_TARGETS,
                                init_lora_weights="gaussian"))
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:        # B = 0 would leave the UNet as it is
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    unet.save_lora_adapter(str(Path(folder) / UNET_LORA))
