"""A trained MGIE on disk, and applying it to a loaded MGIE and its UNet without touching
them (docs/algorithms.md section 14).

What an MGIE training run writes to its ``final/`` folder (``xmgie train
configs/train/mgie.yaml``)::

    final/
      trained.json               {"kind": "mgie", "format": 1, "llm_dim", "vocab_size",
                                  "img_token_ids", "edit_head": {"nhead"}, "lora": null or
                                  {"r", "alpha", "target_modules", "dropout"},
                                  "cross_attention_dim", "source": {...}}
      mgie_trained.safetensors   mllm.pt's key names: model.embed_tokens.weight (V, H),
                                 lm_head.weight (V, H), emb (1, 8, H), edit_head.*
      unet/                      the 8-channel UNet (diffusers layout: config.json +
                                 diffusion_pytorch_model.safetensors)
      adapter/                   with LoRA only: peft's save_pretrained of the adapters on
                                 the LLaMA body (LlamaModel, not the causal-LM wrapper)

``emb`` (the edit head's per-token offset) is the [IMG0..7] rows of the trained input
embedding matrix, as in MGIE's training, where the edit head reads those rows.

:func:`apply_mgie_trained` returns NEW :class:`MGIEModel` / :class:`SDModel` objects: the
parts that change (embedding, LM head, edit head, the LLaMA body when adapters are
merged, the UNet) are copies carrying the trained weights; the unchanged parts (LLaMA
layers without LoRA, vision tower, projector, VAE, text encoder, tokenizers) are shared.
The given models, which a model cache may hold, are never modified.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ... import grad_mode, memory
from ...atomic import write_json
from ...errors import ModelLoadError
from .. import sd as sd_lib
from ..validate import describe_load_error, first_line, read_json
from .layout import IMG_TOKENS
from .model import EditHead, MGIEModel

KIND = "mgie"
FORMAT = 1
TRAINED_JSON = "trained.json"
WEIGHTS_FILE = "mgie_trained.safetensors"
UNET_DIR = "unet"
ADAPTER_DIR = "adapter"
WHAT = "trained MGIE"
MAKE = ("Make one with `xmgie train configs/train/mgie.yaml --out DIR` and load DIR/final "
        "(or a checkpoint's export); it holds trained.json, mgie_trained.safetensors and "
        "unet/.")
EMBED_KEY, HEAD_KEY, EMB_KEY = "model.embed_tokens.weight", "lm_head.weight", "emb"


@dataclasses.dataclass
class TrainedMGIE:
    """A trained-MGIE folder read and checked on its own (nothing applied yet)."""

    folder: Path
    meta: dict[str, Any]
    embed: torch.Tensor          # (V, H)
    lm_head: torch.Tensor        # (V, H)
    emb: torch.Tensor            # (1, 8, H)
    edit_head: EditHead
    unet_dir: Path
    adapter_dir: Path | None


def save_mgie_trained(folder: Path | str, *, embed: torch.Tensor, lm_head: torch.Tensor,
                      img_token_ids: list[int], edit_head: EditHead, unet: nn.Module,
                      adapter: Any = None, lora: dict | None = None, nhead: int = 4,
                      source: dict | None = None) -> Path:
    """Write the folder (layout in the module docstring). ``embed``/``lm_head`` are the
    whole matrices; ``emb`` is taken from ``embed``'s [IMG] rows. ``adapter`` is the peft
    model wrapping the LLaMA body (with ``lora`` its settings), or None. trained.json is
    written last, so a folder with it is complete."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if len(img_token_ids) != len(IMG_TOKENS):
        raise ValueError(f"img_token_ids: {len(img_token_ids)} ids, expected 8")
    embed = embed.detach().float().cpu()
    tensors = {EMBED_KEY: embed.contiguous(),
               HEAD_KEY: lm_head.detach().float().cpu().contiguous(),
               EMB_KEY: embed[list(img_token_ids)].unsqueeze(0).contiguous()}
    tensors.update({f"edit_head.{k}": v.detach().float().cpu().contiguous()
                    for k, v in edit_head.state_dict().items()})
    (folder / TRAINED_JSON).unlink(missing_ok=True)   # incomplete until rewritten
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    unet_copy = unet
    if next(unet.parameters()).dtype != torch.float32:
        unet_copy = copy.deepcopy(unet).float()
    unet_copy.save_pretrained(folder / UNET_DIR, safe_serialization=True)
    if adapter is not None:
        adapter.save_pretrained(str(folder / ADAPTER_DIR))
    meta = {"kind": KIND, "format": FORMAT, "llm_dim": int(embed.shape[1]),
            "vocab_size": int(embed.shape[0]), "img_token_ids": [int(i) for i in img_token_ids],
            "edit_head": {"nhead": int(nhead)}, "lora": lora if adapter is not None else None,
            "cross_attention_dim": int(edit_head.hid2feat.out_features),
            "source": source or {}}
    write_json(folder / TRAINED_JSON, meta)
    return folder


def read_mgie_trained(folder: Path | str) -> TrainedMGIE:
    """Read and check a trained-MGIE folder; every problem names the file and how to
    make a good one."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLoadError(WHAT, folder, "the folder does not exist", MAKE)
    info = folder / TRAINED_JSON
    if not info.is_file():
        raise ModelLoadError(WHAT, folder, f"it has no {TRAINED_JSON}, so it is not the "
                             "output of a training run (or the run did not finish)", MAKE)
    meta = read_json(info, WHAT, MAKE)
    kind = meta.get("kind")
    if kind != KIND:
        other = (" It holds trained xMGIE modules (PFB weights, identity injection): load "
                 "them with the xMGIE trained-modules loader instead." if kind == "xmgie"
                 else "")
        raise ModelLoadError(WHAT, info, f"its kind is {kind!r}, not 'mgie'.{other}", MAKE)
    if meta.get("format") != FORMAT:
        raise ModelLoadError(WHAT, info, f"its format is {meta.get('format')!r}; this "
                             f"version reads format {FORMAT}", "Train it again with this "
                             "version of xmgie.")
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelLoadError(WHAT, folder, f"{WEIGHTS_FILE} is missing", MAKE)
    try:
        sd = load_file(str(weights))
    except Exception as e:
        raise ModelLoadError(WHAT, weights, f"it could not be read ({type(e).__name__}: "
                             f"{first_line(e)})", MAKE) from e
    missing = [k for k in (EMBED_KEY, HEAD_KEY, EMB_KEY) if k not in sd]
    head_sd = {k[len("edit_head."):]: v for k, v in sd.items() if k.startswith("edit_head.")}
    if not head_sd:
        missing.append("edit_head.*")
    extra = [k for k in sd if k not in (EMBED_KEY, HEAD_KEY, EMB_KEY)
             and not k.startswith("edit_head.")]
    if missing or extra:
        raise ModelLoadError(WHAT, weights, "; ".join(
            p for p in (f"missing {', '.join(missing)}" if missing else "",
                        f"unexpected {', '.join(sorted(extra)[:8])}" if extra else "") if p),
            MAKE)
    nhead = int((meta.get("edit_head") or {}).get("nhead", 4))
    head = EditHead.from_state_dict(head_sd, nhead=nhead, path=weights, what=WHAT)
    embed, lm_head, emb = sd[EMBED_KEY], sd[HEAD_KEY], sd[EMB_KEY]
    if embed.ndim != 2 or lm_head.shape != embed.shape:
        raise ModelLoadError(WHAT, weights, f"{EMBED_KEY} has shape {tuple(embed.shape)} and "
                             f"{HEAD_KEY} {tuple(lm_head.shape)}; they must be the same "
                             "(vocabulary, width)", MAKE)
    emb = emb.reshape(1, len(IMG_TOKENS), -1) if emb.numel() == 8 * embed.shape[1] else emb
    if tuple(emb.shape) != (1, len(IMG_TOKENS), embed.shape[1]) \
            or head.llm2hid.in_features != embed.shape[1]:
        raise ModelLoadError(WHAT, weights, f"emb has shape {tuple(emb.shape)} and the edit "
                             f"head reads width {head.llm2hid.in_features}, but the "
                             f"embeddings are {embed.shape[1]} wide", MAKE)
    unet_dir = folder / UNET_DIR
    if not (unet_dir / "config.json").is_file():
        raise ModelLoadError(WHAT, folder, f"{UNET_DIR}/config.json is missing (the trained "
                             "UNet)", MAKE)
    adapter_dir = None
    if meta.get("lora"):
        adapter_dir = folder / ADAPTER_DIR
        if not (adapter_dir / "adapter_config.json").is_file():
            raise ModelLoadError(WHAT, folder, f"trained.json says the LLM was trained with "
                                 f"LoRA but {ADAPTER_DIR}/adapter_config.json is missing", MAKE)
    return TrainedMGIE(folder=folder, meta=meta, embed=embed, lm_head=lm_head, emb=emb,
                       edit_head=head, unet_dir=unet_dir, adapter_dir=adapter_dir)


def _shallow(module: nn.Module) -> nn.Module:
    """A new module object sharing the children, parameters and buffers of ``module``
    but with its own registries, so replacing a child of the copy leaves the original
    as it was."""
    new = copy.copy(module)
    new._modules = dict(module._modules)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    return new


def _check_fits(trained: TrainedMGIE, mgie: MGIEModel, sd) -> None:
    rows, width = (int(s) for s in mgie.llm.get_input_embeddings().weight.shape)
    folder = trained.folder
    if tuple(trained.embed.shape) != (rows, width):
        raise ModelLoadError(WHAT, folder / WEIGHTS_FILE, f"its embeddings are "
                             f"{tuple(trained.embed.shape)} (vocabulary, width) but the MGIE "
                             f"model {mgie.path} has {(rows, width)}", "Apply it to the MGIE "
                             "model it was trained from (trained.json's source), or train "
                             "on this one.")
    ids = trained.meta.get("img_token_ids")
    if ids is not None and [int(i) for i in ids] != mgie.img_ids:
        raise ModelLoadError(WHAT, folder / TRAINED_JSON, f"its [IMG] token ids {ids} are not "
                             f"those of {mgie.path} ({mgie.img_ids})", "Apply it to the MGIE "
                             "model it was trained from.")
    if trained.edit_head.hid2feat.out_features != mgie.edit_head.hid2feat.out_features:
        raise ModelLoadError(WHAT, folder / WEIGHTS_FILE, f"its edit head writes width "
                             f"{trained.edit_head.hid2feat.out_features}, the MGIE model's "
                             f"{mgie.edit_head.hid2feat.out_features}", "Apply it to the MGIE "
                             "model it was trained from.")
    cfg = _read_unet_config(trained.unet_dir)
    problems = []
    if cfg.get("in_channels") != 8:
        problems.append(f"it takes {cfg.get('in_channels')} input channels, not 8")
    cross = cfg.get("cross_attention_dim")
    if cross != trained.edit_head.hid2feat.out_features:
        problems.append(f"its cross-attention width {cross} is not the edit head's "
                        f"{trained.edit_head.hid2feat.out_features}")
    latent = int(sd.vae.config.latent_channels)
    if cfg.get("out_channels") != latent:
        problems.append(f"it predicts {cfg.get('out_channels')} channels, the VAE's latents "
                        f"have {latent}")
    if problems:
        raise ModelLoadError(WHAT, trained.unet_dir / "config.json",
                             "the UNet does not fit: " + "; ".join(problems),
                             "Apply it with the SD 1.5 VAE it was trained with. " + MAKE)


def _read_unet_config(unet_dir: Path) -> dict:
    return read_json(unet_dir / "config.json", f"{WHAT} UNet", MAKE)


def _load_unet(unet_dir: Path, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel

    try:
        unet, info = UNet2DConditionModel.from_pretrained(
            str(unet_dir), local_files_only=True, output_loading_info=True)
    except Exception as e:
        raise ModelLoadError(WHAT, unet_dir, f"the trained UNet could not be loaded: "
                             f"{describe_load_error(e)}", MAKE) from e
    bad = [k for key in ("missing_keys", "unexpected_keys", "mismatched_keys")
           for k in info.get(key) or []]
    if bad:
        raise ModelLoadError(WHAT, unet_dir, f"its weights do not fit its config.json "
                             f"(e.g. {', '.join(str(b) for b in bad[:4])})", MAKE)
    return unet.requires_grad_(False).eval().to(dtype=dtype)


def _merge_adapter(body: nn.Module, adapter_dir: Path) -> nn.Module:
    """A merged copy of the LLaMA body with the LoRA adapters in ``adapter_dir``."""
    from peft import PeftModel

    body = copy.deepcopy(body)
    try:
        peft_model = PeftModel.from_pretrained(body, str(adapter_dir), is_trainable=False)
    except Exception as e:
        raise ModelLoadError(WHAT, adapter_dir, f"the LoRA adapters do not fit this MGIE "
                             f"model's LLM: {describe_load_error(e)}", "Apply it to the MGIE "
                             "model it was trained from. " + MAKE) from e
    return peft_model.merge_and_unload()


@grad_mode.builds_weights
def apply_mgie_trained(mgie: MGIEModel, sd, folder: Path | str):
    """``(MGIEModel, SDModel)`` with the trained weights of ``folder`` (module docstring):
    new objects; ``mgie`` and ``sd`` are left exactly as they were."""
    trained = read_mgie_trained(folder)
    _check_fits(trained, mgie, sd)
    device = mgie.device
    old_llm = mgie.llm
    llm = _shallow(old_llm)
    body = old_llm.model
    body = _merge_adapter(body, trained.adapter_dir) if trained.adapter_dir else _shallow(body)
    old_embed = old_llm.get_input_embeddings()
    embed = nn.Embedding(*trained.embed.shape, padding_idx=old_embed.padding_idx,
                         device=old_embed.weight.device, dtype=old_embed.weight.dtype)
    embed.weight.data.copy_(trained.embed)
    body.embed_tokens = embed
    head = nn.Linear(trained.lm_head.shape[1], trained.lm_head.shape[0], bias=False,
                     device=old_llm.lm_head.weight.device, dtype=old_llm.lm_head.weight.dtype)
    head.weight.data.copy_(trained.lm_head)
    llm.model = body
    llm.lm_head = head
    llm.requires_grad_(False)
    edit_head = trained.edit_head.requires_grad_(False).eval().to(
        mgie.edit_head.llm2hid.weight.device, mgie.edit_head.llm2hid.weight.dtype)
    new_mgie = dataclasses.replace(mgie, llm=llm, edit_head=edit_head,
                                   emb=trained.emb.to(mgie.emb.device, mgie.emb.dtype),
                                   path=mgie.path)
    unet = _load_unet(trained.unet_dir, sd.dtype).to(next(sd.unet.parameters()).device)
    # Register the new modules like a loader does (the shared ones keep their entries).
    names = {e.module: e.name for e in memory.registry().entries_of(mgie)}
    name = trained.folder.name
    new_mgie = memory.manage(new_mgie, {
        f"MGIE {name} LLM": llm, names.get(mgie.vision, "MGIE vision tower"): mgie.vision,
        names.get(mgie.projector, "MGIE projector"): mgie.projector,
        f"MGIE {name} edit head": edit_head}, device)
    return new_mgie, sd_lib.with_unet(sd, unet, trained.folder)
