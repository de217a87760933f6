"""The library's layering: mgie_core is the editing library and nothing else.

* no module of mgie_core imports ComfyUI, the pack's node glue or the graph engine;
* no import runs from a lower layer back up (the model layer never imports the
  sampler, the controls or the plan).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "mgie_core"

# Lower layers first; a module may import its own layer or any layer below.
LAYERS = [
    {"errors", "random_state", "paths", "host", "grad_mode", "memory", "report", "atomic"},
    {"models", "configs", "images", "tokens", "tolerant_json", "architecture", "losses"},
    {"diffusion", "vae", "attention", "attention_hooks", "blur", "graphs"},
    {"inversion", "masks", "plan", "plan_rules", "plan_answer"},
    {"control", "guidance", "pfb"},
    {"sampler", "mag", "astar", "identity_guidance", "graph_calls", "trainable", "trained",
     "layered", "mmig"},
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


# --- the pack's top-level packages --------------------------------------------------------

PACKAGES = ("cli", "runner", "evaluation", "training", "nodes", "mgie_core")
# Who may not import whom, at module level or inside a function: the command line is the
# one layer that meets both the runner and the node pack.
NEVER = {"runner": {"cli", "nodes", "training"}, "evaluation": {"cli", "nodes", "training"},
         "training": {"cli", "nodes"},
         "mgie_core": {"cli", "nodes", "runner", "evaluation", "training"}}


def _package_imports(path: Path, where: Path | None = None) -> list[tuple[str, int]]:
    """(top-level package of the pack, line) for every import in a module of the pack,
    module level and function level alike, relative imports resolved from the module's
    place ``where`` (default: its path under ROOT); ``xmgie.<package>`` imports count."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parts = (where or path.relative_to(ROOT)).with_suffix("").parts
    package = list(parts[:-1])          # the package holding the module
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
            if node.level - 1 > len(package):
                continue
            target = base + (node.module.split(".") if node.module else [])
            names = [".".join(target)] if target else [a.name for a in node.names]
            if not target:   # "from .. import x" at the root: x is the package
                out += [(a.name, node.lineno) for a in node.names if a.name in PACKAGES]
                continue
        else:
            continue
        for name in names:
            first = name.split(".")
            if first[0] == "xmgie":
                first = first[1:]
            if first and first[0] in PACKAGES:
                out.append((first[0], node.lineno))
    return out


def _package_modules(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "configs" not in p.parts)


def _package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {p: set() for p in PACKAGES}
    for package in PACKAGES:
        for path in _package_modules(package):
            graph[package] |= {name for name, _ in _package_imports(path) if name != package}
    return graph


def test_the_import_graph_of_the_packages_is_read():
    # The reader sees the imports this test relies on, so the tests below can fail.
    graph = _package_graph()
    assert {"runner", "nodes", "mgie_core"} <= graph["cli"], graph["cli"]
    assert "mgie_core" in graph["runner"] and "runner" in graph["evaluation"]
    sample = ROOT / "cli" / "host.py"
    assert "nodes" in {n for n, _ in _package_imports(sample)}  # a function-level import


@pytest.mark.parametrize("package", sorted(NEVER))
def test_lower_packages_never_import_the_command_line_or_the_nodes(package):
    bad = [f"{path.relative_to(ROOT)}:{line} imports {name}"
           for path in _package_modules(package)
           for name, line in _package_imports(path) if name in NEVER[package]]
    assert not bad, bad


def test_no_import_cycle_among_the_packages():
    graph = _package_graph()
    cycles = []

    def visit(node, trail):
        for nxt in sorted(graph[node]):
            if nxt in trail:
                cycles.append(" -> ".join(trail[trail.index(nxt):] + [nxt]))
            elif len(trail) < len(PACKAGES):
                visit(nxt, trail + [nxt])

    for start in PACKAGES:
        visit(start, [start])
    assert not cycles, sorted(set(cycles))


def test_function_level_and_relative_imports_are_seen(tmp_path):
    # The reader on a module placed (logically) in runner/: the imports inside a
    # function, relative and absolute, come out under the names the tests check.
    probe = tmp_path / "probe.py"
    probe.write_text("import json\n\n\ndef f():\n    from ..nodes import NODE_CLASS_MAPPINGS\n"
                     "    from .. import cli\n    import xmgie.evaluation.evaluate\n"
                     "    from . import engine\n")
    found = _package_imports(probe, Path("runner") / "probe.py")
    assert found == [("nodes", 5), ("cli", 6), ("evaluation", 7), ("runner", 8)]
