"""VAE encode/decode with SD 1.x conventions (ALGORITHMS.md section 0), and the
ComfyUI LATENT convention at the pack's boundary.

Two scalings of the same latent are in use:

* the library's (:class:`Latents`, the samplers, the inversion): the posterior mode
  times the VAE's ``scaling_factor`` (0.18215 for SD 1.x), the space the UNet was
  trained in;
* ComfyUI's LATENT ``{"samples": tensor}``: the RAW posterior mode, without the factor.
  ComfyUI's VAEEncode returns ``first_stage_model.encode`` (its
  DiagonalGaussianRegularizer takes ``posterior.mode()``, not a sample), VAEDecode decodes
  the samples as given, and the factor is applied only inside the model
  (``latent_formats.SD15.process_in`` multiplies by 0.18215, ``process_out`` divides).

:func:`to_comfy_latent` gives a library latent as a LATENT and
:func:`comfy_latent_samples` checks one on the way in; :func:`decode` / :func:`encode`
take ``scaled=False`` for raw latents, so a LATENT is never multiplied back by the factor
only to be divided again.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .errors import InputError
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


def vae_scale_of(vae) -> int:
    """Pixels per latent cell of a diffusers AutoencoderKL (8 for SD 1.x)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def encode_with(vae, image: torch.Tensor, device, dtype, name: str = "image",
                mode: bool = True, scaled: bool = True) -> Latents:
    """:func:`encode` with a bare diffusers AutoencoderKL (the headless VAEEncode)."""
    image = check_image(name, image, multiple_of=vae_scale_of(vae))
    x = image.permute(0, 3, 1, 2).to(device, dtype) * 2 - 1
    dist = vae.encode(x).latent_dist
    z = dist.mode() if mode else dist.mean
    if scaled:
        z = z * vae.config.scaling_factor
    check_finite("encoded latent", z, "latent values", _VAE_FIX)
    return Latents(z.float().cpu(), tuple(image.shape[1:3]))


def encode(sd: SDModel, image: torch.Tensor, name: str = "image", mode: bool = True,
           scaled: bool = True) -> Latents:
    """Posterior mode (= mean: encoding is deterministic), times the scaling factor unless
    ``scaled=False`` (ComfyUI's LATENT convention)."""
    return encode_with(sd.vae, image, sd.device, sd.dtype, name, mode=mode, scaled=scaled)


@torch.no_grad()
def decode_with(vae, latents: Latents | torch.Tensor, device, dtype, name: str = "latent",
                scaled: bool = True, to_cpu: bool = True) -> torch.Tensor:
    """:func:`decode` with a bare diffusers AutoencoderKL (the headless VAEDecode)."""
    z = latents.samples if isinstance(latents, Latents) else latents
    check_finite(name, z, "latent values", "The node that made these latents produced them "
                 "(a sampler diverging, damaged weights, or half precision overflowing: try "
                 "fp32).")
    z = z.to(device, dtype)
    if scaled:
        z = z / vae.config.scaling_factor
    x = vae.decode(z).sample
    check_finite("decoded image", x, "pixel values", _VAE_FIX)
    image = ((x.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
    return image.cpu() if to_cpu else image


def decode(sd: SDModel, latents: Latents | torch.Tensor, name: str = "latent",
           scaled: bool = True, to_cpu: bool = True) -> torch.Tensor:
    """Images [B,H,W,3] in 0..1. NaN/Inf latents are refused before decoding, and a
    decoder that turns finite latents into NaN/Inf pixels is an error, not a black image.
    ``scaled=False``: the latents are raw (ComfyUI's LATENT samples).

    ``to_cpu``: the image on the host (ComfyUI's IMAGE convention, what the node hands
    on). A library pipeline that goes on to the seam blur passes False and gets the
    image on the model's device (float32), so decode -> GB never round-trips through the
    host (:func:`blur.gb_blur` runs on the image's device)."""
    return decode_with(sd.vae, latents, sd.device, sd.dtype, name, scaled, to_cpu)


# --- ComfyUI's LATENT ---------------------------------------------------------------------

def to_comfy_latent(latents: Latents | torch.Tensor, scaling_factor: float) -> dict:
    """A library latent (scaled) as ComfyUI's LATENT: ``{"samples": z / factor}``, float32
    on the CPU, as ComfyUI's VAEEncode gives it."""
    z = latents.samples if isinstance(latents, Latents) else latents
    return {"samples": (z.float() / scaling_factor).cpu()}


def comfy_latent_samples(name: str, value: Any, channels: int = 4) -> torch.Tensor:
    """The raw samples [B,C,h,w] of a ComfyUI LATENT, checked: a dict with a 4-D
    ``samples`` tensor of ``channels`` channels (4 for SD 1.x)."""
    if not isinstance(value, dict) or not isinstance(value.get("samples"), torch.Tensor):
        got = (f"a dict with keys {sorted(value)}" if isinstance(value, dict)
               else type(value).__name__)
        raise InputError(name, f"got {got}", "a LATENT {'samples': tensor [B,4,h,w]}",
                         "Connect a LATENT output (VAE Encode, a sampler, an xMGIE node).")
    z = value["samples"]
    if z.ndim != 4 or z.shape[1] != channels:
        raise InputError(name, f"its samples have shape {tuple(z.shape)}",
                         f"SD 1.x latents [B,{channels},h,w]",
                         "Latents of another model family (SDXL, SD3, Flux, video) cannot "
                         "be decoded by an SD 1.x VAE.")
    return z

