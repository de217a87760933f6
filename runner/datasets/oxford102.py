"""Oxford-102 Flowers in its published layout: each photo becomes a species change into
another of the 102 flower classes, masked by its segmentation when one is there.

Layout read (``--dataset`` is the folder holding these)::

    jpg/image_00001.jpg ...        the 8,189 photos (102flowers.tgz)
    imagelabels.mat                'labels': 1 x 8189, the class (1..102) of each photo
    setid.mat                      'trnid', 'valid', 'tstid': 1-based photo numbers
    segmim/segmim_00001.jpg ...    (optional) the segmentations: background painted
                                   pure blue (0, 0, 254), the flower kept

Splits: ``train`` (trnid), ``val`` (valid; ``valid`` is accepted too), ``test`` (tstid).
A missing or malformed .mat file is named in the error.

Instruction template: ``"turn the <class> into a <other class>"`` ("an" before a vowel),
the other class drawn from the image number (not ``--seed``, so an item is the same edit
in every run); ``source_prompt`` ``"a photo of a <class>"``, ``target_prompt`` ``"a
photo of a <other>"``; ``edit_words`` the other class's words; ``object`` ``"flower"``.
Extra fields: ``class``, ``class_id`` (1..102), ``target_class``, ``split``, ``edit``
("species").

Mask: the segmentation's non-blue pixels when ``segmim/segmim_<n>.jpg`` exists, else
none (the whole photo).

Class names: the dataset ships only numbers; :data:`CLASS_NAMES` lists the 102 names in
label order, as published with the dataset's category page.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from ..dataset import Item
from . import (
    AnnotationError,
    check_split,
    load_mat,
    make_item,
    need_file,
    select,
    with_article,
)

NAME = "oxford-102"
DESCRIPTION = "Oxford-102 Flowers: jpg/, imagelabels.mat, setid.mat, segmim/"
SPLITS = ("train", "val", "test")
SPLIT_KEYS = {"train": "trnid", "val": "valid", "test": "tstid"}
BACKGROUND = (0, 0, 254)

CLASS_NAMES = (
    "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea",
    "english marigold", "tiger lily", "moon orchid", "bird of paradise", "monkshood",
    "globe thistle", "snapdragon", "colt's foot", "king protea", "spear thistle",
    "yellow iris", "globe-flower", "purple coneflower", "peruvian lily", "balloon flower",
    "giant white arum lily", "fire lily", "pincushion flower", "fritillary", "red ginger",
    "grape hyacinth", "corn poppy", "prince of wales feathers", "stemless gentian",
    "artichoke", "sweet william", "carnation", "garden phlox", "love in the mist",
    "mexican aster", "alpine sea holly", "ruby-lipped cattleya", "cape flower",
    "great masterwort", "siam tulip", "lenten rose", "barbeton daisy", "daffodil",
    "sword lily", "poinsettia", "bolero deep blue", "wallflower", "marigold", "buttercup",
    "oxeye daisy", "common dandelion", "petunia", "wild pansy", "primula", "sunflower",
    "pelargonium", "bishop of llandaff", "gaura", "geranium", "orange dahlia",
    "pink-yellow dahlia", "cautleya spicata", "japanese anemone", "black-eyed susan",
    "silverbush", "californian poppy", "osteospermum", "spring crocus", "bearded iris",
    "windflower", "tree poppy", "gazania", "azalea", "water lily", "rose", "thorn apple",
    "morning glory", "passion flower", "lotus", "toad lily", "anthurium", "frangipani",
    "clematis", "hibiscus", "columbine", "desert-rose", "tree mallow", "magnolia",
    "cyclamen", "watercress", "canna lily", "hippeastrum", "bee balm", "ball moss",
    "foxglove", "bougainvillea", "camellia", "mallow", "mexican petunia", "bromelia",
    "blanket flower", "trumpet creeper", "blackberry lily",
)


def detect(folder: Path) -> bool:
    folder = Path(folder)
    return (folder / "imagelabels.mat").is_file() and (folder / "jpg").is_dir()


def items(folder: Path, *, split: str | None = None, limit: int | None = None,
          seed: int = 0) -> list[Item]:
    folder = Path(folder)
    split = check_split(NAME, split, SPLITS, aliases={"valid": "val"})
    labels_file = need_file(folder, "imagelabels.mat", what="the class of each photo")
    labels = load_mat(labels_file, ["labels"])["labels"]
    try:
        labels = labels.astype(np.int64)
    except (TypeError, ValueError):
        raise AnnotationError(f"{labels_file}: 'labels' is not a list of numbers") from None
    bad = [int(v) for v in labels if not 1 <= v <= len(CLASS_NAMES)]
    if bad or labels.size == 0:
        raise AnnotationError(f"{labels_file}: 'labels' must hold classes 1..102 "
                              f"(found {bad[0] if bad else 'no labels'})")
    n = labels.size
    split_of: dict[int, str] = {}
    if split is not None or (folder / "setid.mat").exists():
        setid_file = need_file(folder, "setid.mat", what="the train/val/test photo numbers")
        ids = load_mat(setid_file, list(SPLIT_KEYS.values()))
        for name, key in SPLIT_KEYS.items():
            for number in ids[key].astype(np.int64):
                if not 1 <= number <= n:
                    raise AnnotationError(f"{setid_file}: '{key}' lists photo {number}; "
                                          f"imagelabels.mat has photos 1..{n}")
                split_of[int(number)] = name
    wanted = [i for i in range(1, n + 1) if split is None or split_of.get(i) == split]
    out = []
    for number in select(wanted, limit, seed):
        class_id = int(labels[number - 1])
        name = CLASS_NAMES[class_id - 1]
        rng = np.random.default_rng(zlib.crc32(f"oxford102:{number}".encode()))
        other_id = int(rng.integers(len(CLASS_NAMES) - 1)) + 1
        other_id += other_id >= class_id  # any class but its own
        other = CLASS_NAMES[other_id - 1]
        seg = folder / "segmim" / f"segmim_{number:05d}.jpg"
        spec = {"segmentation": str(seg.resolve()), "background": list(BACKGROUND),
                "tolerance": 60} if seg.is_file() else None
        extra = {"class": name, "class_id": class_id, "target_class": other,
                 "edit": "species"}
        if number in split_of:
            extra["split"] = split_of[number]
        out.append(make_item(
            f"image_{number:05d}", folder / "jpg" / f"image_{number:05d}.jpg",
            instruction=f"turn the {name} into {with_article(other)}",
            source_prompt=f"a photo of {with_article(name)}",
            target_prompt=f"a photo of {with_article(other)}",
            edit_words=other.split(), object="flower", mask_spec=spec, **extra))
    return out


# --- attribute accuracy (the hooks evaluation/attributes.py reads) ---------------------------

def attribute_edit(fields: dict) -> dict | None:
    """A species change as attribute accuracy reads it: the attribute ``class``, the
    target class asked for, the photo's class annotated."""
    if not fields.get("target_class"):
        return None
    return {"target_attribute": "class", "target_value": fields["target_class"],
            "attributes": {"class": fields["class"]}, "object": "flower"}


def attribute_specs(folder: Path) -> dict[str, dict]:
    """The 102 classes, each read as 'a photo of a <class>, a type of flower'."""
    names = list(dict.fromkeys(CLASS_NAMES))
    return {"class": {"values": names, "prompts": {
        n: f"a photo of {with_article(n)}, a type of flower" for n in names}}}
