"""A tiny random-weight Segment Anything, saved as a plain state dict like the official
sam_vit_*.pth files (one windowed and one global encoder block, so the loader's
architecture inference sees both kinds)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..models.sam import SamArch, build_sam

TINY_ARCH = SamArch(
    img_size=256, patch_size=16, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4.0,
    out_chans=32, qkv_bias=True, use_abs_pos=True, use_rel_pos=True, window_size=4,
    global_attn_indexes=(1,), prompt_embed_dim=32, mask_in_chans=16,
    num_multimask_outputs=3, decoder_depth=2, decoder_mlp_dim=64, decoder_heads=8,
    attention_downsample_rate=2, iou_head_depth=3, iou_head_hidden_dim=32)


def make_sam(path: Path | str, seed: int = 0) -> None:
    torch.manual_seed(seed)
    sam = build_sam(TINY_ARCH)
    with torch.no_grad():
        # Official files have trained (non-zero) relative positions and positions.
        for name, p in sam.named_parameters():
            if "rel_pos" in name or name.endswith("pos_embed"):
                p.normal_(0, 0.02)
    torch.save(sam.state_dict(), Path(path))
