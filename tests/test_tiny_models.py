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


def test_building_a_tiny_model_leaves_the_callers_random_state(tmp_path):
    # A seeded run must draw the same numbers whether or not a tiny model had to be built
    # first (the makers seed their own weights).
    import random

    import numpy as np
    import torch

    from xmgie.mgie_core.tiny import ensure_tiny_models, tiny_path

    def draws():
        return torch.rand(4), random.random(), np.random.rand()

    for seed_all in (lambda: (torch.manual_seed(123), random.seed(123), np.random.seed(123)),):
        seed_all()
        expected = draws()
        seed_all()
        ensure_tiny_models(tmp_path, ["clip_vision"])
        assert tiny_path(tmp_path, "clip_vision").exists()
        got = draws()
        assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]
