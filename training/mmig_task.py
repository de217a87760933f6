"""MMIG's training task: one module holding the multimodal LLM (MM-Adapter), MMSM, the
diffusion editing model (DEM) and a frozen BLIP-2, scored by the paper's total loss

    L = w_sdm L_SDM + w_as L_AS + w_ar L_AR + w_fg L_fg + w_bg L_bg
        + w_mmt L_MMT + w_blip2 L_BLIP2 + w_mmsm L_MMSM

(docs/algorithms.md §15). The five stage configs (configs/train/mmig_stage1..5.yaml) say
which modules train (``model.train``) and each term's weight (``loss``); a weight of 0
skips the term's computation (it is logged as 0). One generator step per pair:

* **LLM** (MGIE's multimodal LLaMA, frozen, with the MM-Adapters injected): the MGIE
  task's teacher-forced sequence (:meth:`MGIETrainModel.sequences`: prompt with the
  source photo's patch features, then the pair's expressive instruction as the answer).
  ``L_MMT`` is the next-token cross-entropy of the answer (MMT: only the adapters, θ_a,
  and the modality embedding train). ``e0`` (MMSM's text input) is what MGIE hands its
  UNet, and what MMSM reads in the nodes: the last hidden states at the 8 positions
  predicting [IMG0..7] through MGIE's frozen edit head (:meth:`MGIETrainModel.condition`,
  [B, 77, cross-attention width]), so a trained MMSM fits the nodes' e0 and DEM's terms
  reach θ_a through it.
* **Descriptions**: the pair's edit plan (instruction, prompts, edit words, the object
  guessed from the instruction) is split by :func:`mgie_core.layered.split_descriptions`
  into an object-attribute text and a background text; the frozen CLIP text encoder
  gives ``e_a`` and ``e_b``, and DEM is conditioned on ``e_opt = α e_a + (1 - α) e_b``
  (eq. 16, α = ``model.alpha``). The per-pair embedding optimisation of eq. 15 is a
  test-time step of the layered edit (:mod:`mgie_core.layered`); training uses the
  un-optimised mix.
* **DEM** (the SD 1.x UNet, trained through peft LoRA on its attention projections):
  one call on the *target* latent noised at ``t`` with ``e_opt``, MMSM hooked at its
  site (:func:`mgie_core.mmig.attach_mmsm`, text ``e0``). ``L_SDM`` is the noise MSE
  over the whole latent; ``L_fg`` / ``L_bg`` (:func:`mgie_core.layered.layered_losses`)
  the same residual inside ``M_t`` / outside ``M_r``, both the pair's mask at the
  latent's size (a pair dataset has one mask, the edited object's region in both
  photos); pairs without a mask take no part in them (0 when no pair of the batch has
  one).
* **A-STAR** (``L_AS``, ``L_AR``): A-STAR's segregation and retention
  (:mod:`mgie_core.astar`) on the DEM call's cross-attention maps at
  ``model.astar.factor`` (4: the 16x16 maps at 512 px, the layers the pack's A-STAR
  control reads), concepts = the pair's edit words (as the pack's A-STAR control takes
  them from a plan; the object when there are none), located in the object description
  (whose tokens dominate ``e_opt`` at α = 0.7); with one concept there is nothing to
  segregate (L_AS = 0). Retention's regions B are the binarised maps of the previous
  sampling step: the same clean latent and noise at ``t + model.astar.previous_step``
  (no gradient).
* **BLIP-2** (``L_BLIP2``): the edited image is the clean latent DEM predicts,
  ``x0 = (x_t - sqrt(1 - ā_t) ε̂) / sqrt(ā_t)``, on the low-noise rows (a fraction
  ``model.image_fraction`` draws ``t < model.image_max_t``, as the xMGIE task does),
  pooled to BLIP-2's input size / 8 and decoded by the frozen VAE (checkpointed), then
  resized to BLIP-2's input and normalised as its processor does. The loss is BLIP-2's
  captioning (next-token) loss of the target prompt given that image; BLIP-2 is frozen
  and the gradient flows through it into DEM, MMSM and, when the LLM trains, θ_a.
* ``L_MMSM`` = :func:`mgie_core.mmig.mmsm_loss` of the hooked call's ``e2``, ``e3``.

Frozen everywhere (requires_grad False, the compute precision): the LLaMA weights (and
its embeddings and LM head), the CLIP vision tower and projector, MGIE's edit head, the
CLIP text encoder, the VAE, the UNet's own weights,
BLIP-2. Trained (float32): θ_a + the modality embedding (``llm``), MMSM (``mmsm``), the
UNet's LoRA (``dem``). A module not named in ``model.train`` is present but frozen (its
terms still run when weighted: stage 1's DEM loss trains MMSM through the frozen UNet).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..mgie_core import losses
from ..mgie_core.errors import InputError
from .config import TrainConfigError, merge_section
from .mgie_task import IGNORE, MGIETrainModel, _compute_dtype, prompt_view
from .task import NoCritic, load_trainable_state, unwrap
from .xmgie_task import LORA_DEFAULT_TARGETS, LORA_FOLDER, LORA_WEIGHTS, _add_lora

NAME = "mmig"
# The total loss's terms, in the paper's order (loss: keys; logged as l_<term>).
TERMS = ("sdm", "as", "ar", "fg", "bg", "mmt", "blip2", "mmsm")
MODULES = ("llm", "mmsm", "dem")     # what model.train may name
DEFAULT_MODEL: dict[str, Any] = {
    "mgie": "mgie_7b",                          # the multimodal LLM (MGIE's folder)
    "sd": "stable-diffusion-v1-5",              # DEM's base (diffusers folder or file)
    "blip2": "blip2-opt-2.7b",                  # the frozen captioner of L_BLIP2
    "train": ["mmsm"],
    "init": None,                               # a previous stage's final/ folder
    "adapter": {"hidden": 8, "temperature": 10.0, "scale": 1.0},
    "mmsm": {"hidden": 256, "heads": 4, "site": None},
    "unet_lora": None,
    "alpha": 0.7,
    "astar": {"factor": 4, "threshold": 0.5, "previous_step": 20},
    "image_max_t": 300,
    "image_fraction": 0.5,
    "frozen_dtype": "auto",
}
DEFAULT_LOSS = {t: 1.0 for t in TERMS}       # the paper's sum: every weight 1
TINY_FAMILIES = ("mgie", "sd_diffusers", "blip2")
MMIG_FILE = "mmig.safetensors"                  # in final/: adapters and MMSM
VAL_METRICS = ("val_loss",) + tuple(f"val_l_{t}" for t in TERMS)
VAL_SEED = 20_011


# -- settings ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MMIGSettings:
    model: dict[str, Any]
    weights: dict[str, float]
    train: tuple[str, ...]
    lora: dict[str, Any] | None


def settings(config) -> MMIGSettings:
    """``model`` and ``loss`` of an MMIG config, checked (errors name the key and file)."""
    source = getattr(config, "source", "config")

    def fail(key: str, problem: str, expected: str, fix: str = ""):
        raise TrainConfigError(source, key, problem, expected, fix)

    def number(key: str, value, low: float, high: float | None = None, open_low=False):
        if isinstance(value, bool) or not isinstance(value, int | float) or \
                (value <= low if open_low else value < low) or \
                (high is not None and value > high):
            span = f"{'>' if open_low else '>='} {low}" + (f" and <= {high}" if high else "")
            fail(key, f"is {value!r}", f"a number {span}")
        return value

    def whole(key: str, value, low: int, high: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < low or \
                (high is not None and value > high):
            fail(key, f"is {value!r}", f"a whole number >= {low}"
                 + (f" and <= {high}" if high is not None else ""))
        return value

    m = merge_section(DEFAULT_MODEL, getattr(config, "model", None), "model", source)
    for key in ("mgie", "sd", "blip2"):
        if not isinstance(m[key], str) or not m[key]:
            fail(f"model.{key}", f"is {m[key]!r}", "a model name or path")
    train = m["train"]
    if not isinstance(train, list) or not train or any(t not in MODULES for t in train) \
            or len(set(train)) != len(train):
        fail("model.train", f"is {train!r}", f"a list of distinct names among "
             f"{', '.join(MODULES)} (what this stage trains)")
    if m["init"] is not None:
        if not isinstance(m["init"], str) or not m["init"]:
            fail("model.init", f"is {m['init']!r}", "null, or the final/ folder of the run "
                 "of the previous stage")
        if not (Path(m["init"]).expanduser() / MMIG_FILE).is_file():
            fail("model.init", f"{m['init']} holds no {MMIG_FILE}",
                 "the final/ folder of an MMIG stage's run (read from the working "
                 "directory when relative)",
                 "Point it at the previous stage's <run>/final, or null to start afresh.")
    a = m["adapter"]
    whole("model.adapter.hidden", a["hidden"], 1)
    number("model.adapter.temperature", a["temperature"], 0, open_low=True)
    number("model.adapter.scale", a["scale"], 0)
    s = m["mmsm"]
    whole("model.mmsm.hidden", s["hidden"], 1)
    whole("model.mmsm.heads", s["heads"], 1)
    if s["hidden"] % s["heads"]:
        fail("model.mmsm.heads", f"is {s['heads']} with hidden {s['hidden']}",
             "a divisor of model.mmsm.hidden (the cross-attention's heads)")
    if s["site"] is not None and (not isinstance(s["site"], str) or not s["site"]):
        fail("model.mmsm.site", f"is {s['site']!r}", "null (the default site) or a UNet "
             "block name such as down_blocks.2")
    lora = m["unet_lora"]
    if lora is not None and lora is not False:
        lora = merge_section({"r": 8, "alpha": 8, "target_modules": list(LORA_DEFAULT_TARGETS),
                              "dropout": 0.0}, lora, "model.unet_lora", source)
        whole("model.unet_lora.r", lora["r"], 1)
        number("model.unet_lora.alpha", lora["alpha"], 0, open_low=True)
        number("model.unet_lora.dropout", lora["dropout"], 0, 1)
        tm = lora["target_modules"]
        if not isinstance(tm, list) or not tm or not all(isinstance(x, str) for x in tm):
            fail("model.unet_lora.target_modules", f"is {tm!r}",
                 "a list of the UNet's attention projections, e.g. [to_q, to_k, to_v, "
                 "to_out.0]")
    else:
        lora = None
    if "dem" in train and lora is None:
        fail("model.train", "names dem but model.unet_lora is null",
             "model.unet_lora set (DEM trains through LoRA adapters on its UNet)",
             "Add e.g. unet_lora: {r: 8, alpha: 8}, or leave dem out of model.train.")
    number("model.alpha", m["alpha"], 0, 1)
    st = m["astar"]
    whole("model.astar.factor", st["factor"], 1)
    number("model.astar.threshold", st["threshold"], 0, 1, open_low=True)
    whole("model.astar.previous_step", st["previous_step"], 1, 999)
    whole("model.image_max_t", m["image_max_t"], 1, 1000)
    number("model.image_fraction", m["image_fraction"], 0, 1)
    if m["frozen_dtype"] not in ("auto", "fp32", "fp16", "bf16"):
        fail("model.frozen_dtype", f"is {m['frozen_dtype']!r}", "auto, fp32, fp16 or bf16")
    weights = merge_section(DEFAULT_LOSS, getattr(config, "loss", None), "loss", source)
    for k, w in weights.items():
        number(f"loss.{k}", w, 0)
    if not any(weights.values()):
        fail("loss", "gives every term the weight 0", "at least one positive weight")
    return MMIGSettings(model=m, weights={k: float(v) for k, v in weights.items()},
                        train=tuple(train), lora=lora)


# -- the module ------------------------------------------------------------------------------

class MMIGModel(nn.Module):
    """Everything of one MMIG generator step; ``forward(batch)`` returns the loss dict."""

    # The MGIE task's teacher-forced sequence and CLIP features, reused as they are: they
    # read only the tokenizer, MGIE's prompt settings, the vision tower and the projector.
    sequences = MGIETrainModel.sequences
    answer_ids = MGIETrainModel.answer_ids
    image_features = MGIETrainModel.image_features
    condition = MGIETrainModel.condition

    def __init__(self, mgie, sd, blip2, adapters: nn.Module, mmsm: nn.Module, hook,
                 s: MMIGSettings, llm_checkpointing: bool = False):
        super().__init__()
        self.llm = mgie.llm               # frozen; the adapters live inside its layers
        self.adapters = adapters          # θ_a and the modality embedding
        self.vision = mgie.vision         # frozen
        self.projector = mgie.projector   # frozen
        self.embed = mgie.llm.get_input_embeddings()   # frozen ([IMG] rows: MGIE's emb)
        self.edit_head = mgie.edit_head   # frozen: e0 = MGIE's condition
        self.unet = sd.unet               # frozen, + LoRA (dem)
        self.vae = sd.vae                 # frozen
        self.text_encoder = sd.text_encoder   # frozen
        self.mmsm = mmsm
        self.blip2 = blip2.model if blip2 is not None else None   # frozen
        self.hook = hook                  # MMSM's forward hook on the UNet (not a module)
        self.settings = s
        self.weights = s.weights
        self.llm_trains = "llm" in s.train
        self.llm_checkpointing = llm_checkpointing   # transformers checkpoints in train mode
        prompt_view(self, mgie)          # plain attributes the reused MGIE methods read
        self.sd_tokenizer = sd.tokenizer
        self.sd_source = sd.source
        self.blip2_processor = blip2.processor if blip2 is not None else None
        self.scaling = float(sd.vae.config.scaling_factor)
        self.vae_factor = 2 ** (len(sd.vae.config.block_out_channels) - 1)
        self.register_buffer("alphas_cumprod", sd.scheduler.alphas_cumprod.clone().float(),
                             persistent=False)
        from ..mgie_core import attention, guidance

        self.controller = attention.install(self.unet)
        self.astar_layers = guidance.layers_at_factor(self.unet,
                                                      int(s.model["astar"]["factor"]))

    def train(self, mode: bool = True) -> MMIGModel:
        """Train mode for what trains; the frozen models stay in eval mode (no dropout;
        the adapters' dropout acts only while the LLM trains)."""
        super().train(mode)
        for m in (self.llm, self.vision, self.projector, self.edit_head, self.vae,
                  self.text_encoder, self.blip2):
            if m is not None:
                m.eval()
        if mode and self.llm_checkpointing:
            self.llm.train()      # LLaMA has no dropout; train mode turns checkpointing on
        if mode and self.llm_trains:
            self.adapters.train()
        return self

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device

    # -- the LLM ------------------------------------------------------------------------
    def language(self, batch: dict[str, Any], need_mmt: bool
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(e0 [B,77,D] float32, L_MMT or 0). e0 is what MGIE hands its UNet and what
        MMSM reads in the nodes: the LLM's hidden states at the 8 positions predicting
        [IMG0..7] through MGIE's (frozen) edit head (:meth:`MGIETrainModel.condition`).
        Under no_grad when the LLM does not train (nothing then reaches θ_a)."""
        dev = self.device
        ids, mask, labels, starts = self.sequences(batch)
        ids, mask, labels = ids.to(dev), mask.to(dev), labels.to(dev)
        source = batch["source"].to(dev, torch.float32)
        grad = torch.enable_grad() if (self.llm_trains and torch.is_grad_enabled()) \
            else torch.no_grad()
        with grad:
            feats = self.image_features(source)
            embeds = self.embed(ids)
            embeds = embeds.masked_scatter((ids == self.patch_id).unsqueeze(-1),
                                           feats.to(embeds.dtype).reshape(-1, feats.shape[-1]))
            has_image = torch.ones(ids.shape[0], dtype=torch.bool, device=dev)
            with self.adapters.modality(has_image):
                out = self.llm.model(inputs_embeds=embeds, attention_mask=mask,
                                     use_cache=False)
            hidden = out.last_hidden_state.float()
            if need_mmt:
                h_prev, y_next = hidden[:, :-1], labels[:, 1:]
                keep = y_next != IGNORE
                head = self.llm.lm_head
                logits = head(h_prev[keep].to(head.weight.dtype)).float()
                l_mmt = losses.instruction_ce(logits, y_next[keep])
            else:
                l_mmt = hidden.new_zeros(())
            e0 = self.condition(hidden.to(_dtype(self.edit_head)), starts).float()
        return e0, l_mmt

    # -- the descriptions ------------------------------------------------------------------
    def descriptions(self, batch: dict[str, Any]) -> tuple[list[str], list[str],
                                                           list[list[str]]]:
        """(object texts, background texts, A-STAR's concept words) of the batch's pairs."""
        from ..mgie_core.layered import BACKGROUND_FALLBACK, split_descriptions
        from ..mgie_core.plan import EditPlan
        from ..mgie_core.plan_rules import guess_object

        objects, backgrounds, concepts = [], [], []
        n = len(batch["instruction"])
        for i in range(n):
            instruction = batch["instruction"][i]
            target = batch["target_prompt"][i].strip() or instruction
            words = [w for w in (batch.get("edit_words") or [[]] * n)[i] if w.strip()]
            thing = guess_object(instruction)
            plan = EditPlan(instruction=instruction, target_prompt=target,
                            source_prompt=batch["source_prompt"][i],
                            edit_words=words, object=thing)
            try:
                obj, bg = split_descriptions(plan)
            except InputError:        # neither edit words nor an object: the whole caption
                obj, bg = target, BACKGROUND_FALLBACK
            objects.append(obj)
            backgrounds.append(bg)
            # A-STAR's concepts: the edit words, as the pack's A-STAR control takes them
            # from a plan (the object when there are none)
            concepts.append(list(dict.fromkeys(words or ([thing] if thing else []))))
        return objects, backgrounds, concepts

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        tok = self.sd_tokenizer
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt").input_ids.to(self.device)
        return self.text_encoder(ids)[0].float()

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] 0..1 -> scaled latents (posterior mode), float32."""
        dtype = next(self.vae.parameters()).dtype
        z = self.vae.encode((images * 2 - 1).to(dtype)).latent_dist.mode()
        return z.float() * self.scaling

    def timesteps(self, b: int, low_rows: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """t [B] and the low-noise rows [B] bool: with ``low_rows`` a fraction
        ``model.image_fraction`` of the rows (stochastic rounding) draws t from
        [0, image_max_t), the others from [0, T) (the xMGIE task's rule)."""
        m = self.settings.model
        T = len(self.alphas_cumprod)
        t_all = torch.randint(0, T, (b,))
        if not low_rows:
            return t_all.to(self.device), torch.zeros(b, dtype=torch.bool, device=self.device)
        exact = float(m["image_fraction"]) * b
        n_low = int(math.floor(exact))
        if torch.rand(()) < exact - n_low:
            n_low += 1
        low = torch.arange(b) < min(n_low, b)
        t_low = torch.randint(0, int(m["image_max_t"]), (b,))
        return torch.where(low, t_low, t_all).to(self.device), low.to(self.device)

    # -- DEM -----------------------------------------------------------------------------
    def dem(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, e0: torch.Tensor,
            capture: bool):
        """One UNet call on ``cond`` with MMSM hooked (text ``e0``); (ε̂ float32, the
        MMSMOut, the cross-attention maps at A-STAR's layers when ``capture``)."""
        from ..mgie_core.attention import COND, AttnContext, BatchLayout, Branch
        from ..mgie_core.attention_hooks import CaptureHook

        hooks = [CaptureHook(self.astar_layers)] if capture else []
        ctl = self.controller
        ctl.hooks = hooks
        b = x_t.shape[0]
        ctl.reset_call(AttnContext(0, 1, BatchLayout(((Branch.EDIT, COND),) * b),
                                   tuple(x_t.shape[-2:])))
        self.hook.set_text(e0)
        udt = _dtype(self.unet)
        # The hooks and the call's context stay set after the call: gradient
        # checkpointing recomputes the UNet in the backward pass, which must run the
        # same (explicit-softmax) kernels with the same text; the next call replaces them.
        eps = self.unet(x_t.to(udt), t, encoder_hidden_states=cond.to(udt),
                        return_dict=False)[0].float()
        maps = hooks[0].maps if capture else None
        return eps, self.hook.last, maps

    def astar_terms(self, maps: dict[str, torch.Tensor], prev: dict[str, torch.Tensor],
                    groups: list[list[list[int]]], latent_hw) -> tuple[torch.Tensor,
                                                                       torch.Tensor]:
        """(L_AS, L_AR), each the mean over the rows with concepts of A-STAR's term on
        the row's peak-normalised concept maps; B from the previous step's maps."""
        from ..mgie_core import astar

        any_map = next(iter(maps.values()))
        hw = astar.map_hw(latent_hw, any_map.shape[-2])
        seg, ret = [], []
        for i, g in enumerate(groups):
            if not g:
                continue
            A = astar.peak_normalise(astar.concept_maps({k: v[i] for k, v in maps.items()},
                                                        g, hw))
            seg.append(astar.segregation_loss(A))
            if prev is not None:
                with torch.no_grad():
                    Ap = astar.concept_maps({k: v[i] for k, v in prev.items()}, g, hw)
                    B = astar.binarise(Ap, float(self.settings.model["astar"]["threshold"]))
                ret.append(astar.retention_loss(A, B))
        zero = any_map.float().sum() * 0.0
        l_as = torch.stack(seg).mean() if seg else zero
        l_ar = torch.stack(ret).mean() if ret else zero
        return l_as.float(), l_ar.float()

    # -- BLIP-2 --------------------------------------------------------------------------
    def blip2_inputs(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor,
                                                         torch.Tensor]:
        """(input_ids, attention_mask, labels): the query-token placeholders, then the
        caption as BLIP-2's tokenizer writes it (BOS first), right-padded; labels only on
        the caption's tokens after BOS."""
        proc = self.blip2_processor
        tok = proc.tokenizer
        nq = int(proc.num_query_tokens)
        image_id = tok.convert_tokens_to_ids(str(getattr(proc, "image_token", "<image>")))
        rows = [[image_id] * nq + tok(c)["input_ids"] for c in captions]
        width = max(len(r) for r in rows)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        att = torch.zeros((len(rows), width), dtype=torch.long)
        lab = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            att[i, :len(r)] = 1
            lab[i, nq + 1:len(r)] = torch.tensor(r[nq + 1:])
        return ids.to(self.device), att.to(self.device), lab.to(self.device)

    def blip2_pixels(self, x0: torch.Tensor) -> torch.Tensor:
        """The predicted clean latents decoded at BLIP-2's input size, as its processor
        normalises images: the latent pooled to size/8 (area), decoded by the frozen VAE
        (checkpointed), resized to the input size, (x - mean) / std."""
        from ..mgie_core.identity_guidance import checkpointed_decoder

        ip = self.blip2_processor.image_processor
        size = (int(ip.size["height"]), int(ip.size["width"]))
        lat = (max(1, math.ceil(size[0] / self.vae_factor)),
               max(1, math.ceil(size[1] / self.vae_factor)))
        if x0.shape[-2] > lat[0] or x0.shape[-1] > lat[1]:
            x0 = F.interpolate(x0, size=lat, mode="area")
        dtype = next(self.vae.parameters()).dtype
        with checkpointed_decoder(self.vae):
            img = self.vae.decode((x0 / self.scaling).to(dtype)).sample.float()
        img = ((img + 1) / 2).clamp(0, 1)
        img = F.interpolate(img, size=size, mode="bilinear", align_corners=False,
                            antialias=True)
        mean = torch.tensor(ip.image_mean, device=img.device).view(1, 3, 1, 1)
        std = torch.tensor(ip.image_std, device=img.device).view(1, 3, 1, 1)
        return (img - mean) / std

    def blip2_loss(self, x0: torch.Tensor, captions: list[str]) -> torch.Tensor:
        ids, att, labels = self.blip2_inputs(captions)
        pixels = self.blip2_pixels(x0)
        dtype = next(self.blip2.parameters()).dtype
        out = self.blip2(pixel_values=pixels.to(dtype), input_ids=ids, attention_mask=att,
                         labels=labels)
        return out.loss.float()

    # -- the step ----------------------------------------------------------------------
    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        from ..mgie_core.attention import MaskPyramid
        from ..mgie_core.layered import layered_losses, mix_embeddings
        from ..mgie_core.mmig import mmsm_loss

        w = self.weights
        dev = self.device
        target = batch["target"].to(dev, torch.float32)
        mask = batch["mask"].to(dev, torch.float32)
        has_mask = torch.as_tensor(batch["has_mask"], dtype=torch.bool).to(dev)
        b = target.shape[0]

        e0, l_mmt = self.language(batch, need_mmt=w["mmt"] > 0)
        objects, backgrounds, concepts = self.descriptions(batch)
        cond = mix_embeddings(self.encode_text(objects), self.encode_text(backgrounds),
                              float(self.settings.model["alpha"]))

        z = self.encode(target)
        t, low = self.timesteps(b, low_rows=w["blip2"] > 0)
        noise = torch.randn_like(z)
        abar = self.alphas_cumprod[t].view(b, 1, 1, 1)
        x_t = abar.sqrt() * z + (1 - abar).sqrt() * noise
        astar_on = w["as"] > 0 or w["ar"] > 0
        prev = None
        if w["ar"] > 0:
            # Retention's regions: the maps of the previous sampling step, i.e. the same
            # clean latent and noise at t + previous_step (no gradient). Called before
            # the trained call, so that call's text and hooks are the last ones set
            # (what gradient checkpointing recomputes).
            with torch.no_grad():
                t_prev = (t + int(self.settings.model["astar"]["previous_step"])).clamp(
                    max=len(self.alphas_cumprod) - 1)
                ap = self.alphas_cumprod[t_prev].view(b, 1, 1, 1)
                x_prev = ap.sqrt() * z + (1 - ap).sqrt() * noise
                prev = self.dem(x_prev, t_prev, cond, e0.detach(), capture=True)[2]
        eps, mm, maps = self.dem(x_t, t, cond, e0, capture=astar_on)
        zero = eps.sum() * 0.0

        l_sdm = losses.edit_noise_mse(eps, noise) if w["sdm"] > 0 else zero
        l_mmsm = mmsm_loss(mm.e2, mm.e3).float() if w["mmsm"] > 0 else zero

        l_fg = l_bg = zero
        if w["fg"] > 0 or w["bg"] > 0:
            m_lat = MaskPyramid((mask[:, 0] > 0.5).float()).at(tuple(z.shape[-2:]), dev)
            inside = m_lat.flatten(1).sum(1)
            # pairs whose mask leaves both an inside and an outside at the latent's size
            rows = has_mask & (inside > 0) & (inside < m_lat[0].numel())
            if bool(rows.any()):
                m_rows = m_lat[rows][:, None]
                l_fg, l_bg = layered_losses(noise[rows], eps[rows], m_rows, m_rows)

        l_as = l_ar = zero
        if astar_on:
            groups = [_token_groups(self.sd_tokenizer, o, c) for o, c in zip(objects, concepts)]
            l_as, l_ar = self.astar_terms(maps, prev, groups, tuple(z.shape[-2:]))

        l_blip2 = zero
        if w["blip2"] > 0 and bool(low.any()):
            idx = torch.nonzero(low).flatten()
            a_low = abar[idx]
            x0 = (x_t[idx] - (1 - a_low).sqrt() * eps[idx]) / a_low.sqrt()
            captions = [(batch["target_prompt"][i].strip() or batch["instruction"][i])
                        for i in idx.tolist()]
            l_blip2 = self.blip2_loss(x0, captions)

        terms = {"sdm": l_sdm, "as": l_as, "ar": l_ar, "fg": l_fg, "bg": l_bg,
                 "mmt": l_mmt.float(), "blip2": l_blip2, "mmsm": l_mmsm}
        loss = sum((w[k] * terms[k] for k in TERMS if w[k] > 0), zero)
        out = {"loss": loss}
        out.update({f"l_{k}": v.detach().float() for k, v in terms.items()})
        out["low_t_rows"] = low.float().sum()
        return out


def _token_groups(tokenizer, text: str, words: list[str]) -> list[list[int]]:
    """Each word's token positions in ``text``; a word the description does not hold
    (the split keeps only edit words of the target caption) is left out."""
    from ..mgie_core.tokens import word_token_groups

    groups = []
    for word in words:
        try:
            found = word_token_groups(tokenizer, text, [word])
        except InputError:
            continue
        groups += [g for g in found if g]
    return groups


def _dtype(module: nn.Module) -> torch.dtype:
    """The dtype a frozen module computes in (its first frozen parameter's)."""
    for p in module.parameters():
        if not p.requires_grad:
            return p.dtype
    return next(module.parameters()).dtype


# -- parameter counts ------------------------------------------------------------------------

def trainable_counts(model: nn.Module) -> dict[str, int]:
    """Parameters that train, per module: ``llm_adapters`` (θ_a and the modality
    embedding), ``mmsm``, ``dem_lora`` (the UNet's LoRA), ``other`` (anything else: 0)."""
    m = unwrap(model, MMIGModel)
    seen: set[int] = set()
    counts = {"llm_adapters": 0, "mmsm": 0, "dem_lora": 0, "other": 0}
    groups = (("llm_adapters", m.adapters), ("mmsm", m.mmsm), ("dem_lora", m.unet))
    for key, module in groups:
        for p in module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                counts[key] += p.numel()
    for p in m.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            counts["other"] += p.numel()
    return counts


# -- the task ---------------------------------------------------------------------------------

class MMIGTask(NoCritic):
    """The :class:`training.task.TrainTask` of MMIG's stages (module docstring)."""

    name = NAME

    def __init__(self, model: MMIGModel, accelerator, s: MMIGSettings, source: dict):
        self.model = model
        self.accelerator = accelerator
        self.settings = s
        self.weights = dict(s.weights)
        self.source = source

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        m = unwrap(model, MMIGModel)
        return {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}

    def load_trainable_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        load_trainable_state(unwrap(model, MMIGModel), state, "this MMIG run")

    def validate(self, model: nn.Module, batches: list[dict[str, Any]]) -> dict[str, float]:
        """The held-out total loss and its terms, with the noise and timesteps drawn from
        seeded generators (the same draws at every validation); the process's random
        state is put back afterwards."""
        from ..mgie_core.random_state import preserved

        m = unwrap(model, MMIGModel)
        totals: dict[str, float] = {}
        n = 0
        autocast = (self.accelerator.autocast() if self.accelerator is not None
                    and hasattr(self.accelerator, "autocast") else contextlib.nullcontext())
        was = m.training
        m.eval()
        try:
            with preserved(), torch.no_grad(), autocast:
                for i, batch in enumerate(batches):
                    torch.manual_seed(VAL_SEED + i)
                    out = m(batch)
                    k = int(batch["target"].shape[0])
                    for key in ("loss",) + tuple(f"l_{t}" for t in TERMS):
                        totals[key] = totals.get(key, 0.0) + float(out[key]) * k
                    n += k
        finally:
            m.train(was)
        if n == 0:
            return {}
        return {f"val_{k}": v / n for k, v in totals.items()}

    def export(self, model: nn.Module, folder: Path) -> None:
        """``folder`` (the run's ``final/``): the adapters and MMSM in the file the nodes
        load (:func:`mgie_core.mmig.save_mmig`, ``mmig.safetensors``) and, with LoRA, the
        UNet adapter in diffusers' LoRA layout under ``unet_lora/`` (as the xMGIE task
        writes it). The next stage's ``model.init`` reads this folder."""
        from ..mgie_core.mmig import save_mmig

        m = unwrap(model, MMIGModel)
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"task": NAME, "train": ",".join(self.settings.train),
                "unet_lora": "" if self.settings.lora is None else LORA_FOLDER}
        save_mmig(folder / MMIG_FILE, adapters=m.adapters, mmsm=m.mmsm, meta=meta)
        if self.settings.lora is not None:
            m.unet.save_lora_adapter(str(folder / LORA_FOLDER), weight_name=LORA_WEIGHTS)


# -- building ---------------------------------------------------------------------------------

def check_config(config) -> MMIGSettings:
    """The task's settings, checked without loading anything."""
    return settings(config)


def _load_models(s: MMIGSettings, tiny: bool, need_blip2: bool):
    """(MGIEModel, SDModel, Captioner or None), loaded in float32 on the CPU."""
    from ..mgie_core.models import sd as sdm
    from ..mgie_core.models.captioner import load_blip2
    from ..mgie_core.models.mgie import load_mgie

    m = s.model
    names = {"mgie": m["mgie"], "sd": m["sd"], "blip2": m["blip2"]}
    if tiny:   # the tiny model of each family; the names in the config are not used
        from ..mgie_core import tiny as tiny_models

        families = ("mgie", "sd_diffusers") + (("blip2",) if need_blip2 else ())
        root = tiny_models.ensure_tiny_models(None, families)
        names = {"mgie": str(tiny_models.tiny_path(root, "mgie")),
                 "sd": str(tiny_models.tiny_path(root, "sd_diffusers")),
                 "blip2": str(tiny_models.tiny_path(root, "blip2")) if need_blip2 else None}
    mgie = load_mgie(names["mgie"], dtype="fp32", device="cpu")
    if str(names["sd"]).endswith((".safetensors", ".ckpt")):
        sd = sdm.load_sd_checkpoint(names["sd"], dtype="fp32", device="cpu")
    else:
        sd = sdm.load_sd_diffusers(names["sd"], dtype="fp32", device="cpu")
    blip2 = load_blip2(names["blip2"], dtype="fp32", device="cpu") if need_blip2 else None
    return mgie, sd, blip2


def _frozen_dtype(setting: str, compute: torch.dtype) -> torch.dtype:
    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    return compute if setting == "auto" else table[setting]


def _init_from(folder: Path, adapters: nn.Module, mmsm: nn.Module, unet: nn.Module,
               lora: bool, source: str) -> None:
    """Start from a previous stage's final/: its adapters and MMSM (same settings), and
    its UNet LoRA when both have one."""
    from ..mgie_core.mmig import load_mmig

    folder = Path(folder).expanduser()
    file = folder / MMIG_FILE          # there: settings() checked it
    loaded = load_mmig(file)
    theirs = loaded.get("mmsm")
    if theirs is not None and theirs.site and mmsm.site and theirs.site != mmsm.site:
        raise TrainConfigError(source, "model.init", f"{file}'s MMSM was trained at "
                               f"{theirs.site}, this stage's is at {mmsm.site}",
                               "the same model.mmsm.site in every stage")
    for key, module in (("adapters", adapters), ("mmsm", mmsm)):
        other = loaded.get(key)
        if other is None:
            continue
        mine, theirs = module.state_dict(), other.state_dict()
        if set(mine) != set(theirs) or any(mine[k].shape != theirs[k].shape for k in mine):
            raise TrainConfigError(source, "model.init", f"{file}'s {key} do not fit this "
                                   "stage's model", "the final/ of a stage with the same "
                                   "model.adapter / model.mmsm settings")
        module.load_state_dict(theirs)
    lora_dir = folder / LORA_FOLDER
    if lora and (lora_dir / LORA_WEIGHTS).is_file():
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        state = load_file(str(lora_dir / LORA_WEIGHTS))
        state = {k[len("unet."):] if k.startswith("unet.") else k: v for k, v in state.items()}
        result = set_peft_model_state_dict(unet, state)
        # missing_keys lists the whole UNet (peft loads non-strictly): only a LoRA tensor
        # the file lacks means a partial load
        missing = [k for k in getattr(result, "missing_keys", ()) if "lora_" in k]
        if getattr(result, "unexpected_keys", None) or missing:
            raise TrainConfigError(source, "model.init", f"{lora_dir}'s LoRA does not fit "
                                   "this stage's model.unet_lora"
                                   + (f" (it lacks {missing[0]})" if missing else ""),
                                   "the same rank and target modules")


def build_task(config, accelerator, tiny: bool, models: dict | None = None) -> MMIGTask:
    """The MMIG task of a config, its models loaded by name (``tiny``: the tiny MGIE, SD
    and BLIP-2)."""
    from ..mgie_core.mmig import (
        MMSM,
        attach_mmsm,
        default_site,
        inject_mm_adapters,
        site_channels,
    )

    s = settings(config)
    source = getattr(config, "source", "config")
    if models:
        raise InputError("models", "were given", "none: the MMIG task loads its models "
                         "by the names in the config", "Train MMIG with `xmgie train`.")
    device = getattr(accelerator, "device", torch.device("cpu"))
    compute = _compute_dtype(accelerator)
    mgie, sd, blip2 = _load_models(s, tiny, s.weights["blip2"] > 0)
    mgie = dataclasses.replace(mgie)
    frozen = _frozen_dtype(s.model["frozen_dtype"], compute)
    vae_dtype = torch.float32 if frozen == torch.float16 else frozen
    for module, want in ((mgie.llm, frozen), (mgie.vision, frozen), (mgie.projector, frozen),
                         (sd.unet, frozen), (sd.text_encoder, frozen), (sd.vae, vae_dtype),
                         (blip2.model if blip2 is not None else None, frozen)):
        if module is None:
            continue
        module.requires_grad_(False)
        if next(module.parameters()).dtype != want:
            module.to(dtype=want)
    a = s.model["adapter"]
    adapters = inject_mm_adapters(mgie.llm, hidden=int(a["hidden"]),
                                  temperature=float(a["temperature"]), scale=float(a["scale"]))
    adapters.float()
    if s.lora is not None:
        _add_lora(sd.unet, s.lora)
    checkpointing = bool(getattr(config, "gradient_checkpointing", False))
    if checkpointing:
        sd.unet.enable_gradient_checkpointing()
        if "llm" in s.train:   # non-reentrant: the frozen layers carry θ_a's gradient
            kwargs = {"use_reentrant": False}
            body = mgie.llm.model
            if hasattr(body, "activation_checkpointing_enable"):    # transformers >= 5.x
                body.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                body.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    mm = s.model["mmsm"]
    site = mm["site"] or default_site(sd.unet)
    try:
        channels = site_channels(sd.unet, site)
    except (InputError, ValueError, KeyError) as exc:
        raise TrainConfigError(source, "model.mmsm.site", f"{site!r} is not a block of "
                               "this UNet", "null, or a block such as up_blocks.0") from exc
    # e0 is MGIE's condition: as wide as the UNet's cross-attention
    mmsm = MMSM(int(sd.unet.config.cross_attention_dim), channels, hidden=int(mm["hidden"]),
                heads=int(mm["heads"])).float()
    hook = attach_mmsm(sd.unet, mmsm, site)
    if s.model["init"] is not None:
        _init_from(Path(s.model["init"]), adapters, mmsm, sd.unet, s.lora is not None, source)
    # What trains: the modules the stage names; everything else stays frozen.
    adapters.requires_grad_("llm" in s.train)
    mmsm.requires_grad_("mmsm" in s.train)
    for n, p in sd.unet.named_parameters():
        p.requires_grad_("dem" in s.train and "lora_" in n)
    model = MMIGModel(mgie, sd, blip2, adapters, mmsm, hook, s,
                      llm_checkpointing=checkpointing and "llm" in s.train)
    if (s.weights["as"] or s.weights["ar"]) and not model.astar_layers:
        raise TrainConfigError(source, "model.astar.factor",
                               f"is {s.model['astar']['factor']}: this UNet has no "
                               "cross-attention layer at latent/"
                               f"{s.model['astar']['factor']}",
                               "a factor of the UNet's cross-attention levels (4: the "
                               "16x16 maps at 512 px)")
    model.to(device)
    info = {"mgie": str(mgie.path), "sd": str(sd.source),
            "blip2": str(blip2.path) if blip2 is not None else None, "tiny": bool(tiny)}
    return MMIGTask(model, accelerator, s, info)
