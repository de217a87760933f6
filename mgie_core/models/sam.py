"""Segment Anything: load any SAM checkpoint and segment an image from point/box prompts.

The architecture is read from the state dict itself (widths, depth, heads, which encoder
blocks attend globally, window and image size, decoder sizes), so the official
sam_vit_h/l/b files and the tiny test model load through the same code path. With
multimask output the mask with the highest predicted IoU is kept (docs/algorithms.md section 11).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch
from torch import nn

from .. import grad_mode, host, memory, paths
from ..errors import InputError, ModelLoadError
from ..images import check_pixels
from .validate import load_state_dict_checked, read_weights_file

WHAT = "Segment Anything checkpoint"

# Official encoders, by (embed_dim, depth): the name users know them by.
_OFFICIAL = {(1280, 32): "vit_h", (1024, 24): "vit_l", (768, 12): "vit_b"}

# The decoder transformer's head count is not visible in the weights (heads only split the
# q/k/v projections); every published SAM uses 8, as segment_anything's build_sam does.
DECODER_HEADS = 8


@dataclasses.dataclass
class SamModel:
    """A loaded SAM (segment_anything.modeling.Sam) and where it came from."""

    sam: nn.Module
    model_type: str  # "vit_h", "vit_l", "vit_b" or "custom"
    path: Path

    @property
    def device(self) -> torch.device:
        return next(self.sam.parameters()).device


@dataclasses.dataclass(frozen=True)
class SamArch:
    """Everything needed to build a Sam with segment_anything's classes."""

    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    out_chans: int
    qkv_bias: bool
    use_abs_pos: bool
    use_rel_pos: bool
    window_size: int
    global_attn_indexes: tuple[int, ...]
    prompt_embed_dim: int
    mask_in_chans: int
    num_multimask_outputs: int
    decoder_depth: int
    decoder_mlp_dim: int
    decoder_heads: int
    attention_downsample_rate: int
    iou_head_depth: int
    iou_head_hidden_dim: int

    @property
    def model_type(self) -> str:
        return _OFFICIAL.get((self.embed_dim, self.depth), "custom")


def _shape(sd: dict, key: str, path: Path) -> tuple[int, ...]:
    if key not in sd:
        raise ModelLoadError(WHAT, path, f"the weight '{key}' is missing, so the architecture "
                             "cannot be read from the file",
                             "Check that the file is a Segment Anything checkpoint "
                             "(e.g. sam_vit_b_01ec64.pth).")
    return tuple(sd[key].shape)


def _count(sd: dict, prefix: str) -> int:
    """Number of consecutive numbered children ``prefix.<i>.`` in the state dict."""
    pat = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    idx = {int(m.group(1)) for k in sd for m in [pat.match(k)] if m}
    n = 0
    while n in idx:
        n += 1
    return n


def infer_arch(sd: dict, path: Path | str = "<state dict>") -> SamArch:
    """Read a SAM architecture from its state dict (official key names)."""
    path = Path(path)
    enc = "image_encoder."
    embed_dim, _, patch, patch_w = _shape(sd, enc + "patch_embed.proj.weight", path)
    if patch != patch_w:
        raise ModelLoadError(WHAT, path, f"non-square patches ({patch}x{patch_w})")
    use_abs_pos = enc + "pos_embed" in sd
    depth = _count(sd, enc + "blocks")
    if depth == 0:
        raise ModelLoadError(WHAT, path, "no image-encoder blocks (image_encoder.blocks.*)",
                             "Check that the file is a Segment Anything checkpoint.")
    if use_abs_pos:
        _, grid_h, grid_w, _ = _shape(sd, enc + "pos_embed", path)
        if grid_h != grid_w:
            raise ModelLoadError(WHAT, path, f"non-square position grid {grid_h}x{grid_w}")
        grid = grid_h
    else:
        grid = None
    use_rel_pos = enc + "blocks.0.attn.rel_pos_h" in sd
    mlp_hidden = _shape(sd, enc + "blocks.0.mlp.lin1.weight", path)[0]
    qkv_bias = enc + "blocks.0.attn.qkv.bias" in sd

    window_size, global_idx, num_heads = 0, [], None
    if use_rel_pos:
        sizes = []
        for i in range(depth):
            n_rel, head_dim = _shape(sd, f"{enc}blocks.{i}.attn.rel_pos_h", path)
            sizes.append((n_rel + 1) // 2)  # rel_pos has 2*size-1 rows
            num_heads = embed_dim // head_dim
        if grid is None:
            grid = max(sizes)  # the global blocks span the whole grid
        global_idx = [i for i, s in enumerate(sizes) if s == grid]
        windowed = sorted({s for s in sizes if s != grid})
        if len(windowed) > 1:
            raise ModelLoadError(WHAT, path, f"encoder blocks use several window sizes "
                                 f"{windowed}; SAM uses one")
        window_size = windowed[0] if windowed else 0
    if num_heads is None:
        # Without relative positions the head count cannot be read; the official ViTs
        # use 64-wide heads.
        num_heads = max(1, embed_dim // 64)
    if grid is None:
        raise ModelLoadError(WHAT, path, "neither pos_embed nor rel_pos weights: the image "
                             "size cannot be read")

    out_chans = _shape(sd, enc + "neck.0.weight", path)[0]
    pe = "prompt_encoder."
    prompt_dim = _shape(sd, pe + "no_mask_embed.weight", path)[1]
    mask_in_chans = _shape(sd, pe + "mask_downscaling.3.weight", path)[0]
    md = "mask_decoder."
    num_mask_tokens = _shape(sd, md + "mask_tokens.weight", path)[0]
    dec_depth = _count(sd, md + "transformer.layers")
    dec_mlp = _shape(sd, md + "transformer.layers.0.mlp.lin1.weight", path)[0]
    internal = _shape(sd, md + "transformer.final_attn_token_to_image.q_proj.weight", path)[0]
    iou_depth = _count(sd, md + "iou_prediction_head.layers")
    iou_hidden = _shape(sd, md + "iou_prediction_head.layers.0.weight", path)[0]
    heads = DECODER_HEADS
    while heads > 1 and internal % heads:
        heads //= 2
    return SamArch(
        img_size=grid * patch, patch_size=patch, embed_dim=embed_dim, depth=depth,
        num_heads=num_heads, mlp_ratio=mlp_hidden / embed_dim, out_chans=out_chans,
        qkv_bias=qkv_bias, use_abs_pos=use_abs_pos, use_rel_pos=use_rel_pos,
        window_size=window_size, global_attn_indexes=tuple(global_idx),
        prompt_embed_dim=prompt_dim, mask_in_chans=mask_in_chans,
        num_multimask_outputs=num_mask_tokens - 1, decoder_depth=dec_depth,
        decoder_mlp_dim=dec_mlp, decoder_heads=heads,
        attention_downsample_rate=max(1, prompt_dim // internal),
        iou_head_depth=iou_depth, iou_head_hidden_dim=iou_hidden)


def build_sam(arch: SamArch) -> nn.Module:
    """An untrained Sam of the given architecture, built like segment_anything's build_sam."""
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    grid = arch.img_size // arch.patch_size
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=arch.img_size, patch_size=arch.patch_size, embed_dim=arch.embed_dim,
            depth=arch.depth, num_heads=arch.num_heads, mlp_ratio=arch.mlp_ratio,
            out_chans=arch.out_chans, qkv_bias=arch.qkv_bias,
            norm_layer=partial(nn.LayerNorm, eps=1e-6), use_abs_pos=arch.use_abs_pos,
            use_rel_pos=arch.use_rel_pos, window_size=arch.window_size,
            global_attn_indexes=arch.global_attn_indexes),
        prompt_encoder=PromptEncoder(
            embed_dim=arch.prompt_embed_dim, image_embedding_size=(grid, grid),
            input_image_size=(arch.img_size, arch.img_size),
            mask_in_chans=arch.mask_in_chans),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=arch.num_multimask_outputs,
            transformer=TwoWayTransformer(
                depth=arch.decoder_depth, embedding_dim=arch.prompt_embed_dim,
                mlp_dim=arch.decoder_mlp_dim, num_heads=arch.decoder_heads,
                attention_downsample_rate=arch.attention_downsample_rate),
            transformer_dim=arch.prompt_embed_dim, iou_head_depth=arch.iou_head_depth,
            iou_head_hidden_dim=arch.iou_head_hidden_dim),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors (``torch.load(weights_only=True)``; a ``model`` or
    ``state_dict`` wrapper is unwrapped); every failure names the file."""
    return read_weights_file(path, WHAT, wrappers=("model", "state_dict"),
                             unwrap_unless="image_encoder.")


@grad_mode.builds_weights
def load_sam(name: str, device: torch.device | str | None = None) -> SamModel:
    """Find SAM checkpoint ``name`` (file name or path), build its architecture and load it
    (every weight checked: missing, unexpected and reshaped ones are named)."""
    path = paths.resolve(paths.SAM, name)
    sd = read_state_dict(path)
    arch = infer_arch(sd, path)
    sam = build_sam(arch)
    load_state_dict_checked(sam, sd, f"{WHAT} ({arch.model_type})", path)
    sam.eval().requires_grad_(False)
    model = SamModel(sam=sam, model_type=arch.model_type, path=path)
    return memory.manage(model, {f"SAM {path.name}": sam}, device)


# --- segmentation -------------------------------------------------------------------

def _check_xy(name: str, xy: Sequence[float], w: int, h: int) -> None:
    # Pixel coordinates from the top-left corner; w and h themselves are allowed so that a
    # box may end on the image's edge (0, 0, w, h).
    x, y = float(xy[0]), float(xy[1])
    if not (0 <= x <= w and 0 <= y <= h):
        raise InputError(name, f"({x:g}, {y:g}) lies outside the {w}x{h} image",
                         f"pixel coordinates with 0 <= x <= {w} and 0 <= y <= {h}",
                         "Coordinates are (x, y) in pixels from the top-left corner; "
                         "percentages of the image size ('50%,80%') fit any size.")


def _check_prompts(points, labels, box, w: int, h: int):
    pts = [tuple(p) for p in points] if points else []
    if not pts and box is None:
        raise InputError("prompt", "no point and no box was given",
                         "at least one point (x, y) or a box (x0, y0, x1, y1)",
                         "Click a point on the object or draw a box around it.")
    for p in pts:
        if len(p) != 2:
            raise InputError("points", f"{p!r} is not an (x, y) pair", "(x, y) pixel pairs")
        _check_xy("points", p, w, h)
    if labels is None:
        labels = [1] * len(pts)
    labels = [int(v) for v in labels]
    if len(labels) != len(pts):
        raise InputError("labels", f"{len(labels)} labels for {len(pts)} points",
                         "one label per point (1 positive, 0 negative)")
    if any(v not in (0, 1) for v in labels):
        raise InputError("labels", f"labels {labels}", "1 (positive) or 0 (negative)")
    if box is not None:
        box = [float(v) for v in box]
        if len(box) != 4:
            raise InputError("box", f"{len(box)} numbers", "four numbers x0, y0, x1, y1")
        _check_xy("box", box[:2], w, h)
        _check_xy("box", box[2:], w, h)
        if box[2] <= box[0] or box[3] <= box[1]:
            raise InputError("box", f"({', '.join(f'{v:g}' for v in box)}) is empty",
                             "x0 < x1 and y0 < y1", "Give the top-left corner first.")
    return pts, labels, box


@torch.no_grad()
def segment(model: SamModel, image: torch.Tensor, points=None, labels=None, box=None,
            multimask: bool = True) -> tuple[torch.Tensor, float]:
    """Segment ``image`` ([H,W,3] float 0..1) from point and/or box prompts.

    ``points`` are (x, y) pixels, ``labels`` 1 (positive) / 0 (negative) per point
    (all positive when omitted), ``box`` is (x0, y0, x1, y1). Returns a float 0/1 mask
    [H,W] on the CPU at the image's size and SAM's predicted IoU for it."""
    import numpy as np
    from segment_anything import SamPredictor

    if image.ndim != 3 or image.shape[-1] != 3:
        raise InputError("image", f"shape {tuple(image.shape)}", "one image [H,W,3]")
    check_pixels("image", image)
    h, w = int(image.shape[0]), int(image.shape[1])
    pts, labels, box = _check_prompts(points, labels, box, w, h)
    host.check_interrupt()
    pixels = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    predictor = SamPredictor(model.sam)
    predictor.set_image(pixels, image_format="RGB")
    masks, scores, _ = predictor.predict(
        point_coords=np.asarray(pts, dtype=np.float32) if pts else None,
        point_labels=np.asarray(labels, dtype=np.int64) if pts else None,
        box=np.asarray(box, dtype=np.float32) if box is not None else None,
        multimask_output=multimask)
    best = int(np.argmax(scores))
    mask = torch.from_numpy(masks[best].astype(np.float32))
    return mask, float(scores[best])


# --- prompt text ("x,y; x,y"), as typed in a node -----------------------------------
# A coordinate is in pixels ("256") or a percentage of the image's width (x) or height
# (y) ("50%"): percentages keep a saved prompt on the object whatever size the photo is
# loaded at (a smaller photo, --tiny's 128 px); plain numbers stay pixels, as before.

def _numbers(text: str, name: str, group: str,
             size: tuple[int, int] | None = None) -> list[float]:
    """The numbers of ``group``; "p%" is p percent of the width (even positions, x) or
    the height (odd positions, y) of ``size`` = (width, height)."""
    out = []
    for v in (t.strip() for t in group.replace(" ", ",").split(",")):
        if not v:
            continue
        percent = v.endswith("%")
        try:
            value = float(v[:-1] if percent else v)
        except ValueError:
            raise InputError(name, f"{group.strip()!r} in {text!r} is not a list of numbers",
                             "numbers separated by commas, in pixels or with % of the "
                             "image size (e.g. '50%,80%')") from None
        if percent:
            if size is None:
                raise InputError(name, f"{v!r} is a percentage but no image size is known",
                                 "pixel coordinates here")
            value = value / 100.0 * float(size[len(out) % 2])
        out.append(value)
    return out


def parse_points(text: str, name: str = "points",
                 size: tuple[int, int] | None = None) -> list[tuple[float, float]]:
    """``"x,y; x,y"`` -> [(x, y), ...] in pixels; an empty string gives no points. With
    ``size`` = (width, height), "x%,y%" are percentages of it."""
    points = []
    for group in (text or "").replace("\n", ";").split(";"):
        if not group.strip():
            continue
        xy = _numbers(text, name, group, size)
        if len(xy) != 2:
            raise InputError(name, f"{group.strip()!r} has {len(xy)} numbers",
                             "pairs 'x,y' separated by ';' (e.g. '120,80; 200,150' or "
                             "'50%,80%')")
        points.append((xy[0], xy[1]))
    return points


def parse_box(text: str, name: str = "box", size: tuple[int, int] | None = None
              ) -> tuple[float, float, float, float] | None:
    """``"x0,y0,x1,y1"`` -> the box in pixels; an empty string gives None. With ``size``
    = (width, height), percentages as in :func:`parse_points`."""
    if not (text or "").strip():
        return None
    v = _numbers(text, name, text, size)
    if len(v) != 4:
        raise InputError(name, f"{text.strip()!r} has {len(v)} numbers",
                         "four numbers 'x0,y0,x1,y1' (top-left and bottom-right corners)")
    return v[0], v[1], v[2], v[3]
