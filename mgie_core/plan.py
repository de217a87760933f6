"""The edit plan: one instruction, turned into everything the editing stages need.

MGIE's MLLM writes an expressive instruction; the inversion-based stages (null-text /
direct inversion, prompt-to-prompt injection, CAM, PFB, MAG) need more: a caption of the
source image, a caption of the wanted result that differs from it only where the edit
is, the target-caption words that carry the edit (cross-attention control, MAG's
positive tokens), the source words they replace (MAG's negative tokens) and the object
to segment. :class:`EditPlan` holds them; this module also has the word helpers every
plan module uses (whole-word phrase search, the word-level diff, the person words, the
one comma-separated word splitter) and the fill rule.

Plans are made by :mod:`.plan_rules` (from typed prompts, or from the instruction alone
by its rules) and by :mod:`.plan_answer` (from a vision-language model's answer); both
import this module, never the other way round.

Editing nodes take the plan as an optional input and fill their text inputs from it by
one rule (``PLAN_RULE``, applied by :func:`from_plan` in every node and control).
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import InputError, names_list
from .tokens import clean_word
from .tolerant_json import loads_tolerant

FIELDS = ("expressive_instruction", "source_prompt", "target_prompt", "edit_words",
          "source_words", "object", "subject_is_person")
_LIST_FIELDS = ("edit_words", "source_words")


# ---------------------------------------------------------------------------------------
# Words in prompts
# ---------------------------------------------------------------------------------------

WORD_RE = re.compile(r"[A-Za-z0-9]+(?:['\u2019][A-Za-z]+)?")
EDGE_STOP = {"a", "an", "the", "of", "and", "with", "in", "on", "to", "is", "are"}


def lower_words(text: str) -> list[str]:
    return [w.lower() for w in WORD_RE.findall(text or "")]


def word_spans(text: str) -> list[tuple[str, int, int]]:
    return [(m.group(0).lower(), m.start(), m.end()) for m in WORD_RE.finditer(text or "")]


def _phrase_regex(phrase: str) -> re.Pattern | None:
    ws = WORD_RE.findall(phrase or "")
    if not ws:
        return None
    body = r"[^A-Za-z0-9]+".join(re.escape(w) for w in ws)
    return re.compile(rf"(?<![A-Za-z0-9]){body}(?![A-Za-z0-9])", re.IGNORECASE)


def find_phrase(prompt: str, phrase: str) -> str | None:
    """The text of ``phrase`` as it occurs in ``prompt`` (whole words, any case), or None."""
    rx = _phrase_regex(phrase)
    m = rx.search(prompt or "") if rx else None
    return m.group(0) if m else None


def replace_phrase(prompt: str, old: str, new: str) -> tuple[str, bool]:
    rx = _phrase_regex(old)
    if rx is None or not rx.search(prompt):
        return prompt, False
    return rx.sub(lambda _m: new, prompt), True


def diff_words(source_prompt: str, target_prompt: str) -> tuple[list[str], list[str]]:
    """Word-level diff: (changed spans of the target, changed spans of the source).

    Each contiguous changed span is one entry ("a red car" -> "a yellow car" gives
    (["yellow"], ["red"])); articles and prepositions at a span's edges are dropped.
    """
    src, tgt = word_spans(source_prompt), word_spans(target_prompt)
    sm = difflib.SequenceMatcher(None, [w for w, _, _ in src], [w for w, _, _ in tgt],
                                 autojunk=False)
    edit, source = [], []

    def span(text, spans, i, j):
        while i < j and spans[i][0] in EDGE_STOP:
            i += 1
        while j > i and spans[j - 1][0] in EDGE_STOP:
            j -= 1
        return text[spans[i][1]:spans[j - 1][2]] if i < j else None

    for op, i1, i2, j1, j2 in sm.get_opcodes():
        if op in ("replace", "insert"):
            p = span(target_prompt, tgt, j1, j2)
            if p and p.lower() not in (e.lower() for e in edit):
                edit.append(p)
        if op in ("replace", "delete"):
            p = span(source_prompt, src, i1, i2)
            if p and p.lower() not in (s.lower() for s in source):
                source.append(p)
    return edit, source


# Words that name a person or a part of one: the fallback for ``subject_is_person`` when a
# model does not say. Parts count (hair, face, beard): editing them edits a person, whose
# identity the identity guidance keeps.
PERSON_WORDS = frozenset("""
person people man men woman women boy boys girl girls child children kid kids baby babies
toddler teenager teen lady ladies gentleman guy guys human humans adult adults bride groom
mother father mom mum dad son daughter brother sister grandmother grandfather grandma
grandpa wife husband friend player players actor actress athlete student worker doctor
nurse soldier chef king queen prince princess model singer dancer portrait selfie
face faces head hair haircut hairstyle beard moustache mustache eyes eye lips mouth nose
skin smile cheeks eyebrows forehead body
""".split())


def is_person_word(word: str) -> bool:
    """Whether ``word`` (an object as a plan names it: 'woman', 'the girl's hair') names a
    person or a part of one: its last word, singular or plural, is in ``PERSON_WORDS``."""
    ws = lower_words(word)
    if not ws:
        return False
    w = re.sub(r"['\u2019]s$", "", ws[-1])
    return w in PERSON_WORDS or (w.endswith("s") and w[:-1] in PERSON_WORDS)


_TRUE = {"true", "yes", "y", "1", "person", "human", "a person", "people", "human being"}
_FALSE = {"false", "no", "n", "0", "object", "thing", "none", "not a person", "animal",
          "an object", "scene", "background"}


def as_bool(v: Any) -> bool | None:
    """A yes/no as a model writes it (true, "yes", "a person", 1), or None if unclear."""
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    s = clean_word(v).lower() if isinstance(v, str) else ""
    if s in _TRUE:
        return True
    if s in _FALSE:
        return False
    first = s.split(" ")[0] if s else ""
    return True if first in ("yes", "true") else False if first in ("no", "false") else None


def as_words(v: Any) -> list[str]:
    """A word list as a model writes it or a user gives it: a list, a JSON-like list in
    text, a dict (its values), or text separated by commas, semicolons, bars or lines;
    each word cleaned (:func:`.tokens.clean_word`), duplicates and 'none' dropped."""
    if isinstance(v, str):
        s = v.strip()
        if s.startswith("["):
            try:
                v = loads_tolerant(s)
            except ValueError:
                v = s.strip("[]")
        if isinstance(v, str):
            v = re.split(r"[,;|\n]", v)
    if isinstance(v, dict):  # {"red": "yellow"}: source -> edit pairs, values kept
        v = list(v.values())
    if not isinstance(v, (list, tuple)):
        v = [v]
    out: list[str] = []
    for x in v:
        w = clean_word(x)
        if w and w.lower() not in (o.lower() for o in out) and w.lower() not in (
                "none", "n/a", "null", "empty"):
            out.append(w)
    return out


# ---------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------

@dataclass
class EditPlan:
    """Everything the editing stages need from one instruction.

    edit_words are words (or short phrases) of ``target_prompt`` that carry the edit;
    source_words are the words of ``source_prompt`` they replace (MAG's negative tokens,
    may be empty when the edit adds something). ``subject_is_person`` says whether the
    object is a person (or part of one): identity guidance acts only then. ``fallbacks_used``
    names the fields that were filled by fallbacks rather than given; ``notes`` says how,
    in words.

    A plan made from the instruction alone (:func:`.plan_rules.plan_from_instruction`) may lack the
    target prompt when no instruction rule applies; the nodes that need a field say so
    when it is empty (:func:`from_plan`).
    """

    instruction: str = ""
    expressive_instruction: str = ""
    source_prompt: str = ""
    target_prompt: str = ""
    edit_words: list[str] = field(default_factory=list)
    source_words: list[str] = field(default_factory=list)
    object: str = ""
    subject_is_person: bool = False
    notes: list[str] = field(default_factory=list)
    fallbacks_used: list[str] = field(default_factory=list)

    def object_prompt(self, word: str | None = None) -> str:
        """A caption that contains the object (or ``word``), for finding it by its
        cross-attention: the source prompt when the word occurs in it, else the source
        prompt followed by ", with the WORD" (a caption may name it otherwise: 'rug' for
        'carpet'), else "a photo of the WORD". Empty when there is no word."""
        word = (word or self.object or "").strip()
        if not word:
            return ""
        if self.source_prompt and find_phrase(self.source_prompt, word):
            return self.source_prompt
        if self.source_prompt:
            return f"{self.source_prompt.rstrip(' .,;')}, with the {word}"
        return f"a photo of the {word}"

    def validate(self) -> EditPlan:
        """Raise InputError when the plan cannot drive the editing stages; return self."""
        fix_typed = ("Fix the plan's prompts (xMGIE Edit Plan From Prompts), or ask the "
                     "vision-language model again.")
        if not self.target_prompt.strip():
            raise InputError("plan.target_prompt", "is empty",
                             "a caption of the edited image, e.g. 'a photo of a "
                             "hummingbird on a flower'", fix_typed)
        if not self.source_prompt.strip():
            raise InputError("plan.source_prompt", "is empty",
                             "a caption of the source image (the inversion uses it)",
                             "Give a source caption (e.g. from BLIP-2) or type it.")
        if lower_words(self.source_prompt) == lower_words(self.target_prompt):
            raise InputError("plan.target_prompt",
                             f"is the same as the source prompt ({self.source_prompt!r})",
                             "a target caption that differs where the edit is",
                             "Change the edited words in the target prompt.")
        if not self.edit_words:
            raise InputError("plan.edit_words", "is empty",
                             "at least one word of the target prompt that carries the edit",
                             "Give the edit words (comma-separated), or leave them empty "
                             "with prompts that differ so they are found by diff.")
        for name, words, prompt, pname in (
                ("plan.edit_words", self.edit_words, self.target_prompt, "target prompt"),
                ("plan.source_words", self.source_words, self.source_prompt,
                 "source prompt")):
            for w in words:
                if not isinstance(w, str) or not lower_words(w):
                    raise InputError(name, f"contains {w!r}", "words made of letters or "
                                     "digits", "Remove the empty or punctuation-only entry.")
                if find_phrase(prompt, w) is None:
                    raise InputError(
                        name, f"the word {w!r} does not occur in the {pname} {prompt!r}",
                        f"each of {names_list(words)} to appear as whole word(s) in the "
                        f"{pname}",
                        f"Use a word copied from the {pname}, or add {w!r} to it.")
        return self

    # -- serialisation ---------------------------------------------------------------
    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(asdict(self), indent=indent, ensure_ascii=False)

    @classmethod
    def from_json(cls, data: str | dict) -> EditPlan:
        if isinstance(data, str):
            try:
                data = json.loads(data)
            except json.JSONDecodeError as e:
                raise InputError("plan JSON", f"is not valid JSON ({e})",
                                 "the text written by EditPlan.to_json()") from None
        if not isinstance(data, dict):
            raise InputError("plan JSON", f"is a {type(data).__name__}",
                             "a JSON object with the EditPlan fields")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError("plan JSON", f"has unknown keys {names_list(unknown)}",
                             f"only {names_list(sorted(known))}")
        kw: dict[str, Any] = {}
        for k, v in data.items():
            if k in ("edit_words", "source_words", "notes", "fallbacks_used"):
                kw[k] = [str(x) for x in (v or [])]
            elif k == "subject_is_person":
                kw[k] = bool(as_bool(v))
            else:
                kw[k] = "" if v is None else str(v)
        return cls(**kw)


# ---------------------------------------------------------------------------------------
# Filling a node's inputs from a plan: one rule for every node and control
# ---------------------------------------------------------------------------------------

PLAN_RULE = ("A typed value that is not empty wins; an empty one takes the edit plan's "
             "(when a plan is connected); with neither, the node stops with an error that "
             "names both.")

CONNECT_PLAN = ("Connect an edit plan (xMGIE Edit Plan From VLM, From Instruction or From "
                "Prompts) to its plan input")


def split_words(v: Any) -> list[str]:
    """Typed words as a list: text split at commas, each word stripped, empty ones
    dropped ("red, car," -> ["red", "car"]); a list (any iterable) the same, item by
    item; None -> []; any other value is one word. The one splitter of every typed word
    input (nodes, sampler, the fill rule, the batch runner's datasets)."""
    if v is None:
        return []
    if isinstance(v, str):
        return [w.strip() for w in v.split(",") if w.strip()]
    if not isinstance(v, Iterable):
        v = [v]
    return [str(w).strip() for w in v if str(w).strip()]


def from_plan(name: str, typed: Any, plan: EditPlan | None, field_name: str,
              expected: str, *, required: bool = True,
              no_plan: str = "no plan is connected") -> Any:
    """The value of input ``name`` under ``PLAN_RULE``: ``typed`` when it is not empty,
    else the plan's ``field_name``; with neither, an :class:`InputError` naming both
    (``required``) or an empty value (inputs whose empty value means "off", such as CAM
    words).

    Word fields (edit_words, source_words) come back as a list: typed text is split at
    commas. Prompts come back as text, a typed one unchanged. ``no_plan`` words the case
    without a plan (a control says it has none and neither has the sampler)."""
    if field_name not in {f.name for f in fields(EditPlan)}:
        raise ValueError(f"EditPlan has no field {field_name!r}")
    words = field_name in _LIST_FIELDS
    value = split_words(typed) if words else ("" if typed is None else str(typed))
    if (value if words else value.strip()):
        return value
    if plan is not None:
        planned = getattr(plan, field_name)
        if planned:
            return list(planned) if words else planned
        if required:
            raise InputError(name, f"is empty and the edit plan's {field_name} is empty too",
                             expected, f"Type {name}, or use a plan that has a {field_name} "
                             f"(see the plan's notes: {'; '.join(plan.notes[-3:]) or 'none'}).")
    elif required:
        raise InputError(name, f"is empty and {no_plan}", expected,
                         f"{CONNECT_PLAN}, or type {name}.")
    return [] if words else ""


__all__ = ["EditPlan", "FIELDS", "PLAN_RULE", "CONNECT_PLAN", "from_plan", "is_person_word",
           "PERSON_WORDS", "diff_words", "find_phrase", "replace_phrase", "as_words",
           "split_words"]
