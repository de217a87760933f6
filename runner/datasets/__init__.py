"""Dataset adapters: published datasets read in their own on-disk layout, turned into
edit items for ``xmgie batch`` (no manifest needed, nothing written into the dataset).

``runner.dataset.load_dataset`` calls :func:`load_adapter_dataset` when a folder has no
``manifest.jsonl`` / ``manifest.json`` / ``mapping_file.json``. Every module of this
package that defines ``NAME``, ``detect`` and ``items`` is an adapter; the first whose
``detect`` accepts the folder (adapters in module-name order) reads it.

How to add an adapter (one new file, nothing else to edit)
---------------------------------------------------------
Write ``runner/datasets/<name>.py`` with::

    NAME = "stanford-cars"                # shown in errors and as Dataset.kind
    DESCRIPTION = "Stanford Cars (devkit .mat files or the CSV re-release)"
    SPLITS = ("train", "test")            # the names --split accepts

    def detect(folder: Path) -> bool:     # cheap: look for the layout's marker files
        ...

    def items(folder: Path, *, split: str | None, limit: int | None,
              seed: int) -> list[Item]:
        ...

``items`` reads the annotations, builds one :class:`~runner.dataset.Item` per photo of
the split (``split=None``: every photo) and returns ``select(items, limit, seed)``. Each
item's ``fields`` hold the canonical fields (``image`` as an absolute path,
``instruction``, ``source_prompt``, ``target_prompt``, ``edit_words``, ``object``) and
the annotations as extra fields (``class``, ``attributes``, ``split`` ...). Build them
with :func:`make_item` (and :func:`with_article` for "a"/"an" in templates). Read files
with :func:`need_file`, :func:`read_table` and :func:`load_mat`: they raise
:class:`AnnotationError` naming the file (and line), so a missing or malformed
annotation file always gets a clear message. Check ``split`` with :func:`check_split`.
:func:`select` takes any list: select ids first when a large file need only be read for
the chosen photos.

Attribute accuracy (optional, plain data: ``evaluation`` imports the adapter, never the
reverse): ``attribute_specs(folder)`` gives each attribute's values and prompt template
(``{name: {"values": [...], "template": ..., "prompts": {value: prompt}}}``), and
``attribute_edit(fields)`` rewrites an item's fields into the ones
``evaluation.attributes.item_from_fields`` reads, for items whose own fields say it
differently (see ``evaluation/attributes.py``, "Dataset hooks").

Masks: an adapter never writes a file. It puts a small mask description in
``Item.mask_spec`` (JSON), which the batch renders to ``RUN/masks/<id>.png`` at the size
of the item's photo before the item runs (:func:`render_mask`), like PIE-Bench's
run-length masks. Descriptions (coordinates in pixels of the photo, origin top-left):

* ``{"box": [x0, y0, x1, y1]}``: a filled rectangle (x1, y1 exclusive);
* ``{"points": [[x, y], ...], "radius": r}``: filled discs of radius ``r`` around the points;
* ``{"segmentation": PATH, "background": [r, g, b], "tolerance": t}``: the pixels of the
  image at PATH farther than ``t`` (max over channels) from the background colour
  (Oxford-102's ``segmim`` files paint the background pure blue; CelebAMask-HQ's
  black-and-white part masks are read with a black background);
* ``{"coco": {"segmentation": SEG, "height": h, "width": w}}``: a COCO annotation's
  segmentation in its image's ``h`` x ``w`` frame, decoded by pycocotools and scaled to
  the photo: polygons ``[[x0, y0, x1, y1, ...], ...]`` or a run-length encoding
  ``{"size": [h, w], "counts": ...}`` with uncompressed (a list, as crowd annotations
  have) or compressed (a string) counts (:func:`.coco.segmentation_mask`);
* several of them in ``{"union": [spec, ...]}``.

An item without a mask has ``mask_spec=None`` (the whole photo may be edited).

Selection (``xmgie batch --split S --limit N --seed K``): :func:`select` keeps the first
``N`` items of one permutation drawn from ``K`` and returns them in dataset order, so a
larger ``N`` with the same seed gives a superset (a batch grown this way resumes) and the
same arguments always give the same items.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..dataset import Dataset, DatasetError, Item, safe_id


class AnnotationError(DatasetError):
    """An annotation file of a dataset is missing or malformed; names the file."""


# --- registry ---------------------------------------------------------------------------

def adapters() -> list[Any]:
    """The adapter modules of this package, in module-name order."""
    found = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if all(hasattr(module, a) for a in ("NAME", "detect", "items")):
            found.append(module)
    return found


def detect_adapter(folder: Path | str) -> Any | None:
    """The adapter module that reads ``folder``, or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    for module in adapters():
        if module.detect(folder):
            return module
    return None


def describe_adapters() -> str:
    return "; ".join(f"{m.NAME} ({getattr(m, 'DESCRIPTION', '')})" for m in adapters())


def load_adapter_dataset(folder: Path | str, *, split: str | None = None,
                         limit: int | None = None, seed: int = 0) -> Dataset | None:
    """Read ``folder`` with the adapter that recognises it; None when none does."""
    folder = Path(folder).expanduser()
    module = detect_adapter(folder)
    if module is None:
        return None
    if limit is not None and limit < 1:
        raise DatasetError(f"--limit {limit}: expected a positive number of items")
    items = module.items(folder, split=split, limit=limit, seed=seed)
    if not items:
        raise DatasetError(f"{folder} ({module.NAME}): the selection "
                           f"(split {split or 'all'}) holds no items")
    ids = [item.id for item in items]
    if len(set(ids)) != len(ids):
        raise DatasetError(f"{folder} ({module.NAME}): the adapter made repeated item ids")
    return Dataset(Path(folder).resolve(), module.NAME, items,
                   selection={"split": split, "limit": limit, "seed": int(seed)})


# --- helpers for adapters ------------------------------------------------------------------

def need_file(folder: Path, *names: str, what: str = "") -> Path:
    """The first of ``names`` (relative to ``folder``) that exists, else an error naming them."""
    for name in names:
        path = Path(folder) / name
        if path.exists():
            return path
    raise AnnotationError(f"{Path(folder) / names[0]} is missing"
                          + (f" ({what})" if what else "")
                          + "; the dataset folder must keep its published layout")


def read_table(file: Path, columns: Sequence[type], *, what: str = "",
               rest: bool = False) -> list[list[Any]]:
    """Whitespace-separated rows; each row's first fields converted by ``columns``.
    ``rest=True``: the text after the typed fields is kept whole as a last string field
    (names with spaces). Extra fields are ignored; a short or unconvertible row is an
    :class:`AnnotationError` naming the file and line."""
    try:
        text = Path(file).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise AnnotationError(f"cannot read {file}: {exc}") from exc
    rows = []
    n = len(columns)
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(None, n) if rest else line.split()
        if len(parts) < n + (1 if rest else 0):
            raise AnnotationError(
                f"{file}, line {lineno}: {len(parts)} fields, expected "
                f"{n + (1 if rest else 0)}" + (f" ({what})" if what else "")
                + f": {line.strip()[:80]!r}")
        try:
            row = [conv(p) for conv, p in zip(columns, parts)]
        except ValueError:
            raise AnnotationError(
                f"{file}, line {lineno}: cannot read {line.strip()[:80]!r}"
                + (f"; expected {what}" if what else "")) from None
        if rest:
            row.append(parts[n].strip())
        rows.append(row)
    if not rows:
        raise AnnotationError(f"{file} is empty" + (f"; expected {what}" if what else ""))
    return rows


def load_mat(file: Path, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """Arrays of a MATLAB .mat file (scipy.io), flattened; names the file and the missing key."""
    import scipy.io

    try:
        data = scipy.io.loadmat(str(file))
    except FileNotFoundError:
        raise AnnotationError(f"{file} is missing") from None
    except Exception as exc:  # scipy raises several types for a damaged file
        raise AnnotationError(f"{file} is not a readable MATLAB .mat file ({exc})") from exc
    out = {}
    for key in keys:
        if key not in data:
            have = sorted(k for k in data if not k.startswith("__"))
            raise AnnotationError(f"{file} has no variable '{key}' (it has: "
                                  f"{', '.join(have) or 'none'})")
        out[key] = np.asarray(data[key]).reshape(-1)
    return out


def check_split(name: str, split: str | None, splits: Sequence[str],
                aliases: dict[str, str] | None = None) -> str | None:
    """The canonical split name, or None for every item; a clear error for others."""
    if split is None or split == "all":
        return None
    split = (aliases or {}).get(split, split)
    if split not in splits:
        raise DatasetError(f"--split {split}: {name} has the splits "
                           f"{', '.join(splits)} (or all)")
    return split


def select(items: list[Item], limit: int | None, seed: int) -> list[Item]:
    """The first ``limit`` items of a permutation drawn from ``seed``, in dataset order
    (all items when ``limit`` is None)."""
    if limit is None or limit >= len(items):
        return list(items)
    order = np.random.default_rng(int(seed)).permutation(len(items))[:limit]
    return [items[i] for i in sorted(order)]


def with_article(name: str) -> str:
    """'a rose', 'an american crow' (for prompt templates)."""
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def make_item(item_id: Any, image: Path, *, instruction: str, source_prompt: str,
              target_prompt: str, edit_words: Sequence[str], object: str,
              mask_spec: dict | None = None, **extra: Any) -> Item:
    """An :class:`Item` with the canonical fields and the annotations as extra fields."""
    fields = {"image": str(Path(image).resolve()), "instruction": instruction,
              "source_prompt": source_prompt, "target_prompt": target_prompt,
              "edit_words": list(edit_words), "object": object, **extra}
    return Item(id=safe_id(item_id), fields=fields, mask_spec=mask_spec)


# --- masks --------------------------------------------------------------------------------

def render_mask(spec: dict, size: tuple[int, int]) -> np.ndarray:
    """A mask description (see the module docstring) as float32 [H, W] in {0, 1};
    ``size`` is the photo's (width, height)."""
    w, h = size
    mask = np.zeros((h, w), dtype=np.float32)
    if "union" in spec:
        for part in spec["union"]:
            mask = np.maximum(mask, render_mask(part, size))
    if "box" in spec:
        x0, y0, x1, y1 = (int(round(float(v))) for v in spec["box"])
        mask[max(0, y0):max(0, min(h, y1)), max(0, x0):max(0, min(w, x1))] = 1.0
    if "points" in spec:
        r = float(spec.get("radius", 1))
        yy, xx = np.mgrid[0:h, 0:w]
        for x, y in spec["points"]:
            mask[(xx - float(x)) ** 2 + (yy - float(y)) ** 2 <= r * r] = 1.0
    if "segmentation" in spec:
        from PIL import Image

        path = Path(spec["segmentation"])
        try:
            with Image.open(path) as im:
                seg = np.asarray(im.convert("RGB").resize((w, h), Image.NEAREST), np.int16)
        except OSError as exc:
            raise AnnotationError(f"cannot read the segmentation {path}: {exc}") from exc
        bg = np.asarray(spec.get("background", (0, 0, 254)), np.int16)
        far = np.abs(seg - bg).max(axis=-1) > int(spec.get("tolerance", 60))
        mask[far] = 1.0
    if "coco" in spec:
        from .coco import segmentation_mask

        mask = np.maximum(mask, segmentation_mask(spec["coco"], size))
    return mask
