"""Checks every loader runs on what it loaded.

transformers 5 can return a stub tokenizer silently when tokenizer files are missing
(tiny vocabulary, model_max_length of 1e30): that must be a failed load, not a model
that later produces garbage."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from ..errors import ModelLoadError

MIN_VOCAB = 1000
MAX_MODEL_MAX_LENGTH = 1_000_000


def check_tokenizer(tokenizer, path: Path | str, what: str = "tokenizer") -> None:
    size = len(tokenizer)
    if size < MIN_VOCAB:
        raise ModelLoadError(
            what, path, f"the tokenizer has only {size} entries (at least {MIN_VOCAB} expected): "
            "its files (tokenizer.json, or vocab.json + merges.txt, or tokenizer.model) are "
            "missing or incomplete", "Copy the tokenizer files of the model into this folder.")
    mml = getattr(tokenizer, "model_max_length", None)
    if mml is not None and mml > MAX_MODEL_MAX_LENGTH:
        raise ModelLoadError(
            what, path, f"the tokenizer's model_max_length is {mml:g}, which means its "
            "tokenizer_config.json was not found", "Copy tokenizer_config.json of the model "
            "into this folder.")


def check_files(folder: Path, required: Iterable[str], what: str, fix: str = "") -> None:
    missing = [r for r in required if not (Path(folder) / r).exists()]
    if missing:
        raise ModelLoadError(what, folder, "missing " + ", ".join(missing), fix)


def check_state_dict_keys(what: str, path: Path | str, missing: list[str],
                          unexpected: list[str], limit: int = 8) -> None:
    if not missing and not unexpected:
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} weights missing (e.g. {', '.join(missing[:limit])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected weights (e.g. {', '.join(unexpected[:limit])})")
    raise ModelLoadError(what, path, "; ".join(parts),
                         "Check that the file is the model this loader expects.")
