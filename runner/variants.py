"""Named variants of one workflow, for ablations: node inputs set, nodes bypassed.

A variants file (``--variants V.json``)::

    {"variants": {
        "full":   {"description": "every component"},
        "no_pfb": {"description": "without PFB", "bypass": ["XMGIEPFBControl"]},
        "no_cam": {"set": {"XMGIECAMSampler.cam_in_words": "",
                           "XMGIECAMSampler.cam_out_words": ""}}
    }}

(the top-level object may also be the ``variants`` mapping itself). A node is named by its
id, its class_type (every node of that class) or its title, so one file serves the UI
and the API form of a workflow. ``set`` writes literal values (JSON-typed, no parsing);
``bypass`` removes nodes as ComfyUI's Bypass does: each output is replaced by the
node's input of the same type (the input at the same position first, then the first of
that type); an output with no such input leaves the inputs it fed unset. Values set by a
variant win over the values a dataset maps onto the same inputs. A variant with neither
``set`` nor ``bypass`` is the workflow as it is.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..mgie_core.errors import XMGIEError
from . import engine
from .dataset import safe_id


class VariantError(XMGIEError, ValueError):
    """A variants file or a variant that does not fit the workflow."""


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    set: dict[str, Any] = dataclasses.field(default_factory=dict)     # "NODE.INPUT" -> value
    bypass: tuple[str, ...] = ()                                      # node selectors
    description: str = ""

    @property
    def is_base(self) -> bool:
        """No change: the workflow as it is (its items are the base run's)."""
        return not self.set and not self.bypass

    def to_json(self) -> dict:
        return {"name": self.name, "description": self.description, "set": dict(self.set),
                "bypass": list(self.bypass)}

    @classmethod
    def from_json(cls, data: Mapping) -> Variant:
        return cls(name=data["name"], set=dict(data.get("set") or {}),
                   bypass=tuple(data.get("bypass") or ()),
                   description=str(data.get("description") or ""))


def load_variants(path: Path | str) -> list[Variant]:
    """Read a variants file; raises VariantError naming the problem."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise VariantError(f"cannot read variants file {path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise VariantError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg})") from exc
    return parse_variants(data, str(path))


def parse_variants(data: Any, where: str = "variants") -> list[Variant]:
    if isinstance(data, dict) and isinstance(data.get("variants"), dict):
        data = data["variants"]
    if not isinstance(data, dict) or not data:
        raise VariantError(f"{where}: expected an object {{\"variants\": {{name: {{\"set\": "
                           "{...}, \"bypass\": [...]}}}}}} with at least one variant")
    out = []
    for name, spec in data.items():
        if safe_id(name) != name:
            raise VariantError(f"{where}: variant name {name!r} is not usable as a folder "
                               f"name; expected letters, digits, '.', '_' or '-' "
                               f"(e.g. {safe_id(name)!r})")
        spec = spec or {}
        if not isinstance(spec, dict):
            raise VariantError(f"{where}: variant {name!r} is a JSON {type(spec).__name__}; "
                               "expected an object with 'set' and/or 'bypass'")
        unknown = set(spec) - {"set", "bypass", "description"}
        if unknown:
            raise VariantError(f"{where}: variant {name!r} has unknown keys "
                               f"{sorted(unknown)}; expected 'set', 'bypass', 'description'")
        sets = spec.get("set") or {}
        bypass = spec.get("bypass") or []
        if isinstance(bypass, str):
            bypass = [bypass]
        if not isinstance(sets, dict) or not all("." in k for k in sets):
            raise VariantError(f"{where}: variant {name!r}: 'set' must map \"NODE.INPUT\" to "
                               "a value, e.g. {\"XMGIECAMSampler.cam_in_words\": \"\"}")
        if not isinstance(bypass, list) or not all(isinstance(b, (str, int)) for b in bypass):
            raise VariantError(f"{where}: variant {name!r}: 'bypass' must be a list of node "
                               "ids, class types or titles")
        out.append(Variant(name, dict(sets), tuple(str(b) for b in bypass),
                           str(spec.get("description") or "")))
    return out


# --- node selection ---------------------------------------------------------------------

def _id_key(node_id: str) -> tuple:
    return (0, int(node_id), "") if node_id.isdigit() else (1, 0, node_id)


def select_nodes(prompt: engine.Prompt, selector: str) -> list[str]:
    """Ids of the nodes a selector names: an id, else a class_type, else a title."""
    if selector in prompt:
        return [selector]
    by_class = [nid for nid, n in prompt.items() if n.get("class_type") == selector]
    if by_class:
        return sorted(by_class, key=_id_key)
    by_title = [nid for nid, n in prompt.items()
                if (n.get("_meta") or {}).get("title") == selector]
    return sorted(by_title, key=_id_key)


def _no_such_node(prompt: engine.Prompt, selector: str, what: str) -> VariantError:
    classes = sorted({str(n.get("class_type")) for n in prompt.values()})
    return VariantError(f"{what}: no node is named {selector!r}; expected a node id, a "
                        f"class_type or a title of the workflow (its classes: "
                        f"{', '.join(classes)})")


def parse_target(prompt: engine.Prompt, target: str, what: str) -> list[tuple[str, str]]:
    """``NODE.INPUT`` -> [(node id, input name)] for every node the selector names."""
    selector, dot, name = target.rpartition(".")
    if not dot or not selector or not name:
        raise VariantError(f"{what}: {target!r} is not NODE.INPUT (e.g. 6.cam_in_words or "
                           "XMGIECAMSampler.cam_in_words)")
    ids = select_nodes(prompt, selector)
    if not ids:
        raise _no_such_node(prompt, selector, what)
    return [(nid, name) for nid in ids]


# --- applying ---------------------------------------------------------------------------

def bypass_nodes(prompt: engine.Prompt, node_ids: list[str],
                 registry: engine.Registry) -> engine.Prompt:
    """A copy of an API prompt with ``node_ids`` bypassed (ComfyUI's rule, see the module
    docstring); chains of bypassed nodes are followed."""
    out = {nid: {**n, "inputs": dict(n.get("inputs") or {})} for nid, n in prompt.items()}
    gone = set(node_ids)

    def replacement(link: list, depth: int = 0) -> list | None:
        src = str(link[0])
        if src not in gone:
            return link
        if depth > len(prompt):
            return None
        node = prompt[src]
        cls = registry.get(node.get("class_type"))
        if cls is None:
            return None
        spec = engine.node_spec(node["class_type"], cls)
        if not 0 <= link[1] < len(spec.return_types):
            return None
        out_type = spec.return_types[link[1]]
        sockets = [i for i in spec.inputs.values() if not i.is_widget]
        order = ([link[1]] if link[1] < len(sockets) else []) + list(range(len(sockets)))
        for i in order:
            value = (node.get("inputs") or {}).get(sockets[i].name)
            if engine.is_link(value) and engine._types_match(sockets[i].type, out_type):
                return replacement(value, depth + 1)
        return None

    for nid in gone:
        out.pop(nid, None)
    for node in out.values():
        for name, value in list(node["inputs"].items()):
            if engine.is_link(value) and str(value[0]) in gone:
                new = replacement(value)
                if new is None:
                    del node["inputs"][name]
                else:
                    node["inputs"][name] = [str(new[0]), new[1]]
    return out


def apply_variant(prompt: engine.Prompt, variant: Variant,
                  registry: engine.Registry) -> tuple[engine.Prompt, set[tuple[str, str]]]:
    """The variant's prompt and the (node id, input) pairs it set (they win over values
    a dataset maps). Raises VariantError for selectors that name nothing."""
    what = f"variant {variant.name!r}"
    out = {nid: {**n, "inputs": dict(n.get("inputs") or {})} for nid, n in prompt.items()}
    fixed: set[tuple[str, str]] = set()
    for target, value in variant.set.items():
        for nid, name in parse_target(out, target, what):
            cls = registry.get(out[nid].get("class_type"))
            declared = engine.node_spec(out[nid]["class_type"], cls).inputs if cls else {}
            if name not in declared and name not in out[nid]["inputs"]:
                raise VariantError(f"{what}: node {nid} ({out[nid].get('class_type')}) has no "
                                   f"input '{name}'; expected one of "
                                   f"{', '.join(declared) or '(none)'}")
            out[nid]["inputs"][name] = value
            fixed.add((nid, name))
    gone: list[str] = []
    for selector in variant.bypass:
        ids = select_nodes(out, selector)
        if not ids:
            raise _no_such_node(out, selector, what)
        gone += ids
    if gone:
        out = bypass_nodes(out, gone, registry)
        fixed = {(nid, name) for nid, name in fixed if nid in out}
    return out, fixed
