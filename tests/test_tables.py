"""The table commands and attribute accuracy inside ``xmgie eval``: datasets in their
published layouts (all six of Table 1) through ``xmgie batch --tiny``, ``xmgie
eval`` (AA with a classifier whose every answer is known, against a hand computation)
and ``xmgie table1`` / ``xmgie table2`` (layout, directions and counts in the CSV,
Markdown and LaTeX files)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from _datasets_fixtures import batch
from test_datasets_celebahq import make_celebahq
from test_datasets_cub import make_cub
from test_datasets_oxford import make_oxford

# Two variants of the VAE round trip that ``eval --variants`` runs over the same items:
# the workflow, and the photo saved as it was loaded (the round trip left out).
VARIANTS = {"variants": {"full": {"description": "as it is"},
                         "no_vae": {"description": "without the VAE",
                                    "set": {"SaveImage.images": ["1", 0]}}}}


def _batch(dataset: Path, run: Path) -> Path:
    assert batch(dataset, run) == 0
    return run


def _fixed_classifier(folder: Path, labels: list[str], favourites: set[str]) -> Path:
    """A real ViT image classifier whose head ignores the image: every favourite label
    scores 5, every other 0, so each prediction is known in advance."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=64, num_labels=len(labels),
                       id2label=dict(enumerate(labels)),
                       label2id={v: k for k, v in enumerate(labels)})
    model = ViTForImageClassification(config)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([5.0 if x in favourites else 0.0
                                                  for x in labels]))
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_aa_inside_eval_matches_a_hand_computation(tmp_path, tiny_env, capsys):
    from xmgie import cli
    from xmgie.runner.datasets import cub

    data = make_cub(tmp_path / "cub")
    run = _batch(data, tmp_path / "run")
    # The adapter's hook reads every attribute with its own wording.
    specs = cub.attribute_specs(data)
    assert specs["has_crown_color::blue"]["prompts"] == {
        "yes": "a photo of a {object} with a blue crown",
        "no": "a photo of a {object} without a blue crown"}
    assert specs["has_primary_color::yellow"]["prompts"]["yes"] == "a photo of a yellow {object}"
    assert specs["class"]["values"] == ["black footed albatross", "american crow"]

    # The classifier always answers "no" and "black footed albatross".
    folder = _fixed_classifier(tmp_path / "classifier", ["yes", "no", "black footed albatross",
                                                         "american crow"],
                               {"no", "black footed albatross"})
    capsys.readouterr()
    assert cli.main(["eval", str(run), "--attribute-classifier", str(folder), "--metrics",
                     "psnr,aa,aa_others,aa_ceiling", "--no-pictures", "--device", "cpu"]) == 0
    table = json.loads((run / "eval" / "table.json").read_text())
    assert table["metrics"] == ["psnr", "aa", "aa_others", "aa_ceiling"]
    assert table["dataset"]["kind"] == "cub-200-2011"
    row = table["rows"][0]
    # The items (the adapter's edits, read through cub.attribute_edit):
    #   1 crown red -> has_crown_color::blue; others: bill cone (present)
    #   2 species american crow -> black footed albatross; annotated class american crow
    #   3 primary black -> has_primary_color::yellow; others: wing brown, wing white
    #   4, 5 crown red -> has_crown_color::blue; no others
    # AA: only item 2's target is predicted (albatross); the colour targets read "no".
    assert (row["values"]["aa"], row["n"]["aa"]) == (pytest.approx(1 / 5), 5)
    # Others kept: items 1 and 3 have others, predicted alike on source and result.
    assert (row["values"]["aa_others"], row["n"]["aa_others"]) == (1.0, 2)
    # Ceiling over the 8 annotated pairs on the sources: right are the four targets
    # annotated absent ("no"); wrong are bill cone, wing brown, wing white (present) and
    # item 2's class.
    assert (row["values"]["aa_ceiling"], row["n"]["aa_ceiling"]) == (0.5, 8)
    detail = row["attribute_accuracy"]
    assert detail["ceiling_instructed"] == {"value": 0.8, "hits": 4, "items": 5}
    assert detail["per_attribute"]["class"] == {"value": 1.0, "hits": 1, "items": 1}
    assert detail["others_match_annotation"]["hits"] == 0  # "no" for every present one
    with open(run / "eval" / "items.csv") as f:
        per_item = {r["item"]: r for r in csv.DictReader(f)}
    assert {k: v["aa"] for k, v in per_item.items()} == {
        "1": "0.0000", "2": "1.0000", "3": "0.0000", "4": "0.0000", "5": "0.0000"}
    assert per_item["1"]["aa_others"] == "1.0000" and per_item["4"]["aa_others"] == "n/a"

    # A classifier folder that is not there: the loader's error, the rest still computed.
    capsys.readouterr()
    assert cli.main(["eval", str(run), "--attribute-classifier", str(tmp_path / "nowhere"),
                     "--metrics", "psnr,aa", "--no-pictures", "--out",
                     str(tmp_path / "ev2")]) == 1
    err = capsys.readouterr().err
    assert "error: AA not computed: image classifier for attribute accuracy" in err
    assert str(tmp_path / "nowhere" / "config.json") in err and "Traceback" not in err
    assert json.loads((tmp_path / "ev2" / "table.json").read_text())["metrics"] == ["psnr"]

    # The dataset moved away: the photo the run read is named, no traceback.
    data.rename(tmp_path / "moved")
    capsys.readouterr()
    assert cli.main(["eval", str(run), "--metrics", "psnr", "--no-pictures", "--out",
                     str(tmp_path / "ev3")]) == 1
    err = capsys.readouterr().err
    assert "error: cannot read the image " + str(data.resolve() / "CUB_200_2011") in err
    assert "Traceback" not in err


def _read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_tables_from_three_datasets_with_variants(tmp_path, tiny_env, capsys):
    from xmgie import cli
    from xmgie.evaluation.report import format_value

    variants = tmp_path / "variants.json"
    variants.write_text(json.dumps(VARIANTS))
    runs = {"cub": _batch(make_cub(tmp_path / "cub"), tmp_path / "run-cub"),
            "oxford": _batch(make_oxford(tmp_path / "oxford"), tmp_path / "run-oxford"),
            "celeba": _batch(make_celebahq(tmp_path / "celeba" / "CelebAMask-HQ"),
                             tmp_path / "run-celeba")}
    sizes = {"cub": 5, "oxford": 6, "celeba": 7}
    out = tmp_path / "tables"
    capsys.readouterr()
    # Without an evaluation the table command says which command to run first.
    assert cli.main(["table1", str(runs["cub"]), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"run `xmgie eval {runs['cub']}` first" in err and "Traceback" not in err
    assert not out.exists()

    # Table 2's datasets with the variants, the others as they are.
    for key, run in runs.items():
        code = cli.main(["eval", str(run), "--tiny", "--fid-feature", "64", "--no-pictures"]
                        + (["--variants", str(variants)] if key != "oxford" else []))
        assert code == 0, capsys.readouterr()
    evals = {k: json.loads((r / "eval" / "table.json").read_text()) for k, r in runs.items()}
    for key, table in evals.items():
        assert [r["variant"] for r in table["rows"]][:1] == ["full" if key != "oxford"
                                                             else "vae_roundtrip_api"]
        assert {"is", "fid", "lpips", "ssim", "psnr", "aa", "ips"} <= set(table["metrics"])
        assert table["rows"][0]["n"]["aa"] == sizes[key]   # every item is an attribute edit
    assert evals["celeba"]["rows"][0]["n"]["aa_others"] == 7  # 39 other attributes each

    # --- Table 1: one row per dataset (each evaluation's first row, "full") ---------------
    assert cli.main(["table1", str(runs["cub"]), f"Flowers={runs['oxford']}",
                     str(runs["celeba"]), "--out", str(out)]) == 0
    metrics = ["is", "fid", "lpips", "ssim", "psnr", "aa", "ips"]
    heads = ["IS ↑", "FID ↓", "LPIPS ↓", "SSIM ↑", "PSNR ↑", "AA ↑", "IPS ↑"]
    rows = _read_csv(out / "table1.csv")
    assert rows[0] == ["dataset"] + [h for head, m in zip(heads, metrics)
                                     for h in (head, f"n ({head[:-2]})")]
    assert [r[0] for r in rows[1:]] == ["CUB-200-2011", "Flowers", "CelebA-HQ"]
    md = (out / "table1.md").read_text()
    assert "| Dataset | " + " | ".join(heads) + " |" in md
    tex = (out / "table1.tex").read_text()
    assert r"\begin{tabular}{lrrrrrrr}" in tex
    assert r"Dataset & IS $\uparrow$ & FID $\downarrow$ & LPIPS $\downarrow$" in tex
    for line, key in zip(rows[1:], ("cub", "oxford", "celeba")):
        jrow = evals[key]["rows"][0]
        for i, m in enumerate(metrics):
            value, n = jrow["values"][m], jrow["n"][m]
            assert line[1 + 2 * i:3 + 2 * i] == [format_value(value), str(n)]
            assert f"{format_value(value)} (n={n})" in md
            assert f"{format_value(value)} {{\\scriptsize (n={n})}}" in tex
        # FID and IS count result images, the paired metrics items: all of them here.
        assert jrow["n"]["fid"] == jrow["n"]["psnr"] == sizes[key]
    # AA is read against its ceiling (CUB: 8 annotated photo-attribute pairs).
    ceiling = evals["cub"]["rows"][0]["values"]["aa_ceiling"]
    assert f"- CUB-200-2011: classifier on the unedited photos {format_value(ceiling)} " \
           "(n=8 annotated photo-attribute pairs); other attributes kept" in md

    # --- Table 2: one row per variant, a column group per dataset -------------------------
    capsys.readouterr()
    assert cli.main(["table2", f"CUB={runs['cub']}", str(runs["celeba"]), "--out",
                     str(out), "--metrics", "psnr,aa,fid"]) == 0
    assert "| full (as it is) |" in capsys.readouterr().out
    rows = _read_csv(out / "table2.csv")
    assert rows[0] == ["variant", "description"] + [
        h for ds in ("CUB", "CelebA-HQ") for head in ("PSNR ↑", "AA ↑", "FID ↓")
        for h in (f"{ds} {head}", f"{ds} n ({head[:-2]})")]
    assert [r[:2] for r in rows[1:]] == [["full", "as it is"], ["no_vae", "without the VAE"]]
    md2 = (out / "table2.md").read_text()
    assert "## CUB\n" in md2 and "## CelebA-HQ\n" in md2
    assert md2.count("| Variant | PSNR ↑ | AA ↑ | FID ↓ |") == 2
    tex2 = (out / "table2.tex").read_text()
    assert r"\multicolumn{3}{c}{CUB} & \multicolumn{3}{c}{CelebA-HQ}" in tex2
    assert r"\cmidrule(lr){2-4} \cmidrule(lr){5-7}" in tex2
    for r, line in enumerate(rows[1:]):
        for d, key in enumerate(("cub", "celeba")):
            jrow = evals[key]["rows"][r]
            for i, m in enumerate(("psnr", "aa", "fid")):
                cells = line[2 + 6 * d + 2 * i:4 + 6 * d + 2 * i]
                text = format_value(float(jrow["values"][m]))  # JSON keeps inf as "inf"
                assert cells == [text, str(jrow["n"][m])]
                assert f"{text} (n={jrow['n'][m]})" in md2
    # The rows are the variants' own: the photo saved unchanged has an infinite PSNR.
    assert rows[2][2] == rows[2][8] == "inf" and rows[1][2] != "inf"
    assert r"$\infty$ {\scriptsize (n=5)}" in tex2

    # A metric an evaluation lacks is n/a, with the reason under the table; a table.json
    # (or the folder eval --out wrote) is read as well as a run folder.
    assert cli.main(["eval", str(runs["oxford"]), "--metrics", "psnr", "--no-pictures",
                     "--out", str(tmp_path / "ev-psnr")]) == 0
    assert cli.main(["table1", str(tmp_path / "ev-psnr" / "table.json"), "--out", str(out),
                     "--metrics", "psnr,aa"]) == 0
    md = (out / "table1.md").read_text()
    assert "| Oxford-102 | " in md and md.count("| n/a |") == 1
    assert "- Oxford-102, AA: not in the evaluation" in md
    assert r"& -- \\" in (out / "table1.tex").read_text()
    assert cli.main(["table1", str(runs["cub"]), "--metrics", "psnr,nope"]) == 2
    assert cli.main(["table1", str(runs["cub"]), "--variant", "nope"]) == 1
    assert "no row 'nope' (it has full, no_vae)" in capsys.readouterr().err


def test_dataset_hooks_give_each_attribute_its_wording(tmp_path):
    """What AA reads from an adapter: DeepFashion's items as they are, with a template per
    attribute of list_attr_cloth.txt; Oxford-102's species change as the attribute
    'class'; a manifest's items with the generic wording."""
    from test_datasets_deepfashion import make_deepfashion

    from xmgie.evaluation.attributes import dataset_attributes
    from xmgie.runner.dataset import load_dataset

    folder = make_deepfashion(tmp_path / "df")
    found = dataset_attributes(folder)
    assert found.kind == "deepfashion"
    items = [a for i in load_dataset(folder, split="test")
             if (a := found.item(i.id, i.fields)) is not None]
    first = items[0]
    assert (first.attribute, first.target, first.object) == ("floral", "yes", "dress")
    assert first.annotations == {"a-line": "yes", "sleeveless": "yes", "floral": "no"}
    specs = found.specs(items)
    assert specs["a-line"].prompt("yes", "dress") == "a photo of an a-line dress"
    assert specs["floral"].prompt("no", "dress") == "a photo of a dress that is not floral"
    assert len(specs) == 5  # every attribute of the list file

    oxford = dataset_attributes(make_oxford(tmp_path / "ox"))
    item = oxford.item("image_00001", load_dataset(tmp_path / "ox").items[0].fields)
    # Photo 1 is of class 77 (test_datasets_oxford.LABELS).
    assert (item.attribute, item.annotations) == ("class", {"class": "passion flower"})
    spec = oxford.specs([item])["class"]
    assert len(spec.values) == 102
    assert spec.prompt(item.target, "flower") == \
        f"a photo of {'an' if item.target[0] in 'aeiou' else 'a'} {item.target}, a type of flower"

    manifest = dataset_attributes(tmp_path / "nowhere")
    assert manifest.adapter is None
    plain = manifest.item("a", {"target_attribute": "smiling", "attributes": {"smiling": -1},
                                "object": "person"})
    assert manifest.specs([plain])["smiling"].prompt("yes", "person") == \
        "a photo of a person that is smiling"


def test_table1_rows_for_coco_cars_and_deepfashion(tmp_path, tiny_env, capsys):
    """The other three datasets of Table 1 (MS-COCO, Stanford Cars, DeepFashion) go the
    same way: each adapter's batch, its evaluation with AA on the adapter's own attribute
    wording, one Table 1 row each with the items behind every cell."""
    from test_datasets_cars import make_devkit
    from test_datasets_coco import make_coco
    from test_datasets_deepfashion import make_deepfashion

    from xmgie import cli
    from xmgie.evaluation.report import format_value
    from xmgie.runner.dataset import load_dataset

    folders = {"MS-COCO": (make_coco(tmp_path / "coco"), "val"),
               "Stanford Cars": (make_devkit(tmp_path / "cars"), "test"),
               "DeepFashion": (make_deepfashion(tmp_path / "df"), "test")}
    runs = []
    for label, (folder, split) in folders.items():
        run = tmp_path / f"run-{label.replace(' ', '-')}"
        assert batch(folder, run, "--split", split) == 0
        assert cli.main(["eval", str(run), "--tiny", "--fid-feature", "64", "--no-pictures",
                         "--metrics", "fid,psnr,aa,aa_ceiling"]) == 0, capsys.readouterr()
        runs.append((label, run, len(load_dataset(folder, split=split))))
    out = tmp_path / "tables"
    assert cli.main(["table1", *(str(r) for _, r, _ in runs), "--out", str(out),
                     "--metrics", "fid,psnr,aa"]) == 0
    rows = _read_csv(out / "table1.csv")
    assert [r[0] for r in rows[1:]] == [label for label, _, _ in runs]
    md = (out / "table1.md").read_text()
    for line, (label, run, n_items) in zip(rows[1:], runs):
        jrow = json.loads((run / "eval" / "table.json").read_text())["rows"][0]
        # every item of the split ran and is an attribute edit the classifier read
        assert jrow["n"]["psnr"] == jrow["n"]["aa"] == n_items > 0
        assert line[5:7] == [format_value(jrow["values"]["aa"]), str(n_items)]
        assert f"| {label} | " in md and f"(n={n_items})" in md
    # an --out that cannot be written is one error line, not a traceback
    (tmp_path / "a-file").write_text("")
    capsys.readouterr()
    assert cli.main(["table1", str(runs[0][1]), "--out", str(tmp_path / "a-file" / "t")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "a-file" in err and "Traceback" not in err
