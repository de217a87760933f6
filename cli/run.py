"""The ``xmgie check`` and ``xmgie run`` commands: one workflow, validated and run once.

Under ``--tiny`` the run is made small, because the tiny models only prove the install
and the graph: every image LoadImage/LoadImageMask load is scaled by ONE factor, chosen
so the largest of them has its longer side at most 128 px (sizes are compared on the
files as given: images of different sizes stay different), and step-like counts are
capped (``TINY_CAPS``); ``--set`` values are applied after these caps and win.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..runner import core_nodes, engine, workflow_ui

# Under --tiny: the longest side of loaded images, and caps on inputs that only cost time
# (applied to literal values in the workflow, before --set).
TINY_MAX_SIDE = 128
TINY_CAPS = {"steps": 10, "inner_steps": 2, "iterations": 2, "max_new_tokens": 8}


class UsageError(engine.WorkflowFileError):
    """Bad command-line usage found after parsing (e.g. a --set naming no input)."""


def run_context(args: argparse.Namespace) -> core_nodes.RunContext:
    """The folders of this run (and the image size limit under --tiny)."""
    import torch

    return core_nodes.RunContext(
        input_dirs=list(args.input_dir or [Path("input")]),
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
    """Convert, override and validate; returns (API prompt, extra_pnginfo). Under
    --tiny, also fixes the run's one image scale (needs the run context installed)."""
    prompt = workflow_ui.to_api(data, registry)
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
    if args.tiny:
        core_nodes.plan_scale(prompt)
    # ComfyUI embeds the UI workflow in saved PNGs; an API file has none to embed.
    extra_pnginfo = {"workflow": data} if workflow_ui.is_ui_format(data) else {}
    return prompt, extra_pnginfo


def cmd_check(args: argparse.Namespace, data: dict, registry: dict[str, type]) -> int:
    prompt, _ = prepare(args, data, registry)
    print(f"OK: {len(prompt)} nodes")
    return 0


def cmd_run(args: argparse.Namespace, data: dict, registry: dict[str, type]) -> int:
    prompt, extra_pnginfo = prepare(args, data, registry)
    start = time.perf_counter()

    def report(t: engine.NodeTiming) -> None:
        print(f"[{t.node_id}] {t.class_type}: {t.seconds:.2f} s", flush=True)

    try:
        result = engine.execute(prompt, registry, on_node=report, extra_pnginfo=extra_pnginfo)
    except engine.WorkflowError as exc:
        scaled = core_nodes.context().scaling_note()
        if scaled and exc.node_id is not None:  # sizes as given, not as --tiny made them
            exc.errors[-1] += f" ({scaled})"
        raise
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
    return 0
