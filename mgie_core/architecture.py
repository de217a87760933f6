"""The UNet's layer geometry: for each UNet architecture the pack knows, its blocks, the
level (resolution) every layer works at, the feature size of a level for a given latent
size, and the order in which the forward runs the layers.

Layers are named as diffusers' ``UNet2DConditionModel`` names them
(``down_blocks.2.attentions.0.transformer_blocks.0.attn2``, ``mid_block...``,
``up_blocks.1...``). A layer at level ``l`` works at latent / 2**l: level 0 is the
latent's own resolution (64x64 for a 512 px image in SD 1.x), each down block but the
last ends with a downsampler (one level down), each up block but the last with an
upsampler (one level up), and the middle block works at the lowest level.

Every architecture is one :class:`UNetArchitecture` in ``ARCHITECTURES``, recognised by
its block types (:func:`architecture_of`). SD 1.x (and the tiny test models, which have
its block layout at a small width) is the one entry today; another family (SD 2.x, SDXL)
is one more entry (told apart by whatever distinguishes it: block types, cross-attention
width, sample size), and every stage that needs the geometry asks its UNet's entry.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any

MID = "mid_block"


@dataclasses.dataclass(frozen=True)
class UNetArchitecture:
    """The layer geometry of one UNet family (diffusers block types, training size)."""

    name: str                            # as users know it, e.g. "SD 1.x"
    down_block_types: tuple[str, ...]    # diffusers' down_block_types, in order
    up_block_types: tuple[str, ...]      # diffusers' up_block_types, in order
    base_latent: int                     # latent side at the training resolution

    @property
    def levels(self) -> int:
        """Number of resolution levels (one per down block)."""
        return len(self.down_block_types)

    def matches(self, config: Any) -> bool:
        """Whether a UNet with this diffusers config has this architecture."""
        return (tuple(getattr(config, "down_block_types", ())) == self.down_block_types
                and tuple(getattr(config, "up_block_types", ())) == self.up_block_types)

    # -- which block, which level ---------------------------------------------------
    def block(self, name: str) -> tuple[str, int]:
        """("down_blocks" | "mid_block" | "up_blocks", index) of a layer or block name."""
        parts = name.split(".")
        if parts[0] == MID:
            return MID, 0
        if parts[0] in ("down_blocks", "up_blocks") and len(parts) > 1 and parts[1].isdigit():
            return parts[0], int(parts[1])
        raise ValueError(f"unknown UNet block in layer name {name!r}")

    def level(self, name: str) -> int:
        """Level of a layer inside a block (attention layers, resnets): down block i
        works at level i, the middle at the lowest, up block i at ``levels - 1 - i``."""
        kind, i = self.block(name)
        if kind == MID:
            return self.levels - 1
        if kind == "down_blocks":
            return i
        return self.levels - 1 - i

    def factor(self, name: str) -> int:
        """Downsampling factor of a layer relative to the latent (2**level)."""
        return 2 ** self.level(name)

    def has_downsampler(self, down_block: int) -> bool:
        return down_block < self.levels - 1

    def has_upsampler(self, up_block: int) -> bool:
        return up_block < self.levels - 1

    def block_output_level(self, block: str) -> int:
        """Level of what a whole block outputs: one lower than its layers after a
        downsampler, one higher after an upsampler."""
        kind, i = self.block(block)
        n = self.levels
        if kind == MID:
            return n - 1
        if kind == "down_blocks":
            return min(i + 1, n - 1) if self.has_downsampler(i) else i
        up_level = n - 1 - i
        return up_level - 1 if self.has_upsampler(i) else up_level

    def execution_rank(self, name: str) -> tuple:
        """Sort key: the order in which the forward runs layers (down, middle, up; then
        block, unit and layer numbers)."""
        parts = name.split(".")
        nums = [int(p) for p in parts if p.isdigit()]
        stage = {"down_blocks": 0, MID: 1, "up_blocks": 2}[parts[0]]
        return (stage, *nums, parts[-1])

    def last_in_execution(self, names: Iterable[str]) -> str:
        return max(names, key=self.execution_rank)

    # -- sizes ------------------------------------------------------------------------
    def feature_size(self, latent_hw: tuple[int, int], level: int) -> tuple[int, int]:
        """The feature size at ``level`` for a latent of ``latent_hw``: each downsampler
        (a stride-2 3x3 convolution with padding 1) halves a side rounding up; the up
        path matches the skip connections' sizes."""
        h, w = int(latent_hw[0]), int(latent_hw[1])
        for _ in range(level):
            h, w = (h + 1) // 2, (w + 1) // 2
        return h, w

    def size_at_factor(self, latent_hw: tuple[int, int], factor: int) -> tuple[int, int]:
        """The feature size of the layers at ``factor`` (a power of two)."""
        return self.feature_size(latent_hw, int(factor).bit_length() - 1)

    def level_sizes(self, latent_hw: tuple[int, int]) -> list[tuple[int, int]]:
        """The feature size of every level, level 0 first."""
        return [self.feature_size(latent_hw, level) for level in range(self.levels)]


SD1 = UNetArchitecture(
    name="SD 1.x",
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    base_latent=64)

ARCHITECTURES: tuple[UNetArchitecture, ...] = (SD1,)


def architecture_of(unet) -> UNetArchitecture:
    """The architecture of a diffusers UNet, from its config's block types. A UNet that is
    no known entry gets the same geometry rules for its own block types (diffusers
    builds every ``UNet2DConditionModel`` by them), named by its level count."""
    config = getattr(unet, "config", None)
    for arch in ARCHITECTURES:
        if arch.matches(config):
            return arch
    down = tuple(getattr(config, "down_block_types", ()))
    up = tuple(getattr(config, "up_block_types", ()))
    if not down or len(up) != len(down):
        raise ValueError(f"not a diffusers UNet2DConditionModel config: down blocks {down}, "
                         f"up blocks {up}")
    return UNetArchitecture(name=f"UNet with {len(down)} levels", down_block_types=down,
                            up_block_types=up,
                            base_latent=_side(getattr(config, "sample_size", None)))


def _side(sample_size) -> int:
    """The latent side a config names (an int, or a (height, width) pair)."""
    if isinstance(sample_size, (list, tuple)):
        return int(sample_size[0]) if sample_size else 64
    return int(sample_size) if sample_size else 64


def layer_hw(latent_hw: tuple[int, int], tokens: int) -> tuple[int, int]:
    """Spatial size of an attention layer from its token count (queries) and the call's
    latent size; any architecture (the layer keeps the latent's aspect ratio)."""
    h, w = latent_hw
    f = math.sqrt(h * w / tokens)
    return int(round(h / f)), int(round(w / f))


__all__ = ["UNetArchitecture", "SD1", "ARCHITECTURES", "architecture_of", "layer_hw"]
