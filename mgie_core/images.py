"""Image and mask checks shared by every stage (ComfyUI conventions: images float32
[B,H,W,3] in 0..1, masks [B,H,W] or [H,W] in 0..1)."""

from __future__ import annotations

import torch

from .errors import InputError


def check_image(name: str, image: torch.Tensor, multiple_of: int = 1) -> torch.Tensor:
    """Validate an IMAGE tensor and return it as [B,H,W,3] float32."""
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
    h, w = image.shape[1:3]
    if multiple_of > 1 and (h % multiple_of or w % multiple_of):
        raise InputError(name, f"is {w}x{h} pixels",
                         f"width and height that are multiples of {multiple_of}",
                         f"Resize or crop it, e.g. to {w // multiple_of * multiple_of}x"
                         f"{h // multiple_of * multiple_of}.")
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
    mask = mask.float()
    if not allow_empty and not bool((mask > 0.5).any()):
        raise InputError(name, "is empty (no pixel above 0.5)", "a mask that marks the "
                         "region to edit in white", "Draw the region, or check the mask "
                         "is not inverted.")
    if not allow_full and bool((mask > 0.5).all()):
        raise InputError(name, "covers the whole image", "a mask that leaves some "
                         "background", "Use a smaller region, or edit without a mask.")
    return mask
