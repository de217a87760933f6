"""The Oxford-102 adapter: a fixture in the published layout (.mat files written with
scipy.io) becomes species-change items masked by the segmentations when present,
selected by split, limit and seed, and runs through ``xmgie batch --tiny``; broken
annotation files are named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io
from _datasets_fixtures import batch_error, check_run_masks, run_records
from PIL import Image

LABELS = [77, 73, 1, 102, 42, 73]          # classes of photos 1..6
SETID = {"trnid": [2, 5], "valid": [1], "tstid": [3, 4, 6]}
BLUE = (0, 0, 254)


def make_oxford(folder: Path, segmented=(3, 4)) -> Path:
    """jpg/, imagelabels.mat, setid.mat as published (1 x N double arrays), and segmim/
    for the photos in ``segmented``: a flower square on pure blue."""
    (folder / "jpg").mkdir(parents=True)
    for number in range(1, len(LABELS) + 1):
        Image.new("RGB", (48, 40), (20 * number, 200, 90)).save(
            folder / "jpg" / f"image_{number:05d}.jpg")
        if number in segmented:
            (folder / "segmim").mkdir(exist_ok=True)
            seg = np.zeros((40, 48, 3), np.uint8)
            seg[:] = BLUE
            seg[10:30, 12:36] = (250, 60, 120)
            Image.fromarray(seg).save(folder / "segmim" / f"segmim_{number:05d}.jpg",
                                      quality=90)
    scipy.io.savemat(folder / "imagelabels.mat",
                     {"labels": np.array([LABELS], dtype=np.float64)})
    scipy.io.savemat(folder / "setid.mat",
                     {k: np.array([v], dtype=np.float64) for k, v in SETID.items()})
    return folder


def test_items_instructions_and_segmentation_masks(tmp_path):
    from xmgie.runner.dataset import load_dataset
    from xmgie.runner.datasets import oxford102, render_mask

    assert len(oxford102.CLASS_NAMES) == len(set(oxford102.CLASS_NAMES)) == 102
    assert oxford102.CLASS_NAMES[0] == "pink primrose"
    assert oxford102.CLASS_NAMES[101] == "blackberry lily"
    ds = load_dataset(make_oxford(tmp_path / "flowers"))
    assert ds.kind == "oxford-102"
    assert [i.id for i in ds] == [f"image_{n:05d}" for n in range(1, 7)]
    for number, item in enumerate(ds, 1):
        f = item.fields
        assert f["class_id"] == LABELS[number - 1]
        assert f["class"] == oxford102.CLASS_NAMES[LABELS[number - 1] - 1]
        assert f["target_class"] in oxford102.CLASS_NAMES and f["target_class"] != f["class"]
        assert f["instruction"] == f"turn the {f['class']} into " + \
            ("an " if f["target_class"][0] in "aeiou" else "a ") + f["target_class"]
        assert f["source_prompt"].endswith(f["class"])
        assert f["target_prompt"].endswith(f["target_class"])
        assert f["edit_words"] == f["target_class"].split() and f["object"] == "flower"
        assert f["image"] == str(ds.path / "jpg" / f"image_{number:05d}.jpg")
        assert (item.mask_spec is not None) == (number in (3, 4))
    first = ds.items[0].fields
    assert first["class"] == "passion flower" and first["split"] == "val"
    assert first["source_prompt"] == "a photo of a passion flower"
    # The segmentation (a JPEG: the blue is not exact) gives the flower's square.
    mask = render_mask(ds.items[2].mask_spec, (48, 40))
    expected = np.zeros((40, 48), bool)
    expected[10:30, 12:36] = True
    # JPEG's chroma subsampling blurs the edge: differences only on the square's rim.
    inner, outer = np.zeros_like(expected), np.zeros_like(expected)
    inner[12:28, 14:34] = True
    outer[8:32, 10:38] = True
    assert mask[inner].all() and not mask[~outer].any()
    assert (mask.astype(bool) != expected).sum() < 0.1 * expected.sum()
    assert mask[20, 24] == 1 and mask[2, 2] == 0


def test_split_limit_and_seed_select(tmp_path):
    from xmgie.runner.dataset import DatasetError, load_dataset

    folder = make_oxford(tmp_path / "flowers")
    ids = lambda **kw: [i.id for i in load_dataset(folder, **kw)]  # noqa: E731
    assert ids(split="train") == ["image_00002", "image_00005"]
    assert ids(split="val") == ids(split="valid") == ["image_00001"]
    assert ids(split="test") == ["image_00003", "image_00004", "image_00006"]
    assert ids(split="all") == ids()
    assert ids(split="test", limit=2, seed=4) == ids(split="test", limit=2, seed=4)
    assert len(ids(split="test", limit=2, seed=4)) == 2
    assert len({tuple(ids(limit=2, seed=s)) for s in range(8)}) > 1
    assert set(ids(limit=2, seed=5)) <= set(ids(limit=4, seed=5))
    with pytest.raises(DatasetError, match="has the splits train, val, test"):
        load_dataset(folder, split="training")
    with pytest.raises(DatasetError, match="--limit 0"):
        load_dataset(folder, limit=0)


@pytest.mark.parametrize("name, damage, expected", [
    ("imagelabels.mat", None, None),  # without labels the folder is not Oxford-102
    ("setid.mat", "remove", None),
    ("setid.mat", "text", r"setid.mat is not a readable MATLAB .mat file"),
    ("setid.mat", {"trnid": [1], "valid": [2]}, r"setid.mat has no variable 'tstid'"),
    ("setid.mat", {"trnid": [1], "valid": [2], "tstid": [99]},
     r"setid.mat: 'tstid' lists photo 99; imagelabels.mat has photos 1..6"),
    ("imagelabels.mat", {"labels": [1, 2, 103, 4, 5, 6]}, r"'labels' must hold classes 1..102"),
    ("imagelabels.mat", {"classes": [1]}, r"imagelabels.mat has no variable 'labels'"),
])
def test_broken_annotation_files_are_named(tmp_path, name, damage, expected):
    from xmgie.runner.dataset import DatasetError, load_dataset
    from xmgie.runner.datasets import AnnotationError

    folder = make_oxford(tmp_path / "flowers")
    path = folder / name
    if damage is None:
        path.unlink()
        with pytest.raises(DatasetError, match="has no manifest.jsonl"):
            load_dataset(folder)
        return
    if damage == "remove":  # setid.mat is needed only to select a split
        path.unlink()
        assert len(load_dataset(folder)) == 6
        with pytest.raises(AnnotationError, match="setid.mat is missing"):
            load_dataset(folder, split="test")
        return
    if damage == "text":
        path.write_text("not a mat file")
    else:
        scipy.io.savemat(path, {k: np.array([v], dtype=np.float64) for k, v in damage.items()})
    with pytest.raises(AnnotationError, match=expected) as info:
        load_dataset(folder)
    assert str(path) in str(info.value)


def test_batch_runs_a_split_with_segmentation_masks(tmp_path, tiny_env, capsys):
    from xmgie.runner.dataset import load_dataset

    folder = make_oxford(tmp_path / "flowers")
    run = tmp_path / "run"
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    records = run_records(folder, run, "--split", "test", "--limit", "2", "--seed", "2")
    chosen = load_dataset(folder, split="test", limit=2, seed=2)
    assert sorted(records) == [i.id for i in chosen] and len(records) == 2
    assert any(i.mask_spec for i in chosen)  # two of 3, 4, 6: one is segmented
    # A segmented photo's mask is written at its size; without one, no mask (whole photo).
    check_run_masks(run, chosen, (48, 40))
    for item in chosen:
        rec = records[item.id]
        assert rec["inputs"]["split"] == "test"
        assert rec["inputs"]["instruction"] == item.fields["instruction"]
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before  # untouched
    # Through the command, a malformed annotation file is a message naming it, exit 101.
    (folder / "imagelabels.mat").write_bytes(b"MATLAB 5.0 but cut short")
    err = batch_error(folder, tmp_path / "run2", capsys)
    assert "imagelabels.mat is not a readable MATLAB .mat file" in err
