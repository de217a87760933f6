"""Any local vision-language model (transformers image-text-to-text with a chat template).

docs/algorithms.md section 1, "Beyond MGIE": a VLM such as Qwen2.5-VL or LLaVA-1.5 answers
questions about an image; the edit-plan prompts built on :func:`ask` live elsewhere.
Loading is offline (``local_files_only``) through ``AutoModelForImageTextToText`` and
``AutoProcessor``; the processor must carry a chat template, because the prompt layout
(roles, image placeholders, generation prompt) is model-specific and only the template
knows it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from .. import grad_mode, host, memory, paths
from ..errors import InputError, ModelLoadError
from .hf import (
    check_folder,
    check_positive,
    decode_new,
    generation_kwargs,
    interrupt_criteria,
    load_model,
    load_processor,
    read_config,
    to_device,
    to_pil_images,
)
from .sd import resolve_dtype


@dataclasses.dataclass
class VLM:
    """A loaded image-text-to-text model (transparent custom socket type)."""

    model: Any
    processor: Any
    device: torch.device
    dtype: torch.dtype
    path: Path

    @property
    def model_type(self) -> str:
        return str(getattr(self.model.config, "model_type", "?"))

    def __repr__(self) -> str:
        return f"VLM({self.model_type}, {self.path}, {self.device}, {self.dtype})"


def image_text_to_text_types() -> list[str]:
    """The model types transformers' AutoModelForImageTextToText builds."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return list(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)


@grad_mode.builds_weights
def load_vlm(name: str, dtype="auto", device=None) -> VLM:
    """Load an image-text-to-text model folder by name or path."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    what = paths.VLM.what
    folder = paths.resolve(paths.VLM, name)
    config = read_config(folder, what)
    if not config.get("model_type"):
        raise ModelLoadError(what, folder, "config.json has no model_type",
                             "Copy the whole Hugging Face repository of the model.")
    # Every config read as data first: no auto_map, and a model type transformers itself
    # maps to an image-text-to-text class (so no folder can name code of its own).
    check_folder(folder, what, model_types=image_text_to_text_types())
    processor = load_processor(AutoProcessor, folder, what)
    if not getattr(processor, "chat_template", None):
        raise ModelLoadError(
            what, folder, "its processor has no chat template, so the prompt layout (roles, "
            "image placeholder) is unknown",
            "Copy chat_template.jinja or chat_template.json from the model's repository into "
            "this folder, or use an instruction-tuned model that ships one (e.g. "
            "Qwen2.5-VL-3B-Instruct, llava-1.5-7b-hf).")
    device = torch.device(device) if device is not None else host.device()
    dtype = resolve_dtype(dtype, device)
    model = load_model(AutoModelForImageTextToText, folder, what, dtype, device)
    vlm = VLM(model=model, processor=processor, device=device, dtype=dtype, path=folder)
    return memory.manage(vlm, {f"VLM {folder.name}": model}, device)


def ask(vlm: VLM, image: torch.Tensor, question: str, max_new_tokens: int = 256) -> str:
    """The model's answer about one image ([H,W,3] or [1,H,W,3] float 0..1): the chat
    template renders a user turn holding the image and the question, decoding is greedy,
    and only the newly generated text is returned, stripped."""
    if isinstance(image, torch.Tensor) and image.ndim == 4 and image.shape[0] != 1:
        raise InputError("image", f"got a batch of {image.shape[0]} images",
                         "one image [H,W,3] (or a batch of one)",
                         "Ask about each image separately.")
    if not isinstance(question, str) or not question.strip():
        raise InputError("question", "it is empty", "a question or instruction about the image")
    check_positive("max_new_tokens", max_new_tokens)
    pil = to_pil_images(image, "image")[0]
    processor, model = vlm.processor, vlm.model
    messages = [{"role": "user", "content": [
        {"type": "image", "image": pil},
        {"type": "text", "text": question},
    ]}]
    # The processor renders the template, then expands the image placeholder to the
    # model's number of image tokens (transformers 5 processors do this themselves).
    enc = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                        return_dict=True, return_tensors="pt")
    enc = to_device(enc, vlm.device, vlm.dtype)
    gen = generation_kwargs(model, processor.tokenizer, max_new_tokens)
    with host.progress(max_new_tokens, "VLM answer") as bar, torch.inference_mode():
        ids = model.generate(**enc, **gen, stopping_criteria=interrupt_criteria(bar.update))
    return decode_new(processor.tokenizer, ids[0], enc["input_ids"][0])
