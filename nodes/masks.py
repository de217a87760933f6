"""Mask nodes: masks from the cross-attention of an object word (optionally SAM-refined)."""

from __future__ import annotations

import torch

from ..mgie_core import masks
from ._common import PREFIX, SAM_MODEL, SD_MODEL, category, inp, plan_input


class AttentionMask:
    NODE_ID = f"{PREFIX}AttentionMask"
    DISPLAY_NAME = "xMGIE Attention Mask"
    CATEGORY = category("masks")
    DESCRIPTION = ("Finds an object from a word: the image is noised to a few mid-schedule "
                   "timesteps (501, 601, 701) and run once through the text-to-image UNet "
                   "with the prompt; the word's cross-attention at 1/4 latent resolution "
                   "(16x16 at 512 px) is averaged, normalised to 0..1, upsampled and "
                   "thresholded. With a SAM model, the mask's bounding box prompts SAM for a "
                   "sharper mask; without one (SAM not connected, or its loader bypassed), "
                   "or when SAM's mask falls apart at the attention resolution (1/32 of "
                   "the image), the attention mask itself is the result. With an edit plan, "
                   "the word is the plan's object. Needs a text-to-image SD 1.x, SD 2.x or "
                   "SDXL model (not an instruction model). Also returns the attention map as "
                   "a heat map preview.")
    RETURN_TYPES = ("MASK", "IMAGE")
    RETURN_NAMES = ("mask", "heat_map")
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "sd_model": (SD_MODEL, inp("Text-to-image SD 1.x, SD 2.x or SDXL model "
                                           "(4-channel UNet) whose cross-attention "
                                           "locates the word.")),
                "image": ("IMAGE", inp("Image(s) to find the object in, any size (a photo "
                                       "is reflect-padded to the model's 64 px step for "
                                       "the UNet pass; the mask has the photo's size).")),
                "prompt": ("STRING", inp("A caption of the image that contains the word, "
                                         "e.g. 'a photo of a cat on a sofa'. Empty: the "
                                         "plan's source prompt (the word added when it "
                                         "does not occur in it).",
                                         default="", multiline=True)),
                "word": ("STRING", inp("The object's word, exactly as in the prompt "
                                       "(e.g. 'cat'). Empty: the plan's object.",
                                       default="", multiline=False)),
                "threshold": ("FLOAT", inp("Pixels whose normalised attention is above this "
                                           "are in the mask (higher: tighter mask).",
                                           default=0.5, min=0.0, max=0.99, step=0.01)),
                "seed": ("INT", inp("Seed of the noise added to the image (the map depends "
                                    "slightly on it).", default=0, min=0,
                                    max=0xFFFFFFFFFFFFFFFF)),
            },
            "optional": {
                "sam": (SAM_MODEL, inp("Optional SAM model: refine the mask by segmenting "
                                       "the attention mask's bounding box. Not connected "
                                       "(or its loader bypassed): the attention mask.")),
                "plan": plan_input("word (its object) and prompt (its source prompt)"),
            },
        }

    def run(self, sd_model, image, prompt, word, threshold, seed, sam=None, plan=None):
        prompt, word = masks.prompt_and_word(prompt, word, plan)
        out_masks, previews = [], []
        for img in image:   # photos of any size: the library pads for the UNet
            img = img.clone()[None]
            mask, amap, _ = masks.object_mask(sd_model, img, prompt, word, threshold, seed, sam)
            out_masks.append(mask.cpu())
            previews.append(masks.heat_map(amap.cpu(), img))
        return torch.stack(out_masks), torch.stack(previews)


NODES = [AttentionMask]
