"""The library's layering: mgie_core is the editing library and nothing else.

* no module of mgie_core imports ComfyUI, the pack's node glue or the graph engine;
* no import runs from a lower layer back up (the model layer never imports the
  sampler, the controls or the plan).
"""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "mgie_core"

# Lower layers first; a module may import its own layer or any layer below.
LAYERS = [
    {"errors", "paths", "host", "grad_mode", "memory", "report"},
    {"models", "configs", "images", "tokens", "tolerant_json", "architecture"},
    {"diffusion", "vae", "attention", "attention_hooks", "blur"},
    {"inversion", "masks", "plan", "plan_rules", "plan_answer"},
    {"control", "guidance", "pfb"},
    {"sampler", "mag", "astar", "identity_guidance"},
    {"tiny"},
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}


def _core_imports(path: Path) -> list[tuple[str, int]]:
    """(imported top-level name, line) for every import in a module of mgie_core, with
    relative imports resolved to the mgie_core module they name."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    rel = path.relative_to(CORE).with_suffix("").parts
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                out.append((node.module or "", node.lineno))
                continue
            base = list(rel[:-1])   # the package holding the module (or the __init__)
            base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
            if node.level - 1 > len(rel) - 1:
                out.append(("<above mgie_core>." + (node.module or ""), node.lineno))
                continue
            target = base + (node.module.split(".") if node.module else [])
            if not target:  # "from . import x" at the root of mgie_core
                out += [("mgie_core." + a.name, node.lineno) for a in node.names]
            else:
                out.append(("mgie_core." + ".".join(target), node.lineno))
    return out


def _modules():
    return sorted(p for p in CORE.rglob("*.py") if "configs" not in p.parts)


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_core_never_imports_host_or_glue(path):
    bad = [(m, line) for m, line in _core_imports(path)
           if m.split(".")[0] in {"comfy", "folder_paths", "execution", "server", "nodes",
                                  "comfy_execution", "runner", "cli"}
           or m.startswith("<above mgie_core>")]
    assert not bad, f"{path.name} imports the host, the node glue or the graph engine: {bad}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_import_runs_back_up(path):
    rel = path.relative_to(CORE).parts
    own = rel[0].removesuffix(".py")
    if own == "__init__":
        return
    mine = LAYER_OF.get(own)
    assert mine is not None, f"mgie_core/{rel[0]} is in no layer: add it to LAYERS"
    for m, line in _core_imports(path):
        if not m.startswith("mgie_core."):
            continue
        top = m.split(".")[1]
        theirs = LAYER_OF.get(top)
        if theirs is None or top == own:
            continue
        assert theirs <= mine, (f"{'/'.join(rel)}:{line} imports mgie_core.{top} "
                                f"(layer {theirs}) from layer {mine}: imports must run down")


def test_model_layer_never_imports_the_sampler():
    for path in (CORE / "models").rglob("*.py"):
        for m, line in _core_imports(path):
            assert not m.startswith(("mgie_core.sampler", "mgie_core.plan", "mgie_core.mag",
                                     "mgie_core.astar", "mgie_core.pfb")), (path, line, m)


def test_the_runners_core_nodes_still_import_from_their_old_place_with_a_warning():
    import importlib
    import sys

    sys.modules.pop("xmgie.nodes.core_standins", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = importlib.import_module("xmgie.nodes.core_standins")
    from xmgie.runner import core_nodes

    assert old.STANDINS is core_nodes.STANDINS and old.RunContext is core_nodes.RunContext
    assert any(issubclass(w.category, DeprecationWarning) and "runner.core_nodes"
               in str(w.message) for w in caught)
