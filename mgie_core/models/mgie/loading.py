"""Loading MGIE from its folder (layout and keys in :mod:`.layout`): the LLaVA-7B v1
language model built on the meta device and loaded in place, the CLIP vision tower, the
projector, then ``mllm.pt``'s overrides and the edit head, every key checked."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ... import grad_mode, host, memory, paths
from ...errors import ModelLoadError, ModelNotFoundError
from ..hf import TOKENIZER_FIX, first_line
from ..sd import resolve_dtype
from ..validate import (
    CLIP_ARCHITECTURES,
    CLIP_TEXT_KEYS,
    check_hf_folder,
    check_loading_info,
    check_state_dict_keys,
    check_tokenizer,
    describe_load_error,
    read_weights_file,
    weights_file,
)
from .layout import IM_END, IM_PATCH, IM_START, IMG_TOKENS, LLAMA_KEYS, MLLM_FILE, WHAT, family
from .model import EditHead, MGIEModel

# What the LLaVA folder's config.json may say it is (the LLaVA fork's class, or LLaMA's).
LLAVA_MODEL_TYPES = ("llava", "llama")
LLAVA_ARCHITECTURES = ("LlavaLlamaForCausalLM", "LlamaForCausalLM")
# A whole CLIP folder as the vision tower also carries the image projection, unused here.
VISION_OPTIONAL = CLIP_TEXT_KEYS + ("visual_projection.*",)


@grad_mode.builds_weights
def load_mgie(name: str, dtype="auto", device=None) -> MGIEModel:
    """Load an MGIE folder (layout in the module docstring) by name or path."""
    from transformers import AutoTokenizer

    fam = family()
    folder = paths.resolve(fam, name)
    llava = find_llava_folder(folder)
    # Every config of the folder read as data first: no auto_map, no class but LLaVA's /
    # LLaMA's (the language model is always built as transformers' LlamaForCausalLM).
    config = check_hf_folder(llava, WHAT, model_types=LLAVA_MODEL_TYPES,
                             architectures=LLAVA_ARCHITECTURES)
    device = torch.device(device) if device is not None else host.device()
    dtype = resolve_dtype(dtype, device)

    # tokenizer
    if not (llava / "tokenizer_config.json").exists():
        raise ModelLoadError(WHAT, llava, "missing tokenizer_config.json", TOKENIZER_FIX)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(llava), local_files_only=True,
                                                  trust_remote_code=False)
    except Exception as e:
        raise ModelLoadError(WHAT, llava, f"its tokenizer could not be read: "
                             f"{type(e).__name__}: {first_line(e)}", TOKENIZER_FIX +
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
                                 f"{describe_load_error(e)}") from e
    edit_head = EditHead.from_state_dict(head_sd, path=folder / MLLM_FILE)
    emb = mllm["emb"].reshape(1, len(IMG_TOKENS), -1)
    if emb.shape[-1] != llm.config.hidden_size or edit_head.llm2hid.in_features != emb.shape[-1]:
        raise ModelLoadError(WHAT, folder / MLLM_FILE, f"emb has width {emb.shape[-1]}, the "
                             f"LLM {llm.config.hidden_size} and the edit head "
                             f"{edit_head.llm2hid.in_features}",
                             "mllm.pt and the LLaVA folder must belong to the same model.")

    vcfg = vision.config
    # Everything is on the CPU so far; memory.manage frees room on the device before
    # putting the 7B there (standalone), or leaves that to ComfyUI's loader.
    model = MGIEModel(
        llm=llm.requires_grad_(False).eval().to(dtype),
        vision=vision, projector=projector.requires_grad_(False).eval().to(dtype),
        edit_head=edit_head.requires_grad_(False).eval().to(dtype),
        emb=emb.to(device, dtype), tokenizer=tokenizer, image_processor=image_processor,
        device=device, dtype=dtype, path=folder,
        num_patches=(vcfg.image_size // vcfg.patch_size) ** 2,
        select_layer=int(config.get("mm_vision_select_layer", -2)),
        use_im_start_end=use_im_start_end)
    return memory.manage(model, {f"MGIE {folder.name} LLM": model.llm,
                                 f"MGIE {folder.name} vision tower": model.vision,
                                 f"MGIE {folder.name} projector": model.projector,
                                 f"MGIE {folder.name} edit head": model.edit_head}, device)


def read_mllm(path: Path) -> dict[str, torch.Tensor]:
    sd = read_weights_file(path, WHAT)
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
    check_hf_folder(found, f"{WHAT} vision tower", model_types=("clip", "clip_vision_model"),
                    architectures=CLIP_ARCHITECTURES)
    try:
        vcfg = CLIPVisionConfig.from_pretrained(str(found), local_files_only=True)
        vision, info = CLIPVisionModel.from_pretrained(
            str(found), config=vcfg, local_files_only=True, dtype=dtype,
            output_loading_info=True)
    except Exception as e:
        raise ModelLoadError(WHAT, found, f"the CLIP vision tower could not be loaded: "
                             f"{describe_load_error(e)}",
                             "The folder needs config.json and model weights.") from e
    check_loading_info(info, f"{WHAT} vision tower", weights_file(found), VISION_OPTIONAL)
    size = vcfg.image_size
    if (found / "preprocessor_config.json").exists():
        processor = CLIPImageProcessor.from_pretrained(str(found), local_files_only=True)
    else:  # CLIP's defaults: resize the short side, center crop, OpenAI mean/std
        processor = CLIPImageProcessor(size={"shortest_edge": size},
                                       crop_size={"height": size, "width": size})
    return vision.requires_grad_(False).eval(), processor


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
        raise ModelLoadError(WHAT, llava, f"config.json is not a LLaMA config: {first_line(e)}"
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
    check_state_dict_keys(WHAT, weights_file(llava), sorted(own - set(weights)),
                          sorted(set(weights) - own))
    try:
        llm.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, assign=True)
    except RuntimeError as e:
        raise ModelLoadError(WHAT, llava, f"the weights do not fit config.json: "
                             f"{describe_load_error(e)}") from e
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
    return llm, projector


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise ModelLoadError(WHAT, folder, "no weights (*.safetensors or pytorch_model*.bin)",
                             "Copy the whole LLaVA-7B v1 folder.")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(read_weights_file(f, WHAT, mmap=True))
    return sd
