"""MS-COCO in its published layout: each photo becomes a caption-based edit that turns one
of its annotated objects, as a caption names it, into another category ("turn the dog
into a cat"), masked by the object's segmentation.

Layout read (``--dataset`` is the folder holding these; the 2014 names are read when the
2017 ones are not there)::

    annotations/instances_{train,val}2017.json   images, annotations, categories
    annotations/captions_{train,val}2017.json    annotations: {image_id, caption}
    train2017/, val2017/                         the photos (file_name of each image)

Splits: ``train`` and ``val``. ``--split test`` is refused: COCO publishes no instance or
caption annotations for its test images, so ``val`` is the split to evaluate on. Without
``--split`` every split whose instances file is there is read. Only the chosen split's
files are read (the train instances file is 448 MB; val's 25 MB).

Instruction template (the choice depends only on the image, not ``--seed``):

* the object: among the categories the image is annotated with, those a caption mentions
  (the category's name or one of its caption words in :data:`NOUNS`, singular or plural,
  longest match first, so "hot dog" is not a dog); of these the one with the largest
  annotation. Photos with no mentioned category get no item;
* the caption: the first of the image's captions that mentions it, at its first mention;
* the new category: another category of the same supercategory drawn from the image id
  (a category alone in its supercategory, ``person``, becomes one of
  :data:`STAND_INS`); named by its first caption word;
* ``instruction`` ``"turn the <mention> into a(n) <new>"`` (plural mentions: ``"turn the
  dogs into cats"``); ``source_prompt`` the caption; ``target_prompt`` the caption with
  the mention replaced (plural kept, an "a"/"an" right before it corrected);
  ``edit_words`` the new words; ``object`` the mention as the caption writes it (the
  word an attention mask looks for in the source prompt).

Mask: the object's segmentation, decoded by pycocotools at render time (polygons, and
run-length encodings with uncompressed counts, which crowd annotations use, or
compressed ones): the largest non-crowd annotation of the category for a singular
mention, the union of all its annotations for a plural one. Extra fields: ``split``,
``image_id``, ``category`` (COCO's name), ``class`` / ``target_class`` (the caption
words of the old and new category), ``annotation_ids``, ``edit`` ("category"); for
attribute accuracy ``target_attribute`` "class", ``target_value`` the new class and
``attributes`` ``{"class": <old class>}`` (see :func:`attribute_specs`). Item ids are the
photos' file names without the extension.
"""

from __future__ import annotations

import json
import re
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ..dataset import DatasetError, Item
from . import AnnotationError, check_split, make_item, need_file, select, with_article

NAME = "ms-coco"
DESCRIPTION = "MS-COCO: annotations/instances_*.json and captions_*.json, train2017/, val2017/"
SPLITS = ("train", "val")
YEARS = ("2017", "2014")

# Caption words of the categories whose name is not how captions say it; the first word
# names the category in new prompts. Categories not listed are said by their name.
NOUNS = {
    "person": ("person", "man", "woman", "boy", "girl", "child", "kid", "guy", "lady",
               "player", "skier", "surfer", "skateboarder", "snowboarder"),
    "bicycle": ("bicycle", "bike"), "motorcycle": ("motorcycle", "motorbike"),
    "airplane": ("airplane", "plane", "jet"), "tv": ("television", "tv"),
    "couch": ("couch", "sofa"), "dining table": ("table", "dining table"),
    "potted plant": ("potted plant", "plant", "houseplant"),
    "cell phone": ("cell phone", "phone", "cellphone"), "sports ball": ("ball",),
    "hair drier": ("hair dryer", "hair drier", "blow dryer"),
    "donut": ("donut", "doughnut"), "refrigerator": ("refrigerator", "fridge"),
    "skis": ("pair of skis", "ski"), "scissors": ("pair of scissors",),
    "baseball glove": ("baseball glove", "glove", "mitt"),
    "tennis racket": ("tennis racket", "racket", "racquet"), "cup": ("cup", "mug"),
    "remote": ("remote", "remote control"),
}
PLURALS = {"person": "people", "man": "men", "woman": "women", "child": "children",
           "mouse": "mice", "knife": "knives", "sheep": "sheep", "pair of skis": "skis",
           "pair of scissors": "scissors"}
# What a category alone in its supercategory turns into.
STAND_INS = {"person": ("robot", "statue")}
_WORD = re.compile(r"[A-Za-z]+")


class CocoError(AnnotationError):
    """A COCO annotation file is missing or malformed; the message names it."""


def plural(noun: str) -> str:
    """'dog' -> 'dogs', 'hot dog' -> 'hot dogs', 'bus' -> 'buses', 'man' -> 'men'."""
    if noun in PLURALS:
        return PLURALS[noun]
    head, _, last = noun.rpartition(" ")
    if last in PLURALS:
        return f"{head} {PLURALS[last]}".strip()
    end = "es" if last.endswith(("s", "sh", "ch", "x")) else "s"
    return f"{noun}{end}"


def caption_word(category: str) -> str:
    return NOUNS.get(category, (category,))[0]


def detect(folder: Path) -> bool:
    ann = Path(folder) / "annotations"
    return any((ann / f"instances_{s}{y}.json").is_file() for s in SPLITS for y in YEARS)


def _year(folder: Path, split: str) -> str | None:
    for year in YEARS:
        if (folder / "annotations" / f"instances_{split}{year}.json").is_file():
            return year
    return None


def _load_json(file: Path, keys: tuple[str, ...], what: str) -> dict:
    try:
        with open(file, "rb") as fh:
            data = json.load(fh)
    except OSError as exc:
        raise CocoError(f"cannot read {file}: {exc}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f" (line {exc.lineno}, column {exc.colno}: {exc.msg})" \
            if isinstance(exc, json.JSONDecodeError) else ""
        raise CocoError(f"{file} is not valid JSON{where}; expected COCO's {what}") from None
    if not isinstance(data, dict):
        raise CocoError(f"{file}: expected a JSON object with {', '.join(keys)} ({what})")
    for key in keys:
        if not isinstance(data.get(key), list):
            raise CocoError(f"{file} has no '{key}' list; expected COCO's {what} "
                            f"(an object with {', '.join(keys)})")
    return data


def _entry(file: Path, entry: Any, keys: tuple[str, ...], what: str) -> None:
    missing = [k for k in keys if not isinstance(entry, dict) or k not in entry]
    if missing:
        shown = f"with id {entry.get('id')!r}" if isinstance(entry, dict) else \
            json.dumps(entry)[:60]
        raise CocoError(f"{file}: the {what} {shown} lacks {', '.join(missing)}; expected "
                        f"the fields {', '.join(keys)}")


# --- mentions ---------------------------------------------------------------------------

def _forms(categories: dict[int, dict]) -> dict[tuple[str, ...], tuple[int, str, bool]]:
    """Word sequence -> (category id, singular caption word, plural?)."""
    forms: dict[tuple[str, ...], tuple[int, str, bool]] = {}
    for cat_id, cat in categories.items():
        for word in NOUNS.get(cat["name"], (cat["name"],)):
            forms.setdefault(tuple(word.split()), (cat_id, word, False))
            forms.setdefault(tuple(plural(word).split()), (cat_id, word, True))
    return forms


def mentions(caption: str, forms: dict) -> list[tuple[int, str, bool, int, int]]:
    """(category id, singular word, plural?, start, end) of each category the caption
    names, left to right, longest match first; start/end are character offsets."""
    words = [(m.group().lower(), m.start(), m.end()) for m in _WORD.finditer(caption)]
    out, i = [], 0
    while i < len(words):
        for n in (3, 2, 1):
            key = tuple(w for w, _, _ in words[i:i + n])
            if len(key) == n and key in forms:
                cat_id, word, is_plural = forms[key]
                out.append((cat_id, word, is_plural, words[i][1], words[i + n - 1][2]))
                i += n
                break
        else:
            i += 1
    return out


def _replace(caption: str, start: int, end: int, new: str) -> str:
    """The caption with [start, end) replaced by ``new`` (capitalised when the mention
    was); an 'a'/'an' right before it follows the new word."""
    if caption[start:start + 1].isupper():
        new = new[:1].upper() + new[1:]
    before = caption[:start]
    article = re.search(r"\b(an?)(\s+)$", before, flags=re.IGNORECASE)
    if article:
        wanted = with_article(new).split(" ", 1)[0]
        if article.group(1)[0].isupper():
            wanted = wanted.capitalize()
        before = before[:article.start(1)] + wanted + article.group(2)
    return before + new + caption[end:]


# --- segmentations ---------------------------------------------------------------------

def _rle_string_counts(counts: str) -> list[int]:
    """The run lengths of a compressed COCO RLE string (characters from '0' carry 5 bits
    each, 0x20 continues a number, 0x10 of the last one is its sign; from the third run
    on a number is the difference to the run two before), read here so a damaged string
    is refused before pycocotools' decoder, which does not check it, writes past the
    mask."""
    out: list[int] = []
    p = 0
    while p < len(counts):
        x = k = 0
        more = True
        while more:
            if p >= len(counts):
                raise ValueError("the counts string ends inside a number")
            c = ord(counts[p]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"character {counts[p]!r} is not an RLE digit")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(out) > 2:
            x += out[-2]
        out.append(x)
    return out


def segmentation_problem(seg: Any) -> str | None:
    """What is wrong with a COCO segmentation (None when pycocotools can decode it)."""
    if isinstance(seg, list):
        polys = [p for p in seg if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]
        if not polys:
            return "no polygon of at least 3 points"
        if any(not isinstance(v, (int, float)) for p in polys for v in p):
            return "polygon coordinates that are not numbers"
        return None
    if not isinstance(seg, dict) or "counts" not in seg or "size" not in seg:
        return "neither polygons [[x, y, ...]] nor a run-length encoding {size, counts}"
    size = seg["size"]
    if not (isinstance(size, list) and len(size) == 2
            and all(isinstance(v, int) and v > 0 for v in size)):
        return f"RLE size {size!r}; expected [height, width]"
    counts = seg["counts"]
    try:
        if isinstance(counts, str):
            runs = _rle_string_counts(counts)
        elif isinstance(counts, list) and all(isinstance(v, int) for v in counts):
            runs = counts
        else:
            return "RLE counts that are neither a list of numbers nor a string"
    except ValueError as exc:
        return f"compressed RLE counts that cannot be read ({exc})"
    if any(v < 0 for v in runs) or sum(runs) != size[0] * size[1]:
        return (f"RLE counts that add up to {sum(runs)} pixels, not the {size[0]} x "
                f"{size[1]} of its size")
    return None


def _pycocotools():
    try:
        from pycocotools import mask as coco_mask
    except ImportError:
        raise DatasetError("MS-COCO's segmentation masks need pycocotools: pip install "
                           "pycocotools (or xmgie[datasets])") from None
    return coco_mask


def segmentation_mask(spec: dict, size: tuple[int, int]) -> np.ndarray:
    """The ``{"coco": ...}`` mask description (see :mod:`runner.datasets`) as float32
    [H, W] at the photo's ``size`` (width, height), decoded by pycocotools."""
    coco_mask = _pycocotools()
    seg, h, w = spec.get("segmentation"), int(spec["height"]), int(spec["width"])
    problem = segmentation_problem(seg)
    if problem:
        raise AnnotationError(f"a COCO segmentation mask description has {problem}")
    if isinstance(seg, list):
        polys = [[float(v) for v in p] for p in seg if len(p) >= 6]
        rle = coco_mask.merge(coco_mask.frPyObjects(polys, h, w))
    elif isinstance(seg["counts"], list):
        rle = coco_mask.frPyObjects(seg, *seg["size"])
    else:
        rle = {"size": list(seg["size"]), "counts": seg["counts"].encode("ascii")}
    with warnings.catch_warnings():
        # pycocotools' decode trips numpy 2's copy-keyword deprecation; nothing to act on.
        warnings.simplefilter("ignore", DeprecationWarning)
        mask = coco_mask.decode(rle).astype(np.float32)
    width, height = size
    if mask.shape != (height, width):
        from PIL import Image

        mask = np.asarray(Image.fromarray(mask).resize((width, height), Image.NEAREST))
    return (mask > 0).astype(np.float32)


# --- items -----------------------------------------------------------------------------

def _split_data(folder: Path, split: str) -> dict[str, Any]:
    """The split's images, categories, annotations by image and captions by image."""
    year = _year(folder, split)
    if year is None:
        need_file(folder, f"annotations/instances_{split}2017.json",
                  what=f"COCO's {split} instances (instances_{split}2014.json is read too)")
    instances_file = folder / "annotations" / f"instances_{split}{year}.json"
    captions_file = need_file(folder, f"annotations/captions_{split}{year}.json",
                              what=f"the {split} captions, from annotations_trainval{year}")
    data = _load_json(instances_file, ("images", "annotations", "categories"),
                      "instances file")
    images = {}
    for entry in data["images"]:
        _entry(instances_file, entry, ("id", "file_name", "height", "width"), "image")
        images[entry["id"]] = entry
    categories = {}
    for entry in data["categories"]:
        _entry(instances_file, entry, ("id", "name"), "category")
        categories[entry["id"]] = entry
    by_image: dict[int, list[dict]] = {}
    for ann in data["annotations"]:
        _entry(instances_file, ann, ("id", "image_id", "category_id", "segmentation"),
               "annotation")
        if ann["image_id"] not in images:
            raise CocoError(f"{instances_file}: annotation {ann['id']} is of image "
                            f"{ann['image_id']}, which its images list does not hold")
        if ann["category_id"] not in categories:
            raise CocoError(f"{instances_file}: annotation {ann['id']} has category "
                            f"{ann['category_id']}, which its categories list does not hold")
        by_image.setdefault(ann["image_id"], []).append(ann)
    captions: dict[int, list[str]] = {}
    for entry in _load_json(captions_file, ("annotations",), "captions file")["annotations"]:
        _entry(captions_file, entry, ("image_id", "caption"), "caption annotation")
        captions.setdefault(entry["image_id"], []).append(str(entry["caption"]).strip())
    return {"split": split, "year": year, "file": instances_file, "images": images,
            "categories": categories, "annotations": by_image, "captions": captions,
            "photos": folder / f"{split}{year}"}


def _area(ann: dict) -> float:
    area = ann.get("area")
    return float(area) if isinstance(area, (int, float)) else 0.0


def _drawable(seg: Any) -> bool:
    # Cheap shape test for choosing the object; the chosen one's segmentation is checked
    # in full (segmentation_problem). Polygons under 3 points, which the published files
    # hold a few of, cannot be drawn and are passed over.
    if isinstance(seg, list):
        return any(isinstance(p, list) and len(p) >= 6 for p in seg)
    return isinstance(seg, dict)


def _choose(data: dict, image_id: int, forms: dict):
    """(category id, caption, mention, new category) of the mentioned category with the
    largest annotation, or None."""
    largest: dict[int, float] = {}
    for ann in data["annotations"].get(image_id, []):
        if _drawable(ann["segmentation"]):
            cat = ann["category_id"]
            largest[cat] = max(largest.get(cat, -1.0), _area(ann))
    best = None
    for caption in data["captions"].get(image_id, []):
        for found in mentions(caption, forms):
            cat_id = found[0]
            if cat_id in largest and (best is None or largest[cat_id] > largest[best[0]]):
                best = (cat_id, caption, found)
    if best is None:
        return None
    new = _new_category(best[0], data["categories"], image_id)
    return None if new is None else (*best, new)


def _new_category(cat_id: int, categories: dict[int, dict], image_id: int) -> str | None:
    """The caption word of the category the object turns into, drawn from the image id."""
    name = categories[cat_id]["name"]
    family = categories[cat_id].get("supercategory")
    options = [caption_word(c["name"]) for i, c in sorted(categories.items())
               if i != cat_id and c.get("supercategory") == family]
    if not options:
        options = list(STAND_INS.get(name, ())) or [
            caption_word(c["name"]) for i, c in sorted(categories.items()) if i != cat_id]
    if not options:
        return None
    rng = np.random.default_rng(zlib.crc32(f"coco:{image_id}".encode()))
    return options[int(rng.integers(len(options)))]


def _item(data: dict, image_id: int, choice: tuple) -> Item:
    cat_id, caption, (_, word, is_plural, start, end), new = choice
    image, file = data["images"][image_id], data["file"]
    same = sorted((a for a in data["annotations"][image_id]
                   if a["category_id"] == cat_id and _drawable(a["segmentation"])),
                  key=lambda a: (-_area(a), a["id"]))
    if not is_plural:
        same = [next((a for a in same if not a.get("iscrowd")), same[0])]
    specs = []
    for ann in same:
        problem = segmentation_problem(ann["segmentation"])
        if problem:
            raise CocoError(f"{file}: annotation {ann['id']} (image {image_id}) has a "
                            f"segmentation with {problem}")
        specs.append({"coco": {"segmentation": ann["segmentation"],
                               "height": image["height"], "width": image["width"]}})
    photo = data["photos"] / image["file_name"]
    if not photo.is_file():
        raise CocoError(f"{file} lists the photo {image['file_name']}, which is not in "
                        f"{data['photos']}")
    new_text = plural(new) if is_plural else new
    mention = plural(word) if is_plural else word
    category = data["categories"][cat_id]["name"]
    old_class = caption_word(category)
    return make_item(
        Path(image["file_name"]).stem, photo,
        instruction=f"turn the {mention} into "
                    f"{new_text if is_plural else with_article(new_text)}",
        source_prompt=caption, target_prompt=_replace(caption, start, end, new_text),
        edit_words=new_text.split(), object=caption[start:end].lower(),
        mask_spec=specs[0] if len(specs) == 1 else {"union": specs},
        split=data["split"], image_id=image_id, category=category, **{"class": old_class},
        target_class=new, annotation_ids=[a["id"] for a in same], edit="category",
        target_attribute="class", target_value=new, attributes={"class": old_class})


def items(folder: Path, *, split: str | None = None, limit: int | None = None,
          seed: int = 0) -> list[Item]:
    folder = Path(folder)
    if split is not None and split.startswith("test"):
        raise DatasetError(f"--split {split}: MS-COCO publishes no instance or caption "
                           "annotations for its test images; evaluate on --split val")
    split = check_split(NAME, split, SPLITS, aliases={"validation": "val"})
    _pycocotools()  # refused before the long read of a large instances file
    eligible = []
    for name in [split] if split else [s for s in SPLITS if _year(folder, s)]:
        data = _split_data(folder, name)
        forms = _forms(data["categories"])
        for image_id in sorted(data["images"]):
            choice = _choose(data, image_id, forms)
            if choice is not None:
                eligible.append((data, image_id, choice))
    # The mask and prompt are built (and the photo looked for) for the chosen ones only.
    return [_item(*entry) for entry in select(eligible, limit, seed)]


def attribute_specs(folder: Path) -> dict[str, dict[str, Any]]:
    """What an attribute classifier reads for these edits, as plain data: the class
    values (every category's caption word and the stand-ins) and a prompt template."""
    folder = Path(folder)
    split = next((s for s in ("val", "train") if _year(folder, s)), None)
    if split is None:
        raise CocoError(f"{folder} holds no annotations/instances_{{train,val}}2017.json")
    file = folder / "annotations" / f"instances_{split}{_year(folder, split)}.json"
    cats = _load_json(file, ("categories",), "instances file")["categories"]
    values = [caption_word(c["name"]) for c in cats if isinstance(c, dict) and "name" in c]
    values += [s for stand in STAND_INS.values() for s in stand]
    return {"class": {"values": list(dict.fromkeys(values)), "template": "a photo of a {value}"}}
