"""CelebA-HQ in the CelebAMask-HQ layout: each face becomes an attribute flip ("make the
hair blond", "remove the eyeglasses") masked by the face parts the attribute lives on.

Layout read (``--dataset`` is the ``CelebAMask-HQ`` folder)::

    CelebA-HQ-img/<n>.jpg                  the 30,000 photos, 1024 x 1024, n = 0..29999
    CelebAMask-HQ-attribute-anno.txt       line 1 the number of photos, line 2 the 40
                                           attribute names, then "<n>.jpg" and 40 values,
                                           1 (present) or -1 (absent)
    CelebAMask-HQ-mask-anno/<k>/<nnnnn>_<part>.png
                                           512 x 512 part masks, white on black, k = n //
                                           2000; a part the face lacks has no file
    CelebA-HQ-to-CelebA-mapping.txt        (optional) "idx orig_idx orig_file" rows
    list_eval_partition.txt                (optional) CelebA's "<file> <0|1|2>" rows, in
                                           this folder, its Eval/, or the folder above

Splits: with the mapping and CelebA's partition file, a photo has the split of its
CelebA original (0 ``train``, 1 ``val``, 2 ``test``). Without them the usual CelebA-HQ
split is used: photos 0..27,999 ``train``, 28,000..29,999 ``test`` (no ``val``).

Instruction template: :data:`FLIPS` lists the attributes edited, each with its
instruction for adding and for removing it (hair colours and styles only add),
present/absent prompts (``{person}`` is "man" or "woman" from ``Male``), the word the
prompts name the edited region by (``object``) and the parts that mask it. Of a photo's
flips (adding an absent attribute, removing a present one) one is drawn from the photo
number (not ``--seed``, so an item is the same edit in every run). ``source_prompt`` /
``target_prompt`` are the attribute's prompts before and after; ``edit_words`` the
words the target prompt adds.

Mask: the union of the flip's part masks that exist for the photo, scaled to the photo
(1024 x 1024) at render time; none (the whole photo) when the face has none of them.

Extra fields: ``split``, ``edit`` ("attribute") and for attribute accuracy
``target_attribute`` (the attribute's name), ``target_value`` (1 when it is added, -1
when removed) and ``attributes``, all 40 annotations (name -> 1 / -1), so "other
attributes kept" is read on every one (prompts: :func:`attribute_specs`).
"""

from __future__ import annotations

import dataclasses
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ..dataset import DatasetError, Item
from . import AnnotationError, check_split, make_item, need_file, select

NAME = "celeba-hq"
DESCRIPTION = "CelebA-HQ in the CelebAMask-HQ layout (images, attribute file, part masks)"
SPLITS = ("train", "val", "test")
IMAGES = "CelebA-HQ-img"
ATTRIBUTE_FILE = "CelebAMask-HQ-attribute-anno.txt"
MASKS = "CelebAMask-HQ-mask-anno"
MAPPING = "CelebA-HQ-to-CelebA-mapping.txt"
PARTITION = "list_eval_partition.txt"
PARTITION_SPLITS = {0: "train", 1: "val", 2: "test"}
FALLBACK_TEST_FROM = 28000   # photos 28,000.. are the test split without CelebA's partition
MASKS_PER_FOLDER = 2000
PARTS = ("skin", "hair", "l_brow", "r_brow", "l_eye", "r_eye", "eye_g", "l_ear", "r_ear",
         "ear_r", "nose", "mouth", "u_lip", "l_lip", "neck", "neck_l", "cloth", "hat")
FACE = ("skin", "hair", "l_brow", "r_brow", "l_eye", "r_eye", "nose", "mouth", "u_lip",
        "l_lip", "l_ear", "r_ear", "neck")


@dataclasses.dataclass(frozen=True)
class Flip:
    """How one attribute is edited: instructions, prompts, the region's word, the parts."""

    add: str | None             # instruction when absent (-1); None: never added
    remove: str | None          # instruction when present (1); None: never removed
    present: str                # prompt of a face with it ({person})
    absent: str                 # prompt of a face without it
    object: str                 # the source prompt's word for the region ({person})
    parts: tuple[str, ...]      # the mask: the union of these part masks
    remove_parts: tuple[str, ...] | None = None   # parts when removing (default: parts)


def _hair(colour: str) -> Flip:
    return Flip(f"make the hair {colour}", None, f"a photo of a {{person}} with {colour} hair",
                "a photo of a {person} with hair", "hair", ("hair",))


FLIPS: dict[str, Flip] = {
    "Black_Hair": _hair("black"),
    "Blond_Hair": _hair("blond"),
    "Brown_Hair": _hair("brown"),
    "Gray_Hair": _hair("gray"),
    "Wavy_Hair": _hair("wavy"),
    "Straight_Hair": _hair("straight"),
    "Bald": Flip("make the person bald", None, "a photo of a bald {person} without hair",
                 "a photo of a {person} with hair", "hair", ("hair",)),
    "Bangs": Flip("give the person bangs", "remove the bangs",
                  "a photo of a {person} with bangs", "a photo of a {person} without bangs",
                  "bangs", ("hair", "skin")),
    "Eyeglasses": Flip("add eyeglasses", "remove the eyeglasses",
                       "a photo of a {person} wearing eyeglasses",
                       "a photo of a {person} without eyeglasses", "eyeglasses",
                       ("eye_g", "l_eye", "r_eye", "l_brow", "r_brow"), ("eye_g",)),
    "Smiling": Flip("make the person smile", "make the person stop smiling",
                    "a photo of a {person} with a smiling mouth",
                    "a photo of a {person} with a neutral mouth", "mouth",
                    ("mouth", "u_lip", "l_lip")),
    "Wearing_Lipstick": Flip("put lipstick on the lips", "remove the lipstick",
                             "a photo of a {person} with lipstick on the lips",
                             "a photo of a {person} with bare lips", "lips", ("u_lip", "l_lip")),
    "Heavy_Makeup": Flip("apply heavy makeup", "remove the makeup",
                         "a photo of a {person} wearing heavy makeup",
                         "a photo of a {person} without makeup", "makeup",
                         ("skin", "l_eye", "r_eye", "l_brow", "r_brow", "u_lip", "l_lip")),
    "Mustache": Flip("add a mustache", "remove the mustache",
                     "a photo of a {person} with a mustache",
                     "a photo of a {person} without a mustache", "mustache",
                     ("skin", "mouth", "u_lip", "l_lip")),
    # No_Beard is annotated 1 for a face without a beard: adding it removes the beard.
    "No_Beard": Flip("remove the beard", "add a beard", "a photo of a {person} without a beard",
                     "a photo of a {person} with a beard", "beard",
                     ("skin", "neck", "mouth", "u_lip", "l_lip")),
    "Wearing_Hat": Flip("add a hat", "remove the hat", "a photo of a {person} wearing a hat",
                        "a photo of a {person} without a hat", "hat", ("hat", "hair"),
                        ("hat",)),
    "Wearing_Earrings": Flip("add earrings", "remove the earrings",
                             "a photo of a {person} wearing earrings",
                             "a photo of a {person} without earrings", "earrings",
                             ("ear_r", "l_ear", "r_ear")),
    "Wearing_Necklace": Flip("add a necklace", "remove the necklace",
                             "a photo of a {person} wearing a necklace",
                             "a photo of a {person} without a necklace", "necklace",
                             ("neck_l", "neck")),
    "Young": Flip("make the person look young", "make the person look old",
                  "a photo of a young {person}", "a photo of an old {person}", "{person}", FACE),
    "Male": Flip("turn the woman into a man", "turn the man into a woman",
                 "a photo of a man", "a photo of a woman", "{person}", FACE),
}

# Present / absent wording of all 40 attributes for the attribute classifier ("a photo of
# a person <phrase>"), so every annotated attribute can be read on the edited face.
PHRASES: dict[str, tuple[str, str]] = {
    "5_o_Clock_Shadow": ("with a five o'clock shadow", "who is clean-shaven"),
    "Arched_Eyebrows": ("with arched eyebrows", "with straight eyebrows"),
    "Attractive": ("who is attractive", "who is plain-looking"),
    "Bags_Under_Eyes": ("with bags under the eyes", "without bags under the eyes"),
    "Bald": ("who is bald", "with a full head of hair"),
    "Bangs": ("with bangs", "without bangs"),
    "Big_Lips": ("with big lips", "with thin lips"),
    "Big_Nose": ("with a big nose", "with a small nose"),
    "Black_Hair": ("with black hair", "without black hair"),
    "Blond_Hair": ("with blond hair", "without blond hair"),
    "Blurry": ("that is blurry", "that is sharp"),
    "Brown_Hair": ("with brown hair", "without brown hair"),
    "Bushy_Eyebrows": ("with bushy eyebrows", "with thin eyebrows"),
    "Chubby": ("who is chubby", "who is slim"),
    "Double_Chin": ("with a double chin", "without a double chin"),
    "Eyeglasses": ("wearing eyeglasses", "without eyeglasses"),
    "Goatee": ("with a goatee", "without a goatee"),
    "Gray_Hair": ("with gray hair", "without gray hair"),
    "Heavy_Makeup": ("wearing heavy makeup", "without makeup"),
    "High_Cheekbones": ("with high cheekbones", "with low cheekbones"),
    "Male": ("who is a man", "who is a woman"),
    "Mouth_Slightly_Open": ("with the mouth slightly open", "with the mouth closed"),
    "Mustache": ("with a mustache", "without a mustache"),
    "Narrow_Eyes": ("with narrow eyes", "with wide eyes"),
    "No_Beard": ("without a beard", "with a beard"),
    "Oval_Face": ("with an oval face", "with a round or square face"),
    "Pale_Skin": ("with pale skin", "without pale skin"),
    "Pointy_Nose": ("with a pointy nose", "with a rounded nose"),
    "Receding_Hairline": ("with a receding hairline", "with a full hairline"),
    "Rosy_Cheeks": ("with rosy cheeks", "without rosy cheeks"),
    "Sideburns": ("with sideburns", "without sideburns"),
    "Smiling": ("who is smiling", "who is not smiling"),
    "Straight_Hair": ("with straight hair", "without straight hair"),
    "Wavy_Hair": ("with wavy hair", "without wavy hair"),
    "Wearing_Earrings": ("wearing earrings", "without earrings"),
    "Wearing_Hat": ("wearing a hat", "without a hat"),
    "Wearing_Lipstick": ("wearing lipstick", "without lipstick"),
    "Wearing_Necklace": ("wearing a necklace", "without a necklace"),
    "Wearing_Necktie": ("wearing a necktie", "without a necktie"),
    "Young": ("who is young", "who is old"),
}


class CelebAHQError(AnnotationError):
    """A CelebAMask-HQ annotation file is missing or malformed; the message names it."""


def detect(folder: Path) -> bool:
    # The photo folder beside any of the annotations: a folder that lost its attribute
    # file is still recognised, and told which file is missing.
    folder = Path(folder)
    return (folder / IMAGES).is_dir() and any(
        (folder / name).exists() for name in (ATTRIBUTE_FILE, MASKS, MAPPING))


def _number(file: Path, lineno: int, name: str) -> int:
    try:
        return int(Path(name).stem)
    except ValueError:
        raise CelebAHQError(f"{file}, line {lineno}: {name!r} is not a photo name such as "
                            "'12.jpg'") from None


def read_attributes(file: Path, wanted=None) -> tuple[list[str], dict[int, np.ndarray]]:
    """The 40 attribute names and photo number -> int8 values (1 / -1), for the photos
    ``wanted`` accepts (a callable on the number; all when None)."""
    try:
        lines = file.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        raise CelebAHQError(f"cannot read {file}: {exc}") from exc
    if len(lines) < 2:
        raise CelebAHQError(f"{file}: expected the number of photos on line 1 and the "
                            "attribute names on line 2, then one line per photo")
    try:
        count = int(lines[0].strip())
    except ValueError:
        raise CelebAHQError(f"{file}, line 1: {lines[0].strip()[:40]!r} is not the number of "
                            "photos the file starts with") from None
    names = lines[1].split()
    if len(names) != len(PHRASES) or set(names) != set(PHRASES):
        raise CelebAHQError(f"{file}, line 2: expected the 40 CelebA attribute names "
                            f"(5_o_Clock_Shadow ... Young), found {len(names)} names")
    values: dict[int, np.ndarray] = {}
    entries = 0
    for lineno, line in enumerate(lines[2:], start=3):
        parts = line.split(None, 1)
        if not parts:
            continue
        entries += 1
        number = _number(file, lineno, parts[0])
        if wanted is not None and not wanted(number):
            continue
        tokens = parts[1].split() if len(parts) > 1 else []
        if len(tokens) != len(names):
            raise CelebAHQError(f"{file}, line {lineno}: {len(tokens)} values after the photo "
                                f"name; expected {len(names)} (1 or -1 per attribute)")
        try:
            row = np.array(tokens, dtype=np.int8)
        except (ValueError, OverflowError):
            row = np.zeros(0, np.int8)
        if row.size != len(names) or not np.isin(row, (1, -1)).all():
            raise CelebAHQError(f"{file}, line {lineno}: the values must be 1 (present) "
                                "or -1 (absent)")
        values[number] = row
    if entries != count:
        raise CelebAHQError(f"{file}: line 1 announces {count} photos but {entries} lines "
                            "follow the names; the file is truncated or edited")
    return names, values


def _partition_file(root: Path) -> Path | None:
    for base in (root, root / "Eval", root.parent, root.parent / "Eval"):
        if (base / PARTITION).is_file():
            return base / PARTITION
    return None


def read_splits(root: Path) -> tuple[dict[int, str] | None, str]:
    """Photo number -> split from the mapping and CelebA's partition file, and which rule
    gave it; (None, "fallback") when either file is absent."""
    mapping_file, partition_file = root / MAPPING, _partition_file(root)
    if not mapping_file.is_file() or partition_file is None:
        return None, "fallback"
    partition: dict[int, str] = {}
    for lineno, line in enumerate(partition_file.read_text(encoding="utf-8",
                                                           errors="replace").splitlines(), 1):
        parts = line.replace(",", " ").split()
        if not parts or (lineno == 1 and not parts[-1].isdigit()):
            continue  # a blank line, or the header of the CSV copy
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise CelebAHQError(f"{partition_file}, line {lineno}: expected '<file> <0|1|2>' "
                                f"(0 train, 1 val, 2 test): {line.strip()[:60]!r}")
        partition[_number(partition_file, lineno, parts[0])] = PARTITION_SPLITS[int(parts[1])]
    out: dict[int, str] = {}
    for lineno, line in enumerate(mapping_file.read_text(encoding="utf-8",
                                                         errors="replace").splitlines(), 1):
        parts = line.split()
        if not parts or (lineno == 1 and not parts[0].isdigit()):
            continue  # the "idx orig_idx orig_file" header
        if len(parts) != 3 or not parts[0].isdigit():
            raise CelebAHQError(f"{mapping_file}, line {lineno}: expected '<idx> <orig_idx> "
                                f"<orig_file>': {line.strip()[:60]!r}")
        original = _number(mapping_file, lineno, parts[2])
        if original not in partition:
            raise CelebAHQError(f"{mapping_file}, line {lineno}: the CelebA photo "
                                f"{parts[2]} is not listed in {partition_file}")
        out[int(parts[0])] = partition[original]
    return out, "celeba"


def _fallback_split(number: int) -> str:
    return "test" if number >= FALLBACK_TEST_FROM else "train"


def part_file(root: Path, number: int, part: str) -> Path:
    return root / MASKS / str(number // MASKS_PER_FOLDER) / f"{number:05d}_{part}.png"


def _flip(number: int, annotations: dict[str, int]) -> tuple[str, int]:
    """(attribute, target value) drawn from the photo number among its possible flips
    (every face has some: Male and Young flip both ways)."""
    options = [(name, -1 if annotations[name] == 1 else 1) for name, flip in FLIPS.items()
               if (flip.remove if annotations[name] == 1 else flip.add)]
    rng = np.random.default_rng(zlib.crc32(f"celebahq:{number}".encode()))
    return options[int(rng.integers(len(options)))]


def _item(root: Path, number: int, annotations: dict[str, int], split: str) -> Item:
    name, target = _flip(number, annotations)
    flip = FLIPS[name]
    photo = root / IMAGES / f"{number}.jpg"
    if not photo.is_file():
        raise CelebAHQError(f"{root / ATTRIBUTE_FILE} lists {number}.jpg, which is not in "
                            f"{root / IMAGES}")
    before = "man" if annotations["Male"] == 1 else "woman"
    after = ("woman" if before == "man" else "man") if name == "Male" else before
    source = (flip.present if target == -1 else flip.absent).format(person=before)
    prompt = (flip.present if target == 1 else flip.absent).format(person=after)
    parts = flip.remove_parts if target == -1 and flip.remove_parts else flip.parts
    masks = [{"segmentation": str(f.resolve()), "background": [0, 0, 0], "tolerance": 127}
             for f in (part_file(root, number, p) for p in parts) if f.is_file()]
    spec = None if not masks else masks[0] if len(masks) == 1 else {"union": masks}
    words = [w for w in prompt.split() if w not in source.split()] or prompt.split()[-1:]
    return make_item(
        f"{number:05d}", photo, instruction=flip.add if target == 1 else flip.remove,
        source_prompt=source, target_prompt=prompt, edit_words=words,
        object=flip.object.format(person=before), mask_spec=spec, split=split,
        edit="attribute", target_attribute=name, target_value=target, attributes=annotations)


def items(folder: Path, *, split: str | None = None, limit: int | None = None,
          seed: int = 0) -> list[Item]:
    root = Path(folder)
    split = check_split(NAME, split, SPLITS, aliases={"valid": "val"})
    splits, rule = read_splits(root)
    if rule == "fallback" and split == "val":
        raise DatasetError(f"--split val: {root} has no {MAPPING} with CelebA's {PARTITION} "
                           "(in the folder, its Eval/ or the folder above), so the "
                           "CelebA-HQ split is used: train (photos 0..27999) and test "
                           "(28000..29999); add both files for CelebA's train/val/test")

    def split_of(number: int) -> str:
        if splits is None:
            return _fallback_split(number)
        if number not in splits:
            raise CelebAHQError(f"{root / MAPPING} has no line for photo {number}.jpg, which "
                                f"{root / ATTRIBUTE_FILE} lists")
        return splits[number]

    attr_file = need_file(root, ATTRIBUTE_FILE, what="the 40 attributes of each photo")
    names, values = read_attributes(
        attr_file, None if split is None else (lambda n: split_of(n) == split))
    out = []
    for number in select(sorted(values), limit, seed):
        annotations = dict(zip(names, (int(v) for v in values[number])))
        out.append(_item(root, number, annotations, split_of(number)))
    return out


def attribute_specs(folder: Path) -> dict[str, dict[str, Any]]:
    """Present/absent prompts of the 40 attributes for attribute accuracy ('a photo of a
    person with blond hair' / '... without blond hair')."""
    return {name: {"values": ["yes", "no"],
                   "prompts": {"yes": f"a photo of a person {yes}",
                               "no": f"a photo of a person {no}"}}
            for name, (yes, no) in PHRASES.items()}
