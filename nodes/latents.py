"""VAE encode/decode nodes."""

from __future__ import annotations

from ..mgie_core import vae
from ._common import LATENT, PREFIX, SD_MODEL, category, inp


class VAEEncode:
    NODE_ID = f"{PREFIX}VAEEncode"
    DISPLAY_NAME = "xMGIE VAE Encode"
    CATEGORY = category("latent")
    DESCRIPTION = ("Encodes an RGB image into SD latents (posterior mean x 0.18215). "
                   "Width and height must be multiples of 8.")
    RETURN_TYPES = (LATENT,)
    RETURN_NAMES = ("latent",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "sd_model": (SD_MODEL, inp("Model whose VAE encodes the image.")),
            "image": ("IMAGE", inp("RGB image, width and height multiples of 8.")),
        }}

    def encode(self, sd_model, image):
        return (vae.encode(sd_model, image.clone()),)


class VAEDecode:
    NODE_ID = f"{PREFIX}VAEDecode"
    DISPLAY_NAME = "xMGIE VAE Decode"
    CATEGORY = category("latent")
    DESCRIPTION = "Decodes SD latents back into an RGB image."
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "sd_model": (SD_MODEL, inp("Model whose VAE decodes the latents.")),
            "latent": (LATENT, inp("Latents to decode.")),
        }}

    def decode(self, sd_model, latent):
        return (vae.decode(sd_model, latent),)


NODES = [VAEEncode, VAEDecode]
