"""Masks from attention (docs/algorithms.md section 11).

The object word's cross-attention, aggregated over the layers the UNet's architecture
reads maps at (``LayerChoices.map_level``: 1/4 of the latent resolution in the down and
up blocks; 16x16 at 512 px: down_blocks.2 x2 and up_blocks.1 x3 in SD 1.x and 2.x;
32x32 at 1024 px in SDXL: the 10-deep down_blocks.2 and up_blocks.0), their heads,
a few noise levels and the word's tokens, normalised to 0..1 and upsampled to the
image: a soft map of where the model "puts" the word. Thresholded it is a mask; its
bounding box can prompt SAM for a sharper one.

How the map is made (one batched UNet call, no sampling):
  1. z_0 = VAE posterior x 0.18215 of the image;
  2. z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps, one seeded eps per timestep
     (forward diffusion q(z_t | z_0), abar from the model's scheduler);
  3. one UNet call on the batch [z_t1, z_t2, ...] with per-row timesteps and the
     prompt's conditional embedding (no guidance: only the maps are used);
  4. capture the cross-attention probabilities of those layers (read-only:
     the UNet output is unchanged) and average.

Default timesteps (501, 601, 701) of 1000: mid-schedule noise levels, points of the
50-step DDIM grid (981, 961, ..., 1). At low noise the maps follow image texture
rather than the word; at high noise the image is mostly gone and the maps blur. Mid
levels give the object layout the word attends to (as in prompt-to-prompt's map
visualisations and attention-based segmenters).

Only text-to-image (4-channel) UNets: an instruction UNet is conditioned on the image
latent too and its cross-attention does not follow an object word of a caption.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from . import attention, attention_hooks, host, vae
from .architecture import architecture_of
from .diffusion import encode_prompt, split_condition
from .errors import InputError
from .images import check_image, check_mask
from .models.sd import SDModel
from .plan import CONNECT_PLAN, from_plan
from .tokens import word_token_groups

log = logging.getLogger(__name__)

DEFAULT_TIMESTEPS = (501, 601, 701)
MAP_FACTOR = 4   # the maps' latent / 4 (16x16 for 64x64 latents, i.e. 512 px images)


# --- which layers -------------------------------------------------------------------

def map_layers(unet, factor: int | None = None) -> list[str]:
    """Names of the cross-attention layers the maps are read at, in execution order:
    the architecture's choice (SD 1.x: the five down_blocks.2 / up_blocks.1 attn2
    layers), or every cross-attention layer at ``factor`` when one is given."""
    arch = architecture_of(unet)
    if factor is None:
        return arch.map_layers(unet)
    return [l.name for l in attention.attention_layers(unet)
            if l.is_cross and arch.factor(l.name) == factor]


# --- checks -------------------------------------------------------------------------

def _check_text_to_image(sd: SDModel) -> None:
    if sd.instruct:
        raise InputError("sd_model", "is an instruction UNet (8 input channels, "
                         "InstructPix2Pix/MGIE)", "a text-to-image model "
                         "(4-channel UNet)", "Attention masks read where a caption's word "
                         "attends; load the base SD 1.5 model (e.g. with xMGIE Load SD) for "
                         "the mask and keep the instruction model for the edit.")


def word_tokens(sd: SDModel, prompt: str, word: str) -> list[int]:
    """Token positions (77-token CLIP sequence) of every occurrence of ``word``."""
    if not isinstance(word, str) or not word.strip():
        raise InputError("word", f"is {word!r}", "the object's word as it appears in the "
                         "prompt, e.g. 'cat' in 'a photo of a cat'")
    try:
        return word_token_groups(sd.tokenizer, prompt, [word])[0]
    except InputError as e:
        if "does not occur" not in str(e):
            raise
        raise InputError("word", f"{word!r} does not occur in the prompt {prompt!r}",
                         "a word of the prompt (the object to mask)",
                         f"Type the object word exactly as in the prompt, or add {word!r} "
                         "to the prompt.") from e


def _check_timesteps(sd: SDModel, timesteps: Sequence[int]) -> list[int]:
    n = len(sd.scheduler.alphas_cumprod)
    ts = list(timesteps) if isinstance(timesteps, (list, tuple)) else [timesteps]
    if not ts or any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < n
                     for t in ts):
        raise InputError("timesteps", f"are {timesteps!r}",
                         f"one or more integer timesteps between 0 and {n - 1}",
                         f"The default {DEFAULT_TIMESTEPS} works for SD 1.x.")
    return [int(t) for t in ts]


# --- the map ------------------------------------------------------------------------

def noised_latents(sd: SDModel, z0: torch.Tensor, timesteps: Sequence[int], seed: int
                   ) -> torch.Tensor:
    """[T,4,h,w]: z0 ([1,4,h,w]) noised to each timestep, q(z_t|z_0) (DDPM eq. 4)."""
    abar = sd.scheduler.alphas_cumprod.double().cpu()[list(timesteps)]
    g = torch.Generator().manual_seed(int(seed))
    noise = torch.randn((len(timesteps),) + tuple(z0.shape[1:]), generator=g)
    a = abar.sqrt().float().view(-1, 1, 1, 1)
    s = (1 - abar).sqrt().float().view(-1, 1, 1, 1)
    return a * z0.float().cpu() + s * noise


def capture_maps(sd: SDModel, z_t: torch.Tensor, timesteps: Sequence[int],
                 emb: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
    """One UNet call on ``z_t`` (row i at timesteps[i]) with ``emb``; returns the
    cross-attention probabilities (T, heads, HW, 77) of ``layers``."""
    controller = attention.install(sd.unet)
    hook = attention_hooks.CaptureHook(layers)
    layout = attention.BatchLayout(tuple((f"t{t}", attention.COND) for t in timesteps))
    ctx = attention.AttnContext(step=0, num_steps=1, layout=layout,
                                latent_hw=tuple(z_t.shape[-2:]))
    saved_hooks, saved_ctx = controller.hooks, controller.context
    controller.hooks = [hook]
    controller.reset_call(ctx)
    try:
        tt = torch.tensor([int(t) for t in timesteps], device=sd.device, dtype=torch.long)
        with torch.no_grad():   # the maps only: no conversion of the output to epsilon
            tokens, added = split_condition(
                sd, emb.expand(len(timesteps), -1, -1).to(sd.device, sd.dtype),
                tuple(z_t.shape[-2:]))
            sd.unet(z_t.to(sd.device, sd.dtype), tt, encoder_hidden_states=tokens,
                    added_cond_kwargs=added, return_dict=False)
    finally:
        controller.hooks = saved_hooks
        controller.reset_call(saved_ctx)
    return hook.maps


def aggregate_maps(maps: dict[str, torch.Tensor], tokens: Sequence[int],
                   layer_hw: tuple[int, int]) -> torch.Tensor:
    """Mean over layers, rows (timesteps), heads and the word's tokens of captured
    probabilities -> [h, w] float32, normalised to 0..1 (min-max)."""
    h, w = layer_hw
    per_layer = []
    for name, probs in maps.items():
        if probs.shape[2] != h * w:
            raise RuntimeError(f"layer {name} has {probs.shape[2]} queries, expected "
                               f"{h}x{w}")
        per_layer.append(probs[..., list(tokens)].float().mean(dim=(0, 1, 3)))   # (HW,)
    m = torch.stack(per_layer).mean(0).view(h, w)
    lo, hi = m.min(), m.max()
    return ((m - lo) / (hi - lo).clamp_min(1e-12)).cpu()


def upsample_map(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic to ``size`` (H, W), clamped to 0..1 (bicubic overshoots)."""
    return F.interpolate(m[None, None].float(), size=size, mode="bicubic",
                         align_corners=False)[0, 0].clamp(0, 1)


def attention_map(sd: SDModel, image: torch.Tensor, prompt: str, word: str,
                  timesteps: Sequence[int] = DEFAULT_TIMESTEPS, seed: int = 0
                  ) -> torch.Tensor:
    """Soft map [H,W] in 0..1 of where ``word`` of ``prompt`` attends in ``image``
    ([1,H,W,3] or [H,W,3]) of any size; see the module docstring for the method. A photo
    whose sides are not multiples of the VAE's factor (8 px) is reflect-padded to them
    and its map cut back to the photo (never cropped: the map must cover the whole
    photo). Reading maps needs no more: the UNet pass only records them, so the exact
    halves the injecting controls need (:func:`vae.size_multiple`) do not apply."""
    _check_text_to_image(sd)
    image = check_image("image", image, multiple_of=1)
    if image.shape[0] != 1:
        raise InputError("image", f"is a batch of {image.shape[0]} images", "one image "
                         "[1,H,W,3]", "Call it once per image.")
    tokens = word_tokens(sd, prompt, word)
    ts = _check_timesteps(sd, timesteps)
    host.check_interrupt()

    lat = vae.encode_photo(sd, image, "pad", multiple=sd.vae_scale)
    z0, fit = lat.samples, lat.fit                           # [1,4,h,w]
    z_t = noised_latents(sd, z0, ts, seed)
    layers = map_layers(sd.unet)
    maps = capture_maps(sd, z_t, ts, encode_prompt(sd, prompt), layers)
    m = aggregate_maps(maps, tokens, architecture_of(sd.unet).map_size(tuple(z0.shape[-2:])))
    return fit.undo_mask(upsample_map(m, fit.fitted)[None])[0]


def attention_mask(sd: SDModel, image: torch.Tensor, prompt: str, word: str,
                   threshold: float = 0.5, timesteps: Sequence[int] = DEFAULT_TIMESTEPS,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [H,W] in {0,1}: map > threshold, map [H,W] in 0..1)."""
    threshold = _check_threshold(threshold)
    m = attention_map(sd, image, prompt, word, timesteps=timesteps, seed=seed)
    return (m > threshold).float(), m


def prompt_and_word(prompt: str, word: str, plan=None) -> tuple[str, str]:
    """The caption and the object word an attention mask uses, by ``plan.PLAN_RULE``:
    typed ones win; an empty word takes the plan's object, an empty prompt the plan's
    caption that contains the word (``EditPlan.object_prompt``: the source prompt, with
    the word added when it does not occur in it). Neither: an error naming both."""
    word = from_plan("word", word, plan, "object", "the object's word, e.g. 'cat'")
    if (prompt or "").strip():
        return prompt, word
    if plan is not None:
        return plan.object_prompt(word), word
    raise InputError("prompt", "is empty and no plan is connected", "a caption of the image "
                     "that contains the word, e.g. 'a photo of a cat on a sofa'",
                     f"{CONNECT_PLAN}, or type the prompt.")


def _check_threshold(threshold: float) -> float:
    if not isinstance(threshold, (int, float)) or not 0 <= float(threshold) < 1:
        raise InputError("threshold", f"is {threshold!r}", "a number with 0 <= threshold < 1",
                         "0.5 keeps the pixels above half the map's peak.")
    return float(threshold)


# --- boxes and SAM ------------------------------------------------------------------

def mask_bbox(mask: torch.Tensor) -> tuple[int, int, int, int]:
    """Bounding box (x0, y0, x1, y1) in pixels of the pixels > 0.5 of ``mask`` ([H,W] or
    [1,H,W]); x1, y1 are exclusive (x1 - x0 is the width), SAM's XYXY convention for a box
    around whole pixels."""
    m = check_mask("mask", mask, allow_empty=True)
    if m.shape[0] != 1:
        raise InputError("mask", f"is a batch of {m.shape[0]} masks", "one mask [H,W]")
    ys, xs = torch.nonzero(m[0] > 0.5, as_tuple=True)
    if ys.numel() == 0:
        raise InputError("mask", "is empty (no pixel above 0.5), so it has no bounding box",
                         "a mask with at least one pixel set",
                         "Lower the threshold, or check the word: its attention may be "
                         "flat in this image.")
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def attention_mask_sam(sd: SDModel, sam_model, image: torch.Tensor, prompt: str, word: str,
                       threshold: float = 0.5, timesteps: Sequence[int] = DEFAULT_TIMESTEPS,
                       seed: int = 0, attn: tuple[torch.Tensor, torch.Tensor] | None = None
                       ) -> torch.Tensor:
    """Attention mask refined by SAM: the bounding box of the thresholded attention map
    prompts SAM (one box, single-mask output as SAM recommends for a box). Returns a
    mask [H,W] in {0,1}. ``attn`` = a precomputed (mask, map) of this image skips the
    attention pass."""
    from .models import sam as sam_lib

    image = check_image("image", image)
    if attn is None:
        attn = attention_mask(sd, image, prompt, word, threshold, timesteps, seed)
    box = mask_bbox(attn[0])
    mask, _ = sam_lib.segment(sam_model, image[0], box=box, multimask=False)
    return (mask > 0.5).float()


def coarsest_cells(mask: torch.Tensor, factor: int = 8 * MAP_FACTOR) -> int:
    """How many cells of ``mask`` ([H,W] or [1,H,W]) remain at 1/``factor`` of its size
    (bicubic resize, threshold 0.5, as every stage resizes masks): at the default 1/32,
    the attention maps CAM and MAG read (16x16 at 512 px). 0 means the region cannot
    steer an edit."""
    from .attention import MaskPyramid

    m = mask if mask.ndim == 3 else mask[None]
    hw = (max(1, round(m.shape[-2] / factor)), max(1, round(m.shape[-1] / factor)))
    return int(MaskPyramid(m.float()).at(hw, "cpu").sum())


def object_mask(sd: SDModel, image: torch.Tensor, prompt: str, word: str,
                threshold: float = 0.5, seed: int = 0, sam_model=None
                ) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(mask [H,W], attention map [H,W], how) of ``word``'s object in ``image``.

    With a SAM model: SAM's mask for the attention mask's box, unless it does not hold
    together at the attention resolution (no cell left at 1/32, see
    :func:`coarsest_cells`: speckle, a sliver), where no stage could use it; then the
    attention mask, with a warning. Without SAM: the attention mask. ``how`` says which."""
    mask, amap = attention_mask(sd, image, prompt, word, threshold, seed=seed)
    if sam_model is None:
        return mask, amap, "attention"
    refined = attention_mask_sam(sd, sam_model, image, prompt, word, threshold, seed=seed,
                                 attn=(mask, amap))
    if coarsest_cells(refined) == 0 < coarsest_cells(mask):
        log.warning("SAM's mask of %r does not hold together at 1/%d of the image (where "
                    "CAM and MAG read attention): the attention mask is used instead",
                    word, 8 * MAP_FACTOR)
        return mask, amap, "attention (SAM's mask fell apart)"
    return refined, amap, "SAM"


# --- preview ------------------------------------------------------------------------

def heat_map(m: torch.Tensor, image: torch.Tensor | None = None, alpha: float = 0.6
             ) -> torch.Tensor:
    """[H,W,3] preview of a map in 0..1: a blue-green-red ramp, blended over ``image``
    ([H,W,3] or [1,H,W,3]) when given."""
    m = m.float().clamp(0, 1).cpu()
    color = torch.stack([(2 * m - 1).clamp(0, 1),             # red rises in the top half
                         1 - (2 * m - 1).abs(),                # green peaks in the middle
                         (1 - 2 * m).clamp(0, 1)], dim=-1)     # blue fades in the bottom half
    if image is None:
        return color
    img = image.float().cpu().reshape(m.shape + (3,))
    return (alpha * color + (1 - alpha) * img).clamp(0, 1)


__all__ = ["DEFAULT_TIMESTEPS", "MAP_FACTOR", "attention_map", "attention_mask", "prompt_and_word",
           "object_mask", "coarsest_cells",
           "attention_mask_sam", "mask_bbox", "map_layers", "heat_map",
           "aggregate_maps", "capture_maps", "noised_latents", "word_tokens"]
