"""The CUB-200-2011 adapter: a fixture in the published layout becomes colour-flip and
species-change items with box or part masks, selected by split, limit and seed, and runs
through ``xmgie batch --tiny``; broken annotation files are named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _datasets_fixtures import batch_error, check_run_masks, run_records
from PIL import Image

ATTRIBUTES = ["has_crown_color::red", "has_crown_color::blue", "has_crown_color::iridescent",
              "has_wing_color::brown", "has_wing_color::white", "has_bill_shape::cone",
              "has_primary_color::black", "has_primary_color::yellow"]
# image id -> (class id, train?, box x y w h, present attributes as (id, certainty))
IMAGES = {
    1: (1, 1, (8, 10, 30, 20), [(1, 4), (6, 4)]),          # crown red -> blue
    2: (2, 0, (4, 4, 40, 40), [(6, 3)]),                   # no colour: species change
    3: (1, 0, (0, 0, 16, 16), [(4, 2), (5, 4), (7, 3)]),   # confident ones: white wing, black
    4: (2, 1, (2, 2, 20, 20), [(1, 3)]),
    5: (1, 0, (5, 5, 10, 10), [(1, 4)]),
}
CLASSES = ["001.Black_footed_Albatross", "002.American_Crow"]
PARTS = ["back", "beak", "belly", "breast", "crown", "forehead", "left eye", "left leg",
         "left wing", "nape", "right eye", "right leg", "right wing", "tail", "throat"]


def make_cub(folder: Path, with_parts: bool = True) -> Path:
    """A CUB_200_2011 folder (inside ``folder``, as the archive unpacks) of 64 px photos."""
    root = folder / "CUB_200_2011"
    lines: dict[str, list[str]] = {k: [] for k in (
        "images.txt", "image_class_labels.txt", "train_test_split.txt",
        "bounding_boxes.txt", "attributes/image_attribute_labels.txt", "parts/part_locs.txt")}
    for image_id, (cls, train, box, present) in IMAGES.items():
        rel = f"{CLASSES[cls - 1]}/{CLASSES[cls - 1][4:]}_{image_id:04d}_1.jpg"
        (root / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 48), (30 * image_id, 120, 200)).save(root / "images" / rel)
        lines["images.txt"].append(f"{image_id} {rel}")
        lines["image_class_labels.txt"].append(f"{image_id} {cls}")
        lines["train_test_split.txt"].append(f"{image_id} {train}")
        lines["bounding_boxes.txt"].append(f"{image_id} " + " ".join(f"{v:.1f}" for v in box))
        certain = dict(present)
        for attr_id in range(1, len(ATTRIBUTES) + 1):
            is_present = int(attr_id in certain)
            lines["attributes/image_attribute_labels.txt"].append(
                f"{image_id} {attr_id} {is_present} {certain.get(attr_id, 1)} 3.5"
                + (" 0" if attr_id == 2 else ""))  # the published file has such lines
        for part_id in range(1, len(PARTS) + 1):
            visible = int(part_id == 5 and image_id == 1)  # only image 1's crown is seen
            x, y = (20.0, 12.0) if visible else (0.0, 0.0)
            lines["parts/part_locs.txt"].append(f"{image_id} {part_id} {x} {y} {visible}")
    lines["classes.txt"] = [f"{i} {name}" for i, name in enumerate(CLASSES, 1)]
    lines["attributes/attributes.txt"] = [f"{i} {a}" for i, a in enumerate(ATTRIBUTES, 1)]
    lines["parts/parts.txt"] = [f"{i} {p}" for i, p in enumerate(PARTS, 1)]
    for name, rows in lines.items():
        if name.startswith("parts/") and not with_parts:
            continue
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("\n".join(rows) + "\n")
    return folder


def test_items_instructions_and_masks(tmp_path):
    from xmgie.runner.dataset import load_dataset
    from xmgie.runner.datasets import render_mask

    ds = load_dataset(make_cub(tmp_path / "cub"))
    assert ds.kind == "cub-200-2011" and [i.id for i in ds] == ["1", "2", "3", "4", "5"]
    one, two, three = (ds.items[k].fields for k in range(3))
    # Image 1: crown red (certain) -> the other crown colour that is not iridescent.
    assert one["instruction"] == "make the bird's crown blue"
    assert one["source_prompt"] == "a photo of a black footed albatross with a red crown"
    assert one["target_prompt"] == "a photo of a black footed albatross with a blue crown"
    assert one["edit_words"] == ["blue"] and one["object"] == "crown"
    assert one["source_attribute"] == "has_crown_color::red"
    assert one["target_attribute"] == "has_crown_color::blue"
    assert one["attributes"] == ["has_crown_color::red", "has_bill_shape::cone"]
    assert one["class"] == "black footed albatross" and one["split"] == "train"
    assert one["image"].endswith("images/001.Black_footed_Albatross/"
                                 "Black_footed_Albatross_0001_1.jpg")
    # Its crown is a visible part: a disc around it (15% of the box's larger side).
    assert ds.items[0].mask_spec == {"points": [[20.0, 12.0]], "radius": 0.15 * 30}
    # Image 2 has no colour attribute: species change into the other class, box mask.
    assert two["instruction"] == "turn the bird into a black footed albatross"
    assert two["edit"] == "species" and two["target_class"] == "black footed albatross"
    assert two["source_prompt"] == "a photo of an american crow"
    assert ds.items[1].mask_spec == {"box": [4.0, 4.0, 44.0, 44.0]}
    # Image 3: confident white wing and black primary colour; the wing has no colour left
    # to flip to (brown is present, if guessed), so the primary colour flips.
    assert three["instruction"] == "make the bird yellow" and three["object"] == "bird"
    assert three["target_attribute"] == "has_primary_color::yellow"
    assert three["target_prompt"] == "a photo of a yellow black footed albatross"
    mask = render_mask(ds.items[1].mask_spec, (64, 48))
    assert mask.shape == (48, 64) and mask.sum() == 40 * 40 and mask[4, 4] == 1 == mask[43, 43]
    disc = render_mask(ds.items[0].mask_spec, (64, 48))
    assert disc[12, 20] == 1 and disc[12, 25] == 0 and disc[12, 24] == 1
    # Without parts/ the colour flip is masked by the box; the items are otherwise equal.
    boxed = load_dataset(make_cub(tmp_path / "noparts", with_parts=False))
    assert boxed.items[0].mask_spec == {"box": [8.0, 10.0, 38.0, 30.0]}
    assert {**boxed.items[0].fields, "image": one["image"]} == one


def test_split_limit_and_seed_select(tmp_path):
    from xmgie.runner.dataset import DatasetError, load_dataset

    folder = make_cub(tmp_path / "cub")
    assert [i.id for i in load_dataset(folder, split="train")] == ["1", "4"]
    assert [i.id for i in load_dataset(folder, split="test")] == ["2", "3", "5"]
    a = [i.id for i in load_dataset(folder, limit=2, seed=3)]
    assert len(a) == 2 and a == [i.id for i in load_dataset(folder, limit=2, seed=3)]
    bigger = [i.id for i in load_dataset(folder, limit=4, seed=3)]
    assert set(a) <= set(bigger)  # growing --limit keeps the items already chosen
    draws = {tuple(i.id for i in load_dataset(folder, limit=2, seed=s)) for s in range(8)}
    assert len(draws) > 1  # the seed changes the sample
    # An item is the same edit whatever the seed and selection.
    assert load_dataset(folder, limit=5, seed=9).by_id()["1"].fields == \
        load_dataset(folder).by_id()["1"].fields
    with pytest.raises(DatasetError, match="has the splits train, test"):
        load_dataset(folder, split="val")
    # A manifest has no splits: --split is refused rather than ignored.
    (tmp_path / "manifest").mkdir()
    (tmp_path / "manifest" / "manifest.jsonl").write_text('{"image": "a.png"}\n')
    assert len(load_dataset(tmp_path / "manifest", split="all")) == 1
    with pytest.raises(DatasetError, match="which has no splits"):
        load_dataset(tmp_path / "manifest", split="test")


@pytest.mark.parametrize("name, damage, expected", [
    ("bounding_boxes.txt", None, "bounding_boxes.txt is missing"),
    ("attributes/image_attribute_labels.txt", None, "image_attribute_labels.txt is missing"),
    ("attributes/attributes.txt", None, "attributes.txt is missing"),
    ("train_test_split.txt", "1 yes\n", r"train_test_split.txt, line 1: cannot read"),
    ("bounding_boxes.txt", "1 2.0 3.0\n", r"bounding_boxes.txt, line 1: 3 fields, expected 5"),
    ("image_class_labels.txt", "1 1\n", r"image_class_labels.txt has no line for image id 2"),
    ("attributes/image_attribute_labels.txt", "1 1 x 4 1.0\n",
     r"image_attribute_labels.txt, line 1: cannot read"),
    ("classes.txt", "", r"classes.txt is empty"),
])
def test_broken_annotation_files_are_named(tmp_path, name, damage, expected):
    from xmgie.runner.dataset import load_dataset
    from xmgie.runner.datasets import AnnotationError

    folder = make_cub(tmp_path / "cub")
    path = folder / "CUB_200_2011" / name
    if damage is None:
        path.unlink()
    else:
        path.write_text(damage)
    with pytest.raises(AnnotationError, match=expected) as info:
        load_dataset(folder)
    assert str(folder) in str(info.value)


def test_batch_writes_part_and_box_masks_into_the_run_folder(tmp_path, tiny_env, capsys):
    from xmgie.runner.dataset import load_dataset

    folder = make_cub(tmp_path / "cub")
    run = tmp_path / "run"
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    records = run_records(folder, run, "--split", "train", "--limit", "2", "--seed", "1")
    assert sorted(records) == ["1", "4"]
    chosen = load_dataset(folder, split="train").items
    assert "points" in chosen[0].mask_spec and "box" in chosen[1].mask_spec
    # The annotations became mask files in the run folder, at the photo's size.
    for mask in check_run_masks(run, chosen, (64, 48)):
        assert 0 < mask.sum() < mask.size
    for rec in records.values():
        inputs = rec["inputs"]
        assert inputs["split"] == "train" and inputs["instruction"].startswith("make the bird")
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before  # untouched
    settings = json.loads((run / "batch.json").read_text())
    assert settings["dataset"] == str(folder.resolve())
    # The selection is recorded, so eval --variants reruns exactly these items.
    assert settings["dataset_selection"] == {"split": "train", "limit": 2, "seed": 1}
    again = load_dataset(settings["dataset"], **settings["dataset_selection"])
    assert sorted(i.id for i in again) == sorted(records)
    # Through the command, a broken annotation file is a message naming it, exit 101.
    (folder / "CUB_200_2011" / "bounding_boxes.txt").unlink()
    err = batch_error(folder, tmp_path / "run2", capsys)
    assert "bounding_boxes.txt is missing" in err
