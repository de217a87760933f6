"""Writes tiny random-weight models from the command line.

    python -m xmgie.mgie_core.tiny --comfy-checkpoint PATH   # the one a real ComfyUI loads
    python -m xmgie.mgie_core.tiny --root DIR                # the tiny set ``--tiny`` uses
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xmgie.mgie_core.tiny",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--comfy-checkpoint", type=Path, metavar="PATH",
                        help="write the SD 1.5-shaped random-weight checkpoint (fp16, about "
                             "560 MB) that ComfyUI's core Load Checkpoint loads, with its "
                             "<stem>.config/ folder beside it")
    parser.add_argument("--root", type=Path, metavar="DIR",
                        help="write every missing tiny model under DIR (a models-folder "
                             "layout)")
    args = parser.parse_args(argv)
    if args.comfy_checkpoint is None and args.root is None:
        parser.error("give --comfy-checkpoint PATH, --root DIR, or both")
    if args.comfy_checkpoint is not None:
        path = args.comfy_checkpoint
        if path.suffix != ".safetensors":
            parser.error(f"--comfy-checkpoint: {path} must end in .safetensors (the file "
                         "is written in that format)")
        if not path.parent.is_dir():
            parser.error(f"--comfy-checkpoint: folder {path.parent} does not exist; "
                         "create it first")
        from ..models.sd import SIDE_CONFIG_SUFFIX
        from .sd import make_comfy_sd15_checkpoint

        start = time.perf_counter()
        # Written beside the target and moved into place, config folder first, so an
        # interrupted run leaves no half-written checkpoint for ComfyUI to list.
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
        try:
            make_comfy_sd15_checkpoint(tmp / path.name)
            config = path.with_name(path.stem + SIDE_CONFIG_SUFFIX)
            if config.exists():
                shutil.rmtree(config)
            os.replace(tmp / config.name, config)
            os.replace(tmp / path.name, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"wrote {path} ({path.stat().st_size / 2**20:.0f} MiB) in "
              f"{time.perf_counter() - start:.0f} s")
    if args.root is not None:
        from . import ensure_tiny_models

        print(f"tiny models in {ensure_tiny_models(args.root)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
