"""Image and mask checks shared by every stage (ComfyUI conventions: images float32
[B,H,W,3] in 0..1, masks [B,H,W] or [H,W] in 0..1).

Besides the layout, every image is checked for values: NaN or Inf pixels (a broken model
upstream, an fp16 overflow) and values outside 0..1 (another node's 0..255 image) are
refused with the input's name rather than saved as a black or saturated picture; and
for size: an image above :func:`max_pixels` (16.8 megapixels, 4096x4096, by default;
``XMGIE_MAX_IMAGE_PIXELS`` or ``xmgie run --max-image-pixels`` raise it) is refused
before any work, since memory and time grow with the pixel count.

A photo whose sides are not multiples of the model's size step is fitted to it
(:func:`fit_image`, :class:`Fit`): reflect-padded by default and cropped back after the
edit, or centre-cropped, or refused, as the caller's ``fit`` says.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from .errors import InputError

ENV_MAX_PIXELS = "XMGIE_MAX_IMAGE_PIXELS"
DEFAULT_MAX_PIXELS = 4096 * 4096
# How far outside 0..1 an IMAGE may stray: resampling (ComfyUI's bicubic upscale does not
# clamp) overshoots by a few percent at sharp edges, which is still a 0..1 image; values
# a quarter of the range beyond it are another convention (0..255, -1..1).
RANGE_TOLERANCE = 0.25

_max_pixels: int | None = None


def set_max_pixels(limit: int | None) -> None:
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
                max_batch: int | None = None) -> torch.Tensor:
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


# --- fitting a photo to the model's multiple ------------------------------------------------
#
# SD 1.x works on sides that are multiples of 64 pixels: the VAE divides by 8 and the
# UNet halves the latent three times, and the attention controls address every level at
# exactly 1/2, 1/4, 1/8 of the latent. Most photos (451x300, 640x427, COCO) are not.
# ComfyUI's VAE Encode centre-crops to a multiple of 8 and loses those pixels; the pack
# pads instead (reflected, so the border continues the photo and the model sees no hard
# edge), edits, and crops the result back: the edit has the photo's exact size.

FITS = ("pad", "crop", "refuse")
LATENT_FIT_KEY = "xmgie_fit"   # where a LATENT dict carries how its photo was fitted


@dataclasses.dataclass(frozen=True)
class Fit:
    """How a photo of ``size`` (H, W) was brought to ``fitted`` (H, W): ``mode`` "pad"
    (the photo sits at ``offset`` (top, left) inside the fitted image) or "crop" (the
    fitted image is the photo's region at ``offset``)."""

    mode: str
    size: tuple[int, int]
    fitted: tuple[int, int]
    offset: tuple[int, int] = (0, 0)

    @property
    def changed(self) -> bool:
        return self.size != self.fitted

    def _region(self, x: torch.Tensor, h_dim: int) -> torch.Tensor:
        """The photo's region of a fitted-size tensor (pad), or the fitted region of a
        photo-size one (crop)."""
        (top, left), (h, w) = self.offset, (self.size if self.mode == "pad" else self.fitted)
        return x.narrow(h_dim, top, h).narrow(h_dim + 1, left, w)

    def image(self, image: torch.Tensor) -> torch.Tensor:
        """IMAGE [B,H,W,C] of the photo's size -> the fitted image."""
        if not self.changed:
            return image
        if self.mode == "crop":
            return self._region(image, 1)
        return _reflect_pad(image.permute(0, 3, 1, 2), self.size, self.fitted,
                            self.offset).permute(0, 2, 3, 1).contiguous()

    def mask(self, mask: torch.Tensor) -> torch.Tensor:
        """MASK [B,H,W] of the photo's size -> the fitted size. Padding is zeros: the
        border is not part of the photo, so it is background to every control (kept from
        the reconstruction, never pulled into an edit) and never edited; a reflected mask
        would mirror the edit region into a border that is cropped away."""
        if not self.changed or tuple(mask.shape[-2:]) != self.size:
            return mask
        if self.mode == "crop":
            return self._region(mask, mask.ndim - 2)
        (top, left), (h, w), (fh, fw) = self.offset, self.size, self.fitted
        return torch.nn.functional.pad(mask, (left, fw - w - left, top, fh - h - top))

    def undo(self, image: torch.Tensor) -> torch.Tensor:
        """A decoded IMAGE [B,H,W,C] of the fitted size -> the photo's size (pad); a
        crop cannot be undone, so a cropped edit keeps the fitted size."""
        if self.mode != "pad" or not self.changed or tuple(image.shape[1:3]) != self.fitted:
            return image
        return self._region(image, 1).contiguous()

    def undo_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """A MASK [B,H,W] of the fitted size -> the photo's size (pad: cropped back;
        crop: the cut-off border added back as background)."""
        if not self.changed or tuple(mask.shape[-2:]) != self.fitted:
            return mask
        if self.mode == "pad":
            return self._region(mask, mask.ndim - 2).contiguous()
        (top, left), (h, w), (fh, fw) = self.offset, self.size, self.fitted
        return torch.nn.functional.pad(mask, (left, w - fw - left, top, h - fh - top))

    def as_dict(self) -> dict:
        return {"mode": self.mode, "size": list(self.size), "fitted": list(self.fitted),
                "offset": list(self.offset)}

    @classmethod
    def from_dict(cls, d: Any) -> Fit | None:
        try:
            return cls(str(d["mode"]), tuple(int(v) for v in d["size"]),
                       tuple(int(v) for v in d["fitted"]), tuple(int(v) for v in d["offset"]))
        except (TypeError, KeyError, ValueError):
            return None


def _reflect_pad(x: torch.Tensor, size, fitted, offset) -> torch.Tensor:
    """[B,C,H,W] reflect-padded to ``fitted``; a pad wider than the photo (a tiny photo)
    reflects repeatedly, as reflection of a reflection is still the photo's continuation."""
    (top, left), (fh, fw) = offset, fitted
    while tuple(x.shape[-2:]) != tuple(fitted):
        h, w = x.shape[-2:]
        pads = [min(left, w - 1), min(fw - w - left, w - 1),
                min(top, h - 1), min(fh - h - top, h - 1)]
        if not any(pads):     # a 1-pixel side cannot reflect: repeat it
            return torch.nn.functional.pad(x, (left, fw - w - left, top, fh - h - top),
                                           mode="replicate")
        x = torch.nn.functional.pad(x, pads, mode="reflect")
        left, top = left - pads[0], top - pads[2]
    return x


def fit_image(name: str, image: torch.Tensor, multiple: int, fit: str = "pad",
              max_batch: int | None = None, smallest: int = 8) -> tuple[torch.Tensor, Fit]:
    """Check an IMAGE (:func:`check_image`; sides of at least ``smallest`` pixels, the
    VAE's factor: a smaller one is no photo, padding it would only invent one) and fit it
    to sides that are multiples of ``multiple`` by ``fit`` (:data:`FITS`): the fitted
    image and how it was fitted."""
    if fit not in FITS:
        raise InputError("fit", f"is {fit!r}", " / ".join(FITS))
    image = check_image(name, image, multiple_of=1, max_batch=max_batch)
    h, w = (int(s) for s in image.shape[1:3])
    if w < smallest or h < smallest:
        check_image(name, image, multiple_of=smallest)      # its error: a real size
    m = max(1, int(multiple))
    if fit == "crop":
        fitted = (h // m * m, w // m * m)
        if not all(fitted):
            raise InputError(name, f"is {w}x{h} pixels, smaller than the model's size step "
                             f"({m}x{m}), so cropping leaves nothing", "a larger image",
                             "Use fit = pad, or a larger image.")
        offset = ((h - fitted[0]) // 2, (w - fitted[1]) // 2)     # centred, as ComfyUI
    else:
        fitted = (-(-h // m) * m, -(-w // m) * m)
        if fit == "refuse" and fitted != (h, w):
            raise InputError(name, f"is {w}x{h} pixels", f"width and height that are "
                             f"multiples of {m} (the model's size step)",
                             f"Set fit to pad (edits it at {fitted[1]}x{fitted[0]} and crops "
                             f"the result back to {w}x{h}) or crop (to "
                             f"{w // m * m}x{h // m * m}), or resize the photo.")
        offset = ((fitted[0] - h) // 2, (fitted[1] - w) // 2)
    f = Fit(fit, (h, w), fitted, offset)
    return f.image(image), f
