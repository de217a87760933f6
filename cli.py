"""``xmgie``: run or check a ComfyUI workflow without ComfyUI.

    xmgie check WORKFLOW.json [--tiny] [--set NODE_ID.INPUT=VALUE ...]
    xmgie run WORKFLOW.json [--tiny] [--set ...] [--output-dir DIR] [--input-dir DIR ...]
                            [--models-dir DIR ...] [--device cpu|cuda|...] [--offload]
    xmgie batch WORKFLOW.json --dataset D [--out RUN] [--map ...] [--ray [ADDRESS]] ...
    xmgie eval RUN [--reference DATASET] [--variants V.json] ...
    xmgie workflow ui API.json -o UI.json [--layout LAYOUT.json]
    xmgie workflow api UI.json -o API.json
    xmgie workflow sync [FOLDER] [--check]

``workflow`` converts between the API form and the UI format ComfyUI's Templates and
drag-and-drop open (see runner/workflow_ui.py); ``sync`` regenerates the shipped
``workflows/<name>.json`` from ``workflows/api/<name>_api.json`` and
``<name>.layout.json`` (and rewrites the API twin from the result).

Under ``--tiny`` the run is made small, because the tiny models only prove the install
and the graph: images loaded by LoadImage/LoadImageMask are downscaled so the longer
side is at most 128 px, and step-like counts are capped (``TINY_CAPS``); ``--set``
values are applied after these caps and win.

(batch and eval: see runner/batch_cli.py, with their own exit statuses).

The registry is the pack's nodes plus standalone stand-ins for the ComfyUI core nodes
the shipped workflows use (runner/core_nodes.py: LoadImage, LoadImageMask, SaveImage,
PreviewImage, CheckpointLoaderSimple, VAEDecode, VAEEncode, PreviewAny; LoraLoader is
known and refused).

Exit status: 0 success; 1 invalid workflow or a node failed; 2 the workflow file is
missing or not JSON, or bad command-line usage (including a bad --set); 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from .mgie_core import host, images, memory, paths
from .runner import engine
from .mgie_core.errors import XMGIEError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

TINY_NOTE = ("note: --tiny uses random-weight tiny models: it proves the install and the "
             "graph, and the image it produces is meaningless.")
# Under --tiny: the longest side of loaded images, and caps on inputs that only cost time
# (applied to literal values in the workflow, before --set).
TINY_MAX_SIDE = 128
TINY_CAPS = {"steps": 10, "inner_steps": 2, "iterations": 2, "max_new_tokens": 8}


class UsageError(engine.WorkflowFileError):
    """Bad command-line usage found after parsing (e.g. a --set naming no input)."""


def _pixels(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of pixels") from None
    if value < 1:
        raise argparse.ArgumentTypeError("expected at least 1 pixel")
    return value


def build_parser() -> argparse.ArgumentParser:
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
                        help="folder of input images (repeatable; default ./input); the "
                             "workflow's folder and its inputs/ sub-folder are searched after")
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
    run = commands.add_parser("run", parents=[common], help="run a workflow",
                              description="Validate, then run the nodes the outputs need.")
    run.add_argument("--output-dir", type=Path, default=Path("output"), metavar="DIR",
                     help="where SaveImage/PreviewImage write (default ./output)")
    run.add_argument("--device", default=None,
                     help="torch device for the models, e.g. cpu, cuda, cuda:1, mps "
                          "(default: the best available)")
    run.add_argument("--offload", action="store_true",
                     help="keep models on the CPU and move each to the device only while "
                          "a node uses it (least GPU memory, slower; also XMGIE_OFFLOAD=1)")
    from .runner import batch_cli  # xmgie batch / xmgie eval

    batch_cli.add_parsers(commands)

    wf = commands.add_parser(
        "workflow", help="convert workflows between API and UI format; regenerate the "
        "shipped ones", description="Write UI-format workflows (what ComfyUI's Templates "
        "and drag-and-drop open) from the API form and back.")
    wf_commands = wf.add_subparsers(dest="workflow_command", required=True, metavar="ACTION")
    ui = wf_commands.add_parser("ui", help="API (or UI) file -> UI file laid out by stage")
    ui.add_argument("source", type=Path, help="workflow JSON (API or UI format)")
    ui.add_argument("-o", "--output", type=Path, required=True, help="UI file to write")
    ui.add_argument("--layout", type=Path, default=None,
                    help="stages and note (see runner/workflow_ui.py); default: one stage "
                         "per dependency depth, no note")
    api = wf_commands.add_parser("api", help="UI (or API) file -> API file")
    api.add_argument("source", type=Path, help="workflow JSON (UI or API format)")
    api.add_argument("-o", "--output", type=Path, required=True, help="API file to write")
    sync = wf_commands.add_parser(
        "sync", help="regenerate FOLDER/<name>.json and FOLDER/api/<name>_api.json from "
        "FOLDER/api/<name>_api.json + <name>.layout.json")
    sync.add_argument("folder", type=Path, nargs="?", default=None,
                      help="workflows folder (default: the package's workflows/)")
    sync.add_argument("--check", action="store_true",
                      help="write nothing; exit 1 if a file is out of date")
    return parser


def build_registry() -> dict[str, type]:
    """The pack's nodes, plus core stand-ins for the ids the pack does not define."""
    # Imported here, not at module level, so `xmgie.cli` imports even when a node
    # module is broken (the error then comes out as a message, not a traceback).
    from .nodes import NODE_CLASS_MAPPINGS
    from .runner.core_nodes import STANDINS

    return {**STANDINS, **NODE_CLASS_MAPPINGS}


def configure_models(args: argparse.Namespace) -> None:
    """Device, model folders and tiny mode; before validation, because model dropdown
    lists depend on them."""
    if getattr(args, "device", None):
        os.environ["XMGIE_DEVICE"] = args.device  # read by mgie_core.host
    if hasattr(args, "offload"):  # run only; XMGIE_OFFLOAD=1 does the same
        memory.set_offload_after_use(args.offload or os.environ.get("XMGIE_OFFLOAD") == "1")
    if args.models_dir:
        paths.configure(models_dir=args.models_dir)
    if getattr(args, "max_image_pixels", None):
        images.set_max_pixels(args.max_image_pixels)
    if args.tiny:
        from .mgie_core import tiny

        print(TINY_NOTE, file=sys.stderr)
        paths.configure(tiny_root=tiny.ensure_tiny_models())


def run_context(args: argparse.Namespace):
    import torch

    from .runner.core_nodes import RunContext

    return RunContext(input_dirs=list(args.input_dir or [Path("input")]),
                      output_dir=getattr(args, "output_dir", Path("output")),
                      workflow_dir=args.workflow.resolve().parent,
                      max_side=TINY_MAX_SIDE if args.tiny else None,
                      text_encoder_dtype=(torch.float32 if getattr(args, "fp32_text_enc", False)
                                          else torch.float16))


def tiny_caps(prompt: dict) -> tuple[dict, list[str]]:
    """``prompt`` with the literal values of ``TINY_CAPS`` inputs capped, and one line
    per change (node, input, old -> new)."""
    out, changes = {}, []
    for node_id in sorted(prompt, key=engine._id_key):
        node = prompt[node_id]
        inputs = dict(node.get("inputs") or {})
        for name, cap in TINY_CAPS.items():
            value = inputs.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value > cap:
                inputs[name] = cap
                changes.append(f"{node_id}.{name} {value} -> {cap}")
        out[node_id] = {**node, "inputs": inputs}
    return out, changes


def prepare(args: argparse.Namespace, data: dict,
            registry: dict[str, type]) -> tuple[dict, dict]:
    """Convert, override and validate; returns (API prompt, extra_pnginfo)."""
    prompt = engine.to_api(data, registry)
    if args.tiny:
        prompt, changes = tiny_caps(prompt)
        print(f"note: --tiny runs small: images downscaled to at most {TINY_MAX_SIDE} px"
              + (f", {', '.join(changes)}" if changes else "") + " (--set overrides).",
              file=sys.stderr)
    try:
        prompt = engine.apply_overrides(prompt, args.overrides, registry)
    except engine.WorkflowError as exc:  # a bad --set is a usage error, like argparse's
        raise UsageError(exc.errors) from exc
    prompt = engine.check_runnable(prompt, registry)   # node problems and no output node
    # ComfyUI embeds the UI workflow in saved PNGs; an API file has none to embed.
    extra_pnginfo = {"workflow": data} if engine.is_ui_format(data) else {}
    return prompt, extra_pnginfo


def cmd_check(args: argparse.Namespace, data: dict, registry: dict[str, type]) -> int:
    prompt, _ = prepare(args, data, registry)
    print(f"OK: {len(prompt)} nodes")
    return EXIT_OK


def cmd_run(args: argparse.Namespace, data: dict, registry: dict[str, type]) -> int:
    from .runner import core_nodes

    prompt, extra_pnginfo = prepare(args, data, registry)
    start = time.perf_counter()

    def report(t: engine.NodeTiming) -> None:
        print(f"[{t.node_id}] {t.class_type}: {t.seconds:.2f} s", flush=True)

    result = engine.execute(prompt, registry, on_node=report, extra_pnginfo=extra_pnginfo)
    # Text that output nodes show in ComfyUI (captions, scores) is printed here.
    for node_id, ui in result.ui.items():
        for line in ui.get("text", []) if isinstance(ui, dict) else []:
            print(f"[{node_id}] {line}")
    written = core_nodes.context().written
    print(f"Done in {time.perf_counter() - start:.2f} s.")
    if written:
        print(f"Wrote {len(written)} file(s):")
        for path in written:
            print(f"  {path}")
    else:
        print("No files written (the workflow has no SaveImage/PreviewImage node).")
    return EXIT_OK


def _print_errors(exc: engine.WorkflowError) -> None:
    if len(exc.errors) == 1:
        print(f"error: {exc.errors[0]}", file=sys.stderr)
        return
    print(f"error: {len(exc.errors)} problems in the workflow:", file=sys.stderr)
    for message in exc.errors:
        print(f"  - {message}", file=sys.stderr)


def _write(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise engine.WorkflowFileError(f"cannot write {path}: {exc}") from exc


def cmd_workflow(args: argparse.Namespace, registry: dict[str, type]) -> int:
    from .runner import workflow_ui

    if args.workflow_command == "sync":
        folder = args.folder or Path(__file__).resolve().parent / "workflows"
        changed = workflow_ui.sync(folder, registry, check=args.check)
        verb = "out of date" if args.check else "written"
        for path in changed:
            print(f"{verb}: {path}")
        print(f"{len(changed)} file(s) {verb}." if changed else "All workflows up to date.")
        return EXIT_FAILED if args.check and changed else EXIT_OK
    data = engine.load_file(args.source)
    if args.workflow_command == "ui":
        layout = workflow_ui.Layout.load(args.layout) if args.layout else None
        ui = workflow_ui.api_to_ui(data, registry, layout, name=args.output.stem,
                                   source=args.source.name)
        problems = workflow_ui.layout_problems(ui, registry)
        if problems:
            raise engine.WorkflowError(problems)
        _write(args.output, workflow_ui.dumps(ui))
    else:
        _write(args.output, workflow_ui.dumps(workflow_ui.ui_to_api_twin(data, registry)))
    print(f"wrote {args.output}")
    return EXIT_OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        code = int(exc.code or 0)
        words = list(sys.argv[1:] if argv is None else argv)
        if code == 2 and words[:1] == ["batch"]:
            from .runner.batch import EXIT_SETUP  # batch's 2 means "2 items failed"

            return EXIT_SETUP
        return code
    if args.command in ("batch", "eval"):
        from .runner import batch_cli

        return batch_cli.main(args)
    if args.command == "workflow":
        return _main_workflow(args)
    command = {"check": cmd_check, "run": cmd_run}[args.command]
    try:
        data = engine.load_file(args.workflow)  # first: a bad path fails fast
        try:
            registry = build_registry()
        except Exception as exc:
            print(f"error: the xMGIE nodes could not be imported ({type(exc).__name__}: {exc}); "
                  "reinstall the package or fix the module named above.", file=sys.stderr)
            return EXIT_FAILED
        configure_models(args)
        from .runner import core_nodes

        with core_nodes.using_context(run_context(args)):
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


def _main_workflow(args: argparse.Namespace) -> int:
    try:
        try:
            registry = build_registry()
        except Exception as exc:
            print(f"error: the xMGIE nodes could not be imported ({type(exc).__name__}: "
                  f"{exc}); reinstall the package or fix the module named above.",
                  file=sys.stderr)
            return EXIT_FAILED
        return cmd_workflow(args, registry)
    except engine.WorkflowFileError as exc:
        _print_errors(exc)
        return EXIT_USAGE
    except engine.WorkflowError as exc:
        _print_errors(exc)
        return EXIT_FAILED


if __name__ == "__main__":
    raise SystemExit(main())
