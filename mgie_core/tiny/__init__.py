"""Random-weight tiny models in the real on-disk layouts, for tests and ``--tiny``.

Each family has a maker that writes its model to ``<root>/<family folder>/<tiny name>``
(the same layout as a ComfyUI models folder), so the public loaders load them exactly as
they load real weights. ``--tiny`` proves the install and the graph; the images it makes
are meaningless.
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from .. import paths

# Bump when a maker changes so cached tiny models are rebuilt.
TINY_VERSION = "5"
ENV_TINY_DIR = "XMGIE_TINY_DIR"

# family key -> "module:function"; each function takes the final path to write.
MAKERS: dict[str, str] = {
    "sd_diffusers": "sd:make_sd_diffusers",
    "sd_checkpoint": "sd:make_sd_checkpoint",
    "ip2p_diffusers": "sd:make_ip2p_diffusers",
    "sdxl": "sdxl:make_sdxl_diffusers",
    "sdxl_ip2p": "sdxl:make_sdxl_ip2p_diffusers",
    "sd2": "sd2:make_sd2_diffusers",
    "sdxl_checkpoint": "sdxl_checkpoint:make_sdxl_checkpoint",
    "sd2_checkpoint": "sdxl_checkpoint:make_sd2_checkpoint",
    "mgie_unet": "sd:make_mgie_unet",
    "clip_tokenizer": "sd:make_clip_tokenizer",
    "sam": "sam:make_sam",
    "clip_vision": "identity:make_clip_vision",
    "face_recognition": "identity:make_face_recognition",
    "blip2": "blip2:make_blip2",
    "vlm": "vlm:make_vlm",
    "mgie": "mgie:make_mgie",
    "xmgie_trained": "trained:make_xmgie_trained",
    "mmig": "mmig:make_mmig",
}


def default_root() -> Path:
    env = os.environ.get(ENV_TINY_DIR)
    if env:
        return Path(env)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "xmgie" / f"tiny-v{TINY_VERSION}"


def maker(family: str) -> Callable[[Path], None]:
    module, func = MAKERS[family].split(":")
    return getattr(importlib.import_module(f".{module}", __name__), func)


def tiny_path(root: Path, family: str) -> Path:
    fam = paths.FAMILIES[family]
    return root / fam.folder / fam.tiny_name


def ensure_tiny_models(root: Path | str | None = None,
                       families: Iterable[str] | None = None) -> Path:
    """Write any missing tiny models under ``root`` and return it.

    Each model is written to a temporary sibling and renamed into place, so an
    interrupted build never leaves a half-written model behind. The makers seed their
    own weights; the caller's random state (Python, NumPy, torch) is put back afterwards,
    so a seeded run draws the same numbers whether or not a model had to be built."""
    from ..random_state import preserved  # torch: imported when a model is built

    root = Path(root) if root is not None else default_root()
    for family in (families or MAKERS):
        target = tiny_path(root, family)
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
        try:
            with preserved():
                maker(family)(tmp_dir / target.name)
            # A maker may write side files (a config folder beside a checkpoint): move
            # them first, the model itself last, so its presence means "complete".
            for entry in sorted(tmp_dir.iterdir(), key=lambda p: p.name == target.name):
                dest = target.parent / entry.name
                if dest.exists() and entry.name != target.name:
                    shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
                os.replace(entry, dest)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return root
