"""MGIE's files on disk: the folder layout, the keys of ``mllm.pt`` and the fixed
vocabulary, prompt and generation settings of MGIE 7B (docs/algorithms.md section 1).

Layout accepted by :func:`load_mgie` (a folder in the ``mgie`` models folder, e.g.
``models/mgie/mgie_7b``; the ``mgie`` family's marker file is ``mllm.pt``)::

    mgie_7b/
      mllm.pt                   MGIE's released weights (table below)
      LLaVA-7B-v1/              LLaVA-7B v1 Hugging Face folder (the LLaVA fork's layout):
        config.json             LLaMA fields + mm_vision_tower, mm_hidden_size,
                                mm_vision_select_layer (-2), mm_use_im_start_end
        tokenizer files         tokenizer.model or tokenizer.json/vocab.json+merges.txt,
                                tokenizer_config.json; holds <im_patch> <im_start> <im_end>
        *.safetensors | pytorch_model*.bin   model.* (LLaMA), lm_head.weight,
                                model.mm_projector.{weight,bias}
      clip-vit-large-patch14/   CLIP vision tower (HF folder: config.json + weights;
                                preprocessor_config.json optional)

The LLaVA folder is the first sub-folder, else sibling folder, whose config.json has
``mm_vision_tower``. The vision tower is found from ``mm_vision_tower``: that path if it
exists, else a folder named like its last component (``clip-vit-large-patch14``) inside
the MGIE folder, the LLaVA folder or beside the MGIE folder, else the ``clip_vision``
family (models/clip_vision, or the local Hugging Face cache). Vision-tower weights inside
the LLaVA weights (``model.vision_tower.*``) and rotary ``inv_freq`` buffers are ignored.
``[IMG0]..[IMG7]`` (and the three image tokens) are added to the tokenizer when missing,
as MGIE's demo does, so they get ids right after the LLaVA vocabulary.

Keys of ``mllm.pt`` (``torch.load(weights_only=True)``; Apple's file is loaded into the
LLaVA model with ``strict=False``; the edit head is ``edit_head`` =
``EditMapper(llm2hid, query, mapper, hid2feat)`` in ml-mgie)::

    key                                   shape (7B)        required
    ------------------------------------  ----------------  --------
    model.embed_tokens.weight             (V, 4096)         yes  replaces the input embeddings
    lm_head.weight                        (V, 4096)         yes  replaces the output layer
    emb                                   (1, 8, 4096)      yes  [IMG0..7] input embeddings
                                          or (8, 4096)
    edit_head.llm2hid.{weight,bias}       (512, 4096),(512) yes
    edit_head.query                       (1, 77, 512)      yes
    edit_head.mapper.<nn.Transformer>     encoder.layers.{0-3}.*, encoder.norm.*,
                                          decoder.layers.{0-3}.*, decoder.norm.*  (yes)
    edit_head.hid2feat.{weight,bias}      (768, 512),(768)  yes
    model.mm_projector.{weight,bias}      (4096, 1024)      no   overrides the projector
    model.<other LLaMA weight>            as in LLaMA       no   overrides that weight

V = len(tokenizer) with the [IMG] tokens (32011 for MGIE 7B: [IMG0] is id 32003). Any
other key, or a missing required one, is a :class:`ModelLoadError` that lists them.
"""
from __future__ import annotations

from ... import paths

WHAT = "MGIE multimodal LLM (mllm.pt + LLaVA-7B v1)"
MLLM_FILE = "mllm.pt"
IMG_TOKENS = tuple(f"[IMG{i}]" for i in range(8))
IM_PATCH, IM_START, IM_END = "<im_patch>", "<im_start>", "<im_end>"
# vicuna_v1_1 (FastChat / LLaVA v1): sep_style TWO, seps " " and "</s>".
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
PROMPT = "what will this image be like if '{instruction}'"
NO_REPEAT_NGRAM_SIZE = 3
MAX_NEW_TOKENS = 96

# The models-folder family, as registered in paths.py (this definition is the fallback
# when the registry lacks it, so the layout never depends on registration order).
FAMILY_KEY = "mgie"
_FAMILY = paths.Family(
    key=FAMILY_KEY, what=WHAT, folder="mgie", kind="folder", folder_marker=MLLM_FILE,
    default_names=("mgie_7b",),
    published="Apple's MGIE release (github.com/apple/ml-mgie, checkpoint mgie_7b: mllm.pt) "
              "on top of LLaVA-7B v1 (the LLaVA-7b-delta-v1 applied to LLaMA-7B) and "
              "https://huggingface.co/openai/clip-vit-large-patch14; see "
              "mgie_core/models/mgie/layout.py for the folder layout",
    tiny_name="tiny-mgie")


def family() -> paths.Family:
    return paths.FAMILIES.get(FAMILY_KEY, _FAMILY)


LLAMA_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
              "rms_norm_eps", "hidden_act", "rope_theta", "tie_word_embeddings",
              "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range")
