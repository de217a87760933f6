"""mgie_core: the xMGIE library. Never imports ComfyUI or the pack's ``nodes``."""

__version__ = "0.2.0"
