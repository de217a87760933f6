"""Standalone equivalents of the ComfyUI core nodes the shipped workflows use.

Used only by the headless runner (``xmgie run``): inside ComfyUI the real core nodes
run, so these classes are NOT in the pack's NODE_CLASS_MAPPINGS. They keep ComfyUI's
ids, input names and tensor conventions (IMAGE float32 [B,H,W,3] in 0..1, MASK [B,H,W],
a loaded mask is 1 - alpha, LATENT ``{"samples": raw VAE latent}`` without the 0.18215
factor) so the same workflow JSON runs in both places.

Models: a workflow may start from core Load Checkpoint and hand its MODEL,
CLIP and VAE to "xMGIE SD Model From ComfyUI". Here :class:`CheckpointLoaderSimple`
reads the SD 1.x, SD 2.x or SDXL file the pack's own loader would (models/checkpoints,
``--tiny``) and gives :class:`mgie_core.models.from_ldm.LDMPart` values: the file's
tensors in the layout ComfyUI's loaded models hold, with their configs (SDXL's CLIP
carries both text encoders, CLIP-L and OpenCLIP-bigG). The bridge node accepts those
as it accepts ComfyUI's objects, and converts both through the same
``from_ldm.sd_from_ldm``. :class:`VAEDecode` / :class:`VAEEncode` run that VAE part
(built once, as a diffusers AutoencoderKL, on the run's device in fp32) in ComfyUI's
convention, so core decoding of the pack's LATENT is checked headless too.
:class:`PreviewAny` prints text as core's Preview Any shows it. :class:`LoraLoader` is
declared so such workflows validate up to it, but REFUSES: the runner applies no LoRAs
(ComfyUI's LoRA key formats and patch maths are ComfyUI's); run those in ComfyUI, or
bypass the LoRA node. SD 1.x, SD 2.x and SDXL single files load here, as in the bridge.

Where files are read from and written to is the runner's :class:`RunContext`, set with
:func:`set_context` (the CLI does) or temporarily with :func:`using_context`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, ImageSequence
from PIL.PngImagePlugin import PngInfo

from ..mgie_core import host, paths
from ..mgie_core import images as images_mod
from ..mgie_core import vae as vae_mod
from ..mgie_core.errors import InputError
from ..mgie_core.models import from_ldm


def inp(tooltip: str, **opts) -> dict:
    """Options of an input, always with a tooltip (the node pack has the same helper;
    the runner keeps its own so it never imports the pack)."""
    return {"tooltip": tooltip, **opts}


PREVIEW_SUBFOLDER = "preview"


# --- runner context ---------------------------------------------------------------------

@dataclasses.dataclass
class RunContext:
    """Folders of one headless run, and the files it wrote."""

    input_dirs: list[Path] = dataclasses.field(default_factory=lambda: [Path("input")])
    output_dir: Path = Path("output")
    workflow_dir: Path | None = None
    written: list[Path] = dataclasses.field(default_factory=list)
    # Longest side of images LoadImage/LoadImageMask give (None: as stored). Set by
    # `xmgie run --tiny`, where the tiny models make any image meaningless anyway.
    max_side: int | None = None
    # One factor for every image of the run (see plan_scale), so images of different
    # sizes stay different; None: each image is fitted to max_side on its own.
    scale: float | None = None
    # (image name, size as given, size as loaded) of every image the limit shrank.
    scaled: list[tuple[str, tuple[int, int], tuple[int, int]]] = \
        dataclasses.field(default_factory=list)
    # Precision of the text encoder Load Checkpoint gives: ComfyUI's default is fp16 on
    # every device (model_management.text_encoder_dtype); --fp32-text-enc as in ComfyUI.
    text_encoder_dtype: torch.dtype = torch.float16

    def image_search_dirs(self) -> list[Path]:
        """Where a relative image name is looked up, in order: the input dirs, the
        workflow's folder, its ``inputs/`` sub-folder (where shipped examples keep their
        images), then the ``inputs/`` folder beside the workflow's folder (so an API
        twin in ``workflows/api/`` finds ``workflows/inputs/``)."""
        dirs = [Path(d) for d in self.input_dirs]
        if self.workflow_dir is not None:
            here = Path(self.workflow_dir)
            dirs += [here, here / "inputs", here.parent / "inputs"]
        return list(dict.fromkeys(dirs))

    def scaling_note(self) -> str:
        """The images the size limit shrank, with their sizes as given ('' if none)."""
        if not self.scaled:
            return ""
        return ("--tiny scaled the loaded images: " + ", ".join(
            f"'{name}' {w}x{h} -> {sw}x{sh}" for name, (w, h), (sw, sh) in self.scaled))

    def resolve_image(self, name: str) -> Path:
        """Path of the image ``name``, which must lie inside one of the search folders.

        As ComfyUI's ``folder_paths.get_annotated_filepath``: a name may end with an
        annotation ``[input]``, ``[output]`` or ``[temp]`` choosing the folder, and a name
        that resolves outside its folder (``../``, an absolute path elsewhere, a symlink
        leading out) is refused. ``--input-dir`` widens the input folders."""
        if not isinstance(name, str) or not name.strip():
            raise InputError("image", f"got {name!r}", "an image file name")
        if "\0" in name:
            raise InputError("image", f"{name!r} holds a NUL character", "an image file name")
        bare, folders = self._annotated(name)
        inside = False
        for folder in folders:
            candidate = Path(os.path.abspath(os.path.join(folder, os.path.expanduser(bare))))
            if not is_within(folder, candidate):
                continue
            inside = True
            if candidate.is_file():
                return candidate
        shown = ", ".join(str(Path(d).resolve()) for d in folders) or "(no folder)"
        if not inside:
            raise InputError("image", f"'{name}' points outside the input folders ({shown})",
                             "a file name inside an input folder (sub-folders allowed)",
                             "Copy the image into the input folder, or add its folder with "
                             "--input-dir.")
        raise InputError("image", f"'{name}' was not found in {shown}",
                         "an image in one of these folders",
                         "Put the image there or pass its folder with --input-dir.")

    def _annotated(self, name: str) -> tuple[str, list[Path]]:
        for suffix, folders in ((" [input]", [Path(d) for d in self.input_dirs]),
                                (" [output]", [Path(self.output_dir)]),
                                (" [temp]", [Path(self.output_dir) / PREVIEW_SUBFOLDER])):
            if name.endswith(suffix):
                return name[:-len(suffix)], folders
        return name, self.image_search_dirs()


def is_within(folder: Path | str, target: Path | str) -> bool:
    """True if ``target`` resolves (symlinks followed) to ``folder`` or a path inside it."""
    try:
        base = os.path.realpath(folder)
        return os.path.commonpath((base, os.path.realpath(target))) == base
    except ValueError:  # another drive on Windows, a NUL byte
        return False


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

@contextlib.contextmanager
def _own_pixel_limit() -> Iterator[None]:
    # PIL's decompression-bomb check (a warning above 89 MP, an error above 179 MP, on
    # open) is replaced by the pack's own, done on each frame's header size below: it
    # has the pack's limit, says how to raise it, and covers all frames together.
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _unreadable(path: Path, exc: BaseException) -> InputError:
    return InputError("image", f"the file {path} could not be read as an image "
                      f"({type(exc).__name__}: {str(exc).strip() or 'no details'})",
                      "a complete PNG, JPEG, WebP, GIF, BMP or TIFF file",
                      "The file may be truncated or damaged: save or download it again.")


def _frames(path: Path) -> list[Image.Image]:
    """The frames of an image file, EXIF-transposed; frames whose size differs from the
    first are dropped (ComfyUI's LoadImage does the same for animated files, and returns
    the others as a batch). The size of each frame is checked against the pixel limit
    (:func:`mgie_core.images.max_pixels`) from the file header, before it is decoded;
    a truncated or damaged file is an error naming it."""
    try:
        with _own_pixel_limit(), Image.open(path) as img:
            frames: list[Image.Image] = []
            first_size = None
            for frame in ImageSequence.Iterator(img):
                w, h = frame.size  # from the header: nothing is decoded yet
                if first_size is not None and (w, h) != first_size:
                    continue
                # This frame and the ones kept before it, together.
                images_mod.check_size(f"image '{path.name}'", w, h, len(frames) + 1)
                first_size = (w, h)
                frame = ImageOps.exif_transpose(frame)
                frames.append(frame.copy())
                if img.format == "MPO":  # multi-picture JPEGs: the first picture only
                    break
    except InputError:
        raise
    except Exception as exc:  # truncated, not an image, broken EXIF...
        raise _unreadable(path, exc) from exc
    if not frames:
        raise _unreadable(path, ValueError("no frame"))
    return frames


def _to_rgba(frame: Image.Image) -> Image.Image:
    # 16/32-bit greyscale ("I" modes) are scaled to 8 bits before the colour conversion.
    if frame.mode.startswith("I"):
        arr = np.asarray(frame, dtype=np.float64)
        frame = Image.fromarray(np.clip(arr / 257.0, 0, 255).astype(np.uint8), "L")
    return frame.convert("RGBA")


IMAGE_NODES = ("LoadImage", "LoadImageMask")


def plan_scale(prompt: dict) -> float | None:
    """Fix the context's one image scale for a run: the factor that brings the largest
    image the prompt's LoadImage/LoadImageMask nodes name to ``max_side``, read from the
    file headers (nothing is decoded). One factor keeps different sizes different, so a
    node comparing a mask with its photo sees what the files as given would show. Names
    that do not resolve are left to the node's own error."""
    ctx = context()
    if not ctx.max_side:
        return None
    longest = 0
    for node in prompt.values():
        name = (node.get("inputs") or {}).get("image")
        if node.get("class_type") not in IMAGE_NODES or not isinstance(name, str):
            continue
        try:
            with _own_pixel_limit(), Image.open(ctx.resolve_image(name)) as img:
                longest = max(longest, *img.size)
        except Exception:  # missing or unreadable: the node says so when it runs
            continue
    ctx.scale = min(1.0, ctx.max_side / longest) if longest else None
    return ctx.scale


def _downscale(frame: Image.Image, name: str) -> Image.Image:
    """The frame shrunk by the context's scale (or, without one, so its longer side is
    at most ``max_side``), each side a multiple of 8 as SD's VAE needs; unchanged when no
    limit is set or the frame is already small enough.

    Rounding to multiples of 8 could give two images of different sizes the same size,
    which would let a mismatched mask pass; that is refused, naming both files."""
    ctx = context()
    w, h = frame.size
    if not ctx.max_side:
        return frame
    scale = ctx.scale if ctx.scale is not None else ctx.max_side / max(w, h)
    if scale >= 1.0:
        return frame
    size = (max(8, round(w * scale / 8) * 8), max(8, round(h * scale / 8) * 8))
    for other, given, loaded in ctx.scaled:
        if loaded == size and given != (w, h):
            raise InputError(
                "image", f"'{name}' is {w}x{h} and '{other}' is {given[0]}x{given[1]}; "
                f"--tiny would load both at {size[0]}x{size[1]} and hide the difference",
                "images of the same size where a workflow pairs them (a mask and its "
                "photo)", "Resize one to the other, or run without --tiny.")
    if (name, (w, h), size) not in ctx.scaled:  # once per file, not per frame
        ctx.scaled.append((name, (w, h), size))
    return frame.resize(size, Image.Resampling.LANCZOS)


def _has_alpha(frame: Image.Image) -> bool:
    # An alpha band, or a palette/colour key transparency (PNG tRNS) PIL turns into one.
    return "A" in frame.getbands() or "transparency" in frame.info


def load_image_tensors(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """IMAGE [B,H,W,3] and MASK [B,H,W] (1 - alpha; zeros without alpha) of a file."""
    images, masks = [], []
    for frame in _frames(path):
        rgba = np.asarray(_downscale(_to_rgba(frame), path.name), dtype=np.float32) / 255.0
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


def _expand(prefix: str, width: int, height: int) -> str:
    """ComfyUI's prefix variables (folder_paths.get_save_image_path): %width%,
    %height%, %year%, %month%, %day%, %hour%, %minute%, %second% (local time)."""
    if "%" not in prefix:
        return prefix
    now = time.localtime()
    for key, value in (("%width%", str(width)), ("%height%", str(height)),
                       ("%year%", str(now.tm_year)), ("%month%", f"{now.tm_mon:02d}"),
                       ("%day%", f"{now.tm_mday:02d}"), ("%hour%", f"{now.tm_hour:02d}"),
                       ("%minute%", f"{now.tm_min:02d}"), ("%second%", f"{now.tm_sec:02d}")):
        prefix = prefix.replace(key, value)
    return prefix


def split_prefix(folder: Path, filename_prefix: str, width: int = 0,
                 height: int = 0) -> tuple[Path, str]:
    """(folder to write in, file name stem) for a prefix, as ComfyUI's
    ``get_save_image_path``: variables expanded, the prefix normalised, its directory
    part a sub-folder of ``folder`` (never outside it), its last part the stem. So ""
    and "." give the stem "." inside the output folder, like ComfyUI."""
    if not isinstance(filename_prefix, str) or "\0" in filename_prefix:
        raise InputError("filename_prefix", f"got {filename_prefix!r}", "a file name prefix")
    prefix = _expand(filename_prefix, width, height)
    normal = os.path.normpath(prefix)
    sub, stem = os.path.dirname(normal), os.path.basename(normal)
    target = Path(os.path.join(folder, sub))
    if not is_within(folder, target) or not stem:
        raise InputError("filename_prefix", f"'{filename_prefix}' points outside the output "
                         f"folder {Path(folder).resolve()}", "a name or a sub-folder path "
                         "inside it (e.g. edits/cat)")
    return target, stem


def _next_counter(folder: Path, stem: str) -> int:
    """ComfyUI's file numbering: one past the highest number N of the files named
    ``<stem>_N...`` there (the counter of ``<stem>_00007_.png`` is 7)."""
    highest = 0
    if folder.is_dir():
        head = os.path.normcase(stem + "_")
        for entry in os.listdir(folder):
            if os.path.normcase(entry[:len(head)]) != head:
                continue
            digits = entry[len(head):].split(".")[0].split("_")[0]
            if digits.isdigit():
                highest = max(highest, int(digits))
    return highest + 1


def _png_info(prompt: dict | None, extra_pnginfo: dict | None) -> PngInfo:
    # ComfyUI embeds the prompt and the UI workflow so the PNG can be dropped back in.
    info = PngInfo()
    if prompt is not None:
        info.add_text("prompt", json.dumps(prompt))
    for key, value in (extra_pnginfo or {}).items():
        info.add_text(key, json.dumps(value))
    return info


# A file name taken by another process is retried with the next number; this many at most.
MAX_NAME_TRIES = 10000


def _write_new(folder: Path, name_of, counter: int, write) -> tuple[Path, int]:
    """Write a file under the first free name ``name_of(counter)``, counting up.

    The data goes to a hidden temporary file first, which is then hard-linked to the
    final name: the link fails if the name exists (exclusive creation, so two saves at
    the same moment never overwrite each other: the loser takes the next number), and
    the final name only ever appears complete (an interruption or a crash during the
    write leaves no partial PNG). Where hard links are unsupported the name is reserved
    with an exclusive open (an empty file under the final name for the instant before)
    and the complete temporary file renamed over it."""
    tmp = folder / f".{name_of(counter)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "xb") as fh:
            write(fh)
        for _ in range(MAX_NAME_TRIES):
            final = folder / name_of(counter)
            try:
                os.link(tmp, final)
                return final, counter
            except FileExistsError:
                counter += 1
            except OSError:  # no hard links here (some network or FAT file systems)
                try:
                    with open(final, "xb"):
                        pass
                except FileExistsError:
                    counter += 1
                    continue
                os.replace(tmp, final)
                return final, counter
        raise InputError("filename_prefix", f"no free file name after {MAX_NAME_TRIES} tries "
                         f"in {folder}", "a prefix with free numbers", "Use another prefix.")
    finally:
        if tmp.exists():
            tmp.unlink()


def check_save_images(images, name: str = "images") -> torch.Tensor:
    """The batch to save: [B,H,W,C] (or [H,W,C]) with C = 1, 3 or 4, finite, in 0..1."""
    if not isinstance(images, torch.Tensor):
        raise InputError(name, f"got {type(images).__name__}", "an IMAGE tensor [B,H,W,C]")
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4) or images.shape[0] == 0:
        raise InputError(name, f"has shape {tuple(images.shape)}", "an IMAGE [B,H,W,C] with "
                         "1, 3 or 4 channels")
    images_mod.check_pixels(name, images)
    return images


def save_images(images: torch.Tensor, folder: Path, filename_prefix: str,
                prompt: dict | None = None, extra_pnginfo: dict | None = None,
                compress_level: int = 4) -> list[Path]:
    """Write a batch as ``<prefix>_00001_.png``, ... under ``folder``; returns the paths.

    The prefix follows ComfyUI (:func:`split_prefix`: sub-folders, %year%-style
    variables, %batch_num%); it may not leave ``folder``. Every image is checked
    (finite, 0..1) before the first file is written, and each file is created
    exclusively and atomically (:func:`_write_new`)."""
    images = check_save_images(images)
    folder = Path(folder).resolve()
    target, stem = split_prefix(folder, filename_prefix, int(images.shape[2]),
                                int(images.shape[1]))
    target.mkdir(parents=True, exist_ok=True)
    counter = _next_counter(target, stem)
    info = _png_info(prompt, extra_pnginfo)
    pils = [image_to_pil(image) for image in images]
    written = []
    for batch_number, pil in enumerate(pils):
        base = stem.replace("%batch_num%", str(batch_number))

        def write(fh, pil=pil):
            pil.save(fh, format="PNG", pnginfo=info, compress_level=compress_level)

        path, counter = _write_new(target, lambda c, base=base: f"{base}_{c:05d}_.png",
                                   counter, write)
        written.append(path)
        counter += 1
    return written


# --- nodes ------------------------------------------------------------------------------

_IMAGE_NAME_TIP = ("Image file name (sub-folders allowed), looked up in the input folders "
                   "(--input-dir, default ./input), then the workflow's folder, then its "
                   "inputs/ sub-folder; it may not point outside them. 'name [output]' "
                   "reads from the output folder, as in ComfyUI. Images above the pixel "
                   "limit (XMGIE_MAX_IMAGE_PIXELS, default 4096x4096) are refused.")


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
        # image_upload as in ComfyUI's LoadImage: the frontend adds an upload widget,
        # which the UI writer (runner/workflow_ui.py) reproduces.
        return {"required": {"image": ("STRING", inp(_IMAGE_NAME_TIP, default="example.png",
                                                     image_upload=True))}}

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
            "image": ("STRING", inp(_IMAGE_NAME_TIP, default="example.png",
                                    image_upload=True)),
            "channel": (list(cls.CHANNELS), inp("Which channel becomes the mask.")),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, image):
        return LoadImage.VALIDATE_INPUTS(image)

    def load_image(self, image: str, channel: str):
        path = context().resolve_image(image)
        frame = _downscale(_to_rgba(_frames(path)[0]), path.name)
        band = np.asarray(frame.getchannel(channel[0].upper()), dtype=np.float32) / 255.0
        mask = 1.0 - band if channel == "alpha" else band
        return (torch.from_numpy(np.ascontiguousarray(mask)).unsqueeze(0),)


class SaveImage:
    NODE_ID = "SaveImage"
    DISPLAY_NAME = "Save Image"
    CATEGORY = "image"
    DESCRIPTION = ("Saves the images as PNG files <prefix>_00001_.png, ... in the output "
                   "folder (--output-dir), numbering after the files already there. The "
                   "workflow is embedded in each PNG, as ComfyUI does. Images with NaN/Inf "
                   "or values outside 0..1 are refused before anything is written; each file "
                   "is created under a free name only when complete, so concurrent saves "
                   "never overwrite each other and an interrupted save leaves no file.")
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
                    "(e.g. edits/cat) and ComfyUI's variables %year%, %month%, %day%, "
                    "%hour%, %minute%, %second%, %width%, %height%, %batch_num%.",
                    default="ComfyUI")),
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


class CheckpointLoaderSimple:
    NODE_ID = "CheckpointLoaderSimple"
    DISPLAY_NAME = "Load Checkpoint"
    CATEGORY = "loaders"
    DESCRIPTION = ("Reads an SD 1.x, SD 2.x or SDXL single-file checkpoint "
                   "(models/checkpoints; --tiny: the tiny model of the family the name says) "
                   "as its MODEL, CLIP and VAE, for xMGIE SD Model From ComfyUI and the VAE "
                   "Decode/Encode stand-ins. Headless runner only: in ComfyUI the core node "
                   "loads any family it knows.")
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    RETURN_NAMES = ("MODEL", "CLIP", "VAE")
    OUTPUT_TOOLTIPS = ("The UNet (LDM layout tensors).",
                       "The CLIP text encoder(s) and tokenizer(s) (SDXL: CLIP-L and "
                       "OpenCLIP-bigG).", "The VAE.")
    FUNCTION = "load_checkpoint"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ckpt_name": (paths.list_models(paths.SD_CHECKPOINT), inp(
            "SD 1.x, SD 2.x or SDXL checkpoint file in models/checkpoints (--models-dir).")),
        }}

    def load_checkpoint(self, ckpt_name: str):
        """The file's UNet, CLIP and VAE tensors in the precisions ComfyUI's own Load
        Checkpoint gives them, whatever the file stores, so the bridge node sees what it
        sees inside ComfyUI: the UNet in ComfyUI's weight dtype for the run's device
        (``unet_weight_dtype``), CLIP (both SDXL encoders) in the run's text-encoder
        precision (fp16 unless --fp32-text-enc)."""
        unet, text, vae = from_ldm.read_ldm_checkpoint(ckpt_name)
        _cast_floats(unet, unet_weight_dtype(host.device()))
        for part in (text, text.second):
            if part is not None:
                _cast_floats(part, context().text_encoder_dtype)
        return unet, text, vae


def unet_weight_dtype(device: torch.device) -> torch.dtype:
    """ComfyUI's weight dtype for an SD UNet (model_management.unet_dtype): fp16 on a
    CUDA GPU, fp32 elsewhere (on the CPU an fp16 file is loaded as fp32: half-precision
    matrix products are slow there, and ComfyUI never runs them)."""
    return torch.float16 if device.type == "cuda" else torch.float32


def _cast_floats(part: from_ldm.LDMPart, dtype: torch.dtype | None) -> None:
    """The part's floating-point tensors in ``dtype`` (None: as stored)."""
    if dtype is not None:
        part.state = {k: v.to(dtype) if v.is_floating_point() else v
                      for k, v in part.state.items()}


def _vae_part(vae) -> from_ldm.LDMPart:
    if not isinstance(vae, from_ldm.LDMPart) or vae.kind != from_ldm.VAE:
        got = vae.kind if isinstance(vae, from_ldm.LDMPart) else type(vae).__name__
        raise InputError("vae", f"got {got}", "the VAE output of Load Checkpoint")
    return vae


def _vae_on_device(vae):
    """The part's VAE module in fp32 on the run's device (ComfyUI on the CPU decodes in
    fp32 too); built once per part and device."""
    device = host.device()
    key = ("module", str(device))
    if key not in vae.cache:
        module = from_ldm.vae_module(vae).to(device=device)
        if next(module.parameters()).dtype != torch.float32:  # diffusers warns on a no-op cast
            module = module.to(dtype=torch.float32)
        vae.cache[key] = module
    return vae.cache[key], device


class VAEDecode:
    NODE_ID = "VAEDecode"
    DISPLAY_NAME = "VAE Decode"
    CATEGORY = "latent"
    DESCRIPTION = ("Decodes a LATENT (raw VAE latents, ComfyUI's convention) into an IMAGE "
                   "with a VAE from Load Checkpoint.")
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The decoded image.",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples": ("LATENT", inp("The latent to be decoded.")),
            "vae": ("VAE", inp("The VAE model used for decoding the latent.")),
        }}

    def decode(self, vae, samples):
        module, device = _vae_on_device(_vae_part(vae))
        z = vae_mod.comfy_latent_samples("samples", samples, module.config.latent_channels)
        return (vae_mod.decode_with(module, z, device, torch.float32, "samples",
                                    scaled=False),)


class VAEEncode:
    NODE_ID = "VAEEncode"
    DISPLAY_NAME = "VAE Encode"
    CATEGORY = "latent"
    DESCRIPTION = ("Encodes an IMAGE into a LATENT: the posterior mode, without the "
                   "scaling factor; sides that are not multiples of 8 are centre-cropped, as "
                   "ComfyUI does.")
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "pixels": ("IMAGE", inp("The image to encode.")),
            "vae": ("VAE", inp("The VAE model used for encoding.")),
        }}

    def encode(self, vae, pixels):
        module, device = _vae_on_device(_vae_part(vae))
        pixels = images_mod.check_image("pixels", pixels)
        f = vae_mod.vae_scale_of(module)
        h, w = pixels.shape[1] // f * f, pixels.shape[2] // f * f
        if h == 0 or w == 0:
            raise InputError("pixels", f"is {pixels.shape[2]}x{pixels.shape[1]}",
                             f"an image of at least {f}x{f} pixels")
        top, left = (pixels.shape[1] % f) // 2, (pixels.shape[2] % f) // 2
        pixels = pixels[:, top:top + h, left:left + w, :3]
        raw = vae_mod.encode_with(module, pixels, device, torch.float32, "pixels",
                                  scaled=False)
        return ({"samples": raw.samples},)


class PreviewAny:
    NODE_ID = "PreviewAny"
    DISPLAY_NAME = "Preview Any"
    CATEGORY = "utils"
    DESCRIPTION = ("Shows any value as text (strings as they are, numbers with str, other "
                   "values as JSON), as core Preview Any does; the runner prints it.")
    RETURN_TYPES = ()
    FUNCTION = "main"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"source": ("*", inp("The value to show."))}}

    def main(self, source=None):
        if isinstance(source, str):
            value = source
        elif isinstance(source, (int, float, bool)):
            value = str(source)
        elif source is None:
            value = "None"
        else:
            try:
                value = json.dumps(source)
            except (TypeError, ValueError):
                value = str(source)
        return {"ui": {"text": (value,)}}


_NO_LORA = ("the headless runner does not apply LoRAs (ComfyUI's LoRA formats and patching "
            "are ComfyUI's own)")


class LoraLoader:
    NODE_ID = "LoraLoader"
    DISPLAY_NAME = "Load LoRA"
    CATEGORY = "loaders"
    DESCRIPTION = ("Declared so workflows with a LoRA validate up to it; refuses to run: "
                   f"{_NO_LORA}. Run the workflow in ComfyUI, or bypass this node.")
    RETURN_TYPES = ("MODEL", "CLIP")
    FUNCTION = "load_lora"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", inp("The diffusion model the LoRA will be applied to.")),
            "clip": ("CLIP", inp("The CLIP model the LoRA will be applied to.")),
            "lora_name": ("STRING", inp("The name of the LoRA.")),
            "strength_model": ("FLOAT", inp("How strongly to modify the diffusion model.",
                                            default=1.0, min=-100.0, max=100.0, step=0.01)),
            "strength_clip": ("FLOAT", inp("How strongly to modify the CLIP model.",
                                           default=1.0, min=-100.0, max=100.0, step=0.01)),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, lora_name):
        return (f"LoRA '{lora_name}': {_NO_LORA}. Run this workflow in ComfyUI, or bypass "
                "the LoRA node (mode 4: its outputs become the checkpoint's).")

    def load_lora(self, model, clip, lora_name, strength_model, strength_clip):
        raise InputError("lora_name", f"'{lora_name}': {_NO_LORA}", "no LoRA node in a "
                         "headless run", "Run this workflow in ComfyUI, or bypass the node.")


# Not registered with ComfyUI (its own core nodes are used there); the CLI adds these
# to its registry for the ids the pack does not define.
STANDINS: dict[str, type] = {cls.NODE_ID: cls for cls in (
    LoadImage, LoadImageMask, SaveImage, PreviewImage, CheckpointLoaderSimple, VAEDecode,
    VAEEncode, PreviewAny, LoraLoader)}
