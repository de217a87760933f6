"""Reading a model's answer: asking a vision-language model for an edit plan and turning
what it writes into a validated :class:`~.plan.EditPlan`.

Any local vision-language model can write the plan as JSON (``PLAN_PROMPT``);
:func:`parse_plan` reads real answers robustly -- a JSON-like object anywhere in the
text (read by :mod:`.tolerant_json`), else 'Key: value' lines or keys inside running
text, with key-name variants mapped by :func:`canonical_key` -- and fills what is missing
with the instruction rules (:func:`.plan_rules.complete_plan`). An answer that yields no
usable plan raises :class:`PlanParseError`, which says what to try.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from typing import Any

from .errors import InputError, XMGIEError, names_list
from .plan import FIELDS, EditPlan, as_bool, as_words
from .plan_rules import complete_plan
from .tokens import as_text, clean_word
from .tolerant_json import CutOff, NotJSONLike, Reader


class PlanParseError(XMGIEError, ValueError):
    """A vision-language model's answer could not be turned into a usable edit plan."""

    def __init__(self, problem: str, answer: str | None, missing: Sequence[str] = (),
                 truncated: bool = False):
        self.problem = problem
        self.answer = answer
        self.missing = list(missing)
        start = (answer or "").strip().replace("\n", " ")
        quoted = repr(start[:160] + ("..." if len(start) > 160 else ""))
        lines = [f"Could not read an edit plan from the model's answer: {problem}.",
                 f"The answer starts: {quoted}"]
        if self.missing:
            lines.append(f"Missing: {', '.join(self.missing)}.")
        tries = ["a larger max_new_tokens (the answer looks cut off)" if truncated
                 else "a larger max_new_tokens if the answer was cut off",
                 "another vision-language model (an instruction-tuned chat model)",
                 "giving a source caption (e.g. from BLIP-2) so only the edit is needed",
                 "or typing the prompts yourself (xMGIE Edit Plan From Prompts / "
                 "plan_from_prompts)"]
        lines.append("Try: " + "; ".join(tries) + ".")
        super().__init__("\n".join(lines))


# ---------------------------------------------------------------------------------------
# The question to the vision-language model
# ---------------------------------------------------------------------------------------

_EXAMPLE = {
    "instruction": "make the apple green",
    "plan": {"expressive_instruction": "Change the color of the apple from red to green, "
                                       "keeping its shape, shine and the rest of the table.",
             "source_prompt": "a red apple on a wooden table",
             "target_prompt": "a green apple on a wooden table",
             "edit_words": ["green"], "source_words": ["red"], "object": "apple",
             "subject_is_person": False},
}

PLAN_PROMPT = (
    "You are helping to edit this photo. The edit instruction is: \"{instruction}\".\n"
    "Answer with a single JSON object and nothing else, with exactly these keys:\n"
    "- \"expressive_instruction\": the instruction made explicit for this image "
    "(one or two sentences: what changes, what stays).\n"
    "- \"source_prompt\": a short caption of the image as it is now (under 30 words).\n"
    "- \"target_prompt\": the same caption after the edit: copy source_prompt and change "
    "only the words the edit changes (under 30 words).\n"
    "- \"edit_words\": a list of the words of target_prompt that carry the edit, copied "
    "exactly as they appear in target_prompt.\n"
    "- \"source_words\": a list of the words of source_prompt that they replace "
    "([] if the edit only adds something).\n"
    "- \"object\": the one thing in the image that the edit changes, in one or two words "
    "(it will be segmented).\n"
    "- \"subject_is_person\": true if that thing is a person or part of one (face, hair, "
    "body), else false.\n"
    "Example, for the instruction \"" + _EXAMPLE["instruction"] + "\":\n"
    + json.dumps(_EXAMPLE["plan"]) + "\n"
    "Now write the JSON object for \"{instruction}\" and this image."
)


def build_plan_prompt(instruction: str) -> str:
    """The question that asks a vision-language model for the plan of ``instruction``."""
    instruction = re.sub(r"\s+", " ", (instruction or "").strip())
    if not instruction:
        raise InputError("instruction", "is empty", "an edit instruction such as "
                         "'make the carpet yellow'")
    return PLAN_PROMPT.replace("{instruction}", instruction.replace('"', "'"))


# ---------------------------------------------------------------------------------------
# Key names
# ---------------------------------------------------------------------------------------

_ALIASES = {
    "expressive_instruction": {
        "expressiveinstruction", "expressive", "expressiveinstructions",
        "detailedinstruction", "expandedinstruction", "explicitinstruction",
        "instruction", "editinstruction", "explanation", "rewritteninstruction"},
    "source_prompt": {
        "sourceprompt", "sourcecaption", "srcprompt", "srccaption", "source",
        "original", "originalcaption", "originalprompt", "inputcaption", "inputprompt",
        "caption", "sourcedescription", "before", "beforecaption", "currentcaption",
        "imagecaption", "description", "sourcetext", "originaldescription"},
    "target_prompt": {
        "targetprompt", "targetcaption", "tgtprompt", "tgtcaption", "target",
        "editedcaption", "editedprompt", "outputcaption", "outputprompt", "newcaption",
        "newprompt", "after", "aftercaption", "resultcaption", "editprompt",
        "editcaption", "targetdescription", "editeddescription", "targettext"},
    "edit_words": {
        "editwords", "editedwords", "words", "changedwords", "targetwords", "newwords",
        "editword", "editedword", "keywords", "tokens", "edittokens", "editedtokens",
        "wordstoedit", "changewords", "blendwords", "positivewords"},
    "source_words": {
        "sourcewords", "replacedwords", "oldwords", "originalwords", "negativewords",
        "srcwords", "removedwords", "sourceword", "negativetokens", "sourcetokens",
        "wordsreplaced", "replacedword"},
    "object": {
        "object", "objecttosegment", "targetobject", "maskobject", "segment",
        "segmentobject", "subject", "region", "objectname", "mask", "editobject",
        "editedobject", "objecttoedit", "segmentation", "segmentationobject",
        "segmenttarget", "maskregion", "editregion", "object_"},
    "subject_is_person": {
        "subjectisperson", "isperson", "person", "objectisperson", "ishuman", "human",
        "personsubject", "subjectperson", "editsperson", "people"},
}
_ALIAS_TO_FIELD = {a: f for f, names in _ALIASES.items() for a in names}


def canonical_key(key: str) -> str | None:
    """Map a key as a model writes it ('Source caption', 'sourceCaption', 'src_prompt',
    'object to segment', ...) to an EditPlan field, or None."""
    k = re.sub(r"[^a-z0-9]", "", str(key).lower())
    if not k:
        return None
    if k in _ALIAS_TO_FIELD:
        return _ALIAS_TO_FIELD[k]
    has = lambda *parts: any(p in k for p in parts)  # noqa: E731
    if has("person", "human", "people"):
        return "subject_is_person"
    if has("word", "token"):
        return "source_words" if has("source", "original", "old", "negative", "replaced",
                                     "removed", "src") else "edit_words"
    if has("object", "segment", "mask"):
        return "object"
    if has("prompt", "caption", "description"):
        if has("target", "edited", "new", "output", "after", "result", "tgt"):
            return "target_prompt"
        if has("source", "original", "input", "before", "current", "src"):
            return "source_prompt"
    if has("expressive", "instruction"):
        return "expressive_instruction"
    return None


def _recognised(d: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        f = canonical_key(k)
        if f and f not in out and v not in (None, "", [], {}):
            out[f] = v
    return out


# ---------------------------------------------------------------------------------------
# Reading an answer
# ---------------------------------------------------------------------------------------

_REFUSAL = re.compile(
    r"\b(i['\u2019]?m sorry|i am sorry|sorry, but|i can(?:no|['\u2019])t|i cannot|"
    r"i am unable|i['\u2019]m unable|unable to (?:help|assist|comply)|as an ai|"
    r"i won['\u2019]t|not able to (?:help|assist))", re.IGNORECASE)
_CHAT_TAGS = re.compile(r"</?s>|<\|[a-z_]+\|>|\[/?INST\]|^\s*(?:assistant|ASSISTANT)\s*:",
                        re.MULTILINE)


def _json_candidates(text: str, skip_target: str = "") -> tuple[dict[str, Any], bool]:
    """The JSON-like object in ``text`` with the most plan keys (first on ties); an
    object whose target prompt is ``skip_target`` (the question's example, echoed back)
    is taken only if there is no other."""
    best, best_trunc, best_echoed = {}, False, False
    starts = [m.start() for m in re.finditer(r"\{", text)][:64]
    for st in starts:
        r = Reader(text, st)
        try:
            d = r.obj()
        except (NotJSONLike, CutOff):
            continue
        rec = _recognised(d)
        if not rec:  # one level of nesting: {"plan": {...}}
            subs = [v for v in d.values() if isinstance(v, dict)]
            rec = _recognised(subs[0]) if len(subs) == 1 else {}
        echoed = skip_target and as_text(rec.get("target_prompt", "")) == skip_target
        if echoed and not best:
            best, best_trunc, best_echoed = rec, r.truncated, True
        elif not echoed and (len(rec) > len(best) or (best and best_echoed)):
            best, best_trunc, best_echoed = rec, r.truncated, False
    return best, best_trunc


_LINE_KEY = re.compile(r"^([A-Za-z][A-Za-z0-9 _\-/()']{0,40}?)\s*[:=]\s*(.*)$")


def _line_fields(text: str) -> dict[str, Any]:
    """'Key: value' lines (markdown bullets, bold keys, numbered, headings)."""
    out: dict[str, Any] = {}
    pending: str | None = None
    for raw in text.splitlines():
        line = re.sub(r"\*\*|__|`", "", raw).strip()
        line = re.sub(r"^(?:#+|[-*\u2022+>]|\d+[.)])\s*", "", line).strip()
        if not line:
            continue
        m = _LINE_KEY.match(line)
        f = canonical_key(m.group(1)) if m else None
        if f is None and not m and len(line.split()) <= 4 \
                and canonical_key(line.rstrip(":")):
            pending = canonical_key(line.rstrip(":"))  # a heading: value on next line
            continue
        if f:
            val = m.group(2).strip()
            if val:
                out.setdefault(f, val)
                pending = None
            else:
                pending = f
        elif pending:
            out.setdefault(pending, line)
            pending = None
    return out


_INLINE_KEY = re.compile(r"([A-Za-z][A-Za-z_]*(?:[ _-][A-Za-z_]+){0,2})\s*:\s*")
_AMBIGUOUS_KEYS = {"source", "target", "before", "after", "original", "caption",
                   "description", "object", "subject", "region", "mask", "segment",
                   "words", "tokens", "instruction", "expressive", "person", "human",
                   "people"}


def _inline_fields(text: str) -> dict[str, Any]:
    """Keys inside running text: 'Sure. Source caption: a red apple. Target caption: ...'.

    A key is the longest run of up to three words before a colon that is a known key
    name; a one-word key ('target:') counts only at the start of a line or sentence.
    A value runs to the next key or the end of its line.
    """
    flat = re.sub(r"\*\*|__|`", "", text)
    marks: list[tuple[int, int, str]] = []  # (key start, value start, field)
    for m in _INLINE_KEY.finditer(flat):
        runs = [(w.start(), w.group(0)) for w in re.finditer(r"[A-Za-z]+", m.group(1))]
        for n in range(len(runs), 0, -1):
            f = _ALIAS_TO_FIELD.get("".join(w for _, w in runs[-n:]).lower())
            if not f:
                continue
            start = m.start(1) + runs[-n][0]
            before = flat[:start].rstrip(" \t")
            if n == 1 and runs[-1][1].lower() in _AMBIGUOUS_KEYS \
                    and before and before[-1] not in "\n.;,!:-*(":
                continue
            marks.append((start, m.end(), f))
            break
    out: dict[str, Any] = {}
    for k, (_, vstart, f) in enumerate(marks):
        stop = marks[k + 1][0] if k + 1 < len(marks) else len(flat)
        nl = flat.find("\n", vstart)
        if 0 <= nl < stop:
            stop = nl
        val = flat[vstart:stop].strip().rstrip(".;,").strip()
        if val:
            out.setdefault(f, val)
    return out


def parse_plan(answer: str, instruction: str, source_caption: str | None = None
               ) -> EditPlan:
    """Read a vision-language model's answer into a validated EditPlan.

    Reads, in this order of preference: a JSON object anywhere in the answer (fenced or
    wrapped in prose, tolerant of single quotes, trailing commas, bare keys, key name
    variants, comma-separated word lists, cut-off ends), else 'Key: value' lines
    (bullets, bold keys, headings) or keys inside running text. Missing fields are
    filled by the fallback rules of :mod:`.plan_rules`. Raises PlanParseError when no
    target prompt can be recovered (empty answer, refusal, garbage).
    """
    raw = answer if isinstance(answer, str) else ("" if answer is None else str(answer))
    text = _CHAT_TAGS.sub("", raw).strip()
    if not text:
        raise PlanParseError("the answer is empty", raw,
                             missing=["source_prompt", "target_prompt", "edit_words"])
    example = _EXAMPLE["plan"]["target_prompt"]
    got, truncated = _json_candidates(
        text, "" if (instruction or "").strip().lower() == _EXAMPLE["instruction"]
        else example)
    how = "JSON"
    if not got:
        lines, inline = _line_fields(text), _inline_fields(text)
        got, extra = (inline, lines) if len(inline) > len(lines) else (lines, inline)
        for k, v in extra.items():
            got.setdefault(k, v)
        how = "'Key: value' text"
    if not got and _REFUSAL.search(text):
        raise PlanParseError("the model refused or could not answer", raw,
                             missing=["target_prompt"])

    plan = EditPlan(instruction=(instruction or "").strip())
    notes = plan.notes
    if got:
        notes.append(f"read {names_list(sorted(got))} from the answer ({how})")
    if truncated:
        notes.append("the answer was cut off; its complete fields were kept")
    plan.expressive_instruction = as_text(got.get("expressive_instruction", ""))
    plan.source_prompt = as_text(got.get("source_prompt", ""))
    plan.target_prompt = as_text(got.get("target_prompt", ""))
    plan.object = clean_word(got.get("object", ""))
    person = as_bool(got.get("subject_is_person"))
    edit_given = as_words(got.get("edit_words", []))
    src_given = as_words(got.get("source_words", []))
    if isinstance(got.get("edit_words"), dict) and not src_given:
        src_given = as_words(list(got["edit_words"].keys()))

    if not got:
        raise PlanParseError("no plan fields (JSON keys or 'Key: value' lines) were found",
                             raw, missing=list(FIELDS), truncated=truncated)
    if (plan.target_prompt == example
            and plan.instruction.lower() != _EXAMPLE["instruction"]):
        raise PlanParseError("the model copied the example from the question instead of "
                             "planning this instruction", raw, missing=["target_prompt"])

    complete_plan(plan, edit_given, src_given, source_caption, person)
    if not plan.target_prompt:
        raise PlanParseError("no target prompt could be read or derived", raw,
                             missing=[f for f in ("source_prompt", "target_prompt",
                                                  "edit_words") if not getattr(plan, f)],
                             truncated=truncated)
    if not plan.edit_words:
        raise PlanParseError("no edit words could be read or derived (the target prompt "
                             "does not differ from the source prompt)", raw,
                             missing=["edit_words"], truncated=truncated)
    if not plan.source_prompt:
        raise PlanParseError("no source prompt could be read or derived", raw,
                             missing=["source_prompt"], truncated=truncated)
    try:
        return plan.validate()
    except InputError as e:
        raise PlanParseError(f"the plan read is not usable ({e})", raw,
                             truncated=truncated) from None


def make_plan(ask: Callable[[str], str], instruction: str,
              source_caption: str | None = None) -> EditPlan:
    """Ask a vision-language model (``ask(question) -> answer``) for the plan and read it."""
    answer = ask(build_plan_prompt(instruction))
    return parse_plan(answer, instruction, source_caption)


__all__ = ["PlanParseError", "PLAN_PROMPT", "build_plan_prompt", "parse_plan", "make_plan",
           "canonical_key"]
