"""Tiny random-weight BLIP-2 in the real Hugging Face layout (Salesforce/blip2-opt-*).

A small ViT, a two-layer Q-Former with 4 query tokens and a two-layer OPT, saved with
``save_pretrained`` (config.json, model.safetensors, generation_config.json) next to a
``Blip2Processor`` (BlipImageProcessor, an OPT-style GPT2Tokenizer from the offline BPE,
``<image>`` added as in the released repository, num_query_tokens), so ``load_blip2``
reads it exactly as it reads the real model. Its captions are meaningless.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .tokenizers import gpt2_bpe

IMAGE_SIZE = 32
NUM_QUERY_TOKENS = 4
# OPT's special tokens and ids: <s>=0, <pad>=1, </s>=2, <unk>=3; OPT uses </s> as BOS.
OPT_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
# gpt2_bpe's default of 700 merges gives fewer than the 1000 entries the loaders require.
N_MERGES = 900


def build_opt_tokenizer():
    from transformers import GPT2Tokenizer

    vocab, merges = gpt2_bpe(N_MERGES, specials=OPT_SPECIALS)
    return GPT2Tokenizer(
        vocab=dict(vocab), merges=[tuple(m.split(" ")) for m in merges],
        bos_token="</s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        add_bos_token=True, model_max_length=512)


def make_blip2(folder: Path) -> None:
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessor,
    )

    folder = Path(folder)
    tokenizer = build_opt_tokenizer()
    image_processor = BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    # Blip2Processor adds the "<image>" token to the tokenizer, as in the released repo.
    processor = Blip2Processor(image_processor, tokenizer, num_query_tokens=NUM_QUERY_TOKENS)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")

    vision_hidden = 32
    config = Blip2Config(
        vision_config=dict(hidden_size=vision_hidden, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2,
                           image_size=IMAGE_SIZE, patch_size=8),
        qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, encoder_hidden_size=vision_hidden,
                            max_position_embeddings=64),
        text_config=dict(model_type="opt", vocab_size=len(tokenizer), hidden_size=32,
                         ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=128, word_embed_proj_dim=32,
                         bos_token_id=2, eos_token_id=2, pad_token_id=1),
        num_query_tokens=NUM_QUERY_TOKENS, image_token_index=image_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Blip2ForConditionalGeneration(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
