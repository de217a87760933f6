"""Image and mask checks shared by every stage (ComfyUI conventions: images float32
[B,H,W,3] in 0..1, masks [B,H,W] or [H,W] in 0..1).

Besides the layout, every image is checked for values: NaN or Inf pixels (a broken model
upstream, an fp16 overflow) and values outside 0..1 (another node's 0..255 image) are
refused with the input's name rather than saved as a black or saturated picture; and
for size: an image above :func:`max_pixels` (16.8 megapixels, 4096x4096, by default;
``XMGIE_MAX_IMAGE_PIXELS`` or ``xmgie run --max-image-pixels`` raise it) is refused
before any work, since memory and time grow with the pixel count.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from .errors import InputError

ENV_MAX_PIXELS = "XMGIE_MAX_IMAGE_PIXELS"
DEFAULT_MAX_PIXELS = 4096 * 4096
# How far outside 0..1 an IMAGE may stray: resampling (ComfyUI's bicubic upscale does not
# clamp) overshoots by a few percent at sharp edges, which is still a 0..1 image; values
# a quarter of the range beyond it are another convention (0..255, -1..1).
RANGE_TOLERANCE = 0.25

_max_pixels: Optional[int] = None


def set_max_pixels(limit: Optional[int]) -> None:
    """Override the pixel limit for this process (None: back to the env var / default)."""
    global _max_pixels
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise InputError("max image pixels", f"got {limit!r}", "a whole number of pixels >= 1")
    _max_pixels = limit


def max_pixels() -> int:
    """Largest image (width x height) the pack accepts: :func:`set_max_pixels`, else
    ``XMGIE_MAX_IMAGE_PIXELS``, else 4096 x 4096."""
    if _max_pixels is not None:
        return _max_pixels
    env = os.environ.get(ENV_MAX_PIXELS, "").strip().replace("_", "")
    if env:
        try:
            value = int(float(env))
        except ValueError:
            raise InputError(ENV_MAX_PIXELS, f"is {env!r}", "a whole number of pixels, e.g. "
                             "67108864 for 8192x8192") from None
        if value >= 1:
            return value
    return DEFAULT_MAX_PIXELS


def check_size(name: str, width: int, height: int, frames: int = 1) -> None:
    """Refuse an image (or all frames of one) above :func:`max_pixels`."""
    limit = max_pixels()
    total = int(width) * int(height) * max(1, int(frames))
    if total > limit:
        what = f"is {width}x{height} pixels" + (f" x {frames} frames" if frames > 1 else "")
        raise InputError(name, f"{what} ({total / 1e6:.1f} megapixels), above the limit of "
                         f"{limit / 1e6:.1f} megapixels", "a smaller image",
                         "Resize it first, or raise the limit with the XMGIE_MAX_IMAGE_PIXELS "
                         "environment variable (xmgie run: --max-image-pixels); memory and "
                         "time grow with the pixel count.")


def check_finite(name: str, tensor: torch.Tensor, what: str = "values",
                 fix: str = "") -> None:
    """Refuse NaN or Inf in ``tensor``, counting them."""
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        return
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return
    nan = int(torch.isnan(tensor).sum())
    inf = int(tensor.numel() - int(finite.sum()) - nan)
    parts = [f"{nan} NaN" if nan else "", f"{inf} infinite" if inf else ""]
    raise InputError(name, f"holds {' and '.join(p for p in parts if p)} {what} (of "
                     f"{tensor.numel()})", f"finite {what}",
                     fix or "Something upstream produced them: check the node that made this "
                     "input (a damaged model file, or half precision overflowing: try fp32).")


def check_pixels(name: str, image: torch.Tensor) -> None:
    """Values of an IMAGE: finite, and in 0..1 (give or take :data:`RANGE_TOLERANCE`)."""
    check_finite(name, image, "pixel values")
    if image.numel() == 0 or not image.is_floating_point():
        return
    lo, hi = float(image.min()), float(image.max())
    if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
        hint = (" It looks like 0..255: divide by 255." if hi > 2 and lo >= -RANGE_TOLERANCE
                else " It looks like -1..1: map it with (x + 1) / 2." if lo < -0.5 else "")
        raise InputError(name, f"has values from {lo:g} to {hi:g}", "an IMAGE in 0..1 "
                         "(ComfyUI's convention)", f"Convert it before this node.{hint}")


def check_image(name: str, image: torch.Tensor, multiple_of: int = 1,
                max_batch: Optional[int] = None) -> torch.Tensor:
    """Validate an IMAGE tensor (layout, values, size) and return it as [B,H,W,3]
    float32. ``max_batch`` refuses larger batches (stages that edit one image)."""
    if not isinstance(image, torch.Tensor):
        raise InputError(name, f"got {type(image).__name__}", "an image tensor [B,H,W,3]")
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4:
        raise InputError(name, f"has shape {tuple(image.shape)}", "an image [B,H,W,3]")
    c = image.shape[-1]
    if c == 4:
        raise InputError(name, "has 4 channels (RGBA)", "an RGB image with 3 channels",
                         "Drop the alpha channel first (ComfyUI's LoadImage already "
                         "returns RGB and gives alpha as a separate MASK).")
    if c == 1:
        raise InputError(name, "has 1 channel (grayscale)", "an RGB image with 3 channels",
                         "Convert it to RGB first (repeat the channel three times).")
    if c != 3:
        raise InputError(name, f"has {c} channels in its last dimension (shape "
                         f"{tuple(image.shape)})", "an image [B,H,W,3] (channels last)")
    b, h, w = image.shape[:3]
    if b == 0 or h == 0 or w == 0:
        raise InputError(name, f"is empty (shape {tuple(image.shape)})", "an image [B,H,W,3]")
    if max_batch is not None and b > max_batch:
        most = "one image" if max_batch == 1 else f"at most {max_batch} images"
        raise InputError(name, f"is a batch of {b} images (an animated file gives one per "
                         "frame)", most,
                         "Pick one image of the batch first (ComfyUI: 'Image From Batch'), or "
                         "run the workflow once per image.")
    check_size(name, w, h)
    m = max(1, multiple_of)
    if w < m or h < m:
        raise InputError(name, f"is {w}x{h} pixels, smaller than the smallest size this "
                         f"stage works on ({m}x{m})", "a photo-sized image",
                         "Use a larger image; Stable Diffusion 1.x works best at about "
                         "512x512 (e.g. resize it to 512x512).")
    if m > 1 and (h % m or w % m):
        raise InputError(name, f"is {w}x{h} pixels",
                         f"width and height that are multiples of {m}",
                         f"Resize or crop it, e.g. to {w // m * m}x{h // m * m}.")
    check_pixels(name, image)
    return image.float()


def check_mask(name: str, mask: torch.Tensor, size: tuple[int, int] | None = None,
               allow_empty: bool = False, allow_full: bool = True) -> torch.Tensor:
    """Validate a MASK and return it as [B,H,W] float32. ``size`` is (H, W) of the image
    it belongs to: a mask of another size is an error (resizing silently would move the
    edit region)."""
    if not isinstance(mask, torch.Tensor):
        raise InputError(name, f"got {type(mask).__name__}", "a mask tensor [B,H,W]")
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim == 4 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.ndim != 3:
        raise InputError(name, f"has shape {tuple(mask.shape)}", "a mask [B,H,W] or [H,W]")
    if size is not None and tuple(mask.shape[1:]) != tuple(size):
        raise InputError(name, f"is {mask.shape[2]}x{mask.shape[1]} pixels but the image is "
                         f"{size[1]}x{size[0]}", "a mask of the image's size",
                         "Resize the mask to the image (e.g. with a mask resize node) or "
                         "make it from this image.")
    check_finite(name, mask, "mask values")
    mask = mask.float()
    if not allow_empty and not bool((mask > 0.5).any()):
        raise InputError(name, "is empty (no pixel above 0.5)", "a mask that marks the "
                         "region to edit in white", "Draw the region, or check the mask "
                         "is not inverted.")
    if not allow_full and bool((mask > 0.5).all()):
        raise InputError(name, "covers the whole image", "a mask that leaves some "
                         "background", "Use a smaller region, or edit without a mask.")
    return mask
