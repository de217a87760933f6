"""Loader nodes for the SD 1.x family (text-to-image and instruction UNets)."""

from __future__ import annotations

from ..mgie_core import paths
from ..mgie_core.models import sd
from ._common import PREFIX, SD_MODEL, category, inp

DTYPES = list(sd.DTYPES)
_DTYPE_TIP = "Weights' precision. auto = fp16 on a CUDA GPU, fp32 on the CPU."


class LoadCheckpoint:
    NODE_ID = f"{PREFIX}LoadCheckpoint"
    DISPLAY_NAME = "xMGIE Load SD1.x Checkpoint"
    CATEGORY = category("loaders")
    DESCRIPTION = ("Loads a Stable Diffusion 1.x single-file checkpoint (.safetensors or "
                   ".ckpt from models/checkpoints) with the pack's SD 1.5 configs, offline.")
    RETURN_TYPES = (SD_MODEL,)
    RETURN_NAMES = ("sd_model",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "ckpt_name": (paths.list_models(paths.SD_CHECKPOINT),
                          inp("SD 1.x checkpoint file in models/checkpoints.")),
            "dtype": (DTYPES, inp(_DTYPE_TIP, default="auto")),
        }}

    def load(self, ckpt_name, dtype):
        return (sd.load_sd_checkpoint(ckpt_name, dtype=dtype),)


class LoadDiffusers:
    NODE_ID = f"{PREFIX}LoadDiffusers"
    DISPLAY_NAME = "xMGIE Load SD1.x Diffusers Folder"
    CATEGORY = category("loaders")
    DESCRIPTION = ("Loads a Stable Diffusion 1.x model from a diffusers folder "
                   "(models/diffusers/<name>, or the local Hugging Face cache), offline.")
    RETURN_TYPES = (SD_MODEL,)
    RETURN_NAMES = ("sd_model",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (paths.list_models(paths.SD_DIFFUSERS),
                      inp("Diffusers folder in models/diffusers.")),
            "dtype": (DTYPES, inp(_DTYPE_TIP, default="auto")),
        }}

    def load(self, model, dtype):
        return (sd.load_sd_diffusers(model, dtype=dtype),)


class LoadInstructPix2Pix:
    NODE_ID = f"{PREFIX}LoadInstructPix2Pix"
    DISPLAY_NAME = "xMGIE Load InstructPix2Pix"
    CATEGORY = category("loaders")
    DESCRIPTION = ("Loads an 8-channel instruction model (InstructPix2Pix diffusers "
                   "layout) for instruction-guided sampling.")
    RETURN_TYPES = (SD_MODEL,)
    RETURN_NAMES = ("sd_model",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (paths.list_models(paths.IP2P_DIFFUSERS),
                      inp("InstructPix2Pix diffusers folder in models/diffusers.")),
            "dtype": (DTYPES, inp(_DTYPE_TIP, default="auto")),
        }}

    def load(self, model, dtype):
        return (sd.load_instruct_diffusers(model, dtype=dtype),)


class LoadMGIEUNet:
    NODE_ID = f"{PREFIX}LoadMGIEUNet"
    DISPLAY_NAME = "xMGIE Load MGIE UNet"
    CATEGORY = category("loaders")
    DESCRIPTION = ("Puts MGIE's released 8-channel UNet (unet.pt in models/mgie) on top "
                   "of an SD 1.5 model's VAE, text encoder and tokenizer.")
    LOADS_MODELS = True   # reads sd_model's parts, runs nothing: no need to load it
    RETURN_TYPES = (SD_MODEL,)
    RETURN_NAMES = ("sd_model",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "sd_model": (SD_MODEL, inp("The SD 1.5 model whose VAE and text encoder MGIE "
                                       "was trained with.")),
            "unet_name": (paths.list_models(paths.MGIE_UNET),
                          inp("MGIE's unet.pt in models/mgie.")),
        }}

    def load(self, sd_model, unet_name):
        return (sd.load_mgie_unet(unet_name, sd_model),)


NODES = [LoadCheckpoint, LoadDiffusers, LoadInstructPix2Pix, LoadMGIEUNet]
