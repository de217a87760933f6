"""xMGIE: instruction-driven image editing nodes for ComfyUI, over the mgie_core library.

ComfyUI imports this folder as a package; everything below is imported relatively
(ComfyUI has its own top-level ``nodes`` module)."""

if __package__:
    def __getattr__(name: str):
        # The node pack loads on the first read of its mappings, which ComfyUI does right
        # after importing this folder; the command line (xmgie, python -m xmgie) starts
        # without it, so torch is imported inside the command's own Ctrl-C handling.
        if name not in __all__:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        try:
            from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, _comfy

            _comfy.install()
        except AttributeError as exc:
            # hasattr() (how ComfyUI asks for the mappings) would swallow this one and
            # load the pack with no nodes and no message: make it an import error.
            raise ImportError(f"the xMGIE nodes failed to load: {exc}") from exc
        globals().update(NODE_CLASS_MAPPINGS=NODE_CLASS_MAPPINGS,
                         NODE_DISPLAY_NAME_MAPPINGS=NODE_DISPLAY_NAME_MAPPINGS)
        return globals()[name]
else:
    # Loaded as a bare module, not as a package (pytest collecting a checkout whose folder
    # name is not an identifier): relative imports cannot resolve, so register nothing.
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
