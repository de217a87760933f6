"""Checkpoints that resume exactly and hold only what trains.

``checkpoint-<step>/`` (inside the run folder):

    trainable.safetensors        the task's trainable_state (nothing frozen)
    critic.safetensors           the discriminator, when the task has one
    ema.safetensors              the EMA copy of the trainables, when enabled
    optimizer.pt                 generator optimiser (and critic_optimizer.pt)
    scheduler.pt                 the learning-rate schedules
    scaler.pt                    fp16's gradient scaler, when used
    rng-<rank>.pt                Python, NumPy, torch and CUDA generator states per process
    state.json                   step, data position, early-stopping state

A checkpoint is written into a hidden temporary folder beside it and renamed into place,
so a folder named ``checkpoint-<step>`` is always complete: a crash mid-write leaves only
the temporary folder, which the next write of that step replaces. A step written again
(Ctrl-C right after its periodic save) moves the old folder aside before the new one is
renamed in, so that a complete checkpoint of the step exists at every moment. Everything
``.pt`` is read back with ``torch.load(weights_only=True)``: only tensors and plain
containers, never pickled code. A damaged file met on resume is a :class:`CheckpointError`
naming the folder and the file.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..mgie_core.errors import XMGIEError

PREFIX = "checkpoint-"
FORMAT = 1
TRAINABLE = "trainable.safetensors"
CRITIC = "critic.safetensors"
EMA = "ema.safetensors"
STATE = "state.json"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")
_STATE_KEYS = ("step", "epoch", "index")


class CheckpointError(XMGIEError, ValueError):
    """A checkpoint folder cannot be resumed from (a damaged or foreign file)."""

    def __init__(self, path: Path, problem: str):
        self.path = Path(path)
        super().__init__(f"cannot resume from {self.path.parent}: {self.path.name} {problem}; "
                         f"delete {self.path.parent.name}/ to resume from the checkpoint "
                         "before it, or start a new run without --resume")


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    if not run_dir.is_dir():
        return []
    found = []
    for child in run_dir.iterdir():
        m = _NAME.match(child.name)
        if m and child.is_dir() and (child / STATE).is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def prune(run_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints."""
    for _, path in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def tmp_dir(run_dir: Path, step: int) -> Path:
    return run_dir / f".{PREFIX}{step}.tmp"


def final_dir(run_dir: Path, step: int) -> Path:
    return run_dir / f"{PREFIX}{step}"


def begin(run_dir: Path, step: int) -> Path:
    """(Main process) a fresh temporary folder for the checkpoint of ``step``."""
    tmp = tmp_dir(run_dir, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit(run_dir: Path, step: int) -> Path:
    """(Main process) rename the finished temporary folder into place."""
    final = final_dir(run_dir, step)
    _swap_in(tmp_dir(run_dir, step), final)
    return final


def _swap_in(tmp: Path, target: Path) -> None:
    """Rename the complete folder ``tmp`` onto ``target``. An existing ``target`` is first
    renamed aside, and deleted only once the new one is in place: a crash in between leaves
    the old one (hidden as ``.<name>.old``), never no copy at all."""
    old = target.with_name(f".{target.name}.old")
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def replace_folder(build: Callable[[Path], None], target: Path) -> None:
    """Write a folder through ``build(tmp)`` then swap it in for ``target``."""
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build(tmp)
    _swap_in(tmp, target)


def save_tensors(path: Path, state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, str(path))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def save_pt(path: Path, obj: Any) -> None:
    torch.save(obj, path)


def load_pt(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict[str, Any]:
    """Every generator the loop may draw from, in types ``weights_only`` loading accepts
    (NumPy's key array travels as a tensor)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_state(folder: Path, state: dict[str, Any]) -> None:
    (folder / STATE).write_text(json.dumps({"format": FORMAT, **state}, indent=1) + "\n",
                                encoding="utf-8")


def read_state(folder: Path) -> dict[str, Any]:
    path = folder / STATE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(path, f"cannot be read ({_first_line(exc)})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(path, f"has checkpoint format {found!r}, not {FORMAT} (another "
                                    "version of xmgie wrote it)")
    for key in _STATE_KEYS:
        if not isinstance(state.get(key), int) or isinstance(state[key], bool) \
                or state[key] < 0:
            raise CheckpointError(path, f"has no whole number {key!r} (found "
                                        f"{state.get(key)!r})")
    return state


@contextmanager
def reading(path: Path):
    """Loading ``path`` (a checkpoint file) into the run: any failure becomes a
    :class:`CheckpointError` naming the folder and the file."""
    try:
        yield path
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(path, "is missing") from None
    except Exception as exc:  # truncated, damaged or foreign files fail in many ways
        raise CheckpointError(path, f"cannot be loaded ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    """The error in one line (an unpickling error's advice runs to many): our own messages
    whole, others' first line up to its first sentence."""
    lines = [t.strip() for t in str(exc).strip().splitlines() if t.strip()]
    if isinstance(exc, XMGIEError):
        return " ".join(lines)
    if not lines:
        return type(exc).__name__
    return f"{type(exc).__name__}: {lines[0].split('. ')[0].rstrip('.')}"
