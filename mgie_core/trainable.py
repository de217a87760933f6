"""xMGIE's trainable modules: what the paper learns next to a frozen diffusion model
(docs/algorithms.md §14).

One idea: each module starts as the identity of today's training-free pipeline, so an
untrained module reproduces today's edits bit for bit, and training only moves it away
from there.

* :class:`PFBWeights`: PFB's a_l, one learnable weight per blend site (module name),
  shared across space and channels, used as ``raw.clamp(0, 1)``; raw starts at 1.0, the
  fixed blend. Plugs into :class:`.pfb.PFBControl` as its ``alpha``; the blend formula is
  :func:`.pfb.blend_features`.
* :class:`IdentityInjection`: IE. At chosen UNet sites the identity embedding e_id of a
  frozen encoder is concatenated to the features and projected back to their width by a
  zero-initialised 1x1 convolution, added residually: h' = h + P_l([h ; e_id]). With
  P_l = 0 the features are unchanged. :meth:`IdentityInjection.hook` is the one way it
  enters a UNet call: a forward hook that asks a selector which rows of the call get
  which e_id. :class:`IdentityEmbeddingControl`'s selector picks the sampler's edit rows;
  training's (training/xmgie_task.py) picks the edit rows of its batched
  [edit; reference] call.
* :class:`LatentPatchDiscriminator`: the critic of L_adv, pix2pix's PatchGAN shape on
  4-channel latents (why latents: its docstring and docs/algorithms.md §14).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Branch
from .control import Control
from .errors import InputError, names_list
from .identity_guidance import IdentityEmbedding, decode_for_grad
from .models.identity import IdentityEncoder
from .pfb import FEATURE_LEVEL, PLACEMENTS, PRESETS, block_output_sites, pfb_diff_sites

# --- PFB's a_l ------------------------------------------------------------------------

class _Clamp01(torch.autograd.Function):
    """clamp(raw, 0, 1) whose gradient also passes outside [0, 1] when a descent step
    would move raw back towards the interval (torch's clamp passes it inside and at the
    ends only: a raw that an optimiser step took past 1 would get no gradient again and
    stay there for good)."""

    @staticmethod
    def forward(ctx, raw):
        ctx.save_for_backward(raw)
        return raw.clamp(0, 1)

    @staticmethod
    def backward(ctx, grad):
        (raw,) = ctx.saved_tensors
        # descent moves raw by -grad: back inside when raw > 1 and grad > 0, or raw < 0
        # and grad < 0; inside (ends included) the gradient passes as in torch's clamp
        passes = ((raw >= 0) & (raw <= 1)) | ((raw > 1) & (grad > 0)) | ((raw < 0) & (grad < 0))
        return grad * passes


def clamp01(raw: torch.Tensor) -> torch.Tensor:
    """``raw.clamp(0, 1)`` (the same values) with the recovering gradient of
    :class:`_Clamp01`."""
    return _Clamp01.apply(raw)


class PFBWeights(nn.Module):
    """One learnable PFB weight a_l per blend site, a_l = clamp(raw_l, 0, 1).

    Why a clamp and not a sigmoid: the untrained module must give today's blend exactly,
    a_l = 1, and a sigmoid reaches 1 only at infinity (sigmoid(raw) = 1 - 1e-7 needs raw
    ~ 16, where its gradient has vanished). A clamp is exactly 1 at raw = 1, torch's
    clamp lets the gradient through at the boundary itself, and :func:`clamp01` also lets
    it through outside when it points back into [0, 1], so a weight an optimiser step
    pushed past 1 is never stuck there. a_l is shared across space and channels (one
    number per site, the paper's alpha_l).

    ``sites`` are the PFB control's module names for ``preset`` and ``placement``
    (:meth:`for_unet`); the parameter ``raw`` holds them in that order (one tensor, so
    optimisers, DDP and FSDP see one ordinary parameter). :meth:`site_values` and
    :meth:`load_site_values` read and write them by site name (the trained file's keys,
    :mod:`.trained`)."""

    def __init__(self, sites: Sequence[str], preset: str = "object",
                 placement: str = "pfb_diff", init: float = 1.0):
        super().__init__()
        if preset not in PRESETS:
            raise InputError("preset", f"is {preset!r}", " or ".join(PRESETS))
        if placement not in PLACEMENTS:
            raise InputError("placement", f"is {placement!r}", " or ".join(PLACEMENTS))
        sites = tuple(sites)
        if not sites or len(set(sites)) != len(sites):
            raise InputError("sites", f"are {list(sites)}", "distinct PFB site names")
        self.sites = sites
        self.preset = preset
        self.placement = placement
        self._index = {s: k for k, s in enumerate(sites)}
        self.raw = nn.Parameter(torch.full((len(sites),), float(init), dtype=torch.float32))

    @classmethod
    def for_unet(cls, unet, preset: str = "object", placement: str = "pfb_diff",
                 init: float = 1.0) -> PFBWeights:
        """Weights for every site :class:`.pfb.PFBControl` blends on ``unet`` with this
        preset and placement."""
        if preset not in PRESETS:
            raise InputError("preset", f"is {preset!r}", " or ".join(PRESETS))
        if placement == "pfb_diff":
            sites = pfb_diff_sites(unet, preset)
        elif placement == "block_outputs":
            sites = block_output_sites(unet, PRESETS[preset]["blocks"])
        else:
            raise InputError("placement", f"is {placement!r}", " or ".join(PLACEMENTS))
        return cls([s.module for s in sites], preset, placement, init)

    def alpha(self, site: str) -> torch.Tensor:
        """a_l of ``site`` as a 0-dim float32 tensor in [0, 1] (carries the gradient)."""
        k = self._index.get(site)
        if k is None:
            raise InputError("site", f"is {site!r}, which has no PFB weight",
                             f"one of {names_list(self.sites)}")
        return clamp01(self.raw)[k]

    def forward(self) -> torch.Tensor:
        """Every a_l, in :attr:`sites` order."""
        return clamp01(self.raw)

    def site_values(self) -> dict[str, torch.Tensor]:
        """{site: raw_l} (0-dim, detached copies on the CPU): the trained file's content."""
        raw = self.raw.detach().float().cpu()
        return {s: raw[k].clone() for s, k in self._index.items()}

    def load_site_values(self, values: dict[str, torch.Tensor]) -> None:
        """Set raw_l from {site: value}; every site of this module must be given."""
        missing = [s for s in self.sites if s not in values]
        if missing:
            raise InputError("PFB weights", f"have no value for the sites {missing}",
                             f"one value for each of {names_list(self.sites)}")
        with torch.no_grad():
            self.raw.copy_(torch.stack([torch.as_tensor(values[s]).float().reshape(())
                                        for s in self.sites]))

    @torch.no_grad()
    def project_(self) -> None:
        """Put raw back into [0, 1] in place (optional after an optimiser step; the
        values used, clamp(raw), are the same either way)."""
        self.raw.clamp_(0, 1)

    def extra_repr(self) -> str:
        return f"{len(self.sites)} sites, preset={self.preset}, placement={self.placement}"


# --- IE ---------------------------------------------------------------------------------

def default_ie_sites(unet) -> list[str]:
    """IE's default sites: the mid block's output and the decoder's 16x16 unit outputs
    (at 512 px; level 2 of the latent), i.e. the decoder sites of PFB-Diff at that size:
    ``mid_block``, ``up_blocks.0.upsamplers.0``, ``up_blocks.1.attentions.0/1`` on SD 1.x.

    Why there: identity is a property of the subject as a whole (a face's proportions, a
    product's shape), which a UNet represents in its deepest, lowest-resolution features;
    the 32x32 and 64x64 levels carry texture and exact position, which the photo's own
    features and the latent blend already keep. Concatenating a D-dimensional vector costs
    (C + D) x C weights per site, least where the maps are smallest, and these are the
    places where PFB mixes the edit with the photo, so the injected identity acts on the
    same features the edit region takes from the edit branch."""
    sites = ["mid_block"]
    sites += [s.module for s in pfb_diff_sites(unet, "object")
              if s.hook == "output" and s.module.startswith("up_blocks")
              and s.level == FEATURE_LEVEL]
    return sites


def _output_channels(module: nn.Module, site: str) -> int:
    """Width of what a UNet module outputs (resnets, transformers, up/downsamplers carry
    ``out_channels``; a middle block's is its last resnet's)."""
    c = getattr(module, "out_channels", None)
    if isinstance(c, int):
        return c
    resnets = getattr(module, "resnets", None)
    if resnets:
        return int(resnets[-1].out_channels)
    raise InputError("sites", f"name {site!r}, whose output width is unknown",
                     "UNet resnets, transformers, up/downsamplers or the middle block")


def _features(output):
    """(the feature tensor of a module's output, a function putting a new one back)."""
    if isinstance(output, torch.Tensor):
        return output, lambda h: h
    if isinstance(output, tuple):                 # transformers with return_dict=False
        return output[0], lambda h: (h, *output[1:])
    if hasattr(output, "sample"):                 # a diffusers output object
        return output.sample, lambda h: dataclasses.replace(output, sample=h) \
            if dataclasses.is_dataclass(output) else type(output)(sample=h)
    raise TypeError(f"cannot inject into a module output of type {type(output).__name__}")


class IdentityInjection(nn.Module):
    """IE: h' = h + P_l([h ; e_id broadcast over H x W]) at each site l.

    P_l is a 1x1 convolution from C_l + D channels back to C_l, zero-initialised (weight
    and bias), so an untrained module adds exactly 0 and today's edit is unchanged bit
    for bit; the residual form also keeps the frozen UNet's features as the path the
    gradient starts from. The projection runs in float32 (the UNet may run in half
    precision: the result is cast back to the features' dtype), so its weights train in
    float32. ``id_dim`` is D, the identity encoder's embedding width; ``encoder_kind``
    records which encoder's embeddings it was trained on ("clip_vision" or
    "face_recognition"). The projections are a ModuleList in :attr:`sites` order."""

    def __init__(self, sites: Sequence[str], channels: Sequence[int], id_dim: int,
                 encoder_kind: str = ""):
        super().__init__()
        sites, channels = tuple(sites), tuple(int(c) for c in channels)
        if not sites or len(sites) != len(channels) or len(set(sites)) != len(sites):
            raise InputError("sites", f"are {list(sites)} with widths {list(channels)}",
                             "distinct UNet module names, one width each")
        if int(id_dim) < 1:
            raise InputError("id_dim", f"is {id_dim}", "the identity embedding's width (>= 1)")
        self.sites, self.channels = sites, channels
        self.id_dim = int(id_dim)
        self.encoder_kind = encoder_kind
        self.proj = nn.ModuleList(nn.Conv2d(c + self.id_dim, c, 1) for c in channels)
        for p in self.proj:
            nn.init.zeros_(p.weight)
            nn.init.zeros_(p.bias)

    @classmethod
    def for_unet(cls, unet, id_dim: int, sites: Sequence[str] | None = None,
                 encoder_kind: str = "") -> IdentityInjection:
        """IE for ``unet`` at ``sites`` (default :func:`default_ie_sites`), widths read
        from the UNet's modules."""
        sites = list(sites) if sites is not None else default_ie_sites(unet)
        modules = dict(unet.named_modules())
        missing = [s for s in sites if s not in modules]
        if missing:
            raise InputError("sites", f"name {missing}, which this UNet does not have",
                             "UNet module names such as mid_block or up_blocks.1.attentions.0")
        return cls(sites, [_output_channels(modules[s], s) for s in sites], id_dim,
                   encoder_kind)

    def check_unet(self, unet) -> list[str]:
        """What does not fit ``unet`` (missing sites, other widths): [] when it fits."""
        modules = dict(unet.named_modules())
        problems = []
        for s, c in zip(self.sites, self.channels):
            if s not in modules:
                problems.append(f"{s} (no such module)")
                continue
            try:
                have = _output_channels(modules[s], s)
            except InputError:
                have = None
            if have != c:
                problems.append(f"{s} (width {have}, trained for {c})")
        return problems

    def inject(self, k: int, h: torch.Tensor, e_id: torch.Tensor) -> torch.Tensor:
        """Site ``k``'s h + P_k([h ; e_id]) for features ``h`` [N,C,H,W] and embeddings
        ``e_id`` [N,D] or [1,D] (one for every row)."""
        proj = self.proj[k]
        e = e_id.to(device=h.device, dtype=torch.float32)
        if e.ndim == 1:
            e = e[None]
        if e.shape[-1] != self.id_dim or e.shape[0] not in (1, h.shape[0]):
            raise InputError("e_id", f"has shape {tuple(e_id.shape)} for {h.shape[0]} rows",
                             f"[1, {self.id_dim}] or [{h.shape[0]}, {self.id_dim}] (the "
                             "identity encoder this IE was trained with)")
        x = torch.cat([h.float(), e[:, :, None, None].expand(h.shape[0], -1, *h.shape[-2:])], 1)
        return h + proj(x).to(h.dtype)

    def _rows_injected(self, k: int, h: torch.Tensor, e_id: torch.Tensor,
                       rows: slice | Sequence[slice]) -> torch.Tensor:
        out = h.clone()
        for sl in [rows] if isinstance(rows, slice) else rows:
            out[sl] = self.inject(k, h[sl], e_id)
        return out

    def hook(self, k: int, select: Callable[[torch.Tensor], tuple | None]) -> _SiteHook:
        """A forward hook for site ``k``'s module: ``select(h)``, given the module's
        output features, returns ``(rows, e_id)`` (a slice or slices of the batch, and the
        embeddings their rows get, [1,D] or one per row of a slice) or None to leave the
        call alone. A callable object, not a closure, so a model deep-copies with it."""
        return _SiteHook(self, k, select)

    def extra_repr(self) -> str:
        return f"sites={list(self.sites)}, id_dim={self.id_dim}"


class _SiteHook:
    """:meth:`IdentityInjection.hook`'s forward hook (its docstring)."""

    def __init__(self, ie: IdentityInjection, k: int, select):
        self.ie, self.k, self.select = ie, k, select

    def __call__(self, module, inputs, output):
        h, put = _features(output)
        got = self.select(h)
        if got is None:
            return None
        rows, e_id = got
        return put(self.ie._rows_injected(self.k, h, e_id, rows))


def embed_sources(encoder: IdentityEncoder, images: torch.Tensor) -> torch.Tensor:
    """e_id of a batch of photos, [B,D] float32 L2-normalised, without gradient: images
    [B,3,H,W] (the training batch's layout) or [B,H,W,3] (an IMAGE), 0..1. Training and
    :class:`IdentityEmbeddingControl` embed the whole source photo with this."""
    x = images if images.ndim == 4 else images[None]
    if x.shape[1] == 3 and x.shape[-1] != 3:
        x = x.permute(0, 2, 3, 1)
    with torch.no_grad():
        return encoder.embed(x).float()


@dataclasses.dataclass
class IdentityEmbeddingControl(Control):
    """Trained IE in the sampler: e_id is injected into the edit rows at IE's sites.

    e_id is ``embedding`` (an :class:`.identity_guidance.IdentityEmbedding` or a [B,D]
    tensor) when given, else the ``encoder``'s embedding of ``source`` ([B,H,W,3] in
    0..1), else of the run's clean source latent decoded (the inversion's z_0, or the
    instruction path's source latent). Every edit row of a call gets it, all guidance
    halves alike: classifier-free guidance then neither amplifies nor cancels it, as in
    training, where the edit is one conditional pass. The reconstruction and reference
    rows never get it. Sites that PFB also blends: list this control before PFB, so
    PFB's mask confines the injected change to the edited region."""

    name = "identity embedding"

    injection: IdentityInjection
    encoder: IdentityEncoder | None = None
    embedding: IdentityEmbedding | torch.Tensor | None = None
    source: torch.Tensor | None = None

    def __post_init__(self):
        emb = self.embedding
        if isinstance(emb, IdentityEmbedding) and self.injection.encoder_kind \
                and emb.kind != self.injection.encoder_kind:
            raise InputError("embedding", f"was made with a {emb.kind} encoder",
                             f"an embedding of the {self.injection.encoder_kind} encoder "
                             "the identity injection was trained with")
        self._ie: IdentityInjection | None = None
        self._e_id: torch.Tensor | None = None
        self._run = None

    def setup(self, run) -> None:
        unet = run.sd.unet
        problems = self.injection.check_unet(unet)
        if problems:
            raise InputError("identity injection", f"does not fit this UNet: {problems}",
                             "IE trained on this model's UNet",
                             "Load trained modules made with the same base model.")
        device = run.latents[Branch.EDIT].device
        ie = self.injection
        p = next(ie.parameters())
        if p.device != device or p.dtype != torch.float32:   # the given module stays as is
            ie = copy.deepcopy(ie).to(device=device, dtype=torch.float32)
        self._ie = ie
        self._e_id = self._reference_embedding(run).to(device)
        self._run = run
        modules = dict(unet.named_modules())
        for k, s in enumerate(ie.sites):
            run.controller.patch_module(modules[s], post=self._ie.hook(k, select=self._select))

    def _reference_embedding(self, run) -> torch.Tensor:
        emb = self.embedding
        if emb is not None:
            vec = emb.vector if isinstance(emb, IdentityEmbedding) else emb
        else:
            if self.encoder is None:
                raise InputError(f"{self.name} encoder", "is missing and no embedding was "
                                 "given", "the identity encoder the injection was trained "
                                 "with, or an identity embedding of the source photo")
            if self.injection.encoder_kind and self.encoder.kind != self.injection.encoder_kind:
                raise InputError(f"{self.name} encoder", f"is a {self.encoder.kind} encoder",
                                 f"the {self.injection.encoder_kind} encoder the identity "
                                 "injection was trained with")
            src = self.source
            if src is None:
                clean = run.reference_at(run.schedule.num_steps)
                if clean is None:
                    raise InputError(f"{self.name} source", "is missing and the sampler has "
                                     "no source latent", "the source photo")
                with torch.no_grad():
                    src = decode_for_grad(run.sd, clean.float(), "none")
            vec = embed_sources(self.encoder, src)
        vec = vec.detach().float()
        vec = vec if vec.ndim == 2 else vec[None]
        if vec.shape[-1] != self.injection.id_dim:
            raise InputError("embedding", f"has width {vec.shape[-1]}",
                             f"width {self.injection.id_dim} (the identity encoder the "
                             "injection was trained with)")
        return F.normalize(vec, dim=-1)

    def _select(self, h: torch.Tensor):
        """(edit rows as slices of the batch, e_id) of the current sampler call, or None
        outside one. A call's layout names each block of ``bsz`` rows (branch, half)."""
        run = self._run
        ctx = run.controller.context if run is not None else None
        if ctx is None:          # outside a sampler call, or PFB's reference pass
            return None
        layout = ctx.layout
        edit = [i for i, (b, _) in enumerate(layout.rows) if b == Branch.EDIT]
        if not edit:
            return None
        bsz = h.shape[0] // len(layout)
        e = self._e_id
        if e.shape[0] not in (1, bsz):
            raise InputError("embedding", f"holds {e.shape[0]} embeddings for {bsz} images",
                             "one embedding, or one per image")
        return [slice(i * bsz, (i + 1) * bsz) for i in edit], e

    def teardown(self, run) -> None:
        self._run = None
        self._ie = None
        self._e_id = None


# --- the critic of L_adv ----------------------------------------------------------------

NORMS = ("spectral", "instance", "none")


def min_latent_size(n_layers: int) -> int:
    """Smallest latent side the PatchGAN takes: ``n_layers`` stride-2 4x4 convolutions
    (each floor-halves), then two stride-1 4x4 convolutions (each takes 1 off) must leave
    at least one patch: 3 * 2**n_layers (24 for n_layers=3, a 192 px image in SD)."""
    return 3 * 2 ** n_layers


class LatentPatchDiscriminator(nn.Module):
    """L_adv's critic: pix2pix's PatchGAN (NLayerDiscriminator) shape on SD latents.

    4x4 convolutions: ``n_layers`` with stride 2 and widths ndf, 2 ndf, 4 ndf, ... (at
    most 8 ndf), one with stride 1, and a last one to 1 channel; LeakyReLU(0.2) after
    every one but the last; no normalisation on the first. Its output is one logit per
    overlapping patch, [B,1,h,w] (6x6 for a 64x64 latent with n_layers=3).

    Why latents, not decoded images: the generator's output during training is a latent
    (the predicted clean latent x0_hat); a pixel critic needs x0_hat decoded through the
    VAE decoder, whose activations at 512 px are the largest tensors of the whole step
    (bench/train_memory.py measures it: docs/algorithms.md §14), for the critic's own
    step and again, with gradient, for the generator's. On latents the critic costs a
    few MB, sees exactly what the UNet produces, and the real samples are the ground
    truth's latents that the data pipeline encodes anyway (DMD2 and LADD train their
    critics on latent features for the same reason). A 4-channel latent pixel is an 8x8
    pixel patch, so n_layers=3 (receptive field 70 latent pixels) judges the whole 64x64
    latent of a 512 px image at each of its 6x6 outputs; n_layers=2 (34) keeps pix2pix's
    local patches (about 270 px), n_layers=1 (16) suits the tiny 8x8 latents of tests.

    Normalisation ``norm``: "spectral" (default) bounds each convolution's Lipschitz
    constant, the usual partner of the hinge loss, and does not depend on the batch, so
    the critic behaves the same with 4 images per GPU as with 32 and under DDP (pix2pix's
    BatchNorm would differ per device and between training and evaluation);
    "instance" (pix2pix's option; degenerate on the 1x1 and 2x2 maps of small latents)
    or "none"."""

    def __init__(self, in_channels: int = 4, ndf: int = 64, n_layers: int = 3,
                 norm: str = "spectral"):
        super().__init__()
        if norm not in NORMS:
            raise InputError("norm", f"is {norm!r}", names_list(NORMS))
        if n_layers < 1:
            raise InputError("n_layers", f"is {n_layers}", "at least 1")
        self.n_layers, self.norm = int(n_layers), norm

        def conv(cin, cout, stride, first=False, last=False):
            c = nn.Conv2d(cin, cout, 4, stride, 1, bias=norm != "instance" or last or first)
            if norm == "spectral":
                c = nn.utils.parametrizations.spectral_norm(c)
            layers = [c]
            if norm == "instance" and not first and not last:
                layers.append(nn.InstanceNorm2d(cout, affine=False))
            if not last:
                layers.append(nn.LeakyReLU(0.2, True))
            return layers

        layers = conv(in_channels, ndf, 2, first=True)
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2 ** n, 8)
            layers += conv(ndf * prev, ndf * mult, 2)
        prev, mult = mult, min(2 ** n_layers, 8)
        layers += conv(ndf * prev, ndf * mult, 1)
        layers += conv(ndf * mult, 1, 1, last=True)
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Patch logits [B,1,h,w] of latents ``z`` [B,C,H,W] (float32 logits)."""
        need = min_latent_size(self.n_layers)
        if min(z.shape[-2:]) < need:
            raise InputError("latents", f"are {tuple(z.shape[-2:])} for a PatchGAN with "
                             f"n_layers={self.n_layers}", f"at least {need}x{need}",
                             "Use fewer layers (n_layers) or larger images.")
        p = next(self.parameters())
        return self.net(z.to(p.dtype)).float()
