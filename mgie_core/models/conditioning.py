"""The condition an instruction UNet is sampled with (socket type XMGIE_CONDITIONING).

It sits at the bottom of the model layer: MGIE's edit head (``models.mgie``) produces one
and the instruction sampler consumes one, so neither has to import the other.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class Conditioning:
    """Text conditioning for the instruction UNet: CLIP-encoded text or MGIE's visual
    tokens through its edit head (custom socket type XMGIE_CONDITIONING)."""

    cond: torch.Tensor   # (1, 77, D)
    null: torch.Tensor   # (1, 77, D)
    text: str = ""
    source: str = "clip"
    dropped: str = ""    # the end of ``text`` past the text encoder's window (CLIP only)

    def __repr__(self) -> str:
        return f"Conditioning({self.source}, {tuple(self.cond.shape)}, '{self.text[:40]}')"
