"""Tiny random-weight MGIE MLLM in the real layout of :mod:`mgie_core.models.mgie`::

    tiny-mgie/
      mllm.pt             official key names (model.embed_tokens.weight, lm_head.weight,
                          emb, edit_head.{llm2hid,query,mapper,hid2feat}.*)
      LLaVA-7B-v1/        the LLaVA fork's folder: config.json (model_type llava,
                          mm_vision_tower, mm_use_im_start_end...), model.safetensors with
                          model.* / lm_head.weight / model.mm_projector.*, and an offline
                          byte-level BPE tokenizer holding <im_patch> <im_start> <im_end>
                          (and, by default, [IMG0]..[IMG7])
      tiny-clip-vit/      CLIP vision tower (32 px, patch 8: 16 patch tokens)

LLaMA width 32, two layers; the edit head has MGIE's structure (4 + 4 pre-norm layers,
4 heads, dropout 0, a (1, 77, d) query) at d_model 16, and outputs ``out_dim`` = 32, the
tiny SD text width, so its condition plugs into the tiny instruction UNet. Its answers
are meaningless.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..models.mgie import IM_END, IM_PATCH, IM_START, IMG_TOKENS, MLLM_FILE, EditHead
from .tokenizers import gpt2_bpe
from .vlm import LLAMA_SPECIALS, N_MERGES

LLAVA_DIR = "LLaVA-7B-v1"
VISION_DIR = "tiny-clip-vit"
IMAGE_SIZE, PATCH_SIZE = 32, 8
HIDDEN, VISION_HIDDEN, HEAD_DIM_MODEL = 32, 32, 16


def make_mgie(folder: Path | str, out_dim: int = 32, seed: int = 0,
              img_tokens_in_tokenizer: bool = True) -> None:
    from safetensors.torch import save_file
    from transformers import (
        AddedToken,
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        GPT2Tokenizer,
        LlamaConfig,
        LlamaForCausalLM,
    )

    folder = Path(folder)
    llava, vision_dir = folder / LLAVA_DIR, folder / VISION_DIR
    vocab, merges = gpt2_bpe(N_MERGES, specials=LLAMA_SPECIALS)
    tokenizer = GPT2Tokenizer(
        vocab=dict(vocab), merges=[tuple(m.split(" ")) for m in merges],
        bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>",
        add_bos_token=True, model_max_length=2048)

    def special(tokens):
        return [AddedToken(t, special=True, normalized=False) for t in tokens]

    tokenizer.add_tokens(special([IM_PATCH, IM_START, IM_END]), special_tokens=True)
    llava_vocab = len(tokenizer)               # LLaVA v1: 32000 + 3 image tokens
    tokenizer.add_tokens(special(IMG_TOKENS), special_tokens=True)
    vocab_size = len(tokenizer)                # MGIE: + [IMG0..7]
    img_ids = tokenizer.convert_tokens_to_ids(list(IMG_TOKENS))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vcfg = CLIPVisionConfig(hidden_size=VISION_HIDDEN, intermediate_size=64,
                                num_hidden_layers=3, num_attention_heads=2,
                                image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
        vision = CLIPVisionModel(vcfg).eval()
        lcfg = LlamaConfig(vocab_size=llava_vocab, hidden_size=HIDDEN, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                           max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                           pad_token_id=0)
        llm = LlamaForCausalLM(lcfg).eval()
        projector = torch.nn.Linear(VISION_HIDDEN, HIDDEN)
        # MGIE's fine-tuned rows: the whole (resized) matrices, as in mllm.pt.
        embed = torch.randn(vocab_size, HIDDEN) * 0.02
        lm_head = torch.randn(vocab_size, HIDDEN) * 0.02
        head = EditHead(llm_dim=HIDDEN, d_model=HEAD_DIM_MODEL, out_dim=out_dim,
                        dim_feedforward=32)
        torch.nn.init.normal_(head.query, std=0.02)

    llava.mkdir(parents=True, exist_ok=True)
    weights = {k: v.contiguous() for k, v in llm.state_dict().items()}
    weights.update({f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()})
    save_file(weights, str(llava / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava",
        **{k: getattr(lcfg, k) for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
            "rms_norm_eps", "hidden_act", "bos_token_id", "eos_token_id", "pad_token_id")},
        "tie_word_embeddings": False, "torch_dtype": "float32",
        "mm_vision_tower": VISION_DIR, "mm_hidden_size": VISION_HIDDEN,
        "mm_vision_select_layer": -2, "mm_use_im_start_end": True,
        "use_mm_proj": True, "tune_mm_mlp_adapter": False,
    }
    (llava / "config.json").write_text(json.dumps(config, indent=2))
    if not img_tokens_in_tokenizer:  # the real LLaVA folder: [IMG*] added at load time
        tokenizer = GPT2Tokenizer(
            vocab=dict(vocab), merges=[tuple(m.split(" ")) for m in merges],
            bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>",
            add_bos_token=True, model_max_length=2048)
        tokenizer.add_tokens(special([IM_PATCH, IM_START, IM_END]), special_tokens=True)
    tokenizer.save_pretrained(llava)

    vision.save_pretrained(vision_dir, safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                       crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
                       ).save_pretrained(vision_dir)

    mllm = {"model.embed_tokens.weight": embed, "lm_head.weight": lm_head,
            "emb": embed[img_ids].unsqueeze(0).clone()}
    mllm.update({f"edit_head.{k}": v for k, v in head.state_dict().items()})
    torch.save(mllm, folder / MLLM_FILE)
