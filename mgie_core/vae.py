"""VAE encode/decode with SD 1.x conventions (ALGORITHMS.md section 0)."""

from __future__ import annotations

import dataclasses

import torch

from .images import check_finite, check_image
from .models.sd import SDModel

_VAE_FIX = ("The VAE produced them from finite input: its weights may be damaged, or half "
            "precision overflowed (load the model with dtype fp32).")


@dataclasses.dataclass
class Latents:
    """Latents scaled by the VAE's scaling factor (0.18215 for SD 1.x)."""

    samples: torch.Tensor   # [B,4,h,w] float32 on CPU
    image_size: tuple[int, int]

    def __repr__(self) -> str:
        return f"Latents({tuple(self.samples.shape)}, image {self.image_size})"


@torch.no_grad()
def encode(sd: SDModel, image: torch.Tensor, name: str = "image", mode: bool = True) -> Latents:
    """Posterior mean x scaling factor (the mean, not a sample: encoding is deterministic)."""
    image = check_image(name, image, multiple_of=sd.vae_scale)
    x = image.permute(0, 3, 1, 2).to(sd.device, sd.dtype) * 2 - 1
    dist = sd.vae.encode(x).latent_dist
    z = dist.mode() if mode else dist.mean
    z = z * sd.vae.config.scaling_factor
    check_finite("encoded latent", z, "latent values", _VAE_FIX)
    return Latents(z.float().cpu(), tuple(image.shape[1:3]))


@torch.no_grad()
def decode(sd: SDModel, latents: Latents | torch.Tensor, name: str = "latent",
           to_cpu: bool = True) -> torch.Tensor:
    """Images [B,H,W,3] in 0..1. NaN/Inf latents are refused before decoding, and a
    decoder that turns finite latents into NaN/Inf pixels is an error, not a black image.

    ``to_cpu``: the image on the host (ComfyUI's IMAGE convention, what the node hands
    on). A library pipeline that goes on to the seam blur passes False and gets the
    image on the model's device (float32), so decode -> GB never round-trips through the
    host (:func:`blur.gb_blur` runs on the image's device)."""
    z = latents.samples if isinstance(latents, Latents) else latents
    check_finite(name, z, "latent values", "The node that made these latents produced them "
                 "(a sampler diverging, damaged weights, or half precision overflowing: try "
                 "fp32).")
    x = sd.vae.decode(z.to(sd.device, sd.dtype) / sd.vae.config.scaling_factor).sample
    check_finite("decoded image", x, "pixel values", _VAE_FIX)
    image = ((x.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
    return image.cpu() if to_cpu else image
