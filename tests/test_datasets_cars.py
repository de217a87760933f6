"""Stanford Cars adapter: the devkit .mat files and the CSV re-release, built here in their
published layouts, become edit items with the car's box as mask."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _datasets_fixtures import batch_error, check_run_masks, photo, run_records

scipy_io = pytest.importorskip("scipy.io")

CLASSES = ["AM General Hummer SUV 2000", "Ram C/V Cargo Van Minivan 2012",
           "Tesla Model S Sedan 2012"]
# (fname, x1, y1, x2, y2, class): 1-based boxes with both corners inside, as published.
TRAIN = [("00001.jpg", 3, 4, 20, 15, 1), ("00002.jpg", 1, 1, 48, 32, 2),
         ("00003.jpg", 10, 5, 30, 25, 3), ("00004.jpg", 5, 6, 7, 8, 2)]
TEST = [("00001.jpg", 2, 2, 40, 30, 3), ("00002.jpg", 8, 3, 16, 12, 1),
        ("00003.jpg", 4, 4, 44, 28, 2), ("00004.jpg", 1, 9, 33, 31, 1),
        ("00005.jpg", 6, 1, 12, 20, 3), ("00006.jpg", 20, 10, 47, 31, 2)]


def _annos_mat(path: Path, rows, with_class: bool = True) -> None:
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"] + (["class"] if with_class else [])
    dtype = [(f, "O") for f in fields] + [("fname", "O")]
    annos = np.zeros((1, len(rows)), dtype=dtype)
    for i, (fname, x1, y1, x2, y2, cls) in enumerate(rows):
        values = [x1, y1, x2, y2] + ([cls] if with_class else [])
        for f, v in zip(fields, values):
            annos[0, i][f] = np.array([[v]], dtype=np.uint16)
        annos[0, i]["fname"] = np.array([fname])
    scipy_io.savemat(str(path), {"annotations": annos})


def make_devkit(root: Path) -> Path:
    (root / "devkit").mkdir(parents=True)
    names = np.empty((1, len(CLASSES)), dtype=object)
    for i, n in enumerate(CLASSES):
        names[0, i] = n
    scipy_io.savemat(str(root / "devkit" / "cars_meta.mat"), {"class_names": names})
    _annos_mat(root / "devkit" / "cars_train_annos.mat", TRAIN)
    _annos_mat(root / "cars_test_annos_withlabels.mat", TEST)
    for split, rows in (("train", TRAIN), ("test", TEST)):
        for i, row in enumerate(rows):
            photo(root / f"cars_{split}" / row[0], (48, 32), seed=i)
    return root


def make_csv(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "names.csv").write_text("\n".join(CLASSES) + "\n")
    for split, rows in (("train", TRAIN), ("test", TEST)):
        (root / f"anno_{split}.csv").write_text(
            "".join(",".join(map(str, r)) + "\n" for r in rows))
        for i, row in enumerate(rows):
            # Class folders of the re-release replace '/' in names.
            folder = CLASSES[row[5] - 1].replace("/", "-")
            photo(root / "car_data" / "car_data" / split / folder / row[0], (48, 32), seed=i)
    return root


def _canon(items):
    return [(it.id, {k: v for k, v in it.fields.items() if k != "image"}, it.mask_spec)
            for it in items]


def test_devkit_items_instructions_and_box_masks(tmp_path):
    from xmgie.runner.datasets import cars, detect_adapter, render_mask

    root = make_devkit(tmp_path / "cars")
    assert detect_adapter(root) is cars
    items = cars.items(root, split="test", limit=None, seed=0)
    assert [it.id for it in items] == [f"test_0000{i}" for i in range(1, 7)]
    kinds = set()
    for it, (fname, x1, y1, x2, y2, cls) in zip(items, TEST):
        f = it.fields
        assert f["image"] == str((root / "cars_test" / fname).resolve())
        assert f["class"] == CLASSES[cls - 1] and f["label"] == cls and f["split"] == "test"
        assert f["bbox"] == [x1, y1, x2, y2]
        article = "an" if CLASSES[cls - 1][0] in "AEIOU" else "a"
        assert f["source_prompt"] == f"a photo of {article} {CLASSES[cls - 1]}"
        assert f["attributes"] == {"class": CLASSES[cls - 1]}
        assert f["object"] == "car"
        kinds.add(f["edit_kind"])
        if f["edit_kind"] == "colour":
            assert f["target_attribute"] == "colour"
            colour = f["target_value"]
            assert colour in cars.COLOURS
            assert f["instruction"] == f"make the car {colour}"
            assert f["edit_words"] == [colour]
        else:
            assert f["target_attribute"] == "class"
            other = f["target_value"]
            assert other in CLASSES and other != CLASSES[cls - 1]
            article = "an" if other[0] in "AEIOU" else "a"
            assert f["instruction"] == f"turn the car into {article} {other}"
            assert f["target_prompt"] == f"a photo of {article} {other}"
        # The 1-based inclusive box covers exactly its pixels in the rendered mask.
        mask = render_mask(it.mask_spec, (48, 32))
        assert mask.sum() == (x2 - x1 + 1) * (y2 - y1 + 1)
        assert mask[y1 - 1, x1 - 1] == 1 and mask[y2 - 1, x2 - 1] == 1
        if x1 > 1:
            assert mask[y1 - 1, x1 - 2] == 0
    assert kinds == {"colour", "model"}
    specs = cars.attribute_specs(root)
    assert specs["class"]["values"] == CLASSES and specs["colour"]["values"] == list(cars.COLOURS)


def test_csv_release_gives_the_same_items_as_the_devkit(tmp_path):
    from xmgie.runner.datasets import cars, detect_adapter

    dev = make_devkit(tmp_path / "dev")
    csv_root = make_csv(tmp_path / "csv")
    assert detect_adapter(csv_root) is cars
    for split in ("train", "test"):
        a = cars.items(dev, split=split, limit=None, seed=3)
        b = cars.items(csv_root, split=split, limit=None, seed=3)
        assert _canon(a) == _canon(b)
    b = cars.items(csv_root, split="test", limit=None, seed=3)
    assert b[1].fields["image"].endswith(
        "car_data/car_data/test/AM General Hummer SUV 2000/00002.jpg")
    assert Path(cars.items(csv_root, split="train", limit=None, seed=3)[1].fields["image"]
                ).parent.name == "Ram C-V Cargo Van Minivan 2012"


def test_split_limit_seed_selection(tmp_path):
    from xmgie.runner.dataset import DatasetError, load_dataset
    from xmgie.runner.datasets import cars

    root = make_devkit(tmp_path / "cars")
    every = cars.items(root, split=None, limit=None, seed=0)
    assert len(every) == len(TRAIN) + len(TEST)
    two = cars.items(root, split="test", limit=2, seed=5)
    assert _canon(two) == _canon(cars.items(root, split="test", limit=2, seed=5))
    four = cars.items(root, split="test", limit=4, seed=5)
    assert {it.id for it in two} <= {it.id for it in four}
    draws = {tuple(it.id for it in cars.items(root, split="test", limit=2, seed=s))
             for s in range(6)}
    assert len(draws) > 1
    # An item keeps its instruction whatever the limit.
    full = {it.id: it.fields["instruction"] for it in cars.items(root, split="test",
                                                                  limit=None, seed=5)}
    assert all(full[it.id] == it.fields["instruction"] for it in two)
    ds = load_dataset(root, split="train", limit=3, seed=1)
    assert ds.kind == cars.NAME and len(ds) == 3
    assert all(it.id.startswith("train_") for it in ds)
    with pytest.raises(DatasetError, match="stanford-cars has the splits train, test"):
        cars.items(root, split="val", limit=None, seed=0)


def test_missing_and_malformed_files_are_named(tmp_path):
    from xmgie.runner.dataset import DatasetError
    from xmgie.runner.datasets import cars

    root = make_devkit(tmp_path / "dev")
    (root / "cars_test_annos_withlabels.mat").unlink()
    with pytest.raises(DatasetError, match=r"cars_test_annos_withlabels\.mat is missing"):
        cars.items(root, split="test", limit=None, seed=0)
    # The devkit's own unlabelled test file lacks the class.
    _annos_mat(root / "cars_test_annos_withlabels.mat", TEST, with_class=False)
    with pytest.raises(DatasetError, match=r"withlabels\.mat: the 'annotations' struct lacks "
                                           r"the fields class"):
        cars.items(root, split="test", limit=None, seed=0)
    (root / "devkit" / "cars_train_annos.mat").write_bytes(b"not a mat file")
    with pytest.raises(DatasetError, match=r"cars_train_annos\.mat is not a readable MATLAB"):
        cars.items(root, split="train", limit=None, seed=0)
    scipy_io.savemat(str(root / "devkit" / "cars_meta.mat"), {"names": np.zeros(3)})
    with pytest.raises(DatasetError, match=r"cars_meta\.mat has no 'class_names'"):
        cars.items(root, split="train", limit=None, seed=0)

    csv_root = make_csv(tmp_path / "csv")
    anno = csv_root / "anno_test.csv"
    anno.write_text(anno.read_text() + "00007.jpg,1,2,3\n")
    with pytest.raises(DatasetError, match=r"anno_test\.csv, line 7: 4 columns; expected 6"):
        cars.items(csv_root, split="test", limit=None, seed=0)
    anno.write_text("00001.jpg,1,1,5,5,9\n")
    with pytest.raises(DatasetError, match=r"anno_test\.csv: 00001\.jpg has class 9"):
        cars.items(csv_root, split="test", limit=None, seed=0)
    anno.write_text("00099.jpg,1,1,5,5,1\n")
    with pytest.raises(DatasetError, match=r"anno_test\.csv: the photo 00099\.jpg is not"):
        cars.items(csv_root, split="test", limit=None, seed=0)
    anno.write_text("00001.jpg,9,1,5,5,1\n")
    with pytest.raises(DatasetError, match=r"anno_test\.csv: 00001\.jpg has box"):
        cars.items(csv_root, split="test", limit=None, seed=0)


def test_batch_tiny_runs_two_items_with_box_masks(tmp_path, tiny_env, capsys):
    from xmgie.runner.datasets import cars

    root = make_devkit(tmp_path / "cars")
    run = tmp_path / "run"
    records = run_records(root, run, "--split", "test", "--limit", "2", "--seed", "4")
    expected = cars.items(root, split="test", limit=2, seed=4)
    assert sorted(records) == sorted(it.id for it in expected)
    check_run_masks(run, expected, (48, 32))
    # A missing annotation file reaches the command's user as one line naming it.
    (root / "cars_test_annos_withlabels.mat").unlink()
    err = batch_error(root, tmp_path / "r2", capsys, "--split", "test")
    assert "cars_test_annos_withlabels.mat is missing" in err
