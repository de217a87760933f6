"""Standalone equivalents of the ComfyUI core nodes the shipped workflows use.

Used only by the headless runner (``xmgie run``): inside ComfyUI the real core nodes
run, so these classes are NOT in the pack's NODE_CLASS_MAPPINGS. They keep ComfyUI's
ids, input names and tensor conventions (IMAGE float32 [B,H,W,3] in 0..1, MASK [B,H,W],
a loaded mask is 1 - alpha) so the same workflow JSON runs in both places.

Where files are read from and written to is the runner's :class:`RunContext`, set with
:func:`set_context` (the CLI does) or temporarily with :func:`using_context`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from PIL import Image, ImageOps, ImageSequence
from PIL.PngImagePlugin import PngInfo

from ..mgie_core.errors import InputError
from ..nodes._common import inp

PREVIEW_SUBFOLDER = "preview"


# --- runner context ---------------------------------------------------------------------

@dataclasses.dataclass
class RunContext:
    """Folders of one headless run, and the files it wrote."""

    input_dirs: list[Path] = dataclasses.field(default_factory=lambda: [Path("input")])
    output_dir: Path = Path("output")
    workflow_dir: Optional[Path] = None
    written: list[Path] = dataclasses.field(default_factory=list)

    def image_search_dirs(self) -> list[Path]:
        """Where a relative image name is looked up, in order: the input dirs, the
        workflow's folder, then its ``inputs/`` sub-folder (where shipped examples keep
        their images)."""
        dirs = [Path(d) for d in self.input_dirs]
        if self.workflow_dir is not None:
            dirs += [Path(self.workflow_dir), Path(self.workflow_dir) / "inputs"]
        return dirs

    def resolve_image(self, name: str) -> Path:
        """Path of the image ``name`` (absolute, or relative to the search dirs)."""
        if not isinstance(name, str) or not name.strip():
            raise InputError("image", f"got {name!r}", "an image file name")
        path = Path(name).expanduser()
        if path.is_absolute():
            if path.is_file():
                return path
            raise InputError("image", f"the file {path} does not exist",
                             "an existing image file", "Check the path.")
        searched = self.image_search_dirs()
        for folder in searched:
            if (folder / path).is_file():
                return folder / path
        shown = ", ".join(str(d.resolve()) for d in searched) or "(no folder)"
        raise InputError("image", f"'{name}' was not found in {shown}",
                         "an image in one of these folders or an absolute path",
                         "Put the image there or pass its folder with --input-dir.")


_context = RunContext()


def context() -> RunContext:
    return _context


def set_context(ctx: RunContext) -> RunContext:
    """Install ``ctx`` for the stand-ins; returns the previous context."""
    global _context
    previous, _context = _context, ctx
    return previous


@contextlib.contextmanager
def using_context(ctx: RunContext) -> Iterator[RunContext]:
    previous = set_context(ctx)
    try:
        yield ctx
    finally:
        set_context(previous)


# --- image helpers ----------------------------------------------------------------------

def _frames(path: Path) -> list[Image.Image]:
    """The frames of an image file, EXIF-transposed; frames whose size differs from the
    first are dropped (ComfyUI does the same for animated files)."""
    with Image.open(path) as img:
        frames = []
        for frame in ImageSequence.Iterator(img):
            frame = ImageOps.exif_transpose(frame)
            if frames and frame.size != frames[0].size:
                continue
            frames.append(frame.copy())
            if img.format == "MPO":  # multi-picture JPEGs: the first picture only
                break
    return frames


def _to_rgba(frame: Image.Image) -> Image.Image:
    # 16/32-bit greyscale ("I" modes) are scaled to 8 bits before the colour conversion.
    if frame.mode.startswith("I"):
        arr = np.asarray(frame, dtype=np.float64)
        frame = Image.fromarray(np.clip(arr / 257.0, 0, 255).astype(np.uint8), "L")
    return frame.convert("RGBA")


def _has_alpha(frame: Image.Image) -> bool:
    # An alpha band, or a palette/colour key transparency (PNG tRNS) PIL turns into one.
    return "A" in frame.getbands() or "transparency" in frame.info


def load_image_tensors(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """IMAGE [B,H,W,3] and MASK [B,H,W] (1 - alpha; zeros without alpha) of a file."""
    images, masks = [], []
    for frame in _frames(path):
        rgba = np.asarray(_to_rgba(frame), dtype=np.float32) / 255.0
        images.append(torch.from_numpy(rgba[..., :3].copy()))
        alpha = rgba[..., 3] if _has_alpha(frame) else np.ones(rgba.shape[:2], np.float32)
        masks.append(torch.from_numpy(1.0 - alpha))
    return torch.stack(images), torch.stack(masks)


def image_to_pil(image: torch.Tensor) -> Image.Image:
    """One IMAGE [H,W,C] in 0..1 as an 8-bit PIL image (C = 1, 3 or 4).

    The same pixels as ComfyUI's SaveImage: ``np.clip(255. * i.cpu().numpy(), 0, 255)
    .astype(np.uint8)``, i.e. float32 arithmetic and truncation towards zero (not
    rounding), so the runner and ComfyUI write identical files for the same tensor. An
    8-bit image loaded by LoadImage (k / 255 in float32) still comes back as k, since
    255 * (k / 255) rounds to exactly k in float32."""
    arr = np.clip(255.0 * image.detach().cpu().float().numpy(), 0, 255).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    channels = 1 if arr.ndim == 2 else arr.shape[-1]
    if channels not in (1, 3, 4):
        raise InputError("images", f"an image has {channels} channels", "1, 3 or 4 channels")
    return Image.fromarray(arr, {1: "L", 3: "RGB", 4: "RGBA"}[channels])


def _next_counter(folder: Path, stem: str) -> int:
    """ComfyUI's file numbering: one past the highest ``<stem>_NNNNN_.png`` there."""
    highest = 0
    if folder.is_dir():
        for entry in folder.iterdir():
            name = entry.name
            if name.startswith(stem + "_") and name.endswith("_.png"):
                digits = name[len(stem) + 1:-len("_.png")]
                if digits.isdigit():
                    highest = max(highest, int(digits))
    return highest + 1


def _png_info(prompt: Optional[dict], extra_pnginfo: Optional[dict]) -> PngInfo:
    # ComfyUI embeds the prompt and the UI workflow so the PNG can be dropped back in.
    info = PngInfo()
    if prompt is not None:
        info.add_text("prompt", json.dumps(prompt))
    for key, value in (extra_pnginfo or {}).items():
        info.add_text(key, json.dumps(value))
    return info


def save_images(images: torch.Tensor, folder: Path, filename_prefix: str,
                prompt: Optional[dict] = None, extra_pnginfo: Optional[dict] = None,
                compress_level: int = 4) -> list[Path]:
    """Write a batch as ``<prefix>_00001_.png``, ... under ``folder``; returns the paths.

    ``filename_prefix`` may hold sub-folders ("edits/cat"); it may not leave ``folder``."""
    if images.ndim == 3:
        images = images.unsqueeze(0)
    folder = Path(folder).resolve()
    target = (folder / filename_prefix).resolve()
    if folder != target and folder not in target.parents:
        raise InputError("filename_prefix", f"'{filename_prefix}' points outside the output "
                         f"folder {folder}", "a name or a sub-folder path inside it")
    target.parent.mkdir(parents=True, exist_ok=True)
    counter = _next_counter(target.parent, target.name)
    info = _png_info(prompt, extra_pnginfo)
    written = []
    for image in images:
        path = target.parent / f"{target.name}_{counter:05d}_.png"
        image_to_pil(image).save(path, pnginfo=info, compress_level=compress_level)
        written.append(path)
        counter += 1
    return written


# --- nodes ------------------------------------------------------------------------------

_IMAGE_NAME_TIP = ("Image file: an absolute path, or a name looked up in the input folders "
                   "(--input-dir, default ./input), then the workflow's folder, then its "
                   "inputs/ sub-folder.")


class LoadImage:
    NODE_ID = "LoadImage"
    DISPLAY_NAME = "Load Image"
    CATEGORY = "image"
    DESCRIPTION = ("Loads an image file as an IMAGE (RGB, 0..1) and its alpha as a MASK "
                   "(1 - alpha, as in ComfyUI; zeros when the image has no alpha). EXIF "
                   "rotation is applied; animated files give one batch entry per frame.")
    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("IMAGE", "MASK")
    OUTPUT_TOOLTIPS = ("The image, float32 [B,H,W,3] in 0..1.",
                       "1 - alpha, float32 [B,H,W]; zeros when the file has no alpha.")
    FUNCTION = "load_image"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("STRING", inp(_IMAGE_NAME_TIP, default="example.png"))}}

    @classmethod
    def VALIDATE_INPUTS(cls, image):
        try:
            context().resolve_image(image)
        except InputError as exc:
            return str(exc)
        return True

    def load_image(self, image: str):
        return load_image_tensors(context().resolve_image(image))


class LoadImageMask:
    NODE_ID = "LoadImageMask"
    DISPLAY_NAME = "Load Image (as Mask)"
    CATEGORY = "mask"
    DESCRIPTION = ("Loads one channel of an image file as a MASK [1,H,W]. For 'alpha' the "
                   "mask is 1 - alpha (ComfyUI's convention: transparent pixels are "
                   "masked); for a colour channel it is the channel value.")
    RETURN_TYPES = ("MASK",)
    RETURN_NAMES = ("MASK",)
    OUTPUT_TOOLTIPS = ("The mask, float32 [1,H,W] in 0..1.",)
    FUNCTION = "load_image"
    CHANNELS = ("alpha", "red", "green", "blue")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("STRING", inp(_IMAGE_NAME_TIP, default="example.png")),
            "channel": (list(cls.CHANNELS), inp("Which channel becomes the mask.")),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, image):
        return LoadImage.VALIDATE_INPUTS(image)

    def load_image(self, image: str, channel: str):
        frame = _to_rgba(_frames(context().resolve_image(image))[0])
        band = np.asarray(frame.getchannel(channel[0].upper()), dtype=np.float32) / 255.0
        mask = 1.0 - band if channel == "alpha" else band
        return (torch.from_numpy(np.ascontiguousarray(mask)).unsqueeze(0),)


class SaveImage:
    NODE_ID = "SaveImage"
    DISPLAY_NAME = "Save Image"
    CATEGORY = "image"
    DESCRIPTION = ("Saves the images as PNG files <prefix>_00001_.png, ... in the output "
                   "folder (--output-dir), numbering after the files already there. The "
                   "workflow is embedded in each PNG, as ComfyUI does.")
    RETURN_TYPES = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True
    SUBFOLDER = ""
    TYPE = "output"
    COMPRESS_LEVEL = 4

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", inp("The images to save.")),
                "filename_prefix": ("STRING", inp(
                    "File name prefix; may include sub-folders of the output folder "
                    "(e.g. edits/cat).", default="ComfyUI")),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    def folder(self) -> Path:
        return Path(context().output_dir) / self.SUBFOLDER

    def save_images(self, images, filename_prefix="ComfyUI", prompt=None, extra_pnginfo=None):
        folder = self.folder()
        paths = save_images(images, folder, filename_prefix, prompt, extra_pnginfo,
                            self.COMPRESS_LEVEL)
        context().written.extend(paths)
        return {"ui": {"images": [self._ui_entry(p) for p in paths]}}

    def _ui_entry(self, path: Path) -> dict:
        # What ComfyUI's frontend gets: file name, sub-folder of the output dir, and type.
        sub = path.parent.relative_to(Path(context().output_dir).resolve()).as_posix()
        return {"filename": path.name, "subfolder": "" if sub == "." else sub, "type": self.TYPE}


class PreviewImage(SaveImage):
    NODE_ID = "PreviewImage"
    DISPLAY_NAME = "Preview Image"
    DESCRIPTION = (f"Writes the images to the '{PREVIEW_SUBFOLDER}' sub-folder of the output "
                   "folder (the headless stand-in for ComfyUI's preview).")
    SUBFOLDER = PREVIEW_SUBFOLDER
    TYPE = "temp"
    COMPRESS_LEVEL = 1

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"images": ("IMAGE", inp("The images to preview."))},
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    def save_images(self, images, prompt=None, extra_pnginfo=None):
        return super().save_images(images, "preview", prompt, extra_pnginfo)


# Not registered with ComfyUI (its own core nodes are used there); the CLI adds these
# to its registry for the ids the pack does not define.
STANDINS: dict[str, type] = {cls.NODE_ID: cls
                             for cls in (LoadImage, LoadImageMask, SaveImage, PreviewImage)}
