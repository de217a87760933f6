"""Tiny SDXL family, in the layout of stabilityai/stable-diffusion-xl-base-1.0's diffusers
folder: SDXL's UNet blocks (a plain first down block, so no attention at the latent's
own resolution; two cross-attention down blocks; mirrored up blocks), transformers whose
depth grows towards the lowest level, linear projections, the "text_time" added
conditioning (pooled text embedding and six time ids), two CLIP text encoders (a
CLIP-L-style ``CLIPTextModel`` and an OpenCLIP-bigG-style
``CLIPTextModelWithProjection``, whose tokenizer pads with "!"), SDXL's VAE scaling
factor and its Euler scheduler config. Widths are tiny; 128 px images give 16x16
latents (levels 16, 8, 4).

Also the tiny SDXL InstructPix2Pix (8 input channels) in the layout of diffusers'
``StableDiffusionXLInstructPix2PixPipeline`` folders (diffusers/sdxl-instructpix2pix-768).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .sd import TINY_IMAGE_SIZE, vae_config
from .tokenizers import clip_bpe, write_clip_tokenizer

# Real SDXL: 768 + 1280 = 2048 token width, pooled 1280, time ids embedded at 256 each.
WIDTH_1, WIDTH_2 = 32, 48
TIME_EMBED_DIM = 8
SDXL_SCALING_FACTOR = 0.13025

# SDXL's shipped scheduler (EulerDiscreteScheduler): SD's betas, leading spacing.
EULER_SETTINGS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      steps_offset=1, timestep_spacing="leading", prediction_type="epsilon",
                      interpolation_type="linear", use_karras_sigmas=False)


def unet_config(in_channels: int = 4) -> dict:
    return dict(
        sample_size=TINY_IMAGE_SIZE // 8, in_channels=in_channels, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=8,
        transformer_layers_per_block=(1, 1, 2),     # SDXL: (1, 2, 10)
        attention_head_dim=(2, 2, 4), use_linear_projection=True,
        cross_attention_dim=WIDTH_1 + WIDTH_2,
        addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + WIDTH_2)


def text_configs() -> tuple[dict, dict]:
    """(CLIP-L-style, OpenCLIP-bigG-style) configs: quick_gelu and gelu, as SDXL's."""
    vocab, _ = clip_bpe()
    common = dict(vocab_size=len(vocab), num_hidden_layers=3, max_position_embeddings=77,
                  bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"])
    first = dict(common, hidden_size=WIDTH_1, intermediate_size=64, num_attention_heads=2,
                 projection_dim=WIDTH_1, hidden_act="quick_gelu",
                 pad_token_id=vocab["<|endoftext|>"])
    second = dict(common, hidden_size=WIDTH_2, intermediate_size=96, num_attention_heads=2,
                  projection_dim=WIDTH_2, hidden_act="gelu", pad_token_id=vocab["!"])
    return first, second


def build(in_channels: int = 4, seed: int = 0):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    first, second = text_configs()
    return dict(
        unet=UNet2DConditionModel(**unet_config(in_channels)),
        vae=AutoencoderKL(**{**vae_config(), "scaling_factor": SDXL_SCALING_FACTOR,
                             "force_upcast": True}),
        text_encoder=CLIPTextModel(CLIPTextConfig(**first)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**second)))


def write_tokenizer(folder: Path, pad_token: str = "<|endoftext|>") -> None:
    """A CLIPTokenizer folder; ``pad_token="!"`` as OpenCLIP's tokenizers (SD 2.x's, SDXL's
    second) pad."""
    write_clip_tokenizer(folder)
    if pad_token == "<|endoftext|>":
        return
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        data = json.loads(path.read_text())
        data["pad_token"] = pad_token
        path.write_text(json.dumps(data, indent=2))


def write_folder(folder: Path, pipeline: str, modules: dict, scheduler,
                 tokenizers: dict[str, str], extra: dict | None = None) -> None:
    """A diffusers pipeline folder: each module saved in its sub-folder (safetensors),
    the scheduler config, the tokenizers (sub-folder -> pad token) and model_index.json
    naming the classes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": pipeline, "_diffusers_version": "0.42.1"}
    for name, module in modules.items():
        module.save_pretrained(folder / name, safe_serialization=True)
        lib = "diffusers" if type(module).__module__.startswith("diffusers") else "transformers"
        index[name] = [lib, type(module).__name__]
    scheduler.save_config(folder / "scheduler")
    index["scheduler"] = ["diffusers", type(scheduler).__name__]
    for name, pad in tokenizers.items():
        write_tokenizer(folder / name, pad)
        index[name] = ["transformers", "CLIPTokenizer"]
    index.update(extra or {})
    (folder / "model_index.json").write_text(json.dumps(dict(sorted(index.items())), indent=2))


def _write_sdxl(folder: Path, in_channels: int, pipeline: str, extra: dict) -> None:
    from diffusers import EulerDiscreteScheduler

    write_folder(folder, pipeline, build(in_channels),
                 EulerDiscreteScheduler(**EULER_SETTINGS),
                 {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}, extra)


def make_sdxl_diffusers(folder: Path) -> None:
    _write_sdxl(Path(folder), 4, "StableDiffusionXLPipeline",
                {"force_zeros_for_empty_prompt": True, "feature_extractor": [None, None],
                 "image_encoder": [None, None]})


def make_sdxl_ip2p_diffusers(folder: Path) -> None:
    _write_sdxl(Path(folder), 8, "StableDiffusionXLInstructPix2PixPipeline",
                {"force_zeros_for_empty_prompt": True, "requires_aesthetics_score": False})
