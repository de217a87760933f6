"""The ``xmgie batch`` and ``xmgie eval`` commands: their options, and the runs they
start with the runner's batch machinery (:mod:`xmgie.runner.batch`) and the evaluation.

    xmgie batch WORKFLOW --dataset D [--out RUN] [--map FIELD=NODE.INPUT ...] [--seed N]
                [--split S] [--limit N] [--variants V.json] [--set ...] [--tiny]
                [--ray [ADDRESS]] [--workers N]
    xmgie eval RUN [--reference DATASET] [--variants V.json] [--metrics a,b,...] [--tiny]
               [--attribute-classifier clip|FOLDER]

Exit status of ``batch``: 0 every item done; 1-100 the number of items that failed (100:
100 or more); 101 the batch could not start (bad workflow, dataset, options or run
folder); 130 interrupted (rerun the same command to resume).
Exit status of ``eval``: 0 every metric computed (or skipped for want of what it needs,
such as attribute accuracy without attribute annotations); 1 some metric could not be
computed (the table is still written with the others), a variant batch could not start,
or the evaluation failed; 2 bad usage; 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from . import host

COMMANDS = ("batch", "eval")
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _model_options(parser: argparse.ArgumentParser, with_set: bool = True) -> None:
    from ..mgie_core import paths

    parser.add_argument("--tiny", action="store_true",
                        help="use random-weight tiny models (built on first use) for every "
                             "model, including the metric networks of eval")
    if with_set:
        parser.add_argument("--set", dest="overrides", action="append", default=[],
                            metavar="NODE_ID.INPUT=VALUE",
                            help="override an input of the workflow for every item "
                                 "(repeatable), e.g. --set 4.steps=25")
    parser.add_argument("--input-dir", action="append", type=Path, default=None, metavar="DIR",
                        help="folder searched for relative image names (repeatable)")
    parser.add_argument("--models-dir", action="append", type=Path, default=None, metavar="DIR",
                        help="models folder (repeatable; also "
                             f"${paths.ENV_MODELS_DIR}); metric networks are looked up in "
                             "its metrics/ and clip_vision/ folders")
    parser.add_argument("--device", default=None,
                        help="torch device, e.g. cpu, cuda, cuda:1 (default: the best one)")


def _scale_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                        help="run the items on Ray workers: alone, a local Ray instance; "
                             "with an ADDRESS (e.g. ray://head:10001), that cluster. Needs "
                             "pip install \"xmgie[scale]\". Write it after the positional "
                             "arguments, or as --ray=ADDRESS")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="with --ray: N workers (default: one per GPU of the cluster; "
                             "on a machine without GPUs N CPU workers)")
    parser.add_argument("--cpus-per-worker", type=int, default=1, metavar="N",
                        help="with --ray: CPU threads per worker (default 1)")


def add_parsers(commands) -> None:
    batch = commands.add_parser(
        "batch", help="run a workflow over a dataset (resumable)",
        description="Map a workflow over a dataset (manifest.jsonl / manifest.json or a "
                    "PIE-Bench mapping_file.json): one output folder and record per item, "
                    "deterministic per-item seeds, resumable, optionally on Ray workers.",
        epilog="Exit status: 0 every item done; 1-100 the number of items that failed (100: "
               "100 or more); 101 the batch could not start; 130 interrupted (rerun the "
               "same command to resume).")
    batch.add_argument("workflow", type=Path, help="workflow JSON file (UI or API format)")
    batch.add_argument("--dataset", required=True, type=Path, metavar="D",
                       help="dataset folder (or its manifest / mapping_file.json)")
    batch.add_argument("--out", type=Path, default=None, metavar="RUN",
                       help="run folder (default output/batch/<workflow name>); rerunning "
                            "with the same folder resumes")
    batch.add_argument("--map", dest="map_options", action="append", default=[],
                       metavar="FIELD=NODE.INPUT[,...]",
                       help="send a dataset field to these inputs instead of the default "
                            "rule (NODE: id, class type or title); FIELD= keeps the "
                            "workflow's value (repeatable)")
    batch.add_argument("--seed", type=int, default=0,
                       help="base seed; each item's seed is derived from it and the item id "
                            "(with --limit on a published dataset, it also draws the sample)")
    batch.add_argument("--split", default=None, metavar="S",
                       help="for a dataset in its published layout (CUB-200-2011, "
                            "Oxford-102 ...): the split to run, e.g. train, test (default all)")
    batch.add_argument("--variants", type=Path, default=None, metavar="V.json",
                       help="run these named variants of the workflow (see README, Ablations)")
    batch.add_argument("--limit", type=int, default=None, metavar="N",
                       help="run at most N items not done yet (per variant); a dataset in "
                            "its published layout first draws N items from --seed")
    _model_options(batch)
    _scale_options(batch)

    ev = commands.add_parser(
        "eval", help="metrics, ablation table and pictures of a batch run",
        description="Compute PSNR, SSIM, LPIPS, MSE, FID, IS, CLIP score, background "
                    "preservation, IPS and, for items with attribute annotations, attribute "
                    "accuracy for a run folder (and its variants); write a table (CSV, "
                    "JSON, Markdown) and pictures.",
        epilog="Exit status: 0 every metric computed (or skipped for want of what it "
               "needs, e.g. AA without attribute annotations); 1 some metric could not be "
               "computed "
               "(the others are still written) or the evaluation failed; 2 bad usage.")
    ev.add_argument("run_dir", type=Path, metavar="RUN", help="run folder of xmgie batch")
    ev.add_argument("--reference", type=Path, default=None, metavar="DATASET",
                    help="dataset of reference images: paired metrics compare each result "
                         "with the reference item of the same id, FID with the whole set "
                         "(default: the run's source photos)")
    ev.add_argument("--variants", type=Path, default=None, metavar="V.json",
                    help="first run these variants of the run's workflow over the same "
                         "dataset and seeds, then evaluate them all")
    ev.add_argument("--metrics", default=None,
                    help="comma-separated metrics to compute (default: all; see README)")
    ev.add_argument("--lpips-net", default="alex", choices=("alex", "vgg", "squeeze"),
                    help="LPIPS backbone (default alex; PIE-Bench reports squeeze)")
    ev.add_argument("--fid-feature", type=int, default=2048, choices=(64, 192, 768, 2048),
                    help="Inception layer for FID (default 2048)")
    ev.add_argument("--clip-model", default=None, metavar="NAME",
                    help="whole CLIP model folder for CLIP score (default "
                         "clip-vit-large-patch14 in models/clip_vision)")
    ev.add_argument("--ips-encoder", default=None, metavar="KIND:NAME",
                    help="identity encoder for IPS: clip_vision:NAME or "
                         "face_recognition:NAME (default clip_vision:clip-vit-large-patch14)")
    ev.add_argument("--attribute-classifier", default="clip", metavar="clip|FOLDER",
                    help="classifier for attribute accuracy: clip (default: CLIP zero-shot "
                         "on the --clip-model folder, one prompt template per attribute) or "
                         "a Hugging Face image-classification folder whose labels are the "
                         "attribute values")
    ev.add_argument("--image-node", default=None, metavar="NODE_ID",
                    help="the node whose saved image is the result (default: the first "
                         "SaveImage node's first file)")
    ev.add_argument("--out", type=Path, default=None, metavar="DIR",
                    help="where to write the table and pictures (default RUN/eval)")
    ev.add_argument("--no-pictures", action="store_true", help="skip the image grids and charts")
    _model_options(ev, with_set=False)
    _scale_options(ev)


def _configure(args) -> None:
    """Model folders, tiny mode and device from this command's options only."""
    host.configure_models(args, reset=True)


def _executor(args, registry_factory: Callable[[], dict]):
    if not args.ray:
        return None
    from ..mgie_core import paths
    from ..runner.scale import RayExecutor

    config = {"models_dirs": [str(p.resolve()) for p in args.models_dir or []],
              "tiny_root": str(paths.tiny_root()) if paths.tiny_root() else None,
              "device": args.device}
    executor = RayExecutor(address=args.ray, workers=args.workers,
                           cpus_per_worker=args.cpus_per_worker, process_config=config,
                           registry_factory=registry_factory)
    print(f"Ray: {executor.describe()}.", file=sys.stderr)
    return executor


def run_variant_batches(workflow: Path, base_data: dict, variants, run_dir: Path, dataset,
                        args, registry_factory: Callable[[], dict], *, mapping=None,
                        extra_pnginfo=None, overrides=(), seed=0, map_options=()):
    """Run each variant (or the workflow itself when ``variants`` is None) into its run
    folder, with one Session (or one set of Ray workers) for all of them, so models load
    once. A variant that changes nothing runs into ``run_dir`` itself (the base run).
    ``registry_factory`` gives the node registry, here and in each Ray worker."""
    from ..runner.batch import (
        Session,
        Summary,
        prepare_settings,
        print_summary,
        run_batch,
        variant_dir,
        write_variants_file,
    )

    registry = registry_factory()

    plan = []
    for variant in variants or [None]:
        settings = prepare_settings(
            workflow, base_data, registry, dataset, overrides=overrides,
            map_options=map_options, seed=seed,
            variant=variant if variant is not None and not variant.is_base else None,
            tiny=args.tiny, models_dirs=args.models_dir or [], input_dirs=args.input_dir or [],
            device=args.device, mapping=mapping, extra_pnginfo=extra_pnginfo)
        plan.append((variant, settings))
    if variants:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        write_variants_file(run_dir, variants)
    total = Summary(run_dir=Path(run_dir))
    executor = _executor(args, registry_factory)
    session = None if executor is not None else Session(registry)
    try:
        for variant, settings in plan:
            folder = variant_dir(run_dir, variant) if variant is not None else Path(run_dir)
            label = f"variant {variant.name}" if variant is not None else "batch"
            summary = run_batch(settings, folder, dataset, session=session, executor=executor,
                                desc=label, limit=getattr(args, "limit", None))
            print_summary(summary, label=label[0].upper() + label[1:])
            total.add(summary)
    finally:
        if executor is not None:
            executor.close()
    return total


def cmd_batch(args, registry_factory: Callable[[], dict]) -> int:
    from ..runner import engine
    from ..runner.dataset import load_dataset
    from ..runner.variants import load_variants

    data = engine.load_file(args.workflow)
    dataset = load_dataset(args.dataset, split=args.split, limit=args.limit, seed=args.seed)
    variants = load_variants(args.variants) if args.variants else None
    _configure(args)
    run_dir = args.out or Path("output") / "batch" / args.workflow.stem
    summary = run_variant_batches(args.workflow, data, variants, run_dir, dataset, args,
                                  registry_factory, overrides=args.overrides, seed=args.seed,
                                  map_options=args.map_options)
    return summary.exit_code


def cmd_eval(args, registry_factory: Callable[[], dict]) -> int:
    from ..evaluation import evaluate
    from ..runner.batch import BATCH_FILE, BatchSettings, read_variants_file
    from ..runner.dataset import load_dataset
    from ..runner.variants import load_variants

    run_dir = args.run_dir
    batch_file = run_dir / BATCH_FILE
    if not batch_file.exists():
        print(f"error: {run_dir} is not a run folder of xmgie batch (no {BATCH_FILE}); "
              "run xmgie batch --out RUN first", file=sys.stderr)
        return EXIT_USAGE
    _configure(args)
    if args.variants:
        base = BatchSettings.from_json(json.loads(batch_file.read_text(encoding="utf-8")))
        if base.variant is not None:
            print(f"error: {run_dir} is itself a variant's run; pass the top run folder",
                  file=sys.stderr)
            return EXIT_USAGE
        if bool(base.tiny) != bool(args.tiny):
            print(f"error: {run_dir} was made {'with' if base.tiny else 'without'} --tiny; "
                  f"run eval --variants {'with' if base.tiny else 'without'} it too, so the "
                  "variants use the same models", file=sys.stderr)
            return EXIT_USAGE
        variants = load_variants(args.variants)
        dataset = load_dataset(base.dataset, **(base.dataset_selection or {}))
        if not args.input_dir and base.input_dirs:
            args.input_dir = [Path(p) for p in base.input_dirs]
        summary = run_variant_batches(Path(base.workflow), base.prompt, variants, run_dir,
                                      dataset, args, registry_factory, mapping=base.mapping,
                                      extra_pnginfo=base.extra_pnginfo,
                                      overrides=base.overrides, seed=base.seed)
        if summary.failed:
            print(f"warning: {len(summary.failed)} variant item(s) failed; they are left "
                  "out of the table", file=sys.stderr)
    runs = read_variants_file(run_dir) or None
    options = evaluate.EvalOptions.from_args(args)
    if args.tiny:
        _tiny_metric_networks(options)
    result = evaluate.evaluate_runs(run_dir, runs, options)
    evaluate.print_result(result)
    return EXIT_OK if not result.errors else EXIT_FAILED


def _tiny_metric_networks(options) -> None:
    """--tiny: random-weight metric networks in the tiny folder, for those requested."""
    from ..evaluation import evaluate, networks, tiny
    from ..mgie_core import paths

    keys = set()
    for metric in options.metrics:
        needs = evaluate.NETWORK_OF.get(metric)
        if needs == "lpips":
            keys.add(networks.LPIPS_FAMILIES[options.lpips_net].key)
        elif needs == "inception":
            keys.add(networks.FID_INCEPTION.key)
        elif needs == "clip" or (needs == "attributes"
                                 and options.attribute_classifier == evaluate.CLIP):
            keys.add(networks.CLIP_SCORE.key)
    if keys and paths.tiny_root() is not None:
        tiny.ensure(paths.tiny_root(), sorted(keys))


def main(args, registry_factory: Callable[[], dict]) -> int:
    """Run ``batch`` or ``eval``; errors become messages and exit codes.
    ``registry_factory`` gives the node registry (called only when a batch runs)."""
    from ..mgie_core import host
    from ..mgie_core.errors import XMGIEError
    from ..runner import engine
    from ..runner.batch import EXIT_SETUP

    setup_code = EXIT_SETUP if args.command == "batch" else EXIT_FAILED
    try:
        return {"batch": cmd_batch, "eval": cmd_eval}[args.command](args, registry_factory)
    except (KeyboardInterrupt, host.Interrupted):
        print("Interrupted; rerun the same command to resume (finished items are kept).",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except engine.WorkflowError as exc:
        if len(exc.errors) > 1:
            print(f"error: {len(exc.errors)} problems in the workflow:", file=sys.stderr)
            for message in exc.errors:
                print(f"  - {message}", file=sys.stderr)
        else:
            print(f"error: {exc}", file=sys.stderr)
        return setup_code
    except XMGIEError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return setup_code if args.command == "batch" else EXIT_FAILED
