"""Datasets for ``xmgie batch``: a folder of photos described by a manifest, or a
PIE-Bench style ``mapping_file.json``.

Every item becomes a :class:`Item` with an id (unique, safe as a folder name) and
canonical fields:

    image          path of the photo (required)
    mask           path of a white-on-black edit mask (optional)
    instruction    an MGIE-style instruction, "make the carpet yellow"
    source_prompt  what the photo shows
    target_prompt  the same prompt with the edit
    edit_words     list of the words that carry the edit
    object         the object being edited
    seed           an optional fixed seed for this item

Other fields are kept as they are, so ``--map`` can route them onto any workflow input.

Accepted layouts (``load_dataset`` takes the folder or the file itself):

* ``manifest.jsonl`` -- JSON lines, one object per item;
* ``manifest.json`` -- a JSON list of items, an object with an ``examples`` or ``items``
  list (the layout of the shipped ``example_data/``), or JSON lines;
* ``mapping_file.json`` -- PIE-Bench: ``{id: {image_path, original_prompt, editing_prompt,
  editing_instruction, blended_word, mask (run-length), editing_type_id}}`` with the
  photos under ``annotation_images/``. Brackets that mark the edited words in PIE-Bench
  prompts are removed from the prompts and the bracketed words of the editing prompt
  become ``edit_words``.

Relative paths are relative to the manifest's folder.

A folder with none of these files is read by a dataset adapter when one recognises its
published layout (CUB-200-2011, Oxford-102 ...; see :mod:`.datasets`, which also says how
``split``, ``limit`` and ``seed`` select items and how annotation masks reach the batch).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..mgie_core.errors import XMGIEError
from ..mgie_core.plan import split_words

MANIFEST_NAMES = ("manifest.jsonl", "manifest.json")
PIE_BENCH_NAME = "mapping_file.json"
PIE_BENCH_IMAGES = "annotation_images"
# PIE-Bench masks are run-length encoded over 512 x 512 images.
PIE_BENCH_MASK_SHAPE = (512, 512)
CANONICAL = ("image", "mask", "instruction", "source_prompt", "target_prompt",
             "edit_words", "object", "seed")
_SAFE_ID = re.compile(r"[^A-Za-z0-9._-]+")


class DatasetError(XMGIEError, ValueError):
    """The dataset is missing, unreadable or has bad items; says which and how to fix."""


@dataclasses.dataclass
class Item:
    """One dataset entry. ``fields`` holds the canonical fields (absolute paths for
    ``image`` and ``mask``) and any extra ones; ``mask_rle`` a PIE-Bench run-length mask
    and ``mask_spec`` an adapter's mask description (a box, points, a segmentation file;
    see :mod:`.datasets`), which the batch writes out as a PNG before the item runs."""

    id: str
    fields: dict[str, Any]
    mask_rle: list[int] | None = None
    mask_spec: dict | None = None

    def to_json(self) -> dict:
        return {"id": self.id, "fields": self.fields, "mask_rle": self.mask_rle,
                "mask_spec": self.mask_spec}

    @classmethod
    def from_json(cls, data: dict) -> Item:
        return cls(id=data["id"], fields=dict(data["fields"]), mask_rle=data.get("mask_rle"),
                   mask_spec=data.get("mask_spec"))


@dataclasses.dataclass
class Dataset:
    path: Path          # the manifest or mapping file (an adapter's: the folder)
    kind: str           # "manifest", "pie-bench" or an adapter's NAME
    items: list[Item]
    # An adapter's split/limit/seed, so a later run (eval --variants) reads the same items.
    selection: dict = dataclasses.field(default_factory=dict)

    def __iter__(self) -> Iterator[Item]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def by_id(self) -> dict[str, Item]:
        return {item.id: item for item in self.items}


def write_pair_manifest(folder: Path | str, pairs, id_prefix: str) -> Path:
    """Paired edits written as a manifest dataset with a ``target`` (what training reads):
    for the k-th of ``pairs`` -- (source, target, mask or None, fields), images as uint8
    arrays -- PNGs ``images/<kkkk>_source.png``, ``_target.png`` (and ``_mask.png``) and
    one ``manifest.jsonl`` line: ``id`` ``<id_prefix>_<kkkk>``, the image paths relative
    to ``folder``, then ``fields``. Returns the manifest's path."""
    from PIL import Image

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for k, (source, target, mask, fields) in enumerate(pairs):
        stem = f"{k:04d}"
        record = {"id": f"{id_prefix}_{stem}"}
        for role, array in (("image", source), ("target", target), ("mask", mask)):
            if array is None:
                continue
            name = f"images/{stem}_{'source' if role == 'image' else role}.png"
            Image.fromarray(array).save(folder / name)
            record[role] = name
        lines.append(json.dumps({**record, **fields}))
    manifest = folder / MANIFEST_NAMES[0]
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return manifest


def find_dataset_file(path: Path | str) -> Path:
    """The manifest or mapping file of a dataset folder (or the file itself)."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if not path.exists():
        raise DatasetError(f"dataset {path} does not exist; expected a folder with "
                           f"{' or '.join(MANIFEST_NAMES + (PIE_BENCH_NAME,))}, or such a file")
    for name in MANIFEST_NAMES + (PIE_BENCH_NAME,):
        if (path / name).is_file():
            return path / name
    found = sorted(p.name for p in path.glob("*.json*"))[:10]
    from .datasets import describe_adapters

    raise DatasetError(f"dataset folder {path} has no {', '.join(MANIFEST_NAMES)} or "
                       f"{PIE_BENCH_NAME} (JSON files there: {', '.join(found) or 'none'}), "
                       f"and is not a dataset in a published layout that the pack reads "
                       f"({describe_adapters()}); "
                       "write a manifest.jsonl with one object per image, e.g. "
                       '{"image": "cat.png", "mask": "cat_mask.png", "source_prompt": ..., '
                       '"target_prompt": ..., "edit_words": ["red"]}')


def load_dataset(path: Path | str, *, split: str | None = None, limit: int | None = None,
                 seed: int = 0) -> Dataset:
    """Read a dataset (see the module docstring); raises :class:`DatasetError`.

    ``split``, ``limit`` and ``seed`` select items of an adapter's dataset (see
    :mod:`.datasets`); a manifest or PIE-Bench file has no splits (``limit`` is then
    applied by the batch, to the items not done yet)."""
    folder = Path(path).expanduser()
    if folder.is_dir() and not any((folder / n).is_file()
                                   for n in MANIFEST_NAMES + (PIE_BENCH_NAME,)):
        from .datasets import load_adapter_dataset

        adapted = load_adapter_dataset(folder, split=split, limit=limit, seed=seed)
        if adapted is not None:
            return adapted
    if split is not None and split != "all":
        raise DatasetError(f"--split {split}: {path} is a manifest or PIE-Bench dataset, "
                           "which has no splits; write the split's items in their own "
                           "manifest, or leave --split out")
    file = find_dataset_file(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise DatasetError(f"cannot read dataset file {file}: {exc}") from exc
    if file.name == PIE_BENCH_NAME:
        return Dataset(file, "pie-bench", _pie_bench(file, _parse_json(file, text)))
    records = _manifest_records(file, text)
    items = [_manifest_item(file, i, rec) for i, rec in enumerate(records)]
    _check_unique(file, items)
    return Dataset(file, "manifest", items)


def _parse_json(file: Path, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{file} is not valid JSON (line {exc.lineno}, column "
                           f"{exc.colno}: {exc.msg})") from exc


def _manifest_records(file: Path, text: str) -> list[dict]:
    stripped = text.strip()
    if not stripped:
        raise DatasetError(f"{file} is empty; expected one JSON object per line")
    data = None
    if file.suffix != ".jsonl":
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError:
            data = None  # JSON lines (several objects) do not parse as one document
    if isinstance(data, list):
        records = data
    elif isinstance(data, dict) and isinstance(data.get("examples", data.get("items")), list):
        records = data.get("examples", data.get("items"))
    elif isinstance(data, dict):
        records = [data]  # a JSON lines file of one line
    elif data is not None:
        raise DatasetError(f"{file} holds a JSON {type(data).__name__}; expected JSON lines, "
                           "a list of items, or {\"examples\": [...]}")
    else:
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{file}, line {lineno}: not valid JSON ({exc.msg}); "
                                   "expected one JSON object per line") from exc
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise DatasetError(f"{file}: item {i + 1} is a JSON {type(rec).__name__}; "
                               "expected an object with at least an 'image' field")
    if not records:
        raise DatasetError(f"{file} lists no items")
    return records


def safe_id(raw: Any) -> str:
    """A folder-safe item id: runs of other characters than letters, digits, '.', '_'
    and '-' become '_'."""
    text = _SAFE_ID.sub("_", str(raw)).strip("._")
    return text or "item"


def _manifest_item(file: Path, index: int, rec: dict) -> Item:
    where = f"{file}, item {index + 1}"
    image = rec.get("image")
    if not isinstance(image, str) or not image.strip():
        raise DatasetError(f"{where}: has no 'image' field; expected the photo's path "
                           "(relative to the manifest's folder, or absolute)")
    fields = {k: v for k, v in rec.items() if k not in ("id", "name")}
    fields["image"] = str(_resolve(file.parent, image))
    if rec.get("mask"):
        fields["mask"] = str(_resolve(file.parent, rec["mask"]))
    else:
        fields.pop("mask", None)
    if "edit_words" in fields or "edit_word" in fields:
        fields["edit_words"] = split_words(fields.pop("edit_words", fields.pop("edit_word", None)))
    if "seed" in fields and fields["seed"] is not None:
        seed = fields["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise DatasetError(f"{where}: seed {seed!r} is not a non-negative integer")
    raw_id = rec.get("id", rec.get("name", Path(image).stem))
    return Item(id=safe_id(raw_id), fields=fields)


def _resolve(folder: Path, name: str) -> Path:
    # Absolute, but symlinks kept as the user wrote them.
    p = Path(name).expanduser()
    return Path(os.path.abspath(p if p.is_absolute() else folder / p))


def _check_unique(file: Path, items: list[Item]) -> None:
    seen: dict[str, int] = {}
    dups = []
    for i, item in enumerate(items):
        if item.id in seen:
            dups.append(f"'{item.id}' (items {seen[item.id] + 1} and {i + 1})")
        seen.setdefault(item.id, i)
    if dups:
        raise DatasetError(f"{file}: item ids must be unique; repeated: {', '.join(dups[:10])}. "
                           "Give each item an 'id' (or a unique 'name').")


# --- PIE-Bench --------------------------------------------------------------------------

_BRACKETED = re.compile(r"\[([^\]]*)\]")


def strip_brackets(prompt: str) -> str:
    return prompt.replace("[", "").replace("]", "")


def pie_bench_mask(rle: list[int], shape: tuple[int, int] = PIE_BENCH_MASK_SHAPE) -> np.ndarray:
    """Decode a PIE-Bench run-length mask: pairs (start, length) over the row-major
    flattened image, ones inside the runs. As PIE-Bench's own evaluation does, the
    one-pixel border is set to 1 (its annotations are unreliable there), so background
    metrics never count the border. Returns float32 [H, W] in {0, 1}."""
    h, w = shape
    flat = np.zeros(h * w, dtype=np.float32)
    if len(rle) % 2:
        raise DatasetError(f"a PIE-Bench mask has {len(rle)} numbers; expected "
                           "(start, length) pairs")
    for start, length in zip(rle[0::2], rle[1::2]):
        start = int(start)
        flat[start:min(start + int(length), h * w)] = 1.0
    mask = flat.reshape(h, w)
    mask[0, :] = mask[-1, :] = 1.0
    mask[:, 0] = mask[:, -1] = 1.0
    return mask


def _pie_bench(file: Path, data: Any) -> list[Item]:
    if not isinstance(data, dict) or not data:
        raise DatasetError(f"{file}: expected a JSON object {{id: entry}} as PIE-Bench's "
                           "mapping_file.json has")
    images_dir = file.parent / PIE_BENCH_IMAGES
    base = images_dir if images_dir.is_dir() else file.parent
    items = []
    for key, entry in data.items():
        if not isinstance(entry, dict) or "image_path" not in entry:
            raise DatasetError(f"{file}, entry {key!r}: has no 'image_path'; expected a "
                               "PIE-Bench entry")
        editing = str(entry.get("editing_prompt", ""))
        words = [w for group in _BRACKETED.findall(editing) for w in group.split()]
        fields: dict[str, Any] = {
            "image": str(_resolve(base, entry["image_path"])),
            "source_prompt": strip_brackets(str(entry.get("original_prompt", ""))),
            "target_prompt": strip_brackets(editing),
            "instruction": str(entry.get("editing_instruction", "")),
            "edit_words": words,
        }
        blended = str(entry.get("blended_word", "")).split()
        if blended:
            fields["object"] = blended[0]
        for extra in ("editing_type_id", "blended_word"):
            if extra in entry:
                fields[extra] = entry[extra]
        rle = entry.get("mask")
        items.append(Item(id=safe_id(key), fields=fields,
                          mask_rle=[int(v) for v in rle] if rle else None))
    _check_unique(file, items)
    return items
