"""BLIP-2 captioner (ALGORITHMS.md section 10: d_new = BLIP2(I_new), MMIG).

Loads ``Blip2ForConditionalGeneration`` and ``Blip2Processor`` from a Hugging Face folder
found by :func:`paths.resolve` (offline, ``local_files_only``), validates what it loaded,
and captions a batch of images, optionally conditioned on a text prompt.

The Hugging Face helpers at the bottom (processor/model loading with clear errors,
image conversion, greedy generation settings, interruption) are shared with
:mod:`.vlm`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

import torch

from .. import paths, runtime
from ..errors import InputError, ModelLoadError
from .sd import DTYPES, resolve_dtype  # noqa: F401  (DTYPES re-exported for nodes)
from .validate import check_files, check_state_dict_keys, check_tokenizer

TOKENIZER_FIX = ("Copy the tokenizer files of the model (tokenizer.json or vocab.json + "
                 "merges.txt, tokenizer_config.json, special_tokens_map.json) into this folder.")


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
    device = torch.device(device) if device is not None else runtime.device()
    dtype = resolve_dtype(dtype, device)
    model = load_model(Blip2ForConditionalGeneration, folder, what, dtype, device)
    return Captioner(model=model, processor=processor, device=device, dtype=dtype, path=folder)


def caption(captioner: Captioner, images: torch.Tensor, prompt: str = "",
            max_new_tokens: int = 30, num_beams: int = 1) -> list[str]:
    """One caption per image of ``images`` ([B,H,W,3] float in 0..1).

    With a ``prompt`` (e.g. "a photo of", or "Question: ... Answer:"), the model continues
    it; only the text the model wrote is returned, stripped. Decoding is deterministic
    (greedy, or beam search with ``num_beams`` > 1)."""
    pils = to_pil_images(images, "images")
    if not isinstance(prompt, str):
        raise InputError("prompt", f"got {type(prompt).__name__}", "a string (may be empty)")
    _check_positive("max_new_tokens", max_new_tokens)
    _check_positive("num_beams", num_beams)
    model, processor = captioner.model, captioner.processor
    gen = generation_kwargs(model, processor.tokenizer, max_new_tokens, num_beams)
    out: list[str] = []
    with runtime.progress(len(pils), "BLIP-2 caption") as bar, torch.inference_mode():
        for pil in pils:
            # Text is always given (even empty) so the processor puts the query-token
            # placeholders and BOS in front, the layout the model was trained with.
            enc = processor(images=pil, text=prompt, return_tensors="pt")
            enc = to_device(enc, captioner.device, captioner.dtype)
            ids = model.generate(**enc, **gen, stopping_criteria=interrupt_criteria())
            out.append(decode_new(processor.tokenizer, ids[0], enc["input_ids"][0]))
            bar.update()
    return out


# --- Hugging Face helpers shared with vlm.py ----------------------------------------------


def read_config(folder: Path, what: str) -> dict:
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(what, folder, f"config.json could not be read ({e})",
                             "Copy the whole model repository into this folder.") from e


def load_processor(cls, folder: Path, what: str):
    """``cls.from_pretrained`` offline, with its tokenizer validated.

    transformers 5 raises a variety of errors on missing tokenizer / image-processor
    files (OSError, ValueError, TypeError, IndexError...) or silently builds a stub
    tokenizer: both become a :class:`ModelLoadError` naming the folder."""
    check_files(folder, ["tokenizer_config.json"], what, TOKENIZER_FIX)
    try:
        processor = cls.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:
        raise ModelLoadError(what, folder, f"its processor (tokenizer and image preprocessor) "
                             f"could not be read: {type(e).__name__}: {_first_line(e)}",
                             TOKENIZER_FIX + " The image processor needs "
                             "preprocessor_config.json or processor_config.json.") from e
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None or getattr(processor, "image_processor", None) is None:
        raise ModelLoadError(what, folder, "the folder has no complete processor (a tokenizer "
                             "and an image processor)", "Copy processor_config.json / "
                             "preprocessor_config.json and the tokenizer files of the model.")
    _reasonable_max_length(tokenizer, folder)
    check_tokenizer(tokenizer, folder, f"{what} tokenizer")
    return processor


def _reasonable_max_length(tokenizer, folder: Path) -> None:
    """Some released tokenizer_config.json files (OPT's, hence BLIP-2's) carry no real
    model_max_length, so it reads as 1e30 although the file is present. The stub check in
    check_tokenizer uses that value to detect a *missing* tokenizer_config.json; the file
    was checked to exist above, so cap the value instead of rejecting a complete model."""
    if (folder / "tokenizer_config.json").exists() and tokenizer.model_max_length > 1_000_000:
        tokenizer.model_max_length = 1_000_000


def load_model(cls, folder: Path, what: str, dtype: torch.dtype, device: torch.device):
    nbytes = _weights_bytes(folder, dtype)
    if nbytes:
        runtime.free_memory_for(nbytes, device)
    try:
        model, info = cls.from_pretrained(str(folder), local_files_only=True, dtype=dtype,
                                          output_loading_info=True)
    except Exception as e:  # no weights file, unknown architecture, corrupt safetensors...
        raise ModelLoadError(what, folder, f"transformers could not load the model: "
                             f"{type(e).__name__}: {_first_line(e)}",
                             "The folder needs config.json and the weights "
                             "(model*.safetensors or pytorch_model*.bin) of the model.") from e
    missing = sorted(set(info.get("missing_keys", ())) | {
        k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", ())})
    check_state_dict_keys(what, folder, missing, [])
    return model.requires_grad_(False).eval().to(device)


def _weights_bytes(folder: Path, dtype: torch.dtype) -> int:
    """Size of the weights once loaded in ``dtype`` (files are usually fp16/bf16/fp32)."""
    total = sum(p.stat().st_size for pattern in ("*.safetensors", "*.bin")
                for p in folder.glob(pattern))
    # Assume 2-byte weights on disk (the common case for released models).
    return total * torch.finfo(dtype).bits // 16


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "(no message)"


def _check_positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InputError(name, f"got {value!r}", "a whole number of at least 1")


def to_pil_images(images: torch.Tensor, name: str = "image") -> list:
    """[B,H,W,3] (or [H,W,3]) float 0..1 -> list of RGB PIL images."""
    from PIL import Image

    if not isinstance(images, torch.Tensor):
        raise InputError(name, f"got {type(images).__name__}", "an IMAGE tensor [B,H,W,3]")
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] < 1:
        raise InputError(name, f"got a tensor of shape {tuple(images.shape)}",
                         "an IMAGE tensor [B,H,W,3] with 3 channels (RGB)",
                         "Convert RGBA or grayscale images to RGB first.")
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return [Image.fromarray(a, mode="RGB") for a in arr]


def to_device(enc, device: torch.device, dtype: torch.dtype) -> dict:
    """Move processor outputs to the device; floating tensors (pixels) to the model dtype."""
    out = {}
    for k, v in dict(enc).items():
        if isinstance(v, torch.Tensor):
            v = v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)
        out[k] = v
    return out


def generation_kwargs(model, tokenizer, max_new_tokens: int, num_beams: int = 1) -> dict:
    """Deterministic decoding whatever the folder's generation_config.json says (some
    ship do_sample=True with a temperature)."""
    cfg = model.generation_config
    kwargs: dict = dict(max_new_tokens=int(max_new_tokens), num_beams=int(num_beams),
                        do_sample=False)
    # Sampling-only settings would only produce warnings under greedy decoding.
    for key in ("temperature", "top_p", "top_k", "min_p", "typical_p"):
        if getattr(cfg, key, None) is not None:
            kwargs[key] = None
    if getattr(cfg, "pad_token_id", None) is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
            else tokenizer.eos_token_id
        if pad is not None:
            kwargs["pad_token_id"] = pad
    return kwargs


def interrupt_criteria(on_step=None):
    """A StoppingCriteriaList that checks for interruption (ComfyUI's cancel, Ctrl-C)
    after every generated token, and calls ``on_step`` (e.g. a progress update)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _Interrupt(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            if on_step is not None:
                on_step()
            runtime.check_interrupt()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([_Interrupt()])


def decode_new(tokenizer, output_ids: torch.Tensor, input_ids: Optional[torch.Tensor]) -> str:
    """Decode only the generated tokens: decoder-only models return the prompt first,
    encoder-decoder ones (e.g. BLIP-2 with Flan-T5) do not."""
    n = 0 if input_ids is None else int(input_ids.shape[-1])
    if n and output_ids.shape[-1] >= n and torch.equal(output_ids[:n].cpu(), input_ids.cpu()):
        output_ids = output_ids[n:]
    return tokenizer.decode(output_ids, skip_special_tokens=True).strip()
