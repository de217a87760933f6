"""Paired edits for training: every dataset layout becomes one list of checked pairs.

A pair is a photo, its ground-truth edit, an optional mask of the edited region and the
texts (instruction, source and target prompts, an expressive instruction).
:func:`load_pairs` reads one of these layouts and checks *every* pair before training
starts, so a bad dataset fails in seconds with a message naming the pair and the file,
never hours into a run and never after a checkpoint was written:

* ``"manifest"`` -- a batch manifest (``runner.dataset``: ``manifest.jsonl`` or
  ``manifest.json``) whose items also have a ``target`` image (the edit) and optionally
  ``mask`` and ``expressive_instruction``; ``python -m xmgie.training.synthetic DIR``
  writes one;
* ``"ip2p"`` -- InstructPix2Pix's released folders: ``seeds.json`` (a list of
  ``[folder, [seed, ...]]``) and per folder a ``prompt.json`` (``input``, ``edit`` and
  ``output``: the input caption, the instruction, the output caption) with the pairs
  ``<seed>_0.jpg`` (photo) and ``<seed>_1.jpg`` (edit). Every seed is one pair. Without
  ``seeds.json`` the folders holding a ``prompt.json`` are scanned. ``split`` "train",
  "val" or "test" takes InstructPix2Pix's own 90/5/5 % cut of ``seeds.json``;
* ``"magicbrush"`` -- MagicBrush's released folders: ``edit_sessions.json`` (``{img_id:
  [{"input", "output", "mask", "instruction"}, ...]}``, one entry per turn) and
  ``images/<img_id>/<img_id>-input.png``, ``-output<k>.png``, ``-mask<k>.png``; the
  optional ``global_descriptions.json`` (``{img_id: {file: caption}}``) gives the prompts.
  ``split`` picks a sub-folder (``train``, ``dev``, ``test``) when the folder holds several;
* ``"hf"`` -- a local Hugging Face ``datasets`` folder: one written by ``save_to_disk``
  (arrow) or parquet files (a file, or a folder searched recursively, e.g. a Hub snapshot's
  ``data/train-00000-of-00004.parquet``). Columns are found by name (InstructPix2Pix's
  ``input_image``/``original_image``, ``edited_image``, ``edit_prompt``; MagicBrush's
  ``source_img``, ``target_img``, ``mask_img``, ``instruction``) or given by ``columns``
  (``{"source": "before", "target": "after", "instruction": "text"}``). ``split`` picks a
  split of a saved ``DatasetDict`` or of the parquet files (default ``train``). Needs the
  ``datasets`` package (``pip install "xmgie[train]"``). Only local paths are read: a Hub
  id is refused, nothing is ever downloaded.

``"auto"`` (the default) recognises the layout from the files in the folder.

Images: any mode PIL reads is converted to RGB (an alpha channel is dropped, grayscale is
repeated over the three channels, EXIF orientation applied, as ComfyUI's LoadImage does);
each is resized so that its shorter side is ``resolution`` and centre-cropped to a square
(bicubic), then given as float32 ``[3, R, R]`` in 0..1. Masks: white marks the edited
region; a mask with transparency marks it by its transparent pixels instead (DALL-E 2's and
MagicBrush's convention). They are resized the same way with nearest-neighbour sampling and
thresholded at 0.5, giving float32 ``[1, R, R]`` in {0, 1}. A pair without a mask gets an
all-ones mask and ``has_mask`` False. A full mask is accepted (a whole-image edit, such as a
style change); an empty one is an error, since it would say the edit changed nothing.

Checks in :func:`load_pairs` (each a :class:`TrainDataError` naming the pair and the file):
missing or unreadable image files, a target or mask whose size differs from the photo's
(both sizes named), a photo above the pack's pixel limit (``XMGIE_MAX_IMAGE_PIXELS``, as
for every image the pack reads), an all-black mask, a pair without text, repeated ids, an
empty dataset, an unknown format, and missing or unknown columns. Sizes come from the file
headers and only masks are decoded there, so checking stays fast on large datasets; the
photos' pixels are decoded when a pair is first used, and a file truncated past its header
fails then, with the same kind of error naming the pair and the file.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..mgie_core.images import ENV_MAX_PIXELS, max_pixels
from ..runner.dataset import DatasetError, load_dataset, safe_id

FORMATS = ("auto", "manifest", "ip2p", "magicbrush", "hf")
INSTALL_TRAIN = 'pip install "xmgie[train]"'
TEXT_FIELDS = ("instruction", "source_prompt", "target_prompt", "expressive_instruction")
# Roles a Hugging Face column can play, and the column names looked for by default, in
# order: InstructPix2Pix's (diffusers' example data set and the CLIP-filtered release),
# MagicBrush's, then generic names.
HF_ROLES: dict[str, tuple[str, ...]] = {
    "source": ("input_image", "original_image", "source_img", "source_image", "source"),
    "target": ("edited_image", "target_img", "target_image", "output_image", "target"),
    "instruction": ("edit_prompt", "instruction", "edit"),
    "mask": ("mask_img", "mask_image", "mask"),
    "source_prompt": ("original_prompt", "input_prompt", "source_prompt", "input"),
    "target_prompt": ("edited_prompt", "output_prompt", "target_prompt", "output"),
    "expressive_instruction": ("expressive_instruction",),
    "id": ("id",),
}
HF_REQUIRED = ("source", "target", "instruction")
HF_SPLITS = ("train", "validation", "val", "dev", "test")
IP2P_SPLITS = {"train": (0.0, 0.9), "val": (0.9, 0.95), "test": (0.95, 1.0)}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# A URL or hf:// address, also after Path() has folded its "//" into "/".
_REMOTE = re.compile(r"^(hf|https?|s3|gs):/", re.IGNORECASE)
_EXIF_ORIENTATION = 0x0112


class TrainDataError(DatasetError):
    """A training dataset cannot be used: says which pair and file, what was expected and
    how to fix it. Raised by :func:`load_pairs` before any training starts."""


# --- where an image comes from --------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImageRef:
    """One image of a pair: a file (``path``), or encoded bytes fetched on demand
    (``fetch``, e.g. a cell of a Hugging Face dataset). ``label`` names it in errors."""

    label: str
    path: Path | None = None
    fetch: Callable[[], bytes] | None = None

    def open(self) -> Image.Image:
        """The image, opened lazily (only its header is read until its pixels are)."""
        try:
            if self.path is not None:
                return Image.open(self.path)
            assert self.fetch is not None
            return Image.open(io.BytesIO(self.fetch()))
        except FileNotFoundError:
            raise TrainDataError(f"{self.label} does not exist") from None
        except Image.DecompressionBombError as exc:
            raise TrainDataError(f"{self.label} is too large to open safely ({exc})") from None
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise TrainDataError(f"{self.label} is not an image PIL can read ({exc})") from None


def _file(path: Path) -> ImageRef:
    return ImageRef(label=str(path), path=path)


class _Cell:
    """A picklable fetcher of one image cell of a ``datasets.Dataset`` (decode off)."""

    def __init__(self, column_data: Any, column: str, row: int, base: Path):
        # column_data: the dataset narrowed to this one column, so a fetch reads one cell.
        self.data, self.column, self.row, self.base = column_data, column, row, base

    def __call__(self) -> bytes:
        return _cell_bytes(self.data[self.row][self.column], self.base)


def _cell_bytes(value: Any, base: Path) -> bytes:
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        if value.get("path"):
            return _resolve(base, value["path"]).read_bytes()
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        return _resolve(base, value).read_bytes()
    if isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return buffer.getvalue()
    raise TrainDataError(f"an image cell holds {type(value).__name__}; expected an image, "
                         "its bytes or its path")


def _empty_cell(value: Any) -> bool:
    """A cell that holds no image (a pair without a mask in a column that has some)."""
    if isinstance(value, dict):
        return not value.get("bytes") and not value.get("path")
    return value is None or value == ""


def _resolve(base: Path, name: str) -> Path:
    p = Path(name).expanduser()
    return p if p.is_absolute() else base / p


# --- pairs ----------------------------------------------------------------------------


@dataclasses.dataclass
class Pair:
    """One edit pair before decoding: where its images are, and its texts."""

    id: str
    source: ImageRef
    target: ImageRef
    mask: ImageRef | None = None
    instruction: str = ""
    source_prompt: str = ""
    target_prompt: str = ""
    expressive_instruction: str = ""
    edit_words: list[str] = dataclasses.field(default_factory=list)


class PairDataset(torch.utils.data.Dataset):
    """Checked pairs (from :func:`load_pairs`), decoded and resized on access.

    ``dataset[i]`` is one item: ``source``, ``target`` float32 [3,R,R] in 0..1, ``mask``
    float32 [1,R,R] in {0,1}, ``has_mask`` bool, the texts of :data:`TEXT_FIELDS`,
    ``edit_words`` (list of str) and ``id``. :func:`collate` makes a batch of items."""

    def __init__(self, pairs: Sequence[Pair], resolution: int = 64, *, origin: str = "",
                 format: str = ""):
        self.pairs = list(pairs)
        self.resolution = int(resolution)
        self.origin = origin          # the path it was read from, for messages
        self.format = format

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        pair = self.pairs[index]
        res = self.resolution
        source = _rgb_tensor(pair.source, res, pair.id, "source")
        target = _rgb_tensor(pair.target, res, pair.id, "target")
        if pair.mask is not None:
            mask = torch.from_numpy(_mask_array(pair.mask, res, pair.id))[None]
        else:
            mask = torch.ones(1, res, res, dtype=torch.float32)
        return {"source": source, "target": target, "mask": mask,
                "has_mask": pair.mask is not None,
                "instruction": pair.instruction, "source_prompt": pair.source_prompt,
                "target_prompt": pair.target_prompt,
                "expressive_instruction": pair.expressive_instruction,
                "edit_words": list(pair.edit_words), "id": pair.id}

    def subset(self, indices: Sequence[int]) -> PairDataset:
        """The pairs at ``indices`` (same resolution and origin)."""
        return PairDataset([self.pairs[i] for i in indices], self.resolution,
                           origin=self.origin, format=self.format)

    def __repr__(self) -> str:
        return (f"PairDataset({len(self)} pairs, {self.resolution}px, format={self.format!r}, "
                f"origin={self.origin!r})")


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A batch (the format of :mod:`.task`) from items of :class:`PairDataset`: tensors
    stacked, ``has_mask`` a bool tensor [B], texts and ids as lists of str."""
    if not items:
        raise TrainDataError("collate got no items; a batch needs at least one pair")
    shapes = {tuple(item["source"].shape) for item in items}
    if len(shapes) > 1:
        raise TrainDataError(f"collate got items of different sizes {sorted(shapes)}; every "
                             "pair of a batch must come from datasets of one resolution")
    batch: dict[str, Any] = {
        "source": torch.stack([item["source"] for item in items]),
        "target": torch.stack([item["target"] for item in items]),
        "mask": torch.stack([item["mask"] for item in items]),
        "has_mask": torch.tensor([bool(item["has_mask"]) for item in items], dtype=torch.bool),
    }
    for key in TEXT_FIELDS + ("id",):
        batch[key] = [str(item.get(key, "") or "") for item in items]
    batch["edit_words"] = [list(item.get("edit_words", []) or []) for item in items]
    return batch


def split_validation(dataset: torch.utils.data.Dataset, fraction: float, seed: int = 0
                     ) -> tuple[Any, Any]:
    """(train, val): a seeded random ``fraction`` of the pairs held out for validation
    (at least one pair when ``fraction`` > 0; none when it is 0). The same seed gives the
    same split in every process. Both keep the dataset's order. A :class:`PairDataset`
    gives two PairDatasets; any other map-style dataset two ``torch.utils.data.Subset``."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) \
            or not 0.0 <= fraction < 1.0 or math.isnan(fraction):
        raise TrainDataError(f"validation fraction {fraction!r}; expected a number in [0, 1), "
                             "e.g. 0.1 to hold out a tenth of the pairs")
    n = len(dataset)
    n_val = 0 if fraction == 0 else max(1, int(round(n * fraction)))
    if n - n_val < 1:
        origin = getattr(dataset, "origin", "") or ""
        raise TrainDataError(f"dataset {origin} has {n} pair(s): holding out "
                             f"{n_val} for validation (fraction {fraction}) leaves none to "
                             "train on; add pairs, lower data.val_fraction, or give a "
                             "separate data.val_path")
    order = np.random.default_rng(int(seed)).permutation(n)
    val = sorted(int(i) for i in order[:n_val])
    held = set(val)
    train = [i for i in range(n) if i not in held]
    if isinstance(dataset, PairDataset):
        return dataset.subset(train), dataset.subset(val)
    return torch.utils.data.Subset(dataset, train), torch.utils.data.Subset(dataset, val)


# --- decoding -------------------------------------------------------------------------


def _oriented_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) after EXIF orientation (read from the header only)."""
    w, h = image.size
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # a broken EXIF block: the pixels are still usable
        orientation = 1
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _square(image: Image.Image, res: int, resample: Image.Resampling) -> Image.Image:
    """Shorter side to ``res``, centre-cropped to ``res`` x ``res``, in one resampling
    (the crop box is taken in source pixels, so nothing is resampled twice)."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    return image.resize((res, res), resample, box=(left, top, left + side, top + side))


def _decode(ref: ImageRef, pair_id: str, role: str) -> Image.Image:
    try:
        image = ref.open()
        image = ImageOps.exif_transpose(image)
        image.load()
        return image
    except TrainDataError as exc:
        raise TrainDataError(f"pair '{pair_id}': the {role} image: {exc}") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise TrainDataError(f"pair '{pair_id}': the {role} image {ref.label} cannot be "
                             f"decoded ({exc}); re-export or remove it") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: PIL's own conversion clips at 255 instead of scaling.
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or arr.max() > 255 else 255.0
        image = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def _rgb_tensor(ref: ImageRef, res: int, pair_id: str, role: str) -> torch.Tensor:
    image = _square(_to_rgb(_decode(ref, pair_id, role)), res, Image.Resampling.BICUBIC)
    arr = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def _mask_gray(image: Image.Image) -> Image.Image:
    """The mask as 8-bit gray, 255 = edited. Transparency, where a mask has any, marks
    the edited region (DALL-E 2 / MagicBrush); otherwise the luminance does."""
    if "A" in image.getbands() or "transparency" in image.info:
        alpha = image.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] < 255:
            return ImageOps.invert(alpha)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _to_rgb(image).convert("L")
    return image.convert("L")


def _mask_array(ref: ImageRef, res: int, pair_id: str,
                gray: Image.Image | None = None) -> np.ndarray:
    """float32 [R, R] in {0, 1}: nearest-neighbour resize, then the 0.5 threshold."""
    if gray is None:
        gray = _mask_gray(_decode(ref, pair_id, "mask"))
    small = _square(gray, res, Image.Resampling.NEAREST)
    return (np.asarray(small) >= 128).astype(np.float32)


# --- checks ---------------------------------------------------------------------------


def _check_pairs(pairs: list[Pair], resolution: int, origin: str, fmt: str) -> None:
    if not pairs:
        raise TrainDataError(f"dataset {origin} ({fmt}) has no pairs; expected at least one "
                             "photo with its edit. `python -m xmgie.training.synthetic DIR` "
                             "writes a small example dataset")
    seen: dict[str, int] = {}
    for index, pair in enumerate(pairs):
        if pair.id in seen:
            raise TrainDataError(f"dataset {origin}: pairs {seen[pair.id] + 1} and {index + 1} "
                                 f"have the same id '{pair.id}'; ids must be unique")
        seen[pair.id] = index
        if not (pair.instruction.strip() or pair.target_prompt.strip()):
            raise TrainDataError(f"dataset {origin}: pair '{pair.id}' has no text; expected an "
                                 "instruction (\"make the sky pink\") or a target prompt")
        sizes = {}
        for role in ("source", "target", "mask"):
            ref = getattr(pair, role)
            if ref is None:
                continue
            try:
                with ref.open() as image:
                    sizes[role] = _oriented_size(image)
            except TrainDataError as exc:
                raise TrainDataError(f"dataset {origin}: pair '{pair.id}': the {role} image "
                                     f"{exc}") from None
        w, h = sizes["source"]
        if w * h > max_pixels():
            raise TrainDataError(
                f"dataset {origin}: pair '{pair.id}': the source {pair.source.label} is "
                f"{w}x{h}, above the pack's limit of {max_pixels()} pixels; shrink it (it is "
                f"resized to {resolution}x{resolution} anyway) or raise {ENV_MAX_PIXELS}")
        for role in ("target", "mask"):
            if role in sizes and sizes[role] != sizes["source"]:
                (sw, sh), (ow, oh) = sizes["source"], sizes[role]
                other = getattr(pair, role).label
                raise TrainDataError(
                    f"dataset {origin}: pair '{pair.id}': the {role} is {ow}x{oh} "
                    f"({other}) but the source is {sw}x{sh} ({pair.source.label}); a pair's "
                    f"photo, edit and mask must have the same size; resize the {role} to "
                    f"{sw}x{sh} or drop the pair")
        if pair.mask is not None:
            gray = _mask_gray(_decode(pair.mask, pair.id, "mask"))
            if gray.getextrema()[1] < 128:
                raise TrainDataError(
                    f"dataset {origin}: pair '{pair.id}': the mask {pair.mask.label} is all "
                    "black (it marks no edited region); white marks the edited region; fix "
                    "the mask or leave it out (no mask: the whole image may change)")
            if not _mask_array(pair.mask, resolution, pair.id, gray).any():
                raise TrainDataError(
                    f"dataset {origin}: pair '{pair.id}': the edited region of mask "
                    f"{pair.mask.label} vanishes at resolution {resolution}; train at a "
                    "higher resolution or leave the mask out")


# --- layouts --------------------------------------------------------------------------


def load_pairs(path: Path | str, *, resolution: int = 64, format: str = "auto",
               columns: dict[str, str] | None = None, split: str | None = None
               ) -> PairDataset:
    """Read and check a paired dataset (layouts and checks: see the module docstring).

    ``path``: the dataset folder or its index file (``manifest.jsonl``, ``seeds.json``,
    ``edit_sessions.json``, a ``.parquet`` file). ``resolution``: the square side of every
    image. ``columns``: for ``"hf"``, ``{role: column}`` with roles ``source``, ``target``,
    ``instruction``, ``mask``, ``source_prompt``, ``target_prompt``,
    ``expressive_instruction``, ``id``. ``split``: see each layout. Raises
    :class:`TrainDataError`."""
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 8:
        raise TrainDataError(f"resolution {resolution!r}; expected a whole number of pixels "
                             ">= 8 (e.g. 64 for tests, 256 for MGIE, 512 for SD 1.5)")
    if format not in FORMATS:
        raise TrainDataError(f"unknown dataset format {format!r}; expected one of "
                             f"{', '.join(FORMATS)}")
    text = str(path)
    p = Path(text).expanduser()
    if not p.exists():
        if _REMOTE.match(text) or _HUB_ID.match(text):
            raise TrainDataError(
                f"dataset {text!r} is not a local path (it looks like a Hugging Face Hub id "
                "or a URL); training reads local folders only and never downloads. Download "
                f"it once, e.g. `huggingface-cli download {text} --repo-type dataset "
                "--local-dir DIR`, and pass DIR")
        raise TrainDataError(f"dataset {p} does not exist; expected a folder (a manifest, "
                             "InstructPix2Pix or MagicBrush folder, or a Hugging Face "
                             "datasets folder) or its index file")
    if columns is not None and format not in ("hf", "auto"):
        raise TrainDataError(f"columns= applies to the 'hf' format only, not {format!r}")
    fmt = detect_format(p) if format == "auto" else format
    if columns is not None and fmt != "hf":
        raise TrainDataError(f"columns= applies to Hugging Face datasets only; {p} is a "
                             f"{fmt} dataset")
    origin = str(p)
    if fmt == "manifest":
        if split is not None:
            raise TrainDataError(f"dataset {p} is a manifest, which has no splits "
                                 f"(split={split!r}); give validation pairs with their own "
                                 "manifest (data.val_path) or data.val_fraction")
        pairs = _manifest_pairs(p)
    elif fmt == "ip2p":
        pairs = _ip2p_pairs(p, split)
    elif fmt == "magicbrush":
        pairs = _magicbrush_pairs(p, split)
    else:
        pairs = _hf_pairs(p, columns, split)
    _check_pairs(pairs, resolution, origin, fmt)
    return PairDataset(pairs, resolution, origin=origin, format=fmt)


def detect_format(path: Path) -> str:
    """The layout of a dataset folder or file (``load_pairs(format="auto")``)."""
    if path.is_file():
        name, suffix = path.name, path.suffix.lower()
        if name == "seeds.json":
            return "ip2p"
        if name == "edit_sessions.json":
            return "magicbrush"
        if suffix in (".parquet", ".arrow"):
            return "hf"
        if suffix in (".json", ".jsonl"):
            return "manifest"
        raise TrainDataError(f"cannot tell the format of {path}; expected a manifest "
                             "(.jsonl/.json), seeds.json, edit_sessions.json or a .parquet "
                             "file, or name the format (data.format in a training config)")
    if any((path / n).is_file() for n in ("manifest.jsonl", "manifest.json")):
        return "manifest"
    if (path / "edit_sessions.json").is_file():
        return "magicbrush"
    if (path / "seeds.json").is_file():
        return "ip2p"
    if any((path / n).is_file() for n in ("dataset_dict.json", "dataset_info.json",
                                           "state.json")):
        return "hf"
    if next(path.rglob("*.parquet"), None) is not None:
        return "hf"
    subdirs = [d for d in sorted(path.iterdir()) if d.is_dir()]
    if any((d / "prompt.json").is_file() for d in subdirs[:1000]):
        return "ip2p"
    if any((d / "edit_sessions.json").is_file() for d in subdirs):
        return "magicbrush"
    found = ", ".join(sorted(c.name for c in path.iterdir())[:10]) or "nothing"
    raise TrainDataError(
        f"cannot tell the format of dataset folder {path} (it holds: {found}); expected "
        "manifest.jsonl (a batch manifest with 'target'), seeds.json or folders with "
        "prompt.json (InstructPix2Pix), edit_sessions.json (MagicBrush), or a Hugging Face "
        "datasets folder (save_to_disk or parquet); or name the format (data.format in a "
        "training config)")


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _manifest_pairs(path: Path) -> list[Pair]:
    try:
        dataset = load_dataset(path)
    except TrainDataError:
        raise
    except DatasetError as exc:
        raise TrainDataError(str(exc)) from None
    if dataset.kind != "manifest":
        raise TrainDataError(f"{dataset.path} is a {dataset.kind} dataset, which has no "
                             "ground-truth edits; training needs a manifest whose items have "
                             "a 'target' image")
    base = dataset.path.parent
    pairs = []
    for item in dataset.items:
        fields = item.fields
        target = fields.get("target")
        if not isinstance(target, str) or not target.strip():
            raise TrainDataError(
                f"{dataset.path}: item '{item.id}' has no 'target' field; a training "
                "manifest gives each photo's ground-truth edit, e.g. {\"image\": "
                "\"cat.png\", \"target\": \"cat_edited.png\", \"instruction\": \"make the "
                "cat black\"} (python -m xmgie.training.synthetic DIR writes an example)")
        mask = fields.get("mask")
        pairs.append(Pair(
            id=item.id,
            source=_file(Path(fields["image"])),
            target=_file(_resolve(base, target)),
            mask=_file(Path(mask)) if mask else None,
            instruction=_text(fields.get("instruction")),
            source_prompt=_text(fields.get("source_prompt")),
            target_prompt=_text(fields.get("target_prompt")),
            expressive_instruction=_text(fields.get("expressive_instruction")),
            edit_words=[str(w) for w in fields.get("edit_words") or []]))
    return pairs


def _read_json(file: Path, what: str) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TrainDataError(f"{what} {file} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TrainDataError(f"cannot read {what} {file}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise TrainDataError(f"{what} {file} is not valid JSON (line {exc.lineno}, column "
                             f"{exc.colno}: {exc.msg})") from None


def _split_folder(path: Path, split: str | None, marker: str) -> Path:
    """``path/split`` when it holds ``marker``; ``path`` itself when it does; with no
    split, the one sub-folder (or the ``train`` one) that holds ``marker``."""
    if path.is_file():
        return path.parent
    if split is not None and (path / split / marker).is_file():
        return path / split
    if (path / marker).is_file():
        return path
    found = sorted(d.name for d in path.iterdir() if (d / marker).is_file())
    if split is None and len(found) == 1:
        return path / found[0]
    if split is None and "train" in found:
        return path / "train"
    raise TrainDataError(
        f"dataset folder {path} has no {marker}"
        + (f" (nor {path / split / marker})" if split else "")
        + (f"; its splits: {', '.join(found)}; choose one with data.split (split=)"
           if found else ""))


def _ip2p_pairs(path: Path, split: str | None) -> list[Pair]:
    folder = path.parent if path.is_file() else path
    seeds_file = folder / "seeds.json"
    if seeds_file.is_file():
        seeds = _read_json(seeds_file, "InstructPix2Pix seeds file")
        if not isinstance(seeds, list) or not all(
                isinstance(e, list) and len(e) == 2 and isinstance(e[1], list) for e in seeds):
            raise TrainDataError(f"{seeds_file}: expected a JSON list of [folder, [seed, ...]] "
                                 "entries, as InstructPix2Pix's seeds.json has")
        entries = [(str(name), [str(s) for s in sd]) for name, sd in seeds]
    else:
        entries = []
        for sub in sorted(d for d in folder.iterdir() if d.is_dir()):
            if (sub / "prompt.json").is_file():
                stems = sorted(f.name[:-len("_0.jpg")] for f in sub.glob("*_0.jpg"))
                entries.append((sub.name, stems))
    if split is not None:
        if split not in IP2P_SPLITS:
            raise TrainDataError(f"InstructPix2Pix split {split!r}; expected one of "
                                 f"{', '.join(IP2P_SPLITS)} (its 90/5/5 % cut of seeds.json)")
        lo, hi = IP2P_SPLITS[split]
        entries = entries[math.floor(lo * len(entries)):math.floor(hi * len(entries))]
    pairs = []
    for name, seed_list in entries:
        sub = folder / name
        prompt = _read_json(sub / "prompt.json", f"InstructPix2Pix prompt of '{name}'")
        if not isinstance(prompt, dict):
            raise TrainDataError(f"{sub / 'prompt.json'}: expected an object with 'input', "
                                 "'edit' and 'output'")
        for seed in seed_list:
            pairs.append(Pair(
                id=safe_id(f"{name}_{seed}"),
                source=_file(sub / f"{seed}_0.jpg"),
                target=_file(sub / f"{seed}_1.jpg"),
                instruction=_text(prompt.get("edit")),
                source_prompt=_text(prompt.get("input")),
                target_prompt=_text(prompt.get("output"))))
    return pairs


def _magicbrush_pairs(path: Path, split: str | None) -> list[Pair]:
    folder = _split_folder(path, split, "edit_sessions.json")
    sessions_file = folder / "edit_sessions.json"
    sessions = _read_json(sessions_file, "MagicBrush sessions file")
    if not isinstance(sessions, dict):
        raise TrainDataError(f"{sessions_file}: expected a JSON object {{img_id: [turn, ...]}}, "
                             "as MagicBrush's edit_sessions.json has")
    captions_file = folder / "global_descriptions.json"
    captions = _read_json(captions_file, "MagicBrush captions file") \
        if captions_file.is_file() else {}
    images = folder / "images"
    pairs = []
    for img_id, turns in sessions.items():
        if not isinstance(turns, list):
            raise TrainDataError(f"{sessions_file}: session '{img_id}' is not a list of turns")
        described = captions.get(img_id, {}) if isinstance(captions, dict) else {}
        for k, turn in enumerate(turns, 1):
            where = f"{sessions_file}: session '{img_id}', turn {k}"
            if not isinstance(turn, dict) or not turn.get("input") or not turn.get("output"):
                raise TrainDataError(f"{where}: expected an object with 'input', 'output', "
                                     "'mask' and 'instruction'")
            base = images / str(img_id)
            mask = turn.get("mask")
            pairs.append(Pair(
                id=safe_id(f"{img_id}_{k}"),
                source=_file(base / turn["input"]),
                target=_file(base / turn["output"]),
                mask=_file(base / mask) if mask else None,
                instruction=_text(turn.get("instruction")),
                source_prompt=_text(described.get(turn["input"])),
                target_prompt=_text(described.get(turn["output"]))))
    return pairs


# --- Hugging Face datasets ------------------------------------------------------------


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise TrainDataError(f"reading Hugging Face datasets needs the 'datasets' package; "
                             f"install it with `{INSTALL_TRAIN}`") from None
    return datasets


def _parquet_split(file: Path, root: Path) -> str | None:
    """The split a parquet file belongs to: its name's prefix (``train-00000-of-...``)
    or a folder on its way from ``root`` named like a split."""
    stem = file.name.lower()
    for split in HF_SPLITS:
        if re.match(rf"{split}([-_.]|$)", stem):
            return split
    for part in file.relative_to(root).parts[:-1]:
        if part.lower() in HF_SPLITS:
            return part.lower()
    return None


def _open_hf(path: Path, split: str | None) -> Any:
    datasets = _import_datasets()
    folder = path if path.is_dir() else path.parent
    if path.is_dir() and any((path / n).is_file() for n in (
            "dataset_dict.json", "dataset_info.json", "state.json")):
        try:
            data = datasets.load_from_disk(str(path))
        except Exception as exc:
            raise TrainDataError(f"Hugging Face dataset folder {path} cannot be read by "
                                 f"datasets.load_from_disk ({exc})") from None
        if isinstance(data, datasets.DatasetDict):
            names = list(data.keys())
            chosen = split if split is not None else ("train" if "train" in names else
                                                     names[0] if len(names) == 1 else None)
            if chosen not in data:
                raise TrainDataError(f"Hugging Face dataset {path} has splits "
                                     f"{', '.join(names)}; choose one with data.split (split=)"
                                     + (f" (not {split!r})" if split else ""))
            data = data[chosen]
        elif split is not None:
            raise TrainDataError(f"Hugging Face dataset {path} is a single split; "
                                 f"split={split!r} does not apply")
        return data, folder
    files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
    if not files:
        raise TrainDataError(f"{path} holds no .parquet files and is not a save_to_disk "
                             "folder (no dataset_dict.json, dataset_info.json or state.json)")
    by_split: dict[str | None, list[Path]] = {}
    for f in files:
        by_split.setdefault(_parquet_split(f, folder) if path.is_dir() else None, []).append(f)
    if split is not None:
        if split not in by_split:
            named = sorted(s for s in by_split if s)
            raise TrainDataError(f"{path} has no parquet files of split {split!r}"
                                 + (f"; its splits: {', '.join(named)}" if named else
                                    " (no file or folder is named after a split)"))
        chosen = by_split[split]
    elif set(by_split) == {None}:
        chosen = files
    elif "train" in by_split:
        chosen = by_split["train"]
    else:
        raise TrainDataError(f"{path} holds parquet files of several splits "
                             f"({', '.join(sorted(str(s) for s in by_split))}); choose one "
                             "with data.split (split=)")
    try:
        data = datasets.load_dataset("parquet", data_files=[str(f) for f in chosen],
                                     split="train")
    except Exception as exc:
        raise TrainDataError(f"parquet files under {path} cannot be read by "
                             f"datasets.load_dataset ({exc})") from None
    return data, folder


def _hf_columns(data: Any, origin: Path, columns: dict[str, str] | None) -> dict[str, str]:
    names = list(data.column_names)
    given = dict(columns or {})
    unknown = sorted(set(given) - set(HF_ROLES))
    if unknown:
        raise TrainDataError(f"columns= has unknown role(s) {', '.join(unknown)}; expected "
                             f"roles {', '.join(HF_ROLES)}")
    chosen: dict[str, str] = {}
    for role, candidates in HF_ROLES.items():
        if role in given:
            if given[role] not in names:
                raise TrainDataError(f"Hugging Face dataset {origin}: column {given[role]!r} "
                                     f"(for {role}) does not exist; its columns: "
                                     f"{', '.join(names)}")
            chosen[role] = given[role]
            continue
        taken = set(chosen.values())
        found = next((c for c in candidates if c in names and c not in taken), None)
        if found is not None:
            chosen[role] = found
    missing = [r for r in HF_REQUIRED if r not in chosen]
    if missing:
        raise TrainDataError(
            f"Hugging Face dataset {origin}: no column for {', '.join(missing)} (its columns: "
            f"{', '.join(names)}); name them with columns=, e.g. in the config "
            "data.columns: {source: input_image, target: edited_image, instruction: "
            "edit_prompt}")
    return chosen


def _hf_pairs(path: Path, columns: dict[str, str] | None, split: str | None) -> list[Pair]:
    datasets = _import_datasets()
    data, folder = _open_hf(path, split)
    chosen = _hf_columns(data, path, columns)
    image_roles = [r for r in ("source", "target", "mask") if r in chosen]
    for role in image_roles:
        feature = data.features.get(chosen[role])
        if isinstance(feature, datasets.Image) and feature.decode:
            # Keep the encoded bytes: decoding happens once, when a pair is used.
            data = data.cast_column(chosen[role], datasets.Image(decode=False))
    # Texts as whole columns (one read each), not row by row.
    texts = data.select_columns([chosen[r] for r in chosen if r not in image_roles]).to_dict()
    by_role = {role: data.select_columns([chosen[role]]) for role in image_roles}
    has_mb_id = "img_id" in data.column_names and "turn_index" in data.column_names
    extra_ids = data.select_columns(["img_id", "turn_index"]).to_dict() if has_mb_id else None
    pairs = []
    for row in range(len(data)):
        record = {name: values[row] for name, values in texts.items()}
        if "id" in chosen:
            pair_id = safe_id(record[chosen["id"]])
        elif extra_ids is not None:
            pair_id = safe_id(f"{extra_ids['img_id'][row]}_{extra_ids['turn_index'][row]}")
        else:
            pair_id = f"row{row:06d}"
        refs = {role: ImageRef(label=f"column '{chosen[role]}' of row {row} in {path}",
                               fetch=_Cell(by_role[role], chosen[role], row, folder))
                for role in image_roles}
        if "mask" in refs and _empty_cell(by_role["mask"][row][chosen["mask"]]):
            refs.pop("mask")
        pairs.append(Pair(
            id=pair_id, source=refs["source"], target=refs["target"], mask=refs.get("mask"),
            **{f: _text(record.get(chosen[f])) if f in chosen else "" for f in TEXT_FIELDS}))
    return pairs
