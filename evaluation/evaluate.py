"""Evaluate run folders of ``xmgie batch`` (and their variants) into one table.

Rows are variants (or the run itself), columns metrics. Every row is evaluated on the
same items: those that succeeded in every row, so an ablation compares like with like.
For each item the result image is the first file saved by the workflow's first SaveImage
node (``--image-node`` picks another node). Paired metrics (PSNR, SSIM, LPIPS, MSE)
compare it with the source photo, or with the item of the same id in ``--reference``;
background metrics compare it with the source outside the mask; CLIP scores use the
item's target prompt; IPS compares it with the source; FID and IS are computed per row
over all its results, FID against the reference set (the sources, or every image of
``--reference``). A result whose size differs from its reference is resized to it
(bicubic, antialiased) for the paired metrics; the report says how many were.

Attribute accuracy (``aa``, with ``aa_others`` and ``aa_ceiling`` reported apart; see
:mod:`.attributes`) is computed on the items that carry attribute annotations (the dataset
adapters write them; the adapter's hooks give the prompt templates), with CLIP zero-shot
(the ``--clip-model`` folder) or ``--attribute-classifier FOLDER``. The classifier reads
each source photo once; its accuracy there, the ceiling, is the same in every row. A run
without such items skips these metrics with the reason (a skip is not an error).

A metric whose network cannot be loaded is reported with the loader's error, and the
others are still computed. Every value comes with the number of items behind it
(``Row.counts``; image pairs for ``aa_ceiling``).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..mgie_core.errors import XMGIEError
from ..runner.batch import BATCH_FILE, ITEMS_DIR, RECORD_FILE
from . import metrics as M

AA_METRICS = ("aa", "aa_others", "aa_ceiling")
ALL_METRICS = ("psnr", "ssim", "lpips", "mse", "fid", "is", "clip_score", "clip_score_edited",
               "bg_psnr", "bg_ssim", "bg_lpips", "bg_mse", "ips", *AA_METRICS)
# Which loaded network a metric needs (None: pure math). "attributes": the AA classifier
# (CLIP zero-shot on the CLIP-score folder, or --attribute-classifier FOLDER).
NETWORK_OF = {"lpips": "lpips", "bg_lpips": "lpips", "fid": "inception", "is": "inception",
              "clip_score": "clip", "clip_score_edited": "clip", "ips": "ips",
              **{m: "attributes" for m in AA_METRICS}}
CLIP = "clip"  # --attribute-classifier's default: CLIP zero-shot


class EvalError(XMGIEError, ValueError):
    """The run folder or the options cannot be evaluated."""


@dataclasses.dataclass
class EvalOptions:
    metrics: tuple[str, ...] = ALL_METRICS
    reference: Path | None = None
    lpips_net: str = "alex"
    fid_feature: int = 2048
    clip_model: str | None = None
    ips_encoder: str | None = None
    image_node: str | None = None
    out: Path | None = None
    pictures: bool = True
    device: str | None = None
    attribute_classifier: str = CLIP

    @classmethod
    def from_args(cls, args) -> EvalOptions:
        chosen = ALL_METRICS
        if args.metrics:
            chosen = tuple(m.strip().lower() for m in args.metrics.split(",") if m.strip())
            unknown = [m for m in chosen if m not in ALL_METRICS]
            if unknown:
                raise EvalError(f"--metrics: unknown {', '.join(unknown)}; expected some of "
                                f"{', '.join(ALL_METRICS)}")
        return cls(metrics=chosen, reference=args.reference, lpips_net=args.lpips_net,
                   fid_feature=args.fid_feature, clip_model=args.clip_model,
                   ips_encoder=args.ips_encoder, image_node=args.image_node, out=args.out,
                   pictures=not args.no_pictures, device=args.device,
                   attribute_classifier=getattr(args, "attribute_classifier", None) or CLIP)


@dataclasses.dataclass
class Row:
    name: str
    description: str
    run_dir: Path
    values: dict[str, float] = dataclasses.field(default_factory=dict)
    per_item: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    results: dict[str, Path] = dataclasses.field(default_factory=dict)  # item -> image
    counts: dict[str, int] = dataclasses.field(default_factory=dict)  # metric -> items behind
    attributes: dict | None = None  # the full attribute-accuracy result (AAResult.as_dict)


@dataclasses.dataclass
class EvalResult:
    run_dir: Path
    out_dir: Path
    rows: list[Row]
    metrics: list[str]                  # computed, in column order
    errors: dict[str, str]              # metric -> why it is missing
    items: list[str]                    # evaluated item ids
    sources: dict[str, Path]
    masks: dict[str, Path | None]
    notes: list[str]
    files: list[Path] = dataclasses.field(default_factory=list)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # metric -> why
    dataset: dict = dataclasses.field(default_factory=dict)  # path and kind of the run's data


# --- reading runs ------------------------------------------------------------------------

def _records(run_dir: Path) -> dict[str, dict]:
    out = {}
    items = Path(run_dir) / ITEMS_DIR
    if not items.is_dir():
        return out
    for folder in sorted(items.iterdir()):
        if folder.name.startswith(".") or not (folder / RECORD_FILE).is_file():
            continue
        try:
            record = json.loads((folder / RECORD_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if record.get("status") == "ok":
            out[record["id"]] = record
    return out


def _result_file(run_dir: Path, record: dict, prompt: dict, image_node: str | None
                 ) -> Path | None:
    outputs = [o for o in record.get("outputs") or [] if str(o["file"]).lower().endswith(".png")]
    if image_node is not None:
        chosen = [o for o in outputs if o.get("node") == str(image_node)]
    else:
        saves = sorted({o.get("node") for o in outputs
                        if (prompt.get(str(o.get("node"))) or {}).get("class_type") == "SaveImage"},
                       key=lambda n: (0, int(n)) if str(n).isdigit() else (1, str(n)))
        chosen = [o for o in outputs if saves and o.get("node") == saves[0]] or outputs
    if not chosen:
        return None
    return Path(run_dir) / ITEMS_DIR / record["id"] / chosen[0]["file"]


def _load_rgb(path: Path) -> torch.Tensor:
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except OSError as exc:  # a source photo moved away with its dataset, say
        raise EvalError(f"cannot read the image {path} ({type(exc).__name__}); the run's "
                        "source photos and results must stay where xmgie batch found and "
                        "wrote them") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).unsqueeze(0)


def _load_mask(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """A white-on-black mask as [1, 1, H, W] in {0, 1} at ``size`` (H, W)."""
    with Image.open(path) as im:
        im = im.convert("L")
        if im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), Image.NEAREST)
        arr = np.asarray(im, dtype=np.float32) / 255.0
    return (torch.from_numpy(arr.copy()) > 0.5).float()[None, None]


def _u8(image: torch.Tensor) -> torch.Tensor:
    return (image.clamp(0, 1) * 255).round().to(torch.uint8)


def _fit(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image, size=size, mode="bicubic", antialias=True,
                         align_corners=False).clamp(0, 1)


# --- networks, loaded lazily; a failure is kept as the reason ------------------------------

class _Networks:
    def __init__(self, options: EvalOptions):
        self.options = options
        self._cache: dict[str, Any] = {}
        self.errors: dict[str, str] = {}

    def get(self, key: str):
        if key in self.errors:
            return None
        if key not in self._cache:
            from . import networks

            o = self.options
            loaders: dict[str, Callable[[], Any]] = {
                "lpips": lambda: networks.load_lpips(o.lpips_net, device=o.device),
                "inception": lambda: networks.load_inception(fid_feature=o.fid_feature,
                                                             device=o.device),
                "clip": lambda: networks.load_clip(o.clip_model, device=o.device),
                "ips": lambda: networks.load_ips_encoder(o.ips_encoder, device=o.device),
            }
            try:
                self._cache[key] = loaders[key]()
            except (XMGIEError, ImportError, OSError) as exc:
                self.errors[key] = str(exc)
                return None
        return self._cache[key]


# --- evaluation ----------------------------------------------------------------------------

def _rows(run_dir: Path, runs) -> list[Row]:
    if runs:
        rows = []
        for variant, folder in runs:
            rows.append(Row(variant.name, variant.description, Path(folder)))
        return rows
    settings = json.loads((Path(run_dir) / BATCH_FILE).read_text(encoding="utf-8"))
    variant = settings.get("variant") or {}
    name = variant.get("name") or Path(settings.get("workflow", "run")).stem
    return [Row(name, variant.get("description", ""), Path(run_dir))]


def evaluate_runs(run_dir: Path, runs=None, options: EvalOptions | None = None,
                  progress: bool = True) -> EvalResult:
    """Evaluate ``run_dir`` (or the ``runs`` [(variant, folder)] of its variants), write
    the table and pictures (see :mod:`.report`) and return what was computed."""
    from . import report

    options = options or EvalOptions()
    run_dir = Path(run_dir)
    rows = _rows(run_dir, runs)
    records = {row.name: _records(row.run_dir) for row in rows}
    prompts = {}
    for row in rows:
        try:
            prompts[row.name] = json.loads((row.run_dir / BATCH_FILE).read_text())["prompt"]
        except (OSError, ValueError, KeyError):
            raise EvalError(f"{row.run_dir} has no readable {BATCH_FILE}; has the variant "
                            f"'{row.name}' been run?") from None
    first = records[rows[0].name]
    common = [i for i in first if all(i in records[r.name] for r in rows)]
    notes: list[str] = []
    for row in rows:
        left = len(records[row.name]) - len(common)
        if left:
            notes.append(f"{row.name}: {left} successful item(s) left out because they "
                         "failed (or are missing) in another row")
    if not common:
        raise EvalError(f"no item succeeded in every row of {run_dir}; nothing to evaluate "
                        "(see the items' record.json)")
    sources = {i: Path(first[i]["inputs"]["image"]) for i in common}
    masks = {i: (Path(first[i]["inputs"]["mask"]) if first[i]["inputs"].get("mask") else None)
             for i in common}
    prompts_text = {i: first[i]["inputs"].get("target_prompt") for i in common}
    reference = None
    if options.reference is not None:
        from ..runner.dataset import load_dataset

        reference = load_dataset(options.reference).by_id()
    nets = _Networks(options)
    wanted = [m for m in ALL_METRICS if m in options.metrics]
    errors: dict[str, str] = {}
    resized = 0
    ref_feats: torch.Tensor | None = None

    def need(metric: str) -> bool:
        return metric in wanted and metric not in errors

    def network(metric: str):
        key = NETWORK_OF.get(metric)
        if key is None:
            return None
        net = nets.get(key)
        if net is None:
            for m in wanted:
                if NETWORK_OF.get(m) == key:
                    errors[m] = nets.errors[key]
        return net

    if need("fid"):
        inception = network("fid")
        if inception is not None:
            paths = ([Path(item.fields["image"]) for item in reference.values()]
                     if reference is not None else [sources[i] for i in common])
            ref_feats = torch.cat([inception(_u8(_load_rgb(p)))[0] for p in paths])

    bar = _bar(len(rows) * len(common), progress)
    for row in rows:
        feats, logits = [], []
        for item_id in common:
            record = records[row.name][item_id]
            result_path = _result_file(row.run_dir, record, prompts[row.name], options.image_node)
            if result_path is None or not result_path.is_file():
                notes.append(f"{row.name}/{item_id}: no result image")
                continue
            row.results[item_id] = result_path
            edited = _load_rgb(result_path)
            source = _load_rgb(sources[item_id])
            ref = source
            if reference is not None:
                ref_item = reference.get(item_id)
                ref = _load_rgb(Path(ref_item.fields["image"])) if ref_item else None
                if ref is None and row is rows[0]:
                    notes.append(f"{item_id}: not in the reference dataset; its paired "
                                 "metrics are left out")
            values: dict[str, float] = {}

            def paired(prefix: str, a, b, values: dict[str, float] = values) -> None:
                """PSNR, SSIM, MSE and LPIPS of ``a`` against ``b``, as ``prefix + name``."""
                for name, fn in (("psnr", M.psnr), ("ssim", M.ssim), ("mse", M.mse)):
                    if need(prefix + name):
                        values[prefix + name] = float(fn(a, b)[0])
                if need(prefix + "lpips") and network(prefix + "lpips") is not None:
                    values[prefix + "lpips"] = float(
                        M.lpips_distance(nets.get("lpips"), a, b)[0])

            if ref is not None:
                fitted = _fit(edited, ref.shape[-2:])
                resized += fitted is not edited
                paired("", fitted, ref)
            on_source = _fit(edited, source.shape[-2:])
            mask = _load_mask(masks[item_id], source.shape[-2:]) if masks[item_id] else None
            if mask is not None:
                paired("bg_", *M.background(on_source, source, mask))
            text = prompts_text[item_id]
            if text and (need("clip_score") or need("clip_score_edited")) \
                    and network("clip_score") is not None:
                model, processor = nets.get("clip")
                images = [_u8(on_source)[0]]
                if mask is not None:
                    images.append(_u8(on_source * mask)[0])
                scores = M.clip_scores(model, processor, images, [text] * len(images))
                if need("clip_score"):
                    values["clip_score"] = float(scores[0])
                if need("clip_score_edited") and mask is not None:
                    values["clip_score_edited"] = float(scores[1])
            if need("ips") and network("ips") is not None:
                try:
                    values["ips"] = float(M.ips_scores(nets.get("ips"), on_source, source,
                                                       mask)[0])
                except XMGIEError as exc:
                    notes.append(f"{row.name}/{item_id}: IPS not computed ({exc})")
            if (need("fid") or need("is")) and network("fid") is not None:
                f, lg = nets.get("inception")(_u8(edited))
                feats.append(f)
                logits.append(lg)
            row.per_item[item_id] = values
            bar.update(1)
        for metric in wanted:
            if metric in ("fid", "is"):
                continue
            vals = [v[metric] for v in row.per_item.values() if metric in v]
            if vals:
                row.values[metric] = M.finite_mean(vals)
                row.counts[metric] = len(vals)
        if feats:
            row.counts.update({m: len(feats) for m in ("fid", "is")})
            if need("fid") and ref_feats is not None:
                try:
                    row.values["fid"] = M.fid(ref_feats, torch.cat(feats))
                except ValueError as exc:
                    errors["fid"] = str(exc)
            if need("is"):
                row.values["is"] = M.inception_score(torch.cat(logits))[0]
    bar.close()
    skipped: dict[str, str] = {}
    dataset, dataset_info = _dataset_of(rows[0].run_dir)
    if any(need(m) for m in AA_METRICS):
        _attribute_accuracy(rows, first, common, options, nets, dataset, errors, skipped, notes,
                            [m for m in AA_METRICS if need(m)], progress)
    if resized:
        notes.append(f"{resized} result(s) were resized to their reference's size for the "
                     "paired metrics")
    computed = [m for m in wanted if any(m in row.values for row in rows)]
    for m in wanted:
        if m not in computed and m not in errors and m not in skipped:
            errors[m] = {"clip_score": "no item has a target_prompt",
                         "clip_score_edited": "no item has a mask and a target_prompt",
                         "ips": "no item could be scored (see the notes)"}.get(
                m, "no item has what it needs (a mask for background metrics)")
    result = EvalResult(run_dir=run_dir, out_dir=Path(options.out or run_dir / "eval"),
                        rows=rows, metrics=computed, errors=errors, items=common,
                        sources=sources, masks=masks, notes=notes, skipped=skipped,
                        dataset=dataset_info)
    report.write_all(result, pictures=options.pictures)
    return result


def _dataset_of(run_dir: Path):
    """The run's dataset from batch.json: its adapter (for the attribute hooks) and the
    kind to report (the adapter's NAME, "pie-bench" or "manifest")."""
    from .attributes import dataset_attributes

    try:
        path = json.loads((Path(run_dir) / BATCH_FILE).read_text(encoding="utf-8"))["dataset"]
    except (OSError, ValueError, KeyError):
        path = None
    found = dataset_attributes(path)
    kind = found.kind
    if kind is None and path:
        kind = "pie-bench" if Path(path).name == "mapping_file.json" or \
            (Path(path) / "mapping_file.json").is_file() else "manifest"
    return found, {"path": path, "kind": kind}


def _attribute_accuracy(rows: list[Row], first: dict[str, dict], common: list[str],
                        options: EvalOptions, nets: _Networks, dataset, errors: dict[str, str],
                        skipped: dict[str, str], notes: list[str], wanted: list[str],
                        progress: bool) -> None:
    """AA of every row on the common items that are attribute edits (see
    :mod:`.attributes`): each row's results and, once, the sources are classified."""
    from . import attributes as A

    try:
        items = [item for i in common
                 if (item := dataset.item(i, first[i].get("inputs") or {})) is not None]
    except XMGIEError as exc:
        errors.update({m: str(exc) for m in wanted})
        return
    if not items:
        why = ("no evaluated item is an attribute edit: items need 'target_attribute' and "
               "'attributes' fields, which the adapters of datasets in their published "
               "layouts write (CUB-200-2011, Oxford-102, MS-COCO, CelebA-HQ, Stanford Cars, "
               "DeepFashion)")
        skipped.update({m: why for m in wanted})
        return
    if len(items) < len(common):
        notes.append(f"attribute accuracy: {len(items)} of {len(common)} item(s) are "
                     "attribute edits; the others are not counted in it")
    try:
        specs = dataset.specs(items)
        A.check_items(items, specs)
        if options.attribute_classifier in (None, CLIP):
            clip = nets.get("clip")
            if clip is None:
                errors.update({m: nets.errors["clip"] for m in wanted})
                return
            classifier = A.ClipZeroShot(*clip, specs)
        else:
            classifier = A.FolderClassifier.load(options.attribute_classifier, specs,
                                                 device=options.device)
    except XMGIEError as exc:
        errors.update({m: str(exc) for m in wanted})
        return
    bar = _bar(len(items) * (len(rows) + 1), progress, "attribute accuracy")
    source = A.predict_items(items, {i.id: _image_loader(Path(first[i.id]["inputs"]["image"]))
                                     for i in items}, classifier, which="source", bar=bar)
    for row in rows:
        scored = [i for i in items if i.id in row.results]
        if not scored:
            continue
        edited = A.predict_items(scored, {i.id: _image_loader(row.results[i.id])
                                          for i in scored}, classifier, bar=bar)
        result = A.attribute_accuracy(scored, edited, source, specs)
        shares = {"aa": result.aa, "aa_others": result.others_unchanged,
                  "aa_ceiling": result.ceiling}
        for metric in wanted:
            if shares[metric].total:
                row.values[metric] = shares[metric].value
                row.counts[metric] = shares[metric].total
        for item_id, info in result.per_item.items():
            values = row.per_item.setdefault(item_id, {})
            if "aa" in wanted:
                values["aa"] = float(info["present"])
            if "aa_others" in wanted and info["others_unchanged"] is not None:
                values["aa_others"] = float(info["others_unchanged"])
        row.attributes = {k: v for k, v in result.as_dict().items() if k != "per_item"}
    bar.close()
    for metric in wanted:
        if not any(metric in row.values for row in rows) and metric not in errors:
            skipped[metric] = "no attribute edit has other annotated attributes" \
                if metric == "aa_others" else "no attribute edit could be scored"


def _image_loader(path: Path):
    return lambda: _u8(_load_rgb(path))[0]


def _bar(total: int, enabled: bool, desc: str = "eval", unit: str = "image"):
    import os

    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit,
                disable=not enabled or os.environ.get("XMGIE_NO_PROGRESS") == "1")


def print_result(result: EvalResult, file=None) -> None:
    file = file or sys.stdout
    from .report import format_value

    print(f"Evaluated {len(result.items)} item(s) x {len(result.rows)} row(s).", file=file)
    header = ["variant"] + [M.LABELS.get(m, m) for m in result.metrics]
    print("  " + " | ".join(header), file=file)
    for row in result.rows:
        print("  " + " | ".join([row.name] + [format_value(row.values.get(m))
                                             for m in result.metrics]), file=file)
    for metric, why in result.errors.items():
        first = why.strip().splitlines()[0] if why.strip() else "failed"
        print(f"error: {M.LABELS.get(metric, metric)} not computed: {first}", file=sys.stderr)
    if result.errors:
        shown = set()
        for why in result.errors.values():
            if why not in shown and "\n" in why:
                shown.add(why)
                print(why, file=sys.stderr)
    for metric, why in result.skipped.items():
        print(f"note: {M.LABELS.get(metric, metric)} skipped: {why}", file=file)
    for note in result.notes[:20]:
        print(f"note: {note}", file=file)
    print(f"Wrote {len(result.files)} file(s) under {result.out_dir} "
          f"(report: {result.out_dir / 'report.md'}).", file=file)
