"""``xmgie batch``: one workflow mapped over a dataset, resumable, one record per item.

Built on the runner's public pipeline (``workflow_ui.to_api`` -> ``apply_overrides`` ->
``check`` -> ``execute``): the batch only fills a copy of the API prompt with each item's
fields and seed, then executes it.

Run folder (``--out RUN``)::

    RUN/batch.json              what ran: workflow prompt, mapping, seed, variant, dataset
    RUN/items/<id>/record.json  inputs, settings, seed, times, UNet passes, outputs, error
    RUN/items/<id>/*.png        what the workflow's SaveImage/PreviewImage nodes wrote
    RUN/masks/<id>.png          PIE-Bench run-length masks and adapters' mask descriptions
                                (box, points, segmentation), written out once
    RUN/variants.json           with --variants: the variants and their run folders
    RUN/variants/<name>/...     one run folder per variant (the base variant is RUN)

The dataset's fields are written into each item's copy of the workflow by the rule of
:mod:`.mapping` (with the per-item seed).

Resuming: an item is done when ``items/<id>/record.json`` says "ok" and every output it
lists is there with its recorded size; a rerun skips done items and retries the others.
Each item runs in ``items/.staging/<id>.<...>/`` and the finished folder is renamed into
place, so a killed batch leaves no half-written image in ``items/<id>``; staging
leftovers are removed when the next batch starts. A failing item is recorded with its
error and the batch goes on; the exit status is the number of failed items (100 means
100 or more).

Model reuse: one :class:`Session` per process keeps the models loaded (see
:mod:`.model_cache`).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import shutil
import socket
import sys
import time
import traceback
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..mgie_core import host
from ..mgie_core.errors import XMGIEError
from . import core_nodes, engine, workflow_ui
from .dataset import Dataset, Item, pie_bench_mask
from .mapping import (
    BatchError,
    ItemError,
    canonical_sha,
    item_prompt,
    item_seed,
    parse_map_options,
    resolve_mapping,
    seed_everything,
)
from .model_cache import ModelCache, PassCounter
from .variants import Variant, apply_variant

BATCH_FILE = "batch.json"
VARIANTS_FILE = "variants.json"
ITEMS_DIR = "items"
STAGING_DIR = ".staging"
MASKS_DIR = "masks"
RECORD_FILE = "record.json"
LOCK_FILE = "batch.lock"
EXIT_MAX_FAILED = 100
EXIT_SETUP = 101          # the batch could not start (bad workflow, dataset or options)

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
    variant: dict | None = None
    fixed: list[list[str]] = dataclasses.field(default_factory=list)  # inputs the variant set
    extra_pnginfo: dict = dataclasses.field(default_factory=dict)
    tiny: bool = False
    models_dirs: list[str] = dataclasses.field(default_factory=list)
    input_dirs: list[str] = dataclasses.field(default_factory=list)
    device: str | None = None
    dataset_selection: dict = dataclasses.field(default_factory=dict)  # adapter split/limit/seed

    def fingerprint(self) -> str:
        """What must match for a rerun to resume this folder."""
        return canonical_sha({"prompt": self.prompt, "mapping": self.mapping, "seed": self.seed,
                              "variant": self.variant, "tiny": self.tiny})

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "fingerprint": self.fingerprint()}

    @classmethod
    def from_json(cls, data: Mapping) -> BatchSettings:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def prepare_settings(workflow: Path, data: dict, registry: engine.Registry, dataset: Dataset, *,
                     overrides: Sequence[str] = (), map_options: Sequence[str] = (),
                     seed: int = 0, variant: Variant | None = None, tiny: bool = False,
                     models_dirs: Sequence[Path] = (), input_dirs: Sequence[Path] = (),
                     device: str | None = None, mapping: dict | None = None,
                     extra_pnginfo: dict | None = None) -> BatchSettings:
    """Convert, override, apply the variant, resolve the mapping and validate the
    workflow once (per-item problems are found per item).

    ``mapping`` (a resolved mapping, e.g. the base run's when variants are added later)
    is used instead of resolving one; its targets on nodes a variant bypassed drop out."""
    prompt = workflow_ui.to_api(data, registry)
    prompt = engine.apply_overrides(prompt, list(overrides), registry)
    fixed: set = set()
    if variant is not None:
        prompt, fixed = apply_variant(prompt, variant, registry)
    if mapping is not None:
        mapping = {field: [t for t in targets if t.rpartition(".")[0] in prompt]
                   for field, targets in mapping.items()}
    else:
        fields = {f for item in dataset for f in item.fields} | \
            ({"mask"} if any(item.mask_rle or item.mask_spec for item in dataset) else set())
        mapping = resolve_mapping(prompt, registry, fields, parse_map_options(map_options))
    _check_workflow(prompt, mapping, dataset.items[0], fixed, registry, workflow, input_dirs)
    return BatchSettings(
        workflow=str(Path(workflow).resolve()), prompt=prompt, mapping=mapping, seed=int(seed),
        dataset=str(dataset.path), overrides=list(overrides),
        variant=variant.to_json() if variant is not None else None,
        fixed=sorted([list(p) for p in fixed]),
        extra_pnginfo=(extra_pnginfo if extra_pnginfo is not None else
                       {"workflow": data} if workflow_ui.is_ui_format(data) else {}),
        tiny=bool(tiny), models_dirs=[str(p) for p in models_dirs],
        input_dirs=[str(p) for p in input_dirs], device=device,
        dataset_selection=dict(dataset.selection))


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
    ctx = core_nodes.RunContext(input_dirs=_input_dirs(input_dirs, first),
                                workflow_dir=Path(workflow).resolve().parent)
    with core_nodes.using_context(ctx):
        errors = engine.validate(sample, registry)
    filled = {t.rpartition(".")[0] for targets in mapping.values() for t in targets}
    errors = [e for e in errors if not any(e.startswith(f"node {nid} (") for nid in filled)]
    if errors:
        raise engine.WorkflowError(errors)


def _input_dirs(input_dirs: Sequence[Path | str], item: Item) -> list[Path]:
    """The input folders of one item's run: ``--input-dir`` (default ./input) plus the
    folders holding the item's own image and mask. LoadImage only reads inside its input
    folders (as ComfyUI does); the dataset's files are the ones the user pointed the batch
    at, so their folders are input folders for that item."""
    dirs = [Path(p) for p in input_dirs] or [Path("input")]
    for field in ("image", "mask"):
        value = item.fields.get(field)
        if isinstance(value, str) and value:
            folder = Path(value).parent
            if folder not in dirs:
                dirs.append(folder)
    return dirs


# --- running items ----------------------------------------------------------------------

class Session:
    """Per-process state of a batch: the cached registry and the pass counter. One per
    ``xmgie batch`` process, one per Ray worker; shared by every run folder (variant) the
    process works on, so models load once. ``registry`` is the node registry the host
    hands over (the runner imports no nodes of the pack)."""

    def __init__(self, registry: engine.Registry):
        self.counter = PassCounter()
        self.cache = ModelCache(on_load=self.counter.watch)
        self.registry = self.cache.wrap(registry)
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
            input_dirs=_input_dirs(settings.input_dirs, item),
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
        except (KeyboardInterrupt, host.Interrupted):
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

def read_record(run_dir: Path, item_id: str) -> dict | None:
    path = Path(run_dir) / ITEMS_DIR / item_id / RECORD_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_done(run_dir: Path, item_id: str, fingerprint: str | None = None) -> bool:
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

    def add(self, other: Summary) -> None:
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
                                     f"{self.path.parent}; wait for it or use another --out"
                                     ) from None
                if other.get("host") not in (None, me["host"]):
                    raise BatchError(f"{self.path} says a batch runs on {other.get('host')} "
                                     f"(pid {other.get('pid')}); if it is gone, delete the file"
                                     ) from None
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
    """Write PIE-Bench run-length masks and adapters' mask descriptions as PNGs (once,
    into the run folder, never the dataset's) and point the items at them."""
    from PIL import Image

    folder = Path(run_dir) / MASKS_DIR
    for item in dataset:
        if not item.mask_rle and not item.mask_spec:
            continue
        path = folder / f"{item.id}.png"
        if not path.exists():
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".{item.id}.png.tmp-{os.getpid()}"
            if item.mask_rle:
                mask = pie_bench_mask(item.mask_rle)
            else:
                from .datasets import render_mask

                try:
                    with Image.open(item.fields["image"]) as im:
                        size = im.size
                except OSError:
                    continue  # the item fails on its own photo, with its own record
                mask = render_mask(item.mask_spec, size)
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
              session: Session | None = None, executor=None, desc: str = "batch",
              limit: int | None = None) -> Summary:
    """Run every item of ``dataset`` not done yet into ``run_dir``.

    ``executor`` (see :mod:`.scale`) runs items elsewhere; without one they run here, in
    ``session``. Ctrl-C stops after cleaning the current item."""
    if executor is None and session is None:
        raise ValueError("run_batch needs a session (or an executor) to run the items in")
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
                for item in todo:
                    host.check_interrupt()
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


def read_variants_file(run_dir: Path) -> list[tuple[Variant, Path]] | None:
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
