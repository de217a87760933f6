"""The UI/API format conversion: ComfyUI's two workflow formats, read and written, with
one seed rule (which widgets the frontend follows with control values). UI files (what
Templates and drag-and-drop open) are read into the API form (:func:`to_api`) and written
from it, laid out by stage; a folder of shipped workflows is kept in sync.

ComfyUI lists every ``<pack>/workflows/*.json`` (one level, no sub-folders; see
``app/custom_node_manager.py``) as a template and opens it with the frontend's UI-format
loader, which refuses API-format files ("Workflow does not contain a valid version").
So the shipped workflows are UI files, and their API twins live in ``workflows/api/``,
which ComfyUI does not list.

The source of a shipped workflow is two files in ``workflows/api/``:

* ``<name>_api.json``: the graph in API form (what "Export (API)" writes);
* ``<name>.layout.json``: how to show it: stages, left to right, each a titled group
  of node ids, and the Markdown note (which inputs to change, which model files to put
  in which ``models/`` folder)::

      {"stages": [{"title": "1 Load", "nodes": ["3", "1", "2"]}, ...],
       "note": ["## Title", "", "text ..."]}

and, shared by all, ``models.json``: the model files the workflows name, with the folder
of ``ComfyUI/models/`` each goes in and where it is published, written into each loader
node's ``properties.models`` (the frontend's missing-models dialog reads them).

``xmgie workflow sync`` writes ``workflows/<name>.json`` from them and rewrites the API
twin from that UI file (the twin then holds every widget value, optional ones included,
as the frontend sends them), so the two always convert into each other.

The writer follows ComfyUI frontend 1.27 (the one ComfyUI 0.3.64 ships), checked in a
real frontend:

* ``inputs`` lists the sockets (required, then optional, ``"shape": 7`` when optional)
  and then one entry per widget input with ``"widget": {"name": ...}``; a link's
  ``target_slot`` is the index in that list.
* ``widgets_values`` holds one value per widget in declaration order (required, then
  optional), linked or not; an INT named ``seed``/``noise_seed`` or declaring
  ``control_after_generate`` is followed by its control value (``"fixed"`` here, so a
  template gives the same image twice); an input declaring ``image_upload`` gets the
  frontend's extra ``upload`` widget (value ``"image"``) after all others.
* Sizes: the frontend keeps the stored size and draws each widget at its row, so a node
  smaller than its content overflows into the next. Its minimum (``computeSize``) is
  20 px per slot row (max of sockets in, outputs), 24 px per one-line widget, 54 px per
  multiline text widget, plus 14 px (6 px without widgets), and the title bar
  (30 px) is drawn above ``pos``. The writer gives multiline widgets 100 px and rounds
  widths up from a text-width estimate, so every node is at least its minimum size.
"""

from __future__ import annotations

import dataclasses
import heapq
import json
import math
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import engine
from .engine import InputSpec, NodeSpec, Prompt, Registry, WorkflowError, WorkflowFileError

# --- frontend geometry (LiteGraph in ComfyUI frontend 1.27) --------------------------------

TITLE_H = 30            # LiteGraph.NODE_TITLE_HEIGHT: drawn above pos
SLOT_H = 20             # LiteGraph.NODE_SLOT_HEIGHT
WIDGET_H = 24           # one-line widget row (NODE_WIDGET_HEIGHT 20 + 4 margin)
MULTILINE_MIN_H = 54    # the frontend's minimum for a multiline text widget
MULTILINE_H = 100       # what the writer gives one, so a prompt is readable
NODE_MARGIN_H = 14      # added below the widgets (6 without widgets)
CHAR_W = 8.0            # generous average glyph width of the 14 px node font
MIN_W, MULTILINE_W = 300, 420

GROUP_PAD = 20          # inside a group, around its nodes
GROUP_TITLE_H = 50      # room left for the group's title (font 24 px) when placing
GROUP_TITLE_BAR = 34    # the title bar the frontend draws (font size x 1.4)
GROUP_GAP = 60          # between two groups
COLUMN_GAP = 50         # between two columns of nodes inside a group
ROW_GAP = 40            # between two nodes stacked in a column
GROUP_COLOR = "#3f789e"
IMAGE_PREVIEW_H = 240   # room for the image a LoadImage/SaveImage node shows
NOTE_W = 460
NOTE_COLOR, NOTE_BGCOLOR = "#432", "#653"
NOTE_TYPE = "MarkdownNote"

# Widgets the frontend adds to a node type on its own, which are not stored in
# widgets_values (height they need): PreviewAny's read-only text box.
FRONTEND_DISPLAY_H = {"PreviewAny": MULTILINE_MIN_H}
UPLOAD_WIDGET = {"localized_name": "choose file to upload", "name": "upload",
                 "type": "IMAGEUPLOAD", "widget": {"name": "upload"}, "link": None}
UPLOAD_VALUE = "image"
OPTIONAL_SHAPE = 7      # LiteGraph's hollow-dot shape for optional inputs

UI_VERSION = 0.4
_ID_NAMESPACE = uuid.UUID("6b8f4c1e-3a55-4d7e-9d0a-5f1f2d8e7c31")  # for stable workflow ids


# --- the seed rule: widgets followed by control values -------------------------------------
#
# ComfyUI's frontend adds a "control after generate" combo (fixed, increment, decrement,
# randomize) after some widgets and stores its value in widgets_values right after the
# widget's own. Which widgets get one (ComfyUI_frontend, useIntWidget/useComboWidget):
#   * an INT input: its ``control_after_generate`` option when declared (true, false, or a
#     default mode), else the legacy convention: the input is named seed or noise_seed;
#   * a combo input declaring ``control_after_generate``: the control, then a filter-list
#     text widget (so two stored values).
# This one rule is used to read UI files, to write them, and by the batch to find the
# inputs that take each item's seed.

SEED_NAMES = ("seed", "noise_seed")
SEED_CONTROL = "fixed"      # what the writer stores: a template gives the same image twice
COMBO_FILTER = ""           # the filter-list value a new combo control starts with


def control_values(spec: InputSpec) -> int:
    """How many control values the frontend stores after this widget's value (0, 1 or 2)."""
    declared = spec.options.get("control_after_generate")
    if spec.type == "INT":
        return int(bool(declared) if declared is not None else spec.name in SEED_NAMES)
    if spec.choices is not None and declared:
        return 2
    return 0


def stored_controls(spec: InputSpec) -> list[Any]:
    """The control values the writer stores after this widget's value."""
    return [SEED_CONTROL, COMBO_FILTER][:control_values(spec)]


def is_seed(spec: InputSpec) -> bool:
    """An INT input the frontend re-rolls after each run: a seed."""
    return spec.type == "INT" and control_values(spec) > 0


# --- UI format -> API form ----------------------------------------------------------------
#
# ``widgets_values`` map onto the widget inputs in ``INPUT_TYPES`` order (required, then
# optional; a ``forceInput`` primitive is a socket and has none); a linked widget keeps its
# slot and the link wins; control values are skipped by the seed rule above. Note and
# MarkdownNote nodes are dropped, Reroute chains are followed to their source, and a
# PrimitiveNode's value is written into every input it feeds. Muted nodes (mode 2) are
# dropped and inputs they fed become unset (an error when required); bypassed nodes
# (mode 4) are dropped and, as ComfyUI does, each of their outputs is replaced by their
# input of the same type (same slot first, then the first input of that type).

# UI-only node types that carry no computation.
UI_NOTE_TYPES = ("Note", "MarkdownNote")
MODE_MUTED = 2
MODE_BYPASSED = 4


def is_ui_format(data: Mapping) -> bool:
    """UI workflows (ComfyUI's "Save") have a top-level list of nodes."""
    return isinstance(data.get("nodes"), list)


def to_api(data: Mapping, registry: Registry) -> Prompt:
    """Return the API form of a UI- or API-format workflow (a new dict)."""
    if not is_ui_format(data):
        return normalize_api(data)
    try:
        return ui_to_api(data, registry)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        # A hand-edited or truncated UI file: say so instead of showing a traceback.
        raise WorkflowFileError(f"the UI workflow is malformed ({type(exc).__name__}: {exc}); "
                                "expected nodes with 'id' and 'type' and links of 6 items, "
                                "as ComfyUI's Save writes them") from exc


def normalize_api(data: Mapping) -> Prompt:
    """An API-form workflow with string node ids and links (hand-written API workflows
    sometimes use integer ids; ComfyUI's are strings)."""
    prompt: Prompt = {}
    for node_id, node in data.items():
        if not isinstance(node, dict):
            raise WorkflowFileError(
                f"node {node_id}: holds a JSON {type(node).__name__}; expected an object with "
                "'class_type' and 'inputs' (API format) or a UI workflow with a 'nodes' list")
        raw_inputs = node.get("inputs") or {}
        if not isinstance(raw_inputs, dict):
            raise WorkflowFileError(f"node {node_id}: 'inputs' is a JSON "
                                    f"{type(raw_inputs).__name__}; expected an object")
        inputs = {name: ([str(v[0]), v[1]] if engine.is_link(v) else v)
                  for name, v in raw_inputs.items()}
        prompt[str(node_id)] = {**node, "inputs": inputs}
    return prompt


# --- UI format -> API form --------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Link:
    src: str
    src_slot: int
    dst: str
    dst_slot: int
    type: Any


def _ui_links(data: Mapping) -> dict[int, _Link]:
    links = {}
    for raw in data.get("links") or []:
        if isinstance(raw, dict):  # newer schema: objects instead of arrays
            lid, src, slot = raw["id"], raw["origin_id"], raw["origin_slot"]
            dst, dslot, type_ = raw["target_id"], raw["target_slot"], raw.get("type")
        else:
            lid, src, slot, dst, dslot, type_ = raw[:6]
        links[lid] = _Link(str(src), int(slot), str(dst), int(dslot), type_)
    return links


class _UIGraph:
    """A UI workflow with its links resolved through Reroute, PrimitiveNode and
    bypassed nodes."""

    def __init__(self, data: Mapping):
        self.nodes = {}
        for n in data["nodes"]:
            node_id = str(n["id"])
            if node_id in self.nodes:
                first = self.nodes[node_id].get("type")
                raise WorkflowFileError(
                    f"the UI workflow has two nodes with id {node_id} ({first} and "
                    f"{n.get('type')}); expected unique node ids, as ComfyUI's Save writes "
                    "them. Open the workflow in ComfyUI and save it again.")
            self.nodes[node_id] = n
        self.links = _ui_links(data)

    def mode(self, node_id: str) -> int:
        return int(self.nodes[node_id].get("mode", 0) or 0)

    def source(self, link_id: int | None) -> tuple[str, Any] | None:
        """Where a link's value comes from: ``("link", [id, slot])``, ``("value", v)``,
        or None when it comes from nothing (a muted node, a dangling reroute, a loop of
        reroutes). Followed iteratively, so chains of any length work."""
        for _ in range(len(self.nodes) + 1):
            link = self.links.get(link_id) if link_id is not None else None
            if link is None or link.src not in self.nodes:
                return None
            node = self.nodes[link.src]
            kind = node.get("type")
            if kind == "Reroute":
                link_id = _input_link(node, 0)
                continue
            if kind == "PrimitiveNode":
                values = node.get("widgets_values") or []
                return ("value", values[0]) if values else None
            if self.mode(link.src) == MODE_MUTED:
                return None
            if self.mode(link.src) == MODE_BYPASSED:
                link_id = self._bypass_input(node, link.src_slot)
                continue
            return ("link", [link.src, link.src_slot])
        return None

    @staticmethod
    def _bypass_input(node: Mapping, slot: int) -> int | None:
        # ComfyUI passes a bypassed node's output through from its input of the same
        # type: the input at the same slot first, then the first one of that type.
        outputs = node.get("outputs") or []
        if slot >= len(outputs):
            return None
        out_type = outputs[slot].get("type")
        inputs = node.get("inputs") or []
        order = ([slot] if slot < len(inputs) else []) + list(range(len(inputs)))
        for i in order:
            linked = inputs[i].get("link") is not None
            if linked and engine._types_match(inputs[i].get("type"), out_type):
                return inputs[i]["link"]
        return None


def _input_link(node: Mapping, index: int) -> int | None:
    inputs = node.get("inputs") or []
    return inputs[index].get("link") if index < len(inputs) else None


def ui_to_api(data: Mapping, registry: Registry) -> Prompt:
    """Convert a UI-format workflow ("Save" in ComfyUI) to the API form.

    Unknown node types are kept with their links only, so validation reports them."""
    subgraphs = (data.get("definitions") or {}).get("subgraphs")
    graph = _UIGraph(data)
    specs = engine._Specs(registry)
    prompt: Prompt = {}
    for node_id, node in graph.nodes.items():
        kind = node.get("type")
        if kind in UI_NOTE_TYPES or kind in ("Reroute", "PrimitiveNode"):
            continue
        if graph.mode(node_id) in (MODE_MUTED, MODE_BYPASSED):
            continue
        if subgraphs and any(s.get("id") == kind for s in subgraphs):
            raise WorkflowError(f"node {node_id} is a subgraph; the headless runner does not "
                                "run subgraphs. Unpack it in ComfyUI and save the workflow again.")
        spec = specs.get(kind)
        inputs = _ui_widget_inputs(node, spec) if spec is not None else {}
        for entry in node.get("inputs") or []:
            if entry.get("link") is None:
                continue
            resolved = graph.source(entry["link"])
            if resolved is None:
                inputs.pop(entry["name"], None)
            else:
                inputs[entry["name"]] = resolved[1]
        api_node = {"class_type": kind, "inputs": inputs}
        if node.get("title"):
            api_node["_meta"] = {"title": node["title"]}
        prompt[node_id] = api_node
    return prompt


def _ui_widget_inputs(node: Mapping, spec: NodeSpec) -> dict[str, Any]:
    values = node.get("widgets_values")
    if isinstance(values, dict):  # some frontends store widgets by name
        return {w.name: values[w.name] for w in spec.widgets if w.name in values}
    values = list(values or [])
    # ComfyUI's frontend stores a value for every widget, linked or not (the link wins),
    # and its control values after a widget with controls (control_values). Should a
    # file leave out the linked widgets or the control values, the reading that uses up
    # exactly the stored values is the one that was written.
    linked = {e.get("name") for e in node.get("inputs") or [] if e.get("link") is not None}
    first = None
    for skip, controls in ((set(), True), (linked, True), (set(), False), (linked, False)):
        mapped, used, filled = _walk_widgets(spec.widgets, values, skip, controls)
        if used == len(values) and filled:
            return mapped
        first = first or mapped
    return first


def _walk_widgets(widgets: list[InputSpec], values: list, skip: set,
                  controls: bool) -> tuple[dict[str, Any], int, bool]:
    """Assign stored values to widgets in order; return the mapping, the values used and
    whether every widget got one."""
    out: dict[str, Any] = {}
    pos = 0
    for widget in widgets:
        if widget.name in skip:
            continue
        if pos >= len(values):
            return out, pos, False
        out[widget.name] = values[pos]
        pos += 1 + (control_values(widget) if controls else 0)
    return out, pos, True


# --- widget and socket lists as the frontend builds them ----------------------------------

def is_widget(spec: InputSpec) -> bool:
    """A widget in the frontend: a combo or a primitive type, unless ``forceInput``."""
    return spec.is_widget


def _ui_type(spec: InputSpec) -> str:
    # ComfyUI's LoadImage declares a combo of files with image_upload; the runner's
    # stand-in takes any name (STRING). The frontend shows a combo either way.
    if spec.options.get("image_upload"):
        return "COMBO"
    return spec.type_name


def sockets(spec: NodeSpec) -> list[InputSpec]:
    return [i for i in spec.inputs.values() if not is_widget(i)]


def widgets(spec: NodeSpec) -> list[InputSpec]:
    return [i for i in spec.inputs.values() if is_widget(i)]


def output_names(spec: NodeSpec) -> list[str]:
    names = list(getattr(spec.cls, "RETURN_NAMES", None) or ())
    types = [("COMBO" if isinstance(t, (list, tuple)) else str(t)) for t in spec.return_types]
    return [names[i] if i < len(names) else types[i] for i in range(len(types))]


def output_types(spec: NodeSpec) -> list[str]:
    return [("COMBO" if isinstance(t, (list, tuple)) else str(t)) for t in spec.return_types]


def display_name(spec: NodeSpec) -> str:
    return str(getattr(spec.cls, "DISPLAY_NAME", "") or spec.class_type)


def default_value(spec: InputSpec) -> Any:
    """The value the frontend gives a new widget: the declared default, else the first
    choice of a combo, else the type's zero (the minimum when zero is below it)."""
    if "default" in spec.options:
        return spec.options["default"]
    choices = spec.choices
    if choices is not None:
        return choices[0] if choices else ""
    zero = {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(spec.type, None)
    lo = spec.options.get("min")
    if isinstance(zero, (int, float)) and not isinstance(zero, bool) and lo is not None:
        zero = max(zero, lo)
    return zero


# --- sizes --------------------------------------------------------------------------------

def _text_w(text: Any) -> float:
    return len(str(text)) * CHAR_W


def min_height(spec: NodeSpec, multiline_h: float = MULTILINE_MIN_H) -> float:
    """Body height (below the title bar) the frontend needs for this node."""
    rows = max(len(sockets(spec)), len(spec.return_types))
    heights = []
    for w in widgets(spec):
        heights.append(multiline_h if w.type == "STRING" and w.options.get("multiline")
                       else WIDGET_H)
        heights += [WIDGET_H] * control_values(w)
    if any(w.options.get("image_upload") for w in widgets(spec)):
        heights.append(WIDGET_H)
    if spec.class_type in FRONTEND_DISPLAY_H:
        heights.append(FRONTEND_DISPLAY_H[spec.class_type])
    return rows * SLOT_H + sum(heights) + (NODE_MARGIN_H if heights else 6)


def node_size(spec: NodeSpec, values: Mapping[str, Any]) -> tuple[float, float]:
    """(width, height) the writer gives a node: at least the frontend's minimum, with
    multiline prompts given room and widths from the longest title/slot/widget text."""
    ins, outs = sockets(spec), output_names(spec)
    width = _text_w(display_name(spec)) + 60
    for i in range(max(len(ins), len(outs))):
        left = ins[i].name if i < len(ins) else ""
        right = outs[i] if i < len(outs) else ""
        width = max(width, _text_w(left) + _text_w(right) + 80)
    multiline = False
    for w in widgets(spec):
        if w.type == "STRING" and w.options.get("multiline"):
            multiline = True
            continue
        value = values.get(w.name, "")
        shown = value if isinstance(value, str) and len(value) <= 40 else ""
        width = max(width, _text_w(w.name) + _text_w(shown) + 90)
    width = max(width, MULTILINE_W if multiline else MIN_W)
    height = min_height(spec, MULTILINE_H) + 10
    if spec.class_type in FRONTEND_DISPLAY_H:
        width, height = max(width, MULTILINE_W), height + MULTILINE_H - MULTILINE_MIN_H
    if shows_image(spec):
        height += IMAGE_PREVIEW_H
    return float(math.ceil(width / 10) * 10), float(math.ceil(height / 2) * 2)


def shows_image(spec: NodeSpec) -> bool:
    """The frontend draws an image below the widgets: the picked file of an upload
    widget, the results of an output node that takes IMAGE."""
    if any(w.options.get("image_upload") for w in widgets(spec)):
        return True
    return spec.output_node and any(i.type == "IMAGE" for i in sockets(spec))


def note_size(text: str, width: float = NOTE_W) -> tuple[float, float]:
    """A Markdown note tall enough for its text, wrapped at the note's width (the
    frontend 1.27 renders notes at about 4.5 px per character and 14 px per line; this
    allows 5 px and 17 px)."""
    per_line = max(20, int((width - 40) / 5.0))
    lines = 0
    for line in text.splitlines() or [""]:
        lines += max(1, math.ceil(len(line) / per_line))
    return float(width), float(math.ceil((lines * 17 + 50) / 10) * 10)


# --- layout description ---------------------------------------------------------------------

@dataclasses.dataclass
class Stage:
    """A group. ``columns`` (lists of node ids, left to right) fixes the arrangement
    inside it; without them nodes go in columns by the depth of their links within the
    stage, in the order of ``nodes``."""

    title: str
    nodes: list[str]
    columns: list[list[str]] | None = None


@dataclasses.dataclass
class Layout:
    """Stages (groups, left to right) and the note of one workflow."""

    stages: list[Stage]
    note: str = ""
    # {file name: {"directory", "url"}}: the models.json beside the layout file, if any
    models: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Mapping, where: str = "layout") -> Layout:
        if not isinstance(data, Mapping) or not isinstance(data.get("stages"), list):
            raise WorkflowFileError(f"{where}: expected an object with a 'stages' list "
                                    "([{\"title\": ..., \"nodes\": [ids]}, ...]) and a 'note'")
        stages = []
        for i, raw in enumerate(data["stages"]):
            columns = raw.get("columns") if isinstance(raw, Mapping) else None
            if columns is not None and not (isinstance(columns, list) and columns and all(
                    isinstance(c, list) for c in columns)):
                columns = "bad"
            no_nodes = (isinstance(raw, Mapping) and columns is None
                        and not isinstance(raw.get("nodes"), list))
            if not isinstance(raw, Mapping) or not isinstance(raw.get("title"), str) \
                    or columns == "bad" or no_nodes:
                raise WorkflowFileError(f"{where}: stage {i} must be "
                                        "{\"title\": text, \"nodes\": [node ids]} or "
                                        "{\"title\": text, \"columns\": [[node ids], ...]}")
            if columns is not None:
                cols = [[str(n) for n in c] for c in columns]
                stages.append(Stage(raw["title"], [n for c in cols for n in c], cols))
            else:
                stages.append(Stage(raw["title"], [str(n) for n in raw["nodes"]]))
        note = data.get("note", "")
        if isinstance(note, list):
            note = "\n".join(str(line) for line in note)
        if not isinstance(note, str):
            raise WorkflowFileError(f"{where}: 'note' must be text or a list of lines")
        return cls(stages, note)

    @classmethod
    def load(cls, path: str | Path) -> Layout:
        layout = cls.from_json(engine.load_file(path), str(path))
        layout.models = load_models(Path(path).parent / MODELS_FILE)
        return layout


def auto_layout(prompt: Mapping[str, dict]) -> Layout:
    """One stage per dependency depth (sources first), for workflows without a layout."""
    depth = _depths(prompt, set(prompt))
    stages: dict[int, list[str]] = {}
    for node_id in sorted(prompt, key=engine._id_key):
        stages.setdefault(depth[node_id], []).append(node_id)
    return Layout([Stage(f"{i + 1}", ids) for i, (_, ids) in enumerate(sorted(stages.items()))])


def _sources(node: Mapping) -> list[str]:
    return [str(v[0]) for v in (node.get("inputs") or {}).values() if engine.is_link(v)]


def _depths(prompt: Mapping[str, dict], members: set[str]) -> dict[str, int]:
    """Longest chain of links from a node of ``members`` back to a node of ``members``
    without a source among them (iterative, in topological order)."""
    order = engine.topological_order({nid: prompt[nid] for nid in prompt})
    depth: dict[str, int] = {}
    for nid in order:
        if nid not in members:
            continue
        srcs = [s for s in _sources(prompt[nid]) if s in members]
        depth[nid] = 1 + max((depth[s] for s in srcs), default=-1)
    return depth


def _assign_stages(prompt: Mapping[str, dict], layout: Layout) -> tuple[list[Stage], list[str]]:
    """The layout's stages with every node of the prompt placed once. A node the layout
    does not name joins the latest stage of the nodes it links from (the first stage
    when it has none), so a newly added node lands after its inputs; the ids are
    returned so the caller can say so."""
    known = set(prompt)
    problems = []
    seen: dict[str, str] = {}
    stages = []
    for stage in layout.stages:
        ids = []
        for nid in stage.nodes:
            if nid not in known:
                problems.append(f"stage '{stage.title}' names node {nid}, which the workflow "
                                "does not have")
            elif nid in seen:
                problems.append(f"node {nid} is in two stages ('{seen[nid]}' and "
                                f"'{stage.title}')")
            else:
                seen[nid] = stage.title
                ids.append(nid)
        columns = [[n for n in c if n in ids] for c in stage.columns] if stage.columns else None
        stages.append(Stage(stage.title, ids, columns))
    if problems:
        raise WorkflowError([f"layout: {p}; expected each node id of the workflow in one "
                             "stage" for p in problems])
    if not stages:
        stages = [Stage("1", [])]
    index = {nid: i for i, s in enumerate(stages) for nid in s.nodes}
    added = []
    order = engine.topological_order(dict(prompt))
    for nid in order:
        if nid in index:
            continue
        i = max((index[s] for s in _sources(prompt[nid]) if s in index), default=0)
        stages[i].nodes.append(nid)
        if stages[i].columns is not None:
            stages[i].columns.append([nid])
        index[nid] = i
        added.append(nid)
    return stages, added


# --- API -> UI --------------------------------------------------------------------------------

def _spec(specs: engine._Specs, node_id: str, node: Mapping) -> NodeSpec:
    class_type = node.get("class_type")
    spec = specs.get(class_type) if isinstance(class_type, str) else None
    if spec is None:
        raise WorkflowError(f"node {node_id}: unknown class_type {class_type!r}; the UI writer "
                            "needs the node's INPUT_TYPES (a node of this pack or a core node "
                            "the runner stands in for)")
    return spec


def _check_node_inputs(node_id: str, node: Mapping, spec: NodeSpec, prompt: Mapping,
                       specs: engine._Specs) -> list[str]:
    errors = []
    for name, value in (node.get("inputs") or {}).items():
        where = engine._where(node_id, spec.class_type, name)
        if name not in spec.inputs:
            if name in spec.hidden:
                continue
            errors.append(f"{where}: the node declares no such input; expected one of "
                          f"{', '.join(spec.inputs) or '(none)'}")
            continue
        if engine.is_link(value):
            problem = engine._check_link(dict(prompt), specs, spec.inputs[name], list(value))
            if problem:
                errors.append(f"{where}: {problem}")
        elif not spec.inputs[name].takes_value:
            errors.append(f"{where}: got the value {engine._describe(value)}; expected a link "
                          f"from an output of type {spec.inputs[name].type_name}")
    return errors


def api_to_ui(prompt: Mapping[str, dict], registry: Registry,
              layout: Layout | None = None, *, name: str = "workflow",
              source: str = "", models: Mapping[str, Mapping] | None = None) -> dict:
    """The UI-format workflow of an API prompt, laid out by ``layout`` (or by depth).

    ``models`` maps model file names to ``{"directory", "url"}`` (default: the layout's):
    a node with a widget holding one of them declares it in ``properties.models`` (see
    :func:`model_entries`).

    Deterministic: the same prompt, registry and layout give the same JSON. Node ids are
    kept; links are numbered in order of target node id, then input slot; the note gets
    the next free id."""
    prompt = to_api(prompt, registry) if is_ui_format(prompt) else \
        normalize_api(prompt)
    specs = engine._Specs(registry)
    errors = []
    node_specs: dict[str, NodeSpec] = {}
    for nid in sorted(prompt, key=engine._id_key):
        if not nid.isdigit():
            errors.append(f"node {nid}: the UI format needs numeric node ids")
            continue
        try:
            node_specs[nid] = _spec(specs, nid, prompt[nid])
        except WorkflowError as exc:
            errors += exc.errors
            continue
        errors += _check_node_inputs(nid, prompt[nid], node_specs[nid], prompt, specs)
    if not errors:
        errors += engine._find_cycles(dict(prompt))
    if errors:
        raise WorkflowError(errors)

    stages, _ = _assign_stages(prompt, layout or auto_layout(prompt))

    # Nodes with their inputs, outputs and widget values (links filled in below).
    ui_nodes: dict[str, dict] = {}
    input_slots: dict[str, dict[str, int]] = {}
    for nid, spec in node_specs.items():
        node = prompt[nid]
        inputs = node.get("inputs") or {}
        entries, slots = [], {}
        for s in sockets(spec):
            entry = {"localized_name": s.name, "name": s.name}
            if not s.required:
                entry["shape"] = OPTIONAL_SHAPE
            entry.update(type=_ui_type(s), link=None)
            slots[s.name] = len(entries)
            entries.append(entry)
        values: list[Any] = []
        shown: dict[str, Any] = {}
        upload = False
        for w in widgets(spec):
            entry = {"localized_name": w.name, "name": w.name}
            if not w.required:
                entry["shape"] = OPTIONAL_SHAPE
            entry.update(type=_ui_type(w), widget={"name": w.name}, link=None)
            slots[w.name] = len(entries)
            entries.append(entry)
            value = inputs.get(w.name)
            if value is None or engine.is_link(value):
                value = default_value(w)   # stored for a linked widget too; the link wins
            values.append(value)
            shown[w.name] = value
            values += stored_controls(w)
            upload = upload or bool(w.options.get("image_upload"))
        if upload:
            entries.append(dict(UPLOAD_WIDGET, widget=dict(UPLOAD_WIDGET["widget"])))
            values.append(UPLOAD_VALUE)
        outputs = [{"localized_name": n, "name": n, "type": t, "links": None}
                   for n, t in zip(output_names(spec), output_types(spec))]
        width, height = node_size(spec, shown)
        ui = {"id": int(nid), "type": spec.class_type, "pos": [0.0, 0.0],
              "size": [width, height], "flags": {}, "order": 0, "mode": 0,
              "inputs": entries, "outputs": outputs,
              "properties": {"Node name for S&R": spec.class_type},
              "widgets_values": values}
        declared = model_entries(values, models if models is not None else
                                 (layout.models if layout else {}))
        if declared:
            ui["properties"]["models"] = declared
        title = (node.get("_meta") or {}).get("title")
        if isinstance(title, str) and title and title != display_name(spec):
            ui["title"] = title
        ui_nodes[nid] = ui
        input_slots[nid] = slots

    links = []
    for nid in sorted(node_specs, key=engine._id_key):
        spec = node_specs[nid]
        inputs = prompt[nid].get("inputs") or {}
        for name in sorted((n for n, v in inputs.items() if engine.is_link(v)),
                           key=lambda n: input_slots[nid][n]):
            src, slot = str(inputs[name][0]), int(inputs[name][1])
            link_id = len(links) + 1
            slot_index = input_slots[nid][name]
            out = ui_nodes[src]["outputs"][slot]
            links.append([link_id, int(src), slot, int(nid), slot_index, out["type"]])
            ui_nodes[nid]["inputs"][slot_index]["link"] = link_id
            out["links"] = (out["links"] or []) + [link_id]
            out["slot_index"] = slot

    groups = _place(prompt, stages, ui_nodes)
    nodes = [ui_nodes[nid] for nid in sorted(ui_nodes, key=engine._id_key)]
    next_id = max((n["id"] for n in nodes), default=0) + 1
    note_text = (layout.note if layout else "").strip()
    if note_text:
        nw, nh = note_size(note_text)
        left = min((g["bounding"][0] for g in groups), default=0.0)
        top = min((g["bounding"][1] for g in groups), default=0.0)
        nodes.append({"id": next_id, "type": NOTE_TYPE,
                      "pos": [left - GROUP_GAP - nw, top + TITLE_H],
                      "size": [nw, nh], "flags": {}, "order": 0, "mode": 0, "inputs": [],
                      "outputs": [], "title": "Read me", "properties": {},
                      "widgets_values": [note_text], "color": NOTE_COLOR,
                      "bgcolor": NOTE_BGCOLOR})
    _set_order(prompt, nodes)
    extra: dict[str, Any] = {"ds": _fit_view(nodes, groups)}
    extra["xmgie"] = {"generated_by": "xmgie workflow ui", "source": source or f"{name}_api.json"}
    return {
        "id": str(uuid.uuid5(_ID_NAMESPACE, f"xmgie/workflows/{name}")),
        "revision": 0,
        "last_node_id": max((n["id"] for n in nodes), default=0),
        "last_link_id": len(links),
        "nodes": nodes,
        "links": links,
        "groups": groups,
        "config": {},
        "extra": extra,
        "version": UI_VERSION,
    }


def model_entries(values, models: Mapping[str, Mapping]) -> list[dict]:
    """The frontend's model metadata for a node's widget values: ``{name, url,
    directory}`` per value that ``models`` lists. The frontend collects every node's
    ``properties.models`` when a workflow opens and names each file that is not in its
    ``models/<directory>`` folder in the missing-models dialog, with where to get it."""
    out = []
    for v in values:
        if isinstance(v, str) and v in models and not v.startswith("_"):
            m = models[v]
            out.append({"name": v, "url": str(m["url"]), "directory": str(m["directory"])})
    return out


def _place(prompt: Mapping[str, dict], stages: list[Stage],
           ui_nodes: dict[str, dict]) -> list[dict]:
    """Positions: one group per stage, left to right; inside a group, columns by the
    depth of links within the stage, nodes stacked in each column in the stage's order.
    Nodes of a column share its width. Groups share their top edge."""
    x = 0.0
    top = 0.0
    placed = []
    for stage in stages:
        columns: dict[int, list[str]] = {}
        if stage.columns is not None:
            columns = {i: list(c) for i, c in enumerate(stage.columns) if c}
        else:
            members = set(stage.nodes)
            depth = _depths(prompt, members) if members else {}
            for nid in stage.nodes:
                columns.setdefault(depth[nid], []).append(nid)
        cx = x + GROUP_PAD
        bottom = top + GROUP_TITLE_H
        for d in sorted(columns):
            col = columns[d]
            width = max(ui_nodes[n]["size"][0] for n in col)
            y = top + GROUP_TITLE_H + TITLE_H
            for nid in col:
                node = ui_nodes[nid]
                node["size"][0] = width
                node["pos"] = [cx, y]
                y += node["size"][1] + ROW_GAP + TITLE_H
            bottom = max(bottom, y - ROW_GAP - TITLE_H)
            cx += width + COLUMN_GAP
        right = cx - COLUMN_GAP + GROUP_PAD if columns else x + 2 * GROUP_PAD + MIN_W
        placed.append((stage.title, [x, top, right - x, bottom + GROUP_PAD - top]))
        x = right + GROUP_GAP
    return [{"id": i + 1, "title": title, "bounding": b,
             "color": GROUP_COLOR, "font_size": 24, "flags": {}}
            for i, (title, b) in enumerate(placed)]


def _set_order(prompt: Mapping[str, dict], nodes: list[dict]) -> None:
    """``order``: the frontend's execution order (sources first, ties by id)."""
    deps = {str(n["id"]): [s for s in _sources(prompt.get(str(n["id"]), {}))] for n in nodes}
    users: dict[str, list[str]] = {k: [] for k in deps}
    waiting = {k: set(v) for k, v in deps.items()}
    for k, srcs in deps.items():
        for s in srcs:
            users[s].append(k)
    ready = [(int(k), k) for k, w in waiting.items() if not w]
    heapq.heapify(ready)
    order = {}
    while ready:
        _, k = heapq.heappop(ready)
        order[k] = len(order)
        for u in users[k]:
            waiting[u].discard(k)
            if not waiting[u]:
                heapq.heappush(ready, (int(u), u))
    for n in nodes:
        n["order"] = order[str(n["id"])]


# The view a workflow opens at: the frontend draws no text on nodes below a zoom of
# about 0.6 (LiteGraph's low-quality threshold), so a template opened "fit to the whole
# graph" showed grey boxes. It opens at the zoom that shows the whole graph, but never
# below MIN_SCALE, and never so close that the note and the first (load) group, where
# a user starts, leave the view; the rest is a pan to the right. VIEW is
# the canvas assumed: a 1920x1080 screen less the frontend's side bar, top menu and
# browser chrome, rounded down (a larger canvas shows more, never less).
VIEW = (1500.0, 880.0)
MIN_SCALE = 0.6
VIEW_MARGIN = 40.0      # screen px around the framed boxes


def _fit_view(nodes: list[dict], groups: list[dict], view=VIEW) -> dict:
    """extra.ds: the scale and offset (screen = (world + offset) * scale, as LiteGraph's
    DragAndScale) for a ``view`` canvas, top-left aligned: the whole graph when that
    is readable, else MIN_SCALE, at most the zoom that still frames the note and the
    first group (and at most 1)."""
    notes = [node_box(n) for n in nodes if n["type"] in UI_NOTE_TYPES]
    others = [node_box(n) for n in nodes if n["type"] not in UI_NOTE_TYPES]
    everything = notes + others + [tuple(g["bounding"]) for g in groups]
    if not everything:
        return {"scale": 1.0, "offset": [0.0, 0.0]}
    start = notes + ([tuple(groups[0]["bounding"])] if groups else others)
    frame = min(1.0, _fit(start, view))
    scale = min(frame, max(MIN_SCALE, _fit(everything, view)))
    margin = VIEW_MARGIN / scale
    x0 = min(b[0] for b in everything)
    y0 = min(b[1] for b in everything)
    return {"scale": scale, "offset": [round(-x0 + margin, 1), round(-y0 + margin, 1)]}


def _fit(boxes, view) -> float:
    """The largest zoom (to 0.01 below) at which ``boxes`` fit the view with margins."""
    w = max(b[0] + b[2] for b in boxes) - min(b[0] for b in boxes)
    h = max(b[1] + b[3] for b in boxes) - min(b[1] for b in boxes)
    fit = min((view[0] - 2 * VIEW_MARGIN) / w, (view[1] - 2 * VIEW_MARGIN) / h)
    return math.floor(fit * 100) / 100


# --- UI -> API twin ---------------------------------------------------------------------------

def ui_to_api_twin(data: Mapping, registry: Registry) -> engine.Prompt:
    """The API form of a UI workflow (:func:`to_api`), inputs in declaration order
    and nodes in id order, as the twin files hold it."""
    prompt = to_api(data, registry)
    specs = engine._Specs(registry)
    out: engine.Prompt = {}
    for nid in sorted(prompt, key=engine._id_key):
        node = prompt[nid]
        spec = specs.get(node.get("class_type"))
        order = list(spec.inputs) if spec is not None else []
        inputs = node.get("inputs") or {}
        ordered = {k: inputs[k] for k in order if k in inputs}
        ordered.update({k: v for k, v in inputs.items() if k not in ordered})
        out[nid] = {**node, "inputs": ordered}
    return out


# --- layout checks ----------------------------------------------------------------------------

def node_box(node: Mapping) -> tuple[float, float, float, float]:
    """(x, y, w, h) of a node including its title bar, as the frontend draws it."""
    x, y = node["pos"][:2]
    w, h = node["size"][:2]
    return (float(x), float(y) - TITLE_H, float(w), float(h) + TITLE_H)


def _overlap(a, b) -> float:
    w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    h = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return w * h if w > 0 and h > 0 else 0.0


def layout_problems(data: Mapping, registry: Registry | None = None) -> list[str]:
    """What is wrong with a UI workflow's layout: overlapping nodes (title bars
    included), a node outside every group or in two, a group overlapping another, a node
    smaller than the frontend's minimum for its widgets (when ``registry`` is given)."""
    nodes = data.get("nodes") or []
    groups = data.get("groups") or []
    problems = []
    boxes = [(n, node_box(n)) for n in nodes]
    for i, (a, ba) in enumerate(boxes):
        for b, bb in boxes[i + 1:]:
            if _overlap(ba, bb):
                problems.append(f"node {a['id']} ({a['type']}) overlaps node {b['id']} "
                                f"({b['type']})")
    for i, ga in enumerate(groups):
        for gb in groups[i + 1:]:
            if _overlap(ga["bounding"], gb["bounding"]):
                problems.append(f"group '{ga['title']}' overlaps group '{gb['title']}'")
    for n, box in boxes:
        inside = [g["title"] for g in groups if _inside(box, g["bounding"])]
        touching = [g["title"] for g in groups if _overlap(box, g["bounding"])]
        if n["type"] in UI_NOTE_TYPES:
            if touching:
                problems.append(f"note {n['id']} lies on group(s) {touching}")
            continue
        if len(inside) != 1 or len(touching) != 1:
            problems.append(f"node {n['id']} ({n['type']}) is inside groups {inside} and "
                            f"touches {touching}; expected inside exactly one group")
    if registry is not None:
        specs = engine._Specs(registry)
        for n in nodes:
            spec = specs.get(n["type"])
            if spec is None:
                continue
            need = min_height(spec)
            if n["size"][1] < need:
                problems.append(f"node {n['id']} ({n['type']}) is {n['size'][1]} px high; "
                                f"its widgets need {need}")
    return problems


def _inside(box, bounding) -> bool:
    gx, gy, gw, gh = bounding
    x, y, w, h = box
    return gx + 1 <= x and x + w <= gx + gw - 1 and gy + GROUP_TITLE_BAR <= y \
        and y + h <= gy + gh - 1


# --- files ------------------------------------------------------------------------------------

def dumps(data: Any) -> str:
    """The text of a workflow file: 2-space JSON, key order kept, a final newline."""
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


@dataclasses.dataclass(frozen=True)
class Shipped:
    name: str
    api: Path       # workflows/api/<name>_api.json
    layout: Path    # workflows/api/<name>.layout.json
    ui: Path        # workflows/<name>.json

    @property
    def thumbnail(self) -> Path:    # workflows/<name>.jpg, the template browser's card
        return self.ui.with_suffix(".jpg")


API_SUBDIR = "api"
API_SUFFIX = "_api.json"
LAYOUT_SUFFIX = ".layout.json"
MODELS_FILE = "models.json"     # in api/: {file name: {"directory", "url"}} of the models


def load_models(path: str | Path) -> dict[str, dict]:
    """A models.json (keys starting with "_" are comments), or {} when there is none."""
    path = Path(path)
    if not path.exists():
        return {}
    data = engine.load_file(path)
    models = {k: v for k, v in data.items() if not k.startswith("_")}
    for k, v in models.items():
        if not (isinstance(v, Mapping) and isinstance(v.get("directory"), str)
                and str(v.get("url", "")).startswith("https://")):
            raise WorkflowFileError(f"{path}: {k!r} needs a 'directory' (a folder of "
                                    "ComfyUI/models) and an https 'url'")
    return models


def shipped(folder: str | Path) -> list[Shipped]:
    """The workflows of a folder that have a layout in ``<folder>/api/``."""
    folder = Path(folder)
    out = []
    for layout in sorted((folder / API_SUBDIR).glob(f"*{LAYOUT_SUFFIX}")):
        name = layout.name[:-len(LAYOUT_SUFFIX)]
        out.append(Shipped(name, folder / API_SUBDIR / f"{name}{API_SUFFIX}", layout,
                           folder / f"{name}.json"))
    return out


def render(item: Shipped, registry: Registry) -> tuple[str, str, list[str]]:
    """(UI text, API twin text, ids of nodes the layout did not name) for a workflow."""
    prompt = to_api(engine.load_file(item.api), registry)
    layout = Layout.load(item.layout)
    _, added = _assign_stages(normalize_api(prompt), layout)
    ui = api_to_ui(prompt, registry, layout, name=item.name,
                   source=f"{API_SUBDIR}/{item.api.name} + {API_SUBDIR}/{item.layout.name}")
    twin = ui_to_api_twin(ui, registry)
    return dumps(ui), dumps(twin), added


def sync(folder: str | Path, registry: Registry, *, check: bool = False,
         log=print) -> list[Path]:
    """Regenerate every ``<folder>/<name>.json`` from ``api/<name>_api.json`` and
    ``api/<name>.layout.json``, then the API twin from it, and draw ``<name>.jpg`` where
    it is missing. Returns the files that changed (with ``check``, that would change;
    nothing is written)."""
    items = shipped(folder)
    if not items:
        raise WorkflowFileError(f"no {API_SUBDIR}/*{LAYOUT_SUFFIX} files in {folder}; "
                                "expected the shipped workflows' sources there")
    changed = []
    for item in items:
        ui_text, api_text, added = render(item, registry)
        for nid in added:
            log(f"note: {item.layout.name} does not place node {nid}; it joins the stage of "
                "its inputs (add it to a stage to choose)")
        for path, text in ((item.ui, ui_text), (item.api, api_text)):
            old = path.read_text(encoding="utf-8") if path.exists() else None
            if old != text:
                changed.append(path)
                if not check:
                    path.write_text(text, encoding="utf-8")
        problems = layout_problems(json.loads(ui_text), registry)
        if problems:
            raise WorkflowError([f"{item.ui.name}: {p}" for p in problems])
        # The thumbnail is drawn once (delete it to draw it again): JPEG bytes depend on
        # the Pillow version and fonts, so a check only asks that it exists.
        if not item.thumbnail.exists():
            changed.append(item.thumbnail)
            if not check:
                from . import workflow_thumbnails

                workflow_thumbnails.write(item.thumbnail, workflow_thumbnails.thumbnail_for(
                    item.api, item.layout, Layout.load(item.layout).note))
    return changed
