"""Edit plans: one instruction, turned into everything the editing stages need.

MGIE's MLLM writes an expressive instruction; the inversion-based stages (null-text /
direct inversion, prompt-to-prompt injection, CAM, PFB, MAG) need more: a caption of the
source image, a caption of the wanted result that differs from it only where the edit
is, the target-caption words that carry the edit (cross-attention control, MAG's
positive tokens), the source words they replace (MAG's negative tokens) and the object
to segment. Any local vision-language model can write that *edit plan* as JSON
(``PLAN_PROMPT``); ``parse_plan`` reads real answers robustly and fills what is missing
with documented fallbacks; ``plan_from_prompts`` builds one from typed prompts.

Fallback rules (each use is recorded in ``EditPlan.fallbacks_used`` and ``notes``):
  * source_prompt  <- the ``source_caption`` argument (e.g. a BLIP-2 caption), else the
                      target prompt with edit words replaced back by source words;
  * target_prompt  <- the source prompt with source words replaced by edit words, else
                      the instruction applied to the source prompt (``_instruction_rule``:
                      "replace/turn/change X into/with/to Y" swaps X for Y; "make the X
                      ADJ" replaces the colour/material word before X, or inserts ADJ);
  * edit_words     <- the word-level diff of source vs target prompts (each changed span
                      of the target; edge articles dropped); source_words likewise;
  * object         <- guessed from the instruction (``guess_object``), else the first
                      source word;
  * subject_is_person <- whether the object is a person word (``PERSON_WORDS``: person,
                      woman, child, face, hair, ...);
  * expressive_instruction <- the instruction.

``plan_from_instruction`` applies the same rules to the instruction alone (no model),
and ``EditPlanFromVLM``'s fallback uses it when a model's answer cannot be read.

Editing nodes take the plan as an optional input and fill their text inputs from it by
one rule (``PLAN_RULE``, applied by :func:`from_plan` in every node and control).
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Iterable, Sequence

from .errors import InputError, XMGIEError, names_list
from .tokens import as_text, clean_word

FIELDS = ("expressive_instruction", "source_prompt", "target_prompt", "edit_words",
          "source_words", "object", "subject_is_person")
_LIST_FIELDS = ("edit_words", "source_words")


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
# Words in prompts
# ---------------------------------------------------------------------------------------

_WORD_RE = re.compile(r"[A-Za-z0-9]+(?:['\u2019][A-Za-z]+)?")
_EDGE_STOP = {"a", "an", "the", "of", "and", "with", "in", "on", "to", "is", "are"}


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD_RE.findall(text or "")]


def _word_spans(text: str) -> list[tuple[str, int, int]]:
    return [(m.group(0).lower(), m.start(), m.end()) for m in _WORD_RE.finditer(text or "")]


def _phrase_regex(phrase: str) -> re.Pattern | None:
    ws = _WORD_RE.findall(phrase or "")
    if not ws:
        return None
    body = r"[^A-Za-z0-9]+".join(re.escape(w) for w in ws)
    return re.compile(rf"(?<![A-Za-z0-9]){body}(?![A-Za-z0-9])", re.IGNORECASE)


def find_phrase(prompt: str, phrase: str) -> str | None:
    """The text of ``phrase`` as it occurs in ``prompt`` (whole words, any case), or None."""
    rx = _phrase_regex(phrase)
    m = rx.search(prompt or "") if rx else None
    return m.group(0) if m else None


def _replace_phrase(prompt: str, old: str, new: str) -> tuple[str, bool]:
    rx = _phrase_regex(old)
    if rx is None or not rx.search(prompt):
        return prompt, False
    return rx.sub(lambda _m: new, prompt), True


def diff_words(source_prompt: str, target_prompt: str) -> tuple[list[str], list[str]]:
    """Word-level diff: (changed spans of the target, changed spans of the source).

    Each contiguous changed span is one entry ("a red car" -> "a yellow car" gives
    (["yellow"], ["red"])); articles and prepositions at a span's edges are dropped.
    """
    src, tgt = _word_spans(source_prompt), _word_spans(target_prompt)
    sm = difflib.SequenceMatcher(None, [w for w, _, _ in src], [w for w, _, _ in tgt],
                                 autojunk=False)
    edit, source = [], []

    def span(text, spans, i, j):
        while i < j and spans[i][0] in _EDGE_STOP:
            i += 1
        while j > i and spans[j - 1][0] in _EDGE_STOP:
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


# ---------------------------------------------------------------------------------------
# Object and edit from the instruction (a small documented rule set)
# ---------------------------------------------------------------------------------------

_DET = r"(?:(?:the|a|an|this|that|these|those|his|her|their|its|my|your|our)\s+)"
_PRONOUNS = {"it", "them", "this", "that", "everything", "image", "picture", "photo",
             "scene", "him", "her", "me", "all"}
_COMPLEMENT_START = {"more", "less", "look", "looks", "appear", "seem", "into", "to",
                     "like", "very", "a", "an", "be", "become", "much", "slightly", "so"}
# Word classes for "make the X ADJ": the word of the same class before X is replaced.
_COLOURS = {"red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black",
            "white", "gray", "grey", "gold", "golden", "silver", "beige", "violet", "cyan",
            "magenta", "turquoise", "teal", "navy", "maroon", "crimson", "tan"}
_MATERIALS = {"wooden", "wood", "metal", "metallic", "glass", "stone", "paper", "plastic",
              "leather", "wool", "woolen", "cotton", "silk", "marble", "brick", "denim",
              "velvet", "golden"}
_RULES = [
    # replace X with/by Y
    re.compile(rf"^(?:please\s+)?(?:replace|swap|substitute)\s+{_DET}?(?P<x>.+?)\s+"
               rf"(?:with|by|for)\s+{_DET}?(?P<y>.+?)$"),
    # turn/change/transform/convert X into/to Y
    re.compile(rf"^(?:please\s+)?(?:turn|change|transform|convert|morph)\s+{_DET}?(?P<x>.+?)"
               rf"\s+(?:into|to)\s+{_DET}?(?P<y>.+?)$"),
    # make X (look like) Y
    re.compile(rf"^(?:please\s+)?(?:make|color|colour|paint|dye|render)\s+{_DET}?"
               rf"(?P<x>.+?)\s+(?P<y>\S+)$"),
    # remove/delete/erase X
    re.compile(rf"^(?:please\s+)?(?:remove|delete|erase|get rid of)\s+{_DET}?(?P<x>.+?)$"),
    # add/put/place Y on/to X ; give X Y
    re.compile(rf"^(?:please\s+)?(?:add|put|place)\s+{_DET}?(?P<y>.+?)\s+"
               rf"(?:to|on|onto|in|into|over|at|near|next to|behind|under)\s+"
               rf"{_DET}?(?P<x>.+?)$"),
    re.compile(rf"^(?:please\s+)?(?:give|let)\s+{_DET}?(?P<x>\S+)\s+(?P<y>.+?)$"),
]


_ATTRIBUTE_NOUNS = {"color", "colour", "material", "texture", "shape", "style", "pattern",
                    "fabric", "hue", "shade"}


def _head_noun(np: str) -> str:
    """'the red car' -> 'car'; "the cat's shirt" -> 'shirt'; 'cup of tea' -> 'cup';
    'color of the car' -> 'car' (attribute nouns point at what they describe)."""
    parts = re.split(r"\s+of\s+", np.strip())
    if len(parts) > 1 and _words(parts[0]) and _words(parts[0])[-1] in _ATTRIBUTE_NOUNS:
        np = parts[-1]
    else:
        np = parts[0]
    ws = [w for w in _WORD_RE.findall(np) if w.lower() not in _EDGE_STOP]
    if not ws:
        return ""
    w = re.sub(r"['\u2019]s$", "", ws[-1]).lower()
    return "" if w in _PRONOUNS else w


def _instruction_rule(instruction: str) -> dict[str, str]:
    """{'object', 'old', 'new', 'kind'} from simple instruction patterns ({} if none)."""
    text = re.sub(r"\s+", " ", (instruction or "").strip().lower()).rstrip(".!")
    for k, rx in enumerate(_RULES):
        m = rx.match(text)
        if not m:
            continue
        gd = m.groupdict()
        x, y = gd.get("x") or "", gd.get("y") or ""
        if k == 2:  # make X ... : split the complement off the noun phrase
            ws = x.split() + [y]
            cut = next((i for i, w in enumerate(ws) if i > 0 and w in _COMPLEMENT_START),
                       len(ws) - 1)
            x, y = " ".join(ws[:cut]), " ".join(ws[cut:])
            obj = _head_noun(x)
            new = y if len(y.split()) == 1 else ""
            return {"object": obj, "old": "", "new": new, "kind": "attribute"}
        obj = _head_noun(x)
        if k == 1 and _words(x) and _words(x)[0] in _ATTRIBUTE_NOUNS:
            # "change the color of the car to red": an attribute edit of the car
            new = re.sub(rf"^{_DET}", "", y).strip()
            return {"object": obj, "old": "", "new": new if len(new.split()) == 1 else "",
                    "kind": "attribute"}
        if k in (0, 1):
            old = x if len(x.split()) <= 3 else obj
            new = re.sub(rf"^{_DET}", "", y).strip()
            return {"object": obj, "old": old, "new": new, "kind": "swap"}
        return {"object": obj, "old": "", "new": "", "kind": "other"}
    # Generic: the first noun phrase after "the".
    m = re.search(r"\bthe\s+([a-z' ]+?)(?:\s+(?:to|into|with|in|on|a|an|more|less|look|"
                  r"wear|wears|wearing|is|be|and)\b|$)", text)
    return {"object": _head_noun(m.group(1)), "old": "", "new": "", "kind": "other"} \
        if m else {}


def guess_object(instruction: str) -> str:
    """The thing to segment, from the instruction alone ('' when no rule applies).

    Rules, in order: "replace X with Y" -> X; "turn/change X into/to Y" -> X;
    "make/color/paint the X ADJ" -> X; "remove X" -> X; "add/put Y on/to X" -> X;
    "give X Y" -> X; otherwise the first noun phrase after "the". The head noun is kept
    ("the red car" -> "car", "the color of the car" -> "car"); pronouns give ''.
    """
    return _instruction_rule(instruction).get("object", "")


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
    ws = _words(word)
    if not ws:
        return False
    w = re.sub(r"['\u2019]s$", "", ws[-1])
    return w in PERSON_WORDS or (w.endswith("s") and w[:-1] in PERSON_WORDS)


_TRUE = {"true", "yes", "y", "1", "person", "human", "a person", "people", "human being"}
_FALSE = {"false", "no", "n", "0", "object", "thing", "none", "not a person", "animal",
          "an object", "scene", "background"}


def _as_bool(v: Any) -> bool | None:
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


def _apply_instruction(source_prompt: str, instruction: str
                       ) -> tuple[str, list[str], list[str]] | None:
    """Target prompt (with edit/source words) from the source prompt and the instruction."""
    r = _instruction_rule(instruction)
    if not r or not r.get("new") or not source_prompt:
        return None
    new = r["new"]
    if r["kind"] == "swap":
        for old in (r["old"], r["object"]):
            if old:
                out, ok = _replace_phrase(source_prompt, old, new)
                if ok:
                    return out, [new], [find_phrase(source_prompt, old) or old]
        return None
    if r["kind"] == "attribute" and r["object"] and len(new.split()) == 1:
        spans = _word_spans(source_prompt)
        for i, (w, s, e) in enumerate(spans):
            if w != r["object"] and w.rstrip("s") != r["object"]:
                continue
            if i > 0:
                prev, ps, pe = spans[i - 1]
                same_class = any(prev in c and new in c for c in (_COLOURS, _MATERIALS))
                if same_class and prev != new:
                    return (source_prompt[:ps] + new + source_prompt[pe:], [new],
                            [source_prompt[ps:pe]])
                if prev == new:
                    return None
            return source_prompt[:s] + new + " " + source_prompt[s:], [new], []
    return None


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

    A plan made from the instruction alone (:func:`plan_from_instruction`) may lack the
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

    def validate(self) -> "EditPlan":
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
        if _words(self.source_prompt) == _words(self.target_prompt):
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
                if not isinstance(w, str) or not _words(w):
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
    def from_json(cls, data: str | dict) -> "EditPlan":
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
                kw[k] = bool(_as_bool(v))
            else:
                kw[k] = "" if v is None else str(v)
        return cls(**kw)


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
# A tolerant JSON reader (no eval): single quotes, trailing commas, bare keys and words,
# Python literals, comments, curly quotes, and answers cut off mid-object.
# ---------------------------------------------------------------------------------------

class _Bad(Exception):
    pass


class _Cut(Exception):
    pass


_CLOSE_QUOTE = {'"': '"', "'": "'", "\u201c": "\u201d", "\u2018": "\u2019",
                "\u201d": "\u201d", "\u2019": "\u2019"}
_BARE = {"true": True, "false": False, "null": None, "none": None}


class _Reader:
    def __init__(self, text: str, start: int = 0):
        self.s, self.i, self.truncated = text, start, False

    def ws(self) -> None:
        s = self.s
        while self.i < len(s):
            if s[self.i].isspace():
                self.i += 1
            elif s.startswith("//", self.i) or s[self.i] == "#":
                j = s.find("\n", self.i)
                self.i = len(s) if j < 0 else j
            else:
                break

    def value(self) -> Any:
        self.ws()
        if self.i >= len(self.s):
            raise _Cut
        c = self.s[self.i]
        if c == "{":
            return self.obj()
        if c == "[":
            return self.arr()
        if c in _CLOSE_QUOTE:
            return self.string()
        return self.bare(",}]\n")

    def string(self) -> str:
        s, q = self.s, self.s[self.i]
        close = _CLOSE_QUOTE[q]
        self.i += 1
        out = []
        while True:
            if self.i >= len(s):
                raise _Cut
            c = s[self.i]
            if c == "\\" and self.i + 1 < len(s):
                n = s[self.i + 1]
                if n == "u" and re.fullmatch(r"[0-9a-fA-F]{4}", s[self.i + 2:self.i + 6]):
                    out.append(chr(int(s[self.i + 2:self.i + 6], 16)))
                    self.i += 6
                    continue
                out.append({"n": "\n", "t": "\t", "r": ""}.get(n, n))
                self.i += 2
                continue
            if c == close:
                # A quote closes the string only if what follows can follow a string:
                # "the cat's hat" and 'a "vintage" car' stay whole.
                j = self.i + 1
                while j < len(s) and s[j] in " \t":
                    j += 1
                if j >= len(s) or s[j] in ",}]:\n\r":
                    self.i += 1
                    return "".join(out)
            out.append(c)
            self.i += 1

    def bare(self, stops: str) -> Any:
        s, j = self.s, self.i
        while j < len(s) and s[j] not in stops:
            j += 1
        if j >= len(s):
            raise _Cut
        word = s[self.i:j].strip()
        self.i = j
        if not word:
            raise _Bad("empty value")
        low = word.lower()
        if low in _BARE:
            return _BARE[low]
        try:
            return json.loads(word)
        except ValueError:
            return word

    def obj(self) -> dict:
        self.i += 1
        out: dict = {}
        while True:
            self.ws()
            if self.i >= len(self.s):
                self.truncated = True
                return out
            c = self.s[self.i]
            if c == ",":
                self.i += 1
                continue
            if c == "}":
                self.i += 1
                return out
            try:
                key = self.string() if c in _CLOSE_QUOTE else self.bare(":=}\n")
                self.ws()
                if self.i >= len(self.s):
                    raise _Cut
                if self.s[self.i] not in ":=":
                    raise _Bad(f"expected ':' after key {key!r}")
                self.i += 1
                val = self.value()
            except _Cut:
                self.truncated = True
                return out
            out[str(key)] = val

    def arr(self) -> list:
        self.i += 1
        out: list = []
        while True:
            self.ws()
            if self.i >= len(self.s):
                raise _Cut
            c = self.s[self.i]
            if c == ",":
                self.i += 1
                continue
            if c == "]":
                self.i += 1
                return out
            out.append(self.value())


def loads_tolerant(text: str) -> Any:
    """Parse JSON-like text the way chat models write it (never evaluates anything).

    Accepts single/curly quotes, trailing commas, bare keys and values, True/False/None,
    // and # comments; an object cut off at the end keeps its complete pairs. Raises
    ValueError when the text is not JSON-like.
    """
    r = _Reader(text)
    try:
        v = r.value()
    except (_Bad, _Cut) as e:
        raise ValueError(f"not JSON-like: {e or 'cut off'}") from None
    return v


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
        r = _Reader(text, st)
        try:
            d = r.obj()
        except (_Bad, _Cut):
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


def _as_words(v: Any) -> list[str]:
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


def _keep_in(words: list[str], prompt: str, label: str, pname: str,
             notes: list[str]) -> list[str]:
    kept = []
    for w in words:
        found = find_phrase(prompt, w)
        if found is None:
            notes.append(f"{label} {w!r} is not in the {pname}; dropped")
        elif found.lower() not in (k.lower() for k in kept):
            kept.append(found)
    return kept


def parse_plan(answer: str, instruction: str, source_caption: str | None = None
               ) -> EditPlan:
    """Read a vision-language model's answer into a validated EditPlan.

    Reads, in this order of preference: a JSON object anywhere in the answer (fenced or
    wrapped in prose, tolerant of single quotes, trailing commas, bare keys, key name
    variants, comma-separated word lists, cut-off ends), else 'Key: value' lines
    (bullets, bold keys, headings) or keys inside running text. Missing
    fields are filled by the module's fallback rules. Raises PlanParseError when no
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
    person = _as_bool(got.get("subject_is_person"))
    edit_given = _as_words(got.get("edit_words", []))
    src_given = _as_words(got.get("source_words", []))
    if isinstance(got.get("edit_words"), dict) and not src_given:
        src_given = _as_words(list(got["edit_words"].keys()))

    if not got:
        raise PlanParseError("no plan fields (JSON keys or 'Key: value' lines) were found",
                             raw, missing=list(FIELDS), truncated=truncated)
    if (plan.target_prompt == example
            and plan.instruction.lower() != _EXAMPLE["instruction"]):
        raise PlanParseError("the model copied the example from the question instead of "
                             "planning this instruction", raw, missing=["target_prompt"])

    _complete(plan, edit_given, src_given, source_caption, person)
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


def _complete(plan: EditPlan, edit_given: list[str], src_given: list[str],
              source_caption: str | None, person: bool | None = None) -> None:
    """Fill the plan's missing fields with the module's fallback rules (in place)."""
    notes, used = plan.notes, plan.fallbacks_used
    caption = as_text(source_caption or "")

    # source prompt <- source_caption
    if not plan.source_prompt and caption:
        plan.source_prompt = caption
        used.append("source_prompt")
        notes.append("source_prompt: the given source caption")

    # target prompt <- source with source words swapped for edit words
    if not plan.target_prompt and plan.source_prompt:
        out, ok_all = plan.source_prompt, False
        if edit_given and len(src_given) == len(edit_given):
            ok_all = True
            for s, e in zip(src_given, edit_given):
                out, ok = _replace_phrase(out, s, e)
                ok_all = ok_all and ok
        if ok_all:
            plan.target_prompt = out
            notes.append("target_prompt: source prompt with source words replaced by "
                         "edit words")
        else:
            r = _apply_instruction(plan.source_prompt, plan.instruction)
            if r:
                plan.target_prompt, edit_given, src_given = r[0], r[1], src_given or r[2]
                notes.append("target_prompt: the instruction applied to the source prompt")
        if plan.target_prompt:
            used.append("target_prompt")

    # source prompt <- target with edit words swapped back
    if not plan.source_prompt and plan.target_prompt and src_given \
            and len(src_given) == len(edit_given):
        out, ok_all = plan.target_prompt, True
        for s, e in zip(src_given, edit_given):
            out, ok = _replace_phrase(out, e, s)
            ok_all = ok_all and ok
        if ok_all:
            plan.source_prompt = out
            used.append("source_prompt")
            notes.append("source_prompt: target prompt with edit words replaced by "
                         "source words")
    if not plan.target_prompt:
        return

    # edit words: keep those in the target prompt, else diff
    plan.edit_words = _keep_in(edit_given, plan.target_prompt, "edit word",
                               "target prompt", notes)
    d_edit, d_src = (diff_words(plan.source_prompt, plan.target_prompt)
                     if plan.source_prompt else ([], []))
    if not plan.edit_words and d_edit:
        plan.edit_words = d_edit
        used.append("edit_words")
        notes.append("edit_words: the word-level diff of source and target prompts")
        if len(d_edit) > 3:
            notes.append("the source and target prompts differ in many places; check "
                         "the edit words")
    if plan.source_prompt:
        plan.source_words = _keep_in(src_given, plan.source_prompt, "source word",
                                     "source prompt", notes)
        if not plan.source_words and d_src:
            plan.source_words = d_src
            used.append("source_words")
            notes.append("source_words: the word-level diff of source and target prompts")

    if not plan.object:
        obj = guess_object(plan.instruction)
        if obj:
            plan.object = obj
            notes.append("object: guessed from the instruction")
        elif plan.source_words:
            plan.object = plan.source_words[0]
            notes.append("object: the first source word")
        if plan.object:
            used.append("object")

    if person is None:
        person = is_person_word(plan.object)
        used.append("subject_is_person")
        notes.append(f"subject_is_person: {'yes' if person else 'no'}, from the object word "
                     f"{plan.object!r}" if plan.object else
                     "subject_is_person: no (there is no object word)")
    plan.subject_is_person = bool(person)

    if not plan.expressive_instruction:
        plan.expressive_instruction = plan.instruction
        used.append("expressive_instruction")
        notes.append("expressive_instruction: the instruction itself")


def make_plan(ask: Callable[[str], str], instruction: str,
              source_caption: str | None = None) -> EditPlan:
    """Ask a vision-language model (``ask(question) -> answer``) for the plan and read it."""
    answer = ask(build_plan_prompt(instruction))
    return parse_plan(answer, instruction, source_caption)


def _split_words(v: str | Iterable[str] | None) -> list[str]:
    if v is None:
        return []
    return _as_words(v if isinstance(v, str) else list(v))


def plan_from_prompts(instruction: str, source_prompt: str, target_prompt: str,
                      edit_words: str | Sequence[str] | None = None,
                      object: str | None = None,
                      source_words: str | Sequence[str] | None = None) -> EditPlan:
    """A validated plan from prompts typed by the user.

    Words may be a list or a comma-separated string; empty edit/source words are found
    by diffing the prompts, an empty object is guessed from the instruction.
    """
    plan = EditPlan(instruction=(instruction or "").strip(),
                    source_prompt=as_text(source_prompt or ""),
                    target_prompt=as_text(target_prompt or ""),
                    object=clean_word(object or ""))
    edit = _split_words(edit_words)
    src = _split_words(source_words)
    if plan.target_prompt:
        bad = [w for w in edit if find_phrase(plan.target_prompt, w) is None]
        if bad:  # typed words must be right: say so rather than silently dropping them
            plan.edit_words = edit
            plan.validate()
        _complete(plan, edit, src, None)
    return plan.validate()


def plan_from_instruction(instruction: str, source_caption: str | None = None,
                          expressive_instruction: str | None = None) -> EditPlan:
    """An edit plan from the instruction alone, by the module's rules (no model).

    * object: ``guess_object`` of the instruction (else of the expressive instruction);
    * source_prompt: ``source_caption`` (e.g. BLIP-2's caption of the photo), extended
      with ", with the OBJECT" when it does not name the object, or "a photo of the
      OBJECT" without a caption (``EditPlan.object_prompt``), so attention can find it;
    * target_prompt, edit_words, source_words: the instruction applied to the source
      prompt (``_instruction_rule``: swaps, "make the X ADJ"); left empty, with a note,
      when no rule applies (the plan then drives the masks and the instruction path,
      and the inversion path asks for a typed target prompt);
    * subject_is_person from the object word; expressive_instruction: the one given, else
      the instruction.

    Every filled field is listed in ``fallbacks_used`` and explained in ``notes``.
    """
    instruction = re.sub(r"\s+", " ", (instruction or "").strip())
    if not instruction:
        raise InputError("instruction", "is empty", "an edit instruction such as "
                         "'make the carpet yellow'")
    plan = EditPlan(instruction=instruction,
                    expressive_instruction=as_text(expressive_instruction or ""))
    notes, used = plan.notes, plan.fallbacks_used
    caption = as_text(source_caption or "")

    obj, where = guess_object(instruction), "the instruction"
    if not obj and plan.expressive_instruction:
        obj, where = guess_object(plan.expressive_instruction), "the expressive instruction"
    if obj:
        plan.object = obj
        used.append("object")
        notes.append(f"object: guessed from {where}")
    else:
        notes.append("object: no rule found one in the instruction (name the thing to edit, "
                     "e.g. 'make the carpet yellow')")

    plan.source_prompt = caption
    plan.source_prompt = plan.object_prompt() or caption
    if plan.source_prompt:
        used.append("source_prompt")
        notes.append("source_prompt: " + (
            "the given source caption" if plan.source_prompt == caption else
            "the given source caption, with the object added" if caption else
            "'a photo of the OBJECT' (no source caption was given)"))

    r = _apply_instruction(plan.source_prompt, instruction) if plan.source_prompt else None
    if r:
        plan.target_prompt, plan.edit_words, plan.source_words = r[0], list(r[1]), list(r[2])
        try:
            plan.validate()
            used += ["target_prompt", "edit_words"] + (["source_words"] if r[2] else [])
            notes.append("target_prompt: the instruction applied to the source prompt")
        except InputError as e:
            plan.target_prompt, plan.edit_words, plan.source_words = "", [], []
            notes.append(f"target_prompt: the instruction's rule gave no usable target ({e})")
    if not plan.target_prompt:
        notes.append("target_prompt: no instruction rule applies; type the target prompt "
                     "where an inversion-based edit needs one")

    plan.subject_is_person = is_person_word(plan.object)
    used.append("subject_is_person")
    notes.append(f"subject_is_person: {'yes' if plan.subject_is_person else 'no'}, from the "
                 f"object word {plan.object!r}" if plan.object else
                 "subject_is_person: no (there is no object word)")
    if not plan.expressive_instruction:
        plan.expressive_instruction = instruction
        used.append("expressive_instruction")
        notes.append("expressive_instruction: the instruction itself")
    return plan


# ---------------------------------------------------------------------------------------
# Filling a node's inputs from a plan: one rule for every node and control
# ---------------------------------------------------------------------------------------

PLAN_RULE = ("A typed value that is not empty wins; an empty one takes the edit plan's "
             "(when a plan is connected); with neither, the node stops with an error that "
             "names both.")

CONNECT_PLAN = ("Connect an edit plan (xMGIE Edit Plan From VLM, From Instruction or From "
                "Prompts) to its plan input")


def _typed_words(v: Any) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        return [w.strip() for w in v.split(",") if w.strip()]
    return [str(w).strip() for w in v if str(w).strip()]


def from_plan(name: str, typed: Any, plan: "EditPlan | None", field_name: str,
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
    value = _typed_words(typed) if words else ("" if typed is None else str(typed))
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


__all__ = ["EditPlan", "PlanParseError", "PLAN_PROMPT", "PLAN_RULE", "build_plan_prompt",
           "parse_plan", "make_plan", "plan_from_prompts", "plan_from_instruction",
           "from_plan", "guess_object", "is_person_word", "diff_words", "find_phrase",
           "loads_tolerant", "canonical_key"]
