"""Attribute accuracy (AA): does the edited image show the attribute the instruction asked
for, read by a classifier whose own accuracy on the unedited images is reported beside it
(docs/algorithms.md §13, evaluation).

An item is one edit: its id, the object it shows (``"bird"``, ``"person"``), the
instructed attribute as the pair (attribute name, target value), and the source image's
annotated attributes (name -> value, the instructed one included when it is annotated).
A classifier predicts one value per (image, attribute) among the attribute's values.

* **AA** = the share of edits whose edited image is predicted to have the target value.
* **Others unchanged** (reported apart) = the share of edits, among those with other
  annotated attributes, in which every other attribute is predicted the same on the edited
  image as on the source; and, stricter, the share in which every other attribute's
  prediction on the edited image equals its annotation.
* **Ceiling** = the classifier's accuracy on the unedited images against their
  annotations, over every annotated (item, attribute) pair, and on the instructed
  attributes alone. A classifier that reads an attribute right on 60 % of real photos
  cannot show an AA near 100 % for real reasons, so AA is read against it.

Every share comes with the number of items (or pairs) behind it.

Classifiers:

* :class:`ClipZeroShot` (default): CLIP with one prompt template per attribute. The
  template holds ``{object}`` and ``{value}``; the prediction is the value whose prompt is
  closest to the image (cosine of CLIP's image and text embeddings). A present/absent
  attribute is written with :meth:`AttributeSpec.binary`: one prompt for "yes" and its
  negation for "no". CLIP is loaded by :func:`.networks.load_clip`, locally, with that
  loader's error when the weights are missing.
* :class:`FolderClassifier`: a Hugging Face image-classification folder the user names
  (``AutoModelForImageClassification``, offline) whose label names are attribute values;
  the prediction is the best-scoring label among the attribute's values.

Dataset hooks (how a dataset adapter of ``runner/datasets/`` describes its attributes).
An item is an attribute edit when its fields carry ``target_attribute`` (see
:func:`item_from_fields`). An adapter module may define two optional functions, both
plain data (the runner never imports this package); :func:`dataset_attributes` finds
them from a run's ``batch.json``:

* ``attribute_edit(fields) -> dict | None``: the fields :func:`item_from_fields` reads
  (``target_attribute``, ``target_value``, ``attributes``, ``object``) for an item whose
  own fields say it differently (a list of present attributes, a species change), or
  None when the item is no attribute edit. Without it the item's fields are read as
  they are.
* ``attribute_specs(folder) -> {name: {"values": [...], "template": str,
  "prompts": {value: prompt}}}``: one prompt template per attribute (``{object}`` and
  ``{value}``; a present/absent attribute has values ``["yes", "no"]`` and a prompt for
  each). Attributes it does not describe get :func:`binary_specs`' generic wording.
"""

from __future__ import annotations

import dataclasses
import json
import string
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from ..mgie_core.errors import InputError, ModelLoadError, ModelNotFoundError, XMGIEError

YES, NO = "yes", "no"
DEFAULT_TEMPLATE = "a photo of a {object} with {value}"


# --- attributes and items -------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class AttributeSpec:
    """One attribute: its values and the prompt template CLIP reads it with.

    ``template`` holds ``{object}`` and ``{value}`` ("a photo of a {object} with a {value}
    crown"); ``prompts`` may give a value its own prompt instead (a negation, say)."""

    name: str
    values: tuple[str, ...]
    template: str = DEFAULT_TEMPLATE
    prompts: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if len(self.values) < 2:
            raise InputError(f"attribute {self.name!r}", f"has values {list(self.values)}",
                             "at least two values to choose between",
                             "Give its alternatives (or use AttributeSpec.binary).")
        fields = {f for _, f, _, _ in string.Formatter().parse(self.template) if f}
        if not fields <= {"object", "value"}:
            raise InputError(f"attribute {self.name!r} template", f"has fields {sorted(fields)}",
                             "only {object} and {value}")
        extra = set(self.prompts) - set(self.values)
        if extra:
            raise InputError(f"attribute {self.name!r} prompts", f"name values {sorted(extra)}",
                             f"some of its values {list(self.values)}")

    @classmethod
    def binary(cls, name: str, present: str, absent: str) -> AttributeSpec:
        """A present/absent attribute (values ``"yes"``, ``"no"``) with its prompt and its
        negation, e.g. ``"a photo of a {object} smiling"`` / ``"... not smiling"``."""
        return cls(name, (YES, NO), template=present, prompts={YES: present, NO: absent})

    def prompt(self, value: str, obj: str) -> str:
        self.check(value)
        return self.prompts.get(value, self.template).format(object=obj, value=value)

    def check(self, value: str, where: str = "") -> str:
        if value not in self.values:
            raise InputError(f"{where}attribute {self.name!r}", f"unknown value {value!r}",
                             f"one of {list(self.values)}",
                             "Fix the annotation or add the value to the attribute.")
        return value


@dataclasses.dataclass(frozen=True)
class AAItem:
    """One edit: the instructed (attribute, target value) and the source's annotations."""

    id: str
    attribute: str
    target: str
    annotations: Mapping[str, str]
    object: str = "object"

    def others(self) -> list[str]:
        return [a for a in self.annotations if a != self.attribute]


def check_items(items: Sequence[AAItem], specs: Mapping[str, AttributeSpec]) -> None:
    """Clear errors for an item without annotations, an attribute without a spec (so no
    prompt template) and an unknown value."""
    if not items:
        raise InputError("attribute accuracy items", "got none", "at least one edit item")
    for item in items:
        where = f"item {item.id!r}: "
        if not item.annotations:
            raise InputError(f"item {item.id!r}", "has no attribute annotations",
                             "the source image's annotated attributes (name -> value)",
                             "Use a dataset with attribute annotations, or leave the item out.")
        for name in [item.attribute, *item.annotations]:
            if name not in specs:
                raise InputError(f"{where}attribute {name!r}", "has no prompt template",
                                 f"one of the described attributes {sorted(specs)}",
                                 "Add an AttributeSpec for it.")
        specs[item.attribute].check(item.target, where)
        for name, value in item.annotations.items():
            specs[name].check(value, where)


# --- the arithmetic -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Share:
    hits: int
    total: int

    @property
    def value(self) -> float:
        return self.hits / self.total if self.total else float("nan")

    def as_dict(self) -> dict:
        return {"value": self.value, "hits": self.hits, "items": self.total}


@dataclasses.dataclass(frozen=True)
class AAResult:
    aa: Share                       # edits showing the instructed value
    others_unchanged: Share         # edits whose other attributes read as on the source
    others_match_annotation: Share  # edits whose other attributes read as annotated
    ceiling: Share                  # (item, attribute) pairs read right on the sources
    ceiling_instructed: Share       # the instructed attributes alone, on the sources
    per_attribute: dict[str, Share]  # AA per instructed attribute
    per_item: dict[str, dict]

    def as_dict(self) -> dict:
        return {"aa": self.aa.as_dict(), "others_unchanged": self.others_unchanged.as_dict(),
                "others_match_annotation": self.others_match_annotation.as_dict(),
                "ceiling": self.ceiling.as_dict(),
                "ceiling_instructed": self.ceiling_instructed.as_dict(),
                "per_attribute": {k: v.as_dict() for k, v in self.per_attribute.items()},
                "per_item": self.per_item}


Predictions = Mapping[str, Mapping[str, str]]  # item id -> attribute -> predicted value


def _predicted(preds: Predictions, item: AAItem, name: str, which: str) -> str:
    try:
        return preds[item.id][name]
    except KeyError:
        raise InputError(f"{which} predictions", f"lack item {item.id!r} attribute {name!r}",
                         "a prediction for every annotated attribute of every item") from None


def attribute_accuracy(items: Sequence[AAItem], edited: Predictions, source: Predictions,
                       specs: Mapping[str, AttributeSpec] | None = None) -> AAResult:
    """AA, the others-unchanged shares and the ceiling from per-item predictions on the
    edited and the source images (see the module docstring); pure arithmetic."""
    if specs is not None:
        check_items(items, specs)
    aa = unchanged = unchanged_n = matched = ceil = ceil_n = ceil_i = ceil_i_n = 0
    per_attr: dict[str, list[int]] = {}
    per_item = {}
    for item in items:
        if not item.annotations:
            raise InputError(f"item {item.id!r}", "has no attribute annotations",
                             "the source image's annotated attributes (name -> value)")
        hit = _predicted(edited, item, item.attribute, "edited") == item.target
        aa += hit
        per_attr.setdefault(item.attribute, [0, 0])
        per_attr[item.attribute][0] += hit
        per_attr[item.attribute][1] += 1
        others = item.others()
        same = all(_predicted(edited, item, a, "edited") == _predicted(source, item, a, "source")
                   for a in others)
        as_annotated = all(_predicted(edited, item, a, "edited") == item.annotations[a]
                           for a in others)
        if others:
            unchanged_n += 1
            unchanged += same
            matched += as_annotated
        for name, value in item.annotations.items():
            right = _predicted(source, item, name, "source") == value
            ceil += right
            ceil_n += 1
            if name == item.attribute:
                ceil_i += right
                ceil_i_n += 1
        per_item[item.id] = {"attribute": item.attribute, "target": item.target,
                             "present": hit, "others": len(others),
                             "others_unchanged": same if others else None}
    return AAResult(aa=Share(aa, len(items)), others_unchanged=Share(unchanged, unchanged_n),
                    others_match_annotation=Share(matched, unchanged_n),
                    ceiling=Share(ceil, ceil_n), ceiling_instructed=Share(ceil_i, ceil_i_n),
                    per_attribute={k: Share(*v) for k, v in per_attr.items()},
                    per_item=per_item)


# --- classifiers ----------------------------------------------------------------------------

def _as_pil(image: torch.Tensor):
    """uint8 [3, H, W] (or float 0..1) -> what the processors take."""
    if image.dtype != torch.uint8:
        image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    return image.cpu()


class ClipZeroShot:
    """CLIP zero-shot: the value whose prompt is closest to the image."""

    def __init__(self, model, processor, specs: Mapping[str, AttributeSpec]):
        self.model, self.processor, self.specs = model, processor, dict(specs)
        self._text: dict[tuple[str, str], torch.Tensor] = {}

    @classmethod
    def load(cls, specs: Mapping[str, AttributeSpec], name: str | None = None, device=None
             ) -> ClipZeroShot:
        from .networks import load_clip

        return cls(*load_clip(name, device=device), specs)

    def _device(self):
        return next(self.model.parameters()).device

    def _text_embeds(self, name: str, obj: str) -> torch.Tensor:
        """[V, D] normalised embeddings of the attribute's prompts, one per value."""
        key = (name, obj)
        if key not in self._text:
            spec = self.specs[name]
            prompts = [spec.prompt(v, obj) for v in spec.values]
            inputs = self.processor(text=prompts, return_tensors="pt", padding=True,
                                    truncation=True)
            with torch.no_grad():
                out = self.model.get_text_features(
                    **{k: v.to(self._device()) for k, v in inputs.items()})
            out = getattr(out, "pooler_output", out)  # transformers 5 returns an output
            self._text[key] = F.normalize(out.float(), dim=-1).cpu()
        return self._text[key]

    def image_embeds(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        inputs = self.processor(images=[_as_pil(i) for i in images], return_tensors="pt")
        with torch.no_grad():
            out = self.model.get_image_features(
                pixel_values=inputs["pixel_values"].to(self._device()))
        out = getattr(out, "pooler_output", out)
        return F.normalize(out.float(), dim=-1).cpu()

    def scores(self, images: Sequence[torch.Tensor], name: str, obj: str) -> torch.Tensor:
        """[N, V] cosine of each image with each value's prompt."""
        return self.image_embeds(images) @ self._text_embeds(name, obj).T

    def predict(self, images: Sequence[torch.Tensor], objects: Sequence[str],
                attributes: Sequence[Sequence[str]]) -> list[dict[str, str]]:
        """For each image, attribute -> predicted value."""
        feats = self.image_embeds(images)
        out = []
        for feat, obj, names in zip(feats, objects, attributes):
            row = {}
            for name in names:
                if name not in self.specs:
                    raise InputError(f"attribute {name!r}", "has no prompt template",
                                     f"one of {sorted(self.specs)}")
                best = int((self._text_embeds(name, obj) @ feat).argmax())
                row[name] = self.specs[name].values[best]
            out.append(row)
        return out


class FolderClassifier:
    """A user's image-classification folder whose label names are attribute values."""

    def __init__(self, model, processor, specs: Mapping[str, AttributeSpec], folder: Path):
        self.model, self.processor, self.specs = model, processor, dict(specs)
        labels = {str(v).lower(): int(k) for k, v in model.config.id2label.items()}
        self.index: dict[str, list[int]] = {}
        for name, spec in self.specs.items():
            missing = [v for v in spec.values if v.lower() not in labels]
            if missing:
                raise InputError(f"image classifier {folder}",
                                 f"has no label for attribute {name!r} values {missing}",
                                 f"labels (config.json id2label) naming every value of "
                                 f"{list(spec.values)}",
                                 "Use a classifier trained on these values, or CLIP.")
            self.index[name] = [labels[v.lower()] for v in spec.values]

    @classmethod
    def load(cls, folder: Path | str, specs: Mapping[str, AttributeSpec], device=None
             ) -> FolderClassifier:
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        from .networks import _device

        folder = Path(folder)
        what = "image classifier for attribute accuracy"
        if not (folder / "config.json").is_file():
            raise ModelNotFoundError(what, str(folder), [folder / "config.json"],
                                     hint="Name a Hugging Face image-classification folder "
                                          "(config.json, weights, preprocessor_config.json).")
        try:
            json.loads((folder / "config.json").read_text())
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = AutoModelForImageClassification.from_pretrained(
                    folder, local_files_only=True)
                processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        except Exception as exc:
            raise ModelLoadError(what, folder, f"transformers could not load it "
                                 f"({type(exc).__name__}: {exc})",
                                 "The folder needs config.json, the weights and "
                                 "preprocessor_config.json.") from exc
        model = model.eval().requires_grad_(False).to(_device(device))
        return cls(model, processor, specs, folder)

    def predict(self, images: Sequence[torch.Tensor], objects: Sequence[str],
                attributes: Sequence[Sequence[str]]) -> list[dict[str, str]]:
        inputs = self.processor(images=[_as_pil(i) for i in images], return_tensors="pt")
        device = next(self.model.parameters()).device
        with torch.no_grad():
            logits = self.model(pixel_values=inputs["pixel_values"].to(device)).logits.cpu()
        out = []
        for row_logits, names in zip(logits, attributes):
            row = {}
            for name in names:
                if name not in self.index:
                    raise InputError(f"attribute {name!r}", "is not described",
                                     f"one of {sorted(self.index)}")
                idx = self.index[name]
                row[name] = self.specs[name].values[int(row_logits[idx].argmax())]
            out.append(row)
        return out


def evaluate_attributes(items: Sequence[AAItem], edited: Mapping[str, torch.Tensor],
                        source: Mapping[str, torch.Tensor], classifier,
                        specs: Mapping[str, AttributeSpec], batch_size: int = 16) -> AAResult:
    """Classify each item's edited and source image (uint8 [3, H, W] by item id) on the
    instructed attribute and the annotated ones, then :func:`attribute_accuracy`."""
    check_items(items, specs)
    return attribute_accuracy(items, predict_items(items, edited, classifier, batch_size,
                                                   "edited"),
                              predict_items(items, source, classifier, batch_size, "source"),
                              specs)


def predict_items(items: Sequence[AAItem], images: Mapping, classifier, batch_size: int = 16,
                  which: str = "edited", bar=None) -> dict[str, dict[str, str]]:
    """The classifier's reading of every item's instructed and annotated attributes on its
    image in ``images`` (item id -> uint8 [3, H, W], or a callable loading it), in chunks
    of ``batch_size``; interruptible between chunks, a progress ``bar`` (tqdm-like)
    advanced by each chunk's images."""
    from ..mgie_core import host

    missing = [i.id for i in items if i.id not in images]
    if missing:
        raise InputError(f"{which} images", f"lack items {missing[:5]}", "one image per item id")
    preds = {}
    for start in range(0, len(items), batch_size):
        host.check_interrupt()
        chunk = items[start:start + batch_size]
        pictures = [images[i.id] for i in chunk]
        pictures = [p() if callable(p) else p for p in pictures]
        rows = classifier.predict(pictures, [i.object for i in chunk],
                                  [[i.attribute, *i.others()] for i in chunk])
        preds.update({i.id: row for i, row in zip(chunk, rows)})
        if bar is not None:
            bar.update(len(chunk))
    return preds


# --- batch runs -----------------------------------------------------------------------------

def _value(value) -> str:
    """An annotation as a value name: 1 / True -> "yes", -1 / 0 / False -> "no" (the
    datasets' present/absent conventions), anything else as its text."""
    if isinstance(value, bool):
        return YES if value else NO
    if isinstance(value, (int, float)) and value in (1, -1, 0):
        return YES if value == 1 else NO
    return str(value)


def item_from_fields(item_id: str, fields: Mapping) -> AAItem | None:
    """The AA item of a dataset item's fields (a batch record's ``inputs``), or None when
    it is not an attribute edit (no ``target_attribute``).

    Fields read: ``target_attribute`` (the instructed attribute's name), ``target_value``
    (default "yes": the edit makes the attribute present), ``attributes`` (name -> value;
    1 / -1 read as "yes" / "no") and ``object``."""
    name = fields.get("target_attribute")
    if not name:
        return None
    annotations = fields.get("attributes")
    if not isinstance(annotations, Mapping) or not annotations:
        raise InputError(f"item {item_id!r}", "has no attribute annotations",
                         "an 'attributes' field (name -> value) beside 'target_attribute'",
                         "Use a dataset adapter that keeps the annotations.")
    return AAItem(str(item_id), str(name), _value(fields.get("target_value", YES)),
                  {str(k): _value(v) for k, v in annotations.items()},
                  str(fields.get("object") or "object"))


def binary_specs(items: Sequence[AAItem]) -> dict[str, AttributeSpec]:
    """Generic present/absent templates for the yes/no attributes of ``items``:
    "a photo of a {object} that is <attribute>" and "... that is not <attribute>"
    (underscores read as spaces). Opt-in: a dataset with better wording passes its own
    specs. An attribute with other values still needs a spec of its own."""
    names: dict[str, set[str]] = {}
    for item in items:
        names.setdefault(item.attribute, set()).add(item.target)
        for k, v in item.annotations.items():
            names.setdefault(k, set()).add(v)
    specs = {}
    for name, values in names.items():
        if values <= {YES, NO}:
            words = name.replace("_", " ").strip()
            specs[name] = AttributeSpec.binary(name, f"a photo of a {{object}} that is {words}",
                                               f"a photo of a {{object}} that is not {words}")
    return specs


def specs_from_data(data: Mapping[str, Mapping], where: str = "attribute specs"
                    ) -> dict[str, AttributeSpec]:
    """AttributeSpecs from an adapter's plain-data ``attribute_specs`` (see the module
    docstring)."""
    specs = {}
    for name, entry in data.items():
        values = tuple(str(v) for v in entry.get("values") or ())
        prompts = {str(k): str(v) for k, v in (entry.get("prompts") or {}).items()}
        template = entry.get("template") or prompts.get(YES) or DEFAULT_TEMPLATE
        try:
            specs[str(name)] = AttributeSpec(str(name), values, str(template), prompts)
        except InputError as exc:
            raise InputError(where, f"describe attribute {name!r} badly ({exc})",
                             "values and a template with {object} and {value}") from None
    return specs


@dataclasses.dataclass
class DatasetAttributes:
    """What a run's dataset says about attributes: its adapter module (None for a
    manifest) and folder."""

    adapter: object | None
    folder: Path | None

    @property
    def kind(self) -> str | None:
        return getattr(self.adapter, "NAME", None)

    def item(self, item_id: str, fields: Mapping) -> AAItem | None:
        """The AA item of one record's fields (through the adapter's ``attribute_edit``)."""
        hook = getattr(self.adapter, "attribute_edit", None)
        if hook is not None:
            try:
                fields = hook(dict(fields))
            except (KeyError, TypeError, ValueError) as exc:
                if isinstance(exc, XMGIEError):
                    raise
                raise InputError(f"item {item_id!r}", f"cannot be read by {self.kind}'s "
                                 f"attribute_edit ({type(exc).__name__}: {exc})",
                                 "the fields that dataset's adapter writes",
                                 "Rerun the batch with the current adapter.") from None
            if fields is None:
                return None
        return item_from_fields(item_id, fields)

    def specs(self, items: Sequence[AAItem]) -> dict[str, AttributeSpec]:
        """Generic present/absent wording for the items' yes/no attributes, replaced by
        the adapter's own templates where it has them."""
        specs = binary_specs(items)
        hook = getattr(self.adapter, "attribute_specs", None)
        if hook is not None and self.folder is not None:
            specs.update(specs_from_data(hook(self.folder),
                                         f"{self.kind} attribute_specs({self.folder})"))
        return specs


def dataset_attributes(dataset: str | Path | None) -> DatasetAttributes:
    """The adapter that reads ``dataset`` (a run's ``batch.json`` ``dataset``), if any; a
    dataset no longer on disk, or a manifest, has none (items are read as they are)."""
    if not dataset:
        return DatasetAttributes(None, None)
    from ..runner.datasets import detect_adapter

    folder = Path(dataset)
    adapter = detect_adapter(folder) if folder.is_dir() else None
    return DatasetAttributes(adapter, folder if adapter is not None else None)


def run_attribute_accuracy(run_dir: Path | str, classifier=None,
                           specs: Mapping[str, AttributeSpec] | None = None,
                           clip_model: str | None = None, image_node: str | None = None,
                           device=None) -> AAResult:
    """AA of an ``xmgie batch`` run folder: its successful attribute-edit items (see
    :func:`item_from_fields` and the dataset hooks), each result image against its source
    photo. ``specs`` default to the dataset's (:meth:`DatasetAttributes.specs`);
    ``classifier`` to :class:`ClipZeroShot` on ``clip_model`` (the CLIP folder CLIP score
    uses)."""
    from ..runner.batch import BATCH_FILE
    from .evaluate import EvalError, _load_rgb, _records, _result_file, _u8

    run_dir = Path(run_dir)
    try:
        settings = json.loads((run_dir / BATCH_FILE).read_text(encoding="utf-8"))
        prompt = settings["prompt"]
    except (OSError, ValueError, KeyError):
        raise EvalError(f"{run_dir} has no readable {BATCH_FILE}; is it an xmgie batch "
                        "run folder?") from None
    dataset = dataset_attributes(settings.get("dataset"))
    items, edited, source = [], {}, {}
    for item_id, record in _records(run_dir).items():
        item = dataset.item(item_id, record.get("inputs") or {})
        result = _result_file(run_dir, record, prompt, image_node)
        if item is None or result is None or not result.is_file():
            continue
        items.append(item)
        edited[item.id] = _u8(_load_rgb(result))[0]
        source[item.id] = _u8(_load_rgb(Path(record["inputs"]["image"])))[0]
    if not items:
        raise EvalError(f"{run_dir}: no successful item is an attribute edit (items need "
                        "'target_attribute' and 'attributes' fields); nothing to score")
    specs = dict(specs) if specs is not None else dataset.specs(items)
    check_items(items, specs)
    classifier = classifier or ClipZeroShot.load(specs, clip_model, device=device)
    return evaluate_attributes(items, edited, source, classifier, specs)
