"""CUB-200-2011 in its published layout: each photo becomes a colour-flip edit of one of
its annotated part colours (a species change when it has none).

Layout read (``--dataset`` is the ``CUB_200_2011`` folder or the folder holding it)::

    images.txt                          <image_id> <class folder>/<file>.jpg
    images/<class folder>/<file>.jpg
    image_class_labels.txt              <image_id> <class_id>
    classes.txt                         <class_id> <nnn.Species_Name>
    train_test_split.txt                <image_id> <1 train | 0 test>
    bounding_boxes.txt                  <image_id> <x> <y> <width> <height>
    attributes/image_attribute_labels.txt
                                        <image_id> <attribute_id> <is_present> <certainty> ...
    attributes.txt (also attributes/attributes.txt or ../attributes.txt)
                                        <attribute_id> has_<part>_color::<colour> ...
    parts/parts.txt, parts/part_locs.txt   (optional) <part_id> <name>;
                                        <image_id> <part_id> <x> <y> <visible>

Every file but the parts is required; a missing or malformed one is named in the error.

Instruction template (the edited attribute is kept as ``target_attribute``, for
attribute accuracy):

* colour flip: of the photo's present ``has_<part>_color::<c>`` attributes (those with
  certainty 3 "probably" or 4 "definitely" first), one is chosen, and a colour ``n`` that
  attributes.txt lists for that part and the photo does not have:
  ``"make the bird's <part> <n>"`` (``"make the bird <n>"`` for the primary colour);
  ``source_prompt`` ``"a photo of a <species> with a <c> <part>"``, ``target_prompt``
  the same with ``n``; ``edit_words`` ``[n]``; ``object`` the part;
  ``source_attribute`` / ``target_attribute`` ``has_<part>_color::<c>`` / ``::<n>``;
* species change (no colour attribute present): ``"turn the bird into a <other>"``,
  the other species drawn from classes.txt; ``target_class`` names it.

The choice depends only on the image id (not ``--seed``), so an item is the same edit in
every run. Extra fields: ``class``, ``class_id``, ``split``, ``bbox`` [x, y, w, h],
``attributes`` (the present attribute names), ``edit`` ("colour" or "species").

Mask: discs around the edited part's visible part locations (radius 15% of the larger
side of the bounding box) when parts are given, else the bounding box.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from ..dataset import Item
from . import (
    AnnotationError,
    check_split,
    make_item,
    need_file,
    read_table,
    select,
    with_article,
)

NAME = "cub-200-2011"
DESCRIPTION = "CUB-200-2011 birds: images.txt, labels, boxes, attributes, parts"
SPLITS = ("train", "test")
PART_RADIUS = 0.15
# Which part locations (parts/parts.txt names) show the part an attribute names.
_PART_LOCS = {"bill": ["beak"], "wing": ["left wing", "right wing"],
              "upperparts": ["back", "nape"], "underparts": ["belly", "breast"],
              "upper_tail": ["tail"], "under_tail": ["tail"], "eye": ["left eye", "right eye"],
              "leg": ["left leg", "right leg"], "primary": []}


def _root(folder: Path) -> Path:
    return folder / "CUB_200_2011" if (folder / "CUB_200_2011" / "images.txt").is_file() \
        else folder


def detect(folder: Path) -> bool:
    root = _root(Path(folder))
    return (root / "images.txt").is_file() and (root / "image_class_labels.txt").is_file()


def species_name(raw: str) -> str:
    """'001.Black_footed_Albatross' -> 'black footed albatross'."""
    return raw.split(".", 1)[-1].replace("_", " ").strip().lower()


def items(folder: Path, *, split: str | None = None, limit: int | None = None,
          seed: int = 0) -> list[Item]:
    root = _root(Path(folder))
    split = check_split(NAME, split, SPLITS)
    images = {i: name for i, name in read_table(
        root / "images.txt", (int,), rest=True, what="<image_id> <path>")}
    labels = dict(read_table(need_file(root, "image_class_labels.txt"), (int, int),
                             what="<image_id> <class_id>"))
    classes = {i: name for i, name in read_table(
        need_file(root, "classes.txt"), (int,), rest=True, what="<class_id> <name>")}
    splits = {i: ("train" if flag == 1 else "test") for i, flag in read_table(
        need_file(root, "train_test_split.txt"), (int, int),
        what="<image_id> <is_training_image>")}
    boxes = {r[0]: r[1:] for r in read_table(
        need_file(root, "bounding_boxes.txt"), (int, float, float, float, float),
        what="<image_id> <x> <y> <width> <height>")}
    attr_file = need_file(root, "attributes/image_attribute_labels.txt",
                          what="per-image attribute labels")
    names_file = need_file(root, "attributes.txt", "attributes/attributes.txt",
                           "../attributes.txt", what="attribute names")
    attr_names = {i: name for i, name in read_table(
        names_file, (int,), rest=True, what="<attribute_id> <name>")}

    for table, file in ((labels, "image_class_labels.txt"), (splits, "train_test_split.txt"),
                        (boxes, "bounding_boxes.txt")):
        missing = sorted(set(images) - set(table))
        if missing:
            raise AnnotationError(f"{root / file} has no line for image id {missing[0]} "
                                  f"(and {len(missing) - 1} more) listed in images.txt")
    for image_id, class_id in labels.items():
        if class_id not in classes:
            raise AnnotationError(f"{root / 'image_class_labels.txt'}: image {image_id} has "
                                  f"class {class_id}, which classes.txt does not list")

    wanted = [i for i in sorted(images) if split is None or splits[i] == split]
    chosen = select(wanted, limit, seed)
    keep = set(chosen)
    present = _present_attributes(attr_file, keep, attr_names)
    part_names, part_locs = _parts(root, keep)
    colours = _colours_by_part(attr_names.values())
    all_classes = sorted(classes)

    out = []
    for image_id in chosen:
        species = species_name(classes[labels[image_id]])
        x, y, w, h = boxes[image_id]
        attrs = present.get(image_id, [])
        extra = {"class": species, "class_id": labels[image_id], "split": splits[image_id],
                 "bbox": [x, y, w, h], "attributes": [a for a, _ in attrs]}
        rng = np.random.default_rng(zlib.crc32(f"cub:{image_id}".encode()))
        box_spec = {"box": [x, y, x + w, y + h]}
        flip = _colour_flip(attrs, colours, rng)
        image = root / "images" / images[image_id]
        if flip is not None:
            part, old, new = flip
            part_text = part.replace("_", " ")
            points = [part_locs[(image_id, pid)] for name in _PART_LOCS.get(part, [part])
                      for pid in part_names.get(name, []) if (image_id, pid) in part_locs]
            spec = {"points": points, "radius": PART_RADIUS * max(w, h)} if points \
                else box_spec
            if part == "primary":
                instruction = f"make the bird {new}"
                source = f"a photo of {with_article(f'{old} {species}')}"
                target = f"a photo of {with_article(f'{new} {species}')}"
            else:
                instruction = f"make the bird's {part_text} {new}"
                source = f"a photo of {with_article(species)} with {with_article(old)} {part_text}"
                target = f"a photo of {with_article(species)} with {with_article(new)} {part_text}"
            out.append(make_item(
                image_id, image, instruction=instruction, source_prompt=source,
                target_prompt=target, edit_words=[new],
                object="bird" if part == "primary" else part_text, mask_spec=spec, **extra,
                edit="colour", source_attribute=f"has_{part}_color::{old}",
                target_attribute=f"has_{part}_color::{new}"))
        else:
            others = [c for c in all_classes if c != labels[image_id]] or all_classes
            other = species_name(classes[others[int(rng.integers(len(others)))]])
            out.append(make_item(
                image_id, image, instruction=f"turn the bird into {with_article(other)}",
                source_prompt=f"a photo of {with_article(species)}",
                target_prompt=f"a photo of {with_article(other)}",
                edit_words=other.split(), object="bird", mask_spec=box_spec, **extra,
                edit="species", target_class=other))
    return out


def _present_attributes(file: Path, keep: set[int],
                        names: dict[int, str]) -> dict[int, list[tuple[str, int]]]:
    """{image_id: [(attribute name, certainty)]} of the present attributes of ``keep``.
    Read line by line (the file has 3.7 million lines; only the kept images are parsed);
    lines with extra fields, which the published file has, are accepted."""
    present: dict[int, list[tuple[str, int]]] = {}
    seen = False
    try:
        handle = open(file, encoding="utf-8", errors="replace")
    except OSError as exc:
        raise AnnotationError(f"cannot read {file}: {exc}") from exc
    with handle:
        for lineno, line in enumerate(handle, 1):
            parts = line.split()
            if not parts:
                continue
            seen = True
            try:
                image_id = int(parts[0])
                if image_id not in keep:
                    continue
                attr_id, is_present, certainty = int(parts[1]), int(parts[2]), int(parts[3])
            except (ValueError, IndexError):
                raise AnnotationError(
                    f"{file}, line {lineno}: cannot read {line.strip()[:80]!r}; expected "
                    "<image_id> <attribute_id> <is_present> <certainty_id> <time>") from None
            if attr_id not in names:
                raise AnnotationError(f"{file}, line {lineno}: attribute {attr_id} is not "
                                      "listed in attributes.txt")
            if is_present == 1:
                present.setdefault(image_id, []).append((names[attr_id], certainty))
    if not seen:
        raise AnnotationError(f"{file} is empty; expected <image_id> <attribute_id> "
                              "<is_present> <certainty_id> <time> lines")
    return present


def _parts(root: Path, keep: set[int]) -> tuple[dict[str, list[int]],
                                                 dict[tuple[int, int], list[float]]]:
    """Part ids by name and the visible part locations of ``keep`` (empty without parts/)."""
    names_file, locs_file = root / "parts" / "parts.txt", root / "parts" / "part_locs.txt"
    if not names_file.is_file() or not locs_file.is_file():
        return {}, {}
    by_name: dict[str, list[int]] = {}
    for pid, name in read_table(names_file, (int,), rest=True, what="<part_id> <name>"):
        by_name.setdefault(name.lower(), []).append(pid)
    locs = {}
    for image_id, pid, x, y, visible in read_table(
            locs_file, (int, int, float, float, int),
            what="<image_id> <part_id> <x> <y> <visible>"):
        if image_id in keep and visible:
            locs[(image_id, pid)] = [x, y]
    return by_name, locs


def _colours_by_part(names) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name in names:
        head, _, value = name.partition("::")
        if head.startswith("has_") and head.endswith("_color") and value:
            out.setdefault(head[4:-6], []).append(value)
    return out


def _colour_flip(attrs: list[tuple[str, int]], colours: dict[str, list[str]],
                 rng: np.random.Generator) -> tuple[str, str, str] | None:
    """(part, present colour, new colour), preferring confident annotations."""
    candidates = []
    for name, certainty in attrs:
        head, _, value = name.partition("::")
        if head.startswith("has_") and head.endswith("_color"):
            candidates.append((certainty >= 3, head[4:-6], value))
    if any(c[0] for c in candidates):
        candidates = [c for c in candidates if c[0]]
    candidates.sort()
    while candidates:
        _, part, old = candidates.pop(int(rng.integers(len(candidates))))
        have = {v for n, _ in attrs for v in [n.partition("::")[2]]
                if n.startswith(f"has_{part}_color::")}
        options = [c for c in colours.get(part, []) if c not in have and c != "iridescent"]
        if options:
            return part, old, options[int(rng.integers(len(options)))]
    return None


# --- attribute accuracy (the hooks evaluation/attributes.py reads) ---------------------------

def attribute_edit(fields: dict) -> dict | None:
    """An item as attribute accuracy reads it: a colour flip asks for the present/absent
    attribute ``target_attribute`` (e.g. ``has_crown_color::blue``), annotated absent on the
    source; the other present attributes are the ones to keep (the flipped-away colour is
    left out: the edit is meant to remove it). A species change asks for ``class``."""
    if fields.get("edit") == "species" and fields.get("target_class"):
        return {"target_attribute": "class", "target_value": fields["target_class"],
                "attributes": {"class": fields["class"]}, "object": "bird"}
    target = fields.get("target_attribute")
    if not target:
        return None
    kept = {a: 1 for a in fields.get("attributes") or [] if a != fields.get("source_attribute")}
    kept[target] = -1
    return {"target_attribute": target, "target_value": "yes", "attributes": kept,
            "object": "bird"}


def _attribute_prompts(name: str) -> tuple[str, str]:
    """Present / absent prompts of one attributes.txt name: 'a photo of a {object} with a
    blue crown' / 'without a blue crown'; 'a photo of a blue {object}' for the primary
    colour; 'whose bill shape is cone' for the other attributes."""
    head, _, value = name.partition("::")
    value = value.replace("_", " ").replace("{", "(").replace("}", ")").strip()
    part = head[4:] if head.startswith("has_") else head
    if part == "primary_color":
        return (f"a photo of {with_article(value)} {{object}}",
                f"a photo of a {{object}} that is not {value}")
    if part.endswith("_color"):
        thing = with_article(f"{value} {part[:-6].replace('_', ' ')}")
        return f"a photo of a {{object}} with {thing}", f"a photo of a {{object}} without {thing}"
    what = part.replace("_", " ")
    return (f"a photo of a {{object}} whose {what} is {value}",
            f"a photo of a {{object}} whose {what} is not {value}")


def attribute_specs(folder: Path) -> dict[str, dict]:
    """Prompt templates for attribute accuracy: every attribute of attributes.txt as a
    present/absent pair (see :func:`_attribute_prompts`), and the species (``class``)
    among every class of classes.txt ('a photo of a <species>, a type of bird')."""
    root = _root(Path(folder))
    names_file = need_file(root, "attributes.txt", "attributes/attributes.txt",
                           "../attributes.txt", what="attribute names")
    specs = {}
    for _, name in read_table(names_file, (int,), rest=True, what="<attribute_id> <name>"):
        present, absent = _attribute_prompts(name)
        specs[name] = {"values": ["yes", "no"], "prompts": {"yes": present, "no": absent}}
    species = [species_name(n) for _, n in read_table(
        need_file(root, "classes.txt"), (int,), rest=True, what="<class_id> <name>")]
    species = list(dict.fromkeys(species))
    specs["class"] = {"values": species, "prompts": {
        s: f"a photo of {with_article(s)}, a type of bird" for s in species}}
    return specs
