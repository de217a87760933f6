"""The command line, one layer: ``xmgie`` (also ``python -m xmgie``) runs, checks and
batches ComfyUI workflows without ComfyUI, evaluates batch runs, and converts workflow
files.

    xmgie check WORKFLOW.json [--tiny] [--set NODE_ID.INPUT=VALUE ...]
    xmgie run WORKFLOW.json [--tiny] [--set ...] [--output-dir DIR] [--input-dir DIR ...]
                            [--models-dir DIR ...] [--device cpu|cuda|...] [--offload]
    xmgie batch WORKFLOW.json --dataset D [--out RUN] [--map ...] [--ray [ADDRESS]] ...
    xmgie eval RUN [--reference DATASET] [--variants V.json] ...
    xmgie table1 RUN ... [--out DIR]        xmgie table2 RUN ... [--out DIR]
    xmgie workflow ui API.json -o UI.json [--layout LAYOUT.json]
    xmgie workflow api UI.json -o API.json
    xmgie workflow sync [FOLDER] [--check]
    xmgie train CONFIG.yaml [--out DIR] [--max-steps N] [--resume] [--tiny] [--dataset D]

One module per command family: :mod:`.run` (check, run), :mod:`.batch` (batch, eval),
:mod:`.workflow` (workflow), :mod:`.train` (train), :mod:`.tables` (table1, table2);
:mod:`.host` builds the node registry (the pack's nodes plus the runner's stand-ins for
the ComfyUI core nodes) and applies the model options.
This package is the only place that imports both the runner and the node pack: the
runner and the evaluation get the registry handed to them.

Images named in a workflow are looked up in the ``--input-dir`` folders (default
``./input``), then the workflow's folder, its ``inputs/`` sub-folder, and the ``inputs/``
folder beside the workflow's folder (so an API twin in ``workflows/api/`` finds the
images in ``workflows/inputs/``).

Exit status of check, run and workflow: 0 success; 1 invalid workflow or a node failed;
2 the workflow file is missing or not JSON, or bad command-line usage (including a bad
--set); 130 interrupted (Ctrl-C; the run stops between two steps and writes no partial
file). batch, eval, train and the tables have their own (see :mod:`.batch`, :mod:`.train`,
:mod:`.tables`).
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from . import batch, tables, train, workflow
from .host import build_registry, configure_models

# Nothing above imports torch, the runner or the nodes: main() imports them inside its
# Ctrl-C handling (torch alone takes seconds to import).
_FROM_RUN = ("prepare", "run_context", "tiny_caps", "TINY_CAPS", "TINY_MAX_SIDE",
             "UsageError")

__all__ = ["main", "build_parser", "build_registry", "configure_models", *_FROM_RUN]


def __getattr__(name: str):
    # check/run's helpers, imported on first use (they import the runner and torch).
    if name in _FROM_RUN:
        return getattr(importlib.import_module(".run", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _pixels(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of pixels") from None
    if value < 1:
        raise argparse.ArgumentTypeError("expected at least 1 pixel")
    return value


def build_parser() -> argparse.ArgumentParser:
    from ..mgie_core import images, paths

    parser = argparse.ArgumentParser(
        prog="xmgie", description="Run or check a ComfyUI workflow (UI or API format) "
        "headlessly with the xMGIE nodes.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("workflow", type=Path, help="workflow JSON file (UI or API format)")
    common.add_argument("--tiny", action="store_true",
                        help="use random-weight tiny models (built on first use) for every "
                             "model: checks the install and the graph quickly")
    common.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="NODE_ID.INPUT=VALUE",
                        help="override an input, e.g. --set 3.seed=42 --set 6.text='a red car' "
                             "(VALUE is parsed as JSON when it can be; repeatable)")
    common.add_argument("--input-dir", action="append", type=Path, default=None, metavar="DIR",
                        help="folder of input images (repeatable; default ./input); then "
                             "the workflow's folder, its inputs/ sub-folder and the inputs/ "
                             "folder beside it are searched")
    common.add_argument("--models-dir", action="append", type=Path, default=None, metavar="DIR",
                        help="models folder holding checkpoints/, diffusers/, mgie/, ... "
                             f"(repeatable; also ${paths.ENV_MODELS_DIR})")
    common.add_argument("--fp32-text-enc", action="store_true",
                        help="Load Checkpoint gives its CLIP in fp32 (ComfyUI's flag of the "
                             "same name; both default to fp16)")
    common.add_argument("--max-image-pixels", type=_pixels, default=None, metavar="N",
                        help="largest image accepted, in pixels (width x height; default "
                             f"{images.DEFAULT_MAX_PIXELS} = 4096x4096; also "
                             f"${images.ENV_MAX_PIXELS}); larger images are refused before "
                             "they are decoded")

    commands.add_parser("check", parents=[common], help="validate a workflow, run nothing",
                        description="Validate every node and link of a workflow; print all "
                                    "problems at once.")
    run_parser = commands.add_parser("run", parents=[common], help="run a workflow",
                              description="Validate, then run the nodes the outputs need.")
    run_parser.add_argument("--output-dir", type=Path, default=Path("output"), metavar="DIR",
                     help="where SaveImage/PreviewImage write (default ./output)")
    run_parser.add_argument("--device", default=None,
                     help="torch device for the models, e.g. cpu, cuda, cuda:1, mps "
                          "(default: the best available)")
    run_parser.add_argument("--offload", action="store_true",
                     help="keep models on the CPU and move each to the device only while "
                          "a node uses it (least GPU memory, slower; also XMGIE_OFFLOAD=1)")
    batch.add_parsers(commands)   # xmgie batch / xmgie eval
    workflow.add_parser(commands)
    train.add_parser(commands)
    tables.add_parsers(commands)
    return parser


def _print_errors(exc) -> None:
    if len(exc.errors) == 1:
        print(f"error: {exc.errors[0]}", file=sys.stderr)
        return
    print(f"error: {len(exc.errors)} problems in the workflow:", file=sys.stderr)
    for message in exc.errors:
        print(f"  - {message}", file=sys.stderr)


def _registry_or_message() -> dict[str, type] | None:
    try:
        return build_registry()
    except Exception as exc:
        print(f"error: the xMGIE nodes could not be imported ({type(exc).__name__}: {exc}); "
              "reinstall the package or fix the module named above.", file=sys.stderr)
        return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; errors become messages and exit statuses. Ctrl-C at any point,
    the imports included, ends with "Interrupted." and status 130. Called as the
    program (``argv`` None), it then ignores Ctrl-C while Python shuts down, so a late
    Ctrl-C cannot turn a finished run into a death by signal."""
    try:
        return _main(argv)
    except KeyboardInterrupt:  # here only when it came outside a command's own handling
        print("Interrupted.", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if argv is None:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        code = int(exc.code or 0)
        words = list(sys.argv[1:] if argv is None else argv)
        if code == 2 and words[:1] == ["batch"]:
            from ..runner.batch import EXIT_SETUP  # batch's 2 means "2 items failed"

            return EXIT_SETUP
        return code
    if args.command in batch.COMMANDS:
        # The registry is looked up here, at call time, and handed down: Ray workers get
        # the function itself and build their own.
        return batch.main(args, build_registry)
    if args.command in train.COMMANDS:
        return train.main(args)
    if args.command in tables.COMMANDS:
        return tables.main(args)
    from ..mgie_core import host
    from ..mgie_core.errors import XMGIEError
    from ..runner import core_nodes, engine
    from . import run

    try:
        if args.command == "workflow":
            registry = _registry_or_message()
            return EXIT_FAILED if registry is None else workflow.cmd_workflow(args, registry)
        command = {"check": run.cmd_check, "run": run.cmd_run}[args.command]
        data = engine.load_file(args.workflow)  # first: a bad path fails fast
        registry = _registry_or_message()
        if registry is None:
            return EXIT_FAILED
        configure_models(args)
        with core_nodes.using_context(run.run_context(args)):
            return command(args, data, registry)
    except engine.WorkflowFileError as exc:
        _print_errors(exc)
        return EXIT_USAGE
    except engine.WorkflowError as exc:
        _print_errors(exc)
        return EXIT_FAILED
    except (KeyboardInterrupt, host.Interrupted):
        print("Interrupted.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except XMGIEError as exc:  # e.g. tiny models could not be built
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
