"""CLIP token positions of words in a prompt: what cross-attention control reads.

The sampler (CAM words, prompt-to-prompt alignment), attention masks, MAG and A-STAR all
address a word by the positions of its BPE tokens in the padded 77-token CLIP sequence
(BOS at 0, so the prompt's first token is at 1). Words are matched at word boundaries
(a CLIP ``</w>`` end mark, or GPT-2/SentencePiece start marks), every occurrence counts,
as in prompt-to-prompt, and a word that is absent or past the 77-token window is an
:class:`InputError` that names it and the prompt.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

from .errors import InputError

log = logging.getLogger(__name__)


def as_text(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        v = next((x for x in v if isinstance(x, str) and x.strip()), "")
    if isinstance(v, dict):
        v = next((x for x in v.values() if isinstance(x, str) and x.strip()), "")
    s = re.sub(r"\s+", " ", str(v if v is not None else "")).strip()
    # Quotes around the whole value ("a photo of ...") are not part of it.
    while len(s) >= 2 and s[0] in "\"'\u201c\u2018`" and s[-1] in "\"'\u201d\u2019`":
        s = s[1:-1].strip()
    return s


def clean_word(w: Any) -> str:
    """A word as typed or as a VLM wrote it: surrounding quotes, brackets and
    punctuation removed, inner whitespace collapsed."""
    s = as_text(w)
    s = s.strip(" \t\"'`\u201c\u201d\u2018\u2019[](){}.,;:!?")
    return re.sub(r"\s+", " ", s)


_MARKS = ("\u0120", "\u2581")  # GPT-2 / SentencePiece word-start marks


def _has_conventions(tokens: list[str]) -> bool:
    return any(t.endswith("</w>") or t.startswith(_MARKS) for t in tokens)


def _bare(tok: str) -> str:
    return tok.replace("</w>", "").lstrip("".join(_MARKS))


def _is_word_start(tokens: list[str], i: int) -> bool:
    if i == 0 or not _has_conventions(tokens):
        return True
    prev, t = tokens[i - 1], tokens[i]
    return (prev.endswith("</w>") or t.startswith(_MARKS)
            or not _bare(prev)[-1:].isalnum() or not _bare(t)[:1].isalnum())


def _is_word_end(tokens: list[str], j: int) -> bool:
    """True if a match covering tokens[..j-1] ends a word."""
    if j >= len(tokens) or not _has_conventions(tokens):
        return True
    last, nxt = tokens[j - 1], tokens[j]
    return (last.endswith("</w>") or nxt.startswith(_MARKS)
            or not _bare(nxt)[:1].isalnum() or not _bare(last)[-1:].isalnum())


def word_token_groups(tokenizer, prompt: str, words: Sequence[str]) -> list[list[int]]:
    """For each word (or phrase), its token positions in the padded CLIP sequence.

    Position 0 is BOS, so the first prompt token is at 1; a word split into several BPE
    tokens gives all of them; every occurrence is returned (as prompt-to-prompt does).
    """
    if isinstance(words, str):
        words = [words]
    max_len = int(getattr(tokenizer, "model_max_length", 77) or 77)
    if max_len > 10_000:
        max_len = 77
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    toks = tokenizer.convert_ids_to_tokens(ids)
    groups: list[list[int]] = []
    for w in words:
        w_clean = clean_word(w)
        found: list[int] = []
        for variant in dict.fromkeys([w_clean, " " + w_clean, w_clean.lower(),
                                      " " + w_clean.lower()]):
            if not variant.strip():
                continue
            wid = tokenizer(variant, add_special_tokens=False)["input_ids"]
            n = len(wid)
            if not n:
                continue
            for i in range(len(ids) - n + 1):
                if ids[i:i + n] == wid and _is_word_start(toks, i) \
                        and _is_word_end(toks, i + n):
                    found += [i + 1 + k for k in range(n) if i + 1 + k not in found]
            if found:
                break
        if not found:
            raise InputError("words", f"the word {w!r} does not occur in the prompt "
                             f"{prompt!r}", "words copied from the prompt (edit words from "
                             "the target prompt, source words from the source prompt)",
                             f"Add {w!r} to the prompt or remove it from the words.")
        if max(found) >= max_len - 1:
            raise InputError("words", f"the word {w!r} falls beyond the first {max_len - 2}"
                             f" tokens of the prompt {prompt!r}", f"prompts that fit in "
                             f"{max_len} CLIP tokens", "Shorten the prompt.")
        groups.append(sorted(found))
    return groups


def find_word_tokens(tokenizer, prompt: str, words: Sequence[str]) -> list[int]:
    """Sorted positions (77-token CLIP sequence, BOS at 0) of all tokens of ``words``."""
    return sorted({p for g in word_token_groups(tokenizer, prompt, words) for p in g})


def dropped_text(tokenizer, prompt: str, max_length: int | None = None) -> str:
    """The end of ``prompt`` a CLIP tokenizer cuts off at its window (``max_length``
    tokens with the start and end tokens; 77 for SD 1.x), as text; "" when it fits."""
    max_length = int(max_length or getattr(tokenizer, "model_max_length", 77))
    ids = tokenizer(prompt, add_special_tokens=False, truncation=False,
                    verbose=False)["input_ids"]
    room = max(0, max_length - 2)
    if len(ids) <= room:
        return ""
    return tokenizer.decode(ids[room:], skip_special_tokens=True).strip()


def truncation_note(name: str, dropped: str, limit: int = 77) -> str:
    """The line that tells a user which words of prompt ``name`` were cut off."""
    return (f"{name}: longer than the text encoder's {limit} tokens; these words are "
            f"dropped: {dropped!r}. Shorten it (put what matters first).")


def warn_if_truncated(tokenizer, prompt: str, name: str = "prompt", report=None) -> str:
    """Log which words of ``prompt`` the text encoder will not see (CLIP reads 75
    prompt tokens), and add the same line to ``report`` (a run's
    :class:`~.report.UpdateReport`, shown in the node's text output) when given; returns
    the dropped words ("" when nothing is dropped)."""
    if not isinstance(prompt, str) or not prompt.strip():
        return ""
    dropped = dropped_text(tokenizer, prompt)
    if dropped:
        note = truncation_note(name, dropped, int(getattr(tokenizer, "model_max_length", 77)))
        log.warning("%s", note)
        if report is not None:
            report.note(note)
    return dropped
