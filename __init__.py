"""xMGIE: instruction-driven image editing nodes for ComfyUI, over the mgie_core library.

ComfyUI imports this folder as a package; everything below is imported relatively
(ComfyUI has its own top-level ``nodes`` module)."""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from .nodes import _comfy

_comfy.install()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
