"""The instruction rules: edit plans made without a model.

A small documented rule set reads an edit instruction ("replace/turn/change X into/with/to
Y", "make the X ADJ", "remove X", "add Y to X", ...) and fills a plan's missing fields.
:func:`plan_from_prompts` builds a plan from typed prompts, :func:`plan_from_instruction`
from the instruction alone, and :mod:`.plan_answer` completes a model's answer with the
same rules (:func:`complete_plan`).

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
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from .errors import InputError
from .plan import (
    EDGE_STOP,
    WORD_RE,
    EditPlan,
    as_words,
    diff_words,
    find_phrase,
    is_person_word,
    lower_words,
    replace_phrase,
    word_spans,
)
from .tokens import as_text, clean_word

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
    if len(parts) > 1 and lower_words(parts[0]) and lower_words(parts[0])[-1] in _ATTRIBUTE_NOUNS:
        np = parts[-1]
    else:
        np = parts[0]
    ws = [w for w in WORD_RE.findall(np) if w.lower() not in EDGE_STOP]
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
        if k == 1 and lower_words(x) and lower_words(x)[0] in _ATTRIBUTE_NOUNS:
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
                out, ok = replace_phrase(source_prompt, old, new)
                if ok:
                    return out, [new], [find_phrase(source_prompt, old) or old]
        return None
    if r["kind"] == "attribute" and r["object"] and len(new.split()) == 1:
        spans = word_spans(source_prompt)
        for i, (w, s, _end) in enumerate(spans):
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


def complete_plan(plan: EditPlan, edit_given: list[str], src_given: list[str],
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
                out, ok = replace_phrase(out, s, e)
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
            out, ok = replace_phrase(out, e, s)
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


def _split_words(v: str | Iterable[str] | None) -> list[str]:
    if v is None:
        return []
    return as_words(v if isinstance(v, str) else list(v))


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
        complete_plan(plan, edit, src, None)
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


__all__ = ["guess_object", "complete_plan", "plan_from_prompts", "plan_from_instruction"]
