"""The ``xmgie workflow`` command: convert workflow files between the API form and the UI
format, and regenerate the shipped ones (see :mod:`xmgie.runner.workflow_ui`)."""

from __future__ import annotations

import argparse
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def add_parser(commands) -> None:
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


def _write(path: Path, text: str) -> None:
    from ..runner import engine

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise engine.WorkflowFileError(f"cannot write {path}: {exc}") from exc


def cmd_workflow(args: argparse.Namespace, registry: dict[str, type]) -> int:
    from ..runner import engine, workflow_ui

    if args.workflow_command == "sync":
        folder = args.folder or PACKAGE_ROOT / "workflows"
        changed = workflow_ui.sync(folder, registry, check=args.check)
        verb = "out of date" if args.check else "written"
        for path in changed:
            print(f"{verb}: {path}")
        print(f"{len(changed)} file(s) {verb}." if changed else "All workflows up to date.")
        return 1 if args.check and changed else 0
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
    return 0
