"""Node registry. Node modules import nothing from ComfyUI at import time."""

from __future__ import annotations

import importlib

from ._common import uses_models

# Each module defines NODES: list of node classes (each with NODE_ID and DISPLAY_NAME).
_MODULES = [
    "loaders",
    "latents",
    "sam",
    "identity",
    "caption",
    "vlm",
    "plan",
    "editing",
    "masks",
    "mgie",
    "blur",
    "astar",
    "identity_guidance",
    "training",
    "mmig",
]

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

for _name in _MODULES:
    _mod = importlib.import_module(f".{_name}", __name__)
    for _cls in _mod.NODES:
        if _cls.NODE_ID in NODE_CLASS_MAPPINGS:
            raise RuntimeError(f"duplicate node id {_cls.NODE_ID} in nodes/{_name}.py")
        NODE_CLASS_MAPPINGS[_cls.NODE_ID] = uses_models(_cls)
        NODE_DISPLAY_NAME_MAPPINGS[_cls.NODE_ID] = _cls.DISPLAY_NAME
