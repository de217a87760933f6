"""GB seam blur node: spatially-varying Gaussian blur of the edit-mask boundary."""

from __future__ import annotations

from ..mgie_core import blur, host
from ._common import PREFIX, category, inp


class GBBlur:
    NODE_ID = f"{PREFIX}GBBlur"
    DISPLAY_NAME = "xMGIE GB Seam Blur"
    CATEGORY = category("postprocess")
    DESCRIPTION = ("Hides the seam of an edit: blurs the image inside the mask with a Gaussian "
                   "whose sigma is sigma_max at the mask boundary and fades as "
                   "exp(-D^2 / (2 sigma_s^2)) with the exact distance D (pixels) to the "
                   "boundary. Pixels outside the mask are returned unchanged, bit for bit; an "
                   "empty mask returns the image unchanged. The mask is thresholded at 0.5; "
                   "the image border is not treated as a seam.")
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    FUNCTION = "blur"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", inp("Edited image whose seam should be hidden.")),
            "mask": ("MASK", inp("Edit region (white = edited), same size as the image; "
                                 "values above 0.5 count as inside.")),
            "sigma_max": ("FLOAT", inp("Blur sigma in pixels right at the mask boundary. "
                                       "0 turns the blur off.",
                                       default=5.0, min=0.0, max=50.0, step=0.1)),
            "sigma_s": ("FLOAT", inp("How far into the mask the blur reaches: sigma falls "
                                     "as exp(-D^2 / (2 sigma_s^2)) with the distance D in "
                                     "pixels.", default=10.0, min=0.1, max=200.0, step=0.1)),
        }}

    def blur(self, image, mask, sigma_max, sigma_s):
        dev = host.device()
        out = blur.gb_blur(image.clone().to(dev), mask.clone().to(dev),
                           sigma_max=float(sigma_max), sigma_s=float(sigma_s))
        return (out.cpu(),)


NODES = [GBBlur]
