"""MGIE's multimodal LLM (docs/algorithms.md section 1), in three parts:

* :mod:`.layout`: the files on disk (folder layout, ``mllm.pt`` keys) and MGIE's fixed
  prompt, tokens and generation settings;
* :mod:`.model`: the model (edit head, prompt, image splicing, generation, visual tokens);
* :mod:`.loading`: building it from a folder, every key checked.
"""

from .layout import (
                     FAMILY_KEY,
                     IM_END,
                     IM_PATCH,
                     IM_START,
                     IMG_TOKENS,
                     LLAMA_KEYS,
                     MAX_NEW_TOKENS,
                     MLLM_FILE,
                     NO_REPEAT_NGRAM_SIZE,
                     PROMPT,
                     SYSTEM,
                     WHAT,
                     family,
)
from .loading import (
                     find_llava_folder,
                     load_llava,
                     load_mgie,
                     load_vision_tower,
                     read_mllm,
                     read_weights,
)
from .model import EditHead, MGIEModel, MGIEOutput, first_sentences

__all__ = ["FAMILY_KEY", "IM_END", "IM_PATCH", "IM_START", "IMG_TOKENS", "LLAMA_KEYS",
           "MAX_NEW_TOKENS", "MLLM_FILE", "NO_REPEAT_NGRAM_SIZE", "PROMPT", "SYSTEM", "WHAT",
           "family", "find_llava_folder", "load_llava", "load_mgie", "load_vision_tower",
           "read_mllm", "read_weights", "EditHead", "MGIEModel", "MGIEOutput",
           "first_sentences"]
