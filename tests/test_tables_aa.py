"""Attribute accuracy: the arithmetic against a hand computation on five edits with known
attributes and predictions, the clear errors, and the CLIP zero-shot and image-classifier
paths on random-weight networks saved in their real layouts."""

from __future__ import annotations

import pytest
import torch

from xmgie.evaluation.attributes import (
    AAItem,
    AttributeSpec,
    ClipZeroShot,
    FolderClassifier,
    attribute_accuracy,
    check_items,
    evaluate_attributes,
)
from xmgie.mgie_core.errors import InputError, ModelNotFoundError

SPECS = {
    "crown": AttributeSpec("crown", ("red", "blue", "black"),
                           "a photo of a {object} with a {value} crown"),
    "size": AttributeSpec("size", ("small", "large"), "a photo of a {value} {object}"),
    "wing": AttributeSpec.binary("wing", "a photo of a {object} with wing bars",
                                 "a photo of a {object} without wing bars"),
}

ITEMS = [
    AAItem("i1", "crown", "red", {"crown": "blue", "size": "small"}, "bird"),
    AAItem("i2", "crown", "red", {"crown": "black", "size": "large"}, "bird"),
    AAItem("i3", "crown", "blue", {"crown": "red", "size": "small", "wing": "yes"}, "bird"),
    AAItem("i4", "wing", "no", {"wing": "yes"}, "bird"),
    AAItem("i5", "wing", "yes", {"wing": "no", "size": "large"}, "bird"),
]
EDITED = {
    "i1": {"crown": "red", "size": "small"},                  # present
    "i2": {"crown": "blue", "size": "small"},                 # absent
    "i3": {"crown": "blue", "size": "small", "wing": "no"},   # present
    "i4": {"wing": "no"},                                     # present
    "i5": {"wing": "no", "size": "large"},                    # absent
}
SOURCE = {
    "i1": {"crown": "blue", "size": "small"},                 # 2 of 2 right
    "i2": {"crown": "black", "size": "small"},                # 1 of 2 (size)
    "i3": {"crown": "red", "size": "large", "wing": "yes"},   # 2 of 3 (size)
    "i4": {"wing": "yes"},                                    # 1 of 1
    "i5": {"wing": "no", "size": "large"},                    # 2 of 2
}


def test_aa_matches_the_hand_computation():
    r = attribute_accuracy(ITEMS, EDITED, SOURCE, SPECS)
    # AA: i1, i3, i4 show the instructed value -> 3 of 5.
    assert (r.aa.hits, r.aa.total) == (3, 5) and r.aa.value == pytest.approx(0.6)
    # Items with other annotated attributes: i1, i2, i3, i5 (i4 has none).
    # Same prediction as on the source: i1 size, i2 size, i5 size; i3 changed size and
    # wing -> 3 of 4.
    assert (r.others_unchanged.hits, r.others_unchanged.total) == (3, 4)
    # Equal to the annotation: i1 (small), i5 (large); i2 reads small for large, i3 reads
    # no wing bars for yes -> 2 of 4.
    assert (r.others_match_annotation.hits, r.others_match_annotation.total) == (2, 4)
    # Ceiling: 10 annotated (item, attribute) pairs, 8 read right on the sources.
    assert (r.ceiling.hits, r.ceiling.total) == (8, 10) and r.ceiling.value == 0.8
    assert (r.ceiling_instructed.hits, r.ceiling_instructed.total) == (5, 5)
    assert {k: (s.hits, s.total) for k, s in r.per_attribute.items()} == \
        {"crown": (2, 3), "wing": (1, 2)}
    assert r.per_item["i4"]["others_unchanged"] is None
    assert r.per_item["i3"] == {"attribute": "crown", "target": "blue", "present": True,
                                "others": 2, "others_unchanged": False}
    d = r.as_dict()
    assert d["aa"] == {"value": 0.6, "hits": 3, "items": 5}
    assert d["ceiling"]["items"] == 10


def test_aa_changes_when_one_prediction_does():
    edited = {**EDITED, "i2": {"crown": "red", "size": "large"}}
    r = attribute_accuracy(ITEMS, edited, SOURCE, SPECS)
    assert (r.aa.hits, r.others_unchanged.hits, r.others_match_annotation.hits) == (4, 2, 3)


def test_clear_errors():
    with pytest.raises(InputError, match="'i9'.*no attribute annotations"):
        check_items([AAItem("i9", "crown", "red", {})], SPECS)
    with pytest.raises(InputError, match="'beak'.*no prompt template"):
        check_items([AAItem("i9", "beak", "long", {"crown": "red"})], SPECS)
    with pytest.raises(InputError, match="'crown'.*unknown value 'green'"):
        check_items([AAItem("i9", "crown", "green", {"crown": "red"})], SPECS)
    with pytest.raises(InputError, match="'size'.*unknown value 'huge'"):
        attribute_accuracy([AAItem("i9", "crown", "red", {"size": "huge"})],
                           {"i9": {"crown": "red"}}, {"i9": {"size": "small"}}, SPECS)
    with pytest.raises(InputError, match="'i9'.*no attribute annotations"):
        attribute_accuracy([AAItem("i9", "crown", "red", {})], {}, {})
    with pytest.raises(InputError, match="source predictions.*'i1'.*'size'"):
        attribute_accuracy(ITEMS[:1], EDITED, {"i1": {"crown": "blue"}})
    with pytest.raises(InputError, match="template"):
        AttributeSpec("x", ("a", "b"), "a {thing}")
    with pytest.raises(InputError, match="two values"):
        AttributeSpec("x", ("a",))
    assert SPECS["wing"].prompt("no", "bird") == "a photo of a bird without wing bars"
    assert SPECS["crown"].prompt("red", "bird") == "a photo of a bird with a red crown"


def _images(n: int, seed: int, size: int = 40) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(n, 3, 5, 5, generator=g)
    big = torch.nn.functional.interpolate(small, size=(size, size), mode="bilinear")
    return list((big * 255).round().to(torch.uint8))


@pytest.fixture
def tiny_clip(tiny_root):
    from xmgie.evaluation import networks, tiny

    tiny.ensure(tiny_root, [networks.CLIP_SCORE.key])
    return tiny_root / networks.CLIP_SCORE.folder / networks.CLIP_SCORE.tiny_name


def test_clip_zero_shot_end_to_end(tiny_clip, clean_paths):
    classifier = ClipZeroShot.load(SPECS, str(tiny_clip), device="cpu")
    edited = dict(zip([i.id for i in ITEMS], _images(5, 1)))
    source = dict(zip([i.id for i in ITEMS], _images(5, 2)))
    r = evaluate_attributes(ITEMS, edited, source, classifier, SPECS, batch_size=2)
    for share, total in ((r.aa, 5), (r.others_unchanged, 4), (r.others_match_annotation, 4),
                         (r.ceiling, 10), (r.ceiling_instructed, 5)):
        assert share.total == total and 0 <= share.hits <= total
        assert 0.0 <= share.value <= 1.0
    assert set(r.per_item) == {i.id for i in ITEMS}

    # Each prediction is the value whose prompt CLIP's own forward pass ranks first.
    model, processor = classifier.model, classifier.processor
    preds = classifier.predict([edited["i3"]], ["bird"], [["crown", "size", "wing"]])[0]
    for name, spec in SPECS.items():
        prompts = [spec.prompt(v, "bird") for v in spec.values]
        inputs = processor(text=prompts, images=[edited["i3"]], return_tensors="pt",
                           padding=True)
        with torch.no_grad():
            logits = model(**inputs).logits_per_image[0]
        assert preds[name] == spec.values[int(logits.argmax())]
        torch.testing.assert_close(classifier.scores([edited["i3"]], name, "bird")[0],
                                   logits / model.logit_scale.exp(), rtol=1e-4, atol=1e-5)
    assert r.per_item["i3"]["present"] == (
        classifier.predict([edited["i3"]], ["bird"], [["crown"]])[0]["crown"] == "blue")


def test_missing_clip_weights_get_the_loader_error(tmp_path, clean_paths, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    clean_paths.configure(models_dir=[tmp_path])
    with pytest.raises(ModelNotFoundError, match="clip-vit-large-patch14' was not found"):
        ClipZeroShot.load(SPECS, device="cpu")


def test_image_classifier_folder(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    labels = ["red", "blue", "black", "small", "large", "yes", "no"]
    folder = tmp_path / "attr-classifier"
    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=64, num_labels=len(labels),
                       id2label=dict(enumerate(labels)),
                       label2id={v: k for k, v in enumerate(labels)})
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)

    classifier = FolderClassifier.load(folder, SPECS, device="cpu")
    images = _images(5, 3)
    preds = classifier.predict(images, ["bird"] * 5, [["crown", "size"]] * 5)
    inputs = classifier.processor(images=images, return_tensors="pt")
    with torch.no_grad():
        logits = classifier.model(**inputs).logits
    for row, lg in zip(preds, logits):
        assert row["crown"] == labels[int(lg[:3].argmax())]
        assert row["size"] == labels[3 + int(lg[3:5].argmax())]
    edited = dict(zip([i.id for i in ITEMS], images))
    r = evaluate_attributes(ITEMS, edited, edited, classifier, SPECS)
    assert r.others_unchanged.value == 1.0 and r.ceiling.total == 10

    with pytest.raises(InputError, match="no label for attribute 'beak'"):
        FolderClassifier.load(folder, {**SPECS, "beak": AttributeSpec("beak", ("long", "short"))})
    with pytest.raises(ModelNotFoundError, match="image classifier"):
        FolderClassifier.load(tmp_path / "nowhere", SPECS)


def test_fields_to_items_and_generic_templates():
    from xmgie.evaluation.attributes import binary_specs, item_from_fields

    assert item_from_fields("a", {"instruction": "make it yellow"}) is None
    item = item_from_fields("a", {"target_attribute": "floral", "object": "dress",
                                  "attributes": {"floral": -1, "long_sleeve": 1}})
    assert item == AAItem("a", "floral", "yes", {"floral": "no", "long_sleeve": "yes"}, "dress")
    specs = binary_specs([item])
    assert specs["long_sleeve"].prompt("no", "dress") == \
        "a photo of a dress that is not long sleeve"
    with pytest.raises(InputError, match="'b'.*no attribute annotations"):
        item_from_fields("b", {"target_attribute": "floral"})
    # A many-valued attribute gets no generic template: the clear error names it.
    colour = item_from_fields("c", {"target_attribute": "crown", "target_value": "red",
                                    "attributes": {"crown": "blue"}})
    with pytest.raises(InputError, match="'crown'.*no prompt template"):
        check_items([colour], binary_specs([colour]))


def test_aa_of_a_batch_run(tmp_path, tiny_env, tiny_clip):
    """xmgie batch --tiny on a manifest whose items carry attribute annotations, then AA
    of the run folder with the tiny CLIP."""
    from test_batch import WF, make_dataset

    from xmgie import cli
    from xmgie.evaluation.attributes import run_attribute_accuracy

    data = make_dataset(tmp_path / "ds", sizes=(48, 48, 48), extra={
        "target_attribute": "floral", "attributes": {"floral": -1, "long_sleeve": 1}})
    run = tmp_path / "run"
    assert cli.main(["batch", str(WF / "api" / "vae_roundtrip_api.json"), "--dataset",
                     str(data), "--tiny", "--out", str(run)]) == 0
    r = run_attribute_accuracy(run, clip_model=str(tiny_clip), device="cpu")
    assert r.aa.total == 3 and r.others_unchanged.total == 3
    assert r.ceiling.total == 6 and r.ceiling_instructed.total == 3
    assert set(r.per_item) == {"carpet", "corgi", "butterfly"}
