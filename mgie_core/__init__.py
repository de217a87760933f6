"""mgie_core: the xMGIE library. Never imports ComfyUI or the pack's ``nodes``."""

__version__ = "0.1.0"
