"""VAE encode/decode nodes."""

from __future__ import annotations

from ..mgie_core import vae
from ._common import LATENT, PREFIX, SD_MODEL, category, fit_input, inp


class VAEEncode:
    NODE_ID = f"{PREFIX}VAEEncode"
    DISPLAY_NAME = "xMGIE VAE Encode"
    CATEGORY = category("latent")
    DESCRIPTION = ("Encodes an RGB image into a LATENT, as ComfyUI's VAE Encode: the "
                   "posterior mode, without the 0.18215 factor (the model applies it). "
                   "Sides that are not multiples of 8 are reflect-padded (fit), and xMGIE "
                   "VAE Decode crops the image back to its size.")
    RETURN_TYPES = (LATENT,)
    RETURN_NAMES = ("latent",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "sd_model": (SD_MODEL, inp("Model whose VAE encodes the image.")),
            "image": ("IMAGE", inp("RGB image, any size (see fit).")),
        }, "optional": {
            "fit": fit_input("the VAE's 8 px"),
        }}

    def encode(self, sd_model, image, fit="pad"):
        raw = vae.encode_photo(sd_model, image, fit, multiple=sd_model.vae_scale,
                               max_batch=None, scaled=False)
        return (vae.to_comfy_latent(raw, 1.0),)


class VAEDecode:
    NODE_ID = f"{PREFIX}VAEDecode"
    DISPLAY_NAME = "xMGIE VAE Decode"
    CATEGORY = category("latent")
    DESCRIPTION = ("Decodes a LATENT (ComfyUI's convention: raw VAE latents, as VAE Encode "
                   "and the samplers give) back into an RGB image with the model's VAE. A "
                   "photo the pack padded to the model's size step is cropped back to its "
                   "own size.")
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "sd_model": (SD_MODEL, inp("Model whose VAE decodes the latents.")),
            "latent": (LATENT, inp("Latents to decode: from an xMGIE sampler, VAE Encode "
                                   "or any SD 1.x LATENT.")),
        }}

    def decode(self, sd_model, latent):
        samples = vae.comfy_latent_samples("latent", latent,
                                           sd_model.vae.config.latent_channels)
        return (vae.decode(sd_model, samples, scaled=False,
                           fit=vae.latent_fit(latent, sd_model.vae_scale)),)


NODES = [VAEEncode, VAEDecode]
