"""The tiny models' tokenizers: genuine byte-level BPE vocabularies, the same in every
process (tiny models built on two machines, or twice on one, must be the same models)."""

from __future__ import annotations

import os
import subprocess
import sys

from xmgie.mgie_core.tiny import tokenizers

_DIGEST = ("import hashlib; from xmgie.mgie_core.tiny import tokenizers as t; "
           "v, m = t.clip_bpe(); g, gm = t.gpt2_bpe(); "
           "print(hashlib.sha256(repr((sorted(v.items()), m, sorted(g.items()), gm))"
           ".encode()).hexdigest())")


def test_vocabularies_are_the_same_in_every_process():
    digests = set()
    for seed in ("1", "2"):   # str hashing, and so set/dict-order ties, differ per seed
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", _DIGEST], env=env, capture_output=True,
                             text=True, check=True)
        digests.add(out.stdout.strip())
    assert len(digests) == 1, digests


def test_clip_vocabulary_is_a_real_bpe_with_the_editing_words_as_single_tokens(tmp_path):
    from transformers import CLIPTokenizer

    vocab, merges = tokenizers.clip_bpe()
    assert len(vocab) >= 1000              # loaders refuse stub tokenizers below that
    tokenizers.write_clip_tokenizer(tmp_path)
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    for word in ("carpet", "yellow", "butterfly", "corgi", "shirt"):
        assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1, word
    # any text is representable: an unseen word falls back to byte-level pieces
    ids = tok("zebra", add_special_tokens=False)["input_ids"]
    assert ids and tok.unk_token_id not in ids
