"""Loader nodes for Stable Diffusion 1.x, 2.x and XL (text-to-image and instruction UNets)."""

from __future__ import annotations

from ..mgie_core import host, paths
from ..mgie_core.models import from_ldm, sd
from ._common import PREFIX, SD_MODEL, category, inp

DTYPES = list(sd.DTYPES)
_DTYPE_TIP = "Weights' precision. auto = fp16 on a CUDA GPU, fp32 on the CPU."


class SDLoader:
    """One loader node for the SD models that are read by name and precision alone
    (a single-file checkpoint, a diffusers folder, an InstructPix2Pix folder): a
    subclass says which family it lists (``FAMILY``), its name input (``NAME_INPUT``,
    kept as saved workflows have it) and the library loader it calls (``LOADER``)."""

    CATEGORY = category("loaders")
    RETURN_TYPES = (SD_MODEL,)
    RETURN_NAMES = ("sd_model",)
    FUNCTION = "load"

    FAMILY: paths.Family
    NAME_INPUT = "model"
    NAME_TOOLTIP = ""
    LOADER = staticmethod(sd.load_sd_diffusers)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            cls.NAME_INPUT: (paths.list_models(cls.FAMILY), inp(cls.NAME_TOOLTIP)),
            "dtype": (DTYPES, inp(_DTYPE_TIP, default="auto")),
        }}

    def load(self, dtype="auto", **name):
        return (self.LOADER(name[self.NAME_INPUT], dtype=dtype),)


class LoadCheckpoint(SDLoader):
    NODE_ID = f"{PREFIX}LoadCheckpoint"
    DISPLAY_NAME = "xMGIE Load Checkpoint (SD 1.x / 2.x / XL)"
    DESCRIPTION = ("Loads a Stable Diffusion 1.x, 2.x or SDXL single-file checkpoint "
                   "(.safetensors or .ckpt from models/checkpoints; the family is read from "
                   "the file) with the pack's shipped configs, offline. A file with a "
                   "missing or unexpected tensor is refused, naming it.")
    FAMILY = paths.SD_CHECKPOINT
    NAME_INPUT = "ckpt_name"
    NAME_TOOLTIP = "SD 1.x, SD 2.x or SDXL checkpoint file in models/checkpoints."
    LOADER = staticmethod(sd.load_sd_checkpoint)


class LoadDiffusers(SDLoader):
    NODE_ID = f"{PREFIX}LoadDiffusers"
    DISPLAY_NAME = "xMGIE Load Diffusers Folder (SD 1.x / 2.x / XL)"
    DESCRIPTION = ("Loads a Stable Diffusion 1.x, 2.x or SDXL model from a diffusers folder "
                   "(models/diffusers/<name>, or the local Hugging Face cache), offline.")
    FAMILY = paths.SD_DIFFUSERS
    NAME_TOOLTIP = "Diffusers folder in models/diffusers."
    LOADER = staticmethod(sd.load_sd_diffusers)


class LoadInstructPix2Pix(SDLoader):
    NODE_ID = f"{PREFIX}LoadInstructPix2Pix"
    DISPLAY_NAME = "xMGIE Load InstructPix2Pix"
    DESCRIPTION = ("Loads an 8-channel instruction model (InstructPix2Pix diffusers "
                   "layout, SD 1.5 or SDXL) for instruction-guided sampling.")
    FAMILY = paths.IP2P_DIFFUSERS
    NAME_TOOLTIP = "InstructPix2Pix diffusers folder in models/diffusers."
    LOADER = staticmethod(sd.load_instruct_diffusers)


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


class SDModelFromComfy:
    NODE_ID = f"{PREFIX}SDModelFromComfy"
    DISPLAY_NAME = "xMGIE SD Model From ComfyUI"
    CATEGORY = category("loaders")
    DESCRIPTION = ("Edits with the models your graph already loaded: takes ComfyUI's MODEL, "
                   "CLIP and VAE (from Load Checkpoint, after any LoRA loaders) and gives the "
                   "pack's SD model, with the LoRAs applied and the weight tensors shared, not "
                   "copied. SD 1.x, SD 2.x (epsilon or v-prediction) and SDXL (both text "
                   "encoders, CLIP-L and OpenCLIP-bigG), and the SD 1.5 and SDXL "
                   "InstructPix2Pix. CLIP Set Last Layer and sampling-time patches (FreeU, "
                   "ModelSampling) do not carry over.")
    RETURN_TYPES = (SD_MODEL,)
    RETURN_NAMES = ("sd_model",)
    FUNCTION = "convert"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", inp("The diffusion model from Load Checkpoint or a LoRA "
                                   "loader (SD 1.x, SD 2.x or SDXL).")),
            "clip": ("CLIP", inp("The CLIP of the same checkpoint (after the same LoRA "
                                 "loaders); SDXL's holds both text encoders.")),
            "vae": ("VAE", inp("The checkpoint's VAE, or one from Load VAE.")),
            "dtype": (DTYPES, inp("auto: the UNet's precision and device as ComfyUI loaded "
                                  "it, weights shared; the VAE follows the UNet and CLIP "
                                  "keeps its own precision (a component brought to another "
                                  "precision or device is copied). fp32/fp16/bf16: all "
                                  "three in that precision (copies what differs).",
                                  default="auto")),
        }}

    def convert(self, model, clip, vae, dtype):
        parts = (model, clip, vae)
        if all(isinstance(p, from_ldm.LDMPart) for p in parts):
            # The headless runner's CheckpointLoaderSimple (runner/core_nodes.py): the
            # file's tensors (CLIP in ComfyUI's text-encoder precision), on the run's
            # device, under the same dtype rule as inside ComfyUI.
            device = host.device()
            return (from_ldm.sd_from_ldm(model, vae, clip, device=device,
                                         dtype=None if dtype == "auto" else dtype),)
        from . import _comfy

        if not _comfy.comfy_available():
            from ..mgie_core.errors import InputError

            raise InputError("model", f"got a {type(model).__name__}", "ComfyUI's MODEL, "
                             "or the headless runner's Load Checkpoint output")
        unet, text, vae_part = _comfy.sd_parts(model, clip, vae)
        return (from_ldm.sd_from_ldm(unet, vae_part, text,
                                     dtype=None if dtype == "auto" else dtype),)


NODES = [LoadCheckpoint, LoadDiffusers, LoadInstructPix2Pix, LoadMGIEUNet, SDModelFromComfy]
