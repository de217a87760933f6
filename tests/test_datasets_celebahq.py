"""The CelebA-HQ adapter: a CelebAMask-HQ folder built here in its published layout (the
attribute file, part masks at half the photo's size, the CelebA mapping and partition)
becomes attribute-flip items masked by the attribute's face parts, carrying all 40
attributes, selected by split, limit and seed, and runs through ``xmgie batch --tiny``;
broken annotation files are named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _datasets_fixtures import batch_error, check_run_masks, photo, run_records
from PIL import Image

SIZE, PART_SIZE = 64, 32     # the published photos are 1024 px, their part masks 512 px
ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips "
    "Big_Nose Black_Hair Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin "
    "Eyeglasses Goatee Gray_Hair Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open "
    "Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose Receding_Hairline "
    "Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat "
    "Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young").split()
PARTS = ("skin", "hair", "l_brow", "r_brow", "l_eye", "r_eye", "eye_g", "l_ear", "r_ear",
         "ear_r", "nose", "mouth", "u_lip", "l_lip", "neck", "neck_l", "cloth", "hat")
# photo number -> (present attributes, parts without a mask file, CelebA original, split)
PHOTOS = {
    0: (set(ATTRIBUTES), {"ear_r", "neck_l"}, 7, 0),  # all present: a removal
    22: (set(ATTRIBUTES), {"ear_r", "neck_l"}, 30, 0),
    1: ({"Smiling", "Wearing_Lipstick", "Young", "No_Beard", "Blond_Hair"},
        {"eye_g", "hat"}, 12, 1),
    2: ({"Wearing_Hat", "Male", "Mustache"}, {"eye_g"}, 3, 2),
    2001: ({"Young", "Heavy_Makeup", "No_Beard"}, {"eye_g", "hat"}, 150000, 2),
    28000: ({"Male", "No_Beard", "Bald"}, {"hair", "eye_g", "hat"}, 99, 0),
    29999: ({"Young", "No_Beard", "Wavy_Hair", "Wearing_Earrings"}, {"eye_g", "hat"}, 42, 1),
}


def part_box(part: str) -> tuple[int, int, int, int]:
    """Each part a 3 x 4 rectangle of its own in the 32 px part-mask frame: (x0, y0, x1, y1)."""
    i = PARTS.index(part)
    x, y = (i % 6) * 5 + 1, (i // 6) * 8 + 1
    return x, y, x + 3, y + 4


def expected_mask(number: int, parts) -> np.ndarray:
    """The hand-drawn mask at the photo's size: the parts the photo has, each pixel of the
    part masks two by two."""
    mask = np.zeros((SIZE, SIZE), bool)
    for part in parts:
        if part not in PHOTOS[number][1]:
            x0, y0, x1, y1 = part_box(part)
            mask[2 * y0:2 * y1, 2 * x0:2 * x1] = True
    return mask


def make_celebahq(root: Path, split_files: bool = True, photos=PHOTOS) -> Path:
    lines = [str(len(photos)), " ".join(ATTRIBUTES)]
    for number, (present, missing, _, _) in photos.items():
        photo(root / "CelebA-HQ-img" / f"{number}.jpg", (SIZE, SIZE), seed=number)
        lines.append(f"{number}.jpg  " + " ".join(
            " 1" if a in present else "-1" for a in ATTRIBUTES))
        folder = root / "CelebAMask-HQ-mask-anno" / str(number // 2000)
        folder.mkdir(parents=True, exist_ok=True)
        for k, part in enumerate(PARTS):
            if part in missing:
                continue
            mask = np.zeros((PART_SIZE, PART_SIZE), np.uint8)
            x0, y0, x1, y1 = part_box(part)
            mask[y0:y1, x0:x1] = 255
            # Most are single-channel; some copies hold three equal channels.
            im = Image.fromarray(mask).convert("RGB" if k % 2 else "L")
            im.save(folder / f"{number:05d}_{part}.png")
    (root / "CelebAMask-HQ-attribute-anno.txt").write_text("\n".join(lines) + "\n")
    if split_files:
        (root / "CelebA-HQ-to-CelebA-mapping.txt").write_text(
            "idx         orig_idx        orig_file\n" + "".join(
                f"{n:<12}{orig - 1:<16}{orig:06d}.jpg\n"
                for n, (_, _, orig, _) in photos.items()))
        rows = {orig: part for _, _, orig, part in photos.values()}
        rows.update({5: 0, 6: 2})  # CelebA photos that are not in CelebA-HQ
        (root.parent / "list_eval_partition.txt").write_text(
            "".join(f"{orig:06d}.jpg {part}\n" for orig, part in sorted(rows.items())))
    return root


def test_items_attribute_flips_part_masks_and_annotations(tmp_path):
    from xmgie.runner.dataset import load_dataset
    from xmgie.runner.datasets import celebahq, render_mask

    ds = load_dataset(make_celebahq(tmp_path / "celeba" / "CelebAMask-HQ"))
    assert ds.kind == "celeba-hq"
    assert [i.id for i in ds] == ["00000", "00001", "00002", "00022", "02001", "28000",
                                  "29999"]
    by_id = ds.by_id()
    for item in ds:
        f = item.fields
        number = int(item.id)
        # All 40 annotations travel with the item, for "other attributes kept".
        assert f["attributes"] == {a: 1 if a in PHOTOS[number][0] else -1 for a in ATTRIBUTES}
        assert f["image"] == str(ds.path / "CelebA-HQ-img" / f"{number}.jpg")
        assert f["edit"] == "attribute" and f["target_attribute"] in celebahq.FLIPS
        # The flip goes against the annotation: an absent attribute is added, a present
        # one removed.
        assert f["target_value"] == -f["attributes"][f["target_attribute"]]
    # The flips drawn from the photo numbers (the same in every run), and the parts that
    # mask them; a part the face lacks (no file) adds nothing.
    drawn = {
        "00000": ("remove the makeup", "Heavy_Makeup", -1, "a photo of a man wearing heavy "
                  "makeup", "a photo of a man without makeup", ["without"], "makeup",
                  ("skin", "l_eye", "r_eye", "l_brow", "r_brow", "u_lip", "l_lip")),
        "00022": ("remove the eyeglasses", "Eyeglasses", -1, "a photo of a man wearing "
                  "eyeglasses", "a photo of a man without eyeglasses", ["without"],
                  "eyeglasses", ("eye_g",)),  # the glasses alone, not the eyes
        "00001": ("add a necklace", "Wearing_Necklace", 1, "a photo of a woman without a "
                  "necklace", "a photo of a woman wearing a necklace", ["wearing"],
                  "necklace", ("neck_l", "neck")),
        "00002": ("make the hair gray", "Gray_Hair", 1, "a photo of a man with hair",
                  "a photo of a man with gray hair", ["gray"], "hair", ("hair",)),
        "02001": ("turn the woman into a man", "Male", 1, "a photo of a woman",
                  "a photo of a man", ["man"], "woman", celebahq.FACE),
        "29999": ("add a hat", "Wearing_Hat", 1, "a photo of a woman without a hat",
                  "a photo of a woman wearing a hat", ["wearing"], "hat", ("hair",)),
    }
    for item_id, (instruction, name, value, source, target, words, obj, parts) in \
            drawn.items():
        item = by_id[item_id]
        f = item.fields
        assert (f["instruction"], f["target_attribute"], f["target_value"]) == \
            (instruction, name, value)
        assert (f["source_prompt"], f["target_prompt"]) == (source, target)
        assert f["edit_words"] == words and f["object"] == obj
        # The part masks (3 x 4 at 32 px) scaled to the 64 px photo: 6 x 8 = 48 pixels each.
        mask = render_mask(item.mask_spec, (SIZE, SIZE))
        assert mask.shape == (SIZE, SIZE) and mask.sum() == 48 * len(parts)
        np.testing.assert_array_equal(mask > 0, expected_mask(int(item_id), parts))
    assert [by_id[i].fields["split"] for i in ("00000", "00001", "00002")] == \
        ["train", "val", "test"]
    assert len(by_id["02001"].mask_spec["union"]) == 13


def test_items_are_what_attribute_accuracy_reads(tmp_path):
    from xmgie.evaluation.attributes import AttributeSpec, check_items, item_from_fields
    from xmgie.runner.dataset import load_dataset
    from xmgie.runner.datasets import celebahq

    folder = make_celebahq(tmp_path / "CelebAMask-HQ")
    specs = {name: AttributeSpec.binary(name, d["prompts"]["yes"], d["prompts"]["no"])
             for name, d in celebahq.attribute_specs(folder).items()}
    assert sorted(specs) == sorted(ATTRIBUTES)
    assert specs["Blond_Hair"].prompt("yes", "person") == "a photo of a person with blond hair"
    items = [item_from_fields(i.id, i.fields) for i in load_dataset(folder)]
    check_items(items, specs)
    glasses = next(i for i in items if i.id == "00022")
    assert (glasses.attribute, glasses.target) == ("Eyeglasses", "no")
    assert len(glasses.others()) == 39 and glasses.annotations["Smiling"] == "yes"


def test_a_face_without_the_parts_is_not_masked(tmp_path):
    from xmgie.runner.dataset import load_dataset

    # No part mask file at all: whatever the flip, nothing to mask but the whole photo.
    photos = {0: ({"Male", "Young"}, set(PARTS), 7, 0)}
    (item,) = load_dataset(make_celebahq(tmp_path / "CelebAMask-HQ", photos=photos)).items
    assert item.mask_spec is None and item.fields["attributes"]["Male"] == 1


def test_split_limit_and_seed_select(tmp_path):
    from xmgie.runner.dataset import DatasetError, load_dataset

    folder = make_celebahq(tmp_path / "celeba" / "CelebAMask-HQ")
    # CelebA's partition of each photo's original (0 train, 1 val, 2 test).
    assert [i.id for i in load_dataset(folder, split="train")] == ["00000", "00022", "28000"]
    assert [i.id for i in load_dataset(folder, split="val")] == ["00001", "29999"]
    assert [i.id for i in load_dataset(folder, split="test")] == ["00002", "02001"]
    a = [i.id for i in load_dataset(folder, limit=3, seed=4)]
    assert len(a) == 3 and a == [i.id for i in load_dataset(folder, limit=3, seed=4)]
    assert set(a) <= {i.id for i in load_dataset(folder, limit=5, seed=4)}
    draws = {tuple(i.id for i in load_dataset(folder, limit=2, seed=s)) for s in range(8)}
    assert len(draws) > 1
    # An item is the same edit whatever the seed and selection.
    (one,) = load_dataset(folder, split="val", limit=1, seed=0).items
    assert one.fields == load_dataset(folder).by_id()[one.id].fields
    with pytest.raises(DatasetError, match="has the splits train, val, test"):
        load_dataset(folder, split="dev")
    # Without CelebA's partition: photos 0..27999 train, 28000.. test, and no val.
    bare = make_celebahq(tmp_path / "bare" / "CelebAMask-HQ", split_files=False)
    assert [i.id for i in load_dataset(bare, split="train")] == ["00000", "00001", "00002",
                                                                 "00022", "02001"]
    assert [i.id for i in load_dataset(bare, split="test")] == ["28000", "29999"]
    with pytest.raises(DatasetError, match="no CelebA-HQ-to-CelebA-mapping.txt with "
                                           "CelebA's list_eval_partition.txt"):
        load_dataset(bare, split="val")


def _replace_line(path: Path, lineno: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[lineno - 1] = text
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("name, damage, expected", [
    ("CelebAMask-HQ-attribute-anno.txt", None, "CelebAMask-HQ-attribute-anno.txt is missing"),
    ("CelebAMask-HQ-attribute-anno.txt", (1, "thirty"),
     r"attribute-anno.txt, line 1: 'thirty' is not the number of photos"),
    ("CelebAMask-HQ-attribute-anno.txt", (1, "9"),
     r"attribute-anno.txt: line 1 announces 9 photos but 7 lines follow"),
    ("CelebAMask-HQ-attribute-anno.txt", (2, "Smiling Young"),
     r"attribute-anno.txt, line 2: expected the 40 CelebA attribute names"),
    ("CelebAMask-HQ-attribute-anno.txt", (3, "0.jpg 1 -1"),
     r"attribute-anno.txt, line 3: 2 values after the photo name; expected 40"),
    ("CelebAMask-HQ-attribute-anno.txt", (4, "1.jpg " + " ".join(["0"] * 40)),
     r"attribute-anno.txt, line 4: the values must be 1 \(present\) or -1"),
    ("CelebAMask-HQ-attribute-anno.txt", (5, "two.jpg " + " ".join(["1"] * 40)),
     r"attribute-anno.txt, line 5: 'two.jpg' is not a photo name"),
    ("CelebA-HQ-to-CelebA-mapping.txt", (3, "1 11"),
     r"mapping.txt, line 3: expected '<idx> <orig_idx> <orig_file>'"),
    ("CelebA-HQ-to-CelebA-mapping.txt", (2, "0 998 000999.jpg"),
     r"mapping.txt, line 2: the CelebA photo 000999.jpg is not listed in .*partition"),
    ("../list_eval_partition.txt", (1, "000003.jpg 7"),
     r"list_eval_partition.txt, line 1: expected '<file> <0\|1\|2>'"),
])
def test_broken_annotation_files_are_named(tmp_path, name, damage, expected):
    from xmgie.runner.dataset import load_dataset
    from xmgie.runner.datasets import AnnotationError

    folder = make_celebahq(tmp_path / "celeba" / "CelebAMask-HQ")
    path = folder / name
    if damage is None:
        path.unlink()
    else:
        _replace_line(path, *damage)
    with pytest.raises(AnnotationError, match=expected) as info:
        load_dataset(folder)
    assert str(path.resolve()) in str(info.value)


def test_a_missing_photo_or_mapping_line_is_named(tmp_path):
    from xmgie.runner.dataset import load_dataset
    from xmgie.runner.datasets import AnnotationError

    folder = make_celebahq(tmp_path / "celeba" / "CelebAMask-HQ")
    (folder / "CelebA-HQ-img" / "2001.jpg").unlink()
    with pytest.raises(AnnotationError, match=r"lists 2001\.jpg, which is not in .*"
                                              r"CelebA-HQ-img"):
        load_dataset(folder, split="test")
    assert len(load_dataset(folder, split="train")) == 3  # looked for when chosen
    _replace_line(folder / "CelebA-HQ-to-CelebA-mapping.txt", 2, "")
    with pytest.raises(AnnotationError, match=r"mapping.txt has no line for photo 0\.jpg"):
        load_dataset(folder, split="train")


def test_batch_writes_part_masks_at_the_photo_size(tmp_path, tiny_env, capsys):
    from xmgie.runner.dataset import load_dataset
    from xmgie.runner.datasets import celebahq

    folder = make_celebahq(tmp_path / "celeba" / "CelebAMask-HQ")
    run = tmp_path / "run"
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    records = run_records(folder, run, "--split", "test", "--limit", "2", "--seed", "0")
    chosen = load_dataset(folder, split="test", limit=2, seed=0)
    assert sorted(records) == ["00002", "02001"] == [i.id for i in chosen]
    masks = check_run_masks(run, chosen, (SIZE, SIZE))
    for item, mask in zip(chosen, masks):
        flip = celebahq.FLIPS[item.fields["target_attribute"]]
        removing = item.fields["target_value"] == -1
        parts = flip.remove_parts if removing and flip.remove_parts else flip.parts
        np.testing.assert_array_equal(mask, expected_mask(int(item.id), parts))
        assert mask.sum() > 0
        inputs = records[item.id]["inputs"]
        assert inputs["split"] == "test" and len(inputs["attributes"]) == 40
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before  # untouched
    assert json.loads((run / "batch.json").read_text())["dataset_selection"] == \
        {"split": "test", "limit": 2, "seed": 0}
    (folder / "CelebAMask-HQ-attribute-anno.txt").write_text("30000\n")
    err = batch_error(folder, tmp_path / "run2", capsys, "--split", "test")
    assert "CelebAMask-HQ-attribute-anno.txt: expected the number of photos on line 1" in err
