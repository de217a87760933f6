"""The graph engine for ComfyUI workflows in the API form: load, validate, execute.

A generic engine. It knows nothing about the pack: it receives a registry
``{class_type: node class}`` of classic-style ComfyUI nodes (``INPUT_TYPES`` classmethod,
``RETURN_TYPES``, ``FUNCTION``, optional ``RETURN_NAMES`` / ``OUTPUT_NODE`` /
``VALIDATE_INPUTS``) and never imports ComfyUI or the pack's ``nodes`` package. Reading
the UI format is :mod:`.workflow_ui`'s job.

The pipeline reads top to bottom::

    data = load_file(path)                       # JSON, UI or API format
    prompt = workflow_ui.to_api(data, registry)  # UI format converted to the API form
    prompt = apply_overrides(prompt, ["3.seed=7"], registry)
    prompt = check(prompt, registry)             # every problem at once, or WorkflowError
    result = execute(prompt, registry, on_node=print)

API form (what ComfyUI's "Save (API)" writes)::

    {"3": {"class_type": "KSampler", "inputs": {"seed": 5, "model": ["4", 0]}}}

where a two-item list ``[source node id, output index]`` is a link.

Behaviour worth knowing (it follows ComfyUI where ComfyUI is defined):

* UI-format conversion (widgets, seed controls, Reroute, PrimitiveNode, muted and
  bypassed nodes) follows ComfyUI's frontend: see :mod:`.workflow_ui`.
* Validation covers every node, not only those feeding an output, so ``xmgie check``
  reports all problems at once. Extra inputs a node does not declare are ignored
  (ComfyUI does the same).

Execution semantics, against ComfyUI's ``execution.py`` (read at version 0.3.64):

Followed:

* A prompt without an output node (``OUTPUT_NODE = True``) is rejected before anything
  runs, with ComfyUI's error type and message (``prompt_no_outputs``, "Prompt has no
  outputs"): :func:`require_outputs`, through :func:`check_runnable`, which
  :func:`execute` and ``xmgie check/run`` call.
* Only the nodes the output nodes need run, each once, dependencies first.
* Every node runs inside ``torch.inference_mode()``, as ``PromptExecutor.execute`` runs
  the whole prompt, so tensors made by nodes (model weights included) are inference
  tensors unless the node says otherwise. Stages that need autograd use
  ``mgie_core.grad_mode.autograd`` and loaders ``grad_mode.loading``, in both hosts.
* Hidden inputs PROMPT, EXTRA_PNGINFO and UNIQUE_ID; ``{"ui": ..., "result": ...}``
  return values (any node may return ``ui``, ComfyUI stores it in the history).
* ``VALIDATE_INPUTS`` is called with the literal inputs it names; interruption is
  checked before each node (ComfyUI's ``before_node_execution``) and by the nodes'
  progress updates.
* A node's exception stops the run and names the node.

Not followed:

* No caching between runs: every ``xmgie run`` executes every needed node (ComfyUI keeps
  outputs of unchanged nodes between prompts, so a node may get its inputs' objects
  from a previous run: the pack's controls reset their per-run state in ``setup``).
* ``IS_CHANGED`` / ``fingerprint_inputs`` are not called (there is no cache to
  invalidate).
* Lazy inputs (``"lazy": True`` and ``check_lazy_status``) are not evaluated lazily:
  every linked input is computed before the node runs.
* ``INPUT_IS_LIST`` / ``OUTPUT_IS_LIST`` list semantics (mapping a node over list
  inputs) are not implemented: values are passed as they are.
* V3 nodes (``comfy_api`` ``io.ComfyNode`` classes with ``define_schema``) are not
  supported, nor node expansion (subgraphs returned by a node), async nodes or
  ``ExecutionBlocker``; the pack's nodes are classic nodes.
* ComfyUI validates only the nodes reachable from an output node, and runs the outputs
  that validate while ignoring (and logging) those that do not; the runner validates
  every node, reports every problem, and runs nothing when there is one.
"""

from __future__ import annotations

import dataclasses
import difflib
import heapq
import inspect
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..mgie_core import host
from ..mgie_core.errors import XMGIEError

log = logging.getLogger(__name__)

Registry = Mapping[str, type]
Prompt = dict[str, dict]

# Input types edited with a widget in ComfyUI's frontend; any other type is a socket.
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")
# Hidden inputs the runner supplies, by ComfyUI's hidden type name.
HIDDEN_PROMPT, HIDDEN_EXTRA_PNGINFO, HIDDEN_UNIQUE_ID = "PROMPT", "EXTRA_PNGINFO", "UNIQUE_ID"


# --- errors and results -----------------------------------------------------------------

class WorkflowError(XMGIEError):
    """One or more problems with a workflow; ``errors`` holds one message per problem.

    Raised for validation (all problems at once) and, with ``node_id``/``class_type`` set,
    for an exception inside a node (the original exception is the ``__cause__``)."""

    def __init__(self, errors: Iterable[str] | str, *, node_id: str | None = None,
                 class_type: str | None = None):
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        self.node_id = node_id
        self.class_type = class_type
        if len(self.errors) == 1:
            text = self.errors[0]
        else:
            text = f"{len(self.errors)} problems in the workflow:\n" + \
                "\n".join(f"  - {e}" for e in self.errors)
        super().__init__(text)


class NoOutputsError(WorkflowError):
    """The prompt has no output node: ComfyUI refuses it with ``prompt_no_outputs``."""

    type = "prompt_no_outputs"
    message = "Prompt has no outputs"   # ComfyUI's wording


class WorkflowFileError(WorkflowError):
    """The workflow file is missing, unreadable or not a JSON workflow."""


@dataclasses.dataclass(frozen=True)
class NodeTiming:
    node_id: str
    class_type: str
    seconds: float


@dataclasses.dataclass
class RunResult:
    """What :func:`execute` did: outputs of every executed node, the ``"ui"`` dicts the
    output nodes returned, and per-node timings in execution order."""

    outputs: dict[str, tuple]
    ui: dict[str, dict]
    timings: list[NodeTiming]

    @property
    def executed(self) -> list[str]:
        return [t.node_id for t in self.timings]


# --- node specs -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class InputSpec:
    name: str
    type: Any                      # a type name, or a list of choices for a combo
    options: dict
    required: bool

    @property
    def choices(self) -> list | None:
        """The allowed values of a combo input (classic list form or "COMBO" + options)."""
        if isinstance(self.type, (list, tuple)):
            return list(self.type)
        if self.type == "COMBO" and isinstance(self.options.get("options"), (list, tuple)):
            return list(self.options["options"])
        return None

    @property
    def takes_value(self) -> bool:
        """A combo or a primitive: the API form may give it a literal value."""
        return self.choices is not None or self.type in WIDGET_TYPES

    @property
    def is_widget(self) -> bool:
        """Edited with a widget in the frontend (so stored in ``widgets_values``):
        ``forceInput`` makes a primitive a plain socket with no stored value."""
        return self.takes_value and not self.options.get("forceInput")

    @property
    def type_name(self) -> str:
        return "COMBO" if self.choices is not None else str(self.type)


@dataclasses.dataclass(frozen=True)
class NodeSpec:
    class_type: str
    cls: type
    inputs: dict[str, InputSpec]   # required then optional, in declaration order
    hidden: dict[str, str]         # input name -> hidden type name
    return_types: tuple
    output_node: bool

    @property
    def widgets(self) -> list[InputSpec]:
        return [i for i in self.inputs.values() if i.is_widget]


def _parse_input(name: str, raw: Any, required: bool) -> InputSpec:
    # ("INT", {...}), ("IMAGE",) or (["a", "b"], {...}); tolerate a bare type name.
    if isinstance(raw, (list, tuple)) and raw:
        type_ = raw[0]
        opts = raw[1] if len(raw) > 1 and isinstance(raw[1], dict) else {}
    else:
        type_, opts = raw, {}
    return InputSpec(name, type_, dict(opts), required)


def node_spec(class_type: str, cls: type) -> NodeSpec:
    """Read a node class's declarations (calls ``INPUT_TYPES`` once)."""
    declared = cls.INPUT_TYPES() or {}
    inputs: dict[str, InputSpec] = {}
    for section, required in (("required", True), ("optional", False)):
        for name, raw in (declared.get(section) or {}).items():
            inputs[name] = _parse_input(name, raw, required)
    hidden = {}
    for name, raw in (declared.get("hidden") or {}).items():
        hidden[name] = raw[0] if isinstance(raw, (list, tuple)) else str(raw)
    return_types = tuple(getattr(cls, "RETURN_TYPES", ()) or ())
    return NodeSpec(class_type, cls, inputs, hidden, return_types,
                    bool(getattr(cls, "OUTPUT_NODE", False)))


class _Specs:
    """Node specs of one registry, read once per operation (dropdown lists can change
    between operations, e.g. after ``--tiny``, so nothing is cached globally)."""

    def __init__(self, registry: Registry):
        self.registry = registry
        self._cache: dict[str, NodeSpec] = {}
        self.failures: dict[str, str] = {}

    def get(self, class_type: str) -> NodeSpec | None:
        if class_type in self._cache:
            return self._cache[class_type]
        cls = self.registry.get(class_type)
        if cls is None or class_type in self.failures:
            return None
        try:
            spec = node_spec(class_type, cls)
        except Exception as exc:  # a broken INPUT_TYPES is reported, not fatal to the rest
            self.failures[class_type] = f"{type(exc).__name__}: {exc}"
            return None
        self._cache[class_type] = spec
        return spec


# --- loading ----------------------------------------------------------------------------

def load_file(path: str | Path) -> dict:
    """Read a workflow JSON file (UI or API format)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise WorkflowFileError(f"workflow file not found: {path}") from None
    except OSError as exc:
        raise WorkflowFileError(f"cannot read workflow file {path}: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise WorkflowFileError(
            f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
            "expected a ComfyUI workflow saved with Save or Save (API)") from exc
    except RecursionError:
        raise WorkflowFileError(_too_deep(path)) from None
    if not isinstance(data, dict):
        raise WorkflowFileError(f"{path} holds a JSON {type(data).__name__}; expected a "
                                "ComfyUI workflow object (UI or API format)")
    if nesting_depth(data) > MAX_JSON_DEPTH:
        raise WorkflowFileError(_too_deep(path))
    return data


# ComfyUI's own files nest about ten levels (subgraphs a few more); far deeper nesting
# would only make recursive code (repr, json.dumps of the prompt into PNGs) fail later.
MAX_JSON_DEPTH = 100


def _too_deep(path: str | Path) -> str:
    return (f"{path} nests JSON arrays/objects more than {MAX_JSON_DEPTH} levels deep; "
            "expected a ComfyUI workflow saved with Save or Save (API)")


def nesting_depth(data: Any) -> int:
    """How deeply lists/dicts nest in ``data`` (iterative: any depth is measured)."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        obj, depth = stack.pop()
        if isinstance(obj, (dict, list)):
            deepest = max(deepest, depth)
            stack += [(v, depth + 1) for v in (obj.values() if isinstance(obj, dict) else obj)]
    return deepest


def is_link(value: Any) -> bool:
    """API-form link: ``[source node id, output index]``."""
    return (isinstance(value, (list, tuple)) and len(value) == 2
            and isinstance(value[0], (str, int)) and not isinstance(value[0], bool)
            and isinstance(value[1], int) and not isinstance(value[1], bool))


def _types_match(a: Any, b: Any) -> bool:
    """ComfyUI's socket compatibility: equal, "*" on either side, or a shared member of
    comma-separated unions; a combo (list) counts as "COMBO"."""
    a = "COMBO" if isinstance(a, (list, tuple)) else str(a)
    b = "COMBO" if isinstance(b, (list, tuple)) else str(b)
    if "*" in (a, b):
        return True
    return bool(set(a.split(",")) & set(b.split(",")))



# --- overrides --------------------------------------------------------------------------

def parse_override(text: str) -> tuple[str, str, str]:
    """Split ``NODE_ID.INPUT=VALUE`` into its three parts (the value still as text)."""
    target, sep, value = text.partition("=")
    node_id, dot, name = target.strip().rpartition(".")
    if not sep or not dot or not node_id or not name:
        raise WorkflowError(f"override {text!r}: expected NODE_ID.INPUT=VALUE, "
                            "e.g. 3.seed=42 or 6.text=\"a red car\"")
    return node_id, name, value


def _override_value(text: str, spec: InputSpec | None) -> Any:
    # JSON when possible (numbers, booleans, links like ["4", 0]); text otherwise. A
    # STRING or combo input keeps the raw text, so 6.text=123 stays the string "123".
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return text
    if nesting_depth(value) > MAX_JSON_DEPTH:
        return text
    if spec is not None and (spec.type == "STRING" or spec.choices is not None) \
            and not isinstance(value, str) and not is_link(value):
        return text
    return value


def apply_overrides(prompt: Prompt, overrides: Iterable[str], registry: Registry) -> Prompt:
    """Return a copy of ``prompt`` with ``NODE_ID.INPUT=VALUE`` overrides applied.

    All bad overrides are reported together in one WorkflowError."""
    out = {nid: {**node, "inputs": dict(node.get("inputs") or {})} for nid, node in prompt.items()}
    specs = _Specs(registry)
    errors = []
    for text in overrides:
        try:
            node_id, name, raw = parse_override(text)
        except WorkflowError as exc:
            errors += exc.errors
            continue
        node = out.get(node_id)
        if node is None:
            ids = sorted(out, key=_id_key)
            shown = ", ".join(ids[:30]) + (", ..." if len(ids) > 30 else "")
            errors.append(f"override {text!r}: there is no node {node_id}; expected one of "
                          f"the workflow's node ids ({shown})")
            continue
        spec = specs.get(node.get("class_type"))
        input_spec = spec.inputs.get(name) if spec is not None else None
        if input_spec is None and name not in node["inputs"]:
            known = list(spec.inputs) if spec is not None else list(node["inputs"])
            errors.append(f"override {text!r}: node {node_id} ({node.get('class_type')}) has "
                          f"no input '{name}'; expected one of {', '.join(known) or '(none)'}")
            continue
        value = _override_value(raw, input_spec)
        node["inputs"][name] = [str(value[0]), value[1]] if is_link(value) else value
    if errors:
        raise WorkflowError(errors)
    return out


# --- validation -------------------------------------------------------------------------

def _where(node_id: str, class_type: Any, name: str | None = None) -> str:
    return f"node {node_id} ({class_type})" + (f", input '{name}'" if name else "")


def _describe(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) \
        else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_widget(spec: InputSpec, value: Any) -> tuple[Any, str | None]:
    """Check a literal value for a widget input; return (normalized value, problem)."""
    choices = spec.choices
    if choices is not None:
        if value in choices:
            return value, None
        shown = ", ".join(_describe(c) for c in choices[:12])
        shown += ", ..." if len(choices) > 12 else ""
        return value, (f"{_describe(value)} is not one of the choices; "
                       f"expected one of {shown or '(none)'}")
    lo, hi = spec.options.get("min"), spec.options.get("max")
    if spec.type == "INT":
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            return value, f"{_describe(value)} is not an integer; expected an INT"
    elif spec.type == "FLOAT":
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not is_number or not math.isfinite(value):
            return value, f"{_describe(value)} is not a number; expected a FLOAT"
        value = float(value)
    elif spec.type == "STRING":
        ok = isinstance(value, str)
        return value, None if ok else f"{_describe(value)} is not a string; expected a STRING"
    elif spec.type == "BOOLEAN":
        ok = isinstance(value, bool)
        return value, None if ok else f"{_describe(value)} is not true/false; expected a BOOLEAN"
    if lo is not None and value < lo or hi is not None and value > hi:
        return value, (f"{_describe(value)} is out of range; expected a {spec.type} between "
                       f"{lo if lo is not None else '-inf'} and {hi if hi is not None else 'inf'}")
    return value, None


def _check_link(prompt: Prompt, specs: _Specs, input_spec: InputSpec, link: list) -> str | None:
    src_id, index = str(link[0]), link[1]
    src = prompt.get(src_id)
    if src is None:
        return (f"links to node {src_id}, which does not exist; "
                "expected a link to a node of this workflow")
    src_spec = specs.get(src.get("class_type"))
    if src_spec is None:
        return None  # the source's own error (unknown class) says what is wrong
    n_out = len(src_spec.return_types)
    if not 0 <= index < n_out:
        return (f"links to output {index} of node {src_id} ({src_spec.class_type}), which has "
                f"{n_out} output(s); expected an index from 0 to {n_out - 1}")
    out_type = src_spec.return_types[index]
    if not _types_match(out_type, input_spec.type):
        shown = "COMBO" if isinstance(out_type, (list, tuple)) else out_type
        return (f"links to output {index} of node {src_id} ({src_spec.class_type}), which is "
                f"{shown}; expected {input_spec.type_name}")
    return None


def _check_node(prompt: Prompt, specs: _Specs, node_id: str, node: dict) -> list[str]:
    """Problems of one node; also normalizes its literal values in place (e.g. 8.0 -> 8)."""
    class_type = node.get("class_type") if isinstance(node, dict) else None
    if not isinstance(class_type, str):
        return [f"node {node_id}: has no class_type; expected an object with 'class_type' "
                "and 'inputs'"]
    spec = specs.get(class_type)
    if spec is None:
        if class_type in specs.failures:
            return [f"{_where(node_id, class_type)}: its INPUT_TYPES failed "
                    f"({specs.failures[class_type]}); expected a loadable node definition"]
        close = difflib.get_close_matches(class_type, list(specs.registry), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        return [f"{_where(node_id, class_type)}: unknown class_type '{class_type}'{hint}; "
                "expected a node of this pack or a ComfyUI core node the runner stands in for"]
    errors = []
    inputs = node.setdefault("inputs", {})
    for name, input_spec in spec.inputs.items():
        if name not in inputs:
            if input_spec.required:
                expected = (f"a {input_spec.type_name} value" if input_spec.takes_value
                            else f"a link from an output of type {input_spec.type_name}")
                errors.append(f"{_where(node_id, class_type, name)}: required input is missing; "
                              f"expected {expected}")
            continue
        value = inputs[name]
        if is_link(value):
            problem = _check_link(prompt, specs, input_spec, value)
        elif input_spec.type == "*":
            problem = None
        elif input_spec.takes_value:
            inputs[name], problem = _check_widget(input_spec, value)
        else:
            problem = (f"got the value {_describe(value)}; expected a link from an output "
                       f"of type {input_spec.type_name}")
        if problem:
            errors.append(f"{_where(node_id, class_type, name)}: {problem}")
    if not errors:
        errors += _validate_inputs_hook(spec, node_id, inputs)
    return errors


def _validate_inputs_hook(spec: NodeSpec, node_id: str, inputs: dict) -> list[str]:
    """Call a node's own ``VALIDATE_INPUTS`` (ComfyUI's hook, e.g. "does the file exist")
    with the literal values it asks for; skipped when one of them comes from a link."""
    hook = getattr(spec.cls, "VALIDATE_INPUTS", None)
    if hook is None:
        return []
    kwargs = {}
    for pname, param in inspect.signature(hook).parameters.items():
        if param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
            continue
        value = inputs.get(pname)
        if pname in inputs and not is_link(value):
            kwargs[pname] = value
        elif param.default is param.empty:
            return []  # its value is only known at run time
    try:
        verdict = hook(**kwargs)
    except Exception as exc:
        verdict = f"{type(exc).__name__}: {exc}"
    if verdict is True:
        return []
    return [f"{_where(node_id, spec.class_type)}: {verdict}"]


def _find_cycles(prompt: Prompt) -> list[str]:
    """One message per link that closes a cycle (depth-first search, back edges).

    Iterative (an explicit stack), so a chain of thousands of nodes is checked without
    reaching Python's recursion limit."""
    deps = _dependencies(prompt)
    state: dict[str, int] = {}   # 1 = on the current path, 2 = done
    errors = []
    for root in sorted(prompt, key=_id_key):
        if root in state:
            continue
        path: list[str] = [root]
        state[root] = 1
        stack = [iter(deps[root])]          # the links still to follow, per path node
        while stack:
            step = next(stack[-1], None)
            if step is None:
                state[path.pop()] = 2
                stack.pop()
                continue
            name, src = step
            if state.get(src) == 1:
                node_id = path[-1]
                loop = path[path.index(src):] + [src]
                shown = list(reversed(loop))
                if len(shown) > 12:
                    shown = shown[:6] + [f"... ({len(loop) - 11} more) ..."] + shown[-5:]
                errors.append(f"{_where(node_id, prompt[node_id].get('class_type'), name)}: "
                              f"links to node {src}, which depends on this node (cycle "
                              f"{' -> '.join(shown)}); expected a graph without cycles")
            elif src not in state:
                state[src] = 1
                path.append(src)
                stack.append(iter(deps[src]))
    return errors


def validate(prompt: Prompt, registry: Registry) -> list[str]:
    """Every problem of the workflow, one message each (empty when it can run).

    Literal values are normalized in place (an INT given as 8.0 becomes 8)."""
    if not prompt:
        return ["the workflow has no nodes; expected at least one node"]
    specs = _Specs(registry)
    errors = []
    for node_id in sorted(prompt, key=_id_key):
        errors += _check_node(prompt, specs, node_id, prompt[node_id])
    errors += _find_cycles(prompt)
    return errors


def check(prompt: Prompt, registry: Registry) -> Prompt:
    """Validate a copy of ``prompt``; return it normalized, or raise WorkflowError."""
    prompt = {nid: {**node, "inputs": dict(node.get("inputs") or {})} if isinstance(node, dict)
              else node for nid, node in prompt.items()}
    errors = validate(prompt, registry)
    if errors:
        raise WorkflowError(errors)
    return prompt


# --- ordering ---------------------------------------------------------------------------

def _id_key(node_id: str) -> tuple:
    # Numeric ids in numeric order ("2" before "10"), others after, by text.
    return (0, int(node_id), "") if node_id.isdigit() else (1, 0, node_id)


def _dependencies(prompt: Prompt) -> dict[str, list[tuple[str, str]]]:
    """node id -> [(input name, source node id)] for links to existing nodes."""
    deps = {}
    for node_id, node in prompt.items():
        inputs = node.get("inputs") or {} if isinstance(node, dict) else {}
        deps[node_id] = [(name, str(v[0])) for name, v in inputs.items()
                         if is_link(v) and str(v[0]) in prompt]
    return deps


def output_nodes(prompt: Prompt, registry: Registry) -> list[str]:
    """Ids of the nodes whose class is an output node (OUTPUT_NODE = True)."""
    return [nid for nid in sorted(prompt, key=_id_key)
            if getattr(registry.get(prompt[nid].get("class_type")), "OUTPUT_NODE", False)]


def require_outputs(prompt: Prompt, registry: Registry) -> list[str]:
    """The output nodes of ``prompt``; raises :class:`NoOutputsError` when it has none,
    as ComfyUI's ``validate_prompt`` does (type ``prompt_no_outputs``, message "Prompt
    has no outputs") before it validates or runs anything."""
    outputs = output_nodes(prompt, registry)
    if not outputs:
        known = [nid for nid in prompt if registry.get(prompt[nid].get("class_type"))]
        hint = "" if known else " (none of its node types is known)"
        raise NoOutputsError(f"{NoOutputsError.type}: {NoOutputsError.message}{hint}; "
                             "expected at least one output node (SaveImage, PreviewImage or "
                             "another node with OUTPUT_NODE = True): ComfyUI refuses such a "
                             "prompt and runs nothing. Add a SaveImage or PreviewImage node.")
    return outputs


def check_runnable(prompt: Prompt, registry: Registry) -> Prompt:
    """:func:`check`, plus :func:`require_outputs`: what ComfyUI's ``/prompt`` accepts.
    Every problem comes in one WorkflowError; a prompt whose only problem is the missing
    output node raises :class:`NoOutputsError`."""
    try:
        require_outputs(prompt, registry)
        missing_outputs = None
    except NoOutputsError as exc:
        missing_outputs = exc
    try:
        checked = check(prompt, registry)
    except WorkflowError as exc:
        if missing_outputs is not None:
            raise WorkflowError(exc.errors + missing_outputs.errors) from None
        raise
    if missing_outputs is not None:
        raise missing_outputs
    return checked


def execution_order(prompt: Prompt, registry: Registry) -> list[str]:
    """The nodes to run, dependencies first: those the output nodes need. Ties are
    broken by node id, so runs are repeatable. Expects a validated (acyclic) prompt with
    an output node."""
    deps = _dependencies(prompt)
    needed: set[str] = set()
    stack = require_outputs(prompt, registry)
    while stack:
        node_id = stack.pop()
        if node_id not in needed:
            needed.add(node_id)
            stack += [src for _, src in deps[node_id]]
    return _topological(deps, needed)


def topological_order(prompt: Prompt) -> list[str]:
    """Every node of the prompt, dependencies first, ties broken by node id (what a
    layout needs; running follows :func:`execution_order`)."""
    deps = _dependencies(prompt)
    return _topological(deps, set(deps))


def _topological(deps: dict[str, list], nodes: set[str]) -> list[str]:
    """Kahn's algorithm over ``nodes``, smallest ready id first."""
    waiting = {nid: {src for _, src in deps[nid] if src in nodes} for nid in nodes}
    users: dict[str, list[str]] = {nid: [] for nid in nodes}
    for nid, sources in waiting.items():
        for src in sources:
            users[src].append(nid)
    ready = [(_id_key(nid), nid) for nid, sources in waiting.items() if not sources]
    heapq.heapify(ready)
    order = []
    while ready:
        _, nid = heapq.heappop(ready)
        order.append(nid)
        for user in users[nid]:
            waiting[user].discard(nid)
            if not waiting[user]:
                heapq.heappush(ready, (_id_key(user), user))
    if len(order) != len(nodes):
        raise WorkflowError("the workflow has a cycle; run check() first")
    return order


# --- execution --------------------------------------------------------------------------

def _node_kwargs(spec: NodeSpec, node_id: str, node: dict, outputs: dict[str, tuple],
                 prompt: Prompt, extra_pnginfo: dict) -> dict[str, Any]:
    kwargs = {}
    for name in spec.inputs:
        if name in node["inputs"]:
            value = node["inputs"][name]
            # Outputs are passed by reference: nodes clone before changing in place.
            kwargs[name] = outputs[str(value[0])][value[1]] if is_link(value) else value
    hidden_values = {HIDDEN_PROMPT: prompt, HIDDEN_EXTRA_PNGINFO: extra_pnginfo,
                     HIDDEN_UNIQUE_ID: node_id}
    by_name = {"prompt": HIDDEN_PROMPT, "extra_pnginfo": HIDDEN_EXTRA_PNGINFO,
               "unique_id": HIDDEN_UNIQUE_ID}
    for name, hidden_type in spec.hidden.items():
        key = hidden_type if hidden_type in hidden_values else by_name.get(name)
        if key is not None:
            kwargs[name] = hidden_values[key]
    return kwargs


def _split_result(spec: NodeSpec, node_id: str, result: Any) -> tuple[tuple, dict | None]:
    """A node returns its outputs as a tuple, or {"ui": ..., "result": tuple}."""
    ui = None
    if isinstance(result, dict):
        ui = result.get("ui")
        result = result.get("result", ())
    result = tuple(result) if isinstance(result, (tuple, list)) else \
        (() if result is None else (result,))
    if len(result) < len(spec.return_types):
        raise WorkflowError(
            f"{_where(node_id, spec.class_type)}: returned {len(result)} value(s); expected "
            f"{len(spec.return_types)} ({', '.join(map(str, spec.return_types))})",
            node_id=node_id, class_type=spec.class_type)
    return result, ui


def _run_node(spec: NodeSpec, node_id: str, kwargs: dict) -> Any:
    try:
        return getattr(spec.cls(), spec.cls.FUNCTION)(**kwargs)
    except host.Interrupted:
        raise
    except Exception as exc:
        # Our own errors already read well; others get their type name for context.
        reason = str(exc) if isinstance(exc, XMGIEError) else f"{type(exc).__name__}: {exc}"
        raise WorkflowError(f"{_where(node_id, spec.class_type)} failed: {reason}",
                            node_id=node_id, class_type=spec.class_type) from exc


def execute(prompt: Prompt, registry: Registry, *,
            on_node: Callable[[NodeTiming], None] | None = None,
            extra_pnginfo: dict | None = None) -> RunResult:
    """Validate, then run the nodes the outputs need, each once, in dependency order,
    inside ``torch.inference_mode()`` as ComfyUI does.

    A prompt without an output node raises :class:`NoOutputsError` (ComfyUI's
    ``prompt_no_outputs``). ``on_node`` is called after each node with its timing.
    ``extra_pnginfo`` is what nodes asking for the hidden EXTRA_PNGINFO get (ComfyUI
    passes {"workflow": ui}). A failing node raises WorkflowError naming it (original
    exception as __cause__); host.Interrupted and KeyboardInterrupt pass through
    unchanged."""
    prompt = check_runnable(prompt, registry)
    with torch.inference_mode():
        return _execute(prompt, registry, on_node, dict(extra_pnginfo or {}))


def _execute(prompt: Prompt, registry: Registry,
             on_node: Callable[[NodeTiming], None] | None, extra_pnginfo: dict
             ) -> RunResult:
    specs = _Specs(registry)
    result = RunResult(outputs={}, ui={}, timings=[])
    for node_id in execution_order(prompt, registry):
        host.check_interrupt()
        node = prompt[node_id]
        spec = specs.get(node["class_type"])
        kwargs = _node_kwargs(spec, node_id, node, result.outputs, prompt, extra_pnginfo)
        start = time.perf_counter()
        outputs, ui = _split_result(spec, node_id, _run_node(spec, node_id, kwargs))
        timing = NodeTiming(node_id, spec.class_type, time.perf_counter() - start)
        result.outputs[node_id] = outputs
        if ui is not None:
            result.ui[node_id] = ui
        result.timings.append(timing)
        log.debug("[%s] %s: %.2f s", node_id, spec.class_type, timing.seconds)
        if on_node is not None:
            on_node(timing)
    host.check_interrupt()
    return result
