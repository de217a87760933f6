"""Tiny random-weight LLaVA in the real Hugging Face layout (llava-hf/llava-1.5-*).

``LlavaForConditionalGeneration`` with a two-layer CLIP vision tower (32 px, 16 patch
tokens) and a two-layer Llama, saved with ``save_pretrained``, next to a
``LlavaProcessor`` (CLIPImageProcessor, an offline byte-level BPE tokenizer with an
``<image>`` token, and a LLaVA-1.5 style chat template), so ``AutoProcessor`` and
``AutoModelForImageTextToText`` load it as they load the real model. Its answers are
meaningless.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .tokenizers import gpt2_bpe

IMAGE_SIZE = 32
PATCH_SIZE = 8
# Llama's special tokens and ids: <unk>=0, <s>=1, </s>=2.
LLAMA_SPECIALS = ("<unk>", "<s>", "</s>")
N_MERGES = 900  # at least the 1000 tokenizer entries the loaders require

# LLaVA-1.5's conversation format ("USER: <image>\n<question> ASSISTANT:").
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


def make_vlm(folder: Path) -> None:
    from transformers import (
        AddedToken,
        CLIPImageProcessor,
        CLIPVisionConfig,
        GPT2Tokenizer,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    folder = Path(folder)
    vocab, merges = gpt2_bpe(N_MERGES, specials=LLAMA_SPECIALS)
    tokenizer = GPT2Tokenizer(
        vocab=dict(vocab), merges=[tuple(m.split(" ")) for m in merges],
        bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>",
        add_bos_token=True, model_max_length=512)
    tokenizer.add_tokens([AddedToken("<image>", special=True, normalized=False)],
                         special_tokens=True)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    # "default" drops the CLS token: (32/8)^2 = 16 image tokens, as the model expects.
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE)

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=32),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
            max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0),
        image_token_index=image_token_id, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
