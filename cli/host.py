"""What the command line hosts before any command runs: the node registry (the pack's
nodes plus the runner's stand-ins for ComfyUI's core nodes) and the model settings
(device, model folders, tiny mode, image size limit).

The runner never imports the pack's nodes; this module is where the two meet. A Ray
worker gets :func:`build_registry` itself (a module-level function, so it pickles by
name) and calls it in its own process.
"""

from __future__ import annotations

import argparse
import os
import sys

TINY_NOTE = ("note: --tiny uses random-weight tiny models: it proves the install and the "
             "graph, and the image it produces is meaningless.")


def build_registry() -> dict[str, type]:
    """The pack's nodes, plus core stand-ins for the ids the pack does not define."""
    # Imported here, not at module level, so `xmgie.cli` imports even when a node
    # module is broken (the error then comes out as a message, not a traceback).
    from ..nodes import NODE_CLASS_MAPPINGS
    from ..runner.core_nodes import STANDINS

    return {**STANDINS, **NODE_CLASS_MAPPINGS}


def configure_models(args: argparse.Namespace, *, reset: bool = False) -> None:
    """Device, model folders, image size limit and tiny mode from the command's options;
    before validation, because model dropdown lists depend on them. ``reset`` first
    forgets folders configured earlier in this process (batch and eval, which tests and
    notebooks call repeatedly)."""
    from ..mgie_core import images, memory, paths

    if reset:
        paths.configure(reset=True)
    if getattr(args, "device", None):
        os.environ["XMGIE_DEVICE"] = args.device  # read by mgie_core.host
    if hasattr(args, "offload"):  # run only; XMGIE_OFFLOAD=1 does the same
        memory.set_offload_after_use(args.offload or os.environ.get("XMGIE_OFFLOAD") == "1")
    if getattr(args, "models_dir", None):
        paths.configure(models_dir=args.models_dir)
    if getattr(args, "max_image_pixels", None):
        images.set_max_pixels(args.max_image_pixels)
    if args.tiny:
        from ..mgie_core import tiny

        print(TINY_NOTE, file=sys.stderr)
        paths.configure(tiny_root=tiny.ensure_tiny_models())
