"""The MS-COCO adapter: instances and captions JSON in the published layout, with polygon,
compressed-RLE and uncompressed-RLE (crowd) segmentations, become caption-based edits
masked by the object's segmentation through pycocotools, selected by split, limit and
seed, and run through ``xmgie batch --tiny``; broken annotation files are named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _datasets_fixtures import batch_error, check_run_masks, photo, run_records

coco_mask = pytest.importorskip("pycocotools.mask")

W, H = 48, 32
CATEGORIES = [{"id": 1, "name": "person", "supercategory": "person"},
              {"id": 3, "name": "car", "supercategory": "vehicle"},
              {"id": 15, "name": "bench", "supercategory": "outdoor"},
              {"id": 17, "name": "cat", "supercategory": "animal"},
              {"id": 18, "name": "dog", "supercategory": "animal"},
              {"id": 22, "name": "elephant", "supercategory": "animal"},
              {"id": 58, "name": "hot dog", "supercategory": "food"}]


def box(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """The hand-drawn mask of a rectangle, x1 and y1 exclusive."""
    mask = np.zeros((H, W), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def poly(x0, y0, x1, y1) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE, written here: run lengths over the column-major pixels,
    starting with a run of zeros."""
    flat = mask.flatten(order="F").astype(int)
    edges = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], edges, [flat.size]])
    runs = np.diff(bounds).tolist()
    return {"size": [H, W], "counts": ([0] if flat[0] else []) + runs}


def compressed_rle(mask: np.ndarray) -> dict:
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [H, W], "counts": rle["counts"].decode("ascii")}


CROWD = box(4, 2, 20, 10)                       # 16 x 8 = 128 pixels
STANDING = box(30, 12, 40, 30)                  # 10 x 18 = 180
HERD = box(0, 20, 48, 32)                       # 48 x 12 = 576, a crowd of elephants
# image id -> (split, captions, [(annotation id, category, segmentation, iscrowd)])
IMAGES = {
    139: ("val", ["A dog sitting on a bench.", "A brown dog outside."],
          [(1, 18, [poly(10, 5, 30, 25)], 0), (2, 15, [poly(0, 0, 5, 5)], 0)]),
    285: ("val", ["Two people standing in a field.", "A man and a woman in a field."],
          [(3, 1, uncompressed_rle(CROWD), 1), (4, 1, compressed_rle(STANDING), 0)]),
    632: ("val", ["An elephant walking in the grass."],
          [(5, 22, uncompressed_rle(HERD), 1),
           (6, 22, [poly(2, 2, 12, 10), poly(14, 2, 20, 6), [1, 1, 3, 3]], 0)]),
    # "hot dog" is no dog, and the street's car is not mentioned: no item.
    724: ("val", ["A view of a city street.", "A hot dog with mustard."],
          [(7, 3, [poly(0, 0, 40, 20)], 0), (8, 18, [poly(5, 5, 10, 10)], 0)]),
    9: ("train", ["A cat on a bench."], [(9, 17, [poly(1, 1, 21, 11)], 0)]),
    25: ("train", ["Two cats playing."], [(10, 17, [poly(0, 0, 8, 8)], 0),
                                          (11, 17, [poly(30, 20, 40, 30)], 0)]),
}
EXPECTED_MASKS = {
    "000000000139": box(10, 5, 30, 25),                     # the dog's polygon: 400
    "000000000285": CROWD | STANDING,                       # "people": both, 308
    "000000000632": box(2, 2, 12, 10) | box(14, 2, 20, 6),  # one elephant, not the herd
    "000000000009": box(1, 1, 21, 11),
    "000000000025": box(0, 0, 8, 8) | box(30, 20, 40, 30),
}


def _area(seg) -> float:
    if isinstance(seg, list):
        rle = coco_mask.merge(coco_mask.frPyObjects([p for p in seg if len(p) >= 6], H, W))
    elif isinstance(seg["counts"], list):
        rle = coco_mask.frPyObjects(seg, H, W)
    else:
        rle = {"size": seg["size"], "counts": seg["counts"].encode()}
    return float(coco_mask.area(rle))


def make_coco(folder: Path, year: str = "2017", images=IMAGES) -> Path:
    """annotations/instances_*.json, captions_*.json and the photo folders, as published."""
    (folder / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        entries, anns, caps = [], [], []
        for image_id, (s, captions, objects) in images.items():
            if s != split:
                continue
            prefix = f"COCO_{split}{year}_" if year == "2014" else ""
            name = f"{prefix}{image_id:012d}.jpg"
            photo(folder / f"{split}{year}" / name, (W, H), seed=image_id)
            entries.append({"id": image_id, "file_name": name, "height": H, "width": W,
                            "license": 1})
            for ann_id, cat, seg, crowd in objects:
                anns.append({"id": ann_id, "image_id": image_id, "category_id": cat,
                             "segmentation": seg, "area": _area(seg), "iscrowd": crowd,
                             "bbox": [0, 0, 1, 1]})
            caps += [{"id": 100 * image_id + i, "image_id": image_id, "caption": c}
                     for i, c in enumerate(captions)]
        ann_dir = folder / "annotations"
        (ann_dir / f"instances_{split}{year}.json").write_text(json.dumps(
            {"info": {}, "licenses": [], "images": entries, "annotations": anns,
             "categories": CATEGORIES}))
        (ann_dir / f"captions_{split}{year}.json").write_text(json.dumps(
            {"info": {}, "licenses": [], "images": entries, "annotations": caps}))
    return folder


def test_items_caption_edits_and_segmentation_masks(tmp_path):
    from xmgie.runner.dataset import load_dataset
    from xmgie.runner.datasets import coco, render_mask, with_article

    ds = load_dataset(make_coco(tmp_path / "coco"), split="val")
    assert ds.kind == "ms-coco"
    assert [i.id for i in ds] == ["000000000139", "000000000285", "000000000632"]
    dog, people, elephant = (i.fields for i in ds)
    # The largest mentioned object (the dog, not the bench) turns into another animal;
    # the caption is the source prompt, the target names the new animal in its place.
    assert dog["category"] == "dog" and dog["target_class"] in ("cat", "elephant")
    new = dog["target_class"]
    assert new == "elephant"  # drawn from the image id: "A dog" becomes "An elephant"
    assert dog["instruction"] == f"turn the dog into {with_article(new)}"
    assert dog["source_prompt"] == "A dog sitting on a bench."
    assert dog["target_prompt"] == f"{with_article(new).capitalize()} sitting on a bench."
    assert dog["edit_words"] == [new] and dog["object"] == "dog"
    assert dog["annotation_ids"] == [1] and dog["split"] == "val" and dog["image_id"] == 139
    assert dog["target_attribute"] == "class" and dog["target_value"] == new
    assert dog["attributes"] == {"class": "dog"}
    assert dog["image"] == str(ds.path / "val2017" / "000000000139.jpg")
    # "people" is the plural of a person; the lone person category becomes a stand-in.
    assert people["target_class"] in coco.STAND_INS["person"]
    robots = coco.plural(people["target_class"])
    assert people["instruction"] == f"turn the people into {robots}"
    assert people["target_prompt"] == f"Two {robots} standing in a field."
    assert people["annotation_ids"] == [4, 3] and people["object"] == "people"
    # "An elephant" becomes "A cat"/"A dog": the article follows the new word.
    assert elephant["target_prompt"] == \
        f"A {elephant['target_class']} walking in the grass."
    assert elephant["annotation_ids"] == [6]  # singular: the non-crowd one, not the herd
    # Masks: a polygon, the union of an uncompressed crowd RLE and a compressed RLE, two
    # polygons (a third one of 2 points cannot be drawn and adds nothing).
    assert ds.items[0].mask_spec["coco"]["segmentation"] == [poly(10, 5, 30, 25)]
    assert [s["coco"]["segmentation"] for s in ds.items[1].mask_spec["union"]] == \
        [compressed_rle(STANDING), uncompressed_rle(CROWD)]
    counts = {"000000000139": 400, "000000000285": 308, "000000000632": 104}
    for item in ds:
        mask = render_mask(item.mask_spec, (W, H))
        assert mask.dtype == np.float32 and mask.sum() == counts[item.id]
        np.testing.assert_array_equal(mask > 0, EXPECTED_MASKS[item.id])
    # Photos larger than the annotation's frame get the mask scaled to them.
    big = render_mask(ds.items[0].mask_spec, (2 * W, 2 * H))
    assert big.shape == (2 * H, 2 * W) and big.sum() == 4 * 400


def test_items_are_what_attribute_accuracy_reads(tmp_path):
    from xmgie.evaluation.attributes import AttributeSpec, check_items, item_from_fields
    from xmgie.runner.dataset import load_dataset
    from xmgie.runner.datasets import coco

    folder = make_coco(tmp_path / "coco")
    (data,) = coco.attribute_specs(folder).values()
    spec = AttributeSpec("class", tuple(data["values"]), data["template"])
    assert {"person", "dog", "hot dog", "robot", "statue"} <= set(spec.values)
    items = [item_from_fields(i.id, i.fields) for i in load_dataset(folder)]
    check_items(items, {"class": spec})
    dog = next(i for i in items if i.id == "000000000139")
    assert (dog.attribute, dog.target, dict(dog.annotations)) == \
        ("class", "elephant", {"class": "dog"})


def test_mentions_and_plurals():
    from xmgie.runner.datasets import coco

    cats = {c["id"]: c for c in CATEGORIES}
    forms = coco._forms(cats)
    found = coco.mentions("Hot dogs and a dog near two men", forms)
    assert [(c, w, p) for c, w, p, _, _ in found] == \
        [(58, "hot dog", True), (18, "dog", False), (1, "man", True)]
    assert coco._replace("Dogs and a dog.", 11, 14, "elephant") == "Dogs and an elephant."
    assert coco._replace("Dogs and a dog.", 0, 4, "cats") == "Cats and a dog."
    assert coco.plural("bus") == "buses" and coco.plural("hot dog") == "hot dogs"
    assert coco.plural("wine glass") == "wine glasses" and coco.plural("person") == "people"


def test_split_limit_and_seed_select(tmp_path):
    from xmgie.runner.dataset import DatasetError, load_dataset

    folder = make_coco(tmp_path / "coco")
    assert [i.id for i in load_dataset(folder, split="train")] == \
        ["000000000009", "000000000025"]
    everything = [i.id for i in load_dataset(folder)]
    assert len(everything) == 5 and everything[:2] == ["000000000009", "000000000025"]
    a = [i.id for i in load_dataset(folder, limit=2, seed=3)]
    assert len(a) == 2 and a == [i.id for i in load_dataset(folder, limit=2, seed=3)]
    assert set(a) <= {i.id for i in load_dataset(folder, limit=4, seed=3)}
    draws = {tuple(i.id for i in load_dataset(folder, limit=2, seed=s)) for s in range(8)}
    assert len(draws) > 1
    # An item is the same edit whatever the seed and selection.
    assert load_dataset(folder, split="val", limit=3, seed=7).by_id()["000000000139"].fields \
        == load_dataset(folder).by_id()["000000000139"].fields
    with pytest.raises(DatasetError, match="no instance or caption annotations for its "
                                           "test images; evaluate on --split val"):
        load_dataset(folder, split="test")
    with pytest.raises(DatasetError, match="has the splits train, val"):
        load_dataset(folder, split="minival")
    # The 2014 release's names are read the same way.
    old = load_dataset(make_coco(tmp_path / "coco2014", year="2014"), split="val")
    assert [i.id for i in old] == ["COCO_val2014_000000000139", "COCO_val2014_000000000285",
                                   "COCO_val2014_000000000632"]
    assert old.items[0].fields["image"].endswith("val2014/COCO_val2014_000000000139.jpg")
    assert [i.mask_spec for i in old] == [i.mask_spec for i in load_dataset(folder, split="val")]


def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _set_seg(annotation_id: int, seg):
    def change(data):
        next(a for a in data["annotations"] if a["id"] == annotation_id)["segmentation"] = seg
    return change


@pytest.mark.parametrize("name, damage, expected", [
    ("captions_val2017.json", None, r"captions_val2017\.json is missing"),
    ("instances_val2017.json", '{"images": [', r"instances_val2017\.json is not valid JSON "
                                               r"\(line 1"),
    ("instances_val2017.json", lambda d: d.pop("categories"),
     r"instances_val2017\.json has no 'categories' list"),
    ("instances_val2017.json", lambda d: d["annotations"][0].update(category_id=99),
     r"instances_val2017\.json: annotation 1 has category 99"),
    ("instances_val2017.json", lambda d: d["images"][0].pop("file_name"),
     r"instances_val2017\.json: the image with id 139 lacks file_name"),
    ("captions_val2017.json", lambda d: d["annotations"][0].pop("caption"),
     r"captions_val2017\.json: the caption annotation with id 13900 lacks caption"),
    ("instances_val2017.json", _set_seg(3, {"size": [H, W], "counts": [10, 5]}),
     r"instances_val2017\.json: annotation 3 \(image 285\) has a segmentation with RLE "
     r"counts that add up to 15 pixels, not the 32 x 48"),
    ("instances_val2017.json", _set_seg(4, {"size": [H, W], "counts": "23"}),
     r"annotation 4 \(image 285\) has a segmentation with RLE counts that add up to 5 "),
    ("instances_val2017.json", _set_seg(4, {"size": [H, W], "counts": " bad"}),
     r"annotation 4 \(image 285\) has a segmentation with compressed RLE counts that "
     r"cannot be read"),
    ("instances_val2017.json", _set_seg(1, [["x", 1, 2, 3, 4, 5]]),
     r"annotation 1 \(image 139\) has a segmentation with polygon coordinates that"),
])
def test_broken_annotation_files_are_named(tmp_path, name, damage, expected):
    from xmgie.runner.dataset import load_dataset
    from xmgie.runner.datasets import AnnotationError

    folder = make_coco(tmp_path / "coco")
    path = folder / "annotations" / name
    if damage is None:
        path.unlink()
    elif isinstance(damage, str):
        path.write_text(damage)
    else:
        _edit_json(path, damage)
    with pytest.raises(AnnotationError, match=expected) as info:
        load_dataset(folder, split="val")
    assert str(path) in str(info.value)


def test_a_missing_photo_is_named(tmp_path):
    from xmgie.runner.dataset import load_dataset
    from xmgie.runner.datasets import AnnotationError

    folder = make_coco(tmp_path / "coco")
    (folder / "val2017" / "000000000632.jpg").unlink()
    with pytest.raises(AnnotationError, match=r"instances_val2017\.json lists the photo "
                                              r"000000000632\.jpg, which is not in"):
        load_dataset(folder, split="val")
    # The photo is looked for only when its item is chosen.
    assert len(load_dataset(folder, split="train")) == 2


def test_batch_writes_segmentation_masks_into_the_run_folder(tmp_path, tiny_env, capsys):
    from xmgie.runner.dataset import load_dataset

    folder = make_coco(tmp_path / "coco")
    run = tmp_path / "run"
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    records = run_records(folder, run, "--split", "val", "--limit", "2", "--seed", "5")
    chosen = load_dataset(folder, split="val", limit=2, seed=5)
    assert sorted(records) == sorted(i.id for i in chosen) and len(records) == 2
    masks = check_run_masks(run, chosen, (W, H))
    for item, mask in zip(chosen, masks):
        np.testing.assert_array_equal(mask, EXPECTED_MASKS[item.id])  # drawn by hand
        inputs = records[item.id]["inputs"]
        assert inputs["instruction"] == item.fields["instruction"]
        assert inputs["split"] == "val" and inputs["target_attribute"] == "class"
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before  # untouched
    settings = json.loads((run / "batch.json").read_text())
    assert settings["dataset_selection"] == {"split": "val", "limit": 2, "seed": 5}
    # Through the command, a broken annotation file is a message naming it.
    (folder / "annotations" / "captions_val2017.json").write_text("[]")
    err = batch_error(folder, tmp_path / "run2", capsys, "--split", "val")
    assert "captions_val2017.json: expected a JSON object with annotations" in err
    err = batch_error(folder, tmp_path / "run3", capsys, "--split", "test")
    assert "evaluate on --split val" in err
