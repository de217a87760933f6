"""Files written whole or not at all: a reader (or a run stopped halfway) sees the old
file or the complete new one, never a partial write."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_atomic(path: Path | str, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` writes the content to a temporary sibling of ``path``, which is then
    renamed onto ``path`` (a rename within one folder replaces the file in one step); the
    temporary file is removed if ``write`` fails."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path | str, data: Any) -> None:
    """``data`` as indented JSON (UTF-8), written with :func:`write_atomic`."""
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2),
                                                  encoding="utf-8"))
