"""xMGIE: instruction-driven image editing nodes for ComfyUI, over the mgie_core library.

ComfyUI imports this folder as a package; everything below is imported relatively
(ComfyUI has its own top-level ``nodes`` module)."""

if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    from .nodes import _comfy

    _comfy.install()
else:
    # Loaded as a bare module, not as a package (pytest collecting a checkout whose folder
    # name is not an identifier): relative imports cannot resolve, so register nothing.
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
