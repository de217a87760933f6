"""VAE encode/decode with SD 1.x conventions (ALGORITHMS.md section 0)."""

from __future__ import annotations

import dataclasses

import torch

from .images import check_image
from .models.sd import SDModel


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
    return Latents(z.float().cpu(), tuple(image.shape[1:3]))


@torch.no_grad()
def decode(sd: SDModel, latents: Latents | torch.Tensor) -> torch.Tensor:
    z = latents.samples if isinstance(latents, Latents) else latents
    x = sd.vae.decode(z.to(sd.device, sd.dtype) / sd.vae.config.scaling_factor).sample
    return ((x.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu()
