"""Offline byte-level BPE vocabularies for the tiny test models.

Real tokenizer files cannot be downloaded here, and a loader must reject stub tokenizers
(fewer than 1000 entries), so the tiny models get small but genuine byte-level BPE
vocabularies, learned on a built-in word list (deterministically: the same in every
process) and written in the CLIP and GPT-2 file layouts: every byte is representable,
and common editing words are single tokens.
"""

from __future__ import annotations

import json
from collections import Counter
from functools import cache
from pathlib import Path

_WORDS = """
a an the of and or in on at to with from by for into onto over under near behind front
photo picture image painting drawing render portrait close up view scene background
foreground object person man woman boy girl child people face hair eyes smile hat shirt
dress jacket coat shoes glasses cat dog corgi puppy kitten bird butterfly flower flowers
tree trees grass sky cloud clouds sun moon night day snow rain water sea ocean river lake
beach mountain mountains forest field road street city house building room wall floor
carpet rug table chair sofa bed window door lamp car bus bike boat train plane cup bowl
plate food apple banana orange cake pizza bread fruit vegetable make turn change replace
remove add put let it be into like as more less very bright dark light colorful
red orange yellow green blue purple pink brown black white gray grey gold silver golden
wooden metal glass stone paper plastic leather wool cotton silk striped spotted plain
big small large tiny tall short long wide old new young happy sad angry cute beautiful
wearing holding sitting standing running walking flying sleeping eating looking playing
style watercolor oil sketch cartoon anime realistic vintage winter summer autumn spring
sunset sunrise morning evening fire ice wet dry warm cold shiny matte soft hard smooth
what will this if would look edit instruction keep same identity only region mask seam
source target caption word words edited segment there is are was were has have having
his her their its my your our one two three four five six seven eight nine ten many few
wings tail ears nose mouth hand hands leg legs arm arms body head neck back side top bottom
left right center middle inside outside above below between around through across along
""".split()


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode character table (public algorithm)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) \
        + list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _learn(words: list[str], n_merges: int, end_of_word: str = "") -> list[tuple[str, str]]:
    """The first ``n_merges`` byte-level BPE merges learned on ``words``: each string is
    one pre-token, spelt in GPT-2/CLIP's byte alphabet; ``end_of_word`` is CLIP's
    ``</w>`` suffix on a word's last symbol (GPT-2 style words carry a leading space).
    Each merge is the most frequent adjacent pair, ties broken by the pair's text, so the
    vocabulary is the same in every process (the ``tokenizers`` trainer breaks ties in
    hash order, which changes from run to run)."""
    b2u = bytes_to_unicode()
    seqs = []
    for word in words:
        symbols = [b2u[b] for b in word.encode("utf-8")]
        symbols[-1] += end_of_word
        seqs.append(symbols)
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        counts = Counter(p for s in seqs for p in zip(s, s[1:]))
        if not counts:
            break
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        seqs = [_merge(s, best) for s in seqs]
    return merges


def _merge(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


@cache
def clip_bpe(n_merges: int = 700) -> tuple[dict[str, int], list[str]]:
    """CLIP layout: bytes, bytes+'</w>', merges, then <|startoftext|>, <|endoftext|>."""
    b2u = bytes_to_unicode()
    base = list(b2u.values())
    merges = _learn(_WORDS, n_merges, end_of_word="</w>")
    tokens = base + [t + "</w>" for t in base] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab: dict[str, int] = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    return vocab, [f"{a} {b}" for a, b in merges]


@cache
def gpt2_bpe(n_merges: int = 900, specials: tuple[str, ...] = ("<|endoftext|>",)
             ) -> tuple[dict[str, int], list[str]]:
    """GPT-2 layout (space as 'Ġ' prefix); used for OPT/LLaMA-style tiny tokenizers."""
    b2u = bytes_to_unicode()
    base = list(b2u.values())
    space = b2u[ord(" ")]
    merges = _learn([" " + w for w in _WORDS] + list(_WORDS), n_merges)
    tokens = list(specials) + base + ["".join(m) for m in merges]
    vocab: dict[str, int] = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    assert space in vocab
    return vocab, [f"{a} {b}" for a, b in merges]


def write_bpe_files(folder: Path, vocab: dict[str, int], merges: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n",
                                       encoding="utf-8")


def write_clip_tokenizer(folder: Path, model_max_length: int = 77) -> None:
    """A CLIPTokenizer folder (vocab.json, merges.txt, tokenizer_config.json)."""
    vocab, merges = clip_bpe()
    write_bpe_files(folder, vocab, merges)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}, indent=2))
