"""Tiny SDXL and SD 2.x single-file checkpoints in ComfyUI's models/checkpoints layout.

The weights are those of the tiny diffusers models (:mod:`.sdxl`, :mod:`.sd2`: same
builders, same seed), written with :func:`~..models.ldm_convert.pipeline_to_ldm`: SDXL's
UNet under ``model.diffusion_model.`` (``label_emb.0`` the added conditioning), CLIP-L
under ``conditioner.embedders.0.transformer.``, OpenCLIP-bigG under
``conditioner.embedders.1.model.`` with fused ``in_proj`` attention and the transposed
``text_projection``; SD 2.x's OpenCLIP-H under ``cond_stage_model.model.``. The tiny
architectures are not the real ones, so ``<stem>.config/`` (configs and tokenizers, no
weights) sits beside each file, as beside the tiny SD 1.x checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..models.ldm_convert import pipeline_to_ldm
from ..models.sd import DDIM_SETTINGS, SIDE_CONFIG_SUFFIX
from . import sd2, sdxl
from .sd import vae_config


def _write_configs(folder: Path, pipeline: str, modules: dict, scheduler,
                   tokenizers: dict[str, str], extra: dict) -> None:
    """A diffusers config folder of ``modules`` (model_index.json, each component's
    config, the tokenizers), without weights."""
    folder.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": pipeline, "_diffusers_version": "0.42.1", **extra}
    for name, module in modules.items():
        if type(module).__module__.startswith("diffusers"):
            module.save_config(folder / name)
            index[name] = ["diffusers", type(module).__name__]
        else:
            config = module.config
            config.architectures = [type(module).__name__]
            config.save_pretrained(folder / name)
            index[name] = ["transformers", type(module).__name__]
    scheduler.save_config(folder / "scheduler")
    index["scheduler"] = ["diffusers", type(scheduler).__name__]
    for name, pad in tokenizers.items():
        sdxl.write_tokenizer(folder / name, pad)
        index[name] = ["transformers", "CLIPTokenizer"]
    (folder / "model_index.json").write_text(json.dumps(dict(sorted(index.items())), indent=2))


def make_sdxl_checkpoint(path: Path) -> None:
    """The tiny SDXL (the weights of the tiny diffusers SDXL) as one file."""
    from diffusers import EulerDiscreteScheduler

    path = Path(path)
    modules = sdxl.build(4)
    save_file(pipeline_to_ldm(modules["unet"], modules["vae"], modules["text_encoder"],
                              modules["text_encoder_2"], family="sdxl"), str(path))
    _write_configs(path.with_name(path.stem + SIDE_CONFIG_SUFFIX), "StableDiffusionXLPipeline",
                   modules, EulerDiscreteScheduler(**sdxl.EULER_SETTINGS),
                   {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"},
                   {"force_zeros_for_empty_prompt": True})


def build_sd2():
    """The tiny SD 2.x modules, as :func:`.sd2.make_sd2_diffusers` builds them."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    return dict(unet=UNet2DConditionModel(**sd2.unet_config()),
                vae=AutoencoderKL(**vae_config()),
                text_encoder=CLIPTextModel(CLIPTextConfig(**sd2.text_config())))


def make_sd2_checkpoint(path: Path) -> None:
    """The tiny SD 2.x 768-v (v-prediction; the weights of the tiny diffusers SD 2.x)
    as one file."""
    from diffusers import DDIMScheduler

    path = Path(path)
    modules = build_sd2()
    save_file(pipeline_to_ldm(modules["unet"], modules["vae"], modules["text_encoder"],
                              family="sd2"), str(path))
    _write_configs(path.with_name(path.stem + SIDE_CONFIG_SUFFIX), "StableDiffusionPipeline",
                   modules, DDIMScheduler(**{**DDIM_SETTINGS, "prediction_type": "v_prediction"}),
                   {"tokenizer": "!"}, {"requires_safety_checker": False})


# The UNet of the SDXL checkpoint a real ComfyUI detects as SDXL: what its detection
# compares (320 model channels, linear projections, transformer depths 0/2/10 per level
# with two res blocks each, 2048-wide context, 2816 added-conditioning inputs) and no
# more (320 channels at every level instead of 320/640/1280).
COMFY_SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 320, 320), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=5, use_linear_projection=True, cross_attention_dim=2048,
    addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32)


def _fill_small_random(modules, seed: int) -> None:
    """Materialise meta-device modules in fp16 on the CPU with small random weights
    (normal, std 0.02; norm weights 1, biases 0) and CLIP's position ids."""
    g = torch.Generator().manual_seed(seed)
    for module in modules:
        module.to_empty(device="cpu").to(torch.float16)
        with torch.no_grad():
            for name, p in module.named_parameters():
                if "norm" in name and name.endswith("weight") and p.ndim == 1:
                    p.fill_(1.0)
                elif p.ndim == 1:
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            for name, b in module.named_buffers():
                if name.endswith("position_ids"):
                    b.copy_(torch.arange(b.shape[-1]).expand(b.shape))


def make_comfy_sdxl_checkpoint(path: Path, seed: int = 0) -> None:
    """A random-weight SDXL checkpoint (fp16, about 2 GB) that a real ComfyUI's Load
    Checkpoint loads as SDXL: the narrowest UNet its detection takes
    (:data:`COMFY_SDXL_UNET`), SDXL's own VAE, CLIP-L and OpenCLIP-bigG at their full
    sizes (ComfyUI builds those whatever the file holds). Weights are drawn small
    (normal, std 0.02; norms 1 and 0) straight into fp16, so writing it takes seconds.
    ``<stem>.config/`` (with the tiny tokenizers) is written beside it for the pack's
    own loaders."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ..models.from_ldm import shipped_configs

    path = Path(path)
    cfg = shipped_configs("sdxl")
    with torch.device("meta"):
        modules = dict(
            unet=UNet2DConditionModel(**COMFY_SDXL_UNET),
            vae=AutoencoderKL.from_config(cfg["vae"]),
            text_encoder=CLIPTextModel(CLIPTextConfig.from_dict(cfg["text_encoder"])),
            text_encoder_2=CLIPTextModelWithProjection(
                CLIPTextConfig.from_dict(cfg["text_encoder_2"])))
    _fill_small_random(modules.values(), seed)
    save_file(pipeline_to_ldm(modules["unet"], modules["vae"], modules["text_encoder"],
                              modules["text_encoder_2"], family="sdxl"), str(path))
    _write_configs(path.with_name(path.stem + SIDE_CONFIG_SUFFIX), "StableDiffusionXLPipeline",
                   modules, EulerDiscreteScheduler(**sdxl.EULER_SETTINGS),
                   {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"},
                   {"force_zeros_for_empty_prompt": True})


# SD 2.x: ComfyUI's detection compares the context width (1024), 320 model channels and
# the linear projections; its 768-v test reads output block 11's first norm bias, so the
# UNet keeps SD 2.x's four levels of two res blocks (at 320 channels each).
COMFY_SD2_UNET = dict(
    sample_size=96, in_channels=4, out_channels=4, layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(320,) * 4, attention_head_dim=5, use_linear_projection=True,
    cross_attention_dim=1024, upcast_attention=True, norm_num_groups=32)


def make_comfy_sd2_checkpoint(path: Path, seed: int = 0) -> None:
    """A random-weight SD 2.x 768-v checkpoint (fp16, about 1 GB) that a real ComfyUI's
    Load Checkpoint loads as SD 2.x with v-prediction: the narrowest UNet its detection
    takes (:data:`COMFY_SD2_UNET`), whose output block 11 norm bias is spread as a
    768-v model's is, SD 2.x's VAE, and OpenCLIP-H with all 24 layers as the published
    files hold it (SD 2.x reads the penultimate one)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..models.from_ldm import shipped_configs

    path = Path(path)
    cfg = shipped_configs("sd2")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**COMFY_SD2_UNET)
        vae = AutoencoderKL.from_config(cfg["vae"])
        text = CLIPTextModel(CLIPTextConfig.from_dict(
            {**cfg["text_encoder"], "num_hidden_layers": 24}))
    _fill_small_random((unet, vae, text), seed)
    with torch.no_grad():   # the 768-v spread ComfyUI (and the pack's loader) look for
        bias = unet.up_blocks[3].attentions[2].transformer_blocks[0].norm1.bias
        bias.copy_(torch.randn(bias.shape, generator=torch.Generator().manual_seed(seed)) * 0.2)
    save_file(pipeline_to_ldm(unet, vae, text, family="sd2"), str(path))
