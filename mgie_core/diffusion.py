"""Shared diffusion arithmetic (docs/algorithms.md section 0): prompt encoding, the one
UNet call, the DDIM schedule and deterministic DDIM steps in both directions.

The conditioning is ONE tensor for every family, so that everything that batches,
expands, concatenates or optimises it (CFG, null-text) works unchanged:

* SD 1.x and 2.x: the text encoder's last hidden states, ``[B, 77, D]``;
* SDXL: ``[B, 78, D]`` with D = 768 + 1280: rows 0..76 the penultimate hidden states of
  the two text encoders side by side, row 77 the pooled embedding of the second
  (1280) followed by zeros. :func:`split_condition` is the one place that unpacks it
  into the UNet's ``encoder_hidden_states`` and ``added_cond_kwargs`` (the pooled
  embedding and the size / crop time ids of the latent being denoised).

Token positions (the words CAM, prompt-to-prompt, MAG and A-STAR act on) are 0..76 in
every family. :func:`unet_eps` returns the noise prediction epsilon whatever the model
predicts (SD 2.x 768-v predicts v), so every stage works in epsilon.

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


TOKENS = 77   # rows of the token conditioning (CLIP's window), in every family


@torch.no_grad()
def encode_prompt(sd: SDModel, prompt: str, name: str = "prompt", report=None) -> torch.Tensor:
    """The prompt's conditioning, float32 on the device: SD 1.x / 2.x the CLIP text
    embedding (1, 77, D) of the last hidden layer; SDXL the packed (1, 78, D) tensor
    (module docstring). Words past the 77-token window are dropped, logged, and noted
    in ``report`` when given (:func:`tokens.warn_if_truncated`; ``name`` is the prompt's
    input).

    The empty prompt is encoded like any other, as ComfyUI does (diffusers' SDXL pipeline
    instead uses zeros for the unconditional half when no negative prompt is given)."""
    warn_if_truncated(sd.tokenizer, prompt, name, report)
    if sd.text_encoder_2 is None:
        return sd.text_encoder(_ids(sd.tokenizer, prompt, sd.device))[0].float()
    # SDXL: the penultimate hidden states of both encoders, the pooled one of the second.
    first = sd.text_encoder(_ids(sd.tokenizer, prompt, sd.device), output_hidden_states=True)
    second = sd.text_encoder_2(_ids(sd.tokenizer_2, prompt, sd.device),
                               output_hidden_states=True)
    tokens = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1).float()
    return pack_condition(tokens, second.text_embeds.float())


def _ids(tokenizer, prompt: str, device) -> torch.Tensor:
    tok = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt")
    if tok.input_ids.shape[-1] != TOKENS:
        raise InputError("tokenizer", f"makes {tok.input_ids.shape[-1]} tokens",
                         f"{TOKENS} tokens (model_max_length {TOKENS}), as CLIP's")
    return tok.input_ids.to(device)


def pack_condition(tokens: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """SDXL's packed conditioning: ``tokens`` [B, 77, D] (or [B, k * 77, D]) with
    ``pooled`` [B, P] (P <= D) zero-padded to D as the last row."""
    b, _, d = tokens.shape
    if pooled.shape[-1] > d:
        raise ValueError(f"a pooled embedding of width {pooled.shape[-1]} does not fit the "
                         f"{d}-wide token conditioning")
    row = tokens.new_zeros(b, 1, d)
    row[:, 0, : pooled.shape[-1]] = pooled.to(tokens.dtype)
    return torch.cat([tokens, row], dim=1)


def pooled_width(unet) -> int:
    """The width of the pooled text embedding an SDXL UNet takes: its added-condition
    projection's input less the six time ids' sinusoidal embeddings."""
    cfg = unet.config
    return int(cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim)


def takes_added_condition(unet) -> bool:
    """True for an SDXL-style UNet (pooled embedding and time ids added to the time
    embedding)."""
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


def time_ids(sd: SDModel, latent_hw: tuple[int, int], dtype: torch.dtype | None = None
             ) -> torch.Tensor:
    """SDXL's micro-conditioning for a latent of ``latent_hw``: (1, 6) = original size
    (h, w), crop top-left (0, 0), target size (h, w), in pixels (the latent's size times
    the VAE's factor), as diffusers' SDXL pipelines make it for an uncropped image.
    Built on the device without a host copy (fills), in ``dtype`` (default the model's)."""
    h, w = int(latent_hw[0]) * sd.vae_scale, int(latent_hw[1]) * sd.vae_scale
    ids = torch.zeros(1, 6, device=sd.device, dtype=dtype or sd.dtype)
    ids[:, 0], ids[:, 1], ids[:, 4], ids[:, 5] = h, w, h, w
    return ids


def split_condition(sd: SDModel, emb: torch.Tensor, latent_hw: tuple[int, int] | None = None,
                    ids: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """(encoder_hidden_states, added_cond_kwargs) of a conditioning tensor for the UNet.
    SD 1.x / 2.x: ``(emb, None)``. SDXL: ``(emb[:, :-1], {"text_embeds": the pooled
    row, "time_ids": ...})``: the token rows are 77, or k * 77 when a caller joined
    several token sets before one pooled row (the instruction sampler's whole-condition
    CAM keys [cond; null]); the time ids are ``ids`` when given (a call that must not
    make tensors, a captured one) else those of ``latent_hw`` (default: the UNet's
    training size). Differentiable in ``emb``; keeps its dtype and device."""
    if not takes_added_condition(sd.unet):
        return emb, None
    rows = emb.shape[1] if emb.dim() == 3 else 0
    if rows <= TOKENS or (rows - 1) % TOKENS:
        raise InputError("conditioning", f"has shape {tuple(emb.shape)}",
                         f"SDXL's packed [batch, {TOKENS + 1}, width] conditioning ({TOKENS} "
                         "token rows, or a multiple of them, then the pooled embedding)",
                         "Encode the prompt with this SDXL model (diffusion.encode_prompt).")
    pooled = emb[:, -1, : pooled_width(sd.unet)]
    if ids is None:
        side = int(getattr(sd.unet.config, "sample_size", 128) or 128)
        ids = time_ids(sd, latent_hw or (side, side), emb.dtype)
    ids = ids.to(emb.dtype).expand(emb.shape[0], -1)
    return emb[:, :-1], {"text_embeds": pooled, "time_ids": ids}


def v_to_eps(v: torch.Tensor, z: torch.Tensor, abar) -> torch.Tensor:
    """Epsilon from a v-prediction: eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t (v is
    sqrt(abar_t) eps - sqrt(1 - abar_t) x_0, x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t)
    eps). ``abar`` a number or a tensor (a captured call's input)."""
    if isinstance(abar, torch.Tensor):
        return abar.sqrt() * v + (1 - abar).sqrt() * z
    return abar ** 0.5 * v + (1 - abar) ** 0.5 * z


def eps_from_output(sd: SDModel, out: torch.Tensor, z: torch.Tensor, abar) -> torch.Tensor:
    """The UNet's float32 output as epsilon: as it is for epsilon models, converted from
    v for v-prediction models (``abar``: abar_t of the call)."""
    kind = sd.prediction_type
    if kind == "epsilon":
        return out
    if kind == "v_prediction":
        return v_to_eps(out, z.float(), abar)
    raise InputError("sd_model", f"predicts {kind!r}", "an epsilon- or v-prediction model")


def call_unet(sd: SDModel, z: torch.Tensor, tt: torch.Tensor, emb: torch.Tensor,
              ids: torch.Tensor | None = None, abar=None, x: torch.Tensor | None = None
              ) -> torch.Tensor:
    """The UNet on device tensors already in the model's dtype (``tt`` the timestep
    tensor), epsilon in float32: the body of :func:`unet_eps` and of the captured calls
    (graphs.py), which pass the time ids and abar_t they made outside the capture. ``x``:
    the latent x_t in float32 for a v-prediction model's conversion (default ``z``)."""
    tokens, added = split_condition(sd, emb, tuple(z.shape[-2:]), ids)
    out = sd.unet(z, tt, encoder_hidden_states=tokens, added_cond_kwargs=added,
                  return_dict=False)[0].float()
    return eps_from_output(sd, out, z if x is None else x, abar)


def abar_of(sd: SDModel, t) -> float | None:
    """abar_t for a v-prediction model's conversion (None for epsilon models, which do not
    need it). Integer timesteps only: the fractional ones are Euler's, which the
    instruction path runs with epsilon models only."""
    if sd.prediction_type == "epsilon":
        return None
    if isinstance(t, float) and not t.is_integer():
        raise InputError("sd_model", f"predicts {sd.prediction_type} and is sampled at the "
                         f"fractional timestep {t}", "an epsilon-prediction model for "
                         "the Euler sampler, or the DDIM sampler")
    return float(sd.scheduler.alphas_cumprod[int(t)])


def token_ids(sd: SDModel, prompt: str) -> list[int]:
    return sd.tokenizer(prompt, padding="max_length", max_length=sd.tokenizer.model_max_length,
                        truncation=True).input_ids


def unet_eps(sd: SDModel, z: torch.Tensor, t, emb: torch.Tensor) -> torch.Tensor:
    """One UNet call; inputs cast to the model's dtype, output epsilon in float32 (for a
    v-prediction model, converted from v), conditioning unpacked by
    :func:`split_condition`.

    ``t`` is an integer timestep (DDIM) or a fractional one (Euler's linspace timesteps,
    passed as the scheduler gives them, as diffusers' pipelines do)."""
    frac = isinstance(t, float) and not t.is_integer()
    tt = torch.full((z.shape[0],), t if frac else int(t), device=sd.device,
                    dtype=torch.float32 if frac else torch.long)
    abar = abar_of(sd, t)
    x = None if abar is None else host.place(z, sd.device, torch.float32)
    return call_unet(sd, host.place(z, sd.device, sd.dtype), tt,
                     host.place(emb, sd.device, sd.dtype), abar=abar, x=x)


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
