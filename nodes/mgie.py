"""MGIE nodes: load MGIE's multimodal LLM, turn an instruction into its edit condition."""

from __future__ import annotations

from ..mgie_core import paths
from ..mgie_core.models import mgie as mgie_lib
from ..mgie_core.models.sd import DTYPES
from ._common import CONDITIONING, MGIE_MODEL, PREFIX, category, fill, inp, plan_input

DTYPE_TIP = "Weights' precision. auto = fp16 on a CUDA GPU, fp32 on the CPU."


class LoadMGIE:
    NODE_ID = f"{PREFIX}LoadMGIE"
    DISPLAY_NAME = "xMGIE Load MGIE"
    CATEGORY = category("loaders")
    DESCRIPTION = ("Loads MGIE's multimodal LLM (LLaVA-7B v1 + CLIP ViT-L/14 + MGIE's mllm.pt "
                   "with the [IMG] tokens and the edit head) from a folder in models/mgie, "
                   "offline. The folder holds mllm.pt, the LLaVA-7B-v1 folder and the CLIP "
                   "vision folder (clip-vit-large-patch14).")
    RETURN_TYPES = (MGIE_MODEL,)
    RETURN_NAMES = ("mgie",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (paths.list_models(mgie_lib.family()), inp(
                "MGIE folder in models/mgie (mllm.pt, LLaVA-7B-v1/, clip-vit-large-patch14/).")),
            "dtype": (list(DTYPES), inp(DTYPE_TIP, default="auto")),
        }}

    def load(self, model, dtype):
        return (mgie_lib.load_mgie(model, dtype=dtype),)


class MGIEInstruction:
    NODE_ID = f"{PREFIX}MGIEInstruction"
    DISPLAY_NAME = "xMGIE MGIE Instruction"
    CATEGORY = category("instruction")
    DESCRIPTION = ("MGIE: the multimodal LLM looks at the image and rewrites the instruction "
                   "into an expressive one (greedy, no repeated 3-grams), and its visual tokens "
                   "go through the edit head into a condition for the instruction UNet "
                   "(with its null condition). Also returns the expressive instruction.")
    RETURN_TYPES = (CONDITIONING, "STRING")
    RETURN_NAMES = ("conditioning", "expressive_instruction")
    FUNCTION = "instruct"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "mgie": (MGIE_MODEL, inp("A model from xMGIE Load MGIE.")),
            "image": ("IMAGE", inp("The image to edit (the first of a batch is used).")),
            "instruction": ("STRING", inp("The editing instruction. Empty: the plan's "
                                          "instruction.",
                                          default="make it look like winter", multiline=True)),
            "max_new_tokens": ("INT", inp("Longest expressive instruction, in tokens (MGIE: "
                                          "96).", default=96, min=1, max=512)),
        }, "optional": {
            "plan": plan_input("instruction (the user's instruction it was made from)"),
        }}

    def instruct(self, mgie, image, instruction, max_new_tokens, plan=None):
        instruction = fill("instruction", instruction, plan, "instruction",
                           "an editing instruction, e.g. 'make it look like winter'")
        image = image[0] if image.ndim == 4 else image
        text, cond = mgie.instruct(image, instruction, max_new_tokens=int(max_new_tokens))
        return (cond, text)


NODES = [LoadMGIE, MGIEInstruction]
