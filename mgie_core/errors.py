"""Errors that tell the user what was wrong, what was expected and how to fix it."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence


class XMGIEError(Exception):
    """Base class for every error the library raises on purpose."""


class InputError(XMGIEError, ValueError):
    """Bad user input: names the input, says what was expected and how to fix it."""

    def __init__(self, name: str, problem: str, expected: str, fix: str = ""):
        self.input_name = name
        msg = f"{name}: {problem}; expected {expected}."
        if fix:
            msg += f" {fix}"
        super().__init__(msg)


class ModelNotFoundError(XMGIEError, FileNotFoundError):
    """A model file or folder could not be found in any searched location."""

    def __init__(self, what: str, name: str, searched: Sequence[Path | str],
                 published: str = "", hint: str = ""):
        self.what = what
        self.name = name
        self.searched = [str(p) for p in searched]
        lines = [f"{what} '{name}' was not found."]
        if self.searched:
            lines.append("Searched, in this order:")
            lines += [f"  - {p}" for p in self.searched]
        else:
            lines.append("No folder was configured to search.")
        if published:
            lines.append(f"Where to get it: {published}")
        if hint:
            lines.append(hint)
        super().__init__("\n".join(lines))


class ModelLoadError(XMGIEError, RuntimeError):
    """Files were found but do not make a usable model (missing parts, stub tokenizer...)."""

    def __init__(self, what: str, path: Path | str, problem: str, fix: str = ""):
        self.path = str(path)
        msg = f"{what} at {path} could not be loaded: {problem}."
        if fix:
            msg += f" {fix}"
        super().__init__(msg)


def names_list(items: Iterable[str]) -> str:
    items = list(items)
    return ", ".join(repr(i) for i in items) if items else "(none)"
