"""MGIE's training task: L_all = L_ins + w·L_edit through one module (docs/algorithms.md
sections 1 and 14).

One teacher-forced pass of the LLaVA prompt gives both terms:

* **Sequence.** The prompt of MGIE's inference (:meth:`MGIEModel.prompt`, the image's
  ``<im_patch>`` positions replaced by the projected CLIP patch features), then the
  answer: ``" " + expressive instruction`` (the instruction itself when the pair has no
  expressive one), the 8 tokens ``[IMG0]..[IMG7]`` and ``</s>``, as MGIE's release
  formats its training answers. Sequences are right-padded; an answer too long for the
  LLM's context is cut (its text, never the [IMG] tokens).
* **L_ins**: token cross-entropy of the answer (prompt and padding labelled -100;
  :func:`mgie_core.losses.instruction_ce`, mean over the answer's tokens).
* **Visual tokens**: the last-layer (final-norm) hidden states at the 8 positions that
  predict [IMG0..7] (the same positions :meth:`MGIEModel.run` reads) go through the edit
  head with ``emb`` = the [IMG] rows of the input embedding matrix (tied, as in MGIE's
  training: the rows train with the matrix) -> the 77 x d condition.
* **L_edit**: InstructPix2Pix's objective on the 8-channel UNet. The target latent is a
  VAE posterior sample times the scaling factor, the source latent the posterior mode
  *unscaled* (what :func:`mgie_core.sampler.edit_instruct` feeds as ``image_latent``);
  ``noise ~ N(0, I)``, ``t ~ U{0..T-1}``, ``x_t = sqrt(a_t) z + sqrt(1 - a_t) noise``
  with SD's ``alphas_cumprod``; the UNet sees ``cat[x_t, source latent]`` and the
  condition; :func:`mgie_core.losses.edit_noise_mse` against ``noise``.
* **Conditioning dropout** (InstructPix2Pix's rule, as MGIE's release uses it): one
  ``u ~ U(0, 1)`` per pair; the condition is replaced by the model's null condition
  ``edit_head(zeros, emb)`` where ``u < p_text``, and the source latent is zeroed where
  ``p_text/2 <= u < p_text/2 + p_image``. With p_text = p_image = 0.1 (the release):
  text only 5 %, both 5 %, image only 5 % -- each dropped 10 % of the time, both 5 %,
  so the sampler's three rows ([cond, img], [null, img], [null, 0]) are all trained.
  Validation turns it off.
* **Validation** (:meth:`MGIETask.validate`): the held-out L_all and its terms, and
  held-out edits by the pack's instruction sampler with the teacher-forced condition,
  scored by ``xmgie eval``'s PSNR, SSIM and L1.

What trains (float32 even under mixed precision): the whole input-embedding matrix (with
the 8 [IMG] rows), the LM head, the edit head and the whole UNet; with ``model.lora``,
peft LoRA adapters on the LLaMA body too. Frozen (requires_grad False, in the compute
precision): the LLaMA layers, the CLIP vision tower, the projector and the VAE. The
frozen models are submodules of the one module DDP wraps (DDP syncs only parameters that
require gradients).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..mgie_core import losses
from ..mgie_core.diffusion import INSTRUCT_SCHEDULERS
from ..mgie_core.errors import InputError
from ..mgie_core.models.mgie import IM_PATCH, IMG_TOKENS, MGIEModel
from ..mgie_core.models.mgie import trained as mgie_trained
from .config import TrainConfigError, merge_section
from .task import NoCritic, load_trainable_state, unwrap

IGNORE = -100
DEFAULT_MODEL: dict[str, Any] = {
    "mgie": "mgie_7b",
    "base": {"loader": "diffusers", "name": "stable-diffusion-v1-5"},
    "unet": "unet.pt",
    "lora": None,
    "conditioning_dropout": {"text": 0.1, "image": 0.1},
    # Held-out edits scored as ``xmgie eval`` scores them (MGIETask.validate).
    "validation": {"pairs": 8, "steps": 20, "guidance": 7.5, "image_guidance": 1.5,
                   "scheduler": "euler_ancestral"},
}
DEFAULT_LOSS = {"edit": losses.MGIE_EDIT_WEIGHT}
BASE_LOADERS = ("checkpoint", "diffusers", "ip2p")
LORA_DEFAULT = {"r": 16, "alpha": 32, "dropout": 0.0,
                "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                   "up_proj", "down_proj"]}
TINY_FAMILIES = ("sd_diffusers", "mgie_unet", "mgie")   # what --tiny loads by default
# What validate() returns (the engine checks early_stopping.metric against it up front).
VAL_METRICS = ("val_loss", "val_l_ins", "val_l_edit", "val_psnr", "val_ssim", "val_l1")
VAL_SEED = 10_007   # + the batch's index: the held-out draws of every validation


# -- config ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MGIESettings:
    mgie: str
    base_loader: str
    base_name: str
    unet: str | None
    lora: dict[str, Any] | None
    p_text: float
    p_image: float
    edit_weight: float
    validation: dict[str, Any] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_MODEL["validation"]))


def _fail(config, key: str, problem: str, expected: str, fix: str = ""):
    raise TrainConfigError(getattr(config, "source", "config"), key, problem, expected, fix)


def _prob(config, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        _fail(config, key, f"found {value!r}", "a probability in [0, 1]")
    return float(value)


def settings(config) -> MGIESettings:
    """``model`` and ``loss`` of an MGIE config, checked (errors name the key)."""
    source = getattr(config, "source", "config")
    model = merge_section(DEFAULT_MODEL, config.model, "model", source)
    base = model["base"]
    if base["loader"] not in BASE_LOADERS:
        _fail(config, "model.base.loader", f"found {base['loader']!r}",
              f"one of {', '.join(BASE_LOADERS)}")
    for key, value in (("model.mgie", model["mgie"]), ("model.base.name", base["name"])):
        if not isinstance(value, str) or not value:
            _fail(config, key, f"found {value!r}", "a model name or path")
    if model["unet"] is not None and (not isinstance(model["unet"], str) or not model["unet"]):
        _fail(config, "model.unet", f"found {model['unet']!r}",
              "the name of MGIE's unet.pt (models/unet), or null to start from the base's "
              "UNet")
    lora = None
    if model["lora"] is not None and model["lora"] is not False:
        lora = merge_section(LORA_DEFAULT, model["lora"], "model.lora", source)
        for key in ("r", "alpha"):
            v = lora[key]
            if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0:
                _fail(config, f"model.lora.{key}", f"found {v!r}", "a positive number")
        tm = lora["target_modules"]
        if not isinstance(tm, list) or not tm or not all(isinstance(t, str) for t in tm):
            _fail(config, "model.lora.target_modules", f"found {tm!r}",
                  "a list of LLaMA linear-layer names, e.g. [q_proj, v_proj]")
        lora = {"r": int(lora["r"]), "alpha": float(lora["alpha"]), "target_modules": list(tm),
                "dropout": _prob(config, "model.lora.dropout", lora["dropout"])}
    drop = model["conditioning_dropout"]
    p_text = _prob(config, "model.conditioning_dropout.text", drop["text"])
    p_image = _prob(config, "model.conditioning_dropout.image", drop["image"])
    if p_text / 2 + p_image > 1:
        _fail(config, "model.conditioning_dropout.image", f"found {p_image} with text "
              f"{p_text}", "text/2 + image <= 1 (the image window starts at text/2)")
    v = model["validation"]
    for key in ("pairs", "steps"):
        if isinstance(v[key], bool) or not isinstance(v[key], int) or v[key] < 1:
            _fail(config, f"model.validation.{key}", f"found {v[key]!r}", "a whole number >= 1")
    for key in ("guidance", "image_guidance"):
        if isinstance(v[key], bool) or not isinstance(v[key], int | float) or v[key] < 0:
            _fail(config, f"model.validation.{key}", f"found {v[key]!r}",
                  "a guidance scale >= 0 (MGIE's demo: 7.5 text, 1.5 image)")
    if v["scheduler"] not in INSTRUCT_SCHEDULERS:
        _fail(config, "model.validation.scheduler", f"found {v['scheduler']!r}",
              f"one of {', '.join(INSTRUCT_SCHEDULERS)}")
    validation = {"pairs": int(v["pairs"]), "steps": int(v["steps"]),
                  "guidance": float(v["guidance"]),
                  "image_guidance": float(v["image_guidance"]), "scheduler": v["scheduler"]}
    loss = merge_section(DEFAULT_LOSS, config.loss, "loss", source)
    w = loss["edit"]
    if isinstance(w, bool) or not isinstance(w, int | float) or w < 0:
        _fail(config, "loss.edit", f"found {w!r}", "a weight >= 0 (MGIE: 0.5)")
    return MGIESettings(mgie=model["mgie"], base_loader=base["loader"], base_name=base["name"],
                        unet=model["unet"], lora=lora, p_text=p_text, p_image=p_image,
                        edit_weight=float(w), validation=validation)


# -- the module --------------------------------------------------------------------------

def clip_pixels(images: torch.Tensor, processor) -> torch.Tensor:
    """[B,3,H,W] in 0..1 -> CLIP pixel values, batched on the tensors' device: CLIP's
    preprocessing (shortest side to ``size``, bicubic with antialiasing, centre crop,
    OpenAI mean/std) without the PIL round trip :meth:`MGIEModel.image_features` makes
    per image (the difference is PIL's 8-bit rounding)."""
    size = processor.size.get("shortest_edge") or min(processor.size.values())
    crop_h, crop_w = processor.crop_size["height"], processor.crop_size["width"]
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(crop_h, round(h * scale)), max(crop_w, round(w * scale))
    x = F.interpolate(images.float(), size=(nh, nw), mode="bicubic", antialias=True,
                      align_corners=False).clamp(0, 1)
    top, left = (nh - crop_h) // 2, (nw - crop_w) // 2
    x = x[..., top:top + crop_h, left:left + crop_w]
    mean = torch.tensor(processor.image_mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def prompt_view(model: nn.Module, mgie: MGIEModel) -> None:
    """Set on ``model`` the plain attributes (not modules) that MGIETrainModel's sequence
    and image-feature methods read: the tokenizer and MGIE's prompt settings (the MMIG
    task's model reuses those methods and sets the same view)."""
    model.mgie = dataclasses.replace(mgie)   # a view for prompt()/tokens; never run
    model.tokenizer = mgie.tokenizer
    model.processor = mgie.image_processor
    model.select_layer = mgie.select_layer
    model.num_patches = mgie.num_patches
    model.img_ids = mgie.img_ids
    model.patch_id = mgie.token_id(IM_PATCH)
    model.context = mgie.context_length()


class MGIETrainModel(nn.Module):
    """Everything of one MGIE generator step; ``forward(batch)`` returns the loss dict."""

    def __init__(self, mgie: MGIEModel, sd, s: MGIESettings, *, body: nn.Module,
                 embed: nn.Embedding, lm_head: nn.Linear, edit_head: nn.Module,
                 unet: nn.Module, peft: bool, body_trains: bool = False):
        super().__init__()
        self.body = body                  # LlamaModel (or the peft model wrapping it)
        self.embed = embed                # trained
        self.lm_head = lm_head            # trained
        self.edit_head = edit_head        # trained
        self.unet = unet                  # trained
        self.vision = mgie.vision         # frozen
        self.projector = mgie.projector   # frozen
        self.vae = sd.vae                 # frozen
        self.peft = peft
        self.body_trains = body_trains
        prompt_view(self, mgie)
        self.scaling = float(sd.vae.config.scaling_factor)
        self.p_text, self.p_image, self.edit_weight = s.p_text, s.p_image, s.edit_weight
        sched = sd.scheduler
        # Plain attributes too: what validation's sampler needs of the SD model (the
        # scheduler's config and the tokenizer; the sampler never mutates them).
        self.sd_scheduler, self.sd_tokenizer, self.sd_source = sched, sd.tokenizer, sd.source
        self.num_timesteps = int(sched.config.num_train_timesteps)
        self.register_buffer("alphas_cumprod", sched.alphas_cumprod.clone().float(),
                             persistent=False)

    def train(self, mode: bool = True) -> MGIETrainModel:
        """Train mode for the trained parts only: the frozen ones (possibly shared with a
        model the caller keeps) stay in eval mode; the LLaMA body enters train mode only
        where it must (gradient checkpointing, LoRA dropout), and is then this run's own."""
        super().train(mode)
        for m in (self.vision, self.projector, self.vae):
            m.eval()
        if not self.body_trains:
            self.body.eval()
        return self

    # -- sequences ---------------------------------------------------------------------
    def sequences(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor,
                                                        torch.Tensor, torch.Tensor]:
        """(ids [B,T], attention mask [B,T], labels [B,T], index of [IMG0] [B])."""
        tok = self.tokenizer
        eos = tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else (eos or 0)
        rows, labels, starts = [], [], []
        n = len(batch["instruction"])
        expressive = batch.get("expressive_instruction") or [""] * n
        names = batch.get("id") or [str(i) for i in range(n)]
        for instruction, expr, pair in zip(batch["instruction"], expressive, names):
            name = f"instruction of pair {pair!r}"
            if not isinstance(instruction, str) or not instruction.strip():
                raise InputError(name, "is empty", "an editing instruction")
            self.mgie.check_instruction(instruction)
            prompt_text = self.mgie.prompt(instruction.strip())
            prompt = tok(prompt_text)["input_ids"]
            n_patch = sum(1 for t in prompt if t == self.patch_id)
            if n_patch != self.num_patches:
                raise InputError(name, f"splits into {n_patch} {IM_PATCH} tokens",
                                 f"{self.num_patches}", "Use MGIE's own tokenizer.")
            text = (expr or "").strip() or instruction.strip()
            self.mgie.check_instruction(text)
            answer = self.answer_ids(prompt_text, prompt, text)
            tail = list(self.img_ids) + ([eos] if eos is not None else [])
            room = (self.context or 10**9) - len(prompt) - len(tail)
            if room < 0:
                raise InputError(name, f"makes a prompt of {len(prompt)} tokens, past the "
                                 f"language model's context of {self.context}",
                                 "a shorter instruction")
            answer = answer[:room]
            rows.append(prompt + answer + tail)
            labels.append([IGNORE] * len(prompt) + answer + tail)
            starts.append(len(prompt) + len(answer))
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        lab = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (r, y) in enumerate(zip(rows, labels)):
            ids[i, :len(r)] = torch.tensor(r)
            lab[i, :len(y)] = torch.tensor(y)
            mask[i, :len(r)] = 1
        return ids, mask, lab, torch.tensor(starts)

    def answer_ids(self, prompt_text: str, prompt: list[int], text: str) -> list[int]:
        """The answer's ids as they follow the prompt: the whole conversation tokenized
        at once (as LLaVA v1 builds its training labels) and the prompt's ids cut off, so
        the first word gets the ids generation would give it after "ASSISTANT:" (a
        SentencePiece tokenizer does not split " word" alone the way it splits it in
        context). Should the prompt's ids not be a prefix of the whole (a tokenizer that
        merges across the boundary), the answer is tokenized on its own."""
        whole = self.tokenizer(prompt_text + " " + text)["input_ids"]
        if whole[:len(prompt)] == prompt and len(whole) > len(prompt):
            return whole[len(prompt):]
        return self.tokenizer(" " + text, add_special_tokens=False)["input_ids"]

    # -- parts -------------------------------------------------------------------------
    def image_features(self, source: torch.Tensor) -> torch.Tensor:
        """[B, num_patches, H] projected CLIP patch features (frozen; no graph)."""
        dtype = next(self.vision.parameters()).dtype
        with torch.no_grad():
            pixels = clip_pixels(source, self.processor).to(dtype)
            out = self.vision(pixel_values=pixels, output_hidden_states=True)
            feats = out.hidden_states[self.select_layer][:, 1:]
            return self.projector(feats.to(self.projector.weight.dtype))

    def encode(self, images: torch.Tensor, sample: bool, generator=None) -> torch.Tensor:
        """VAE latents of [B,3,H,W] in 0..1 (frozen): a posterior sample times the scaling
        factor (``sample``) or the unscaled mode."""
        dtype = next(self.vae.parameters()).dtype
        with torch.no_grad():
            dist = self.vae.encode((images * 2 - 1).to(dtype)).latent_dist
            if not sample:
                return dist.mode().float()
            eps = torch.randn(dist.mean.shape, generator=generator, dtype=torch.float32)
            z = dist.mean.float() + dist.std.float() * eps.to(dist.mean.device)
            return z * self.scaling

    def null(self, n: int) -> torch.Tensor:
        emb = self.embed.weight[self.img_ids].unsqueeze(0).float()
        zeros = torch.zeros(1, len(IMG_TOKENS), emb.shape[-1], device=emb.device)
        return self.edit_head(zeros, emb).expand(n, -1, -1)

    def body_forward(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        dtype = _param_dtype(self.body)
        out = self.body(inputs_embeds=embeds.to(dtype), attention_mask=mask, use_cache=False)
        return out.last_hidden_state.float()

    def hidden_states(self, ids: torch.Tensor, mask: torch.Tensor,
                      features: torch.Tensor) -> torch.Tensor:
        """Last-layer hidden states [B,T,H] of the ids with the patch features spliced in
        at the <im_patch> positions (LLaVA v1's splice, batched)."""
        embeds = self.embed(ids).float()
        feats = features.float().reshape(-1, features.shape[-1])
        embeds = embeds.masked_scatter((ids == self.patch_id).unsqueeze(-1), feats)
        return self.body_forward(embeds, mask)

    def condition(self, hidden: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        """The edit condition [B,77,d]: the hidden states at the 8 positions predicting
        [IMG0..7] (``starts`` = index of [IMG0]) through the edit head, with ``emb`` the
        [IMG] rows of the trained embedding matrix."""
        b, device = hidden.shape[0], hidden.device
        pos = starts.to(device).unsqueeze(1) - 1 + torch.arange(len(IMG_TOKENS), device=device)
        vis = hidden[torch.arange(b, device=device).unsqueeze(1), pos]
        emb = self.embed.weight[self.img_ids].unsqueeze(0).float().expand(b, -1, -1)
        return self.edit_head(vis, emb)

    def teacher_condition(self, batch: dict[str, Any]) -> torch.Tensor:
        """The condition [B,77,d] the step trains, teacher-forced on each pair's expressive
        instruction (no dropout): what validation hands the sampler."""
        device = self.embed.weight.device
        ids, mask, _, starts = self.sequences(batch)
        source = batch["source"].to(device, torch.float32)
        hidden = self.hidden_states(ids.to(device), mask.to(device), self.image_features(source))
        return self.condition(hidden, starts)

    # -- the step ----------------------------------------------------------------------
    def forward(self, batch: dict[str, Any], *, dropout: bool = True,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """L_all and its terms. ``dropout=False`` and a CPU ``generator`` give the
        deterministic validation pass (noise, timesteps and the posterior sample drawn
        from the generator)."""
        device = self.embed.weight.device
        source = batch["source"].to(device, torch.float32)
        target = batch["target"].to(device, torch.float32)
        b = source.shape[0]

        ids, mask, labels, starts = self.sequences(batch)
        ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
        hidden = self.hidden_states(ids, mask, self.image_features(source))

        # L_ins: logits only where a label counts (the causal shift done here).
        h_prev, y_next = hidden[:, :-1], labels[:, 1:]
        keep = y_next != IGNORE
        logits = self.lm_head(h_prev[keep].to(self.lm_head.weight.dtype)).float()
        l_ins = losses.instruction_ce(logits, y_next[keep])

        cond = self.condition(hidden, starts)

        # L_edit: InstructPix2Pix's noise objective on the 8-channel UNet.
        z = self.encode(target, sample=True, generator=generator)
        src = self.encode(source, sample=False)
        rand = (lambda *shape: torch.rand(shape, generator=generator).to(device)) \
            if generator is not None else (lambda *shape: torch.rand(shape, device=device))
        if generator is not None:
            noise = torch.randn(z.shape, generator=generator).to(device)
            t = torch.randint(0, self.num_timesteps, (b,), generator=generator).to(device)
        else:
            noise = torch.randn_like(z)
            t = torch.randint(0, self.num_timesteps, (b,), device=device)
        a = self.alphas_cumprod.to(device)[t].view(b, 1, 1, 1)
        noisy = a.sqrt() * z + (1 - a).sqrt() * noise
        if dropout and (self.p_text > 0 or self.p_image > 0):
            drop_text, drop_image = dropout_masks(rand(b), self.p_text, self.p_image)
            cond = torch.where(drop_text.view(b, 1, 1), self.null(b), cond)
            src = src * (~drop_image).view(b, 1, 1, 1).to(src.dtype)
        unet_dtype = next(self.unet.parameters()).dtype
        pred = self.unet(torch.cat([noisy, src], 1).to(unet_dtype), t,
                         encoder_hidden_states=cond.to(unet_dtype)).sample
        l_edit = losses.edit_noise_mse(pred, noise)
        loss = losses.mgie_total(l_ins, l_edit, self.edit_weight)
        return {"loss": loss, "l_ins": l_ins.detach(), "l_edit": l_edit.detach()}


def dropout_masks(u: torch.Tensor, p_text: float, p_image: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """InstructPix2Pix's conditioning dropout from one uniform draw per pair: (condition
    nulled, source latent zeroed) = (u < p_text, p_text/2 <= u < p_text/2 + p_image)."""
    return u < p_text, (u >= p_text / 2) & (u < p_text / 2 + p_image)


def _param_dtype(module: nn.Module) -> torch.dtype:
    for p in module.parameters():
        if not p.requires_grad:
            return p.dtype
    return next(module.parameters()).dtype


# -- building ----------------------------------------------------------------------------

def _compute_dtype(accelerator) -> torch.dtype:
    mp = str(getattr(accelerator, "mixed_precision", "no") or "no")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp, torch.float32)


def _load_models(s: MGIESettings, tiny: bool):
    from ..mgie_core import tiny as tiny_models
    from ..mgie_core.models import sd as sdm
    from ..mgie_core.models.mgie import load_mgie

    # Loaded in float32 whatever the compute precision: the trained parts start from the
    # released values exactly (a bf16 load would round them); :func:`assemble` casts the
    # frozen parts afterwards.
    name = "fp32"
    if tiny:   # the tiny model of each family; the names in the config are not used
        base_family = "ip2p_diffusers" if s.base_loader == "ip2p" else "sd_diffusers"
        root = tiny_models.ensure_tiny_models(None, ("mgie", base_family)
                                              + (("mgie_unet",) if s.unet else ()))
        mgie = load_mgie(str(tiny_models.tiny_path(root, "mgie")), dtype=name, device="cpu")
        loader = sdm.load_instruct_diffusers if s.base_loader == "ip2p" else \
            sdm.load_sd_diffusers
        base = loader(str(tiny_models.tiny_path(root, base_family)), dtype=name, device="cpu")
        if not s.unet:
            return mgie, base
        return mgie, sdm.load_mgie_unet(str(tiny_models.tiny_path(root, "mgie_unet")), base)
    mgie = load_mgie(s.mgie, dtype=name, device="cpu")
    loader = {"checkpoint": sdm.load_sd_checkpoint, "diffusers": sdm.load_sd_diffusers,
              "ip2p": sdm.load_instruct_diffusers}[s.base_loader]
    base = loader(s.base_name, dtype=name, device="cpu")
    return mgie, (sdm.load_mgie_unet(s.unet, base) if s.unet else base)


def eight_channel(unet: nn.Module) -> nn.Module:
    """An 8-channel copy of a 4-channel UNet: conv_in's new input channels (the source
    latent) start at zero, InstructPix2Pix's initialisation, so the untrained copy
    predicts exactly what the text-to-image UNet did."""
    from diffusers import UNet2DConditionModel

    config = dict(unet.config)
    config["in_channels"] = 8
    new = UNet2DConditionModel.from_config(config).to(next(unet.parameters()).dtype)
    state = unet.state_dict()
    w = state["conv_in.weight"]
    state["conv_in.weight"] = torch.cat([w, torch.zeros_like(w)], 1)
    new.load_state_dict(state)
    return new


def assemble(mgie: MGIEModel, sd, s: MGIESettings, *, dtype: torch.dtype,
             gradient_checkpointing: bool = False, copy_given: bool = True) -> MGIETrainModel:
    """The training module from loaded models. The trained parts are copies (float32)
    when ``copy_given``, so the given models are left as they were; the frozen parts are
    shared (cast to ``dtype`` only when they were loaded for this run)."""
    llm = mgie.llm
    body = llm.model
    old_embed = llm.get_input_embeddings()
    embed = nn.Embedding(*old_embed.weight.shape, padding_idx=old_embed.padding_idx)
    embed.weight.data.copy_(old_embed.weight.detach().float())
    lm_head = nn.Linear(llm.lm_head.in_features, llm.lm_head.out_features, bias=False)
    lm_head.weight.data.copy_(llm.lm_head.weight.detach().float())
    edit_head = copy.deepcopy(mgie.edit_head).float()
    unet = sd.unet
    if unet.config.in_channels == 4:
        unet = eight_channel(unet)
    elif copy_given:
        unet = copy.deepcopy(unet)
    if next(unet.parameters()).dtype != torch.float32:
        unet = unet.float()
    if not copy_given:   # loaded for this run: the frozen parts in the compute precision
        # (the VAE stays float32 under fp16, whose range SD's VAE can overflow)
        vae_dtype = torch.float32 if dtype == torch.float16 else dtype
        for m, want in ((body, dtype), (mgie.vision, dtype), (mgie.projector, dtype),
                        (sd.vae, vae_dtype)):
            if next(m.parameters()).dtype != want:   # diffusers warns on same-dtype casts
                m.to(dtype=want)
    # The body without its embedding table (the trained copy replaces it). Its layers are
    # shared with the given model unless the run changes them: LoRA injects adapters and
    # gradient checkpointing sets flags, so then given layers are deep-copied first.
    body = _without_embeddings(body, copy_given and (s.lora is not None
                                                     or gradient_checkpointing))
    if gradient_checkpointing:
        # non-reentrant: the frozen layers' inputs carry the gradient to the embeddings
        kwargs = {"use_reentrant": False}
        if hasattr(body, "activation_checkpointing_enable"):    # transformers >= 5.x
            body.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            body.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        unet.enable_gradient_checkpointing()
    for m in (body, mgie.vision, mgie.projector, sd.vae):
        m.requires_grad_(False)
    peft = False
    if s.lora is not None:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=s.lora["r"], lora_alpha=s.lora["alpha"],
                         target_modules=s.lora["target_modules"],
                         lora_dropout=s.lora["dropout"], bias="none")
        try:
            body = get_peft_model(body, cfg)
        except ValueError as e:
            raise InputError("model.lora.target_modules", str(e).split("\n")[0],
                             "names of the LLaMA body's linear layers (q_proj, k_proj, "
                             "v_proj, o_proj, gate_proj, up_proj, down_proj)") from e
        for n, p in body.named_parameters():
            p.requires_grad_("lora_" in n)
            if p.requires_grad:
                p.data = p.data.float()
        peft = True
    for m in (embed, lm_head, edit_head, unet):
        m.requires_grad_(True)
    body_trains = gradient_checkpointing or bool(s.lora and s.lora["dropout"] > 0)
    return MGIETrainModel(mgie, sd, s, body=body, embed=embed, lm_head=lm_head,
                          edit_head=edit_head, unet=unet, peft=peft, body_trains=body_trains)


def _without_embeddings(body: nn.Module, deep: bool) -> nn.Module:
    """The LLaMA body with ``embed_tokens`` left out (the task embeds the ids itself, so
    the frozen old table is neither held twice nor trained). ``deep``: the layers are
    copied too (LoRA changes them in place)."""
    saved = body.embed_tokens
    placeholder = nn.Identity()
    if deep:
        body._modules["embed_tokens"] = placeholder
        try:
            new = copy.deepcopy(body)
        finally:
            body._modules["embed_tokens"] = saved
        return new
    new = mgie_trained._shallow(body)
    new._modules["embed_tokens"] = placeholder
    return new


class MGIETask(NoCritic):
    """The :class:`training.task.TrainTask` of MGIE (module docstring)."""

    name = "mgie"

    def __init__(self, model: MGIETrainModel, accelerator, settings: MGIESettings,
                 source: dict[str, Any]):
        self.model = model
        self.accelerator = accelerator
        self.settings = settings
        self.source = source
        self.weights = {"ins": 1.0, "edit": settings.edit_weight}

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        m = unwrap(model, MGIETrainModel)
        return {n: p.detach() for n, p in m.named_parameters() if p.requires_grad}

    def load_trainable_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        load_trainable_state(unwrap(model, MGIETrainModel), state, "this MGIE run")

    def validate(self, model: nn.Module, batches: list[dict[str, Any]]) -> dict[str, float]:
        """Held-out pairs, two ways (docs/algorithms.md section 14):

        * ``val_loss``, ``val_l_ins``, ``val_l_edit``: L_all and its terms with no
          conditioning dropout, the noise, timesteps and posterior samples drawn from a
          generator seeded per batch, so every validation of a run sees the same draws.
        * ``val_psnr``, ``val_ssim``, ``val_l1``: the first ``model.validation.pairs``
          pairs edited by the pack's instruction sampler (:meth:`edit_pairs`) and scored
          against their targets with ``xmgie eval``'s metrics, as the xMGIE task scores.

        The random draws all come from local seeded generators, and the process's random
        state is put back afterwards, so validation never moves the training stream (a
        resumed run repeats the uninterrupted one exactly)."""
        from ..evaluation import metrics
        from ..mgie_core.random_state import preserved

        m = unwrap(model, MGIETrainModel)
        was = m.training
        m.eval()
        totals = {"loss": 0.0, "l_ins": 0.0, "l_edit": 0.0}
        n = 0
        limit = self.settings.validation["pairs"]
        edits: list[torch.Tensor] = []
        targets: list[torch.Tensor] = []
        autocast = (self.accelerator.autocast() if self.accelerator is not None
                    and hasattr(self.accelerator, "autocast") else contextlib.nullcontext())
        try:
            with preserved(), torch.no_grad(), autocast:
                for i, batch in enumerate(batches):
                    gen = torch.Generator("cpu").manual_seed(VAL_SEED + i)
                    out = m(batch, dropout=False, generator=gen)
                    k = int(batch["source"].shape[0])
                    for key in totals:
                        totals[key] += float(out[key]) * k
                    n += k
                    take = min(k, limit - sum(int(e.shape[0]) for e in edits))
                    if take > 0:
                        head = {key: val[:take] for key, val in batch.items()}
                        edits.append(self.edit_pairs(m, head, seed=VAL_SEED + i))
                        targets.append(head["target"].float().cpu())
        finally:
            m.train(was)
        if n == 0:
            return {}
        pred, tgt = torch.cat(edits), torch.cat(targets)
        return {"val_loss": totals["loss"] / n, "val_l_ins": totals["l_ins"] / n,
                "val_l_edit": totals["l_edit"] / n,
                "val_psnr": metrics.finite_mean(metrics.psnr(pred, tgt).tolist()),
                "val_ssim": float(metrics.ssim(pred, tgt).mean()),
                "val_l1": float((pred - tgt).abs().mean())}

    def edit_pairs(self, m: MGIETrainModel, batch: dict[str, Any], seed: int) -> torch.Tensor:
        """The pairs of ``batch`` edited as MGIE's nodes edit: the teacher-forced
        condition (:meth:`MGIETrainModel.teacher_condition`) and MGIE's null condition
        drive :func:`mgie_core.sampler.edit_instruct` from the source's unscaled latent
        (``model.validation``: steps, text guidance s_T, image guidance s_I, scheduler;
        noise from ``seed``), then the VAE decodes. Returns [B,3,H,W] in 0..1 on the CPU.

        Teacher-forced rather than MGIE's own generated instruction: generation decodes
        the LLM token by token (hundreds of 7B steps per pair, the cost of the whole
        validation), and its text is arbitrary until L_ins has trained; the condition the
        step trains scores exactly what L_edit and the edit head learn, and L_ins has its
        own number (``val_l_ins``)."""
        from ..mgie_core import sampler, vae
        from ..mgie_core.models.conditioning import Conditioning
        from ..mgie_core.models.sd import SDModel

        v = self.settings.validation
        device = m.embed.weight.device
        sd = SDModel(unet=m.unet, vae=m.vae, text_encoder=None, tokenizer=m.sd_tokenizer,
                     scheduler=m.sd_scheduler, device=device,
                     dtype=next(m.unet.parameters()).dtype, source=m.sd_source)
        conditioning = Conditioning(cond=m.teacher_condition(batch).float(),
                                    null=m.null(1).float(), source="mgie")
        latent = m.encode(batch["source"].to(device, torch.float32), sample=False)
        # The sampler puts its attention processors on the UNet; the trained UNet gets
        # its own back, so training after a validation runs the same kernels as before.
        processors = None if hasattr(m.unet, "_xmgie_controller") else m.unet.attn_processors
        try:
            res = sampler.edit_instruct(sd, latent, conditioning, steps=v["steps"],
                                        text_scale=v["guidance"],
                                        image_scale=v["image_guidance"], seed=seed,
                                        scheduler=v["scheduler"])
        finally:
            if processors is not None and hasattr(m.unet, "_xmgie_controller"):
                m.unet.set_attn_processor(processors)
                del m.unet._xmgie_controller
        image = vae.decode_with(m.vae, res.edit, device, _param_dtype(m.vae),
                                "validation edit")
        return image.permute(0, 3, 1, 2).float().cpu()

    def export(self, model: nn.Module, folder: Path) -> None:
        m = unwrap(model, MGIETrainModel)
        mgie_trained.save_mgie_trained(
            folder, embed=m.embed.weight, lm_head=m.lm_head.weight, img_token_ids=m.img_ids,
            edit_head=m.edit_head, unet=m.unet, adapter=m.body if m.peft else None,
            lora=self.settings.lora, nhead=m.edit_head.mapper.nhead, source=self.source)


def build_task(config, accelerator, tiny: bool, models: dict[str, Any] | None = None
               ) -> MGIETask:
    """The MGIE task of a config: its models loaded by name (``tiny``: the tiny MGIE,
    tiny SD and tiny MGIE UNet), or taken from ``models`` ({"mgie": MGIEModel, "sd":
    SDModel}). Given models keep their weights, modes and modules: the trained parts are
    copies, the LLaMA layers are copied when LoRA or checkpointing would change them, and
    only the frozen parts they share with the run get requires_grad False and are moved
    to the accelerator's device."""
    s = settings(config)
    dtype = _compute_dtype(accelerator)
    device = getattr(accelerator, "device", torch.device("cpu"))
    given = models or {}
    unknown = sorted(set(given) - {"mgie", "sd", "identity"})
    if unknown:
        raise InputError("models", f"has {unknown[0]!r}", "keys mgie and sd")
    if given:
        if not all(k in given for k in ("mgie", "sd")):
            raise InputError("models", "lacks " + " and ".join(
                k for k in ("mgie", "sd") if k not in given), "both mgie (an MGIEModel) and "
                "sd (the SDModel with MGIE's 8-channel UNet)")
        mgie, sd = given["mgie"], given["sd"]
        copy_given = True
    else:
        mgie, sd = _load_models(s, tiny)
        copy_given = False
    if mgie.edit_head.hid2feat.out_features != sd.unet.config.cross_attention_dim:
        raise InputError("model", f"MGIE's edit head writes width "
                         f"{mgie.edit_head.hid2feat.out_features} but the UNet attends to "
                         f"{sd.unet.config.cross_attention_dim}",
                         "the SD 1.5 UNet MGIE was made for (cross-attention width 768)")
    model = assemble(mgie, sd, s, dtype=dtype, copy_given=copy_given,
                     gradient_checkpointing=bool(getattr(config, "gradient_checkpointing",
                                                         False)))
    model.to(device)
    source = {"mgie": str(mgie.path), "sd": str(sd.source), "tiny": bool(tiny)}
    return MGIETask(model, accelerator, s, source)
