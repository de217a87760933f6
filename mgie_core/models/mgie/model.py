"""MGIE's multimodal LLM: instruction -> expressive instruction + visual tokens -> edit
condition (docs/algorithms.md section 1), on current transformers without the LLaVA fork.

The model is LLaVA-7B v1 rebuilt from plain parts:

* ``LlamaForCausalLM`` for the language model;
* ``CLIPVisionModel`` (ViT-L/14, 224 px) whose *penultimate* layer is read and the CLS
  token dropped: 256 patch features of width 1024;
* one ``Linear(1024 -> 4096)`` projector (LLaVA v1's ``mm_projector``);
* MGIE's 8 added tokens ``[IMG0]``..``[IMG7]`` and its :class:`EditHead`.

Prompt (LLaVA v1 with ``mm_use_im_start_end``, the setting of LLaVA-7B v1 and of MGIE's
demo): the vicuna_v1_1 conversation ::

    <s>{SYSTEM} USER: what will this image be like if '{instruction}'
    <im_start><im_patch> x 256<im_end> ASSISTANT:

The 256 ``<im_patch>`` positions get the projected patch features instead of their
token embedding (``<im_start>``/``<im_end>`` keep theirs), exactly as LLaVA v1 splices
them. Without ``mm_use_im_start_end`` in the config only the 256 ``<im_patch>`` tokens
are used. Generation is greedy, ``no_repeat_ngram_size=3``, ``max_new_tokens=96``, run by
``generate`` on the spliced ``inputs_embeds`` *with* the prompt ids beside them, so the
n-gram ban sees the prompt as the LLaVA fork's does.

Visual tokens: the answer is cut at the first ``[IMG0]`` (its text before is the
expressive instruction), ``[IMG0]..[IMG7]`` are appended, and one forward pass over
prompt + answer + 8 [IMG] tokens gives the last-layer (final-norm) hidden states at the
8 positions that predict ``[IMG0]..[IMG7]``. When the model did emit ``[IMG0]`` followed
by ``[IMG1..7]``, this teacher-forced pass gives the same hidden states generation had
(the model is causal). **Fallback** when the model never emits ``[IMG0]`` (a random tiny
model, or an answer cut by ``max_new_tokens``): the 8 [IMG] tokens are appended after the
whole generated text (minus ``</s>``), which is where MGIE's training format puts them.
(Apple's demo instead reads the 8 positions before the last one; we prefer the training
format.) ``MGIEOutput.fallback`` says which path was taken; it never raises.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ... import host
from ...errors import InputError, ModelLoadError
from ..conditioning import Conditioning
from ..hf import check_positive, generation_kwargs, interrupt_criteria, to_pil_images
from ..validate import check_state_dict_keys
from .layout import (
    IM_END,
    IM_PATCH,
    IM_START,
    IMG_TOKENS,
    MAX_NEW_TOKENS,
    NO_REPEAT_NGRAM_SIZE,
    PROMPT,
    SYSTEM,
    WHAT,
)


class EditHead(nn.Module):
    """MGIE's edit head: visual tokens -> (B, 77, out_dim) text-encoder-like condition.

    h = llm2hid(hidden + emb); mapper = nn.Transformer with the 8 tokens as source and a
    learned query (1, 77, d) as target; hid2feat projects to the UNet's text width."""

    def __init__(self, llm_dim: int = 4096, d_model: int = 512, out_dim: int = 768,
                 n_query: int = 77, nhead: int = 4, num_layers: int = 4,
                 dim_feedforward: int = 2048):
        super().__init__()
        self.llm2hid = nn.Linear(llm_dim, d_model)
        self.query = nn.Parameter(torch.zeros(1, n_query, d_model))
        with warnings.catch_warnings():
            # norm_first disables the nested-tensor fast path; torch warns about it.
            warnings.simplefilter("ignore")
            self.mapper = nn.Transformer(
                d_model=d_model, nhead=nhead, num_encoder_layers=num_layers,
                num_decoder_layers=num_layers, dim_feedforward=dim_feedforward, dropout=0.0,
                batch_first=True, norm_first=True)
        self.hid2feat = nn.Linear(d_model, out_dim)

    def forward(self, llm: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        hid = self.llm2hid(llm + emb)
        hid = self.mapper(hid, self.query.expand(llm.shape[0], -1, -1))
        return self.hid2feat(hid)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], nhead: int = 4,
                        path: Path | str = "", what: str = WHAT) -> EditHead:
        """Build at the dimensions the weights have (``edit_head.`` prefix removed) and load
        them strictly. nhead is not visible in the weights: MGIE uses 4."""
        need = ("llm2hid.weight", "hid2feat.weight", "query",
                "mapper.encoder.layers.0.linear1.weight")
        missing = [f"edit_head.{k}" for k in need if k not in sd]
        if missing:
            check_state_dict_keys(what, path, missing, [])
        d_model, llm_dim = sd["llm2hid.weight"].shape
        layers = {int(m.group(1)) for k in sd
                  if (m := re.match(r"mapper\.encoder\.layers\.(\d+)\.", k))}
        head = cls(llm_dim=llm_dim, d_model=d_model, out_dim=sd["hid2feat.weight"].shape[0],
                   n_query=sd["query"].shape[1], nhead=nhead, num_layers=max(layers) + 1,
                   dim_feedforward=sd["mapper.encoder.layers.0.linear1.weight"].shape[0])
        own = head.state_dict()
        bad_shape = [k for k in sd if k in own and own[k].shape != sd[k].shape]
        check_state_dict_keys(
            what, path, sorted(f"edit_head.{k}" for k in set(own) - set(sd)),
            sorted(f"edit_head.{k}" for k in set(sd) - set(own))
            + [f"edit_head.{k} (shape {tuple(sd[k].shape)})" for k in bad_shape])
        head.load_state_dict(sd)
        return head


@dataclasses.dataclass
class MGIEOutput:
    """One instruction's result, with what produced it (for debugging and tests)."""

    expressive: str               # first two sentences of the answer before [IMG0]
    answer: str                   # the whole decoded answer before [IMG0]
    conditioning: Conditioning
    hidden: torch.Tensor          # (1, 8, H) visual tokens
    generated_ids: list[int]      # what generate returned after the prompt
    fallback: bool                # True when [IMG0] was never emitted


@dataclasses.dataclass
class MGIEModel:
    """A loaded MGIE MLLM (transparent custom socket type XMGIE_MGIE)."""

    llm: Any                      # transformers LlamaForCausalLM
    vision: Any                   # transformers CLIPVisionModel
    projector: nn.Linear
    edit_head: EditHead
    emb: torch.Tensor             # (1, 8, H)
    tokenizer: Any
    image_processor: Any
    device: torch.device
    dtype: torch.dtype
    path: Path
    num_patches: int = 256
    select_layer: int = -2
    use_im_start_end: bool = True
    # KV cache of the answer's decoding: "static" (preallocated for prompt + answer, the
    # default) or "dynamic" (transformers' default, grown by concatenation each token).
    kv_cache: str = "static"
    compile_decode: bool = False     # static cache only: let transformers compile a step

    def __repr__(self) -> str:
        return f"MGIEModel({self.path}, {self.device}, {self.dtype})"

    # ids
    def token_id(self, token: str) -> int:
        return int(self.tokenizer.convert_tokens_to_ids(token))

    @property
    def img_ids(self) -> list[int]:
        return [self.token_id(t) for t in IMG_TOKENS]

    # steps
    def prompt(self, instruction: str) -> str:
        image = IM_PATCH * self.num_patches
        if self.use_im_start_end:
            image = IM_START + image + IM_END
        user = PROMPT.format(instruction=instruction) + "\n" + image
        return f"{SYSTEM} USER: {user} ASSISTANT:"

    def image_features(self, image: torch.Tensor) -> torch.Tensor:
        """(1, num_patches, H): penultimate CLIP layer without CLS, projected."""
        pil = to_pil_images(image, "image")[0]
        pixels = self.image_processor(images=pil, return_tensors="pt")["pixel_values"]
        pixels = pixels.to(self.device, self.dtype)
        out = self.vision(pixel_values=pixels, output_hidden_states=True)
        feats = out.hidden_states[self.select_layer][:, 1:]
        return self.projector(feats)

    def embed(self, ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Token embeddings with the patch features spliced in at the <im_patch> positions."""
        embeds = self.llm.get_input_embeddings()(ids)
        where = ids[0] == self.token_id(IM_PATCH)
        embeds[0, where] = features[0].to(embeds.dtype)
        return embeds

    def edit(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.edit_head(hidden.to(self.dtype), self.emb)

    def null(self) -> torch.Tensor:
        """The null condition: edit_head(zeros(1, 8, H), emb)."""
        return self.edit(torch.zeros(1, len(IMG_TOKENS), self.emb.shape[-1], device=self.device))

    def generate(self, ids: torch.Tensor, embeds: torch.Tensor, max_new_tokens: int,
                 on_step=None) -> list[int]:
        """Greedy decoding (module docstring).

        KV cache. With ``kv_cache="static"`` transformers preallocates the keys
        and values for prompt + ``max_new_tokens`` (``cache_implementation="static"``)
        instead of growing them by a concatenation per token and layer; the tokens are the
        same (tested against the dynamic cache). On a GPU transformers would also compile
        the decoding step for a static cache; that compile takes minutes on LLaMA-7B, so
        it stays off unless ``compile_decode`` is set (``disable_compile``)."""
        gen = generation_kwargs(self.llm, self.tokenizer, max_new_tokens)
        gen.update(no_repeat_ngram_size=NO_REPEAT_NGRAM_SIZE,
                   eos_token_id=self.tokenizer.eos_token_id)
        if self.kv_cache not in ("static", "dynamic"):
            raise InputError("kv_cache", f"is {self.kv_cache!r}", "static or dynamic")
        if self.kv_cache == "static":
            gen.update(cache_implementation="static", disable_compile=not self.compile_decode)
        out = self.llm.generate(input_ids=ids, inputs_embeds=embeds,
                                attention_mask=torch.ones_like(ids), **gen,
                                stopping_criteria=interrupt_criteria(on_step))
        seq = out[0] if isinstance(out, torch.Tensor) else out.sequences[0]
        n = ids.shape[1]
        if seq.shape[0] >= n and torch.equal(seq[:n].cpu(), ids[0].cpu()):
            seq = seq[n:]
        return [int(t) for t in seq.tolist()]

    def run(self, image: torch.Tensor, instruction: str,
            max_new_tokens: int = MAX_NEW_TOKENS) -> MGIEOutput:
        if isinstance(image, torch.Tensor) and image.ndim == 4 and image.shape[0] != 1:
            raise InputError("image", f"got a batch of {image.shape[0]} images",
                             "one image [H,W,3] (or a batch of one)",
                             "Run MGIE on each image separately.")
        if not isinstance(instruction, str) or not instruction.strip():
            raise InputError("instruction", "it is empty", "an editing instruction, e.g. "
                             "'make it look like winter'")
        check_positive("max_new_tokens", max_new_tokens)
        self.check_instruction(instruction)
        enc = self.tokenizer(self.prompt(instruction.strip()), return_tensors="pt")
        ids = enc["input_ids"].to(self.device)
        self.check_context(ids.shape[1], max_new_tokens)
        n_patch = int((ids[0] == self.token_id(IM_PATCH)).sum())
        if n_patch != self.num_patches:
            raise ModelLoadError(WHAT, self.path, f"the tokenizer split the image placeholder "
                                 f"into {n_patch} {IM_PATCH} tokens, not {self.num_patches}",
                                 f"Its tokenizer must hold {IM_PATCH} as one added token.")
        with host.progress(max_new_tokens, "MGIE instruction") as bar, \
                torch.inference_mode():
            features = self.image_features(image)
            new = self.generate(ids, self.embed(ids, features), max_new_tokens, bar.update)
            text_ids, fallback = self.answer_ids(new)
            img = self.img_ids
            full = torch.cat([ids, torch.tensor([text_ids + img], device=self.device)], 1)
            last = self.llm.model(inputs_embeds=self.embed(full, features),
                                  attention_mask=torch.ones_like(full)).last_hidden_state
            start = ids.shape[1] + len(text_ids)      # position of [IMG0]
            hidden = last[:, start - 1:start + len(img) - 1]
            cond, null = self.edit(hidden), self.null()
        answer = self.tokenizer.decode(text_ids, skip_special_tokens=True).strip()
        expressive = first_sentences(answer)
        conditioning = Conditioning(cond=cond.float().cpu(), null=null.float().cpu(),
                                    text=expressive, source="mgie")
        return MGIEOutput(expressive=expressive, answer=answer, conditioning=conditioning,
                          hidden=hidden.float().cpu(), generated_ids=new, fallback=fallback)

    def reserved_texts(self) -> list[str]:
        """Token texts an instruction may not hold: the image placeholders, MGIE's [IMG]
        tokens and the tokenizer's special tokens (they would change the prompt's
        layout, not its meaning)."""
        tok = self.tokenizer
        special = [getattr(tok, a, None) for a in ("bos_token", "eos_token", "unk_token",
                                                    "pad_token")]
        return [t for t in [IM_PATCH, IM_START, IM_END, *IMG_TOKENS, *special]
                if isinstance(t, str) and t]

    def check_instruction(self, instruction: str) -> None:
        found = [t for t in self.reserved_texts() if t in instruction]
        if found:
            raise InputError("instruction", f"contains {', '.join(repr(t) for t in found)}, "
                             "text MGIE's prompt reserves for the image and its own tokens",
                             "plain editing text", "Remove it from the instruction.")

    def context_length(self) -> int:
        return int(getattr(self.llm.config, "max_position_embeddings", 0) or 0)

    def check_context(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """The prompt, the answer and the 8 [IMG] tokens must fit the language model's
        context; past it the positions have no meaning (LLaMA-7B: 2048)."""
        ctx = self.context_length()
        need = prompt_tokens + int(max_new_tokens) + len(IMG_TOKENS)
        if ctx and need > ctx:
            room = ctx - prompt_tokens - len(IMG_TOKENS)
            fix = (f"Shorten the instruction, or lower max_new_tokens to {room} or less."
                   if room >= 1 else "Shorten the instruction (a sentence or two is what "
                   "MGIE was trained on).")
            raise InputError("instruction", f"makes a prompt of {prompt_tokens} tokens (with "
                             f"the image's {self.num_patches}); with max_new_tokens="
                             f"{int(max_new_tokens)} and the 8 [IMG] tokens that is {need}, "
                             f"past the language model's context of {ctx} tokens",
                             "an instruction that fits", fix)

    def answer_ids(self, new: list[int]) -> tuple[list[int], bool]:
        """The generated ids before [IMG0] (and before </s>), and whether [IMG0] is absent.

        Image tokens the model should never write (a stray [IMG1..7], or an image
        placeholder <im_patch>/<im_start>/<im_end>; possible only in a broken or random
        model) are dropped from the text: the teacher-forced pass splices the image
        features at every <im_patch>, so one in the answer would not fit."""
        img0 = self.token_id(IMG_TOKENS[0])
        eos = self.tokenizer.eos_token_id
        stray = set(self.img_ids) | {self.token_id(t) for t in (IM_PATCH, IM_START, IM_END)}
        if img0 in new:
            return [t for t in new[:new.index(img0)] if t not in stray], False
        if eos is not None and eos in new:
            new = new[:new.index(eos)]
        return [t for t in new if t not in stray], True

    def instruct(self, image: torch.Tensor, instruction: str,
                 max_new_tokens: int = MAX_NEW_TOKENS) -> tuple[str, Conditioning]:
        """Expressive instruction (first two sentences) and the edit condition."""
        out = self.run(image, instruction, max_new_tokens)
        return out.expressive, out.conditioning


def first_sentences(text: str, n: int = 2) -> str:
    """The first ``n`` sentences, ending with a period (what MGIE's demo displays). MGIE
    sometimes goes on with 'Alternatively, ...': that part is dropped too."""
    low = text.lower()
    if "alternative" in low:
        text = text[:low.index("alternative")]
    parts = [p.strip() for p in text.split(".") if p.strip()][:n]
    return (". ".join(parts) + ".") if parts else ""
