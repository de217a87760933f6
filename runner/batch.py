"""``xmgie batch``: one workflow mapped over a dataset, resumable, one record per item.

Built on the engine's public pipeline (``to_api`` -> ``apply_overrides`` -> ``check`` ->
``execute``): the batch only fills a copy of the API prompt with each item's fields and
seed, then executes it.

Run folder (``--out RUN``)::

    RUN/batch.json              what ran: workflow prompt, mapping, seed, variant, dataset
    RUN/items/<id>/record.json  inputs, settings, seed, times, UNet passes, outputs, error
    RUN/items/<id>/*.png        what the workflow's SaveImage/PreviewImage nodes wrote
    RUN/masks/<id>.png          PIE-Bench run-length masks, written out once
    RUN/variants.json           with --variants: the variants and their run folders
    RUN/variants/<name>/...     one run folder per variant (the base variant is RUN)

Mapping rule (dataset field -> workflow inputs), applied to the API form, so UI and API
files behave the same:

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

Resuming: an item is done when ``items/<id>/record.json`` says "ok" and every output it
lists is there with its recorded size; a rerun skips done items and retries the others.
Each item runs in ``items/.staging/<id>.<...>/`` and the finished folder is renamed into
place, so a killed batch leaves no half-written image in ``items/<id>``; staging
leftovers are removed when the next batch starts. A failing item is recorded with its
error and the batch goes on; the exit status is the number of failed items (100 means
100 or more).

Model reuse: a :class:`Session` (one per process, one per Ray worker) wraps every loader
node (CATEGORY ``xmgie/loaders``) so its outputs are cached, keyed by the loader's
inputs, the model folders, tiny mode and the device: models load once per process and
stay loaded across items and variants (``ModelCache.MAX_ENTRIES`` most recent sets are
kept). UNet passes are counted with hooks on the cached models' UNets.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import hashlib
import json
import os
import random
import shutil
import socket
import sys
import time
import traceback
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch

from ..mgie_core import paths, runtime
from ..mgie_core.errors import XMGIEError
from . import core_nodes, engine
from .dataset import Dataset, Item, pie_bench_mask
from .variants import Variant, apply_variant, parse_target

BATCH_FILE = "batch.json"
VARIANTS_FILE = "variants.json"
ITEMS_DIR = "items"
STAGING_DIR = ".staging"
MASKS_DIR = "masks"
RECORD_FILE = "record.json"
LOCK_FILE = "batch.lock"
EXIT_MAX_FAILED = 100
EXIT_SETUP = 101          # the batch could not start (bad workflow, dataset or options)
SEED_MODULUS = 2 ** 31    # fits every seed input of the pack and of ComfyUI
LOADER_CATEGORY = "xmgie/loaders"

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


# --- small file helpers -----------------------------------------------------------------

def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary sibling, flush it to disk, then rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=False, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def canonical_sha(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


# --- mapping and seeds ------------------------------------------------------------------

def item_seed(base: int, item_id: str) -> int:
    """A seed per item that depends only on the base seed and the item's id (not on the
    item's position, the worker or the order items run in)."""
    digest = hashlib.sha256(f"{int(base)}:{item_id}".encode("utf-8")).digest()
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


def _spec(registry: engine.Registry, class_type: Any) -> Optional[engine.NodeSpec]:
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
            if input_spec.is_seed and not engine.is_link(node["inputs"].get(name)):
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


# --- per-process model reuse and pass counting -------------------------------------------

class _TapBackward(torch.autograd.Function):
    """Identity on a UNet input; its backward counts one backward pass through the UNet."""

    @staticmethod
    def forward(ctx, counter, x):
        ctx.counter = counter
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.counter.backward += 1
        return None, grad


class PassCounter:
    """UNet forward and backward passes of the models a process loaded.

    Forwards are counted by a forward pre-hook (so a forward stopped early, as MAG's
    truncated loss does, still counts); backwards by passing a grad-requiring input
    through :class:`_TapBackward`, one count per backward pass that reaches the UNet."""

    def __init__(self):
        self.forward = 0
        self.backward = 0
        self._watched: set[int] = set()
        self._handles: list = []

    def watch(self, value: Any) -> None:
        unet = getattr(value, "unet", None)
        if isinstance(unet, torch.nn.Module) and id(unet) not in self._watched:
            self._watched.add(id(unet))
            self._handles.append(unet.register_forward_pre_hook(self._pre, with_kwargs=True))

    def totals(self) -> tuple[int, int]:
        return self.forward, self.backward

    # UNet2DConditionModel.forward(sample, timestep, encoder_hidden_states, ...)
    _TAPPED = (("sample", 0), ("encoder_hidden_states", 2))

    def _pre(self, module, args, kwargs):
        self.forward += 1
        if not torch.is_grad_enabled():
            return None
        for name, position in self._TAPPED:  # the latent first (MAG), else the text (null-text)
            in_args = len(args) > position
            value = args[position] if in_args else kwargs.get(name)
            if isinstance(value, torch.Tensor) and value.requires_grad:
                tapped = _TapBackward.apply(self, value)
                if in_args:
                    return (*args[:position], tapped, *args[position + 1:]), kwargs
                return args, {**kwargs, name: tapped}
        return None

    def close(self) -> None:
        """Remove the hooks (the models stay as they were)."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._watched = [], set()


def _literal_key(value: Any, keep: list) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    keep.append(value)  # keeps the object alive, so its id is not reused
    return ("object", id(value))


class ModelCache:
    """Outputs of loader nodes, keyed by class, inputs and the model search settings.

    Linked inputs (e.g. the SD model a LoadMGIEUNet wraps) are keyed by object identity:
    they are themselves cached loader outputs, so the key is stable across items."""

    MAX_ENTRIES = 6

    def __init__(self, on_load: Optional[Callable[[Any], None]] = None):
        self._entries: collections.OrderedDict = collections.OrderedDict()
        self.on_load = on_load
        self.loads: list[str] = []        # loader classes that loaded (missed) since reset
        self.hits: list[str] = []

    def reset_log(self) -> None:
        self.loads, self.hits = [], []

    def _key(self, class_type: str, kwargs: dict, keep: list) -> tuple:
        env = (str(paths.tiny_root()), tuple(str(p) for p in paths.models_dirs()),
               str(runtime.device()))
        items = tuple(sorted((k, _literal_key(v, keep)) for k, v in kwargs.items()
                             if k not in ("unique_id", "prompt", "extra_pnginfo")))
        return (class_type, items, env)

    def call(self, class_type: str, compute: Callable[[], Any], kwargs: dict) -> Any:
        keep: list = []
        key = self._key(class_type, kwargs, keep)
        if key in self._entries:
            self._entries.move_to_end(key)
            self.hits.append(class_type)
            return self._entries[key][0]
        result = compute()
        self.loads.append(class_type)
        self._entries[key] = (result, keep)
        while len(self._entries) > self.MAX_ENTRIES:
            self._entries.popitem(last=False)
        if self.on_load is not None:
            outputs = result.get("result", ()) if isinstance(result, dict) else result
            for value in outputs if isinstance(outputs, (tuple, list)) else (outputs,):
                self.on_load(value)
        return result

    def wrap(self, registry: engine.Registry) -> dict[str, type]:
        """A registry whose loader nodes answer from the cache."""
        return {ct: (self._cached_class(ct, cls)
                     if getattr(cls, "CATEGORY", "") == LOADER_CATEGORY else cls)
                for ct, cls in registry.items()}

    def _cached_class(self, class_type: str, cls: type) -> type:
        cache, fn_name = self, cls.FUNCTION
        original = getattr(cls, fn_name)

        def cached(self, **kwargs):
            return cache.call(class_type, lambda: original(self, **kwargs), kwargs)

        return type(cls.__name__, (cls,), {fn_name: cached, "__module__": cls.__module__,
                                           "__doc__": cls.__doc__})


def default_registry() -> dict[str, type]:
    """The pack's nodes plus the core stand-ins (what ``xmgie run`` uses)."""
    from ..nodes import NODE_CLASS_MAPPINGS
    from .core_nodes import STANDINS

    return {**STANDINS, **NODE_CLASS_MAPPINGS}


# --- settings of one run folder -----------------------------------------------------------

@dataclasses.dataclass
class BatchSettings:
    """Everything a worker needs to run items of one run folder (JSON-serialisable)."""

    workflow: str
    prompt: dict                   # API prompt: overrides and the variant applied
    mapping: dict[str, list[str]]
    seed: int
    dataset: str
    overrides: list[str] = dataclasses.field(default_factory=list)
    variant: Optional[dict] = None
    fixed: list[list[str]] = dataclasses.field(default_factory=list)  # inputs the variant set
    extra_pnginfo: dict = dataclasses.field(default_factory=dict)
    tiny: bool = False
    models_dirs: list[str] = dataclasses.field(default_factory=list)
    input_dirs: list[str] = dataclasses.field(default_factory=list)
    device: Optional[str] = None

    def fingerprint(self) -> str:
        """What must match for a rerun to resume this folder."""
        return canonical_sha({"prompt": self.prompt, "mapping": self.mapping, "seed": self.seed,
                              "variant": self.variant, "tiny": self.tiny})

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "fingerprint": self.fingerprint()}

    @classmethod
    def from_json(cls, data: Mapping) -> "BatchSettings":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def prepare_settings(workflow: Path, data: dict, registry: engine.Registry, dataset: Dataset, *,
                     overrides: Sequence[str] = (), map_options: Sequence[str] = (),
                     seed: int = 0, variant: Optional[Variant] = None, tiny: bool = False,
                     models_dirs: Sequence[Path] = (), input_dirs: Sequence[Path] = (),
                     device: Optional[str] = None, mapping: Optional[dict] = None,
                     extra_pnginfo: Optional[dict] = None) -> BatchSettings:
    """Convert, override, apply the variant, resolve the mapping and validate the
    workflow once (per-item problems are found per item).

    ``mapping`` (a resolved mapping, e.g. the base run's when variants are added later)
    is used instead of resolving one; its targets on nodes a variant bypassed drop out."""
    prompt = engine.to_api(data, registry)
    prompt = engine.apply_overrides(prompt, list(overrides), registry)
    fixed: set = set()
    if variant is not None:
        prompt, fixed = apply_variant(prompt, variant, registry)
    if mapping is not None:
        mapping = {field: [t for t in targets if t.rpartition(".")[0] in prompt]
                   for field, targets in mapping.items()}
    else:
        fields = {f for item in dataset for f in item.fields} | \
            ({"mask"} if any(item.mask_rle for item in dataset) else set())
        mapping = resolve_mapping(prompt, registry, fields, parse_map_options(map_options))
    _check_workflow(prompt, mapping, dataset.items[0], fixed, registry, workflow, input_dirs)
    return BatchSettings(
        workflow=str(Path(workflow).resolve()), prompt=prompt, mapping=mapping, seed=int(seed),
        dataset=str(dataset.path), overrides=list(overrides),
        variant=variant.to_json() if variant is not None else None,
        fixed=sorted([list(p) for p in fixed]),
        extra_pnginfo=(extra_pnginfo if extra_pnginfo is not None else
                       {"workflow": data} if engine.is_ui_format(data) else {}),
        tiny=bool(tiny), models_dirs=[str(p) for p in models_dirs],
        input_dirs=[str(p) for p in input_dirs], device=device)


def _check_workflow(prompt: engine.Prompt, mapping: Mapping[str, list[str]], first: Item,
                    fixed: set, registry: engine.Registry, workflow: Path,
                    input_dirs: Sequence[Path]) -> None:
    """Fail fast on problems every item would have. Problems of the nodes the dataset
    fills in are left to each item (one item's missing photo must not stop the batch)."""
    try:
        sample, _ = item_prompt(prompt, mapping, first, 0, fixed, registry)
    except ItemError:
        sample = prompt
    sample = {nid: {**n, "inputs": dict(n.get("inputs") or {})} for nid, n in sample.items()}
    ctx = core_nodes.RunContext(input_dirs=[Path(p) for p in input_dirs] or [Path("input")],
                                workflow_dir=Path(workflow).resolve().parent)
    with core_nodes.using_context(ctx):
        errors = engine.validate(sample, registry)
    filled = {t.rpartition(".")[0] for targets in mapping.values() for t in targets}
    errors = [e for e in errors if not any(e.startswith(f"node {nid} (") for nid in filled)]
    if errors:
        raise engine.WorkflowError(errors)


# --- running items ----------------------------------------------------------------------

class Session:
    """Per-process state of a batch: the cached registry and the pass counter. One per
    ``xmgie batch`` process, one per Ray worker; shared by every run folder (variant) the
    process works on, so models load once."""

    def __init__(self, registry: Optional[engine.Registry] = None):
        self.counter = PassCounter()
        self.cache = ModelCache(on_load=self.counter.watch)
        self.registry = self.cache.wrap(registry or default_registry())
        self.run_id = uuid.uuid4().hex[:12]
        self.host = socket.gethostname()

    def run_item(self, settings: BatchSettings, run_dir: Path, item: Item) -> dict:
        """Run one item into ``run_dir/items/<id>`` (write then rename); return its
        record. Errors of the item are recorded, never raised (Ctrl-C is)."""
        run_dir = Path(run_dir)
        items_dir = run_dir / ITEMS_DIR
        staging = items_dir / STAGING_DIR / f"{item.id}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        staging.mkdir(parents=True)
        seed = int(item.fields["seed"]) if item.fields.get("seed") is not None \
            else item_seed(settings.seed, item.id)
        record: dict[str, Any] = {
            "id": item.id, "status": "ok", "seed": seed, "inputs": item.fields,
            "mapped": {}, "settings": {
                "workflow": Path(settings.workflow).name, "overrides": settings.overrides,
                "variant": (settings.variant or {}).get("name"),
                "fingerprint": settings.fingerprint()},
            "outputs": [], "unet_passes": {"forward": 0, "backward": 0, "by_node": {}},
            "ui_text": {}, "error": None,
        }
        ctx = core_nodes.RunContext(
            input_dirs=[Path(p) for p in settings.input_dirs] or [Path("input")],
            output_dir=staging, workflow_dir=Path(settings.workflow).parent)
        self.cache.reset_log()
        start_f, start_b = self.counter.totals()
        last = [start_f, start_b]
        nodes_time: dict[str, float] = {}
        by_node: dict[str, dict] = {}
        started, t0 = _now(), time.perf_counter()

        def on_node(t: engine.NodeTiming) -> None:
            f, b = self.counter.totals()
            if f != last[0] or b != last[1]:
                by_node[t.node_id] = {"forward": f - last[0], "backward": b - last[1]}
            last[:] = [f, b]
            nodes_time[t.node_id] = round(t.seconds, 4)

        try:
            prompt, written = item_prompt(settings.prompt, settings.mapping, item, seed,
                                          {tuple(p) for p in settings.fixed}, self.registry)
            record["mapped"] = written
            record["settings"]["prompt_sha256"] = canonical_sha(prompt)
            seed_everything(seed)
            with core_nodes.using_context(ctx):
                result = engine.execute(prompt, self.registry, on_node=on_node,
                                        extra_pnginfo=settings.extra_pnginfo)
            for node_id, ui in result.ui.items():
                if isinstance(ui, dict) and ui.get("text"):
                    record["ui_text"][node_id] = list(ui["text"])
            record["outputs"] = _outputs(staging, ctx.written, result.ui)
        except (KeyboardInterrupt, runtime.Interrupted):
            shutil.rmtree(staging, ignore_errors=True)
            raise
        except Exception as exc:  # recorded; the batch goes on
            record["status"] = "failed"
            record["error"] = _error_info(exc)
            record["outputs"] = _outputs(staging, ctx.written, {})
        f, b = self.counter.totals()
        record["unet_passes"] = {"forward": f - start_f, "backward": b - start_b,
                                 "by_node": by_node}
        record["times"] = {"started": started, "seconds": round(time.perf_counter() - t0, 4),
                           "nodes": nodes_time}
        record["worker"] = {"host": self.host, "pid": os.getpid(), "run_id": self.run_id,
                            "loaded_models": list(self.cache.loads)}
        write_json_atomic(staging / RECORD_FILE, record)
        _commit(staging, items_dir / item.id)
        return record


def _error_info(exc: BaseException) -> dict:
    info = {"type": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, engine.WorkflowError):
        info["node"], info["class_type"] = exc.node_id, exc.class_type
        cause = exc.__cause__
        if cause is not None and not isinstance(cause, XMGIEError):
            info["traceback"] = "".join(traceback.format_exception(
                type(cause), cause, cause.__traceback__)[-6:])
    elif not isinstance(exc, XMGIEError):
        info["traceback"] = "".join(traceback.format_exception(
            type(exc), exc, exc.__traceback__)[-6:])
    return info


def _outputs(folder: Path, written: list[Path], ui: Mapping[str, Any]) -> list[dict]:
    """Files the item wrote (relative to its folder), with the node that wrote them."""
    node_of: dict[str, str] = {}
    for node_id, entry in ui.items():
        for image in (entry or {}).get("images", []) if isinstance(entry, dict) else []:
            rel = "/".join(p for p in (image.get("subfolder"), image.get("filename")) if p)
            node_of[rel] = node_id
    out = []
    root = Path(folder).resolve()
    for path in written:
        path = Path(path).resolve()
        if not path.is_file():
            continue
        rel = path.relative_to(root).as_posix()
        out.append({"node": node_of.get(rel), "file": rel, "bytes": path.stat().st_size,
                    "sha256": sha256_file(path)})
    return out


def _commit(staging: Path, final: Path) -> None:
    """Rename the finished staging folder to the item's folder (an older attempt there
    is moved aside first and deleted after)."""
    old = None
    if final.exists():
        old = staging.parent / f"{final.name}.old.{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
    os.replace(staging, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --- the batch ----------------------------------------------------------------------------

def read_record(run_dir: Path, item_id: str) -> Optional[dict]:
    path = Path(run_dir) / ITEMS_DIR / item_id / RECORD_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_done(run_dir: Path, item_id: str, fingerprint: Optional[str] = None) -> bool:
    """The item's record says ok, belongs to this batch, and lists outputs that are all
    there with their recorded sizes."""
    record = read_record(run_dir, item_id)
    if not record or record.get("status") != "ok":
        return False
    if fingerprint and (record.get("settings") or {}).get("fingerprint") != fingerprint:
        return False
    folder = Path(run_dir) / ITEMS_DIR / item_id
    for out in record.get("outputs") or []:
        p = folder / out["file"]
        if not p.is_file() or p.stat().st_size != out.get("bytes"):
            return False
    return True


@dataclasses.dataclass
class Summary:
    run_dir: Path
    total: int = 0
    skipped: int = 0          # already done before this run
    ok: int = 0
    failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return min(len(self.failed), EXIT_MAX_FAILED)

    def add(self, other: "Summary") -> None:
        self.total += other.total
        self.skipped += other.skipped
        self.ok += other.ok
        self.failed += other.failed
        self.seconds += other.seconds


class _Lock:
    """``RUN/batch.lock``: one batch per run folder at a time. A lock left by a process
    that is gone (killed) is taken over."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE

    def __enter__(self):
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    other = json.loads(self.path.read_text())
                except (OSError, ValueError):
                    other = {}
                if other.get("host") == me["host"] and _alive(other.get("pid")):
                    raise BatchError(f"another batch (pid {other.get('pid')}) is running in "
                                     f"{self.path.parent}; wait for it or use another --out")
                if other.get("host") not in (None, me["host"]):
                    raise BatchError(f"{self.path} says a batch runs on {other.get('host')} "
                                     f"(pid {other.get('pid')}); if it is gone, delete the file")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            return self
        raise BatchError(f"could not take the lock {self.path}")

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)


def _alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _write_masks(run_dir: Path, dataset: Dataset) -> None:
    """Write PIE-Bench run-length masks as PNGs (once) and point the items at them."""
    from PIL import Image

    folder = Path(run_dir) / MASKS_DIR
    for item in dataset:
        if not item.mask_rle:
            continue
        path = folder / f"{item.id}.png"
        if not path.exists():
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".{item.id}.png.tmp-{os.getpid()}"
            mask = pie_bench_mask(item.mask_rle)
            Image.fromarray((mask * 255).astype(np.uint8), "L").save(tmp, format="PNG")
            os.replace(tmp, path)
        item.fields["mask"] = str(path.resolve())


def prepare_run_dir(run_dir: Path, settings: BatchSettings) -> None:
    """Create the folder, or check that it holds this same batch (to resume it)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    batch_file = run_dir / BATCH_FILE
    if batch_file.exists():
        try:
            old = json.loads(batch_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = {}
        if old.get("fingerprint") != settings.fingerprint():
            what = [k for k in ("prompt", "mapping", "seed", "variant", "tiny")
                    if old.get(k) != getattr(settings, k)]
            raise BatchError(f"{run_dir} holds another batch (different "
                             f"{', '.join(what) or 'settings'}); resuming needs the same "
                             "workflow, --set, --map, --seed and variant. Use another --out, "
                             "or delete the folder to start again.")
    write_json_atomic(batch_file, settings.to_json())
    staging = run_dir / ITEMS_DIR / STAGING_DIR
    if staging.exists():  # leftovers of a killed batch; the lock says none is running
        shutil.rmtree(staging, ignore_errors=True)


class Progress:
    """A tqdm bar over the items to run: done, failed, skipped and the rate."""

    def __init__(self, total: int, desc: str, skipped: int):
        from tqdm.auto import tqdm

        self.skipped, self.ok, self.failed = skipped, 0, 0
        self._bar = tqdm(total=total, desc=desc, unit="item", dynamic_ncols=True,
                         disable=os.environ.get("XMGIE_NO_PROGRESS") == "1" or total == 0)
        self._show()

    def _show(self):
        self._bar.set_postfix(done=self.ok, failed=self.failed, skipped=self.skipped,
                              refresh=False)

    def update(self, record: dict) -> None:
        if record.get("status") == "ok":
            self.ok += 1
        else:
            self.failed += 1
        self._show()
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()


def run_batch(settings: BatchSettings, run_dir: Path, dataset: Dataset, *,
              session: Optional[Session] = None, executor=None, desc: str = "batch",
              limit: Optional[int] = None) -> Summary:
    """Run every item of ``dataset`` not done yet into ``run_dir``.

    ``executor`` (see :mod:`.scale`) runs items elsewhere; by default they run here, in
    ``session`` (made if not given). Ctrl-C stops after cleaning the current item."""
    run_dir = Path(run_dir)
    summary = Summary(run_dir=run_dir, total=len(dataset))
    t0 = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    with _Lock(run_dir):
        prepare_run_dir(run_dir, settings)
        _write_masks(run_dir, dataset)
        fp = settings.fingerprint()
        todo = [item for item in dataset if not is_done(run_dir, item.id, fp)]
        summary.skipped = len(dataset) - len(todo)
        if limit is not None:
            todo = todo[:max(0, limit)]
        bar = Progress(len(todo), desc, summary.skipped)

        def collect(record: dict) -> None:
            bar.update(record)
            if record.get("status") == "ok":
                summary.ok += 1
            else:
                err = record.get("error") or {}
                summary.failed.append((record["id"], str(err.get("message", "failed"))))

        try:
            if executor is not None:
                executor.run(settings, run_dir, todo, collect)
            else:
                session = session or Session()
                for item in todo:
                    runtime.check_interrupt()
                    collect(session.run_item(settings, run_dir, item))
        finally:
            bar.close()
            summary.seconds = time.perf_counter() - t0
    return summary


# --- variants -----------------------------------------------------------------------------

def variant_dir(run_dir: Path, variant: Variant) -> Path:
    return Path(run_dir) if variant.is_base else Path(run_dir) / "variants" / variant.name


def write_variants_file(run_dir: Path, variants: Sequence[Variant]) -> None:
    """``RUN/variants.json``: the variants in table order and their run folders."""
    write_json_atomic(Path(run_dir) / VARIANTS_FILE, {"variants": [
        {**v.to_json(), "dir": os.path.relpath(variant_dir(run_dir, v), run_dir)}
        for v in variants]})


def read_variants_file(run_dir: Path) -> Optional[list[tuple[Variant, Path]]]:
    path = Path(run_dir) / VARIANTS_FILE
    if not path.exists():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return [(Variant.from_json(v), (Path(run_dir) / v["dir"]).resolve())
            for v in data.get("variants", [])]


def print_summary(summary: Summary, label: str = "Batch", file=None) -> None:
    file = file or sys.stdout
    rate = summary.ok / summary.seconds if summary.seconds > 0 and summary.ok else 0.0
    print(f"{label}: {summary.ok} done, {len(summary.failed)} failed, {summary.skipped} "
          f"already done (of {summary.total}) in {summary.seconds:.1f} s"
          + (f" ({rate:.2f} items/s)" if rate else "") + f"; records in "
          f"{Path(summary.run_dir) / ITEMS_DIR}", file=file)
    for item_id, message in summary.failed[:20]:
        first = message.strip().splitlines()[0] if message.strip() else "failed"
        print(f"  failed: {item_id}: {first}", file=file)
    if len(summary.failed) > 20:
        print(f"  ... and {len(summary.failed) - 20} more (see their record.json)", file=file)
