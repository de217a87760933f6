"""Tiny SD 2.x family, in the layout of stabilityai/stable-diffusion-2-1's diffusers
folder (the 768-v model): SD 1.x's UNet blocks with SD 2's linear projections in the
transformers and upcast attention, an OpenCLIP-H-style text encoder (``CLIPTextModel``
with gelu, its tokenizer padding with "!"), and the v-prediction DDIM scheduler. Widths
are tiny (the text width 48 stands in for OpenCLIP-H's 1024); 128 px images give 16x16
latents.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..models.sd import DDIM_SETTINGS
from .sd import TINY_IMAGE_SIZE, vae_config
from .sdxl import write_folder
from .tokenizers import clip_bpe

TEXT_WIDTH = 48


def unet_config() -> dict:
    return dict(
        sample_size=TINY_IMAGE_SIZE // 8, in_channels=4, out_channels=4, layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(32, 32, 64, 64), norm_num_groups=8,
        attention_head_dim=(2, 2, 4, 4),                   # SD 2: (5, 10, 20, 20)
        cross_attention_dim=TEXT_WIDTH, use_linear_projection=True, upcast_attention=True)


def text_config() -> dict:
    vocab, _ = clip_bpe()
    return dict(vocab_size=len(vocab), hidden_size=TEXT_WIDTH, intermediate_size=96,
                num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                projection_dim=32, hidden_act="gelu", bos_token_id=vocab["<|startoftext|>"],
                eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["!"])


def make_sd2_diffusers(folder: Path) -> None:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    modules = dict(unet=UNet2DConditionModel(**unet_config()),
                   vae=AutoencoderKL(**vae_config()),
                   text_encoder=CLIPTextModel(CLIPTextConfig(**text_config())))
    scheduler = DDIMScheduler(**{**DDIM_SETTINGS, "prediction_type": "v_prediction"})
    write_folder(Path(folder), "StableDiffusionPipeline", modules, scheduler,
                 {"tokenizer": "!"}, {"feature_extractor": [None, None],
                                      "safety_checker": [None, None],
                                      "requires_safety_checker": False})
