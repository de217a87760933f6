"""Shared diffusion arithmetic for SD 1.x (docs/algorithms.md section 0): prompt encoding,
the DDIM schedule and deterministic DDIM steps in both directions.

The step functions are plain tensor maths (differentiable), evaluated in float32
whatever precision the UNet runs in."""

from __future__ import annotations

import dataclasses

import torch

from . import host
from .errors import InputError
from .models.sd import SDModel
from .tokens import warn_if_truncated


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The timesteps of a run and the cumulative alphas, as tensors (for callers) and as
    Python numbers read by the per-step code.

    The Python copies are made once here: reading an element of a tensor in a loop
    (``int(t[i])``, ``float(a[t])``) is a host read per step, a synchronisation when the
    tensor lives on a GPU and, on the CPU, indistinguishable from one for the counter of
    bench/syncs.py, so the loops never do it."""

    timesteps: torch.Tensor        # (N,) descending, exactly the scheduler's set_timesteps
    prev_timesteps: torch.Tensor   # (N,) where step i lands (negative: past t = 0)
    alphas_cumprod: torch.Tensor   # (1000,) float64 on CPU
    final_alpha_cumprod: float     # used past t = 0 (set_alpha_to_one=False: abar_0)

    def __post_init__(self):
        ts = self.timesteps.tolist()
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen)
        set_("_ts", tuple(int(t) if float(t).is_integer() else float(t) for t in ts))
        set_("_prev", tuple(int(t) for t in self.prev_timesteps.tolist()))
        set_("_abar", tuple(self.alphas_cumprod.tolist()))

    @property
    def num_steps(self) -> int:
        return len(self._ts)

    def t(self, i: int):
        """Timestep of step i as a Python number (an int for DDIM's integer timesteps)."""
        return self._ts[i]

    def abar(self, t: int) -> float:
        return self._abar[int(t)] if t >= 0 else self.final_alpha_cumprod

    def prev_t(self, i: int) -> int:
        """Timestep after denoising step i (the scheduler's rule; negative past the end)."""
        return self._prev[i]


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
    t = sch.t(i)
    return ddim_step(z, eps, sch.abar(t), sch.abar(sch.prev_t(i)))


def invert_step(sch: Schedule, i: int, z: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`denoise_step` with eps taken at the lower latent: from prev_t(i)
    up to t_i (null-text inversion's ``next_step``), by the same previous-timestep rule."""
    t = sch.t(i)
    return ddim_step(z, eps, sch.abar(sch.prev_t(i)), sch.abar(t))


@torch.no_grad()
def encode_prompt(sd: SDModel, prompt: str, name: str = "prompt", report=None) -> torch.Tensor:
    """CLIP text embedding (1, 77, D) of the last hidden layer, float32 on the device.
    Words past the 77-token window are dropped, logged, and noted in ``report`` when
    given (:func:`tokens.warn_if_truncated`; ``name`` is the prompt's input)."""
    warn_if_truncated(sd.tokenizer, prompt, name, report)
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
    return sd.unet(host.place(z, sd.device, sd.dtype), tt,
                   encoder_hidden_states=host.place(emb, sd.device, sd.dtype),
                   return_dict=False)[0].float()


# --- instruction-path solvers ---------------------------------------------------------

INSTRUCT_SCHEDULERS = ("euler_ancestral", "ddim")


class DDIMSolver:
    """Deterministic DDIM over the model's schedule (docs/algorithms.md section 0): the latent
    is x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, fed to the UNet as it is."""

    name = "ddim"

    def __init__(self, sd: SDModel, steps: int, generator: torch.Generator | None = None):
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
        a = self.schedule.abar(self.schedule.t(i))
        return a ** 0.5 * z0 + (1 - a) ** 0.5 * noise


class EulerAncestralSolver:
    """Euler ancestral, as diffusers' ``EulerAncestralDiscreteScheduler`` computes it (the
    scheduler InstructPix2Pix ships and MGIE's demo samples with), configured from the
    model's scheduler config: a ``timestep_spacing`` the model's config does not set takes
    Euler's default (linspace), as loading the shipped config into that class would.

    The latent is x_sigma = x_0 + sigma eps, scaled by 1 / sqrt(sigma^2 + 1) for the UNet.
    Each step adds ancestral noise drawn from ``generator`` after the initial noise, in the
    order diffusers' StableDiffusionInstructPix2PixPipeline draws it, so the same seed gives
    the same result (float32 latents; the pipeline draws in the UNet's dtype).

    Where this differs from calling ``scheduler.step``: the per-step numbers
    (sigma, the input scale, sigma_up, the Euler dt) are computed once, in float32 as the
    scheduler computes them, and kept as Python numbers; the step noise is drawn on the
    host generator all at once in :meth:`start` (the same draws in the same order: nothing
    else draws from the generator during sampling) and moved to the device in one copy.
    ``scheduler.step`` instead reads its sigmas from host tensors, finds its step index
    with ``nonzero`` on the first call and draws each step's noise on the host and copies
    it to the device: one wait per step on a GPU. The arithmetic is the scheduler's,
    operation for operation (``test_euler_ancestral_matches_the_instructpix2pix_pipeline``)."""

    name = "euler_ancestral"

    def __init__(self, sd: SDModel, steps: int, generator: torch.Generator | None = None):
        from diffusers import EulerAncestralDiscreteScheduler

        if not isinstance(steps, int) or steps < 1 or steps > 1000:
            raise InputError("steps", f"is {steps!r}", "an integer between 1 and 1000")
        sched = EulerAncestralDiscreteScheduler.from_config(sd.scheduler.config)
        if sched.config.prediction_type != "epsilon":
            raise InputError("sd_model", f"predicts {sched.config.prediction_type}",
                             "an epsilon-prediction instruction model (InstructPix2Pix, "
                             "MGIE)")
        sched.set_timesteps(steps)
        self.sched, self.generator = sched, generator
        ts = sched.timesteps.cpu()
        # Schedule for the controls: the scheduler's (possibly fractional) timesteps.
        self.schedule = Schedule(ts, torch.cat([ts[1:], ts.new_tensor([-1.0])]),
                                 sd.scheduler.alphas_cumprod.double().cpu(),
                                 float(sd.scheduler.final_alpha_cumprod))
        self.timesteps = ts.tolist()
        sig = sched.sigmas.cpu().float()                   # (N + 1,), the scheduler's dtype
        s_from, s_to = sig[:-1], sig[1:]
        s_up = (s_to ** 2 * (s_from ** 2 - s_to ** 2) / s_from ** 2) ** 0.5
        s_down = (s_to ** 2 - s_up ** 2) ** 0.5
        self.sigmas = sig.tolist()
        self._in_scale = ((s_from ** 2 + 1) ** 0.5).tolist()
        self._up = s_up.tolist()
        self._dt = (s_down - s_from).tolist()
        self._noise: torch.Tensor | None = None
        self._init_sigma = float(sched.init_noise_sigma)

    def start(self, noise: torch.Tensor) -> torch.Tensor:
        """The first latent; draws every step's ancestral noise now, in the pipeline's
        order (after the initial noise), and puts it on the device in one copy."""
        n = len(self._up)
        draws = [torch.randn(tuple(noise.shape), generator=self.generator,
                             dtype=torch.float32) for _ in range(n)]
        self._noise = torch.stack(draws).to(noise.device)
        return noise * self._init_sigma

    def model_input(self, z: torch.Tensor, i: int) -> torch.Tensor:
        return z / self._in_scale[i]

    def step(self, z: torch.Tensor, eps: torch.Tensor, i: int) -> torch.Tensor:
        if self._noise is None:
            raise RuntimeError("EulerAncestralSolver.start() must be called before step()")
        sigma = self.sigmas[i]
        sample = z.to(torch.float32)
        pred_original = sample - sigma * eps
        derivative = (sample - pred_original) / sigma
        prev = sample + derivative * self._dt[i]
        prev = prev + self._noise[i] * self._up[i]
        return prev.to(eps.dtype)

    def noised(self, z0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        return z0 + self.sigmas[i] * noise    # sigmas[N] = 0: z0 itself


def instruct_solver(name: str, sd: SDModel, steps: int,
                    generator: torch.Generator | None = None):
    """The solver of the instruction path by name (see :data:`INSTRUCT_SCHEDULERS`)."""
    table = {"euler_ancestral": EulerAncestralSolver, "ddim": DDIMSolver}
    if name not in table:
        raise InputError("scheduler", f"is {name!r}", " or ".join(INSTRUCT_SCHEDULERS))
    return table[name](sd, steps, generator)
