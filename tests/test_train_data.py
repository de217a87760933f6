"""Training data: every layout written for real on disk and read back through load_pairs,
the batch format of collate, the synthetic generator's determinism, and each error."""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xmgie.training import data as tdata
from xmgie.training.data import (
    PairDataset,
    TrainDataError,
    collate,
    load_pairs,
    split_validation,
)
from xmgie.training.synthetic import main as synthetic_main
from xmgie.training.synthetic import make_synthetic

# --- helpers ------------------------------------------------------------------------


def _rgb(w: int, h: int, colour=(200, 30, 30)) -> Image.Image:
    return Image.new("RGB", (w, h), colour)


def _mask(w: int, h: int, box=None, value=255) -> Image.Image:
    m = Image.new("L", (w, h), 0)
    if box is not None:
        m.paste(value, box)
    return m


def _manifest(folder: Path, records: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _simple_manifest(folder: Path, *, source=None, target=None, mask=None, **fields) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (source or _rgb(40, 40)).save(folder / "a.png")
    (target or _rgb(40, 40, (30, 30, 200))).save(folder / "a_edit.png")
    record = {"id": "a", "image": "a.png", "target": "a_edit.png",
              "instruction": "make it blue", **fields}
    if mask is not None:
        mask.save(folder / "a_mask.png")
        record["mask"] = "a_mask.png"
    return _manifest(folder, [record])


def _png_bytes(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """datasets' cache (parquet is converted to arrow there) inside the test's folder."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    return datasets


# --- the synthetic generator ----------------------------------------------------------


def test_synthetic_is_deterministic_and_pairs_differ_only_inside_the_mask(tmp_path):
    a = make_synthetic(tmp_path / "a", n=6, size=48, seed=3)
    b = make_synthetic(tmp_path / "b", n=6, size=48, seed=3)
    c = make_synthetic(tmp_path / "c", n=6, size=48, seed=4)
    assert a.name == "manifest.jsonl"
    assert a.read_bytes() == b.read_bytes()
    files = sorted(p.relative_to(a.parent) for p in (a.parent / "images").iterdir())
    assert len(files) == 18
    for rel in files:
        assert (a.parent / rel).read_bytes() == (b.parent / rel).read_bytes(), rel
    assert any((a.parent / r).read_bytes() != (c.parent / r).read_bytes() for r in files)
    # A larger n extends a smaller one: pair i depends on (i, size, seed) only.
    short = make_synthetic(tmp_path / "short", n=2, size=48, seed=3)
    assert short.read_text().splitlines() == a.read_text().splitlines()[:2]

    records = [json.loads(line) for line in a.read_text().splitlines()]
    for rec in records:
        src = np.asarray(Image.open(a.parent / rec["image"]), np.int16)
        tgt = np.asarray(Image.open(a.parent / rec["target"]), np.int16)
        mask = np.asarray(Image.open(a.parent / rec["mask"])) > 127
        assert src.shape == tgt.shape == (48, 48, 3) and mask.shape == (48, 48)
        assert 0.05 < mask.mean() < 0.5
        assert (src[~mask] == tgt[~mask]).all()          # the wall is untouched
        assert np.abs(src[mask] - tgt[mask]).mean() > 40  # the shape is recoloured
        colour = rec["edit_words"][0]
        assert rec["instruction"] == f"make the {rec['object']} {colour}"
        assert colour in rec["target_prompt"] and colour not in rec["source_prompt"]
        assert rec["expressive_instruction"].endswith(".")


def test_synthetic_command_line_writes_a_dataset(tmp_path, capsys):
    assert synthetic_main([str(tmp_path / "d"), "--n", "3", "--size", "32", "--seed", "1"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "d" / "manifest.jsonl")
    assert len(load_pairs(tmp_path / "d", resolution=32)) == 3
    assert synthetic_main([str(tmp_path / "e"), "--n", "0"]) == 2
    assert "n=0" in capsys.readouterr().err


# --- manifest -------------------------------------------------------------------------


def test_manifest_items_and_the_collated_batch(tmp_path):
    make_synthetic(tmp_path / "s", n=5, size=64, seed=0)
    ds = load_pairs(tmp_path / "s", resolution=32)
    assert isinstance(ds, PairDataset) and len(ds) == 5 and ds.format == "manifest"
    item = ds[1]
    assert item["source"].shape == item["target"].shape == (3, 32, 32)
    assert item["mask"].shape == (1, 32, 32)
    for key in ("source", "target", "mask"):
        assert item[key].dtype == torch.float32
        assert 0.0 <= float(item[key].min()) and float(item[key].max()) <= 1.0
    assert set(item["mask"].unique().tolist()) == {0.0, 1.0}
    assert item["has_mask"] is True and item["id"] == "synthetic_0001"
    assert item["instruction"].startswith("make the ")

    batch = collate([ds[i] for i in range(3)])
    assert set(batch) == {"source", "target", "mask", "has_mask", "instruction",
                          "source_prompt", "target_prompt", "expressive_instruction", "id",
                          "edit_words"}
    assert batch["source"].shape == (3, 3, 32, 32) and batch["mask"].shape == (3, 1, 32, 32)
    assert batch["has_mask"].dtype == torch.bool and batch["has_mask"].tolist() == [True] * 3
    assert batch["id"] == ["synthetic_0000", "synthetic_0001", "synthetic_0002"]
    assert all(isinstance(t, str) and t for t in batch["expressive_instruction"])
    assert batch["edit_words"][0] and isinstance(batch["edit_words"][0][0], str)

    # Through a DataLoader, as the engine uses it.
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate)
    sizes = [b["source"].shape[0] for b in loader]
    assert sizes == [2, 2, 1]


def test_native_resolution_keeps_the_pixels(tmp_path):
    manifest = make_synthetic(tmp_path / "s", n=1, size=64, seed=0)
    rec = json.loads(manifest.read_text())
    item = load_pairs(manifest, resolution=64)[0]
    expected = np.asarray(Image.open(tmp_path / "s" / rec["target"]), np.float32) / 255.0
    assert torch.equal(item["target"], torch.from_numpy(expected.transpose(2, 0, 1).copy()))
    mask = np.asarray(Image.open(tmp_path / "s" / rec["mask"])) > 127
    assert torch.equal(item["mask"][0].bool(), torch.from_numpy(mask))


def test_resize_shortest_side_then_centre_crop_and_mask_threshold(tmp_path):
    # 96 x 32: red | green | blue thirds; the centre crop keeps only the green one.
    wide = Image.new("RGB", (96, 32), (255, 0, 0))
    wide.paste((0, 255, 0), (32, 0, 64, 32))
    wide.paste((0, 0, 255), (64, 0, 96, 32))
    # The mask's grey 100 is below 0.5 (not edited), 200 above (edited).
    mask = Image.new("L", (96, 32), 0)
    mask.paste(100, (32, 0, 48, 32))
    mask.paste(200, (48, 0, 64, 32))
    _simple_manifest(tmp_path / "m", source=wide, target=wide, mask=mask)
    item = load_pairs(tmp_path / "m", resolution=16)[0]
    src = item["source"]
    assert src.shape == (3, 16, 16)
    assert float(src[1, :, 2:14].min()) > 0.95 and float(src[0, :, 2:14].max()) < 0.05
    assert item["mask"][0, :, :8].sum() == 0 and item["mask"][0, :, 8:].min() == 1


def test_rgba_grayscale_and_palette_images_become_rgb(tmp_path):
    rgba = Image.new("RGBA", (32, 32), (10, 200, 10, 90))
    gray = Image.new("L", (32, 32), 128)
    _simple_manifest(tmp_path / "m", source=rgba, target=gray)
    item = load_pairs(tmp_path / "m", resolution=32)[0]
    assert item["source"].shape == item["target"].shape == (3, 32, 32)
    assert torch.allclose(item["source"][:, 0, 0], torch.tensor([10, 200, 10]) / 255.0)
    assert torch.allclose(item["target"][:, 5, 5], torch.full((3,), 128 / 255.0))
    assert item["has_mask"] is False and torch.equal(item["mask"], torch.ones(1, 32, 32))


def test_a_full_mask_is_a_whole_image_edit(tmp_path):
    _simple_manifest(tmp_path / "m", mask=Image.new("L", (40, 40), 255))
    item = load_pairs(tmp_path / "m", resolution=16)[0]
    assert item["has_mask"] is True and float(item["mask"].min()) == 1.0


def test_split_validation_is_seeded_and_disjoint(tmp_path):
    ds = load_pairs(make_synthetic(tmp_path / "s", n=10, size=32), resolution=32)
    train, val = split_validation(ds, 0.2, seed=7)
    again_train, again_val = split_validation(ds, 0.2, seed=7)
    assert len(train) == 8 and len(val) == 2
    ids = lambda d: [p.id for p in d.pairs]  # noqa: E731
    assert ids(val) == ids(again_val) and ids(train) == ids(again_train)
    assert set(ids(train)) | set(ids(val)) == set(ids(ds))
    assert not set(ids(train)) & set(ids(val))
    assert any(ids(split_validation(ds, 0.2, seed=s)[1]) != ids(val) for s in range(8))
    whole, none = split_validation(ds, 0.0, seed=0)
    assert len(whole) == 10 and len(none) == 0
    assert len(split_validation(ds, 0.01, seed=0)[1]) == 1  # at least one pair held out
    with pytest.raises(TrainDataError, match=r"expected a number in \[0, 1\)"):
        split_validation(ds, 1.0, seed=0)
    one = ds.subset([0])
    with pytest.raises(TrainDataError, match="leaves none to train on"):
        split_validation(one, 0.5, seed=0)
    # Any map-style dataset (the engine accepts one in place of a path) splits the same way.
    plain = torch.utils.data.TensorDataset(torch.arange(10))
    p_train, p_val = split_validation(plain, 0.2, seed=7)
    assert isinstance(p_val, torch.utils.data.Subset)
    assert [ds.pairs[i].id for i in p_val.indices] == ids(val)
    assert len(p_train) == 8


# --- InstructPix2Pix ------------------------------------------------------------------


def _ip2p(root: Path, prompts: dict[str, list[int]], *, seeds_json=True, size=(48, 48)) -> Path:
    for i, (name, seeds) in enumerate(prompts.items()):
        folder = root / name
        folder.mkdir(parents=True)
        (folder / "prompt.json").write_text(json.dumps(
            {"input": f"a photo of house {i}", "edit": f"make house {i} red",
             "output": f"a photo of red house {i}"}))
        for seed in seeds:
            _rgb(*size, (20 * i, 100, 100)).save(folder / f"{seed}_0.jpg")
            _rgb(*size, (200, 20 * i, 20)).save(folder / f"{seed}_1.jpg")
    if seeds_json:
        (root / "seeds.json").write_text(json.dumps([[n, s] for n, s in prompts.items()]))
    return root


def test_instructpix2pix_folders(tmp_path):
    prompts = {f"{i:07d}": [1000 + i, 2000 + i] for i in range(20)}
    root = _ip2p(tmp_path / "ip2p", prompts)
    ds = load_pairs(root, resolution=32)
    assert ds.format == "ip2p" and len(ds) == 40
    first = ds.pairs[0]
    assert first.id == "0000000_1000"
    assert first.instruction == "make house 0 red"
    assert first.source_prompt == "a photo of house 0"
    assert first.target_prompt == "a photo of red house 0"
    assert first.source.path == root / "0000000" / "1000_0.jpg"
    assert first.target.path == root / "0000000" / "1000_1.jpg"
    item = ds[3]
    assert item["source"].shape == (3, 32, 32) and item["has_mask"] is False
    assert float(item["target"][0].mean()) > 0.7  # the edit (red) is the target
    # InstructPix2Pix's own 90/5/5 % cut of seeds.json.
    assert len(load_pairs(root, resolution=32, split="train")) == 36
    assert [p.id for p in load_pairs(root, resolution=32, split="val").pairs] == \
        ["0000018_1018", "0000018_2018"]
    assert len(load_pairs(root / "seeds.json", resolution=32, split="test")) == 2
    with pytest.raises(TrainDataError, match="split 'dev'"):
        load_pairs(root, resolution=32, split="dev")


def test_instructpix2pix_folders_without_seeds_json_are_scanned(tmp_path):
    root = _ip2p(tmp_path / "ip2p", {"a": [5, 7], "b": [3]}, seeds_json=False)
    ds = load_pairs(root, resolution=16)
    assert ds.format == "ip2p"
    assert [p.id for p in ds.pairs] == ["a_5", "a_7", "b_3"]


def test_instructpix2pix_missing_image_is_named(tmp_path):
    root = _ip2p(tmp_path / "ip2p", {"0000001": [11, 12]})
    (root / "0000001" / "12_1.jpg").unlink()
    with pytest.raises(TrainDataError) as err:
        load_pairs(root, resolution=16)
    msg = str(err.value)
    assert "'0000001_12'" in msg and "target" in msg and "12_1.jpg" in msg
    assert "does not exist" in msg


def test_repeated_pairs_are_refused(tmp_path):
    root = _ip2p(tmp_path / "ip2p", {"0000001": [11]})
    (root / "seeds.json").write_text(json.dumps([["0000001", [11]], ["0000001", [11]]]))
    with pytest.raises(TrainDataError, match="pairs 1 and 2 have the same id '0000001_11'"):
        load_pairs(root, resolution=16)


# --- MagicBrush -----------------------------------------------------------------------


def _transparent_mask(photo: Image.Image, box) -> Image.Image:
    """MagicBrush's mask: the photo with the edited region erased (alpha 0)."""
    rgba = photo.convert("RGBA")
    alpha = Image.new("L", photo.size, 255)
    alpha.paste(0, box)
    rgba.putalpha(alpha)
    return rgba


def _magicbrush(root: Path, sessions: dict[str, int], size=(64, 48)) -> Path:
    root.mkdir(parents=True)
    data, captions = {}, {}
    for sid, n_turns in sessions.items():
        folder = root / "images" / sid
        folder.mkdir(parents=True)
        photo = _rgb(*size, (90, 90, 90))
        photo.save(folder / f"{sid}-input.png")
        turns, described = [], {f"{sid}-input.png": f"a grey room {sid}"}
        for k in range(1, n_turns + 1):
            _rgb(*size, (90 + 40 * k, 90, 90)).save(folder / f"{sid}-output{k}.png")
            _transparent_mask(photo, (0, 0, size[0] // 2, size[1])).save(
                folder / f"{sid}-mask{k}.png")
            turns.append({"input": f"{sid}-input.png" if k == 1 else f"{sid}-output{k - 1}.png",
                          "output": f"{sid}-output{k}.png", "mask": f"{sid}-mask{k}.png",
                          "instruction": f"turn {k}: paint the left wall red"})
            described[f"{sid}-output{k}.png"] = f"a room {sid} after turn {k}"
        data[sid], captions[sid] = turns, described
    (root / "edit_sessions.json").write_text(json.dumps(data))
    (root / "global_descriptions.json").write_text(json.dumps(captions))
    return root


def test_magicbrush_folders(tmp_path):
    root = _magicbrush(tmp_path / "mb" / "dev", {"327726": 2, "100": 1})
    ds = load_pairs(root, resolution=16)
    assert ds.format == "magicbrush" and len(ds) == 3
    assert [p.id for p in ds.pairs] == ["327726_1", "327726_2", "100_1"]
    second = ds.pairs[1]
    assert second.source.path.name == "327726-output1.png"  # multi-turn: the last edit
    assert second.target.path.name == "327726-output2.png"
    assert second.instruction == "turn 2: paint the left wall red"
    assert second.source_prompt == "a room 327726 after turn 1"
    assert second.target_prompt == "a room 327726 after turn 2"
    item = ds[0]
    # The transparent half of the RGBA mask is the edited region.
    assert item["has_mask"] is True
    assert float(item["mask"][0, :, :8].min()) == 1.0 and float(item["mask"][0, :, 8:].max()) == 0
    # The parent folder with split sub-folders: the split picks one.
    _magicbrush(tmp_path / "mb" / "train", {"7": 1})
    assert [p.id for p in load_pairs(tmp_path / "mb", resolution=16, format="magicbrush",
                                     split="dev").pairs] == [p.id for p in ds.pairs]
    assert [p.id for p in load_pairs(tmp_path / "mb", resolution=16).pairs] == ["7_1"]


def test_magicbrush_mask_of_another_size_names_both_sizes(tmp_path):
    root = _magicbrush(tmp_path / "mb", {"5": 1})
    Image.new("L", (32, 32), 255).save(root / "images" / "5" / "5-mask1.png")
    with pytest.raises(TrainDataError) as err:
        load_pairs(root, resolution=16)
    msg = str(err.value)
    assert "'5_1'" in msg and "32x32" in msg and "64x48" in msg and "5-mask1.png" in msg


# --- Hugging Face datasets ------------------------------------------------------------


def _hf_rows(n: int, w=40, h=40) -> dict[str, list]:
    return {
        "input_image": [_rgb(w, h, (10 * i, 50, 50)) for i in range(n)],
        "edit_prompt": [f"make photo {i} red" for i in range(n)],
        "edited_image": [_rgb(w, h, (250, 10 * i, 10)) for i in range(n)],
    }


def test_hf_save_to_disk_folder(tmp_path, hf_cache):
    datasets = hf_cache
    features = datasets.Features({"input_image": datasets.Image(),
                                  "edit_prompt": datasets.Value("string"),
                                  "edited_image": datasets.Image()})
    datasets.Dataset.from_dict(_hf_rows(3), features=features).save_to_disk(tmp_path / "arrow")
    ds = load_pairs(tmp_path / "arrow", resolution=16)
    assert ds.format == "hf" and len(ds) == 3
    assert [p.id for p in ds.pairs] == ["row000000", "row000001", "row000002"]
    item = ds[2]
    assert item["instruction"] == "make photo 2 red" and item["has_mask"] is False
    assert torch.allclose(item["target"][:, 0, 0], torch.tensor([250, 20, 10]) / 255.0)
    assert torch.allclose(item["source"][:, 0, 0], torch.tensor([20, 50, 50]) / 255.0)
    # Picklable, so DataLoader workers can take it.
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[1]["source"], ds[1]["source"])
    batch = collate([ds[0], ds[1]])
    assert batch["source"].shape == (2, 3, 16, 16)


def test_hf_dataset_dict_splits(tmp_path, hf_cache):
    datasets = hf_cache
    features = datasets.Features({"input_image": datasets.Image(),
                                  "edit_prompt": datasets.Value("string"),
                                  "edited_image": datasets.Image()})
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict(_hf_rows(3), features=features),
        "test": datasets.Dataset.from_dict(_hf_rows(1), features=features)})
    dd.save_to_disk(tmp_path / "dd")
    assert len(load_pairs(tmp_path / "dd", resolution=16)) == 3  # train by default
    assert len(load_pairs(tmp_path / "dd", resolution=16, split="test")) == 1
    with pytest.raises(TrainDataError, match="has splits train, test"):
        load_pairs(tmp_path / "dd", resolution=16, split="validation")


def test_hf_parquet_magicbrush_columns_and_splits(tmp_path, hf_cache):
    datasets = hf_cache
    features = datasets.Features({
        "img_id": datasets.Value("string"), "turn_index": datasets.Value("int32"),
        "source_img": datasets.Image(), "mask_img": datasets.Image(),
        "instruction": datasets.Value("string"), "target_img": datasets.Image()})
    photo = _rgb(32, 32, (90, 90, 90))

    def rows(ids):
        return {"img_id": ids, "turn_index": [1] * len(ids),
                "source_img": [photo] * len(ids),
                "mask_img": [_transparent_mask(photo, (0, 0, 16, 32))] * len(ids),
                "instruction": [f"edit {i}" for i in ids],
                "target_img": [_rgb(32, 32, (200, 90, 90))] * len(ids)}

    data = tmp_path / "MagicBrush" / "data"
    data.mkdir(parents=True)
    train_rows = rows(["1", "2"])
    train_rows["mask_img"][1] = None
    datasets.Dataset.from_dict(train_rows, features=features).to_parquet(
        str(data / "train-00000-of-00001.parquet"))
    datasets.Dataset.from_dict(rows(["9"]), features=features).to_parquet(
        str(data / "dev-00000-of-00001.parquet"))
    ds = load_pairs(tmp_path / "MagicBrush", resolution=16)   # auto: parquet, train split
    assert ds.format == "hf" and [p.id for p in ds.pairs] == ["1_1", "2_1"]
    item = ds[0]
    assert item["instruction"] == "edit 1" and item["has_mask"] is True
    assert float(item["mask"][0, :, :8].min()) == 1.0 and float(item["mask"][0, :, 8:].max()) == 0
    # A pair whose mask cell is empty has no mask (the column stays).
    assert ds[1]["has_mask"] is False and float(ds[1]["mask"].min()) == 1.0
    dev = load_pairs(tmp_path / "MagicBrush", resolution=16, split="dev")
    assert [p.id for p in dev.pairs] == ["9_1"]
    one_file = load_pairs(data / "dev-00000-of-00001.parquet", resolution=16)
    assert len(one_file) == 1
    with pytest.raises(TrainDataError, match="no parquet files of split 'test'.*dev, train"):
        load_pairs(tmp_path / "MagicBrush", resolution=16, split="test")


def test_hf_column_mapping_and_path_cells(tmp_path, hf_cache):
    datasets = hf_cache
    folder = tmp_path / "custom"
    (folder / "img").mkdir(parents=True)
    _rgb(24, 24).save(folder / "img" / "b.png")
    _rgb(24, 24, (0, 0, 250)).save(folder / "img" / "a.png")
    table = {"before": ["img/b.png"], "after": ["img/a.png"], "text": ["make it blue"],
             "why": ["Paint the red card blue."], "key": ["card-1"]}
    datasets.Dataset.from_dict(table).to_parquet(str(folder / "pairs.parquet"))
    columns = {"source": "before", "target": "after", "instruction": "text",
               "expressive_instruction": "why", "id": "key"}
    ds = load_pairs(folder, resolution=8, columns=columns)
    item = ds[0]
    assert item["id"] == "card-1" and item["expressive_instruction"] == "Paint the red card blue."
    assert torch.allclose(item["target"][:, 0, 0], torch.tensor([0, 0, 250]) / 255.0)
    with pytest.raises(TrainDataError) as err:
        load_pairs(folder, resolution=8)
    msg = str(err.value)
    assert "no column for source, target, instruction" in msg and "before, after" in msg
    with pytest.raises(TrainDataError, match="column 'nope' .*does not exist"):
        load_pairs(folder, resolution=8, columns={**columns, "target": "nope"})
    with pytest.raises(TrainDataError, match="unknown role"):
        load_pairs(folder, resolution=8, columns={**columns, "edited": "after"})


def test_hf_hub_ids_are_refused_and_nothing_is_fetched(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for hub in ("osunlp/MagicBrush", "hf://datasets/timbrooks/instructpix2pix-clip-filtered",
                Path("hf://datasets/osunlp/MagicBrush"), "https://example.org/pairs.parquet"):
        with pytest.raises(TrainDataError, match="not a local path.*never downloads"):
            load_pairs(hub, format="hf")


def test_missing_datasets_package_says_how_to_install(tmp_path, monkeypatch):
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(TrainDataError, match=r'pip install "xmgie\[train\]"'):
        load_pairs(tmp_path / "x.parquet")


# --- errors ---------------------------------------------------------------------------


def test_missing_target_file_names_the_item_and_the_path(tmp_path):
    manifest = _simple_manifest(tmp_path / "m")
    (tmp_path / "m" / "a_edit.png").unlink()
    with pytest.raises(TrainDataError) as err:
        load_pairs(manifest)
    msg = str(err.value)
    assert "pair 'a'" in msg and str(tmp_path / "m" / "a_edit.png") in msg
    assert "does not exist" in msg


def test_unreadable_image_is_named(tmp_path):
    _simple_manifest(tmp_path / "m")
    (tmp_path / "m" / "a.png").write_bytes(b"not a png")
    with pytest.raises(TrainDataError, match="pair 'a'.*source.*a.png is not an image"):
        load_pairs(tmp_path / "m")


def _header_only_png(path: Path, width: int, height: int) -> None:
    """A PNG whose header says width x height and which holds no pixel data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + \
            struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_a_photo_above_the_pixel_limit_is_refused_from_its_header(tmp_path, monkeypatch):
    _simple_manifest(tmp_path / "m")
    _header_only_png(tmp_path / "m" / "a.png", 9000, 9000)
    _header_only_png(tmp_path / "m" / "a_edit.png", 9000, 9000)
    with pytest.raises(TrainDataError, match="9000x9000, above the pack's limit.*"
                                             "XMGIE_MAX_IMAGE_PIXELS"):
        load_pairs(tmp_path / "m")


def test_a_truncated_image_fails_when_used_with_its_name(tmp_path):
    _simple_manifest(tmp_path / "m")
    _header_only_png(tmp_path / "m" / "a.png", 40, 40)  # the header passes the checks
    ds = load_pairs(tmp_path / "m", resolution=8)
    with pytest.raises(TrainDataError, match="pair 'a': the source image .*a.png cannot be "
                                             "decoded"):
        ds[0]


def test_target_of_another_size_names_both_sizes(tmp_path):
    _simple_manifest(tmp_path / "m", target=_rgb(40, 30))
    with pytest.raises(TrainDataError) as err:
        load_pairs(tmp_path / "m")
    msg = str(err.value)
    assert "pair 'a'" in msg and "40x30" in msg and "40x40" in msg and "target" in msg


def test_an_all_black_mask_is_an_error(tmp_path):
    _simple_manifest(tmp_path / "m", mask=_mask(40, 40))
    with pytest.raises(TrainDataError, match="pair 'a'.*a_mask.png is all black"):
        load_pairs(tmp_path / "m")


def test_a_mask_region_that_vanishes_at_the_resolution_is_an_error(tmp_path):
    _simple_manifest(tmp_path / "m", mask=_mask(40, 40, box=(1, 1, 2, 2)))
    with pytest.raises(TrainDataError, match="vanishes at resolution 8"):
        load_pairs(tmp_path / "m", resolution=8)


def test_manifest_items_need_a_target_and_a_text(tmp_path):
    _rgb(8, 8).save(tmp_path / "p.png")
    _manifest(tmp_path / "a", [{"image": str(tmp_path / "p.png"), "instruction": "x"}])
    with pytest.raises(TrainDataError, match="item 'p' has no 'target' field"):
        load_pairs(tmp_path / "a")
    _simple_manifest(tmp_path / "b", instruction="")
    with pytest.raises(TrainDataError, match="pair 'a' has no text"):
        load_pairs(tmp_path / "b")
    # A target prompt alone is enough text.
    _simple_manifest(tmp_path / "c", instruction="", target_prompt="a blue card")
    assert load_pairs(tmp_path / "c", resolution=8)[0]["target_prompt"] == "a blue card"


def test_empty_datasets_are_errors(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "manifest.jsonl").write_text("\n")
    with pytest.raises(TrainDataError, match="is empty"):
        load_pairs(tmp_path / "m")
    (tmp_path / "ip").mkdir()
    (tmp_path / "ip" / "seeds.json").write_text("[]")
    with pytest.raises(TrainDataError, match=r"\(ip2p\) has no pairs"):
        load_pairs(tmp_path / "ip")
    (tmp_path / "mb").mkdir()
    (tmp_path / "mb" / "edit_sessions.json").write_text("{}")
    with pytest.raises(TrainDataError, match=r"\(magicbrush\) has no pairs"):
        load_pairs(tmp_path / "mb")


def test_unknown_format_and_undetectable_folders(tmp_path):
    make_synthetic(tmp_path / "s", n=1, size=16)
    with pytest.raises(TrainDataError, match="unknown dataset format 'coco'"):
        load_pairs(tmp_path / "s", format="coco")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "readme.txt").write_text("hi")
    with pytest.raises(TrainDataError, match="cannot tell the format.*readme.txt"):
        load_pairs(tmp_path / "other")
    with pytest.raises(TrainDataError, match="does not exist"):
        load_pairs(tmp_path / "nowhere")
    with pytest.raises(TrainDataError, match="resolution 0"):
        load_pairs(tmp_path / "s", resolution=0)
    with pytest.raises(TrainDataError, match="columns= applies"):
        load_pairs(tmp_path / "s", columns={"source": "image"})
    with pytest.raises(TrainDataError, match="has no splits"):
        load_pairs(tmp_path / "s", split="train")


def test_pie_bench_has_no_targets(tmp_path):
    _rgb(8, 8).save(tmp_path / "p.png")
    (tmp_path / "mapping_file.json").write_text(json.dumps(
        {"0": {"image_path": "p.png", "original_prompt": "a cat",
               "editing_prompt": "a [dog]", "editing_instruction": "make it a dog"}}))
    with pytest.raises(TrainDataError, match="pie-bench dataset, which has no ground-truth"):
        load_pairs(tmp_path / "mapping_file.json")


def test_collate_refuses_mixed_sizes_and_empty_batches(tmp_path):
    make_synthetic(tmp_path / "s", n=1, size=32)
    a = load_pairs(tmp_path / "s", resolution=16)[0]
    b = load_pairs(tmp_path / "s", resolution=32)[0]
    with pytest.raises(TrainDataError, match="different sizes"):
        collate([a, b])
    with pytest.raises(TrainDataError, match="no items"):
        collate([])


def test_errors_are_the_pack_errors():
    from xmgie.mgie_core.errors import XMGIEError
    from xmgie.runner.dataset import DatasetError

    assert issubclass(TrainDataError, XMGIEError) and issubclass(TrainDataError, ValueError)
    assert issubclass(TrainDataError, DatasetError)
    assert tdata.INSTALL_TRAIN == 'pip install "xmgie[train]"'
