"""BLIP-2 captioner (docs/algorithms.md section 10: d_new = BLIP2(I_new), MMIG).

Loads ``Blip2ForConditionalGeneration`` and ``Blip2Processor`` from a Hugging Face folder
found by :func:`paths.resolve` (offline, ``local_files_only``), validates what it loaded,
and captions a batch of images, optionally conditioned on a text prompt.

The Hugging Face helpers it shares with the VLM and MGIE loaders live in :mod:`.hf`.
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

ARCHITECTURES = ("Blip2ForConditionalGeneration",)


@dataclasses.dataclass
class Captioner:
    """A loaded BLIP-2 (transparent custom socket type)."""

    model: Any
    processor: Any
    device: torch.device
    dtype: torch.dtype
    path: Path

    def __repr__(self) -> str:
        return f"Captioner(BLIP-2, {self.path}, {self.device}, {self.dtype})"


@grad_mode.builds_weights
def load_blip2(name: str, dtype="auto", device=None) -> Captioner:
    """Load a BLIP-2 folder (``blip2-opt-2.7b`` layout) by name or path."""
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    what = paths.BLIP2.what
    folder = paths.resolve(paths.BLIP2, name)
    config = read_config(folder, what)
    if config.get("model_type") != "blip-2":
        raise ModelLoadError(what, folder, f"config.json has model_type "
                             f"'{config.get('model_type')}', not 'blip-2'",
                             "Pick a BLIP-2 folder such as Salesforce/blip2-opt-2.7b; other "
                             "vision-language models load with the VLM loader.")
    # Every config read as data: no auto_map, transformers' BLIP-2 class only.
    check_folder(folder, what, architectures=ARCHITECTURES)
    processor = load_processor(Blip2Processor, folder, what)
    if getattr(processor, "num_query_tokens", None) is None:
        # Older copies of the repository lack it in processor_config.json; without it
        # the processor would not insert the query-token placeholders.
        processor.num_query_tokens = int(config.get("num_query_tokens", 32))
    image_token = str(getattr(processor, "image_token", "<image>"))
    image_token_id = processor.tokenizer.convert_tokens_to_ids(image_token)
    if config.get("image_token_index") is None:
        raise ModelLoadError(what, folder, "config.json has no image_token_index (an old copy "
                             "of the repository, before the image token was added)",
                             f"Download the current files of {paths.BLIP2.published}.")
    if image_token_id != config["image_token_index"]:
        raise ModelLoadError(what, folder, f"the tokenizer's {image_token} token has id "
                             f"{image_token_id} but config.json says image_token_index="
                             f"{config['image_token_index']}",
                             "Use the tokenizer files that came with this model.")
    device = torch.device(device) if device is not None else host.device()
    dtype = resolve_dtype(dtype, device)
    model = load_model(Blip2ForConditionalGeneration, folder, what, dtype, device)
    captioner = Captioner(model=model, processor=processor, device=device, dtype=dtype,
                          path=folder)
    return memory.manage(captioner, {f"BLIP-2 {folder.name}": model}, device)


def caption(captioner: Captioner, images: torch.Tensor, prompt: str = "",
            max_new_tokens: int = 30, num_beams: int = 1) -> list[str]:
    """One caption per image of ``images`` ([B,H,W,3] float in 0..1).

    With a ``prompt`` (e.g. "a photo of", or "Question: ... Answer:"), the model continues
    it; only the text the model wrote is returned, stripped. Decoding is deterministic
    (greedy, or beam search with ``num_beams`` > 1)."""
    pils = to_pil_images(images, "images")
    if not isinstance(prompt, str):
        raise InputError("prompt", f"got {type(prompt).__name__}", "a string (may be empty)")
    check_positive("max_new_tokens", max_new_tokens)
    check_positive("num_beams", num_beams)
    model, processor = captioner.model, captioner.processor
    gen = generation_kwargs(model, processor.tokenizer, max_new_tokens, num_beams)
    out: list[str] = []
    with host.progress(len(pils), "BLIP-2 caption") as bar, torch.inference_mode():
        for pil in pils:
            # Text is always given (even empty) so the processor puts the query-token
            # placeholders and BOS in front, the layout the model was trained with.
            enc = processor(images=pil, text=prompt, return_tensors="pt")
            enc = to_device(enc, captioner.device, captioner.dtype)
            ids = model.generate(**enc, **gen, stopping_criteria=interrupt_criteria())
            out.append(decode_new(processor.tokenizer, ids[0], enc["input_ids"][0]))
            bar.update()
    return out
