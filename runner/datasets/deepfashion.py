"""DeepFashion's Category and Attribute Prediction benchmark as edit items: each photo's
garment gains one attribute it is annotated without ("make the dress floral"), its box is
the edit mask, and the attributes it is annotated with (and the instructed one, absent)
travel with it for attribute accuracy.

The benchmark's list files are read as published; each starts with a line holding the
number of entries and a header line::

    Anno/list_category_cloth.txt   <category name> <category type 1|2|3>
    Anno/list_category_img.txt     <image name> <1-based category>
    Anno/list_attr_cloth.txt       <attribute name, may hold spaces> <attribute type 1..5>
    Anno/list_attr_img.txt         <image name> <one of 1 / -1 / 0 per attribute>
    Anno/list_bbox.txt             <image name> <x_1> <y_1> <x_2> <y_2>
    Eval/list_eval_partition.txt   <image name> <train|val|test>
    img/...                        the photos (image names start with img/)

Boxes are taken as published, pixels from the top-left corner, and become the mask
``{"box": [x_1, y_1, x_2, y_2]}``. Attribute values: 1 present, -1 absent, 0 unknown.
The target attribute is drawn among the absent ones (never an unknown one) by a generator
seeded by (seed, image name), so a run is repeatable and an item keeps its instruction
whatever the limit.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

import numpy as np

from ..dataset import Item
from . import AnnotationError, check_split, make_item, select, with_article

NAME = "deepfashion"
DESCRIPTION = "DeepFashion Category and Attribute Prediction (Anno/ and Eval/ list files)"
SPLITS = ("train", "val", "test")
ANNO = "Anno"
EVAL = "Eval"
FILES = {
    "category_cloth": f"{ANNO}/list_category_cloth.txt",
    "category_img": f"{ANNO}/list_category_img.txt",
    "attr_cloth": f"{ANNO}/list_attr_cloth.txt",
    "attr_img": f"{ANNO}/list_attr_img.txt",
    "bbox": f"{ANNO}/list_bbox.txt",
    "partition": f"{EVAL}/list_eval_partition.txt",
}
# The benchmark's attribute types, in its order.
ATTRIBUTE_TYPES = {1: "texture", 2: "fabric", 3: "shape", 4: "part", 5: "style"}


class DeepFashionError(AnnotationError):
    """A DeepFashion list file is missing or malformed; the message names it."""


@dataclasses.dataclass(frozen=True)
class FashionRecord:
    """One annotated photo of the benchmark."""

    name: str                       # the image name as listed, "img/<folder>/<file>.jpg"
    image: Path
    category: str
    bbox: tuple[int, int, int, int]
    attr_names: tuple[str, ...]     # the benchmark's attribute list (shared by all records)
    values: np.ndarray              # int8, one of 1 / -1 / 0 per attribute
    split: str

    def annotations(self) -> dict[str, int]:
        """The nonzero annotations, name -> 1 or -1."""
        return {self.attr_names[i]: int(self.values[i]) for i in np.flatnonzero(self.values)}


def _rows(file: Path, what: str) -> list[tuple[int, list[str]]]:
    """(line number, tokens) of each entry line, after the count and header lines; the
    count must match the number of entries."""
    if not file.is_file():
        raise DeepFashionError(f"{file} is missing; the DeepFashion Category and Attribute "
                               f"Prediction layout needs it ({what})")
    lines = file.read_text(encoding="utf-8", errors="replace").splitlines()
    if len(lines) < 2:
        raise DeepFashionError(f"{file}: expected a count line and a header line before "
                               f"the entries ({what})")
    try:
        count = int(lines[0].strip())
    except ValueError:
        raise DeepFashionError(f"{file}, line 1: {lines[0].strip()[:40]!r} is not the "
                               "number of entries the list files start with") from None
    rows = [(n, line.split()) for n, line in enumerate(lines[2:], start=3) if line.strip()]
    if len(rows) != count:
        raise DeepFashionError(f"{file}: line 1 announces {count} entries but {len(rows)} "
                               "follow the header; the file is truncated or edited")
    return rows


def _int(file: Path, n: int, token: str) -> int:
    try:
        return int(token)
    except ValueError:
        raise DeepFashionError(f"{file}, line {n}: {token!r} is not an integer") from None


def read_named_types(file: Path, what: str) -> list[tuple[str, int]]:
    """(name, type) rows of list_category_cloth.txt or list_attr_cloth.txt; the name is
    every token but the last (attribute names may hold spaces)."""
    out = []
    for n, toks in _rows(file, what):
        if len(toks) < 2:
            raise DeepFashionError(f"{file}, line {n}: expected '<name> <type>'")
        out.append((" ".join(toks[:-1]), _int(file, n, toks[-1])))
    return out


def read_image_ints(file: Path, what: str, width: int | None) -> dict[str, list[int]]:
    """image name -> the integers that follow it, ``width`` of them (any number when None)."""
    out: dict[str, list[int]] = {}
    for n, toks in _rows(file, what):
        values = toks[1:]
        if width is not None and len(values) != width:
            raise DeepFashionError(f"{file}, line {n}: {len(values)} values after the "
                                   f"image name; expected {width} ({what})")
        out[toks[0]] = [_int(file, n, v) for v in values]
    return out


def read_attr_values(file: Path, width: int,
                     wanted: set[str] | None = None) -> dict[str, np.ndarray]:
    """image name -> int8 values of list_attr_img.txt, for the ``wanted`` images only (all
    when None). The full file holds 289,222 x 1000 values, so lines are streamed and only
    the wanted ones are converted (in numpy, not one Python int per value)."""
    if not file.is_file():
        raise DeepFashionError(f"{file} is missing; the DeepFashion Category and Attribute "
                               "Prediction layout needs it (<image name> <1/-1/0 per "
                               "attribute>)")
    out: dict[str, np.ndarray] = {}
    entries = 0
    with file.open(encoding="utf-8", errors="replace") as fh:
        first = fh.readline()
        try:
            count = int(first.strip())
        except ValueError:
            raise DeepFashionError(f"{file}, line 1: {first.strip()[:40]!r} is not the "
                                   "number of entries the list files start with") from None
        fh.readline()  # the header
        for n, line in enumerate(fh, start=3):
            parts = line.split(None, 1)
            if not parts:
                continue
            entries += 1
            if wanted is not None and parts[0] not in wanted:
                continue
            tokens = parts[1].split() if len(parts) > 1 else []
            if len(tokens) != width:
                raise DeepFashionError(f"{file}, line {n}: {len(tokens)} values after the "
                                       f"image name; expected {width} (one of 1 / -1 / 0 "
                                       "per attribute of list_attr_cloth.txt)")
            try:
                out[parts[0]] = np.array(tokens, dtype=np.int8)
            except (ValueError, OverflowError):
                raise DeepFashionError(f"{file}, line {n}: the values are not all integers"
                                       ) from None
    if entries != count:
        raise DeepFashionError(f"{file}: line 1 announces {count} entries but {entries} "
                               "follow the header; the file is truncated or edited")
    return out


def read_partition(file: Path) -> dict[str, str]:
    out = {}
    for n, toks in _rows(file, "<image name> <train|val|test>"):
        if len(toks) != 2 or toks[1] not in SPLITS:
            raise DeepFashionError(f"{file}, line {n}: expected '<image name> "
                                   "<train|val|test>'")
        out[toks[0]] = toks[1]
    return out


def detect(folder: Path) -> bool:
    folder = Path(folder)
    return all((folder / FILES[k]).is_file() for k in ("attr_img", "attr_cloth", "bbox"))


def records(folder: Path, split: str | None) -> list[FashionRecord]:
    """Every photo of one split (None: all) with its category, box and attributes, in the
    partition file's order."""
    folder = Path(folder)
    if split is not None and split not in SPLITS:
        raise DeepFashionError(f"DeepFashion has no split {split!r}; choose one of "
                               f"{', '.join(SPLITS)}")
    path = {k: folder / v for k, v in FILES.items()}
    categories = read_named_types(path["category_cloth"], "<category name> <type>")
    attrs = read_named_types(path["attr_cloth"], "<attribute name> <type>")
    partition = read_partition(path["partition"])
    wanted = {n for n, part in partition.items() if split is None or part == split}
    cat_img = read_image_ints(path["category_img"], "<image name> <category>", 1)
    attr_img = read_attr_values(path["attr_img"], len(attrs), wanted)
    boxes = read_image_ints(path["bbox"], "<image name> <x_1> <y_1> <x_2> <y_2>", 4)
    attr_names = tuple(name for name, _ in attrs)
    out = []
    for name, part in partition.items():
        if name not in wanted:
            continue
        for table, key in ((cat_img, "category_img"), (attr_img, "attr_img"),
                           (boxes, "bbox")):
            if name not in table:
                raise DeepFashionError(f"{path[key]} has no entry for {name}, which "
                                       f"{path['partition']} lists")
        label = cat_img[name][0]
        if not 1 <= label <= len(categories):
            raise DeepFashionError(f"{path['category_img']}: {name} has category {label}; "
                                   f"{path['category_cloth']} lists {len(categories)} "
                                   "(1-based)")
        values = attr_img[name]
        bad = sorted(set(np.unique(values).tolist()) - {1, -1, 0})
        if bad:
            raise DeepFashionError(f"{path['attr_img']}: {name} has attribute values "
                                   f"{bad}; expected 1 (present), -1 (absent) or 0 (unknown)")
        image = folder / name
        if not image.is_file():
            raise DeepFashionError(f"{path['partition']} lists {name}, which is not under "
                                   f"{folder}")
        x1, y1, x2, y2 = boxes[name]
        if x2 < x1 or y2 < y1:
            raise DeepFashionError(f"{path['bbox']}: {name} has box {boxes[name]}; "
                                   "expected x_1 <= x_2 and y_1 <= y_2")
        out.append(FashionRecord(
            name=name, image=image, category=categories[label - 1][0],
            bbox=(x1, y1, x2, y2), attr_names=attr_names, values=values, split=part))
    return out


def instruction(rec: FashionRecord, rng: random.Random) -> dict[str, Any] | None:
    """"make the <category> <attribute>" for one absent attribute drawn by ``rng``; None
    when the photo has no attribute annotated absent."""
    absent = np.flatnonzero(rec.values == -1)
    if not absent.size:
        return None
    target = rec.attr_names[int(absent[rng.randrange(absent.size)])]
    garment = rec.category.lower()
    return {"instruction": f"make the {garment} {target}",
            "source_prompt": f"a photo of a {garment}",
            "target_prompt": f"a photo of a {target} {garment}",
            "edit_words": target.split(), "object": garment,
            "edit_kind": "attribute", "target_attribute": target}


def _kept_annotations(rec: FashionRecord, target: str) -> dict[str, int]:
    # The attributes present (1) and the instructed one (-1): "others unchanged" then asks
    # whether what the garment had survives the edit. The hundreds of absent attributes of
    # each photo are left out of the item, which the batch copies into every record.
    kept = {a: v for a, v in rec.annotations().items() if v == 1}
    kept[target] = -1
    return kept


def item_id(name: str) -> str:
    # "img/Sheer_Pleated-Front_Blouse/img_00000001.jpg" -> unique per photo, folder-safe.
    stem = Path(name)
    return f"{stem.parent.name}_{stem.stem}"


def items(folder: Path, *, split: str | None = "test", limit: int | None = None,
          seed: int = 0) -> list[Item]:
    """The photos of ``split`` (None: all) as edit items, ``limit`` of them drawn with
    ``seed``; the mask is the garment's box; the category, and as ``attributes`` the
    attributes annotated present (1) with the instructed one (-1), travel as extra fields.
    Photos with no attribute annotated absent cannot be given an edit and are left out
    before the selection."""
    split = check_split(NAME, split, SPLITS)
    out = []
    for rec in records(Path(folder), split):
        edit = instruction(rec, random.Random(f"{seed}:{rec.name}"))
        if edit is None:
            continue
        out.append(make_item(item_id(rec.name), rec.image,
                             mask_spec={"box": list(rec.bbox)}, bbox=list(rec.bbox),
                             category=rec.category, split=rec.split,
                             attributes=_kept_annotations(rec, edit["target_attribute"]),
                             **edit))
    return select(out, limit, seed)


# --- attribute accuracy (the hooks evaluation/attributes.py reads) ---------------------------

def attribute_specs(folder: Path) -> dict[str, dict]:
    """Every attribute of list_attr_cloth.txt as a present/absent pair for attribute
    accuracy: 'a photo of a floral {object}' / 'a photo of a {object} that is not floral'
    ({object} is the garment's category). The items' own fields already say which
    attribute was asked for (``target_attribute``, ``attributes``)."""
    names = read_named_types(Path(folder) / FILES["attr_cloth"], "<attribute name> <type>")
    return {name: {"values": ["yes", "no"], "prompts": {
        "yes": f"a photo of {with_article(name)} {{object}}",
        "no": f"a photo of a {{object}} that is not {name}"}} for name, _ in names}
