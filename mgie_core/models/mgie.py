"""MGIE's multimodal LLM: instruction -> expressive instruction + visual tokens -> edit
condition (ALGORITHMS.md section 1), on current transformers without the LLaVA fork.

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

import dataclasses
import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import paths, runtime
from ..errors import InputError, ModelLoadError, ModelNotFoundError
from ..sampler import Conditioning
from .captioner import (TOKENIZER_FIX, _check_positive, _first_line, generation_kwargs,
                        interrupt_criteria, read_config, to_pil_images)
from .sd import resolve_dtype
from .validate import check_state_dict_keys, check_tokenizer

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

# The models-folder family; the lead registers it in paths.py. Until then (and so this
# module never depends on it) the same definition is used unregistered.
FAMILY_KEY = "mgie"
_FAMILY = paths.Family(
    key=FAMILY_KEY, what=WHAT, folder="mgie", kind="folder", folder_marker=MLLM_FILE,
    default_names=("mgie_7b",),
    published="Apple's MGIE release (github.com/apple/ml-mgie, checkpoint mgie_7b: mllm.pt) "
              "on top of LLaVA-7B v1 (the LLaVA-7b-delta-v1 applied to LLaMA-7B) and "
              "https://huggingface.co/openai/clip-vit-large-patch14; see "
              "mgie_core/models/mgie.py for the folder layout",
    tiny_name="tiny-mgie")


def family() -> paths.Family:
    return paths.FAMILIES.get(FAMILY_KEY, _FAMILY)


# --- edit head ----------------------------------------------------------------------------


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
                        path: Path | str = "", what: str = WHAT) -> "EditHead":
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


# --- the model ------------------------------------------------------------------------------


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
        gen = generation_kwargs(self.llm, self.tokenizer, max_new_tokens)
        gen.update(no_repeat_ngram_size=NO_REPEAT_NGRAM_SIZE,
                   eos_token_id=self.tokenizer.eos_token_id)
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
        _check_positive("max_new_tokens", max_new_tokens)
        enc = self.tokenizer(self.prompt(instruction.strip()), return_tensors="pt")
        ids = enc["input_ids"].to(self.device)
        n_patch = int((ids[0] == self.token_id(IM_PATCH)).sum())
        if n_patch != self.num_patches:
            raise ModelLoadError(WHAT, self.path, f"the tokenizer split the image placeholder "
                                 f"into {n_patch} {IM_PATCH} tokens, not {self.num_patches}",
                                 f"Its tokenizer must hold {IM_PATCH} as one added token.")
        with runtime.progress(max_new_tokens, "MGIE instruction") as bar, \
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

    def answer_ids(self, new: list[int]) -> tuple[list[int], bool]:
        """The generated ids before [IMG0] (and before </s>), and whether [IMG0] is absent."""
        img0 = self.token_id(IMG_TOKENS[0])
        eos = self.tokenizer.eos_token_id
        if img0 in new:
            return new[:new.index(img0)], False
        if eos is not None and eos in new:
            new = new[:new.index(eos)]
        # Keep a stray [IMG1..7] (possible only in a broken model) out of the text.
        stray = set(self.img_ids)
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


# --- loading --------------------------------------------------------------------------------


def load_mgie(name: str, dtype="auto", device=None) -> MGIEModel:
    """Load an MGIE folder (layout in the module docstring) by name or path."""
    from transformers import AutoTokenizer

    fam = family()
    folder = paths.resolve(fam, name)
    llava = find_llava_folder(folder)
    config = read_config(llava, WHAT)
    device = torch.device(device) if device is not None else runtime.device()
    dtype = resolve_dtype(dtype, device)

    # tokenizer
    if not (llava / "tokenizer_config.json").exists():
        raise ModelLoadError(WHAT, llava, "missing tokenizer_config.json", TOKENIZER_FIX)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(llava), local_files_only=True)
    except Exception as e:
        raise ModelLoadError(WHAT, llava, f"its tokenizer could not be read: "
                             f"{type(e).__name__}: {_first_line(e)}", TOKENIZER_FIX +
                             " LLaMA's tokenizer.model also needs the sentencepiece package."
                             ) from e
    check_tokenizer(tokenizer, llava, f"{WHAT} tokenizer")
    use_im_start_end = bool(config.get("mm_use_im_start_end", True))
    image_tokens = [IM_PATCH] + ([IM_START, IM_END] if use_im_start_end else [])
    for group in (image_tokens, list(IMG_TOKENS)):  # MGIE's demo adds them when missing
        missing_tokens = [t for t in group if t not in tokenizer.get_vocab()]
        if missing_tokens:
            tokenizer.add_tokens(missing_tokens, special_tokens=True)
    for t in image_tokens + list(IMG_TOKENS):
        if len(tokenizer.tokenize(t)) != 1:
            raise ModelLoadError(WHAT, llava, f"the tokenizer does not keep {t} as one token",
                                 "Use the tokenizer files that came with LLaVA-7B v1.")

    mllm = read_mllm(folder / MLLM_FILE)
    vocab = len(tokenizer)
    rows = mllm["model.embed_tokens.weight"].shape[0]
    top = max(tokenizer.convert_tokens_to_ids(t) for t in image_tokens + list(IMG_TOKENS))
    if rows < vocab or top >= rows:
        raise ModelLoadError(WHAT, folder / MLLM_FILE, f"its embeddings have {rows} rows but "
                             f"the tokenizer with [IMG0]..[IMG7] has "
                             f"{vocab} tokens", "Use the LLaVA-7B v1 tokenizer this mllm.pt "
                             "was trained with (32003 tokens before the [IMG] tokens).")

    vision, image_processor = load_vision_tower(folder, llava, config, dtype, device)
    llm, projector = load_llava(llava, config, dtype, device)
    llm.resize_token_embeddings(rows, mean_resizing=False)

    # mllm.pt overrides, then the edit head.
    head_sd = {k[len("edit_head."):]: v for k, v in mllm.items() if k.startswith("edit_head.")}
    llm_sd = llm.state_dict()
    unexpected, over, proj = [], {}, {}
    for k, v in mllm.items():
        if k.startswith("edit_head.") or k == "emb":
            continue
        if k.startswith("model.mm_projector."):
            proj[k[len("model.mm_projector."):]] = v
        elif k in llm_sd and llm_sd[k].shape == v.shape:
            over[k] = v
        else:
            unexpected.append(k if k not in llm_sd else f"{k} (shape {tuple(v.shape)})")
    check_state_dict_keys(WHAT, folder / MLLM_FILE, [], unexpected)
    llm.load_state_dict({k: v.to(dtype) for k, v in over.items()}, strict=False)
    if proj:
        try:
            projector.load_state_dict(proj)
        except RuntimeError as e:
            raise ModelLoadError(WHAT, folder / MLLM_FILE, f"model.mm_projector does not fit: "
                                 f"{_first_line(e)}") from e
    edit_head = EditHead.from_state_dict(head_sd, path=folder / MLLM_FILE)
    emb = mllm["emb"].reshape(1, len(IMG_TOKENS), -1)
    if emb.shape[-1] != llm.config.hidden_size or edit_head.llm2hid.in_features != emb.shape[-1]:
        raise ModelLoadError(WHAT, folder / MLLM_FILE, f"emb has width {emb.shape[-1]}, the "
                             f"LLM {llm.config.hidden_size} and the edit head "
                             f"{edit_head.llm2hid.in_features}",
                             "mllm.pt and the LLaVA folder must belong to the same model.")

    vcfg = vision.config
    return MGIEModel(
        llm=llm.requires_grad_(False).eval().to(device, dtype),
        vision=vision, projector=projector.requires_grad_(False).eval().to(device, dtype),
        edit_head=edit_head.requires_grad_(False).eval().to(device, dtype),
        emb=emb.to(device, dtype), tokenizer=tokenizer, image_processor=image_processor,
        device=device, dtype=dtype, path=folder,
        num_patches=(vcfg.image_size // vcfg.patch_size) ** 2,
        select_layer=int(config.get("mm_vision_select_layer", -2)),
        use_im_start_end=use_im_start_end)


def read_mllm(path: Path) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelLoadError(WHAT, path, f"it could not be read: {type(e).__name__}: "
                             f"{_first_line(e)}", "Download mllm.pt again.") from e
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ModelLoadError(WHAT, path, f"it holds a {type(sd).__name__}, not a state dict")
    required = ["model.embed_tokens.weight", "lm_head.weight", "emb"]
    missing = [k for k in required if k not in sd]
    if not any(k.startswith("edit_head.") for k in sd):
        missing.append("edit_head.*")
    check_state_dict_keys(WHAT, path, missing, [])
    return sd


def find_llava_folder(folder: Path) -> Path:
    """The LLaVA-7B v1 folder: a sub-folder, else a sibling, with mm_vision_tower."""
    candidates = [p for p in sorted(folder.iterdir()) if p.is_dir()] + \
        [p for p in sorted(folder.parent.iterdir()) if p.is_dir() and p != folder]
    for p in candidates:
        try:
            cfg = json.loads((p / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(cfg, dict) and "mm_vision_tower" in cfg:
            return p
    raise ModelLoadError(WHAT, folder, "no LLaVA-7B v1 folder was found in it or beside it "
                         "(a folder whose config.json has mm_vision_tower)",
                         "Apply LLaVA-7b-delta-v1 to LLaMA-7B as ml-mgie's README says and "
                         "put the resulting folder (e.g. LLaVA-7B-v1) inside this folder.")


def load_vision_tower(folder: Path, llava: Path, config: dict, dtype, device):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    tower = str(config.get("mm_vision_tower") or "openai/clip-vit-large-patch14")
    base = tower.rstrip("/").split("/")[-1]
    candidates = [Path(tower).expanduser(), llava / tower, folder / base, llava / base,
                  folder.parent / base]
    found = next((p for p in candidates if (p / "config.json").is_file()), None)
    if found is None:
        try:
            found = paths.resolve(paths.CLIP_VISION, base)
        except ModelNotFoundError as e:
            raise ModelLoadError(WHAT, folder, f"its vision tower '{tower}' was not found "
                                 f"(looked in {', '.join(str(p) for p in candidates)} and the "
                                 f"clip_vision folders)", f"Put {paths.CLIP_VISION.published} "
                                 f"into {folder / base}.") from e
    try:
        vcfg = CLIPVisionConfig.from_pretrained(str(found), local_files_only=True)
        vision, info = CLIPVisionModel.from_pretrained(
            str(found), config=vcfg, local_files_only=True, dtype=dtype,
            output_loading_info=True)
    except Exception as e:
        raise ModelLoadError(WHAT, found, f"the CLIP vision tower could not be loaded: "
                             f"{type(e).__name__}: {_first_line(e)}",
                             "The folder needs config.json and model weights.") from e
    check_state_dict_keys(f"{WHAT} vision tower", found, list(info.get("missing_keys", ())), [])
    size = vcfg.image_size
    if (found / "preprocessor_config.json").exists():
        processor = CLIPImageProcessor.from_pretrained(str(found), local_files_only=True)
    else:  # CLIP's defaults: resize the short side, center crop, OpenAI mean/std
        processor = CLIPImageProcessor(size={"shortest_edge": size},
                                       crop_size={"height": size, "width": size})
    return vision.requires_grad_(False).eval().to(device), processor


LLAMA_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
              "rms_norm_eps", "hidden_act", "rope_theta", "tie_word_embeddings",
              "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range")


def load_llava(llava: Path, config: dict, dtype, device):
    """LlamaForCausalLM + mm_projector from the LLaVA fork's folder (its config.json has
    model_type 'llava', which transformers' own Llava class does not read)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = {k: config[k] for k in LLAMA_KEYS if config.get(k) is not None}
    if isinstance(kwargs.get("pad_token_id"), int) and kwargs["pad_token_id"] < 0:
        kwargs.pop("pad_token_id")  # LLaMA-1 configs say -1
    try:
        lcfg = LlamaConfig(**kwargs)
    except Exception as e:
        raise ModelLoadError(WHAT, llava, f"config.json is not a LLaMA config: {_first_line(e)}"
                             ) from e
    weights = read_weights(llava)
    proj_sd = {k[len("model.mm_projector."):]: weights.pop(k) for k in list(weights)
               if k.startswith("model.mm_projector.")}
    for k in list(weights):
        if k.startswith(("model.vision_tower.", "vision_tower.")) or k.endswith("inv_freq"):
            weights.pop(k)
    # Build on the meta device (no 7B random init), load with assign=True, then rebuild
    # the rotary embedding, whose inv_freq buffer is computed, not stored in the weights.
    with torch.device("meta"):
        llm = LlamaForCausalLM(lcfg)
    own = set(llm.state_dict())
    check_state_dict_keys(WHAT, llava, sorted(own - set(weights)), sorted(set(weights) - own))
    try:
        llm.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, assign=True)
    except RuntimeError as e:
        raise ModelLoadError(WHAT, llava, f"the weights do not fit config.json: "
                             f"{_first_line(e)}") from e
    rotary = llm.model.rotary_emb
    llm.model.rotary_emb = type(rotary)(config=lcfg)
    still_meta = [n for n, t in [*llm.named_parameters(), *llm.named_buffers()] if t.is_meta]
    if still_meta:
        raise ModelLoadError(WHAT, llava, f"{len(still_meta)} tensors were not loaded "
                             f"(e.g. {', '.join(still_meta[:4])})")
    if set(proj_sd) != {"weight", "bias"}:
        raise ModelLoadError(WHAT, llava, "its weights have no model.mm_projector.weight/bias "
                             "(the LLaVA projector)", "Use LLaVA-7B v1 (with the delta applied), "
                             "not plain LLaMA.")
    projector = nn.Linear(proj_sd["weight"].shape[1], proj_sd["weight"].shape[0])
    projector.load_state_dict(proj_sd)
    hidden = int(config.get("mm_hidden_size", projector.in_features))
    if projector.in_features != hidden or projector.out_features != lcfg.hidden_size:
        raise ModelLoadError(WHAT, llava, f"mm_projector maps {projector.in_features} -> "
                             f"{projector.out_features}, expected {hidden} -> {lcfg.hidden_size}")
    return llm.to(device), projector


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise ModelLoadError(WHAT, folder, "no weights (*.safetensors or pytorch_model*.bin)",
                             "Copy the whole LLaVA-7B v1 folder.")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            if f.suffix == ".safetensors":
                from safetensors.torch import load_file

                sd.update(load_file(str(f)))
            else:
                sd.update(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
        except Exception as e:
            raise ModelLoadError(WHAT, f, f"it could not be read: {type(e).__name__}: "
                                 f"{_first_line(e)}") from e
    return sd
