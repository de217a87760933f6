"""Tiny SD 1.x family: same block structure as SD 1.5 (three cross-attention down blocks,
a plain fourth, mirrored up blocks), so attention layer names match the real model;
widths are tiny. 128 px images give 16x16 latents.

ComfyUI's core Load Checkpoint tells an SD 1.5 checkpoint by its UNet's first width
(model_channels 320) and its cross-attention width (context_dim 768), read from the
tensors; it takes nothing narrower. ``make_comfy_sd15_checkpoint`` writes that one: 320
channels at every level and a 768-wide text encoder, everything else as small as the
layout allows (one res block and one transformer block per level, two text layers, SD's
8 heads and 32 norm groups, which ComfyUI and the bridge assume for SD 1.5). The tiny
models the tests and ``--tiny`` use stay narrow: at 320 channels a UNet call is about
nine times slower and the file 320 MB. ComfyUI builds SD 1.5's VAE and CLIP-L at their
full widths whatever the file holds, so a run of Load Checkpoint in a real ComfyUI also
needs those parts full-size; the detection itself, which this checkpoint is for, reads
only the UNet::

    python -c "from pathlib import Path; from xmgie.mgie_core.tiny import sd; \
               sd.make_comfy_sd15_checkpoint(Path('tiny-sd15-comfy.safetensors'))"
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..models.ldm_convert import pipeline_to_ldm
from ..models.sd import DDIM_SETTINGS, SIDE_CONFIG_SUFFIX
from .tokenizers import clip_bpe, write_clip_tokenizer

TINY_IMAGE_SIZE = 128

# The checkpoint's widths: the least ComfyUI's model detection takes for SD 1.5.
COMFY_SD15 = {"model_channels": 320, "context_dim": 768}


def unet_config(in_channels: int = 4, comfy_detectable: bool = False) -> dict:
    blocks = dict(
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    if comfy_detectable:
        widths = dict(block_out_channels=(COMFY_SD15["model_channels"],) * 4,
                      norm_num_groups=32, cross_attention_dim=COMFY_SD15["context_dim"],
                      attention_head_dim=8)
    else:
        widths = dict(block_out_channels=(32, 32, 64, 64), norm_num_groups=8,
                      cross_attention_dim=32, attention_head_dim=2)
    return dict(sample_size=TINY_IMAGE_SIZE // 8, in_channels=in_channels, out_channels=4,
                layers_per_block=1, **blocks, **widths)


def vae_config() -> dict:
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        block_out_channels=(8, 16, 16, 16), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=TINY_IMAGE_SIZE, scaling_factor=0.18215)


def text_config(comfy_detectable: bool = False) -> dict:
    vocab, _ = clip_bpe()
    hidden = COMFY_SD15["context_dim"] if comfy_detectable else 32
    return dict(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=12 if comfy_detectable else 2,
                max_position_embeddings=77, projection_dim=32, hidden_act="quick_gelu",
                bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                pad_token_id=vocab["<|endoftext|>"])


def build(in_channels: int = 4, seed: int = 0, comfy_detectable: bool = False):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config(in_channels, comfy_detectable))
    vae = AutoencoderKL(**vae_config())
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config(comfy_detectable)))
    return unet, vae, text_encoder


def write_configs(folder: Path, in_channels: int = 4, with_tokenizer: bool = True,
                  comfy_detectable: bool = False) -> None:
    """A diffusers config folder (no weights): model_index.json and component configs."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig

    folder.mkdir(parents=True, exist_ok=True)
    UNet2DConditionModel.from_config(unet_config(in_channels, comfy_detectable)).save_config(
        folder / "unet")
    AutoencoderKL.from_config(vae_config()).save_config(folder / "vae")
    text = CLIPTextConfig(**text_config(comfy_detectable), architectures=["CLIPTextModel"])
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


def make_sd_checkpoint(path: Path, comfy_detectable: bool = False) -> None:
    """A single-file checkpoint in the original LDM layout, plus ``<stem>.config/``
    beside it (the tiny architecture differs from SD 1.5, whose config the pack ships).
    ``comfy_detectable``: the 320/768-wide one ComfyUI's Load Checkpoint detects as SD
    1.5 (see the module docstring)."""
    path = Path(path)
    unet, vae, text_encoder = build(4, comfy_detectable=comfy_detectable)
    save_file(pipeline_to_ldm(unet, vae, text_encoder), str(path))
    write_configs(path.with_name(path.stem + SIDE_CONFIG_SUFFIX), 4, with_tokenizer=True,
                  comfy_detectable=comfy_detectable)


def make_comfy_sd15_checkpoint(path: Path) -> None:
    """The tiny checkpoint ComfyUI's model detection takes for SD 1.5 (for a smoke test
    of the pack in a real ComfyUI: put it in ComfyUI/models/checkpoints)."""
    make_sd_checkpoint(path, comfy_detectable=True)


def make_mgie_unet(path: Path) -> None:
    """MGIE-style ``unet.pt``: a plain state dict of an 8-channel diffusers UNet."""
    unet, _, _ = build(8, seed=1)
    torch.save(unet.state_dict(), str(path))


def make_clip_tokenizer(folder: Path) -> None:
    write_clip_tokenizer(Path(folder))
