"""Editing nodes: inversion, the controls chained into the sampler, and the samplers."""

from __future__ import annotations

from ..mgie_core import inversion as inv_mod
from ..mgie_core import pfb, sampler, vae
from ..mgie_core.diffusion import INSTRUCT_SCHEDULERS
from ..mgie_core.images import check_finite
from ..mgie_core.mag import SCHEDULES, MAGControl
from ..mgie_core.models.compile import compile_unet
from ..mgie_core.plan import split_words
from ..mgie_core.tokens import truncation_note
from ._common import (
    CONDITIONING,
    CONTROLS,
    FIT_INPUT,
    INVERSION,
    LATENT,
    PREFIX,
    SD_MODEL,
    UPDATES_TOOLTIP,
    ControlNode,
    category,
    fill,
    inp,
    plan_input,
    report_output,
)
from .training import pfb_alpha, trained_input

_DIVERGED = ("The sampler produced them from finite inputs: the model's weights may be "
             "damaged, or half precision overflowed (load the model with dtype fp32).")


_COMPILE_INPUT = (["off", "default"], inp(
    "torch.compile the UNet's resnet, sampler and feed-forward layers (attention and the "
    "controls stay as they are) for faster passes on a GPU. The first run compiles every "
    "shape (minutes); later runs reuse it. off: run uncompiled.", default="off"))


# The two-branch sampler also offers whole UNet calls captured as CUDA graphs
# (mgie_core/graphs.py); the instruction sampler does not capture its calls.
_COMPILE_GRAPHS_INPUT = (["off", "default", "graphs"], inp(
    "off: run uncompiled. default: torch.compile the UNet's resnet, sampler and "
    "feed-forward layers (attention and the controls stay as they are); the first run "
    "compiles every shape (minutes), later runs reuse it. graphs: capture whole UNet "
    "calls (with the attention hooks, MAG's gradient and null-text's) as CUDA graphs and "
    "replay them; on a CUDA GPU only (elsewhere it runs uncompiled, and says why in the "
    "log). The model stays marked: the next inversion on it is captured too.",
    default="off"))


def _compile(sd_model, mode: str) -> None:
    compile_unet(sd_model.unet, mode)


def _finite_latent(name: str, latent):
    check_finite(name, latent, "latent values", _DIVERGED)
    return latent


class Invert:
    NODE_ID = f"{PREFIX}Invert"
    DISPLAY_NAME = "xMGIE Invert Image"
    CATEGORY = category("editing")
    DESCRIPTION = ("Inverts a photo into the diffusion trajectory under its source prompt: "
                   "DDIM, null-text (optimised, slow), negative-prompt or direct (no "
                   "optimisation, exact reconstruction). Feeds the two-branch sampler. "
                   "Null-text reports the optimiser updates it applied and skipped. A photo "
                   "of any size is padded to the model's 64 px step and the edit cropped "
                   "back by xMGIE VAE Decode (fit).")
    RETURN_TYPES = (INVERSION, LATENT, "STRING")
    RETURN_NAMES = ("inversion", "latent", "updates")
    OUTPUT_TOOLTIPS = ("The inversion (trajectory, prompts, null embeddings) for the sampler.",
                       "The photo's latent (ComfyUI's LATENT).", UPDATES_TOOLTIP)
    FUNCTION = "invert"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "sd_model": (SD_MODEL, inp("Text-to-image model: SD 1.x, SD 2.x or SDXL.")),
            "image": ("IMAGE", inp("Photo to edit (RGB, any size; see fit).")),
            "source_prompt": ("STRING", inp("What the photo shows, e.g. 'a cat wearing a "
                                            "blue shirt'. Empty: the plan's source prompt.",
                                            multiline=True, default="")),
            "method": (list(inv_mod.METHODS), inp("direct: exact and fast (default). "
                                                  "null_text: the reference method, ~500 "
                                                  "UNet passes. negative_prompt: fast, "
                                                  "approximate. ddim: plain.",
                                                  default="direct")),
            "steps": ("INT", inp("DDIM steps.", default=50, min=1, max=1000)),
            "guidance": ("FLOAT", inp("Classifier-free guidance the edit will use.",
                                      default=7.5, min=1.0, max=30.0, step=0.1)),
            "inner_steps": ("INT", inp("Null-text only: Adam iterations per step.",
                                       default=10, min=1, max=100)),
        }, "optional": {
            "plan": plan_input("source_prompt"),
            "fit": FIT_INPUT,
        }}

    def invert(self, sd_model, image, source_prompt, method, steps, guidance, inner_steps,
               plan=None, fit="pad"):
        source_prompt = fill("source_prompt", source_prompt, plan, "source_prompt",
                             "a caption of the photo, e.g. 'a cat wearing a blue shirt'")
        lat = vae.encode_photo(sd_model, image, fit)
        result = inv_mod.invert(sd_model, lat.samples, source_prompt, method=method,
                                steps=steps, guidance_scale=guidance, inner_steps=inner_steps,
                                image_size=tuple(lat.fit.fitted), fit=lat.fit)
        return report_output((result, vae.to_comfy_latent(lat, sd_model.vae.config.scaling_factor)),
                             result.updates)


class PFBControlNode(ControlNode):
    NODE_ID = f"{PREFIX}PFBControl"
    DISPLAY_NAME = "xMGIE PFB Feature Blending"
    DESCRIPTION = ("Progressive feature blending (PFB-Diff): inside the sampler, UNet "
                   "features outside the mask are taken from the reconstruction branch, "
                   "and early latents are blended, so the background stays the photo's. "
                   "Uses the sampler's mask unless a mask is connected here.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "preset": (list(pfb.PRESETS), inp("object: edit an object (features at 1/32 "
                                              "of the image and below: 16x16 and 8x8 at "
                                              "512 px, SDXL's 32x32 at 1024 px; every "
                                              "step). background: replace "
                                              "the background around the object (mask = "
                                              "outside the object dilated by a 36x36 "
                                              "kernel at 512 px, about 18 px each side; "
                                              "features while t > 200).",
                                              default="object")),
            "alpha": ("FLOAT", inp("Weight of the edit features inside the mask "
                                   "(1 = official code).", default=1.0, min=0.0, max=1.0,
                                   step=0.05)),
            "latent_blend": ("BOOLEAN", inp("Also blend latents in the early steps.",
                                            default=True)),
        }, "optional": {
            "mask": cls.mask_input("Edit region (white).", "PFB needs one of the two."),
            "controls": cls.CHAIN_INPUT,
            "reference": (list(pfb.REFERENCES), inp(
                "Which reference features each guidance half of the edit blends with. "
                "cond (default, PFB-Diff's code): every half takes the reference's "
                "conditional features, those of the pass that made the inverted "
                "trajectory, so the background follows the photo whatever the inversion "
                "method. per_half: each half its own half's (earlier xMGIE rule).",
                default="cond")),
            "placement": (list(pfb.PLACEMENTS), inp(
                "pfb_diff (default): PFB-Diff's sites, inside the UNet blocks at 1/32 of "
                "the image and below (16x16 and 8x8 at 512 px; SDXL: 32x32 at 1024 px), "
                "skip connections left unblended. block_outputs: the outputs of "
                "whole blocks and their skips (earlier xMGIE placement, not PFB-Diff's).",
                default="pfb_diff")),
            "trained": trained_input(
                "the trained per-layer weights a_l replace alpha (preset and placement "
                "as trained)."),
        }}

    def control(self, mask=None, preset="object", alpha=1.0, latent_blend=True,
                reference="cond", placement="pfb_diff", trained=None):
        return pfb.PFBControl(mask, preset=preset,
                              alpha=pfb_alpha(trained, alpha, preset, placement),
                              latent_blend=latent_blend, reference=reference,
                              placement=placement)


class CAMSampler:
    NODE_ID = f"{PREFIX}CAMSampler"
    DISPLAY_NAME = "xMGIE CAM-Masked Two-Branch Sampler"
    CATEGORY = category("editing")
    DESCRIPTION = ("Denoises a reconstruction branch and an edit branch together from the "
                   "inversion, in one batched UNet call per step, with prompt-to-prompt "
                   "attention injection, cross-attention masking (CAM) and chained controls. "
                   "Its text output counts the updates each optimising control (MAG, "
                   "A-STAR, identity guidance) applied and skipped in the run.")
    RETURN_TYPES = (LATENT, LATENT, "STRING")
    RETURN_NAMES = ("edited", "reconstruction", "updates")
    OUTPUT_TOOLTIPS = ("The edited latent (ComfyUI's LATENT).",
                       "The reconstruction branch's latent (the photo, re-made).",
                       UPDATES_TOOLTIP)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "sd_model": (SD_MODEL, inp("The model the image was inverted with.")),
            "inversion": (INVERSION, inp("Output of xMGIE Invert Image.")),
            "target_prompt": ("STRING", inp("The source prompt with the edit, e.g. 'a cat "
                                            "wearing a red shirt'. Empty: the plan's target "
                                            "prompt.", multiline=True, default="")),
            "cam_in_words": ("STRING", inp("Comma-separated words of the target prompt that "
                                           "may attend only inside the mask (the edit). "
                                           "Empty: the plan's edit words when a mask is "
                                           "connected (CAM needs one); otherwise no CAM.",
                                           default="")),
            "cam_out_words": ("STRING", inp("Comma-separated words that may attend only "
                                            "outside the mask.", default="")),
            "cam_mode": (["logits", "probs"], inp("logits: mask before softmax (official "
                                                  "code). probs: multiply probabilities "
                                                  "(paper).", default="logits")),
            "cross_replace": ("FLOAT", inp("Fraction of steps with cross-attention "
                                           "injection.", default=0.8, min=0.0, max=1.0,
                                           step=0.05)),
            "self_replace": ("FLOAT", inp("Fraction of steps with self-attention injection "
                                          "(32x32 layers and below).", default=0.5, min=0.0,
                                          max=1.0, step=0.05)),
            "batched": ("BOOLEAN", inp("One UNet call per step for every branch and both "
                                       "guidance halves (faster).", default=True)),
        }, "optional": {
            "mask": ("MASK", inp("Edit region (white): the run's mask, for CAM and for "
                                 "every chained control that has no mask of its own.")),
            "controls": (CONTROLS, inp("Controls from PFB/MAG/identity nodes.")),
            "p2p_mode": (["refine", "replace"], inp(
                "Prompt-to-prompt cross-attention injection. refine (default): words may be "
                "added or removed; words shared with the source prompt take its maps, new "
                "words keep their own. replace: a word swap (same number of words, e.g. "
                "red -> yellow); every word, the new one included, takes the maps of the "
                "source word in its place.", default="refine")),
            "plan": plan_input("target_prompt and cam_in_words (its edit words), and is "
                               "the run's plan for every chained control that has none of "
                               "its own"),
            "compile_unet": _COMPILE_GRAPHS_INPUT,
        }}

    def sample(self, sd_model, inversion, target_prompt, cam_in_words, cam_out_words, cam_mode,
               cross_replace, self_replace, batched, mask=None, controls=None,
               p2p_mode="refine", plan=None, compile_unet="off"):
        _compile(sd_model, compile_unet)
        # The sampler checks the mask, fits it as the photo was, and fills the empty
        # target prompt and CAM words from the plan (mgie_core.plan.PLAN_RULE).
        # CAM's layers: the model's architecture's (SD 1.x, SD 2.x, SDXL)
        cam = sampler.CAMSettings(split_words(cam_in_words), split_words(cam_out_words),
                                  cam_mode)
        res = sampler.edit(sd_model, inversion, target_prompt, mask=mask, cam=cam,
                           controls=list(controls or []), cross_replace=cross_replace,
                           self_replace=self_replace, batched=batched, p2p_mode=p2p_mode,
                           plan=plan)
        factor = sd_model.vae.config.scaling_factor
        return report_output((vae.to_comfy_latent(_finite_latent("edited latent", res.edit.cpu()),
                                                  factor, res.fit),
                              vae.to_comfy_latent(_finite_latent("reconstruction latent",
                                                                 res.reconstruction.cpu()),
                                                  factor, res.fit)),
                             res.report)


class EncodeInstruction:
    NODE_ID = f"{PREFIX}EncodeInstruction"
    DISPLAY_NAME = "xMGIE Encode Instruction (CLIP)"
    CATEGORY = category("instruction")
    DESCRIPTION = ("Encodes an instruction with the model's CLIP text encoder for the "
                   "instruction sampler (InstructPix2Pix style). MGIE's visual-token "
                   "conditioning plugs into the same input.")
    RETURN_TYPES = (CONDITIONING,)
    RETURN_NAMES = ("conditioning",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "sd_model": (SD_MODEL, inp("Instruction model whose text encoder is used.")),
            "instruction": ("STRING", inp("e.g. 'make the carpet yellow'. Empty: the plan's "
                                          "expressive instruction.", multiline=True,
                                          default="")),
        }, "optional": {
            "plan": plan_input("instruction (its expressive instruction)"),
        }}

    def encode(self, sd_model, instruction, plan=None):
        instruction = fill("instruction", instruction, plan, "expressive_instruction",
                           "an edit instruction, e.g. 'make the carpet yellow'")
        cond = sampler.encode_instruction(sd_model, instruction)
        if not cond.dropped:
            return (cond,)
        # Shown in ComfyUI's history and printed by `xmgie run`; the instruction sampler's
        # text output repeats it.
        note = truncation_note("instruction", cond.dropped,
                               int(getattr(sd_model.tokenizer, "model_max_length", 77)))
        return {"ui": {"text": [note]}, "result": (cond,)}


class InstructSampler:
    NODE_ID = f"{PREFIX}InstructSampler"
    DISPLAY_NAME = "xMGIE Instruction Sampler"
    CATEGORY = category("instruction")
    DESCRIPTION = ("Samples an 8-channel instruction UNet (InstructPix2Pix or MGIE) with "
                   "text and image guidance; CAM and chained controls (PFB) keep the edit "
                   "inside the mask. A photo of any size is padded to the model's 64 px "
                   "step and the edit cropped back by xMGIE VAE Decode (fit).")
    RETURN_TYPES = (LATENT, "STRING")
    RETURN_NAMES = ("edited", "updates")
    OUTPUT_TOOLTIPS = ("The edited latent (ComfyUI's LATENT).", UPDATES_TOOLTIP)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "sd_model": (SD_MODEL, inp("8-channel instruction model.")),
            "image": ("IMAGE", inp("Photo to edit (RGB, any size; see fit).")),
            "conditioning": (CONDITIONING, inp("From Encode Instruction or MGIE.")),
            "steps": ("INT", inp("Sampling steps (MGIE and InstructPix2Pix use 100).",
                                 default=100, min=1, max=1000)),
            "text_scale": ("FLOAT", inp("Text guidance s_T.", default=7.5, min=0.0, max=30.0,
                                        step=0.1)),
            "image_scale": ("FLOAT", inp("Image guidance s_I.", default=1.5, min=0.0,
                                         max=10.0, step=0.05)),
            "seed": ("INT", inp("Noise seed.", default=0, min=0, max=2 ** 63 - 1)),
            "cam_in_words": ("STRING", inp(
                "Comma-separated words of the (CLIP-encoded) instruction that may attend "
                "only inside the mask; '*': the whole condition acts only inside the mask "
                "(the null condition outside), for MGIE's condition, which has no words. "
                "Empty with a plan and a mask: the plan's edit words found in the "
                "instruction, else '*'. Otherwise empty: no CAM.", default="")),
            "batched": ("BOOLEAN", inp("One UNet call per step for all rows.", default=True)),
        }, "optional": {
            "mask": ("MASK", inp("Edit region (white): the run's mask, for CAM and for "
                                 "every chained control that has no mask of its own.")),
            "controls": (CONTROLS, inp("Controls from PFB and other control nodes.")),
            "scheduler": (list(INSTRUCT_SCHEDULERS), inp(
                "euler_ancestral (default): InstructPix2Pix's scheduler, which MGIE's demo "
                "samples with; the same seed gives diffusers' InstructPix2Pix pipeline's "
                "result. ddim: deterministic after the initial noise.",
                default="euler_ancestral")),
            "plan": plan_input("cam_in_words, and is the run's plan for every chained "
                               "control that has none of its own"),
            "compile_unet": _COMPILE_INPUT,
            "fit": FIT_INPUT,
        }}

    def sample(self, sd_model, image, conditioning, steps, text_scale, image_scale, seed,
               cam_in_words, batched, mask=None, controls=None, scheduler="euler_ancestral",
               plan=None, compile_unet="off", fit="pad"):
        _compile(sd_model, compile_unet)
        # The library checks and fits the photo and the mask, and fills empty CAM words
        # from the plan ('*': the whole condition).
        res = sampler.edit_instruct_photo(
            sd_model, image, conditioning, fit=fit, steps=steps, text_scale=text_scale,
            image_scale=image_scale, seed=seed, mask=mask,
            cam=sampler.CAMSettings(split_words(cam_in_words)), controls=list(controls or []),
            batched=batched, scheduler=scheduler, plan=plan)
        return report_output((vae.to_comfy_latent(_finite_latent("edited latent",
                                                                  res.edit.cpu()),
                                                  sd_model.vae.config.scaling_factor,
                                                  res.fit),),
                             res.report)


class MAGControlNode(ControlNode):
    NODE_ID = f"{PREFIX}MAGControl"
    DISPLAY_NAME = "xMGIE MAG Attention Guidance"
    DESCRIPTION = ("MAG-Edit's mask-based attention-adjusted guidance: in the early steps "
                   "the edit latent is optimised inside the mask so the edit words' "
                   "cross-attention concentrates there; late steps blend the background "
                   "back from the reconstruction. Uses the sampler's mask and plan unless "
                   "its own are connected.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "words": ("STRING", inp("Comma-separated words of the target prompt to pull "
                                    "into the mask, e.g. 'yellow'. Empty: the plan's edit "
                                    "words.", default="")),
            "negative_words": ("STRING", inp("Comma-separated words of the target prompt "
                                             "to push out of the mask (may be empty). "
                                             "Empty: the plan's source words that are also "
                                             "in the target prompt.", default="")),
            "opt_fraction": ("FLOAT", inp(
                "Fraction of steps optimised, from the first (0.5: 25 of 50, MAG-Edit). Fast "
                "setting: 0.16 (the first 8 of 50 with 15 iterations: 120 updates instead "
                "of 375), the closest to the full edit for its cost on the pack's "
                "frontier, where the early steps' large updates carry most of the edit "
                "(measured on random-weight models: closeness, not visual quality).",
                default=0.5, min=0.0, max=1.0, step=0.02)),
            "iterations": ("INT", inp("Updates per optimised step (15, MAG-Edit; the fast "
                                      "setting keeps 15 and optimises fewer steps).",
                                      default=15, min=1, max=100)),
            "scale": ("FLOAT", inp("Loss scale (2.5 in MAG-Edit).", default=2.5, min=0.0,
                                   max=100.0, step=0.1)),
            "spatial_ratio": ("BOOLEAN", inp("Add the spatial-ratio term.", default=False)),
            "negative_weight": ("FLOAT", inp("Weight of the negative words' term.",
                                             default=5.5, min=0.0, max=100.0, step=0.1)),
            "blend_fraction": ("FLOAT", inp("Fraction of final steps that blend the "
                                            "background from the reconstruction (15 of 50).",
                                            default=0.3, min=0.0, max=1.0, step=0.02)),
        }, "optional": {
            "mask": cls.mask_input("Edit region (white): where the loss pulls the words, "
                                   "where the latent changes and what the late blend keeps.",
                                   "MAG needs one of the two."),
            "controls": cls.CHAIN_INPUT,
            "plan": cls.plan_input("Optional edit plan for words and negative_words (typed "
                                   "words win, empty ones take the plan's)."),
            # Fewer passes (optional, off by default: saved workflows load unchanged).
            "late_iterations": ("INT", inp(
                "Updates per step in the later optimised steps (from late_start on). 0 "
                "(default): `iterations` in every optimised step, as MAG-Edit. Late updates "
                "are small (the step size sigma_t falls about 10x over the first 25 of 50 "
                "steps), so they change the edit least.", default=0, min=0, max=100)),
            "late_start": ("FLOAT", inp(
                "Share of the optimised steps that keep the full `iterations` before "
                "late_iterations apply.", default=0.5, min=0.0, max=1.0, step=0.02)),
            "schedule": (list(SCHEDULES), inp(
                "How late_iterations apply. step: from late_start on. linear: falling "
                "from `iterations` to late_iterations between late_start and the last "
                "optimised step.", default="step")),
            "stop_activation": ("FLOAT", inp(
                "Early exit: end a step's updates once the words' mean token ratio inside "
                "the mask (attention to the words / all attention, 0..1), measured at "
                "check_iteration, reaches this. 0 (default): off. The exit costs one wait "
                "for the GPU per optimised step.", default=0.0, min=0.0, max=1.0,
                step=0.01)),
            "stop_improvement": ("FLOAT", inp(
                "Early exit: end a step's updates when the loss fell by less than this "
                "share of itself in one iteration, measured at check_iteration. 0 "
                "(default): off.", default=0.0, min=0.0, max=0.99, step=0.01)),
            "check_iteration": ("INT", inp(
                "The iteration (0 is the first) after which the early exit reads the "
                "ratio and the loss, once per optimised step; its update is the step's "
                "last when the exit is met.", default=1, min=0, max=100)),
        }}

    def control(self, mask=None, words="", negative_words="", opt_fraction=0.5, iterations=15,
                scale=2.5, spatial_ratio=False, negative_weight=5.5, blend_fraction=0.3,
                plan=None, late_iterations=0, late_start=0.5, schedule="step",
                stop_activation=0.0, stop_improvement=0.0, check_iteration=1):
        return MAGControl(mask, split_words(words), split_words(negative_words),
                          opt_fraction=opt_fraction, iterations=iterations, scale=scale,
                          use_spatial_ratio=spatial_ratio, negative_weight=negative_weight,
                          blend_fraction=blend_fraction, plan=plan,
                          late_iterations=late_iterations or None, late_start=late_start,
                          schedule=schedule, stop_activation=stop_activation,
                          stop_improvement=stop_improvement, check_iteration=check_iteration)


NODES = [Invert, PFBControlNode, MAGControlNode, CAMSampler, EncodeInstruction, InstructSampler]
