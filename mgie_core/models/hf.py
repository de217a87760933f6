"""Hugging Face loading helpers shared by the BLIP-2, VLM and MGIE loaders.

Offline ``from_pretrained`` with every failure turned into a :class:`ModelLoadError`
naming the folder, tokenizer validation, images to PIL, processor outputs to the model's
device and dtype, deterministic generation settings, and a stopping criterion that
honours interruption (ComfyUI's cancel, Ctrl-C) after every generated token.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from .. import host
from ..errors import InputError, ModelLoadError
from ..images import check_pixels
from .validate import (
    check_files,
    check_hf_folder,
    check_loading_info,
    check_tokenizer,
    first_line,
    read_json,
    weights_file,
)

TOKENIZER_FIX = ("Copy the tokenizer files of the model (tokenizer.json or vocab.json + "
                 "merges.txt, tokenizer_config.json, special_tokens_map.json) into this folder.")


def read_config(folder: Path, what: str) -> dict:
    """``config.json`` as data (refused when it asks for code)."""
    return read_json(Path(folder) / "config.json", what,
                     "Copy the whole model repository into this folder.")


def check_folder(folder: Path, what: str, model_types: Iterable[str] | None = None,
                 architectures: Iterable[str] | None = None) -> dict:
    """Every JSON config of a Hugging Face folder checked before transformers reads it
    (:func:`validate.check_hf_folder`: no ``auto_map``, only transformers classes, the
    model types this loader reads); returns config.json."""
    return check_hf_folder(folder, what, model_types=model_types, architectures=architectures)


def _no_code(cls) -> dict:
    # The Auto classes are the ones that could resolve an auto_map; say no explicitly.
    return {"trust_remote_code": False} if cls.__name__.startswith("Auto") else {}


def load_processor(cls, folder: Path, what: str):
    """``cls.from_pretrained`` offline, with its tokenizer validated.

    transformers 5 raises a variety of errors on missing tokenizer / image-processor
    files (OSError, ValueError, TypeError, IndexError...) or silently builds a stub
    tokenizer: both become a :class:`ModelLoadError` naming the folder."""
    check_files(folder, ["tokenizer_config.json"], what, TOKENIZER_FIX)
    try:
        processor = cls.from_pretrained(str(folder), local_files_only=True, **_no_code(cls))
    except Exception as e:
        raise ModelLoadError(what, folder, f"its processor (tokenizer and image preprocessor) "
                             f"could not be read: {type(e).__name__}: {first_line(e)}",
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


# Buffers older exports saved that transformers computes itself.
OPTIONAL_KEYS = ("*.position_ids",)


def load_model(cls, folder: Path, what: str, dtype: torch.dtype, device: torch.device,
               optional: Sequence[str] = OPTIONAL_KEYS):
    """``cls.from_pretrained`` offline, frozen, on the CPU, with normal (not inference)
    weights, every weight checked: a missing, unexpected or reshaped weight is an error
    naming the folder (keys matching ``optional`` excepted). The caller registers it with
    ``memory.manage``, which places it on ``device`` (freeing room there first) or leaves
    it to the host."""
    try:
        model, info = cls.from_pretrained(str(folder), local_files_only=True, dtype=dtype,
                                          output_loading_info=True, **_no_code(cls))
    except Exception as e:  # no weights file, unknown architecture, corrupt safetensors...
        raise ModelLoadError(what, folder, f"transformers could not load the model: "
                             f"{type(e).__name__}: {first_line(e)}",
                             "The folder needs config.json and the weights "
                             "(model*.safetensors or pytorch_model*.bin) of the model.") from e
    check_loading_info(info, what, weights_file(folder), optional)
    return model.requires_grad_(False).eval()


def weights_bytes(folder: Path, dtype: torch.dtype) -> int:
    """Size of the weights once loaded in ``dtype`` (files are usually fp16/bf16/fp32)."""
    total = sum(p.stat().st_size for pattern in ("*.safetensors", "*.bin")
                for p in folder.glob(pattern))
    # Assume 2-byte weights on disk (the common case for released models).
    return total * torch.finfo(dtype).bits // 16


def check_positive(name: str, value) -> None:
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
    check_pixels(name, images)
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
            host.check_interrupt()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([_Interrupt()])


def decode_new(tokenizer, output_ids: torch.Tensor, input_ids: torch.Tensor | None) -> str:
    """Decode only the generated tokens: decoder-only models return the prompt first,
    encoder-decoder ones (e.g. BLIP-2 with Flan-T5) do not."""
    n = 0 if input_ids is None else int(input_ids.shape[-1])
    if n and output_ids.shape[-1] >= n and torch.equal(output_ids[:n].cpu(), input_ids.cpu()):
        output_ids = output_ids[n:]
    return tokenizer.decode(output_ids, skip_special_tokens=True).strip()
