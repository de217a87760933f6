"""PFB: progressive feature blending (PFB-Diff; ALGORITHMS.md section 5).

A sampling control. At the chosen UNet blocks, the edit branch's output features are
blended with the reference branch's features of the same guidance half, in the same
batched call:

    h = m * (a_l * h_edit + (1 - a_l) * h_ref) + (1 - m) * h_ref

with m the (binary) mask resized to the block's output; a_l = 1 is the official code.
The reference is the reconstruction branch pinned to the stored inverted latent z*_t
(text-to-image path) or the noised source latent (instruction path), so no extra UNet
pass is needed. Latent blending z = m z + (1 - m) z_ref follows each early step.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .attention import Branch, MaskPyramid
from .control import Control
from .errors import InputError

PRESETS = {
    # blocks working at 16x16 and 8x8 (512 px), every step; latent blending 24/50 steps
    "object": dict(blocks=("down_blocks.2", "mid_block", "up_blocks.0", "up_blocks.1"),
                   min_t=-1, latent_fraction=24 / 50, dilate_px=0, background=False),
    # blocks from 32x32 down to 8x8, while t > 200 (40/50 steps); latent blending 9/50;
    # mask = 1 - dilate(object mask, 36 px at 512 px)
    "background": dict(blocks=("down_blocks.1", "down_blocks.2", "down_blocks.3", "mid_block",
                               "up_blocks.0", "up_blocks.1", "up_blocks.2"),
                       min_t=200, latent_fraction=9 / 50, dilate_px=36, background=True),
}


def dilate(mask: torch.Tensor, px_at_512: float) -> torch.Tensor:
    """Max-pool dilation of a [B,H,W] mask by a radius given in pixels at 512 px."""
    r = int(round(px_at_512 * mask.shape[-1] / 512))
    if r <= 0:
        return mask
    return F.max_pool2d(mask[:, None], 2 * r + 1, stride=1, padding=r)[:, 0]


@dataclasses.dataclass
class PFBControl(Control):
    name = "PFB"

    mask: torch.Tensor                       # [B,H,W] object mask (white = edited object)
    preset: str = "object"
    alpha: float | dict = 1.0                # per-block a_l, or one value for all
    blocks: Optional[Sequence[str]] = None   # override the preset's blocks
    latent_blend: bool = True
    follow_inversion: bool = True            # pin the reconstruction branch to z*_t

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise InputError("preset", f"is {self.preset!r}", "object or background")
        cfg = PRESETS[self.preset]
        m = self.mask if self.mask.ndim == 3 else self.mask[None]
        m = (m.float() > 0.5).float()
        if cfg["background"]:
            m = 1 - dilate(m, cfg["dilate_px"])
        self._blend_mask = MaskPyramid(m)
        self._blocks = tuple(self.blocks or cfg["blocks"])
        self._handles: list = []
        self._run = None

    # -- sampler protocol ---------------------------------------------------------
    def setup(self, run) -> None:
        self._run = run
        self._latent_steps = int(round(PRESETS[self.preset]["latent_fraction"]
                                       * run.schedule.num_steps))
        modules = dict(run.sd.unet.named_modules())
        missing = [b for b in self._blocks if b not in modules]
        if missing:
            raise InputError("blocks", f"names {missing} that this UNet does not have",
                             "SD 1.x block names like down_blocks.2, mid_block, up_blocks.1")
        if run.reference is None:
            raise InputError("controls", "include PFB but the sampler has no reference",
                             "a source image (instruction path) or an inversion")
        for name in self._blocks:
            self._handles.append(modules[name].register_forward_hook(self._hook(name)))

    def teardown(self, run) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._run = None

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
    def _active(self, run) -> bool:
        t = int(run.schedule.timesteps[run.step])
        return t > PRESETS[self.preset]["min_t"]

    def _alpha(self, name: str) -> float:
        return float(self.alpha.get(name, 1.0)) if isinstance(self.alpha, dict) else float(self.alpha)

    def blend(self, h: torch.Tensor, layout, name: str) -> torch.Tensor:
        ref_branch = Branch.REC if any(b == Branch.REC for b, _ in layout.rows) else Branch.REF
        pairs = []
        for half in {hh for _, hh in layout.rows}:
            e, r = layout.index(Branch.EDIT, half), layout.index(ref_branch, half)
            if e is not None and r is not None:
                pairs.append((e, r))
        if not pairs:
            return h
        m = self._blend_mask.at(tuple(h.shape[-2:]), h.device)[:, None].to(h.dtype)
        a = self._alpha(name)
        out = h.clone()
        bsz = h.shape[0] // len(layout)
        for e, r in pairs:
            he, hr = h[e * bsz:(e + 1) * bsz], h[r * bsz:(r + 1) * bsz]
            inner = he if a == 1.0 else a * he + (1 - a) * hr
            out[e * bsz:(e + 1) * bsz] = m * inner + (1 - m) * hr
        return out

    def _hook(self, name: str):
        def hook(module, inputs, output):
            run = self._run
            if run is None or run.controller.context is None or not self._active(run):
                return None
            layout = run.controller.context.layout
            if isinstance(output, tuple):      # down blocks: (hidden, residuals)
                hidden, res = output
                return (self.blend(hidden, layout, name),
                        tuple(self.blend(r, layout, name) for r in res))
            return self.blend(output, layout, name)
        return hook
