"""MMIG nodes: LayerDiffusion's layered edit (split, embeddings, mix, LoRA fine-tuning,
edit; docs/algorithms.md section 15), then the MM-Adapter and MMSM nodes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..mgie_core import grad_mode, layered, paths, vae
from ..mgie_core.diffusion import encode_prompt
from ..mgie_core.errors import InputError
from ..mgie_core.images import check_finite
from ..mgie_core.report import UpdateReport
from ._common import (
    CONDITIONING,
    CONTROLS,
    FIT_INPUT,
    LATENT,
    MGIE_MODEL,
    PLAN,
    PREFIX,
    SD_MODEL,
    UPDATES_TOOLTIP,
    category,
    fill,
    inp,
    plan_input,
    report_output,
)

LAYERED = "XMGIE_LAYERED"        # mgie_core.layered.LayeredEmbeddings
_CATEGORY = category("mmig")

_MASK = ("MASK", inp("The object's region (white), of the photo's size: eq. 15 and L_fg "
                     "work inside it, L_bg outside it."))


def _encode(sd_model, image, mask, fit, name: str = "mask"):
    """The photo's latent and the object's latent mask, fitted alike."""
    lat = vae.encode_photo(sd_model, image, fit)
    return lat, layered.latent_mask(mask, tuple(lat.samples.shape[-2:]), name, fit=lat.fit,
                                    vae_scale=sd_model.vae_scale)


class LayeredSplit:
    NODE_ID = f"{PREFIX}LayeredSplit"
    DISPLAY_NAME = "xMGIE Layered Descriptions From Plan"
    CATEGORY = _CATEGORY
    DESCRIPTION = ("LayerDiffusion's first step: splits the edit plan's target into an "
                   "object-attribute description ('a photo of a yellow carpet': the object "
                   "with the edit words just before it) and a background description (the "
                   "rest of the target). Typed texts win over the plan's.")
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("object_description", "background_description")
    OUTPUT_TOOLTIPS = ("The object with its new attributes.", "Everything else.")
    FUNCTION = "split"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "plan": (PLAN, inp("The edit plan (its target prompt, edit words and object).")),
            "object_description": ("STRING", inp("Empty: from the plan.", default="")),
            "background_description": ("STRING", inp("Empty: from the plan.", default="")),
        }}

    def split(self, plan, object_description="", background_description=""):
        obj, bg = layered.split_descriptions(plan)
        return (object_description.strip() or obj, background_description.strip() or bg)


class LayeredEmbeddingsNode:
    NODE_ID = f"{PREFIX}LayeredEmbeddings"
    DISPLAY_NAME = "xMGIE Layered Embedding Optimisation"
    CATEGORY = _CATEGORY
    DESCRIPTION = ("LayerDiffusion's eq. 15: the object-attribute and background "
                   "embeddings, concatenated along the token axis as one condition, are "
                   "optimised together (Adam, the UNet frozen) so the model predicts the "
                   "photo's noise inside the object's mask. Its text output counts the "
                   "steps applied and gives the loss before and after.")
    RETURN_TYPES = (LAYERED, "STRING")
    RETURN_NAMES = ("embeddings", "updates")
    OUTPUT_TOOLTIPS = ("The two optimised embeddings, for xMGIE Layered Mix.",
                       UPDATES_TOOLTIP)
    FUNCTION = "optimise"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "sd_model": (SD_MODEL, inp("Text-to-image model (SD 1.x or SDXL).")),
            "image": ("IMAGE", inp("The photo to edit.")),
            "mask": _MASK,
            "object_description": ("STRING", inp("From xMGIE Layered Descriptions.",
                                                 default="", forceInput=True)),
            "background_description": ("STRING", inp("From xMGIE Layered Descriptions.",
                                                     default="", forceInput=True)),
            "steps": ("INT", inp("Adam steps (500, as Imagic's embedding stage).",
                                 default=500, min=1, max=10000)),
            "lr": ("FLOAT", inp("Learning rate (1e-3, as Imagic).", default=1e-3, min=1e-6,
                                max=1.0, step=1e-4)),
            "seed": ("INT", inp("Seed of the timesteps and noise drawn.", default=0, min=0,
                                max=2 ** 63 - 1)),
        }, "optional": {"fit": FIT_INPUT}}

    def optimise(self, sd_model, image, mask, object_description, background_description,
                 steps, lr, seed, fit="pad"):
        lat, m = _encode(sd_model, image, mask, fit)
        e_a = encode_prompt(sd_model, object_description, "object_description")
        e_b = encode_prompt(sd_model, background_description, "background_description")
        ea, eb, report = layered.optimise_embeddings(sd_model, lat.samples, m, e_a, e_b,
                                                     steps=steps, lr=lr, seed=seed)
        out = layered.LayeredEmbeddings(ea.cpu(), eb.cpu(), object_description,
                                        background_description)
        return report_output((out,), report)


class LayeredMix:
    NODE_ID = f"{PREFIX}LayeredMix"
    DISPLAY_NAME = "xMGIE Layered Mix"
    CATEGORY = _CATEGORY
    DESCRIPTION = ("LayerDiffusion's eq. 16: e_opt = alpha x object embedding + (1 - alpha) "
                   "x background embedding, the condition the fine-tuning and the edit use.")
    RETURN_TYPES = (LAYERED,)
    RETURN_NAMES = ("embeddings",)
    FUNCTION = "mix"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "embeddings": (LAYERED, inp("From xMGIE Layered Embedding Optimisation.")),
            "alpha": ("FLOAT", inp("Weight of the object-attribute embedding (0.7 in the "
                                   "paper).", default=0.7, min=0.0, max=1.0, step=0.05)),
        }}

    def mix(self, embeddings, alpha):
        return (embeddings.mixed(alpha),)


class LayeredFineTune:
    NODE_ID = f"{PREFIX}LayeredFineTune"
    DISPLAY_NAME = "xMGIE Layered LoRA Fine-Tuning"
    CATEGORY = _CATEGORY
    DESCRIPTION = ("LayerDiffusion's eqs. 17-18 on this one photo: LoRA adapters on a copy "
                   "of the UNet's attention projections are trained with the foreground "
                   "loss inside the object and the background loss outside it, under e_opt; "
                   "they are then merged into the copy and a new model is returned (the "
                   "connected model is not changed). Stops at the time budget. Its text "
                   "output counts the steps applied and gives both losses before and after.")
    RETURN_TYPES = (SD_MODEL, "STRING")
    RETURN_NAMES = ("sd_model", "updates")
    OUTPUT_TOOLTIPS = ("The fine-tuned model (the VAE and text encoder shared).",
                       UPDATES_TOOLTIP)
    FUNCTION = "finetune"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "sd_model": (SD_MODEL, inp("Text-to-image model, SD 1.x or SDXL (left unchanged).")),
            "image": ("IMAGE", inp("The photo to edit.")),
            "mask": _MASK,
            "embeddings": (LAYERED, inp("Mixed embeddings, from xMGIE Layered Mix.")),
            "steps": ("INT", inp("Adam steps (300: LoRA learns faster than Imagic's 1000 "
                                 "full-weight steps).", default=300, min=1, max=10000)),
            "lr": ("FLOAT", inp("Learning rate of the adapters (1e-4: LoRA's B starts at "
                                "zero, Imagic's 2e-6 would barely move it).", default=1e-4,
                                min=1e-7, max=1.0, step=1e-5)),
            "rank": ("INT", inp("LoRA rank.", default=4, min=1, max=128)),
            "time_budget_s": ("FLOAT", inp("Stop after this many seconds (0: no limit).",
                                           default=0.0, min=0.0, max=86400.0, step=10.0)),
            "seed": ("INT", inp("Seed of the timesteps and noise drawn.", default=0, min=0,
                                max=2 ** 63 - 1)),
        }, "optional": {
            "mask_target": ("MASK", inp("The object's region in the target (M_t, where "
                                        "L_fg works), when it differs from the photo's "
                                        "object. Empty: mask.")),
            "fit": FIT_INPUT,
        }}

    def finetune(self, sd_model, image, mask, embeddings, steps, lr, rank, time_budget_s,
                 seed, mask_target=None, fit="pad"):
        lat, m = _encode(sd_model, image, mask, fit)
        mt = None if mask_target is None else layered.latent_mask(
            mask_target, tuple(lat.samples.shape[-2:]), "mask_target", fit=lat.fit,
            vae_scale=sd_model.vae_scale)
        tuned, report = layered.finetune_lora(
            sd_model, lat.samples, m, embeddings.need_mix(), mask_target=mt, steps=steps,
            lr=lr, rank=rank, time_budget_s=time_budget_s, seed=seed)
        return report_output((tuned,), report)


class LayeredEdit:
    NODE_ID = f"{PREFIX}LayeredEdit"
    DISPLAY_NAME = "xMGIE Layered Edit"
    CATEGORY = _CATEGORY
    DESCRIPTION = ("LayerDiffusion's edit with the fine-tuned model: the photo is inverted "
                   "(direct inversion), then the two-branch sampler runs the edit branch "
                   "under a mix of the target prompt and e_opt, and at every step puts the "
                   "object layer (inside the mask) over the photo's background layer. "
                   "Chained controls (A-STAR) act on the edit branch. Its text output "
                   "counts their updates.")
    RETURN_TYPES = (LATENT, "STRING")
    RETURN_NAMES = ("edited", "updates")
    OUTPUT_TOOLTIPS = ("The edited latent (ComfyUI's LATENT).", UPDATES_TOOLTIP)
    FUNCTION = "edit"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "sd_model": (SD_MODEL, inp("The fine-tuned model (xMGIE Layered LoRA "
                                       "Fine-Tuning).")),
            "image": ("IMAGE", inp("The photo to edit.")),
            "embeddings": (LAYERED, inp("Mixed embeddings, from xMGIE Layered Mix.")),
            "mask": ("MASK", inp("The object's region (white): the object layer.")),
            "source_prompt": ("STRING", inp("What the photo shows. Empty: the plan's.",
                                            multiline=True, default="")),
            "target_prompt": ("STRING", inp("The edited image. Empty: the plan's.",
                                            multiline=True, default="")),
            "steps": ("INT", inp("DDIM steps.", default=50, min=1, max=1000)),
            "guidance": ("FLOAT", inp("Classifier-free guidance.", default=7.5, min=1.0,
                                      max=30.0, step=0.1)),
            "target_weight": ("FLOAT", inp("Weight of the target prompt against e_opt in "
                                           "the edit branch's condition (Imagic's "
                                           "interpolation).", default=0.7, min=0.0,
                                           max=1.0, step=0.05)),
            "guided_fraction": ("FLOAT", inp("Share of the steps, from the first, after "
                                             "which the layers are recomposed (1: all).",
                                             default=1.0, min=0.0, max=1.0, step=0.05)),
        }, "optional": {
            "controls": (CONTROLS, inp("Controls for the edit branch (A-STAR).")),
            "plan": plan_input("source_prompt and target_prompt, and is the run's plan for "
                               "the chained controls"),
            "cross_replace": ("FLOAT", inp("Prompt-to-prompt cross-attention injection "
                                           "(0: none, the default).", default=0.0, min=0.0,
                                           max=1.0, step=0.05)),
            "self_replace": ("FLOAT", inp("Self-attention injection (0: none, the default: "
                                          "the object's pose may change).", default=0.0,
                                          min=0.0, max=1.0, step=0.05)),
            "fit": FIT_INPUT,
        }}

    def edit(self, sd_model, image, embeddings, mask, source_prompt, target_prompt, steps,
             guidance, target_weight, guided_fraction, controls=None, plan=None,
             cross_replace=0.0, self_replace=0.0, fit="pad"):
        source_prompt = fill("source_prompt", source_prompt, plan, "source_prompt",
                             "a caption of the photo")
        target_prompt = fill("target_prompt", target_prompt, plan, "target_prompt",
                             "a caption of the edited photo")
        lat = vae.encode_photo(sd_model, image, fit)
        res = layered.layered_edit(
            sd_model, lat.samples, embeddings.need_mix(), source_prompt=source_prompt,
            target_prompt=target_prompt, mask=mask, steps=steps, guidance_scale=guidance,
            target_weight=target_weight, guided_fraction=guided_fraction,
            cross_replace=cross_replace, self_replace=self_replace,
            controls=list(controls or []), plan=plan, fit=lat.fit)
        edited = res.edit.cpu()
        check_finite("edited latent", edited, "latent values")
        return report_output((vae.to_comfy_latent(edited, sd_model.vae.config.scaling_factor,
                                                  res.fit),), res.report or UpdateReport())


NODES = [LayeredSplit, LayeredEmbeddingsNode, LayeredMix, LayeredFineTune, LayeredEdit]


# --- MM-Adapter and MMSM -------------------------------------------------------------------

MMIG_MODULES = "XMGIE_MMIG"      # MMIGModules below


@dataclasses.dataclass(frozen=True)
class MMIGModules:
    """What xMGIE Load MMIG Modules gives: the file and its modules
    (``mgie_core.mmig.MMAdapters`` / ``MMSM``; either may be None)."""

    path: Path
    adapters: object | None
    mmsm: object | None
    meta: dict = dataclasses.field(default_factory=dict)


def _mmig_part(modules, part: str, node: str):
    if not isinstance(modules, MMIGModules):
        raise InputError("mmig", f"got a {type(modules).__name__}",
                         "modules from xMGIE Load MMIG Modules")
    value = getattr(modules, part)
    if value is None:
        name = {"adapters": "MM-Adapter", "mmsm": "MMSM"}[part]
        raise InputError("mmig", f"({modules.path}) holds no {name}", f"a file with an "
                         f"{name} for {node}", "Load the file of a run that trained it.")
    return value


class LoadMMIG:
    NODE_ID = f"{PREFIX}LoadMMIG"
    DISPLAY_NAME = "xMGIE Load MMIG Modules"
    CATEGORY = category("loaders")
    DESCRIPTION = ("Loads MMIG's trained MM-Adapter (LaVIN's mixture-of-modality adapters "
                   "for the MGIE LLM) and MMSM (the text-feature support module in the UNet) "
                   "from one .safetensors file in models/xmgie_mmig (what an MMIG training "
                   "run writes). Connect it to xMGIE Apply MM-Adapter and xMGIE Apply MMSM.")
    RETURN_TYPES = (MMIG_MODULES,)
    RETURN_NAMES = ("mmig",)
    OUTPUT_TOOLTIPS = ("The MM-Adapter and/or MMSM the file holds.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "mmig_name": (paths.list_models(paths.MMIG), inp(
                "A .safetensors file in models/xmgie_mmig (e.g. a run's "
                "final/mmig.safetensors).")),
        }}

    def load(self, mmig_name):
        from ..mgie_core import mmig

        path = paths.resolve(paths.MMIG, mmig_name)
        with grad_mode.loading():
            found = mmig.load_mmig(path)
        for m in (found["adapters"], found["mmsm"]):   # used for inference: no autograd graph
            if m is not None:
                m.requires_grad_(False)
        return (MMIGModules(path, found["adapters"], found["mmsm"], found["meta"]),)


class ApplyMMAdapter:
    NODE_ID = f"{PREFIX}ApplyMMAdapter"
    DISPLAY_NAME = "xMGIE Apply MM-Adapter"
    CATEGORY = _CATEGORY
    DESCRIPTION = ("Gives a new MGIE model whose LLM runs MMIG's MM-Adapter before every "
                   "layer's attention (image + text routing, as MGIE's prompt holds the "
                   "image). The connected model is left as it is: the new one has its own "
                   "layer objects around the same weights. Use it in xMGIE MGIE "
                   "Instruction.")
    LOADS_MODELS = True     # builds a new model around the given one's weights, runs nothing
    RETURN_TYPES = (MGIE_MODEL,)
    RETURN_NAMES = ("mgie",)
    OUTPUT_TOOLTIPS = ("MGIE with the MM-Adapter in its LLM.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "mgie": (MGIE_MODEL, inp("A model from xMGIE Load MGIE (the one the adapter "
                                     "was trained with).")),
            "mmig": (MMIG_MODULES, inp("Modules from xMGIE Load MMIG Modules holding an "
                                       "MM-Adapter.")),
        }}

    def apply(self, mgie, mmig):
        from ..mgie_core import mmig as mmig_lib

        adapters = _mmig_part(mmig, "adapters", "Apply MM-Adapter")
        return (mmig_lib.mgie_with_mm_adapters(mgie, adapters, label=mmig.path.stem),)


class ApplyMMSM:
    NODE_ID = f"{PREFIX}ApplyMMSM"
    DISPLAY_NAME = "xMGIE Apply MMSM"
    CATEGORY = _CATEGORY
    DESCRIPTION = ("Gives a new SD model whose UNet runs MMIG's MMSM on the block it was "
                   "trained at (the first up block at 16x16 for 512 px): the UNet's features "
                   "there attend to the MGIE conditioning's text embedding (e0) and get the "
                   "result added back, in every step and every guidance branch. The "
                   "connected model is left as it is. Sample with the new model.")
    LOADS_MODELS = True     # builds a new model around the given one's weights, runs nothing
    RETURN_TYPES = (SD_MODEL,)
    RETURN_NAMES = ("sd_model",)
    OUTPUT_TOOLTIPS = ("The SD model with MMSM in its UNet.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "sd_model": (SD_MODEL, inp("The SD model the MMSM was trained with.")),
            "mmig": (MMIG_MODULES, inp("Modules from xMGIE Load MMIG Modules holding an "
                                       "MMSM.")),
            "conditioning": (CONDITIONING, inp(
                "The text embedding e0: the conditioning of xMGIE MGIE Instruction (MGIE's "
                "LLM tokens through its edit head, 77 tokens at the UNet's text width).")),
        }}

    def apply(self, sd_model, mmig, conditioning):
        from ..mgie_core import mmig as mmig_lib

        mmsm = _mmig_part(mmig, "mmsm", "Apply MMSM")
        if not isinstance(getattr(conditioning, "cond", None), torch.Tensor):
            raise InputError("conditioning", f"got a {type(conditioning).__name__}",
                             "a conditioning from xMGIE MGIE Instruction")
        return (mmig_lib.sd_with_mmsm(sd_model, mmsm, conditioning.cond,
                                      label=mmig.path.stem, what="conditioning"),)


NODES += [LoadMMIG, ApplyMMAdapter, ApplyMMSM]
