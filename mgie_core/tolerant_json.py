"""A tolerant JSON reader: JSON-like text the way chat models write it, read without
ever evaluating anything.

It accepts single and curly quotes, trailing commas, bare keys and words, Python
literals (True/False/None), ``//`` and ``#`` comments, and answers cut off mid-object
(an object cut off at the end keeps its complete pairs; the reader says it was
truncated).
"""

from __future__ import annotations

import json
import re
from typing import Any


class NotJSONLike(Exception):
    pass


class CutOff(Exception):
    pass


_CLOSE_QUOTE = {'"': '"', "'": "'", "\u201c": "\u201d", "\u2018": "\u2019",
                "\u201d": "\u201d", "\u2019": "\u2019"}
_BARE = {"true": True, "false": False, "null": None, "none": None}


class Reader:
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
            raise CutOff
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
                raise CutOff
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
            raise CutOff
        word = s[self.i:j].strip()
        self.i = j
        if not word:
            raise NotJSONLike("empty value")
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
                    raise CutOff
                if self.s[self.i] not in ":=":
                    raise NotJSONLike(f"expected ':' after key {key!r}")
                self.i += 1
                val = self.value()
            except CutOff:
                self.truncated = True
                return out
            out[str(key)] = val

    def arr(self) -> list:
        self.i += 1
        out: list = []
        while True:
            self.ws()
            if self.i >= len(self.s):
                raise CutOff
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
    r = Reader(text)
    try:
        v = r.value()
    except (NotJSONLike, CutOff) as e:
        raise ValueError(f"not JSON-like: {e or 'cut off'}") from None
    return v


__all__ = ["loads_tolerant", "Reader", "NotJSONLike", "CutOff"]
