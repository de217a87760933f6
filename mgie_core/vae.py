"""VAE encode/decode with SD 1.x conventions (docs/algorithms.md section 0), and the
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
from .images import LATENT_FIT_KEY, Fit, check_finite, check_image, fit_image
from .models.sd import SDModel

_VAE_FIX = ("The VAE produced them from finite input: its weights may be damaged, or half "
            "precision overflowed (load the model with dtype fp32).")


@dataclasses.dataclass
class Latents:
    """Latents scaled by the VAE's scaling factor (0.18215 for SD 1.x)."""

    samples: torch.Tensor   # [B,4,h,w] float32 on CPU
    image_size: tuple[int, int]
    fit: Fit | None = None   # how the photo was fitted to the model (encode_photo)

    def __repr__(self) -> str:
        return f"Latents({tuple(self.samples.shape)}, image {self.image_size})"


def vae_scale_of(vae) -> int:
    """Pixels per latent cell of a diffusers AutoencoderKL (8 for SD 1.x)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def size_multiple(sd: SDModel) -> int:
    """The step of the image sides the model edits at: the VAE's factor times the UNet's
    (it halves the latent once per level but the last), 8 x 8 = 64 px for SD 1.x. The
    attention controls address each UNet level at exactly 1/2, 1/4, 1/8 of the latent,
    which holds only on this grid."""
    levels = len(getattr(sd.unet.config, "block_out_channels", (0,)))
    return sd.vae_scale * 2 ** max(0, levels - 1)


def encode_photo(sd: SDModel, image: torch.Tensor, fit: str = "pad", name: str = "image",
                 multiple: int | None = None, max_batch: int | None = 1,
                 scaled: bool = True) -> Latents:
    """A photo checked, fitted to the model's size step (``fit``: ``images.FITS``;
    ``multiple`` defaults to :func:`size_multiple`) and encoded (:func:`encode`). The
    result's ``fit`` says how to crop the edit back (:func:`decode` reads it)."""
    fitted, how = fit_image(name, image, multiple or size_multiple(sd), fit,
                            max_batch=max_batch)
    lat = encode(sd, fitted.clone(), name, scaled=scaled)
    lat.fit = how
    return lat


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
    return encode_with(sd.vae, image, sd.device, sd.vae_dtype, name, mode=mode, scaled=scaled)


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
           scaled: bool = True, to_cpu: bool = True, fit: Fit | None = None) -> torch.Tensor:
    """Images [B,H,W,3] in 0..1. NaN/Inf latents are refused before decoding, and a
    decoder that turns finite latents into NaN/Inf pixels is an error, not a black image.
    ``scaled=False``: the latents are raw (ComfyUI's LATENT samples).

    ``to_cpu``: the image on the host (ComfyUI's IMAGE convention, what the node hands
    on). A library pipeline that goes on to the seam blur passes False and gets the
    image on the model's device (float32), so decode -> GB never round-trips through the
    host (:func:`blur.gb_blur` runs on the image's device).

    ``fit`` (default: a :class:`Latents`' own): how the photo was fitted to the model; a
    padded photo's edit is cropped back to the photo's size."""
    fit = fit or (latents.fit if isinstance(latents, Latents) else None)
    image = decode_with(sd.vae, latents, sd.device, sd.vae_dtype, name, scaled, to_cpu)
    return fit.undo(image) if fit is not None else image


# --- ComfyUI's LATENT ---------------------------------------------------------------------

def to_comfy_latent(latents: Latents | torch.Tensor, scaling_factor: float,
                    fit: Fit | None = None) -> dict:
    """A library latent (scaled) as ComfyUI's LATENT: ``{"samples": z / factor}``, float32
    on the CPU, as ComfyUI's VAEEncode gives it. A fitted photo's latent also carries how
    it was fitted (``images.LATENT_FIT_KEY``; ``fit``, default a :class:`Latents`' own),
    so xMGIE VAE Decode crops the edit back; other nodes ignore the extra key, as
    ComfyUI's nodes do with keys they do not know."""
    z = latents.samples if isinstance(latents, Latents) else latents
    fit = fit or (latents.fit if isinstance(latents, Latents) else None)
    out = {"samples": (z.float() / scaling_factor).cpu()}
    if fit is not None and fit.changed:
        out[LATENT_FIT_KEY] = fit.as_dict()
    return out


def latent_fit(value: Any, vae_scale: int) -> Fit | None:
    """How the photo of a LATENT was fitted (:func:`to_comfy_latent`), or None. A fit is
    only believed while the samples still have its size (``vae_scale`` pixels per latent
    cell): a node that resized the latent and copied the dict along leaves a stale one,
    which is ignored."""
    if not isinstance(value, dict) or LATENT_FIT_KEY not in value:
        return None
    fit = Fit.from_dict(value[LATENT_FIT_KEY])
    z = value.get("samples")
    if fit is None or not isinstance(z, torch.Tensor) or z.ndim != 4:
        return None
    size = (int(z.shape[-2]) * vae_scale, int(z.shape[-1]) * vae_scale)
    return fit if size == tuple(fit.fitted) else None


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

