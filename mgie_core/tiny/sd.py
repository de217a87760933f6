"""Tiny SD 1.x family: same block structure as SD 1.5 (three cross-attention down blocks,
a plain fourth, mirrored up blocks), so attention layer names match the real model;
widths are tiny. 128 px images give 16x16 latents.

ComfyUI's core Load Checkpoint tells an SD 1.5 checkpoint by its UNet's first width
(model_channels 320) and its cross-attention width (context_dim 768), read from the
tensors, and takes nothing narrower; it then builds SD 1.5's VAE and CLIP-L text encoder
at their full sizes whatever the file holds. ``make_comfy_sd15_checkpoint`` writes the
random-weight checkpoint a real ComfyUI loads: the UNet as small as that detection
allows (320 channels at every level, one res block and one transformer block per level,
SD's 8 heads and 32 norm groups), SD 1.5's own VAE and CLIP-L configs, fp16 (about
560 MB). The tiny models the tests and ``--tiny`` use stay narrow: at 320 channels a
UNet call is about nine times slower. To write it (a ``.config/`` folder, with the
tiny tokenizer for the pack's own loaders, is written beside it)::

    python -m xmgie.mgie_core.tiny --comfy-checkpoint \
        ComfyUI/models/checkpoints/tiny-sd15-comfy.safetensors
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..models.ldm_convert import pipeline_to_ldm
from ..models.sd import CONFIG_DIR, DDIM_SETTINGS, SIDE_CONFIG_SUFFIX
from .tokenizers import clip_bpe, write_clip_tokenizer

TINY_IMAGE_SIZE = 128

# The UNet's widths in the ComfyUI checkpoint: the least ComfyUI's model detection takes
# for SD 1.5.
COMFY_SD15 = {"model_channels": 320, "context_dim": 768}


def _sd15_config(component: str) -> dict:
    """SD 1.5's own config of one component, as the pack ships it."""
    config = json.loads((CONFIG_DIR / component / "config.json").read_text())
    return {k: v for k, v in config.items() if not k.startswith("_")}


def unet_config(in_channels: int = 4, comfy_sd15: bool = False) -> dict:
    blocks = dict(
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    if comfy_sd15:
        widths = dict(block_out_channels=(COMFY_SD15["model_channels"],) * 4,
                      norm_num_groups=32, cross_attention_dim=COMFY_SD15["context_dim"],
                      attention_head_dim=8)
    else:
        widths = dict(block_out_channels=(32, 32, 64, 64), norm_num_groups=8,
                      cross_attention_dim=32, attention_head_dim=2)
    return dict(sample_size=TINY_IMAGE_SIZE // 8, in_channels=in_channels, out_channels=4,
                layers_per_block=1, **blocks, **widths)


def vae_config(comfy_sd15: bool = False) -> dict:
    if comfy_sd15:
        return _sd15_config("vae")
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        block_out_channels=(8, 16, 16, 16), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=TINY_IMAGE_SIZE, scaling_factor=0.18215)


def text_config(comfy_sd15: bool = False) -> dict:
    """The tiny CLIP text encoder's config; ``comfy_sd15``: SD 1.5's CLIP-L (its 49408
    tokens cover the tiny tokenizer's ids, and it pools at the highest id, which in
    both tokenizers is the end-of-text token)."""
    if comfy_sd15:
        return _sd15_config("text_encoder")
    vocab, _ = clip_bpe()
    return dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=77, projection_dim=32, hidden_act="quick_gelu",
                bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                pad_token_id=vocab["<|endoftext|>"])


def build(in_channels: int = 4, seed: int = 0, comfy_sd15: bool = False):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config(in_channels, comfy_sd15))
    vae = AutoencoderKL(**vae_config(comfy_sd15))
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config(comfy_sd15)))
    return unet, vae, text_encoder


def write_configs(folder: Path, in_channels: int = 4, with_tokenizer: bool = True,
                  comfy_sd15: bool = False) -> None:
    """A diffusers config folder (no weights): model_index.json and component configs."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig

    folder.mkdir(parents=True, exist_ok=True)
    UNet2DConditionModel.from_config(unet_config(in_channels, comfy_sd15)).save_config(
        folder / "unet")
    AutoencoderKL.from_config(vae_config(comfy_sd15)).save_config(folder / "vae")
    text = CLIPTextConfig(**{**text_config(comfy_sd15), "architectures": ["CLIPTextModel"]})
    text.save_pretrained(folder / "text_encoder")
    DDIMScheduler(**DDIM_SETTINGS).save_config(folder / "scheduler")
    if with_tokenizer:
        write_clip_tokenizer(folder / "tokenizer")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
             "feature_extractor": [None, None], "safety_checker": [None, None],
             "requires_safety_checker": False,
             "scheduler": ["diffusers", "DDIMScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def _write_diffusers(folder: Path, in_channels: int) -> None:
    unet, vae, text_encoder = build(in_channels)
    write_configs(folder, in_channels)
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)


def make_sd_diffusers(folder: Path) -> None:
    _write_diffusers(Path(folder), in_channels=4)


def make_ip2p_diffusers(folder: Path) -> None:
    _write_diffusers(Path(folder), in_channels=8)


def make_sd_checkpoint(path: Path, comfy_sd15: bool = False) -> None:
    """A single-file checkpoint in the original LDM layout, plus ``<stem>.config/``
    beside it (the tiny architecture differs from SD 1.5, whose config the pack ships).
    ``comfy_sd15``: the one a real ComfyUI's Load Checkpoint loads, in fp16 (see the
    module docstring)."""
    path = Path(path)
    unet, vae, text_encoder = build(4, comfy_sd15=comfy_sd15)
    if comfy_sd15:
        for module in (unet, vae, text_encoder):
            module.half()
    save_file(pipeline_to_ldm(unet, vae, text_encoder), str(path))
    write_configs(path.with_name(path.stem + SIDE_CONFIG_SUFFIX), 4, with_tokenizer=True,
                  comfy_sd15=comfy_sd15)


def make_comfy_sd15_checkpoint(path: Path) -> None:
    """The random-weight checkpoint a real ComfyUI's Load Checkpoint loads as SD 1.5 (for
    a smoke test of the pack in ComfyUI: put it in ComfyUI/models/checkpoints)."""
    make_sd_checkpoint(path, comfy_sd15=True)


def make_mgie_unet(path: Path) -> None:
    """MGIE-style ``unet.pt``: a plain state dict of an 8-channel diffusers UNet."""
    unet, _, _ = build(8, seed=1)
    torch.save(unet.state_dict(), str(path))


def make_clip_tokenizer(folder: Path) -> None:
    write_clip_tokenizer(Path(folder))
