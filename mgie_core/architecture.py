"""The UNet's layer geometry: for each UNet architecture the pack knows (SD 1.x, SD 2.x,
SDXL), its blocks, the level (resolution) every layer works at, the feature size of a
level for a given latent size, the order in which the forward runs the layers, and
which layers each control uses.

Layers are named as diffusers' ``UNet2DConditionModel`` names them
(``down_blocks.2.attentions.0.transformer_blocks.0.attn2``, ``mid_block...``,
``up_blocks.1...``). A layer at level ``l`` works at latent / 2**l: level 0 is the
latent's own resolution (64x64 for a 512 px image in SD 1.x, 128x128 for a 1024 px one
in SDXL), each down block but the last ends with a downsampler (one level down), each
up block but the last with an upsampler (one level up), and the middle block works at
the lowest level.

Every architecture is one :class:`UNetArchitecture` in ``ARCHITECTURES``, recognised by
its config (:func:`architecture_of`): SDXL by its three-level block layout (no attention
at level 0) and its added "text_time" conditioning; SD 2.x by SD 1.x's block layout with
linear projections in the transformers and 1024-wide cross-attention (OpenCLIP-H); SD
1.x by the rest of that layout. The tiny test models have each family's layout at a
small width, and are recognised as that family.

The controls choose their layers by *level*, i.e. by resolution relative to the latent,
so a choice made at 512 px on SD 1.5 means the same fraction of the image at any size
and on any family (:class:`LayerChoices`; docs/algorithms.md section 0 has the table).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import Any

MID = "mid_block"


@dataclasses.dataclass(frozen=True)
class LayerChoices:
    """Which layers each control uses, by level (latent / 2**level). Levels, not layer
    names, so that one choice serves every image size; the names follow from the UNet
    (:meth:`UNetArchitecture.cross_layers_at`). SD 1.5 at 512 px (64x64 latent) is the
    reference the published methods were made on: level 1 is 32x32 there, level 2 16x16,
    level 3 8x8."""

    map_level: int = 2
    """Cross-attention maps read by MAG (docs/algorithms.md section 6), A-STAR (section 7)
    and the attention masks (section 11): the cross-attention layers at latent / 4
    in the down and up blocks (:attr:`map_blocks`; SD 1.5: the five 16x16 layers; SDXL
    at 1024 px: the 50 layers at 32x32 of the 10-deep transformers of down_blocks.2 and
    up_blocks.0). The losses' truncated forward stops after the last of them in
    execution order."""
    map_blocks: tuple[str, ...] = ("down_blocks", "up_blocks")
    """Where the maps are read: prompt-to-prompt's and MAG-Edit's aggregation reads the
    down and up blocks (``from_where=("up", "down")``), not the middle. On SD 1.x the
    middle is at latent / 8 anyway; on SDXL it is at latent / 4, and the same rule
    leaves it out (its 10 layers would otherwise be a sixth of the maps)."""
    injection_self_min_level: int = 1
    """Prompt-to-prompt's self-attention injection (section 3): layers at latent / 2 and
    below ("32x32 and below" at 512 px); cross-attention injection uses every layer."""
    cam_layers: tuple[str, ...] = ()
    """CAM's default cross-attention layers (section 4), as layer or block prefixes:
    PFB-Diff's choice on SD 1.5 is every layer at latent / 4 and latent / 8 plus the
    first two attention layers of the up block at latent / 2."""
    pfb_feature_level: int = 2
    """PFB's feature sites (section 5): latent / 4 and below (16x16 and 8x8 at 512 px on
    SD 1.5; 32x32 at 1024 px on SDXL, whose lowest level that is)."""
    pfb_block_outputs: tuple[tuple[str, tuple[str, ...]], ...] = ()
    """PFB's ``block_outputs`` placement: (preset, blocks whose outputs are blended)."""

    def pfb_blocks(self, preset: str) -> tuple[str, ...]:
        return dict(self.pfb_block_outputs)[preset]


@dataclasses.dataclass(frozen=True)
class UNetArchitecture:
    """The layer geometry of one UNet family (diffusers block types, training size)."""

    name: str                            # as users know it, e.g. "SD 1.x"
    down_block_types: tuple[str, ...]    # diffusers' down_block_types, in order
    up_block_types: tuple[str, ...]      # diffusers' up_block_types, in order
    base_latent: int                     # latent side at the training resolution
    layers: LayerChoices = LayerChoices()
    # Besides the block types: the config fields that tell this family from another with
    # the same blocks (SD 2.x from SD 1.x), as a predicate on the config.
    config_test: Callable[[Any], bool] | None = dataclasses.field(default=None, compare=False,
                                                                   repr=False)

    @property
    def levels(self) -> int:
        """Number of resolution levels (one per down block)."""
        return len(self.down_block_types)

    def matches(self, config: Any) -> bool:
        """Whether a UNet with this diffusers config has this architecture."""
        return (tuple(_get(config, "down_block_types", ())) == self.down_block_types
                and tuple(_get(config, "up_block_types", ())) == self.up_block_types
                and (self.config_test is None or bool(self.config_test(config))))

    # -- the controls' layers -----------------------------------------------------------
    def cross_layers_at(self, unet, level: int) -> list[str]:
        """Names of ``unet``'s cross-attention layers (``...attn2``) at ``level``, in the
        order the forward runs them."""
        names = [n[: -len(".processor")] for n in unet.attn_processors
                 if n.endswith("attn2.processor")]
        return sorted((n for n in names if self.level(n) == level), key=self.execution_rank)

    def map_layers(self, unet) -> list[str]:
        """The cross-attention layers whose maps MAG, A-STAR and the masks read
        (:attr:`LayerChoices.map_level` in :attr:`LayerChoices.map_blocks`), in execution
        order."""
        return [n for n in self.cross_layers_at(unet, self.layers.map_level)
                if self.block(n)[0] in self.layers.map_blocks]

    def map_size(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """The size of those maps for a latent of ``latent_hw``."""
        return self.feature_size(latent_hw, self.layers.map_level)

    def injects_self_attention(self, level: int) -> bool:
        """Whether prompt-to-prompt injects self-attention at a layer of ``level``."""
        return level >= self.layers.injection_self_min_level

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


def _get(config: Any, key: str, default=None):
    """A field of a diffusers config (a FrozenDict with attribute access) or a dict."""
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


def _is_sd2(config: Any) -> bool:
    """SD 2.x's UNet has SD 1.x's blocks, but linear projections in and out of its
    transformers and 1024-wide cross-attention (OpenCLIP-H's width); SD 1.x's has
    convolutions (``use_linear_projection`` false) and 768 (CLIP-L)."""
    return bool(_get(config, "use_linear_projection", False)) \
        or _get(config, "cross_attention_dim") == 1024


def _is_sdxl(config: Any) -> bool:
    """SDXL adds the pooled text embedding and the size/crop time ids to the timestep
    embedding (``addition_embed_type`` "text_time")."""
    return _get(config, "addition_embed_type") == "text_time"


_SD1_BLOCKS = dict(down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                   up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)

# SD 1.x and 2.x (same blocks): at 512 px, 16x16 and 8x8 plus two 32x32 layers for CAM.
_SD1_LAYERS = LayerChoices(
    cam_layers=("down_blocks.2", "mid_block", "up_blocks.1",
                "up_blocks.2.attentions.0", "up_blocks.2.attentions.1"),
    pfb_block_outputs=(
        ("object", ("down_blocks.2", "mid_block", "up_blocks.0", "up_blocks.1")),
        ("background", ("down_blocks.1", "down_blocks.2", "down_blocks.3", "mid_block",
                        "up_blocks.0", "up_blocks.1", "up_blocks.2"))))

# SDXL: three levels (128, 64 and 32 at 1024 px), no attention at level 0, the
# 10-deep transformers at level 2. The same levels as SD 1.x wherever SDXL has them;
# latent / 8 does not exist, so what SD 1.x does there is dropped (CAM's and PFB's
# 8x8), never moved to another resolution.
_SDXL_LAYERS = LayerChoices(
    cam_layers=("down_blocks.2", "mid_block", "up_blocks.0",
                "up_blocks.1.attentions.0", "up_blocks.1.attentions.1"),
    pfb_block_outputs=(
        ("object", ("down_blocks.2", "mid_block", "up_blocks.0")),
        ("background", ("down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.0",
                        "up_blocks.1"))))

SD1 = UNetArchitecture(name="SD 1.x", **_SD1_BLOCKS, base_latent=64, layers=_SD1_LAYERS,
                       config_test=lambda c: not _is_sd2(c) and not _is_sdxl(c))

SD2 = UNetArchitecture(name="SD 2.x", **_SD1_BLOCKS, base_latent=96, layers=_SD1_LAYERS,
                       config_test=lambda c: _is_sd2(c) and not _is_sdxl(c))

SDXL = UNetArchitecture(
    name="SDXL",
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    base_latent=128, layers=_SDXL_LAYERS, config_test=_is_sdxl)

ARCHITECTURES: tuple[UNetArchitecture, ...] = (SD1, SD2, SDXL)


def architecture_of(unet) -> UNetArchitecture:
    """The architecture of a diffusers UNet, from its config (block types, and the fields
    that tell families with the same blocks apart). A UNet that is
    no known entry gets the same geometry rules for its own block types (diffusers
    builds every ``UNet2DConditionModel`` by them), named by its level count."""
    config = getattr(unet, "config", None)
    for arch in ARCHITECTURES:
        if arch.matches(config):
            return arch
    down = tuple(_get(config, "down_block_types", ()))
    up = tuple(_get(config, "up_block_types", ()))
    if not down or len(up) != len(down):
        raise ValueError(f"not a diffusers UNet2DConditionModel config: down blocks {down}, "
                         f"up blocks {up}")
    return UNetArchitecture(name=f"UNet with {len(down)} levels", down_block_types=down,
                            up_block_types=up,
                            base_latent=_side(_get(config, "sample_size")))


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


__all__ = ["UNetArchitecture", "LayerChoices", "SD1", "SD2", "SDXL", "ARCHITECTURES",
           "architecture_of", "layer_hw"]
