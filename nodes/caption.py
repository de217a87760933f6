"""BLIP-2 caption nodes: load a BLIP-2 folder, caption images (MMIG's d_new = BLIP2(I_new))."""

from __future__ import annotations

from ..mgie_core import paths
from ..mgie_core.models import captioner as cap_lib
from ..mgie_core.models.sd import DTYPES
from ._common import CAPTIONER, PREFIX, category, inp

DTYPE_TIP = "Weights' precision. auto = fp16 on a CUDA GPU, fp32 on the CPU."


class LoadBLIP2:
    NODE_ID = f"{PREFIX}LoadBLIP2"
    DISPLAY_NAME = "xMGIE Load BLIP-2"
    CATEGORY = category("loaders")
    DESCRIPTION = ("Loads a BLIP-2 captioner from a Hugging Face folder in models/blip2 (the "
                   "whole Salesforce/blip2-opt-2.7b repository), or the local Hugging Face "
                   "cache, offline.")
    RETURN_TYPES = (CAPTIONER,)
    RETURN_NAMES = ("captioner",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (paths.list_models(paths.BLIP2), inp(
                "BLIP-2 folder in models/blip2 (config.json, weights, processor and "
                "tokenizer files).")),
            "dtype": (list(DTYPES), inp(DTYPE_TIP, default="auto")),
        }}

    def load(self, model, dtype):
        return (cap_lib.load_blip2(model, dtype=dtype),)


class Caption:
    NODE_ID = f"{PREFIX}Caption"
    DISPLAY_NAME = "xMGIE BLIP-2 Caption"
    CATEGORY = category("caption")
    DESCRIPTION = ("Captions each image with BLIP-2 (deterministic decoding). A prompt such as "
                   "'a photo of' or 'Question: ... Answer:' is continued by the model; only "
                   "the model's text is returned. A batch gives one caption per line.")
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("caption",)
    OUTPUT_NODE = True  # shows the caption, like ComfyUI's show-text nodes
    FUNCTION = "caption"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "captioner": (CAPTIONER, inp("A BLIP-2 captioner from xMGIE Load BLIP-2.")),
                "image": ("IMAGE", inp("Images to caption; each gets its own caption.")),
                "max_new_tokens": ("INT", inp("Longest caption, in tokens.",
                                              default=30, min=1, max=512)),
            },
            "optional": {
                "prompt": ("STRING", inp("Optional text the caption continues (empty: a "
                                         "plain caption).", default="", multiline=False)),
            },
        }

    def caption(self, captioner, image, max_new_tokens, prompt=""):
        captions = cap_lib.caption(captioner, image, prompt=prompt or "",
                                   max_new_tokens=int(max_new_tokens))
        text = "\n".join(captions)
        return {"ui": {"text": [text]}, "result": (text,)}


NODES = [LoadBLIP2, Caption]
