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
