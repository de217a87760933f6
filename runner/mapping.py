"""Dataset field -> workflow input mapping, and per-item seeds, for ``xmgie batch``.

The rule, applied to the API form of the workflow, so UI and API files behave the same:

* ``image`` -> ``image`` of the workflow's one ``LoadImage`` node; ``mask`` -> ``image`` of
  its one ``LoadImageMask`` node (dataset masks are white-on-black pictures: the node
  should read a colour channel, as the shipped workflows do). With several such nodes,
  say which with ``--map``.
* every other field -> every widget input of that name holding a literal value (e.g.
  ``source_prompt`` -> XMGIEInvert.source_prompt), plus the aliases in ``ALIASES``
  (``edit_words`` -> the samplers' ``cam_in_words`` and MAG/A-STAR ``words``; ``object`` ->
  XMGIEAttentionMask.word). Lists become comma-separated text.
* ``--map FIELD=NODE.INPUT[,NODE.INPUT...]`` replaces the rule for a field (NODE: an id, a
  class_type or a title); ``--map FIELD=`` leaves the workflow's value alone.
* Only fields the dataset has are mapped. An item that lacks a mapped field fails with an
  error saying so (a workflow value meant for another photo is never used silently).
* Seeds: each item gets ``item_seed(--seed, id)`` (or its own ``seed`` field), written
  into every seed input (INT inputs named like a seed) and used to seed torch, numpy
  and random before it runs, so a rerun, a resumed run or a Ray worker gives the same
  result for the same item.
* A variant's ``set`` values win over mapped values.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..mgie_core.errors import XMGIEError
from . import engine
from .dataset import Item
from .variants import parse_target
from .workflow_ui import is_seed

SEED_MODULUS = 2 ** 31    # fits every seed input of the pack and of ComfyUI

# Field aliases beyond "an input of the same name": (class_type, input).
ALIASES: dict[str, tuple[tuple[str, str], ...]] = {
    "edit_words": (("XMGIECAMSampler", "cam_in_words"), ("XMGIEInstructSampler", "cam_in_words"),
                   ("XMGIEMAGControl", "words"), ("XMGIEAStarControl", "words")),
    "object": (("XMGIEAttentionMask", "word"),),
}
# Fields that name a file, and the one loader node type that takes them.
FILE_FIELDS = {"image": "LoadImage", "mask": "LoadImageMask"}


class BatchError(XMGIEError, ValueError):
    """The batch cannot start: bad options, a run folder of another batch, ..."""


class ItemError(XMGIEError, ValueError):
    """One item cannot run (e.g. it lacks a field the workflow takes)."""


def canonical_sha(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def item_seed(base: int, item_id: str) -> int:
    """A seed per item that depends only on the base seed and the item's id (not on the
    item's position, the worker or the order items run in)."""
    digest = hashlib.sha256(f"{int(base)}:{item_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % SEED_MODULUS


def parse_map_options(options: Sequence[str]) -> dict[str, list[str]]:
    """``["edit_words=6.cam_in_words,MAG.words", "mask="]`` -> {field: [targets]}."""
    out: dict[str, list[str]] = {}
    for text in options or ():
        field, sep, targets = text.partition("=")
        field = field.strip()
        if not sep or not field:
            raise BatchError(f"--map {text!r}: expected FIELD=NODE.INPUT[,NODE.INPUT...] "
                             "(e.g. --map edit_words=6.cam_in_words) or FIELD= to leave the "
                             "workflow's value alone")
        out[field] = [t.strip() for t in targets.split(",") if t.strip()]
    return out


def _spec(registry: engine.Registry, class_type: Any) -> engine.NodeSpec | None:
    cls = registry.get(class_type) if isinstance(class_type, str) else None
    return engine.node_spec(class_type, cls) if cls is not None else None


def resolve_mapping(prompt: engine.Prompt, registry: engine.Registry, fields: Iterable[str],
                    explicit: Mapping[str, list[str]]) -> dict[str, list[str]]:
    """field -> ["NODE_ID.INPUT", ...] by the module's rule; raises BatchError."""
    mapping: dict[str, list[str]] = {}
    errors = []
    for field in sorted(set(fields) | set(explicit)):
        if field in explicit:
            targets = []
            for target in explicit[field]:
                try:
                    pairs = parse_target(prompt, target, f"--map {field}")
                except XMGIEError as exc:
                    errors.append(str(exc))
                    continue
                for nid, name in pairs:
                    spec = _spec(registry, prompt[nid].get("class_type"))
                    if spec is not None and name not in spec.inputs:
                        errors.append(f"--map {field}: node {nid} ({spec.class_type}) has no "
                                      f"input '{name}'; expected one of {', '.join(spec.inputs)}")
                    targets.append(f"{nid}.{name}")
            mapping[field] = targets
            continue
        if field in FILE_FIELDS:
            ids = [nid for nid, n in prompt.items() if n.get("class_type") == FILE_FIELDS[field]]
            if len(ids) > 1:
                errors.append(f"the dataset's '{field}' could go to several {FILE_FIELDS[field]} "
                              f"nodes ({', '.join(sorted(ids))}); say which with --map "
                              f"{field}=NODE_ID.image")
            mapping[field] = [f"{ids[0]}.image"] if len(ids) == 1 else []
            continue
        targets = []
        aliases = ALIASES.get(field, ())
        for nid in sorted(prompt, key=lambda i: (0, int(i), "") if i.isdigit() else (1, 0, i)):
            node = prompt[nid]
            spec = _spec(registry, node.get("class_type"))
            if spec is None:
                continue
            for name, input_spec in spec.inputs.items():
                named = name == field or (spec.class_type, name) in aliases
                if named and input_spec.is_widget and not engine.is_link(node["inputs"].get(name)):
                    targets.append(f"{nid}.{name}")
        mapping[field] = targets
    if errors:
        raise BatchError(errors[0] if len(errors) == 1 else
                         f"{len(errors)} problems with the mapping:\n" +
                         "\n".join(f"  - {e}" for e in errors))
    return mapping


def _field_value(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return value


def seed_inputs(prompt: engine.Prompt, registry: engine.Registry) -> list[tuple[str, str, Any]]:
    """(node id, input, max) of every literal seed input of the prompt."""
    out = []
    for nid, node in prompt.items():
        spec = _spec(registry, node.get("class_type"))
        if spec is None:
            continue
        for name, input_spec in spec.inputs.items():
            if is_seed(input_spec) and not engine.is_link(node["inputs"].get(name)):
                out.append((nid, name, input_spec.options.get("max")))
    return out


def item_prompt(prompt: engine.Prompt, mapping: Mapping[str, list[str]], item: Item,
                seed: int, fixed: set, registry: engine.Registry
                ) -> tuple[engine.Prompt, dict[str, Any]]:
    """A copy of ``prompt`` with the item's fields and seed written in; returns it and
    what was written ("NODE.INPUT" -> value). Raises ItemError for a missing field."""
    out = {nid: {**n, "inputs": dict(n.get("inputs") or {})} for nid, n in prompt.items()}
    written: dict[str, Any] = {}
    for field, targets in mapping.items():
        live = [t for t in targets if t.rpartition(".")[0] in out
                and tuple(t.rpartition(".")[::2]) not in fixed]
        if not live:
            continue
        if field == "seed" and item.fields.get("seed") is None:
            value = seed  # items without their own seed get the derived one
        elif field not in item.fields or item.fields[field] is None:
            raise ItemError(f"item '{item.id}' has no '{field}', which the workflow takes at "
                            f"{', '.join(live)}; add it to the item, or pass --map {field}= "
                            "to keep the workflow's value")
        else:
            value = _field_value(item.fields[field])
        for target in live:
            nid, _, name = target.rpartition(".")
            out[nid]["inputs"][name] = value
            written[target] = value
    for nid, name, top in seed_inputs(out, registry):
        if (nid, name) in fixed or f"{nid}.{name}" in written:
            continue
        value = seed if top is None else seed % (int(top) + 1)
        out[nid]["inputs"][name] = value
        written[f"{nid}.{name}"] = value
    return out, written


def seed_everything(seed: int) -> None:
    """Seed torch (every device), numpy and random, so nodes that draw random numbers
    without a seed input are repeatable per item too."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
