"""Shared diffusion arithmetic for SD 1.x (ALGORITHMS.md section 0): prompt encoding,
the DDIM schedule and deterministic DDIM steps in both directions.

The step functions are plain tensor maths (differentiable), evaluated in float32
whatever precision the UNet runs in."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .errors import InputError
from .models.sd import SDModel
from .tokens import warn_if_truncated


@dataclasses.dataclass(frozen=True)
class Schedule:
    timesteps: torch.Tensor        # (N,) descending, exactly the scheduler's set_timesteps
    prev_timesteps: torch.Tensor   # (N,) where step i lands (negative: past t = 0)
    alphas_cumprod: torch.Tensor   # (1000,) float64 on CPU
    final_alpha_cumprod: float     # used past t = 0 (set_alpha_to_one=False: abar_0)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def abar(self, t: int) -> float:
        return float(self.alphas_cumprod[t]) if t >= 0 else self.final_alpha_cumprod

    def prev_t(self, i: int) -> int:
        """Timestep after denoising step i (the scheduler's rule; negative past the end)."""
        return int(self.prev_timesteps[i])


def previous_timestep(scheduler, t: int) -> int:
    """The timestep a DDIM step from ``t`` lands on, by the scheduler's own rule.

    A scheduler that exposes ``previous_timestep`` (diffusers' DDPM family) is asked;
    otherwise this is diffusers' ``DDIMScheduler.step`` rule,
    ``t - num_train_timesteps // num_inference_steps``, which it applies for every
    ``timestep_spacing``. With "trailing" or "linspace" spacing that need not be the next
    timestep of the list (7 steps, linspace: 999 lands on 857, the next step is taken at
    832): we follow the scheduler rather than the list so that a step here equals the
    scheduler's ``step`` (eta 0) and the inversion, which runs the same rule backwards
    (``invert_step``: from prev_t(i) up to t_i), stays its exact inverse."""
    fn = getattr(scheduler, "previous_timestep", None)
    if callable(fn):
        return int(fn(t))
    return int(t) - scheduler.config.num_train_timesteps // scheduler.num_inference_steps


def make_schedule(sd: SDModel, steps: int) -> Schedule:
    """Timesteps and previous timesteps from the model's scheduler (its config's
    ``timestep_spacing``: leading, trailing or linspace), never re-derived here."""
    if not isinstance(steps, int) or steps < 1 or steps > 1000:
        raise InputError("steps", f"is {steps!r}", "an integer between 1 and 1000")
    sched = sd.scheduler
    sched.set_timesteps(steps)
    timesteps = sched.timesteps.clone().long().cpu()
    prev = torch.tensor([previous_timestep(sched, t) for t in timesteps.tolist()],
                        dtype=torch.long)
    return Schedule(timesteps, prev, sched.alphas_cumprod.double().cpu(),
                    float(sched.final_alpha_cumprod))


def ddim_step(z: torch.Tensor, eps: torch.Tensor, abar_t: float, abar_prev: float) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from abar_t to abar_prev: predict x0, re-noise."""
    x0 = (z - (1 - abar_t) ** 0.5 * eps) / abar_t ** 0.5
    return abar_prev ** 0.5 * x0 + (1 - abar_prev) ** 0.5 * eps


def denoise_step(sch: Schedule, i: int, z: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    t = int(sch.timesteps[i])
    return ddim_step(z, eps, sch.abar(t), sch.abar(sch.prev_t(i)))


def invert_step(sch: Schedule, i: int, z: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`denoise_step` with eps taken at the lower latent: from prev_t(i)
    up to t_i (null-text inversion's ``next_step``), by the same previous-timestep rule."""
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


def unet_eps(sd: SDModel, z: torch.Tensor, t, emb: torch.Tensor) -> torch.Tensor:
    """One UNet call; inputs cast to the model's dtype, output back to float32.

    ``t`` is an integer timestep (DDIM) or a fractional one (Euler's linspace timesteps,
    passed as the scheduler gives them, as diffusers' pipelines do)."""
    frac = isinstance(t, float) and not t.is_integer()
    tt = torch.full((z.shape[0],), t if frac else int(t), device=sd.device,
                    dtype=torch.float32 if frac else torch.long)
    return sd.unet(z.to(sd.device, sd.dtype), tt, encoder_hidden_states=emb.to(sd.device, sd.dtype),
                   return_dict=False)[0].float()


# --- instruction-path solvers ---------------------------------------------------------

INSTRUCT_SCHEDULERS = ("euler_ancestral", "ddim")


class DDIMSolver:
    """Deterministic DDIM over the model's schedule (ALGORITHMS.md section 0): the latent
    is x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, fed to the UNet as it is."""

    name = "ddim"

    def __init__(self, sd: SDModel, steps: int, generator: Optional[torch.Generator] = None):
        self.schedule = make_schedule(sd, steps)
        self.timesteps = self.schedule.timesteps.tolist()   # host copy: no sync in the loop

    def start(self, noise: torch.Tensor) -> torch.Tensor:
        return noise

    def model_input(self, z: torch.Tensor, i: int) -> torch.Tensor:
        return z

    def step(self, z: torch.Tensor, eps: torch.Tensor, i: int) -> torch.Tensor:
        return denoise_step(self.schedule, i, z, eps)

    def noised(self, z0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        """The clean latent noised to the level before step i (i = N: z0 itself)."""
        if i >= self.schedule.num_steps:
            return z0
        a = self.schedule.abar(int(self.timesteps[i]))
        return a ** 0.5 * z0 + (1 - a) ** 0.5 * noise


class EulerAncestralSolver:
    """Euler ancestral, through diffusers' own ``EulerAncestralDiscreteScheduler`` (the
    scheduler InstructPix2Pix ships and MGIE's demo samples with), configured from the
    model's scheduler config: a ``timestep_spacing`` the model's config does not set takes
    Euler's default (linspace), as loading the shipped config into that class would.

    The latent is x_sigma = x_0 + sigma eps, scaled by 1 / sqrt(sigma^2 + 1) for the UNet.
    Each step draws its ancestral noise from ``generator`` after the initial noise, in the
    order diffusers' StableDiffusionInstructPix2PixPipeline does, so the same seed gives
    the same result (float32 latents; the pipeline draws in the UNet's dtype)."""

    name = "euler_ancestral"

    def __init__(self, sd: SDModel, steps: int, generator: Optional[torch.Generator] = None):
        from diffusers import EulerAncestralDiscreteScheduler

        if not isinstance(steps, int) or steps < 1 or steps > 1000:
            raise InputError("steps", f"is {steps!r}", "an integer between 1 and 1000")
        sched = EulerAncestralDiscreteScheduler.from_config(sd.scheduler.config)
        sched.set_timesteps(steps)
        self.sched, self.generator = sched, generator
        ts = sched.timesteps.cpu()
        # Schedule for the controls: the scheduler's (possibly fractional) timesteps.
        self.schedule = Schedule(ts, torch.cat([ts[1:], ts.new_tensor([-1.0])]),
                                 sd.scheduler.alphas_cumprod.double().cpu(),
                                 float(sd.scheduler.final_alpha_cumprod))
        self.timesteps = ts.tolist()
        self.sigmas = sched.sigmas.cpu().tolist()

    def start(self, noise: torch.Tensor) -> torch.Tensor:
        return noise * self.sched.init_noise_sigma

    def model_input(self, z: torch.Tensor, i: int) -> torch.Tensor:
        return self.sched.scale_model_input(z, self.sched.timesteps[i])

    def step(self, z: torch.Tensor, eps: torch.Tensor, i: int) -> torch.Tensor:
        return self.sched.step(eps, self.sched.timesteps[i], z,
                               generator=self.generator).prev_sample

    def noised(self, z0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        return z0 + self.sigmas[i] * noise    # sigmas[N] = 0: z0 itself


def instruct_solver(name: str, sd: SDModel, steps: int,
                    generator: Optional[torch.Generator] = None):
    """The solver of the instruction path by name (see :data:`INSTRUCT_SCHEDULERS`)."""
    table = {"euler_ancestral": EulerAncestralSolver, "ddim": DDIMSolver}
    if name not in table:
        raise InputError("scheduler", f"is {name!r}", " or ".join(INSTRUCT_SCHEDULERS))
    return table[name](sd, steps, generator)
