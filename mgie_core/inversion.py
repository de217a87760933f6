"""Inversion of a photo's latent into the diffusion trajectory (docs/algorithms.md section 2):
DDIM, null-text, negative-prompt and direct inversion.

All methods start with DDIM inversion under the source prompt (guidance 1), which gives
the stored trajectory z*_t. They differ in what the reconstruction branch needs to come
back to z*_0 under classifier-free guidance:
  * ddim: nothing (it drifts under guidance 7.5);
  * null_text: one optimised unconditional embedding per step;
  * negative_prompt: the source prompt's own embedding as the unconditional one;
  * direct: a per-step latent offset added to the source branch (evaluated exactly by
    the sampler: the source branch follows z*_t).
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from . import grad_mode, graphs, host
from .diffusion import Schedule, denoise_step, encode_prompt, invert_step, make_schedule, unet_eps
from .errors import GradientError, InputError, why_no_gradient
from .images import Fit
from .models.sd import SDModel
from .report import UpdateReport

log = logging.getLogger(__name__)

METHODS = ("ddim", "null_text", "negative_prompt", "direct")
NULL_TEXT = "null-text inversion"     # the stage's name in errors and update reports


@dataclasses.dataclass
class InversionResult:
    """What an inversion hands to the sampler (custom socket type XMGIE_INVERSION)."""

    method: str
    source_prompt: str
    # Tensors stay on the model's device (a node output keeps them there: a few MB).
    latents: torch.Tensor                 # (N+1, B, 4, h, w): [i] = z*_{t_i}, [N] = z*_0
    timesteps: torch.Tensor               # (N,) descending
    guidance_scale: float
    # (N, 1, 77, D) per-step uncond; SDXL (N, 1, 78, D): the pooled row too (diffusion.py)
    null_embeddings: torch.Tensor | None = None
    offsets: torch.Tensor | None = None           # (N, B, 4, h, w): direct inversion
    settings: dict = dataclasses.field(default_factory=dict)
    image_size: tuple[int, int] = (0, 0)
    updates: UpdateReport = dataclasses.field(default_factory=UpdateReport)  # null-text
    fit: Fit | None = None    # how the photo was fitted to the model (vae.encode_photo)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def z_T(self) -> torch.Tensor:
        return self.latents[0]

    def __repr__(self) -> str:
        return (f"InversionResult({self.method}, {self.num_steps} steps, "
                f"'{self.source_prompt[:40]}', latents {tuple(self.latents.shape[1:])})")


def _check(z0: torch.Tensor, method: str, steps: int) -> None:
    if method not in METHODS:
        raise InputError("method", f"is {method!r}", "one of " + ", ".join(METHODS))
    if z0.ndim != 4 or z0.shape[1] != 4:
        raise InputError("latent", f"has shape {tuple(z0.shape)}", "SD latents [B,4,h,w]")


@torch.no_grad()
def ddim_trajectory(sd: SDModel, z0: torch.Tensor, cond: torch.Tensor, sch: Schedule
                    ) -> torch.Tensor:
    """z*_0 -> z*_T with the source prompt only (guidance 1). Returns (N+1, B, ...) in
    denoising order: [0] = z*_T (t_0), ..., [N] = z*_0, on the model's device (the
    sampler reads a row per step; a host copy would be a transfer per step)."""
    n = sch.num_steps
    z = z0.to(sd.device, torch.float32)
    states = [z]
    # compile_unet="graphs": one captured call, replayed every step (graphs.py)
    cache = graphs.for_run(sd)
    ctl = getattr(sd.unet, "_xmgie_controller", None)
    with host.progress(n, "DDIM inversion") as bar:
        for i in reversed(range(n)):          # from t = 1 up to t = 981
            emb = cond.expand(z.shape[0], -1, -1)
            eps = graphs.unet_eps(cache, "inversion", sd, z, sch.t(i), emb, ctl) \
                if cache.active else unet_eps(sd, z, sch.t(i), emb)
            z = invert_step(sch, i, z, eps)
            states.append(z)
            bar.update()
    return torch.stack(states[::-1])


def _guided_eps(sd, z, t, cond, uncond, scale, cache=None):
    b = z.shape[0]
    zz, emb = torch.cat([z, z]), torch.cat([uncond.expand(b, -1, -1), cond.expand(b, -1, -1)])
    eps = graphs.unet_eps(cache, "null-text guided", sd, zz, t, emb) \
        if cache is not None and cache.active else unet_eps(sd, zz, t, emb)
    eu, ec = eps.chunk(2)
    return eu + scale * (ec - eu)


def null_text_optimisation(sd: SDModel, traj: torch.Tensor, cond: torch.Tensor,
                           uncond: torch.Tensor, sch: Schedule, scale: float,
                           inner_steps: int = 10, lr: float = 1e-2,
                           early_stop: float = 1e-5,
                           report: UpdateReport | None = None) -> torch.Tensor:
    """Per step i: Adam on the unconditional embedding (warm-started from step i-1),
    lr * (1 - i/100), at most ``inner_steps`` iterations, stopping once the loss is below
    early_stop + i * 2e-5; then advance with it. The embedding and loss stay float32.

    The embedding is the whole conditioning tensor: on SDXL its 77 token rows and the
    pooled row (which reaches the UNet through the added time embedding, so it receives a
    gradient and is optimised with the tokens); the pooled row's zero padding gets no
    gradient and stays zero.

    Runs inside :func:`grad_mode.autograd` (ComfyUI calls nodes inside inference mode) with
    its inputs cloned when they are inference tensors. Every Adam step applied, and every
    iteration skipped for a non-finite gradient, is counted in ``report``; a loss that
    carries no gradient raises :class:`GradientError`.

    Host reads: the early stop is a data-dependent branch, so this is the one loop of the
    seed-faithful path that reads back from the device: exactly one read per inner
    iteration (the loss and the finiteness of the gradient, stacked into one tensor), and
    nothing else per step (the trajectory and the embeddings stay on the device). On a
    GPU, ``torch.optim.Adam`` also reads its step count, a host tensor (no wait). The
    early stop is the reference's (prompt-to-prompt's null-text notebook); dropping it
    would save the read but run all ``inner_steps`` iterations."""
    report = report if report is not None else UpdateReport()
    n = sch.num_steps
    nulls = []
    grad_mode.differentiable(sd.unet, stage="null-text inversion")
    # compile_unet="graphs": the UNet passes captured and replayed (graphs.py)
    cache = graphs.for_run(sd)
    coefs = graphs.ddim_coefficients(sch, sd.device) if cache.active else None
    with grad_mode.autograd():
        traj, cond, uncond = grad_mode.autograd_input((traj, cond, uncond))
        traj = traj.to(sd.device, torch.float32)
        u = uncond.detach().float().clone()
        z = traj[0]
        with host.progress(n, "null-text inversion") as bar:
            for i in range(n):
                t = sch.t(i)
                target = traj[i + 1]
                u = u.detach().clone().requires_grad_(True)
                opt = torch.optim.Adam([u], lr=lr * (1.0 - i / 100.0))
                with torch.no_grad():
                    c = cond.expand(z.shape[0], -1, -1)
                    eps_c = graphs.unet_eps(cache, "null-text cond", sd, z, t, c) \
                        if cache.active else unet_eps(sd, z, t, c)
                for _ in range(inner_steps):
                    if cache.active:        # the same loss and gradient, one replay
                        loss, grad = graphs.null_text_gradient(cache, sd, u, z, t, eps_c,
                                                               target, coefs[i], scale, i,
                                                               NULL_TEXT)
                        opt.zero_grad(set_to_none=True)
                        u.grad = grad
                    else:
                        eps_u = unet_eps(sd, z, t, u.expand(z.shape[0], -1, -1))
                        eps = eps_u + scale * (eps_c - eps_u)
                        loss = torch.nn.functional.mse_loss(denoise_step(sch, i, z, eps),
                                                            target)
                        if not loss.requires_grad:
                            raise GradientError(NULL_TEXT, i, *why_no_gradient(loss, u))
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                    if u.grad is None:
                        raise GradientError(NULL_TEXT, i, *why_no_gradient(loss, u))
                    # the one host read of the iteration: loss and finiteness together
                    value, finite = torch.stack([loss.detach().float(),
                                                 torch.isfinite(u.grad).all().float()]
                                                ).tolist()
                    if not finite:
                        log.warning("null-text inversion: non-finite gradient at step %d; "
                                    "keeping the embedding of the last good iteration", i)
                        report.skipped(NULL_TEXT, "non-finite gradient")
                        break
                    opt.step()
                    report.applied(NULL_TEXT)
                    if value < early_stop + i * 2e-5:
                        break
                    host.check_interrupt()
                u = u.detach()
                nulls.append(u)
                with torch.no_grad():
                    z = denoise_step(sch, i, z, _guided_eps(sd, z, t, cond, u, scale, cache))
                bar.update()
    report.log(log, "inversion")
    return torch.stack(nulls)


@torch.no_grad()
def direct_offsets(sd: SDModel, traj: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                   sch: Schedule, scale: float) -> torch.Tensor:
    """Direct inversion: offset_i = z*_{t_{i+1}} - guided step from z*_{t_i}."""
    offsets = []
    traj = traj.to(sd.device, torch.float32)
    with host.progress(sch.num_steps, "direct inversion") as bar:
        for i in range(sch.num_steps):
            z = traj[i]
            stepped = denoise_step(sch, i, z, _guided_eps(sd, z, sch.t(i), cond, uncond, scale))
            offsets.append(traj[i + 1] - stepped)
            bar.update()
    return torch.stack(offsets)


def invert(sd: SDModel, z0: torch.Tensor, source_prompt: str, method: str = "null_text",
           steps: int = 50, guidance_scale: float = 7.5, inner_steps: int = 10,
           image_size: tuple[int, int] = (0, 0), record_offsets: bool = False,
           fit: Fit | None = None) -> InversionResult:
    """Invert latents ``z0`` (B,4,h,w, scaled) under ``source_prompt``.

    Direct inversion: the offset of step i is defined so that the guided source step
    from z*_{t_i} lands on z*_{t_{i+1}}. The sampler evaluates that definition against the
    step it actually takes, i.e. its source branch follows the stored trajectory exactly,
    so no pre-pass is needed. ``record_offsets`` still computes them in a pre-pass (N
    guided UNet calls), e.g. for other samplers; re-adding offsets computed in another
    batch layout lets float noise (~1e-6) grow through guidance.

    ``fit``: how the photo was fitted to the model (``vae.encode_photo``); the sampler
    fits the mask the same way and its result is cropped back with it. A source prompt
    past the text encoder's window is noted in the result's ``updates`` report."""
    _check(z0, method, steps)
    if sd.instruct:
        raise InputError("sd_model", "is an 8-channel instruction model",
                         "a text-to-image model (SD 1.x, SD 2.x or SDXL) for inversion",
                         "Load it with a checkpoint or diffusers loader for this branch.")
    sch = make_schedule(sd, steps)
    report = UpdateReport()
    cond = encode_prompt(sd, source_prompt, "source_prompt", report)
    empty = encode_prompt(sd, "")
    traj = ddim_trajectory(sd, z0, cond, sch)
    result = InversionResult(method, source_prompt, traj, sch.timesteps, guidance_scale,
                             settings={"steps": steps}, image_size=image_size,
                             updates=report, fit=fit)
    if method == "null_text":
        result.null_embeddings = null_text_optimisation(sd, traj, cond, empty, sch,
                                                        guidance_scale, inner_steps,
                                                        report=result.updates)
        result.settings["inner_steps"] = inner_steps
    elif method == "negative_prompt":
        result.null_embeddings = cond[None].expand(steps, -1, -1, -1).clone()
    elif method == "direct" and record_offsets:
        result.offsets = direct_offsets(sd, traj, cond, empty, sch, guidance_scale)
    return result


def source_null(inv: InversionResult, sd: SDModel, i: int,
                empty: torch.Tensor | None = None) -> torch.Tensor:
    """The unconditional embedding the source branch uses at step i (``empty``: the
    empty prompt's embedding, when the caller already has it)."""
    if inv.null_embeddings is not None:
        return host.place(inv.null_embeddings[i], sd.device)
    return empty if empty is not None else encode_prompt(sd, "")
