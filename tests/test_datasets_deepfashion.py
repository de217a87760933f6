"""DeepFashion Category and Attribute Prediction adapter: the benchmark's list files, built
here in their published layout (count line, header line, entries), become attribute-flip
edit items with the garment's box as mask and the attribute annotations kept."""

from __future__ import annotations

from pathlib import Path

import pytest
from _datasets_fixtures import check_run_masks, photo, run_records

CATEGORIES = [("Blouse", 1), ("Shorts", 2), ("Dress", 3)]
# One name with a space, as the benchmark's attribute list has.
ATTRS = [("floral", 1), ("abstract chevron", 1), ("denim", 2), ("a-line", 3),
         ("sleeveless", 4)]
# (image name, category, attribute values, box, partition)
IMAGES = [
    ("img/Floral_Blouse/img_00000001.jpg", 1, [1, -1, -1, 0, -1], (2, 3, 30, 20), "train"),
    ("img/Floral_Blouse/img_00000002.jpg", 1, [1, -1, 0, -1, -1], (0, 0, 48, 32), "train"),
    ("img/Denim_Shorts/img_00000003.jpg", 2, [-1, -1, 1, -1, 0], (5, 6, 25, 30), "val"),
    ("img/Aline_Dress/img_00000004.jpg", 3, [-1, 0, -1, 1, 1], (10, 2, 40, 31), "test"),
    ("img/Aline_Dress/img_00000005.jpg", 3, [-1, -1, -1, 1, -1], (1, 1, 20, 20), "test"),
    # Nothing annotated absent: no attribute to add, so no edit.
    ("img/Aline_Dress/img_00000006.jpg", 3, [1, 1, 0, 1, 1], (0, 0, 10, 10), "test"),
    ("img/Denim_Shorts/img_00000007.jpg", 2, [-1, 1, 1, -1, -1], (3, 3, 45, 29), "test"),
]


def _list(path: Path, header: str, rows: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{len(rows)}\n{header}\n" + "".join(r + "\n" for r in rows))


def make_deepfashion(root: Path, images=IMAGES) -> Path:
    anno = root / "Anno"
    _list(anno / "list_category_cloth.txt", "category_name  category_type",
          [f"{n:<20}{t}" for n, t in CATEGORIES])
    _list(anno / "list_attr_cloth.txt", "attribute_name  attribute_type",
          [f"{n:<30}{t}" for n, t in ATTRS])
    _list(anno / "list_category_img.txt", "image_name  category_label",
          [f"{name:<50}{cat}" for name, cat, *_ in images])
    _list(anno / "list_attr_img.txt", "image_name  attribute_labels",
          [f"{name:<50}" + " ".join(f"{v:2d}" for v in vals) for name, _, vals, *_ in images])
    _list(anno / "list_bbox.txt", "image_name  x_1  y_1  x_2  y_2",
          [f"{name:<50}" + " ".join(map(str, box)) for name, _, _, box, _ in images])
    _list(root / "Eval" / "list_eval_partition.txt", "image_name  evaluation_status",
          [f"{name:<50}{part}" for name, *_, part in images])
    for i, (name, *_) in enumerate(images):
        photo(root / name, (48, 32), seed=i)
    return root


def test_items_attribute_flips_boxes_and_annotations(tmp_path):
    from xmgie.runner.datasets import deepfashion, detect_adapter, render_mask

    root = make_deepfashion(tmp_path / "df")
    assert detect_adapter(root) is deepfashion
    items = deepfashion.items(root, split="test", limit=None, seed=0)
    expected = [r for r in IMAGES if r[4] == "test" and -1 in r[2]]
    assert [it.id for it in items] == [
        f"{Path(n).parent.name}_{Path(n).stem}" for n, *_ in expected]
    names = [a for a, _ in ATTRS]
    for it, (name, cat, vals, box, part) in zip(items, expected):
        f = it.fields
        garment = CATEGORIES[cat - 1][0].lower()
        assert f["image"] == str((root / name).resolve())
        assert f["category"] == CATEGORIES[cat - 1][0] and f["split"] == part
        target = f["target_attribute"]
        assert dict(zip(names, vals))[target] == -1      # an absent attribute, never unknown
        assert f["attributes"] == {**{a: 1 for a, v in zip(names, vals) if v == 1},
                                   target: -1}
        assert f["instruction"] == f"make the {garment} {target}"
        assert f["target_prompt"] == f"a photo of a {target} {garment}"
        assert f["edit_words"] == target.split() and f["object"] == garment
        assert it.mask_spec == {"box": list(box)} and f["bbox"] == list(box)
        x1, y1, x2, y2 = box
        mask = render_mask(it.mask_spec, (48, 32))
        assert mask.sum() == (min(x2, 48) - x1) * (min(y2, 32) - y1)
    # The space in a name survives the parse.
    records = deepfashion.records(root, "test")
    assert records[-1].annotations() == dict(zip([a for a, _ in ATTRS], IMAGES[-1][2]))
    assert "abstract chevron" in records[-1].annotations()


def test_split_limit_seed_selection(tmp_path):
    from xmgie.runner.dataset import DatasetError, load_dataset
    from xmgie.runner.datasets import deepfashion

    root = make_deepfashion(tmp_path / "df")
    every = deepfashion.items(root, split=None, limit=None, seed=0)
    assert len(every) == len(IMAGES) - 1
    assert {it.fields["split"] for it in every} == {"train", "val", "test"}
    assert [it.id for it in deepfashion.items(root, split="val", limit=None, seed=0)] == [
        "Denim_Shorts_img_00000003"]
    two = deepfashion.items(root, split=None, limit=2, seed=7)
    again = deepfashion.items(root, split=None, limit=2, seed=7)
    assert [(i.id, i.fields) for i in two] == [(i.id, i.fields) for i in again]
    four = deepfashion.items(root, split=None, limit=4, seed=7)
    assert {it.id for it in two} <= {it.id for it in four}
    full = {it.id: it.fields["instruction"] for it in every}
    seeded = {it.id: it.fields["instruction"]
              for it in deepfashion.items(root, split=None, limit=None, seed=7)}
    assert all(seeded[it.id] == it.fields["instruction"] for it in two)
    assert seeded != full or len({tuple(it.id for it in deepfashion.items(
        root, split=None, limit=2, seed=s)) for s in range(6)}) > 1
    ds = load_dataset(root, split="train", limit=1, seed=0)
    assert ds.kind == deepfashion.NAME and len(ds) == 1
    with pytest.raises(DatasetError, match="deepfashion has the splits train, val, test"):
        deepfashion.items(root, split="dev", limit=None, seed=0)


def test_missing_and_malformed_files_are_named(tmp_path):
    from xmgie.runner.dataset import DatasetError
    from xmgie.runner.datasets import deepfashion

    def items(root):
        return deepfashion.items(root, split="test", limit=None, seed=0)

    root = make_deepfashion(tmp_path / "a")
    (root / "Eval" / "list_eval_partition.txt").unlink()
    with pytest.raises(DatasetError, match=r"Eval/list_eval_partition\.txt is missing"):
        items(root)

    root = make_deepfashion(tmp_path / "b")
    f = root / "Anno" / "list_bbox.txt"
    f.write_text(f.read_text().replace("7\n", "8\n", 1))
    with pytest.raises(DatasetError, match=r"list_bbox\.txt: line 1 announces 8 entries but 7"):
        items(root)
    f.write_text("x\n" + f.read_text().split("\n", 1)[1])
    with pytest.raises(DatasetError, match=r"list_bbox\.txt, line 1: 'x' is not the number"):
        items(root)

    root = make_deepfashion(tmp_path / "c")
    f = root / "Anno" / "list_attr_img.txt"
    lines = f.read_text().splitlines()
    lines[5] = lines[5].rsplit(" ", 1)[0]      # img_00000004, a test photo
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"list_attr_img\.txt, line 6: 4 values after the "
                                           r"image name; expected 5"):
        items(root)
    lines[5] = lines[5] + " x"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"list_attr_img\.txt, line 6: the values are not"):
        items(root)
    bad = [list(r) for r in IMAGES]
    bad[3][2] = [-1, 0, -1, 1, 2]
    root = make_deepfashion(tmp_path / "d", images=[tuple(r) for r in bad])
    with pytest.raises(DatasetError, match=r"list_attr_img\.txt: img/Aline_Dress/"
                                           r"img_00000004\.jpg has attribute values \[2\]"):
        items(root)

    root = make_deepfashion(tmp_path / "e")
    (root / "img" / "Aline_Dress" / "img_00000005.jpg").unlink()
    with pytest.raises(DatasetError, match=r"list_eval_partition\.txt lists img/Aline_Dress/"
                                           r"img_00000005\.jpg, which is not under"):
        items(root)

    bad = [list(r) for r in IMAGES]
    bad[4][1] = 9
    root = make_deepfashion(tmp_path / "f", images=[tuple(r) for r in bad])
    with pytest.raises(DatasetError, match=r"list_category_img\.txt: img/Aline_Dress/"
                                           r"img_00000005\.jpg has category 9"):
        items(root)

    root = make_deepfashion(tmp_path / "g")
    f = root / "Anno" / "list_category_img.txt"
    f.write_text("\n".join(f.read_text().splitlines()[:-1]).replace("7\n", "6\n", 1) + "\n")
    with pytest.raises(DatasetError, match=r"list_category_img\.txt has no entry for "
                                           r"img/Denim_Shorts/img_00000007\.jpg"):
        items(root)


def test_batch_tiny_runs_two_items_with_box_masks(tmp_path, tiny_env):
    from xmgie.runner.datasets import deepfashion

    root = make_deepfashion(tmp_path / "df")
    run = tmp_path / "run"
    records = run_records(root, run, "--split", "test", "--limit", "2", "--seed", "1")
    expected = deepfashion.items(root, split="test", limit=2, seed=1)
    assert sorted(records) == sorted(it.id for it in expected)
    check_run_masks(run, expected, (48, 32))
