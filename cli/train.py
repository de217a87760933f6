"""The ``xmgie train`` command: a training config run by :mod:`xmgie.training.engine`.

    xmgie train CONFIG.yaml [--out DIR] [--max-steps N] [--resume] [--tiny] [--dataset D]
                [--models-dir DIR ...]

CONFIG is a YAML file or a shipped config's short name (``xmgie``, ``mgie``,
``mmig_stage1`` ... ``mmig_stage5``). The same command runs as one process, or under
``accelerate launch --multi_gpu --num_processes N -m xmgie train ...`` (or an FSDP /
DeepSpeed ``accelerate config``) on several GPUs or machines. On a machine without a GPU
that launch starts N CPU processes (gloo); accelerate's ``--cpu`` launcher itself starts
one process unless it runs ``mpirun``.

Exit status: 0 trained (or stopped early); 1 the training failed (bad dataset, a model
that could not load, a non-finite loss); 2 bad usage or a bad config; 130 interrupted
(a checkpoint was written where one process could; rerun with ``--resume``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

COMMANDS = ("train",)
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("expected at least 1")
    return value


def add_parser(commands) -> None:
    p = commands.add_parser(
        "train", help="train xMGIE's modules, MGIE's parts or MMIG's stages on paired edits",
        description="Train what a config names (xMGIE: PFB weights, identity injection and "
                    "a latent discriminator; MGIE: embeddings, LM head, edit head, UNet; "
                    "MMIG: MM-Adapters, MMSM, the UNet's LoRA, stage by stage) on "
                    "paired edits. Runs as one process, or under `accelerate launch` on "
                    "many.",
        epilog="Exit status: 0 trained; 1 training failed (bad data, models); 2 bad usage or "
               "config; 130 interrupted (rerun with --resume).")
    p.add_argument("config", metavar="CONFIG",
                   help="training config (YAML) or a shipped config's name: xmgie, mgie, "
                        "mmig_stage1 ... mmig_stage5")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="run folder: metrics.jsonl, checkpoint-<step>/, final/, logs/ "
                        "(default output/train/<config name>)")
    p.add_argument("--max-steps", type=_positive, default=None, metavar="N",
                   help="optimiser steps (replaces the config's steps.max)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest checkpoint")
    p.add_argument("--tiny", action="store_true",
                   help="the config's tiny: settings on random-weight tiny models (built on "
                        "first use) and, without --dataset, a synthetic dataset written into "
                        "DIR: tries the whole pipeline in a minute on a CPU")
    p.add_argument("--dataset", type=Path, default=None, metavar="D",
                   help="dataset folder or file (replaces the config's data.path)")
    p.add_argument("--models-dir", action="append", type=Path, default=None, metavar="DIR",
                   help="models folder holding diffusers/, checkpoints/, mgie/, clip_vision/, "
                        "... (repeatable; also $XMGIE_MODELS_DIR), where the config's model "
                        "names are looked up")


def main(args) -> int:
    """Run ``xmgie train``; errors become one-line messages and exit statuses."""
    from ..mgie_core.errors import InputError, XMGIEError
    from ..training.config import TrainConfigError, load_config
    from ..training.engine import check_task_config

    try:
        config = load_config(args.config, tiny=args.tiny)
        check_task_config(config)   # the task's model: and loss: keys
    except XMGIEError as exc:  # missing file, bad YAML, bad key
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    out = args.out if args.out is not None else Path("output") / "train" / config.name
    if args.models_dir:
        from ..mgie_core import paths

        paths.configure(models_dir=args.models_dir)
    from ..training.engine import train

    try:
        result = train(config, out, max_steps=args.max_steps, resume=args.resume,
                       dataset=args.dataset)
    except KeyboardInterrupt:
        print(f"Interrupted; rerun with --resume --out {out} to continue.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except TrainConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except InputError as exc:  # the options themselves (--out, --resume, --max-steps)
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE if exc.input_name.startswith("--") else EXIT_FAILED
    except XMGIEError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if result.final_dir is not None:
        how = "stopped early" if result.stopped_early else "done"
        print(f"{how} after {result.steps} steps: {result.final_dir}", file=sys.stderr)
    return EXIT_OK
