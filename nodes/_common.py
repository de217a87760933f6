"""Shared conventions for the pack's nodes (classic ComfyUI style).

Every node class:
  * has an id starting with ``PREFIX`` (registered in ``nodes/__init__.py``),
  * a ``CATEGORY`` under ``ROOT_CATEGORY``, a ``DESCRIPTION`` and a ``DISPLAY_NAME``,
  * a ``"tooltip"`` in the options of every input (``inp`` below helps),
  * a short ``FUNCTION`` that calls into ``mgie_core`` (no logic here).
Images are float32 [B,H,W,3] in 0..1, masks [B,H,W]; inputs are cloned before any
in-place change; results go back to the CPU.
"""

from __future__ import annotations

from typing import Any

PREFIX = "XMGIE"
ROOT_CATEGORY = "xmgie"

# Custom socket types (transparent dataclasses from mgie_core).
SD_MODEL = "XMGIE_SD"            # mgie_core.models.sd.SDModel (4- or 8-channel UNet)

# ComfyUI's own LATENT {"samples": [B,4,h,w]}: RAW VAE latents (no 0.18215), as core
# VAEEncode gives and VAEDecode takes (mgie_core.vae.to_comfy_latent / comfy_latent_samples).
# Until issue 12 the pack passed its own scaled "XMGIE_LATENT"; saved graphs keep working
# because node ids, input names and output indices did not change.
LATENT = "LATENT"
SAM_MODEL = "XMGIE_SAM"
CAPTIONER = "XMGIE_CAPTIONER"
VLM_MODEL = "XMGIE_VLM"
IDENTITY_ENCODER = "XMGIE_IDENTITY"
INVERSION = "XMGIE_INVERSION"    # mgie_core.inversion.InversionResult
CONTROLS = "XMGIE_CONTROLS"      # list of sampling controls (PFB, MAG, identity ...)
CONDITIONING = "XMGIE_CONDITIONING"  # mgie_core.models.conditioning.Conditioning
MGIE_MODEL = "XMGIE_MGIE"        # mgie_core.models.mgie.MGIEModel


def category(sub: str = "") -> str:
    return f"{ROOT_CATEGORY}/{sub}" if sub else ROOT_CATEGORY


def inp(tooltip: str, **opts: Any) -> dict:
    """Options dict for an input, always carrying a tooltip."""
    return {"tooltip": tooltip, **opts}
