"""The pack as ComfyUI and installers see it: import without ComfyUI, node metadata,
packaging metadata, and the library's independence from ComfyUI."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent


def _load_like_comfyui(module_name: str):
    """Import the repository folder the way ComfyUI loads a custom node package:
    spec_from_file_location on its __init__.py under the folder's own name."""
    spec = importlib.util.spec_from_file_location(
        module_name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def test_import_like_comfyui_without_comfyui(monkeypatch):
    assert importlib.util.find_spec("folder_paths") is None, "ComfyUI must not be installed here"
    # ComfyUI has its own top-level `nodes` module: the pack must never import it.
    impostor = types.ModuleType("nodes")
    impostor.__file__ = "<ComfyUI's nodes.py>"
    monkeypatch.setitem(sys.modules, "nodes", impostor)
    name = "custom_nodes_xMGIE_test"
    try:
        pack = _load_like_comfyui(name)
        assert pack.NODE_CLASS_MAPPINGS and pack.NODE_DISPLAY_NAME_MAPPINGS
        assert set(pack.NODE_CLASS_MAPPINGS) == set(pack.NODE_DISPLAY_NAME_MAPPINGS)
        assert sys.modules["nodes"] is impostor
        assert "folder_paths" not in sys.modules and "comfy" not in sys.modules
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]


def _all_nodes():
    import xmgie

    return sorted(xmgie.NODE_CLASS_MAPPINGS.items())


@pytest.mark.parametrize("node_id,cls", _all_nodes(), ids=lambda v: v if isinstance(v, str) else "")
def test_node_metadata(node_id, cls):
    import xmgie

    assert node_id.startswith("XMGIE") and node_id == cls.NODE_ID
    assert re.fullmatch(r"XMGIE[A-Z][A-Za-z0-9]+", node_id), "ids are CamelCase with the prefix"
    assert cls.CATEGORY == "xmgie" or cls.CATEGORY.startswith("xmgie/")
    assert cls.CATEGORY == cls.CATEGORY.lower()
    assert isinstance(cls.DESCRIPTION, str) and len(cls.DESCRIPTION) > 20
    assert xmgie.NODE_DISPLAY_NAME_MAPPINGS[node_id] == cls.DISPLAY_NAME
    assert isinstance(cls.RETURN_TYPES, tuple)
    if hasattr(cls, "RETURN_NAMES"):
        assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES)
    assert callable(getattr(cls(), cls.FUNCTION))
    spec = cls.INPUT_TYPES()
    assert set(spec) <= {"required", "optional", "hidden"}
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            assert isinstance(entry, tuple) and 1 <= len(entry) <= 2, name
            opts = entry[1] if len(entry) == 2 else {}
            assert opts.get("tooltip"), f"{node_id}.{name} has no tooltip"


def test_core_library_never_imports_comfyui_or_nodes():
    pattern = re.compile(r"^\s*(import|from)\s+(comfy\b|folder_paths\b|nodes\b|\.\.nodes\b|"
                         r"\.\.\.nodes\b|xmgie\.nodes\b)", re.M)
    offenders = [str(p) for p in (ROOT / "mgie_core").rglob("*.py")
                 if pattern.search(p.read_text())]
    assert offenders == []
    code = ("import sys, xmgie.mgie_core.models.sd, xmgie.mgie_core.paths, xmgie.mgie_core.vae;"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('comfy','folder_paths')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _calls(text: str, opener: str):
    """Full text of every call starting with `opener`, parentheses balanced."""
    start = text.find(opener)
    while start >= 0:
        depth, i = 0, start + len(opener) - 1
        while i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            if depth == 0:
                break
            i += 1
        yield text[start:i + 1]
        start = text.find(opener, i)


def test_no_unsafe_loading_or_eval():
    for p in [p for d in ("mgie_core", "nodes", "runner", "evaluation")
              for p in (ROOT / d).rglob("*.py")]:
        text = p.read_text()
        for call in _calls(text, "torch.load("):
            assert "weights_only=True" in call, f"{p}: {call}"
        assert not re.search(r"(?<![\w.])(eval|exec)\(", text), p


def test_pyproject_is_ready_for_the_registry():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = meta["project"]
    assert project["name"] == "xmgie" and "comfy" not in project["name"].lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert isinstance(project["license"], dict)
    deps = " ".join(project["dependencies"])
    for dep in ("diffusers", "transformers", "kornia", "segment-anything", "numpy", "pillow",
                "safetensors", "torch", "torchvision"):
        assert dep in deps, dep
    assert "test" in project["optional-dependencies"]
    assert project["scripts"]["xmgie"] == "xmgie.cli:main"
    comfy = meta["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"]
    # The registry shows the icon from a URL; it must name a square-ish image in the repo.
    icon = comfy["Icon"]
    repo = project["urls"]["Repository"].removeprefix("https://github.com/")
    prefix = f"https://raw.githubusercontent.com/{repo}/main/"
    assert icon.startswith(prefix) and icon.endswith((".svg", ".png", ".jpg", ".gif")), icon
    icon_file = ROOT / icon.removeprefix(prefix)
    assert icon_file.is_file(), icon_file
    if icon_file.suffix == ".svg":
        root = __import__("xml.etree.ElementTree", fromlist=["x"]).parse(icon_file).getroot()
        w, h = int(root.get("width")), int(root.get("height"))
        assert w <= 800 and h <= 400 and w == h
    assert re.fullmatch(r">=\s*\d+\.\d+\.\d+", comfy["requires-comfyui"])
    # The declared license and the LICENSE file agree (the standard Apache-2.0 text).
    assert project["license"] == {"text": "Apache-2.0"}
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and "APPENDIX: How to apply" in text
    reqs = (ROOT / "requirements.txt").read_text().lower()
    lines = [l.split("#")[0].strip() for l in reqs.splitlines()]
    assert not [l for l in lines if re.match(r"^(torch|torchvision)\b", l)]


def test_every_package_folder_is_installed():
    # A wheel install (CI, pip install .) holds only the packages pyproject lists: a new
    # folder with an __init__.py that is missing there imports in a checkout and fails
    # everywhere else.
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(meta["tool"]["setuptools"]["packages"])
    # not packages: tests and data, and what a build or a run writes into the checkout
    skip = {"tests", "bench", "workflows", "docs", "example_data", "assets", "build", "dist",
            "output", "input"}
    found = {".".join(("xmgie", *p.parent.relative_to(ROOT).parts))
             for p in ROOT.rglob("__init__.py")
             if not ({*p.relative_to(ROOT).parts[:1]} & skip)
             and not any(part.startswith(".") or part.endswith(".egg-info")
                         for part in p.relative_to(ROOT).parts)}
    assert "xmgie.runner" in found and "xmgie.training" in found
    assert sorted(found - listed) == []


def test_workflows_are_valid_json():
    files = sorted((ROOT / "workflows").glob("*.json"))
    assert files
    for p in files:
        json.loads(p.read_text())


# The folder names ComfyUI (app/custom_node_manager.py) looks in for a pack's workflow
# templates, in its order: it lists the *.json of every one of them that exists, and
# serves /api/workflow_templates/<pack>/ from each, the first one answering every file
# request under that prefix (a later folder's templates and thumbnails then 404).
COMFY_TEMPLATE_FOLDERS = ("example_workflows", "example", "examples", "workflow", "workflows")


def test_comfyui_finds_the_templates_in_workflows_only():
    present = [n for n in COMFY_TEMPLATE_FOLDERS if (ROOT / n).is_dir()]
    assert present == ["workflows"], (
        f"top-level folders {present}: ComfyUI takes each of {COMFY_TEMPLATE_FOLDERS} for "
        "workflow templates; only workflows/ may exist, or the browser lists stray JSON "
        "as templates and cannot open the real ones")
    for p in sorted((ROOT / "workflows").glob("*.json")):
        data = json.loads(p.read_text())
        assert "nodes" in data and "links" in data, f"{p.name} is not a UI workflow"
        assert p.with_suffix(".jpg").is_file(), f"{p.name} has no thumbnail"


def test_readme_lists_every_node_and_workflow():
    import xmgie

    readme = (ROOT / "README.md").read_text()
    table = readme.split("<!-- nodes:start -->")[1].split("<!-- nodes:end -->")[0]
    for node_id in xmgie.NODE_CLASS_MAPPINGS:
        assert f"`{node_id}`" in table, f"README's node table misses {node_id}"
    for wf in (ROOT / "workflows").glob("*.json"):
        assert wf.name in readme, f"README does not mention workflows/{wf.name}"
