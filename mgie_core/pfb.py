"""PFB: progressive feature blending (PFB-Diff; docs/algorithms.md section 5).

A sampling control. At chosen places inside the UNet, the edit branch's features are
blended with the reference branch's, in the same batched call:

    h = m * (a_l * h_edit + (1 - a_l) * h_ref) + (1 - m) * h_ref

with m the (binary) mask resized to the features; a_l = 1 is the official code
(:func:`blend_features`, the one formula sampling and training use; a trained a_l per
site comes from :class:`.trainable.PFBWeights`, docs/algorithms.md §14). The
reference is the reconstruction branch pinned to the stored inverted latent z*_t
(text-to-image path) or the noised source latent (instruction path), so no extra UNet
pass is needed. Latent blending z = m z + (1 - m) z_ref follows each early step.

Where (``placement="pfb_diff"``, the default) follows the authors' code
(CMACH508/PFB-Diff, ``UNetModel.forward_fusion`` with the ``fusion_layers`` of
``edit_coco_object.py`` / ``edit_coco_background.py``). In diffusers terms, for SD 1.x
at 512 px (latent 64x64; "16x16" is down block 2, "8x8" down block 3 and the middle):

* encoder: the *input* of each unit (a resnet with its attention, or a downsampler) of
  down blocks 2 and 3 except the first, i.e. ``down_blocks.2.resnets.1``,
  ``down_blocks.2.downsamplers.0``, ``down_blocks.3.resnets.0``,
  ``down_blocks.3.resnets.1`` (16, 16, 8, 8). The blend replaces the tensor flowing on;
  the skip connection saved before it is the edit's own, unblended. The background
  preset starts one unit earlier, at ``down_blocks.2.resnets.0`` (16x16, the output of
  the 32x32 block's downsampler: docs/algorithms.md section 5's "from 32x32").
* middle: the mid block's *input* is blended with the reference's mid block *output*
  (``h_ref[12]`` in the authors' indexing; both are 8x8 with the same channels).
* decoder: the *output* of every up-block unit that is at 16x16 or 8x8, before it is
  concatenated with the next skip: ``up_blocks.0.resnets.0``, ``up_blocks.0.resnets.1``,
  ``up_blocks.0.upsamplers.0``, ``up_blocks.1.attentions.0``,
  ``up_blocks.1.attentions.1`` (8, 8, 16, 16, 16). The middle output itself (the first
  up unit's input) is not blended.

The same rules, by block index, place the sites on any UNet with SD 1.x's block
structure (the tiny test UNet has one layer per block, so fewer units), and by level on
the others: the sites are at the architecture's ``LayerChoices.pfb_feature_level`` and
below (latent / 4: 1/32 of the image side). On SDXL at 1024 px (latent 128x128) that is
its lowest level, 32x32, the level of its 10-deep transformers; SD 1.x's 8x8 has no
counterpart there (SDXL has three levels), so its sites are dropped, not moved:

* encoder: ``down_blocks.2.resnets.1`` (the background preset also
  ``down_blocks.2.resnets.0``, the output of the 64x64 block's downsampler);
* middle: the mid block's input, blended with the reference's mid block output;
* decoder: ``up_blocks.0.attentions.0``, ``up_blocks.0.attentions.1`` (the third unit of
  that block ends in its upsampler, at 64x64, as SD 1.x's ``up_blocks.1`` does).
``placement="block_outputs"`` is the earlier xMGIE placement, kept as an option: the
outputs of whole diffusers blocks (after their up/down samplers), including a down
block's skip tensors. It is not PFB-Diff's.

PFB-Diff resizes its 64x64 mask bicubically to each site *without* thresholding; here
the mask is resized and thresholded at 0.5 like CAM's (docs/algorithms.md section 4).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from .architecture import architecture_of
from .attention import COND, Branch, MaskPyramid
from .control import Control
from .errors import InputError

PRESETS = {
    # 16x16 and 8x8, every step; latent blending for the first 24 of 50 steps
    "object": dict(first_unit=False, min_t=-1, latent_fraction=24 / 50, dilate_px=0,
                   background=False,
                   blocks=("down_blocks.2", "mid_block", "up_blocks.0", "up_blocks.1")),
    # from the 32x32 block's downsampled output down to 8x8, while t > 200 (40 of 50
    # steps); latent blending for the first 9; mask = 1 - dilate(object mask, 36 px)
    "background": dict(first_unit=True, min_t=200, latent_fraction=9 / 50, dilate_px=36,
                       background=True,
                       blocks=("down_blocks.1", "down_blocks.2", "down_blocks.3", "mid_block",
                               "up_blocks.0", "up_blocks.1", "up_blocks.2")),
}
PLACEMENTS = ("pfb_diff", "block_outputs")
REFERENCES = ("cond", "per_half")
# PFB-Diff blends at latent / 4 and below (16x16 and 8x8 at 512 px): SD 1.x's
# ``LayerChoices.pfb_feature_level``; each UNet's own comes from its architecture.
FEATURE_LEVEL = 2


@dataclasses.dataclass(frozen=True)
class Site:
    """One place where features are blended."""

    module: str          # diffusers module name, e.g. "down_blocks.2.resnets.1"
    hook: str            # "input" (what enters the module), "output", "block_output"
    level: int           # features at latent / 2**level
    ref: str = "same"    # "same" tensor of the reference rows, or their "mid_output"


def pfb_diff_sites(unet, preset: str = "object") -> list[Site]:
    """PFB-Diff's blend sites on ``unet`` in execution order (see the module docstring)."""
    downs, ups = list(unet.down_blocks), list(unet.up_blocks)
    first = architecture_of(unet).layers.pfb_feature_level    # latent / 2**first
    if len(downs) <= first or len(ups) <= first or unet.mid_block is None:
        raise InputError("sd_model", f"has a UNet with {len(downs)} down blocks",
                         f"a UNet with more than {first} resolution levels and a middle "
                         "block (SD 1.x, SD 2.x, SDXL)")
    sites: list[Site] = []
    for d in range(first, len(downs)):
        units = [f"down_blocks.{d}.resnets.{k}" for k in range(len(downs[d].resnets))]
        if getattr(downs[d], "downsamplers", None):
            units.append(f"down_blocks.{d}.downsamplers.0")
        if d == first and not PRESETS[preset]["first_unit"]:
            units = units[1:]
        sites += [Site(u, "input", d) for u in units]
    sites.append(Site("mid_block", "input", len(downs) - 1, ref="mid_output"))
    for u, block in enumerate(ups):
        level = len(ups) - 1 - u
        n = len(block.resnets)
        has_attn = getattr(block, "attentions", None) is not None
        for k in range(n):
            if k == n - 1 and getattr(block, "upsamplers", None):
                module, out_level = f"up_blocks.{u}.upsamplers.0", level - 1
            else:
                kind = "attentions" if has_attn else "resnets"
                module, out_level = f"up_blocks.{u}.{kind}.{k}", level
            if out_level >= first:
                sites.append(Site(module, "output", out_level))
    return sites


def _preset_blocks(arch, preset: str) -> tuple[str, ...]:
    """The ``block_outputs`` placement's blocks of ``preset`` on an architecture (its
    ``LayerChoices``; SD 1.x's where it names none)."""
    try:
        return arch.layers.pfb_blocks(preset)
    except KeyError:
        return PRESETS[preset]["blocks"]


def block_output_sites(unet, blocks: Sequence[str]) -> list[Site]:
    """The ``block_outputs`` placement: whole diffusers blocks' outputs (and skips)."""
    arch = architecture_of(unet)
    return [Site(b, "block_output", arch.block_output_level(b)) for b in blocks]


def dilate(mask: torch.Tensor, px_at_512: float) -> torch.Tensor:
    """``cv2.dilate`` of a [B,H,W] mask with a k x k kernel of ones (PFB-Diff's
    background mask: k = 36 at 512 px; here k = round(px_at_512 * W / 512)).

    OpenCV's default anchor for an even kernel is k // 2, so output (y, x) is the maximum
    over input rows y - k//2 .. y + k - 1 - k//2 (and columns likewise); outside the
    image counts as 0 (kornia's dilation with the origin set to that anchor). A kernel of
    k pixels, not a radius: radius 36 (73 x 73) more than
    doubles the added area (on a 512 px ellipse of 39,608 px: 38,304 px added against
    17,325). PFB-Diff works at 512 px only; scaling k with the width keeps the same margin
    relative to the image at other sizes (9 px at 128)."""
    k = int(round(px_at_512 * mask.shape[-1] / 512))
    if k <= 1:
        return mask
    from kornia.morphology import dilation

    # kornia reflects the kernel (Minkowski dilation: window y - (k-1-o) .. y + o for
    # origin o); origin k - 1 - k//2 puts the window at cv2's y - k//2 .. y + k-1-k//2.
    # Geodesic borders: outside the image is ignored, as 0 would be for a 0/1 mask.
    o = k - 1 - k // 2
    out = dilation(mask[:, None].float(), torch.ones(k, k, device=mask.device), origin=[o, o],
                   border_type="geodesic")
    return out[:, 0].to(mask.dtype)


def blend_features(h_edit: torch.Tensor, h_ref: torch.Tensor, m: torch.Tensor,
                   a: float | torch.Tensor = 1.0) -> torch.Tensor:
    """PFB's blend h = m (a h_edit + (1 - a) h_ref) + (1 - m) h_ref: the one formula of
    the sampler (:class:`PFBControl`) and of training.

    ``m`` broadcasts to the features ([B,1,h,w] in {0,1}); ``a`` is a number or a 0-dim
    tensor (a trained a_l, which then receives the gradient). A number 1 skips the inner
    mix (the official code); a tensor always mixes, in float32 so that a_l's gradient
    is summed in float32 under a half-precision UNet, and the result is cast back to the
    features' dtype. At a = 1 that is exactly h_edit (1 * x = x and x + 0 * y = x in
    floating point, and m is 0 or 1), so an untrained weight reproduces the fixed blend
    bit for bit."""
    if isinstance(a, torch.Tensor):
        dtype = h_edit.dtype
        he, hr, mf = h_edit.float(), h_ref.float(), m.float()
        a = a.float()
        return (mf * (a * he + (1 - a) * hr) + (1 - mf) * hr).to(dtype)
    if a == 1.0:
        inner = h_edit
    else:
        inner = a * h_edit + (1 - a) * h_ref
    return m * inner + (1 - m) * h_ref


@dataclasses.dataclass
class PFBControl(Control):
    """PFB feature and latent blending.

    ``reference`` chooses the reference features each guidance half of the edit blends
    with. "cond" (default, PFB-Diff's code): every half takes the reference's
    *conditional* features (source prompt; on the instruction path the instruction- and
    image-conditioned row). On the text-to-image path those are the features of the pass
    that made the stored trajectory (DDIM inversion, guidance 1, source prompt), so the
    blended background follows z*_t whatever inversion method is used; each half's own
    unconditional reference instead depends on the inversion (empty prompt for DDIM and
    direct inversion, whose guided step from z*_t leaves the trajectory; optimised nulls
    for null-text; the source prompt for negative-prompt inversion). "per_half": each
    half blends with the reference's features of the same half (the earlier xMGIE rule).

    ``placement``: "pfb_diff" (default, the authors' sites, see the module docstring) or
    "block_outputs" (whole-block outputs including skips; ``blocks`` overrides the
    preset's blocks there). ``alpha`` is one a_l for all sites, a dict keyed by module
    name or prefix ("mid_block", "up_blocks.1"; the longest matching key wins), or a
    module with one learnable a_l per site (:class:`.trainable.PFBWeights`, made for the
    same preset and placement): its values are read once per run when no gradient is
    recorded (sampling), and at every call when one is (training through the sampler).

    ``mask``: the edited object (white); None (default) uses the sampler's mask, a mask
    given here overrides it for this control only (``Control.resolve_mask``). PFB needs
    one of the two."""

    name = "PFB"

    mask: torch.Tensor | None = None      # own [B,H,W] object mask; None: the sampler's
    preset: str = "object"
    alpha: float | dict | torch.nn.Module = 1.0   # per-site a_l, one value, or PFBWeights
    blocks: Sequence[str] | None = None   # block_outputs placement: override the blocks
    latent_blend: bool = True
    follow_inversion: bool = True            # pin the reconstruction branch to z*_t
    reference: str = "cond"
    placement: str = "pfb_diff"

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise InputError("preset", f"is {self.preset!r}", "object or background")
        if self.reference not in REFERENCES:
            raise InputError("reference", f"is {self.reference!r}", " or ".join(REFERENCES))
        if self.placement not in PLACEMENTS:
            raise InputError("placement", f"is {self.placement!r}", " or ".join(PLACEMENTS))
        if self.blocks is not None and self.placement != "block_outputs":
            raise InputError("blocks", "are given with the pfb_diff placement",
                             "blocks only with placement='block_outputs'",
                             "PFB-Diff's sites follow from the preset.")
        self._blend_mask: MaskPyramid | None = None   # set up per run
        self._run = None
        self.sites: list[Site] = []
        self._cache: dict[str, torch.Tensor] = {}   # site -> conditional reference rows
        self._cache_step: int | None = None
        self._in_reference_pass = False
        self._site_alpha: dict[str, torch.Tensor] = {}   # learned a_l, read once per run

    # -- sampler protocol ---------------------------------------------------------
    def blend_region(self, object_mask: torch.Tensor) -> torch.Tensor:
        """Where the edit's features and latents are kept, from the (B,H,W) binary object
        mask: the object (preset "object"), or what lies outside it dilated by 36 px at
        512 px (preset "background", PFB-Diff's rule)."""
        cfg = PRESETS[self.preset]
        return 1 - dilate(object_mask, cfg["dilate_px"]) if cfg["background"] \
            else object_mask

    def setup(self, run) -> None:
        cfg = PRESETS[self.preset]
        m = self.resolve_mask(run, self.mask, required=True,
                              use="the edited object (PFB keeps everything outside it from "
                                  "the photo)")
        self._blend_mask = MaskPyramid(self.blend_region(m))
        self._run = run
        self._latent_steps = int(round(cfg["latent_fraction"] * run.schedule.num_steps))
        self._active_steps = [float(run.schedule.t(i)) > cfg["min_t"]
                              for i in range(run.schedule.num_steps)]
        # the blend mask at every feature size, on the device before the first step
        z = run.latents[Branch.EDIT]
        self._blend_mask.prepare(architecture_of(run.sd.unet).level_sizes(tuple(z.shape[-2:])),
                                 z.device)
        unet = run.sd.unet
        modules = dict(unet.named_modules())
        if self.placement == "pfb_diff":
            self.sites = pfb_diff_sites(unet, self.preset)
        else:
            arch = architecture_of(unet)
            blocks = tuple(self.blocks or _preset_blocks(arch, self.preset))
            missing = [b for b in blocks if b not in modules]
            if missing:
                raise InputError("blocks", f"names {missing} that this {arch.name} UNet "
                                 "does not have", "block names of this UNet like "
                                 + ", ".join(_preset_blocks(arch, self.preset)))
            self.sites = block_output_sites(unet, blocks)
        self._site_alpha = self._learned_alphas(z.device)
        if run.reference is None:
            raise InputError("controls", "include PFB but the sampler has no reference",
                             "a source image (instruction path) or an inversion")
        # Patched through the run's controller, which removes them when the run ends.
        for site in self.sites:
            if site.hook == "input":
                run.controller.patch_module(modules[site.module], pre=self._pre_hook(site))
            else:
                run.controller.patch_module(modules[site.module], post=self._post_hook(site))

    def teardown(self, run) -> None:
        self._cache.clear()
        self._cache_step = None
        self._run = None
        self._site_alpha = {}

    def before_step(self, run, i: int) -> None:
        if self.follow_inversion and Branch.REC in run.latents:
            run.latents[Branch.REC] = run.reference_at(i)

    def after_step(self, run, i: int) -> None:
        if not self.latent_blend or i >= self._latent_steps:
            return
        z = run.latents[Branch.EDIT]
        m = self._blend_mask.at(tuple(z.shape[-2:]), z.device)[:, None]
        run.latents[Branch.EDIT] = m * z + (1 - m) * run.reference_at(i + 1)

    # -- feature blending ----------------------------------------------------------
    def _learned_alphas(self, device) -> dict[str, torch.Tensor]:
        """A learned a_l per site: checked to cover every site of this run; read once,
        detached and on the device, when no gradient is recorded (the sampler's steps
        then copy nothing from the host), else ({}) read at every call by :meth:`_alpha`."""
        weights = self.alpha
        if not isinstance(weights, torch.nn.Module):
            return {}
        missing = [s.module for s in self.sites if s.module not in weights.sites]
        if missing:
            raise InputError("alpha", f"holds learned weights for the sites "
                             f"{list(weights.sites)}, not for {missing}",
                             f"PFB weights made for preset {self.preset!r} and placement "
                             f"{self.placement!r} on this UNet",
                             "Use the PFB control's preset and placement the weights were "
                             "trained with (trained.json says which).")
        if torch.is_grad_enabled() and any(p.requires_grad for p in weights.parameters()):
            return {}
        with torch.no_grad():
            return {s.module: weights.alpha(s.module).detach().to(device) for s in self.sites}

    def _alpha(self, name: str) -> float | torch.Tensor:
        """a_l of the site ``name``: a number, or a 0-dim tensor for learned weights."""
        if isinstance(self.alpha, torch.nn.Module):
            got = self._site_alpha.get(name)
            return got if got is not None else self.alpha.alpha(name)
        if not isinstance(self.alpha, dict):
            return float(self.alpha)
        keys = [k for k in self.alpha if name == k or name.startswith(k + ".")]
        return float(self.alpha[max(keys, key=len)]) if keys else 1.0

    def _context(self):
        run = self._run
        if run is None or self._in_reference_pass:
            return None
        ctx = run.controller.context
        if ctx is None or not self._active_steps[ctx.step]:
            return None
        if self._cache_step != ctx.step:
            self._cache.clear()
            self._cache_step = ctx.step
        return ctx

    @staticmethod
    def _ref_branch(layout) -> str:
        return Branch.REC if any(b == Branch.REC for b, _ in layout.rows) else Branch.REF

    def _plan(self, layout) -> list[tuple[int, str]]:
        """(edit row, reference half) for every edit row of this call: the conditional
        half for all ("cond", PFB-Diff's rule and our default, see the class docstring
        for why), or the row's own half ("per_half")."""
        return [(i, COND if self.reference == "cond" else h)
                for i, (b, h) in enumerate(layout.rows) if b == Branch.EDIT]

    def _blend(self, h: torch.Tensor, layout, site: Site,
               refs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Blend the edit rows of ``h`` with ``refs[half]`` (bsz rows each).

        The mask is resized bicubically and thresholded at 0.5 (MaskPyramid), where
        PFB-Diff uses the bicubic resize as it is: we keep one mask per resolution for
        CAM, PFB and latent blending, and a bicubic resize of a binary mask over- and
        undershoots [0, 1] at the edge, which would extrapolate beyond both branches."""
        plan = [(e, refs[half]) for e, half in self._plan(layout) if half in refs]
        if not plan:
            return h
        m = self._blend_mask.at(tuple(h.shape[-2:]), h.device)[:, None].to(h.dtype)
        a = self._alpha(site.module)
        out = h.clone()
        bsz = h.shape[0] // len(layout)
        if isinstance(a, torch.Tensor):
            a = a.to(h.device)        # a no-op for weights on the UNet's device
        for e, hr in plan:
            out[e * bsz:(e + 1) * bsz] = blend_features(h[e * bsz:(e + 1) * bsz], hr, m, a)
        return out

    def _references(self, h: torch.Tensor, layout, site: Site, compute=None
                    ) -> dict[str, torch.Tensor]:
        """The reference rows each edit row needs, by half: from this call, or (the
        conditional rule in an unbatched sampler) from this step's conditional call."""
        plan = self._plan(layout)
        if not plan:
            return {}
        bsz = h.shape[0] // len(layout)
        ref_branch = self._ref_branch(layout)
        halves = sorted({half for _, half in plan})
        present = {half: layout.index(ref_branch, half) for half in halves}
        present = {k: v for k, v in present.items() if v is not None}
        refs: dict[str, torch.Tensor] = {}
        if present:
            rows = list(present.values())
            got = compute(rows, bsz) if compute is not None else \
                torch.cat([h[r * bsz:(r + 1) * bsz] for r in rows])
            for k, half in enumerate(present):
                refs[half] = got[k * bsz:(k + 1) * bsz]
        if COND in refs:
            self._cache[site.module] = refs[COND].detach()
        elif self.reference == "cond" and site.module in self._cache:
            refs[COND] = self._cache[site.module]
        return refs

    def _mid_output(self, module, args, kwargs, layout):
        """The reference rows' mid-block output, computed from their own mid input before
        the call's mid block runs (PFB-Diff blends the mid *input* with it). Attention
        hooks are off for this pass: the sampler's hooks never change reference rows; the
        result equals the batched pass's up to SDPA-versus-explicit-softmax rounding."""
        def compute(rows, bsz):
            total = len(layout) * bsz

            def pick(x):        # the rows by slicing: no index tensor from the host
                if not (torch.is_tensor(x) and x.ndim and x.shape[0] == total):
                    return x
                parts = [x[r * bsz:(r + 1) * bsz] for r in rows]
                return parts[0] if len(parts) == 1 else torch.cat(parts)

            ctl = self._run.controller
            saved = ctl.context
            ctl.context, self._in_reference_pass = None, True
            try:
                return module.forward(*[pick(a) for a in args],
                                      **{k: pick(v) for k, v in kwargs.items()})
            finally:
                ctl.context, self._in_reference_pass = saved, False
        return compute

    def _pre_hook(self, site: Site):
        def hook(module, args, kwargs):
            ctx = self._context()
            if ctx is None:
                return None
            layout = ctx.layout
            if args:
                h = args[0]
            else:
                key = next(iter(kwargs))
                h = kwargs[key]
            compute = self._mid_output(module, args, kwargs, layout) \
                if site.ref == "mid_output" else None
            refs = self._references(h, layout, site, compute)
            new = self._blend(h, layout, site, refs)
            if new is h:
                return None
            if args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, key: new}
        return hook

    def _post_hook(self, site: Site):
        def hook(module, inputs, output):
            ctx = self._context()
            if ctx is None:
                return None
            layout = ctx.layout
            if site.hook == "block_output" and isinstance(output, tuple):  # down blocks
                hidden, res = output
                return (self._blend(hidden, layout, site,
                                    self._references(hidden, layout, site)),
                        tuple(self._blend(r, layout, site,
                                          self._references(r, layout,
                                                           Site(f"{site.module}#{k}", site.hook,
                                                                site.level)))
                              for k, r in enumerate(res)))
            if isinstance(output, tuple):          # transformer blocks: (hidden,)
                h = output[0]
                return (self._blend(h, layout, site, self._references(h, layout, site)),
                        *output[1:])
            return self._blend(output, layout, site, self._references(output, layout, site))
        return hook
