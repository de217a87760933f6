"""Stanford Cars as edit items: each photo's box becomes the edit mask and its class name
the subject of a colour change ("make the car red") or a model change ("turn the car into
a 2012 Tesla Model S Sedan").

Two published layouts are read as they are unpacked:

* the devkit release::

      devkit/cars_meta.mat                 'class_names', a cell array of the 196 names
      devkit/cars_train_annos.mat          'annotations', a struct array with bbox_x1,
                                           bbox_y1, bbox_x2, bbox_y2, class (1-based), fname
      cars_test_annos_withlabels.mat       the same for the test split (also looked for in
                                           devkit/)
      cars_train/<fname>, cars_test/<fname>

* the CSV re-release::

      names.csv                            one class name a line, no header
      anno_train.csv, anno_test.csv        fname,x1,y1,x2,y2,class (1-based), no header
      car_data/[car_data/]train/<class folder>/<fname>   (the same for test)

Boxes are in the datasets' pixel coordinates, corners included, as published. The
instruction of each item is drawn from a generator seeded by (seed, item id), so a run
is repeatable and an item keeps its instruction whatever the limit.
"""

from __future__ import annotations

import csv
import dataclasses
import random
from pathlib import Path
from typing import Any

import numpy as np

from ..dataset import Item
from . import AnnotationError, check_split, make_item, select, with_article

NAME = "stanford-cars"
DESCRIPTION = "Stanford Cars (devkit .mat files or the CSV re-release)"
SPLITS = ("train", "test")
# Named colours for the colour-change template; a plain list so a reader can see them.
COLOURS = ("red", "blue", "green", "yellow", "black", "white", "silver", "orange",
           "purple", "pink")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class CarsError(AnnotationError):
    """A Stanford Cars file is missing or malformed; the message names it."""


@dataclasses.dataclass(frozen=True)
class CarRecord:
    """One annotated photo: its path, box (x1, y1, x2, y2) and 1-based class."""

    image: Path
    fname: str
    bbox: tuple[int, int, int, int]
    label: int
    class_name: str


# --- the devkit (.mat) layout --------------------------------------------------------

def _loadmat(file: Path) -> dict:
    if not file.is_file():
        raise CarsError(f"{file} is missing; the Stanford Cars devkit layout needs it "
                       "(unpack car_devkit.tgz, and cars_test_annos_withlabels.mat for "
                       "the test split, into the dataset folder)")
    from scipy.io import loadmat  # scipy is only needed for this layout
    try:
        return loadmat(str(file))
    except Exception as exc:  # scipy raises several types for a bad file
        raise CarsError(f"{file} is not a readable MATLAB .mat file ({exc})") from exc


def _scalar(value: Any) -> Any:
    arr = np.asarray(value).ravel()
    if arr.size != 1:
        raise ValueError(f"expected one value, found {arr.size}")
    out = arr[0]
    # Cells nest arrays inside object arrays; unwrap until a plain value.
    while isinstance(out, np.ndarray):
        out = _scalar(out)
    return out


def read_class_names_mat(file: Path) -> list[str]:
    """The class names of ``cars_meta.mat`` ('class_names'), in label order."""
    data = _loadmat(file)
    if "class_names" not in data:
        raise CarsError(f"{file} has no 'class_names' variable; expected the devkit's "
                        "cars_meta.mat")
    names = []
    for i, cell in enumerate(np.asarray(data["class_names"]).ravel()):
        try:
            names.append(str(_scalar(cell)).strip())
        except ValueError as exc:
            raise CarsError(f"{file}: class_names entry {i + 1} is not a string ({exc})") \
                from exc
    if not names:
        raise CarsError(f"{file}: 'class_names' is empty")
    return names


_BOX_FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")


def read_annotations_mat(file: Path) -> list[tuple[str, tuple[int, int, int, int], int]]:
    """(fname, box, 1-based class) for each entry of an annotations .mat file."""
    data = _loadmat(file)
    if "annotations" not in data:
        raise CarsError(f"{file} has no 'annotations' variable; expected a Stanford Cars "
                        "annotations file (a struct array)")
    annos = np.asarray(data["annotations"])
    names = annos.dtype.names or ()
    missing = [f for f in (*_BOX_FIELDS, "class", "fname") if f not in names]
    if missing:
        raise CarsError(f"{file}: the 'annotations' struct lacks the fields "
                        f"{', '.join(missing)}; expected bbox_x1, bbox_y1, bbox_x2, "
                        "bbox_y2, class, fname (cars_test_annos.mat has no class: use "
                        "cars_test_annos_withlabels.mat)")
    out = []
    for i, entry in enumerate(annos.ravel()):
        try:
            box = tuple(int(_scalar(entry[f])) for f in _BOX_FIELDS)
            label = int(_scalar(entry["class"]))
            fname = str(_scalar(entry["fname"])).strip()
        except (ValueError, TypeError) as exc:
            raise CarsError(f"{file}: annotation {i + 1} is malformed ({exc})") from exc
        out.append((fname, box, label))
    return out


# --- the CSV re-release ----------------------------------------------------------------

def read_class_names_csv(file: Path) -> list[str]:
    """The class names of ``names.csv``, one a line, in label order."""
    if not file.is_file():
        raise CarsError(f"{file} is missing; the CSV layout of Stanford Cars needs it "
                        "(one class name a line)")
    names = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
    names = [n for n in names if n]
    if not names:
        raise CarsError(f"{file} is empty; expected one class name a line")
    return names


def read_annotations_csv(file: Path) -> list[tuple[str, tuple[int, int, int, int], int]]:
    """(fname, box, 1-based class) for each row of anno_train.csv / anno_test.csv."""
    if not file.is_file():
        raise CarsError(f"{file} is missing; the CSV layout of Stanford Cars needs it "
                        "(rows fname,x1,y1,x2,y2,class)")
    out = []
    with file.open(newline="", encoding="utf-8") as fh:
        for n, row in enumerate(csv.reader(fh), start=1):
            if not row or not "".join(row).strip():
                continue
            if len(row) != 6:
                raise CarsError(f"{file}, line {n}: {len(row)} columns; expected 6 "
                                "(fname,x1,y1,x2,y2,class)")
            try:
                box = tuple(int(float(v)) for v in row[1:5])
                label = int(row[5])
            except ValueError as exc:
                if n == 1:  # a header row some copies carry
                    continue
                raise CarsError(f"{file}, line {n}: not numbers where the box and class "
                                f"go ({exc})") from exc
            out.append((row[0].strip(), box, label))
    if not out:
        raise CarsError(f"{file} has no annotation rows")
    return out


# --- layout detection and records -------------------------------------------------------

def _devkit_files(folder: Path, split: str) -> tuple[Path, Path, Path]:
    meta = folder / "devkit" / "cars_meta.mat"
    if split == "train":
        annos = folder / "devkit" / "cars_train_annos.mat"
    else:
        annos = folder / "cars_test_annos_withlabels.mat"
        if not annos.is_file() and (folder / "devkit" / annos.name).is_file():
            annos = folder / "devkit" / annos.name
    return meta, annos, folder / f"cars_{split}"


def layout(folder: Path) -> str | None:
    """'devkit', 'csv' or None for a folder that holds neither layout."""
    folder = Path(folder)
    if (folder / "devkit" / "cars_meta.mat").is_file():
        return "devkit"
    if (folder / "names.csv").is_file() and any(
            (folder / f"anno_{s}.csv").is_file() for s in SPLITS):
        return "csv"
    return None


def detect(folder: Path) -> bool:
    return layout(Path(folder)) is not None


def _csv_images(folder: Path, split: str) -> dict[str, Path]:
    # Kaggle's copy nests car_data/car_data/<split>/<class folder>/; class folders replace
    # characters such as '/' in names, so photos are found by file name (unique per split).
    for base in (folder / "car_data" / "car_data" / split, folder / "car_data" / split,
                 folder / split):
        if base.is_dir():
            return {p.name: p for p in base.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES}
    raise CarsError(f"{folder}: no folder of {split} photos; expected car_data/car_data/"
                    f"{split}/, car_data/{split}/ or {split}/")


def records(folder: Path, split: str) -> list[CarRecord]:
    """Every annotated photo of one split, in the annotation file's order."""
    folder = Path(folder)
    if split not in SPLITS:
        raise CarsError(f"Stanford Cars has no split {split!r}; choose one of "
                        f"{', '.join(SPLITS)}")
    kind = layout(folder)
    if kind == "devkit":
        meta, annos_file, images = _devkit_files(folder, split)
        names = read_class_names_mat(meta)
        annos = read_annotations_mat(annos_file)

        def locate(fname: str) -> Path | None:
            return images / fname
    elif kind == "csv":
        annos_file = folder / f"anno_{split}.csv"
        names = read_class_names_csv(folder / "names.csv")
        annos = read_annotations_csv(annos_file)
        found = _csv_images(folder, split)

        def locate(fname: str) -> Path | None:
            return found.get(fname)
    else:
        raise CarsError(f"{folder} holds neither Stanford Cars layout; expected "
                        "devkit/cars_meta.mat (devkit) or names.csv with anno_<split>.csv")
    out = []
    for fname, box, label in annos:
        if not 1 <= label <= len(names):
            raise CarsError(f"{annos_file}: {fname} has class {label}; the class names "
                            f"list {len(names)} classes (1-based)")
        x1, y1, x2, y2 = box
        if x2 < x1 or y2 < y1:
            raise CarsError(f"{annos_file}: {fname} has box {box}; expected x1 <= x2 and "
                            "y1 <= y2")
        path = locate(fname)
        if path is None or not path.is_file():
            raise CarsError(f"{annos_file}: the photo {fname} is not under the {split} "
                            "photos folder")
        out.append(CarRecord(image=path, fname=fname, bbox=box, label=label,
                             class_name=names[label - 1]))
    return out


# --- instructions -----------------------------------------------------------------------

def instruction(rec: CarRecord, names: list[str], rng: random.Random) -> dict[str, Any]:
    """The edit of one photo: a colour change or a model change, drawn by ``rng``.

    Templates: "make the car <colour>" (target prompt "a photo of a <colour> <class>") and
    "turn the car into a(n) <other class>" (target prompt "a photo of a(n) <other class>").
    For attribute accuracy the edit is named as a multi-valued attribute:
    ``target_attribute`` "colour" or "class" and ``target_value`` the colour or class
    asked for (see :func:`attribute_specs`)."""
    others = [n for n in dict.fromkeys(names) if n != rec.class_name]
    source = f"a photo of {with_article(rec.class_name)}"
    if others and rng.random() < 0.5:
        target = rng.choice(others)
        return {"instruction": f"turn the car into {with_article(target)}",
                "source_prompt": source, "target_prompt": f"a photo of {with_article(target)}",
                "edit_words": target.split(), "object": "car",
                "edit_kind": "model", "target_attribute": "class", "target_value": target}
    colour = rng.choice(COLOURS)
    return {"instruction": f"make the car {colour}", "source_prompt": source,
            "target_prompt": f"a photo of a {colour} {rec.class_name}",
            "edit_words": [colour], "object": "car",
            "edit_kind": "colour", "target_attribute": "colour", "target_value": colour}


def attribute_specs(folder: Path) -> dict[str, dict[str, Any]]:
    """What an attribute classifier reads for these edits, as plain data: each attribute's
    values and a prompt template with ``{object}`` and ``{value}``."""
    return {"colour": {"values": list(COLOURS), "template": "a photo of a {value} {object}"},
            "class": {"values": list(dict.fromkeys(class_names(folder))),
                      "template": "a photo of a {value}"}}


def class_names(folder: Path) -> list[str]:
    folder = Path(folder)
    if layout(folder) == "devkit":
        return read_class_names_mat(folder / "devkit" / "cars_meta.mat")
    return read_class_names_csv(folder / "names.csv")


def _mask_box(box: tuple[int, int, int, int]) -> list[int]:
    # Published boxes are 1-based with both corners inside (MATLAB); the mask description
    # is 0-based with the far corner outside, so only the near corner moves.
    x1, y1, x2, y2 = box
    return [x1 - 1, y1 - 1, x2, y2]


def items(folder: Path, *, split: str | None = "test", limit: int | None = None,
          seed: int = 0) -> list[Item]:
    """The photos of ``split`` (None: both) as edit items, ``limit`` of them drawn with
    ``seed``; the mask is the car's box, the class and box travel as extra fields."""
    folder = Path(folder)
    split = check_split(NAME, split, SPLITS)
    recs = [(s, rec) for s in ((split,) if split else SPLITS)
            if split or _has_split(folder, s) for rec in records(folder, s)]
    names = class_names(folder)
    out = []
    for s, rec in recs:
        item_id = f"{s}_{Path(rec.fname).stem}"
        edit = instruction(rec, names, random.Random(f"{seed}:{item_id}"))
        out.append(make_item(item_id, rec.image, mask_spec={"box": _mask_box(rec.bbox)},
                             bbox=list(rec.bbox), label=rec.label, split=s,
                             attributes={"class": rec.class_name}, **{"class": rec.class_name},
                             **edit))
    return select(out, limit, seed)


def _has_split(folder: Path, split: str) -> bool:
    # With every split asked for, a copy without the test annotations still gives train.
    if layout(folder) == "devkit":
        return _devkit_files(folder, split)[1].is_file()
    return (folder / f"anno_{split}.csv").is_file()
