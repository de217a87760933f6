"""Identity guidance: keep the edited subject's identity during sampling, without
training (docs/algorithms.md section 8).

A sampling control for the two-branch sampler. For the steps of a window (default the
steps from 20 % to 70 % of the trajectory: 10..34 of 50), before the step's UNet call:

  eps  = guided eps of the edit branch at z (uncond + s (cond - uncond), with the
         sampler's injection and CAM), computed WITHOUT gradient and held constant;
  x0   = (z - sqrt(1 - abar_t) eps) / sqrt(abar_t)             (DDIM's predicted latent)
  img  = VAE.decode(x0 / scaling_factor) -> [B,H,W,3] in 0..1 (cropped to the mask's box)
  L    = 1 - cos(E_id(img), e_id)                            (e_id from the source image)
  z   <- z - weight * sqrt(abar_t) * g / rms(g)   inside the mask,  g = dL/dx0

Why eps is held constant: backpropagating through the UNet would cost a second, much
larger backward pass for a term that is small mid-trajectory (dx0/dz = 1/sqrt(abar)
dominates); the gradient flows through x0, the VAE decoder and the encoder only.

Why the step is taken in x0 space and normalised, not scaled by sigma_t (MAG's rule):
the loss is defined on the decoded clean image, and with eps fixed a change dx0 of the
predicted latent is exactly dz = sqrt(abar_t) dx0. Stepping x0 by a fixed amount gives
the same image-space strength at every step of the window, where sigma_t =
sqrt((1 - abar)/abar) would make the first steps (sigma ~ 3 at step 10 of 50, when x0 is
still blurry) dozens of times stronger than the last. The gradient of 1 - cos through
a VAE decoder and a face/CLIP encoder varies by orders of magnitude between encoders and
image sizes, so it is normalised by its RMS over the updated region: ``weight`` is then
the RMS change of the predicted clean latent per iteration, in SD latent units (the
latents have a standard deviation of about 1). The default 0.05 moves x0 by about 5 %
of its spread per step; the next steps' eps partly re-absorbs each move.

Memory: the VAE decoder at 512 px keeps ~GBs of activations for the backward pass (at
1024 px, SDXL's size, four times as much: the decoder's last blocks hold 128-256 channels
at the full 1024x1024).
``memory="checkpoint"`` (default) recomputes each decoder block in the backward pass
(torch.utils.checkpoint): the same gradient, about one extra decoder forward per
iteration, activations of one block at a time. ``"downscale"`` decodes a 2x-downsampled
latent: a quarter of the memory and time, an approximate gradient (the decoder sees a
latent it was not trained on; identity encoders work at 112-224 px, so a 256 px decode
at 512 px still carries the identity). ``"none"``: plain backward, the most memory.
On SDXL at 1024 px "checkpoint" stays the default (its VAE decoder is SD 1.x's, at twice
the side); "downscale" is the choice for a card that cannot hold one 1024 px decoder
block's activations with their gradients.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import grad_mode, guidance, host
from .attention import COND, UNCOND, BatchLayout, Branch, MaskPyramid
from .control import Control
from .errors import InputError, names_list
from .models.identity import IdentityEncoder, crop_to_mask
from .plan import EditPlan

log = logging.getLogger(__name__)

MEMORY_MODES = ("checkpoint", "downscale", "none")
EDIT_GUIDED = BatchLayout(((Branch.EDIT, UNCOND), (Branch.EDIT, COND)))


# --- reference embedding ---------------------------------------------------------------

@dataclasses.dataclass
class IdentityEmbedding:
    """e_id = E_id(X) of the source image (custom socket type XMGIE_ID_EMBEDDING)."""

    vector: torch.Tensor          # [B,D] L2-normalised, float32, CPU
    kind: str                     # the encoder's kind: "clip_vision" | "face_recognition"
    source: str                   # how it was made, for reports
    cropped: bool = False         # made from the mask's box (guidance then crops too)
    margin: float = 0.1           # the crop's margin, as a fraction of the box

    def __repr__(self) -> str:
        return f"IdentityEmbedding({self.kind}, {tuple(self.vector.shape)}, {self.source})"


def embed_identity(encoder: IdentityEncoder, image: torch.Tensor,
                   mask: torch.Tensor | None = None, margin: float = 0.1
                   ) -> IdentityEmbedding:
    """The identity embedding of ``image`` ([B,H,W,3] in 0..1), cropped to the box of
    ``mask`` grown by ``margin`` when a mask is given."""
    img = image if image.ndim == 4 else image[None]
    h, w = img.shape[1:3]
    desc = f"{w}x{h} image"
    if mask is not None:
        img = crop_to_mask(img, mask.to(img.device), margin)
        desc += f", cropped to the mask's box (margin {margin:g}) {img.shape[2]}x{img.shape[1]}"
    with torch.no_grad():
        vec = encoder.embed(img).float().cpu()
    return IdentityEmbedding(vec, encoder.kind, desc, cropped=mask is not None,
                             margin=float(margin))


# --- differentiable decode ---------------------------------------------------------------

def mask_box(mask: torch.Tensor, margin: float = 0.1, threshold: float = 0.5
             ) -> tuple[float, float, float, float]:
    """Bounding box (y0, y1, x0, x1) of ``mask`` (union over the batch) grown by
    ``margin`` of its size on each side, as fractions of the mask's height and width
    (so it applies to a decode of any resolution). Same rule as :func:`crop_to_mask`."""
    m = mask if mask.ndim == 2 else mask.reshape(-1, *mask.shape[-2:]).amax(0)
    ys, xs = torch.nonzero(m > threshold, as_tuple=True)
    if ys.numel() == 0:
        raise InputError("mask", f"is empty (no pixel above {threshold:g})",
                         "a mask covering the subject whose identity is kept")
    h, w = m.shape
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    my, mx = round((y1 - y0) * margin), round((x1 - x0) * margin)
    return (max(0, y0 - my) / h, min(h, y1 + my) / h, max(0, x0 - mx) / w, min(w, x1 + mx) / w)


def crop_box(images: torch.Tensor, box: tuple[float, float, float, float]) -> torch.Tensor:
    """Slice [B,H,W,3] images to a fractional box (differentiable)."""
    h, w = images.shape[1:3]
    y0, y1 = int(math.floor(box[0] * h)), max(int(math.ceil(box[1] * h)), 1)
    x0, x1 = int(math.floor(box[2] * w)), max(int(math.ceil(box[3] * w)), 1)
    return images[:, min(y0, y1 - 1):y1, min(x0, x1 - 1):x1, :]


@contextlib.contextmanager
def checkpointed_decoder(vae):
    """Recompute the VAE decoder's mid and up blocks in the backward pass instead of
    keeping their activations (torch.utils.checkpoint on each block's forward; the
    instance attribute shadows the class method and is deleted afterwards)."""
    dec = vae.decoder
    blocks = [b for b in [getattr(dec, "mid_block", None), *getattr(dec, "up_blocks", [])]
              if b is not None]
    if not blocks:
        raise InputError("memory", "is 'checkpoint' but this VAE decoder has no mid/up "
                         "blocks", "a diffusers AutoencoderKL", "Use memory='downscale'.")
    for b in blocks:
        b.forward = functools.partial(checkpoint, type(b).forward.__get__(b),
                                      use_reentrant=False)
    try:
        yield
    finally:
        for b in blocks:
            b.__dict__.pop("forward", None)


def decode_for_grad(sd, x0: torch.Tensor, memory: str = "checkpoint") -> torch.Tensor:
    """Differentiable VAE decode of scaled latents (float32) -> [B,H,W,3] float32 in
    0..1. The VAE may run in half precision: the cast is part of the graph, so the
    gradient comes back to ``x0`` in float32."""
    if memory not in MEMORY_MODES:
        raise InputError("memory", f"is {memory!r}", f"one of {names_list(MEMORY_MODES)}")
    z = x0
    if memory == "downscale":
        z = F.avg_pool2d(z, 2)
    # the VAE's own dtype: a loader may keep SDXL's VAE in float32 (its half-precision
    # decoder overflows) under a half-precision UNet
    vae_dtype = next(sd.vae.parameters()).dtype
    z = host.place(z, sd.device, vae_dtype) / sd.vae.config.scaling_factor
    ctx = checkpointed_decoder(sd.vae) if memory == "checkpoint" else contextlib.nullcontext()
    with ctx:
        x = sd.vae.decode(z).sample
    # clamp's gradient is 0 outside 0..1, like the saved image; fine for guidance.
    return ((x.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)


# --- the control -----------------------------------------------------------------------

@dataclasses.dataclass
class IdentityGuidance(Control):
    """Identity guidance control (see the module docstring for the update rule).

    The reference e_id is ``embedding`` (an :class:`IdentityEmbedding` or a [B,D]
    tensor); without one it is computed in setup from ``source`` ([B,H,W,3]) or, failing
    that, from the inversion's clean source latent, decoded.
    ``mask``: the region to keep; None uses the sampler's mask, a mask given here
    overrides it for this control only (``Control.resolve_mask``); one of them is needed
    unless ``use_mask=False``. ``crop``: embed the decoded image cropped to the mask's box
    (None: crop iff the embedding was made from a crop; a computed embedding is cropped
    when there is a mask).

    ``only_people`` (default): with an edit plan (``plan``, else the sampler's) whose
    subject is not a person (``EditPlan.subject_is_person``), the control stands aside for
    the run: no update, no embedding, no mask needed, and the run's report counts the
    window's steps as skipped with the reason. Without a plan it always acts."""

    name = "identity guidance"

    encoder: IdentityEncoder
    embedding: IdentityEmbedding | torch.Tensor | None = None
    source: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    start: float = 0.2                 # window: steps [start n, end n), 10..34 of 50
    end: float = 0.7
    weight: float = 0.05               # RMS step of the predicted clean latent
    iterations: int = 1
    crop: bool | None = None
    margin: float = 0.1
    use_mask: bool = True
    memory: str = "checkpoint"
    plan: EditPlan | None = None    # own edit plan; None: the sampler's
    only_people: bool = True           # stand aside when the plan's subject is no person

    def __post_init__(self):
        if self.memory not in MEMORY_MODES:
            raise InputError("memory", f"is {self.memory!r}", f"one of {names_list(MEMORY_MODES)}")
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise InputError("start/end", f"are {self.start}/{self.end}",
                             "fractions of the steps with 0 <= start <= end <= 1")
        if self.weight < 0 or self.iterations < 1:
            raise InputError("weight/iterations", f"are {self.weight}/{self.iterations}",
                             "weight >= 0 and at least one iteration")
        emb = self.embedding
        if isinstance(emb, IdentityEmbedding) and emb.kind != self.encoder.kind:
            raise InputError("embedding", f"was made with a {emb.kind} encoder",
                             f"an embedding from this {self.encoder.kind} encoder",
                             "Embed the source image with the same identity encoder.")
        self.history: list[dict] = []
        self._records: list[tuple] = []      # the run's device records (setup resets)
        self._e_id: torch.Tensor | None = None

    # -- sampler protocol ---------------------------------------------------------
    def setup(self, run) -> None:
        if not run.two_branch:
            raise InputError("controls", "include identity guidance, which needs the "
                             "two-branch sampler", "the CAM-masked two-branch sampler "
                             "(sampler.edit)", "The instruction sampler is not supported yet.")
        # The gradient goes through the VAE decoder and the identity encoder (eps held
        # constant), not the UNet.
        grad_mode.differentiable(run.sd.vae, self.encoder.model, stage="identity guidance")
        n = run.schedule.num_steps
        self._window = range(int(round(self.start * n)), int(round(self.end * n)))
        self.history = []                    # per run (a cached node output is reused)
        self._records: list[tuple] = []      # (step, iteration, loss on the device)
        self.stood_aside = self.aside_reason(run)
        if self.stood_aside:
            run.report.skipped(self.name, self.stood_aside, n=max(len(self._window), 1))
            log.info("identity guidance: %s", self.stood_aside)
            self._window = range(0)
            self._pyramid = None
            return
        mask = self.resolve_mask(run, self.mask, required=self.use_mask,
                                 use="the subject whose identity is kept (or set "
                                     "use_mask=False to update everywhere)")
        self._pyramid = MaskPyramid(mask.float()) if mask is not None else None
        if self._pyramid is not None:        # on the device before the loop
            z = run.latents[Branch.EDIT]
            self._pyramid.at(tuple(z.shape[-2:]), z.device)
        emb = self.embedding
        crop = self.crop
        if crop is None:
            crop = emb.cropped if isinstance(emb, IdentityEmbedding) else mask is not None
        if crop and mask is None:
            raise InputError("crop", "is on but there is no mask", "a mask to crop to")
        margin = emb.margin if isinstance(emb, IdentityEmbedding) else self.margin
        self._box = mask_box(mask, margin) if crop else None
        if emb is None:
            src = self.source
            if src is None:
                with torch.no_grad():
                    src = decode_for_grad(run.sd, run.reference_at(n).float(), "none")
            emb = embed_identity(self.encoder, src, mask if crop else None, margin)
        vec = emb.vector if isinstance(emb, IdentityEmbedding) else emb
        self._e_id = F.normalize(vec.detach().float(), dim=-1).to(self.encoder.device)

    def aside_reason(self, run) -> str:
        """Why the control stands aside in this run ('' when it acts): with
        ``only_people``, an edit plan whose subject is not a person."""
        plan = self.resolve_plan(run, self.plan)
        if not self.only_people or plan is None or plan.subject_is_person:
            return ""
        what = repr(plan.object) if plan.object else "(no object)"
        return (f"stood aside: the edit plan's subject {what} is not a person "
                "(only_people is on)")

    def teardown(self, run) -> None:
        self._pyramid = None
        records, self._records = self._records, []
        if records:
            values = torch.stack([r[2].float().reshape(()) for r in records]).tolist()
            self.history = [{"step": r[0], "iteration": r[1], "loss": v}
                            for r, v in zip(records, values)]

    def before_step(self, run, i: int) -> None:
        if i not in self._window or self.weight == 0:
            return
        z = run.latents[Branch.EDIT].float()
        m = (self._pyramid.at(tuple(z.shape[-2:]), z.device)[:, None]
             if self.use_mask else torch.ones_like(z[:, :1]))
        a = run.schedule.abar(run.schedule.t(i))
        for it in range(self.iterations):
            loss, grad = self.loss_and_grad(run, z, i)
            self._records.append((i, it, loss))        # read at the end of the run
            ok = guidance.count_update(run, self.name, grad, i)
            # dL/dx0 = sqrt(abar) dL/dz; normalised over the updated region (per image)
            g = grad * a ** 0.5
            rms = ((g ** 2 * m).sum((1, 2, 3), keepdim=True)
                   / (m.sum((1, 2, 3), keepdim=True) * g.shape[1]).clamp_min(1)).sqrt()
            step = g / rms.clamp_min(1e-12)
            z = guidance.masked_update(z, step, m, self.weight * a ** 0.5, ok)
        run.latents[Branch.EDIT] = z.detach()

    # -- the loss -----------------------------------------------------------------
    def edit_eps(self, run, z: torch.Tensor, i: int) -> torch.Tensor:
        """Guided eps of the edit branch at ``z`` (no gradient), as the sampler computes
        it: injection replayed from the reconstruction row's cache, plus CAM."""
        hooks = []
        inj = run.injection
        if inj is not None:
            hooks.append(guidance.CachedInjection(inj, guidance.source_cache(run, i)))
        hooks += guidance.sampler_hooks_for_edit(run)
        b = z.shape[0]
        emb = torch.cat([run.null.expand(b, -1, -1), run.cond_tgt.expand(b, -1, -1)])
        with torch.no_grad():
            e = guidance._call_unet(run, EDIT_GUIDED, torch.cat([z, z]), emb, i, hooks, None)
        eu, ec = e.float().split(b)
        return eu + run.guidance_scale * (ec - eu)

    def loss_and_grad(self, run, z: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean 1 - cos as a 0-dim tensor, dL/dz in float32) at ``z`` with eps held
        constant. Runs inside
        :func:`grad_mode.autograd` with its inputs as normal tensors, whatever mode the
        sampler runs in; no gradient raises :class:`GradientError`."""
        with grad_mode.autograd():
            z, e_id = grad_mode.autograd_input((z, self._e_id))
            eps = self.edit_eps(run, z.detach(), i)
            a = run.schedule.abar(run.schedule.t(i))
            zv = z.detach().float().requires_grad_(True)
            x0 = (zv - (1 - a) ** 0.5 * eps) / a ** 0.5
            img = decode_for_grad(run.sd, x0, self.memory)
            if self._box is not None:
                img = crop_box(img, self._box)
            e = self.encoder.embed(img)
            ref = e_id if e_id.shape[0] in (1, e.shape[0]) else e_id[:1]
            loss = (1 - (e * ref).sum(-1)).mean()
            grad = guidance.gradient(loss * z.shape[0], zv, self.name, i)
        return loss.detach(), grad.float()
