"""Shared diffusion arithmetic for SD 1.x (ALGORITHMS.md section 0): prompt encoding,
the DDIM schedule and deterministic DDIM steps in both directions.

The step functions are plain tensor maths (differentiable), evaluated in float32
whatever precision the UNet runs in."""

from __future__ import annotations

import dataclasses

import torch

from .errors import InputError
from .models.sd import SDModel
from .tokens import warn_if_truncated


@dataclasses.dataclass(frozen=True)
class Schedule:
    timesteps: torch.Tensor        # (N,) descending, e.g. 981 ... 1
    alphas_cumprod: torch.Tensor   # (1000,) float64 on CPU
    final_alpha_cumprod: float     # used past t = 0 (set_alpha_to_one=False: abar_0)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def stride(self) -> int:
        return int(self.timesteps[0] - self.timesteps[1]) if self.num_steps > 1 else 1000

    def abar(self, t: int) -> float:
        return float(self.alphas_cumprod[t]) if t >= 0 else self.final_alpha_cumprod

    def prev_t(self, i: int) -> int:
        """Timestep after denoising step i (t_i - stride; negative past the end)."""
        return int(self.timesteps[i]) - self.stride


def make_schedule(sd: SDModel, steps: int) -> Schedule:
    if not isinstance(steps, int) or steps < 1 or steps > 1000:
        raise InputError("steps", f"is {steps!r}", "an integer between 1 and 1000")
    sched = sd.scheduler
    sched.set_timesteps(steps)
    return Schedule(sched.timesteps.clone().long().cpu(),
                    sched.alphas_cumprod.double().cpu(),
                    float(sched.final_alpha_cumprod))


def ddim_step(z: torch.Tensor, eps: torch.Tensor, abar_t: float, abar_prev: float) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from abar_t to abar_prev: predict x0, re-noise."""
    x0 = (z - (1 - abar_t) ** 0.5 * eps) / abar_t ** 0.5
    return abar_prev ** 0.5 * x0 + (1 - abar_prev) ** 0.5 * eps


def denoise_step(sch: Schedule, i: int, z: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    t = int(sch.timesteps[i])
    return ddim_step(z, eps, sch.abar(t), sch.abar(sch.prev_t(i)))


def invert_step(sch: Schedule, i: int, z: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`denoise_step` with eps taken at the lower latent: from t_i - stride
    up to t_i (null-text inversion's ``next_step``)."""
    t = int(sch.timesteps[i])
    return ddim_step(z, eps, sch.abar(sch.prev_t(i)), sch.abar(t))


@torch.no_grad()
def encode_prompt(sd: SDModel, prompt: str) -> torch.Tensor:
    """CLIP text embedding (1, 77, D) of the last hidden layer, float32 on the device.
    Words past the 77-token window are dropped, and logged (:func:`tokens.warn_if_truncated`)."""
    warn_if_truncated(sd.tokenizer, prompt)
    tok = sd.tokenizer(prompt, padding="max_length", max_length=sd.tokenizer.model_max_length,
                       truncation=True, return_tensors="pt")
    out = sd.text_encoder(tok.input_ids.to(sd.device))
    return out[0].float()


def token_ids(sd: SDModel, prompt: str) -> list[int]:
    return sd.tokenizer(prompt, padding="max_length", max_length=sd.tokenizer.model_max_length,
                        truncation=True).input_ids


def unet_eps(sd: SDModel, z: torch.Tensor, t: int, emb: torch.Tensor) -> torch.Tensor:
    """One UNet call; inputs cast to the model's dtype, output back to float32."""
    tt = torch.full((z.shape[0],), int(t), device=sd.device, dtype=torch.long)
    return sd.unet(z.to(sd.device, sd.dtype), tt, encoder_hidden_states=emb.to(sd.device, sd.dtype),
                   return_dict=False)[0].float()
