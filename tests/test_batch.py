"""xmgie batch: datasets, the field -> input mapping rule, seeds, variants, failures and
exit codes, resuming after a kill (no finished item recomputed, no partial image)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
WF = ROOT / "workflows"
YELLOW = WF / "api" / "edit_carpet_yellow_api.json"


def _registry():
    from xmgie import cli

    return cli.build_registry()


def _api(path: Path) -> dict:
    from xmgie.runner import workflow_ui

    return workflow_ui.to_api(json.loads(path.read_text()), _registry())


def make_dataset(folder: Path, sizes=(64, 64), shared=None, extra=None) -> Path:
    """A manifest.jsonl of small photos cut from the example photos (or plain colours)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    names = ["carpet", "corgi", "butterfly", "cat_shirt"]
    for i, size in enumerate(sizes):
        name = names[i % 4] + (f"_{i}" if i >= 4 else "")
        if shared is not None:
            img = Image.open(shared / f"{names[i % 4]}.png").convert("RGB")
            mask = Image.open(shared / f"{names[i % 4]}_mask.png").convert("L")
        else:
            img = Image.new("RGB", (64, 64), (40 * i % 255, 90, 160))
            mask = Image.new("L", (64, 64), 0)
            mask.paste(255, (16, 16, 48, 48))
        img.resize((size, size), Image.BICUBIC).save(folder / f"{name}.png")
        mask.resize((size, size), Image.NEAREST).save(folder / f"{name}_mask.png")
        rows.append({"id": name, "image": f"{name}.png", "mask": f"{name}_mask.png",
                     "source_prompt": "a photo of a red carpet",
                     "target_prompt": "a photo of a yellow carpet", "edit_words": ["yellow"],
                     "instruction": "make it yellow", "object": "carpet", **(extra or {})})
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


# --- datasets ---------------------------------------------------------------------------

def test_manifest_layouts_give_the_same_items(tmp_path, example_photos):
    from xmgie.runner.dataset import load_dataset

    shared = load_dataset(example_photos)          # {"examples": [...]} in manifest.json
    assert [i.id for i in shared] == ["carpet", "butterfly", "corgi", "cat_shirt"]
    carpet = shared.items[0].fields
    assert carpet["image"] == str(example_photos / "carpet.png")
    assert carpet["mask"] == str(example_photos / "carpet_mask.png")
    assert carpet["edit_words"] == ["yellow"] and carpet["object"] == "carpet"

    records = json.loads((example_photos / "manifest.json").read_text())["examples"]
    for r in records:
        r["image"] = str(example_photos / r["image"])
        r["mask"] = str(example_photos / r["mask"])
    (tmp_path / "lines").mkdir()
    (tmp_path / "lines" / "manifest.jsonl").write_text(
        "# comment lines are skipped\n" + "".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "list.json").write_text(json.dumps(records))
    for other in (load_dataset(tmp_path / "lines"), load_dataset(tmp_path / "list.json")):
        assert [(i.id, i.fields) for i in other] == [(i.id, i.fields) for i in shared]


@pytest.mark.parametrize("text, expected", [
    ('{"mask": "m.png"}\n', "has no 'image' field"),
    ('{"image": "a.png"}\n{"image": "b/a.png"}\n', "ids must be unique"),
    ('{"image": "a.png"}\nnot json\n', "line 2: not valid JSON"),
    ('{"image": "a.png", "seed": -3}\n', "not a non-negative integer"),
])
def test_bad_manifests_name_the_problem(tmp_path, text, expected):
    from xmgie.runner.dataset import DatasetError, load_dataset

    (tmp_path / "manifest.jsonl").write_text(text)
    with pytest.raises(DatasetError, match=expected):
        load_dataset(tmp_path)


def test_missing_dataset_says_what_is_expected(tmp_path):
    from xmgie.runner.dataset import DatasetError, load_dataset

    with pytest.raises(DatasetError, match="manifest.jsonl"):
        load_dataset(tmp_path)


def _rle(mask: np.ndarray) -> list[int]:
    flat = mask.flatten()
    runs, i = [], 0
    while i < flat.size:
        if flat[i]:
            j = i
            while j < flat.size and flat[j]:
                j += 1
            runs += [i, j - i]
            i = j
        else:
            i += 1
    return runs


def make_pie_bench(folder: Path) -> tuple[Path, np.ndarray]:
    """Two PIE-Bench style entries (512 x 512 photos, run-length masks)."""
    rng = np.random.default_rng(0)
    sub = folder / "annotation_images" / "0_random_140"
    sub.mkdir(parents=True)
    mask = np.zeros((512, 512), np.uint8)
    mask[100:300, 150:420] = 1
    entries = {}
    for key in ("000000000000", "000000000001"):
        pixels = rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(sub / f"{key}.png")
        entries[key] = {"image_path": f"0_random_140/{key}.png",
                        "original_prompt": "a [cat] sitting on a sofa",
                        "editing_prompt": "a [tiger] sitting on a [red sofa]",
                        "editing_instruction": "make the cat a tiger", "editing_type_id": "0",
                        "blended_word": "cat tiger", "mask": _rle(mask)}
    (folder / "mapping_file.json").write_text(json.dumps(entries))
    return folder, mask


def test_pie_bench_mapping_file(tmp_path):
    from xmgie.runner.dataset import load_dataset, pie_bench_mask

    folder, mask = make_pie_bench(tmp_path / "pie")
    ds = load_dataset(folder)
    assert ds.kind == "pie-bench" and [i.id for i in ds] == ["000000000000", "000000000001"]
    f = ds.items[0].fields
    assert f["source_prompt"] == "a cat sitting on a sofa"
    assert f["target_prompt"] == "a tiger sitting on a red sofa"
    assert f["edit_words"] == ["tiger", "red", "sofa"] and f["object"] == "cat"
    assert f["image"] == str(folder / "annotation_images/0_random_140/000000000000.png")
    decoded = pie_bench_mask(ds.items[0].mask_rle)
    expected = mask.astype(np.float32)
    expected[0, :] = expected[-1, :] = expected[:, 0] = expected[:, -1] = 1  # as PIE-Bench
    np.testing.assert_array_equal(decoded, expected)


# --- mapping rule ----------------------------------------------------------------------

def test_default_rule_maps_fields_by_input_name_and_aliases():
    from xmgie.runner.mapping import resolve_mapping

    prompt = _api(WF / "api" / "edit_carpet_guided_api.json")
    fields = ["image", "mask", "source_prompt", "target_prompt", "edit_words", "object",
              "instruction", "note"]
    mapping = resolve_mapping(prompt, _registry(), fields, {})
    assert mapping["image"] == ["1.image"] and mapping["mask"] == ["2.image"]
    assert mapping["source_prompt"] == ["4.source_prompt"]
    assert mapping["target_prompt"] == ["11.target_prompt"]
    # MAG's and A-STAR's words and the sampler's CAM words carry the edit words.
    assert mapping["edit_words"] == ["6.words", "7.words", "11.cam_in_words"]
    assert mapping["object"] == [] and mapping["instruction"] == [] and mapping["note"] == []


def test_rule_is_the_same_for_ui_and_api_files():
    from xmgie.runner.mapping import resolve_mapping

    for name in ("vae_roundtrip.json", "api/vae_roundtrip_api.json"):
        data = json.loads((WF / name).read_text())
        assert ("nodes" in data) == (name == "vae_roundtrip.json")
        mapping = resolve_mapping(_api(WF / name), _registry(), ["image", "target_prompt"], {})
        assert mapping == {"image": ["1.image"], "target_prompt": []}


def test_map_option_overrides_and_errors():
    from xmgie.runner.mapping import BatchError, parse_map_options, resolve_mapping

    prompt, reg = _api(YELLOW), _registry()
    explicit = parse_map_options(["edit_words=XMGIECAMSampler.cam_out_words",
                                  "mask=", "instruction=6.target_prompt"])
    mapping = resolve_mapping(prompt, reg, ["image", "mask", "edit_words", "instruction"],
                              explicit)
    assert mapping == {"image": ["1.image"], "mask": [], "edit_words": ["6.cam_out_words"],
                       "instruction": ["6.target_prompt"]}
    with pytest.raises(BatchError, match="no node is named 'Nope'"):
        resolve_mapping(prompt, reg, [], parse_map_options(["object=Nope.text"]))
    with pytest.raises(BatchError, match="has no input 'colour'"):
        resolve_mapping(prompt, reg, [], parse_map_options(["object=6.colour"]))
    with pytest.raises(BatchError, match="FIELD=NODE.INPUT"):
        parse_map_options(["no-equals"])
    two = {**prompt, "9": {"class_type": "LoadImage", "inputs": {"image": "x.png"}}}
    with pytest.raises(BatchError, match="several LoadImage nodes"):
        resolve_mapping(two, reg, ["image"], {})


def test_seeds_are_per_item_and_written_into_seed_inputs():
    from xmgie.runner.dataset import Item
    from xmgie.runner.mapping import item_prompt, item_seed

    assert item_seed(0, "a") == item_seed(0, "a") != item_seed(0, "b") != item_seed(1, "b")
    prompt = {"1": {"class_type": "XMGIEAttentionMask",
                    "inputs": {"prompt": "x", "word": "y", "threshold": 0.5, "seed": 7}}}
    reg = _registry()
    out, written = item_prompt(prompt, {}, Item("a", {"image": "a.png"}), item_seed(3, "a"),
                               set(), reg)
    assert out["1"]["inputs"]["seed"] == item_seed(3, "a") == written["1.seed"]
    assert prompt["1"]["inputs"]["seed"] == 7  # the workflow itself is not changed
    fixed_out, _ = item_prompt(prompt, {}, Item("a", {}), 5, {("1", "seed")}, reg)
    assert fixed_out["1"]["inputs"]["seed"] == 7  # a variant's value wins
    # A dataset with a seed field for some items: the others keep their derived seed.
    own, _ = item_prompt(prompt, {"seed": ["1.seed"]}, Item("a", {"seed": 42}), 5, set(), reg)
    derived, _ = item_prompt(prompt, {"seed": ["1.seed"]}, Item("b", {}), 5, set(), reg)
    assert own["1"]["inputs"]["seed"] == 42 and derived["1"]["inputs"]["seed"] == 5


# --- variants ----------------------------------------------------------------------------

def test_variants_bypass_like_comfyui_and_set_inputs():
    from xmgie.runner.variants import VariantError, apply_variant, load_variants

    reg = _registry()
    guided = _api(WF / "api" / "edit_carpet_guided_api.json")
    variants = {v.name: v for v in load_variants(WF / "variants" / "edit_carpet_guided.json")}
    assert variants["full"].is_base
    no_mag, _ = apply_variant(guided, variants["no_mag"], reg)
    assert "6" not in no_mag and no_mag["7"]["inputs"]["controls"] == ["5", 0]  # A-STAR <- PFB
    no_pfb, _ = apply_variant(guided, variants["no_pfb"], reg)
    assert "5" not in no_pfb and "controls" not in no_pfb["6"]["inputs"]  # nothing to pass on
    no_gb, _ = apply_variant(guided, variants["no_gb"], reg)
    assert no_gb["15"]["inputs"]["images"] == ["12", 0]  # SaveImage <- VAE decode
    no_cam, fixed = apply_variant(guided, variants["no_cam"], reg)
    assert no_cam["11"]["inputs"]["cam_in_words"] == "" and ("11", "cam_in_words") in fixed
    from xmgie.runner import core_nodes, engine
    from xmgie.runner.variants import Variant

    with core_nodes.using_context(core_nodes.RunContext(workflow_dir=WF)):
        for prompt in (no_mag, no_pfb, no_gb, no_cam):
            assert engine.validate(prompt, reg) == []

    with pytest.raises(VariantError, match="no node is named 'XMGIEMissing'"):
        apply_variant(guided, Variant("x", bypass=("XMGIEMissing",)), reg)
    with pytest.raises(VariantError, match="has no input 'cam_words'"):
        apply_variant(guided, Variant("x", set={"11.cam_words": ""}), reg)


# --- running ----------------------------------------------------------------------------

def _batch(*args) -> int:
    from xmgie import cli

    return cli.main(["batch", *map(str, args)])


def test_failing_items_are_recorded_and_the_batch_goes_on(tmp_path, tiny_env, capsys):
    data = make_dataset(tmp_path / "ds", sizes=(64, 64, 64))
    lines = (data / "manifest.jsonl").read_text().splitlines()
    broken = [json.loads(x) for x in lines]
    broken[1]["image"] = "does_not_exist.png"
    del broken[2]["target_prompt"]
    (data / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in broken))
    run = tmp_path / "run"
    code = _batch(YELLOW, "--dataset", data, "--tiny", "--set", "4.steps=1", "--out", run)
    out = capsys.readouterr().out
    assert code == 2, out  # exit status = number of failed items
    rec = {p.parent.name: json.loads(p.read_text()) for p in run.glob("items/*/record.json")}
    assert rec["carpet"]["status"] == "ok" and rec["carpet"]["outputs"]
    assert rec["corgi"]["status"] == "failed"
    assert "does_not_exist.png" in rec["corgi"]["error"]["message"]
    assert rec["butterfly"]["status"] == "failed"
    assert "has no 'target_prompt'" in rec["butterfly"]["error"]["message"]
    assert "2 failed" in out and "corgi" in out


def test_a_batch_that_cannot_start_exits_101(tmp_path, tiny_env, capsys):
    data = make_dataset(tmp_path / "ds", sizes=(64,))
    assert _batch(tmp_path / "nope.json", "--dataset", data) == 101
    assert _batch(YELLOW, "--dataset", tmp_path / "empty") == 101
    assert _batch(YELLOW, "--dataset", data, "--map", "mask=Nope.image") == 101
    assert _batch(YELLOW, "--bogus-option") == 101  # usage errors too: 2 would mean 2 failed
    err = capsys.readouterr().err
    assert "workflow file not found" in err and "no node is named 'Nope'" in err


def test_ui_workflow_batch_and_records(tmp_path, tiny_env, capsys):
    data = make_dataset(tmp_path / "ds", sizes=(64, 64))
    run = tmp_path / "run"
    assert _batch(WF / "vae_roundtrip.json", "--dataset", data, "--tiny", "--seed", "5",
                  "--out", run) == 0
    settings = json.loads((run / "batch.json").read_text())
    assert settings["mapping"]["image"] == ["1.image"] and settings["seed"] == 5
    from xmgie.runner.mapping import item_seed

    for item in ("carpet", "corgi"):
        rec = json.loads((run / "items" / item / "record.json").read_text())
        assert rec["seed"] == item_seed(5, item)
        assert rec["mapped"]["1.image"] == str(data / f"{item}.png")
        out = rec["outputs"][0]
        png = run / "items" / item / out["file"]
        assert out["node"] == "5" and png.stat().st_size == out["bytes"]
        with Image.open(png) as im:
            assert im.size == (64, 64) and "workflow" in im.info  # UI workflow embedded
        assert set(rec["times"]) >= {"started", "seconds", "nodes"}
        assert rec["unet_passes"]["forward"] == 0  # a VAE round trip runs no UNet


def _records(run: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text())
            for p in (run / "items").glob("*/record.json")}


def test_killed_batch_resumes_without_recomputing_finished_items(tmp_path, tiny_env,
                                                                  example_photos):
    """Two small items then two larger ones: the batch is SIGKILLed once two records
    exist (the third item is then normally mid-run), and rerun."""
    data = make_dataset(tmp_path / "ds", sizes=(64, 64, 256, 256), shared=example_photos)
    run = tmp_path / "run"
    args = ["batch", str(YELLOW), "--dataset", str(data), "--tiny", "--set", "4.steps=2",
            "--out", str(run)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT.parent)] + [
        p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
        "XMGIE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    log = tmp_path / "killed.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "xmgie", *args], env=env,
                                stdout=sink, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    try:
        while len(_records(run)) < 2:
            assert proc.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "the batch made no progress"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    before = _records(run)
    assert {"carpet", "corgi"} <= set(before) and len(before) < 4, sorted(before)
    stamps = {i: (run / "items" / i / "record.json").stat().st_mtime_ns for i in before}
    # Nothing outside the staging folder but finished items; no lone image anywhere else.
    for folder in (run / "items").iterdir():
        if folder.name != ".staging":
            assert folder.name in before
    assert list((run / "items").glob("*.png")) == []

    from xmgie import cli

    assert cli.main(args) == 0
    after = _records(run)
    assert sorted(after) == ["butterfly", "carpet", "cat_shirt", "corgi"]
    for item in before:  # finished items were neither rerun nor rewritten
        assert after[item] == before[item]
        assert (run / "items" / item / "record.json").stat().st_mtime_ns == stamps[item]
    new_runs = {after[i]["worker"]["run_id"] for i in after if i not in before}
    old_runs = {before[i]["worker"]["run_id"] for i in before}
    assert len(new_runs) == 1 and not new_runs & old_runs
    for rec in after.values():
        assert rec["status"] == "ok" and rec["unet_passes"]["forward"] == 4  # 2 + 2 steps
        for out in rec["outputs"]:
            png = run / "items" / rec["id"] / out["file"]
            with Image.open(png) as im:
                im.load()  # a complete PNG
    assert not (run / "items" / ".staging").exists() or \
        not any((run / "items" / ".staging").iterdir())
    assert not (run / "batch.lock").exists()
    # A third run has nothing left to do.
    assert cli.main(args) == 0
    assert _records(run) == after


def test_a_run_folder_of_another_batch_is_refused(tmp_path, tiny_env, capsys):
    data = make_dataset(tmp_path / "ds", sizes=(64,))
    run = tmp_path / "run"
    assert _batch(WF / "api" / "vae_roundtrip_api.json", "--dataset", data, "--tiny",
                  "--out", run) == 0
    assert _batch(WF / "api" / "vae_roundtrip_api.json", "--dataset", data, "--tiny", "--seed", "9",
                  "--out", run) == 101
    assert "holds another batch (different seed)" in capsys.readouterr().err


def test_pass_counter_counts_unet_forwards_and_backwards(tiny_sd):
    import torch

    from xmgie.runner.model_cache import PassCounter

    counter = PassCounter()
    counter.watch(tiny_sd)
    counter.watch(tiny_sd)  # watched once
    unet = tiny_sd.unet
    size = unet.config.sample_size
    ehs = torch.randn(1, 4, unet.config.cross_attention_dim)
    try:
        with torch.no_grad():
            unet(torch.randn(1, 4, size, size), 10, encoder_hidden_states=ehs)
        assert counter.totals() == (1, 0)
        latent = torch.randn(1, 4, size, size, requires_grad=True)    # MAG: d/d latent
        unet(latent, 10, encoder_hidden_states=ehs).sample.sum().backward()
        assert counter.totals() == (2, 1) and latent.grad is not None
        text = ehs.clone().requires_grad_(True)                        # null-text: d/d text
        unet(torch.randn(1, 4, size, size), 10, text).sample.sum().backward()
        assert counter.totals() == (3, 2) and text.grad is not None
        unet(latent, 10, encoder_hidden_states=text).sample.sum()      # no backward
        assert counter.totals() == (4, 2)
    finally:
        counter.close()
    with torch.no_grad():
        unet(torch.randn(1, 4, size, size), 10, encoder_hidden_states=ehs)
    assert counter.totals() == (4, 2)  # hooks removed
