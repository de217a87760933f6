"""Vision-language model nodes: load any image-text-to-text model, ask it about an image."""

from __future__ import annotations

from ..mgie_core import paths
from ..mgie_core.models import vlm as vlm_lib
from ..mgie_core.models.sd import DTYPES
from ._common import PREFIX, VLM_MODEL, category, inp

DTYPE_TIP = "Weights' precision. auto = fp16 on a CUDA GPU, fp32 on the CPU."


class LoadVLM:
    NODE_ID = f"{PREFIX}LoadVLM"
    DISPLAY_NAME = "xMGIE Load VLM"
    CATEGORY = category("loaders")
    DESCRIPTION = ("Loads a vision-language model (any transformers image-text-to-text model "
                   "with a chat template, e.g. Qwen2.5-VL-3B-Instruct or llava-1.5-7b-hf) from "
                   "a Hugging Face folder in models/vlm or models/LLM, offline.")
    RETURN_TYPES = (VLM_MODEL,)
    RETURN_NAMES = ("vlm",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (paths.list_models(paths.VLM), inp(
                "Model folder in models/vlm or models/LLM (config.json, weights, processor, "
                "tokenizer and chat template).")),
            "dtype": (list(DTYPES), inp(DTYPE_TIP, default="auto")),
        }}

    def load(self, model, dtype):
        return (vlm_lib.load_vlm(model, dtype=dtype),)


class AskVLM:
    NODE_ID = f"{PREFIX}AskVLM"
    DISPLAY_NAME = "xMGIE Ask VLM"
    CATEGORY = category("vlm")
    DESCRIPTION = ("Asks the vision-language model a question about the image (greedy "
                   "decoding, the model's own chat template) and returns its answer. For a "
                   "batch, each image is asked in turn and the answers are joined by newlines.")
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("answer",)
    FUNCTION = "ask"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vlm": (VLM_MODEL, inp("A model from xMGIE Load VLM.")),
            "image": ("IMAGE", inp("The image to ask about.")),
            "question": ("STRING", inp("The question or instruction for the model.",
                                       default="Describe this image.", multiline=True)),
            "max_new_tokens": ("INT", inp("Longest answer, in tokens.",
                                          default=256, min=1, max=4096)),
        }}

    def ask(self, vlm, image, question, max_new_tokens):
        images = image if image.ndim == 4 else image.unsqueeze(0)
        answers = [vlm_lib.ask(vlm, img, question, max_new_tokens=int(max_new_tokens))
                   for img in images]
        return ("\n".join(answers),)


NODES = [LoadVLM, AskVLM]
