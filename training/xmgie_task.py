"""The xMGIE training task: one batched UNet call per pair, edit row beside reference row,
scored by the paper's total loss (docs/algorithms.md §14).

One idea: the generator step is the sampler's own batched call, made differentiable. Each
pair gives two rows of ONE UNet call with the same timestep and the same noise:

    edit row       z_t(target) = sqrt(abar_t) z(target) + sqrt(1 - abar_t) eps,
                   conditioned on the target prompt (the instruction when there is none)
    reference row  z_t(source) with the same eps, conditioned on the source prompt

(the instruction path's reference branch: the source latent noised with the sampler's
noise). Inside that call the pack's stages act on the edit rows as they do when sampling:

* PFB: at PFB-Diff's sites (:func:`~xmgie.mgie_core.pfb.pfb_diff_sites`) the edit rows'
  features are blended with the reference rows' by :func:`~xmgie.mgie_core.pfb.
  blend_features`, the sampler's formula, with the data mask and the learned a_l of
  :class:`~xmgie.mgie_core.trainable.PFBWeights` (the mid block's input with the reference
  rows' mid output, as the sampler does; the background preset blends only rows with
  t > 200 and uses its dilated complement mask);
* IE: :class:`~xmgie.mgie_core.trainable.IdentityInjection` adds the projected
  [h ; e_id] at its sites to the edit rows through its own hook (the one the sampler's
  control uses; here its selector picks the call's edit rows), before PFB where a site
  is both (as the sampler orders the two controls); e_id = E_id(whole source photo) from
  the frozen identity encoder, as :class:`~xmgie.mgie_core.trainable.
  IdentityEmbeddingControl` embeds it when sampling;
* CAM (logits mode, PFB-Diff's default layers): the target prompt's tokens that the
  source prompt does not have (prompt-to-prompt's token alignment) attend only inside the
  data mask. Rows conditioned on the instruction (no target prompt) or with identical
  prompts have no such words and get no CAM.

Trained: PFBWeights, IdentityInjection, the latent critic and, optionally
(``model.unet_lora``), LoRA adapters on the UNet's attention projections through peft
(the paper trains its modules jointly with the diffusion model). Frozen: the UNet's own
weights, the VAE, the text encoder and the identity encoder.

The loss (float32 terms, every one logged):

* ``l_recon``, the paper's L1 reconstruction, on the image: on the low-noise rows only,
  the predicted clean latent decoded (VAE decoder checkpointed block by block), pasted
  into the source photo by the data mask, its seam blurred by GB (mgie_core/blur.py, the
  pack's output stage; sigmas scaled from 512 px to the training size), against the
  ground-truth edit in 0..1. Pixel space because the paper compares images and GB acts
  on pixels; the paste keeps the photo outside the mask, as PFB's latent blend does when
  sampling, so the term (and L_id) judges the edited region and its blurred seam. The
  decode costs one checkpointed VAE decoder pass on the low-noise rows only.
* ``l_diffusion`` (weight ``loss.diffusion``), an addition to the paper's loss: mean
  |eps_hat - eps| over every edit row, the L1 between the predicted and true clean
  latents measured in noise units (x0 error times sqrt(abar_t / (1 - abar_t))), i.e. the
  L1 form of the diffusion loss. The image terms see only the low-noise rows, so without
  it the rows at high noise, which sampling visits first, would get no signal at all
  (an unweighted x0 error would instead be dominated by the noisiest rows: 14x the noise
  error at t = 999).
* ``l_id = ||E_id(edit) - E_id(target)||^2`` on the same GB outputs of the low-noise
  rows (crops around the mask, as IPS crops).
* ``l_adv``: the latent PatchGAN critic on the low-noise rows' predicted clean latent
  against the target latent, both pasted into the source latent by the mask (the
  critic compares only what the edit made); the engine adds ``weights["adv"]`` times it
  and steps the critic.

Low-noise rows: a fraction ``model.image_fraction`` of the rows (stochastic rounding
per batch) draws t uniformly from [0, ``image_max_t``) = [0, 300) by default, the others
from [0, 1000). Below t = 300, sqrt(1 - abar_t) / sqrt(abar_t) < 0.83, so the clean-latent
prediction is off by less than the noise prediction is: a decodable image whose pixels,
identity and realism can be judged. A batch with no such row logs ``low_t_rows = 0`` and
0 for the image terms. The total is ``recon l_recon + id l_id + diffusion l_diffusion``
(+ ``adv l_adv``, added by the engine).

Validation edits held-out pairs with the real sampler (direct inversion of the source,
:func:`~xmgie.mgie_core.sampler.edit` with ``PFBControl(alpha=PFBWeights)``, the IE
control and CAM on the new words, a few DDIM steps), decodes and blurs the seam with GB,
and scores the result against the target with ``evaluation.metrics``: ``val_psnr`` (the
early-stopping metric, higher is better), ``val_ssim``, ``val_l1``, and the background
PSNR/SSIM against the source (``val_bg_psnr``, ``val_bg_ssim``; PIE-Bench's convention).
The edit is not pasted into the photo there, so the background metrics measure what the
edit itself kept.

Frozen models are submodules of the task's model with requires_grad False, so
accelerate moves them with it and DDP syncs only what trains. The feature hooks stay on
the UNet and read the current call's state, which is kept after the forward, so the
UNet's gradient checkpointing recomputes exactly the blended, injected, masked call.
Given models (the in-graph training node) are used as they are, except the UNet, which
is deep-copied: training puts feature hooks, LoRA adapters and gradient checkpointing on
it.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..mgie_core import losses
from ..mgie_core.attention import COND, AttnContext, AttnHook, BatchLayout, Branch, MaskPyramid
from ..mgie_core.attention_hooks import CAMHook, token_alignment
from ..mgie_core.errors import InputError
from ..mgie_core.identity_guidance import checkpointed_decoder
from ..mgie_core.pfb import PRESETS, Site, blend_features, dilate, pfb_diff_sites
from ..mgie_core.trainable import (
    IdentityEmbeddingControl,
    IdentityInjection,
    LatentPatchDiscriminator,
    PFBWeights,
    embed_sources,
    min_latent_size,
)
from .config import TrainConfigError, merge_section
from .task import load_trainable_state, unwrap

log = logging.getLogger(__name__)

NAME = "xmgie"
# The model section's keys and defaults (docs in configs/train/xmgie.yaml).
MODEL_DEFAULTS: dict[str, Any] = {
    "sd": "stable-diffusion-v1-5",
    "identity": {"kind": "clip_vision", "name": "clip-vit-large-patch14"},
    "frozen_dtype": "auto",
    "pfb": {"preset": "object", "placement": "pfb_diff"},
    "ie": {"sites": None},
    "cam": True,
    "unet_lora": None,
    "critic": {"kind": "hinge", "ndf": 64, "n_layers": 3, "norm": "spectral"},
    "image_max_t": 300,
    "image_fraction": 0.5,
    "gb": {"sigma_max": 5.0, "sigma_s": 10.0},
    "validation": {"pairs": 4, "steps": 20, "guidance": 7.5, "inversion": "direct"},
}
# The paper's three weights, and the diffusion term's (an addition: docs/algorithms.md
# §14 and the module docstring say why).
LOSS_DEFAULTS = {**losses.XMGIE_WEIGHTS, "diffusion": 1.0}
LORA_DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TINY_FAMILIES = ("sd_diffusers", "clip_vision")   # --tiny with the default identity kind
LORA_FOLDER = "unet_lora"          # in final/: the UNet's adapter, diffusers' LoRA layout
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"   # its file (the config in its metadata)
EDIT, REF = Branch.EDIT, Branch.REF
LAYOUT = BatchLayout(((EDIT, COND), (REF, COND)))
# What validate() returns (the engine checks early_stopping.metric against it up front).
VAL_METRICS = ("val_psnr", "val_ssim", "val_l1", "val_bg_psnr", "val_bg_ssim")


# --- settings ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Settings:
    """The task's part of the config (``model:`` and ``loss:``), checked: a bad value is a
    :class:`~xmgie.training.config.TrainConfigError` naming the file and the key."""

    model: dict
    weights: dict[str, float]
    lora: dict | None

    @classmethod
    def from_config(cls, config) -> Settings:
        source = getattr(config, "source", "config")

        def fail(key: str, problem: str, expected: str, fix: str = ""):
            raise TrainConfigError(source, key, problem, expected, fix)

        def whole(key: str, value, low: int) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                fail(key, f"is {value!r}", f"a whole number >= {low}")

        m = merge_section(MODEL_DEFAULTS, getattr(config, "model", None), "model", source)
        kind = m["identity"]["kind"]
        if kind not in ("clip_vision", "face_recognition"):
            fail("model.identity.kind", f"is {kind!r}",
                 "clip_vision (objects) or face_recognition (people)")
        if m["pfb"]["preset"] not in PRESETS:
            fail("model.pfb.preset", f"is {m['pfb']['preset']!r}", " or ".join(PRESETS))
        if m["pfb"]["placement"] != "pfb_diff":
            fail("model.pfb.placement", f"is {m['pfb']['placement']!r}",
                 "pfb_diff (the placement training blends at)")
        if not (isinstance(m["image_max_t"], int) and 1 <= m["image_max_t"] <= 1000):
            fail("model.image_max_t", f"is {m['image_max_t']!r}", "a whole timestep in 1..1000")
        frac = m["image_fraction"]
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 <= frac <= 1:
            fail("model.image_fraction", f"is {frac!r}", "a number in [0, 1]")
        if m["frozen_dtype"] not in ("auto", "fp32", "fp16", "bf16"):
            fail("model.frozen_dtype", f"is {m['frozen_dtype']!r}", "auto, fp32, fp16 or bf16")
        c = m["critic"]
        if c["kind"] not in losses.GAN_KINDS:
            fail("model.critic.kind", f"is {c['kind']!r}", " or ".join(losses.GAN_KINDS))
        whole("model.critic.ndf", c["ndf"], 1)
        whole("model.critic.n_layers", c["n_layers"], 1)
        if c["norm"] not in ("spectral", "instance", "none"):
            fail("model.critic.norm", f"is {c['norm']!r}", "spectral, instance or none")
        v = m["validation"]
        whole("model.validation.pairs", v["pairs"], 1)
        whole("model.validation.steps", v["steps"], 1)
        if v["inversion"] not in ("ddim", "null_text", "negative_prompt", "direct"):
            fail("model.validation.inversion", f"is {v['inversion']!r}",
                 "direct, ddim, null_text or negative_prompt")
        sites = m["ie"]["sites"]
        if sites is not None and (not isinstance(sites, list) or not sites
                                  or not all(isinstance(x, str) for x in sites)):
            fail("model.ie.sites", f"is {sites!r}",
                 "null (the default sites) or a list of UNet module names")
        weights = merge_section(LOSS_DEFAULTS, getattr(config, "loss", None), "loss", source)
        for k, w in weights.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
                fail(f"loss.{k}", f"is {w!r}", "a weight >= 0")
        lora = m["unet_lora"]
        if lora is not None and lora is not False:
            lora = merge_section({"r": 8, "alpha": 8, "target_modules":
                                  list(LORA_DEFAULT_TARGETS), "dropout": 0.0}, lora,
                                 "model.unet_lora", source)
            if isinstance(lora["r"], bool) or not (isinstance(lora["r"], int)
                                                   and lora["r"] >= 1):
                fail("model.unet_lora.r", f"is {lora['r']!r}", "a rank >= 1")
        else:
            lora = None
        return cls(m, {k: float(w) for k, w in weights.items()}, lora)


# --- loading ----------------------------------------------------------------------------

def _frozen_dtype(setting: str, precision: str, device: torch.device) -> torch.dtype:
    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if setting != "auto":
        return table[setting]
    if device.type == "cuda" and precision in ("fp16", "bf16"):
        return table[precision]
    return torch.float32


def _load_models(settings: Settings, config, device, tiny: bool, models: dict | None):
    """(SDModel, IdentityEncoder): given ones, or loaded by name (tiny: the tiny models)."""
    from ..mgie_core.models import identity as idm
    from ..mgie_core.models import sd as sdm

    models = dict(models or {})
    dtype = _frozen_dtype(settings.model["frozen_dtype"], getattr(config, "precision", "no"),
                          device)
    kind = settings.model["identity"]["kind"]
    sd_name, id_name = settings.model["sd"], settings.model["identity"]["name"]
    if tiny and ("sd" not in models or "identity" not in models):
        from ..mgie_core import tiny as tinym

        root = tinym.ensure_tiny_models(None, ["sd_diffusers", kind])
        sd_name = str(tinym.tiny_path(root, "sd_diffusers"))
        id_name = str(tinym.tiny_path(root, kind))
    sd = models.get("sd")
    if sd is None:
        if str(sd_name).endswith((".safetensors", ".ckpt")):
            sd = sdm.load_sd_checkpoint(sd_name, dtype=dtype, device=device)
        else:
            sd = sdm.load_sd_diffusers(sd_name, dtype=dtype, device=device)
        if dtype == torch.float16:
            # the pixel terms backpropagate through the decoder: float32 keeps its
            # activations and their gradients from overflowing half precision's range
            sd.vae.to(torch.float32)
    if sd.instruct:
        raise TrainConfigError(getattr(config, "source", "config"), "model.sd",
                               "is an 8-channel instruction model",
                               "a text-to-image SD 1.x model (xMGIE edits through inversion)")
    encoder = models.get("identity")
    if encoder is None:
        encoder = idm.load_identity_encoder(kind, id_name, device=device, dtype=dtype)
    return sd, encoder


def _add_lora(unet: nn.Module, lora: dict) -> None:
    """peft LoRA adapters on the UNet's attention projections (B = 0: no change until
    trained); the adapters are float32 whatever the frozen weights are."""
    from peft import LoraConfig

    config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"],
                        target_modules=list(lora["target_modules"]),
                        lora_dropout=float(lora["dropout"]), init_lora_weights="gaussian")
    unet.add_adapter(config)
    for p in unet.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


# --- hooks inside the training call ------------------------------------------------------

@dataclasses.dataclass
class _Call:
    """What the feature and attention hooks of one training call read. It stays set
    after the forward, so gradient checkpointing's recomputation sees the same call."""

    bsz: int                        # pairs: rows [0, bsz) edit, [bsz, 2 bsz) reference
    blend: MaskPyramid              # PFB's blend region per pair (at any size)
    active: torch.Tensor            # [bsz] bool: rows PFB blends (the preset's min_t)
    e_id: torch.Tensor              # [bsz, D] identity embedding of the source
    cam: MaskPyramid | None         # the object mask for CAM, None: no CAM in this call
    cam_tokens: torch.Tensor | None  # [bsz, 77] 1 where a token may act only inside
    in_reference_pass: bool = False


class _PFBSiteHook:
    """Blends the edit rows with the reference rows at one PFB site (pre: the module's
    input; post: its output). A callable object, not a closure, so the model deep-copies
    with its hooks."""

    def __init__(self, model: XMGIEModel, site: Site):
        self.model, self.site = model, site

    def _blend(self, h: torch.Tensor, ref: torch.Tensor, call: _Call) -> torch.Tensor:
        b = call.bsz
        edit = h[:b]
        m = call.blend.at(tuple(h.shape[-2:]), h.device)[:, None].to(h.dtype)
        a = self.model.pfb.alpha(self.site.module).to(h.device)
        blended = blend_features(edit, ref, m, a)
        blended = torch.where(call.active[:, None, None, None], blended, edit)
        return torch.cat([blended, h[b:]])

    def pre(self, module, args, kwargs):
        call = self.model._call
        if call is None or call.in_reference_pass:
            return None
        key = None
        if args:
            h = args[0]
        else:
            key = next(iter(kwargs))
            h = kwargs[key]
        b = call.bsz
        if h.shape[0] != 2 * b:
            return None
        if self.site.ref == "mid_output":
            ref = self._mid_output(module, args, kwargs, call)
        else:
            ref = h[b:]
        new = self._blend(h, ref, call)
        if key is None:
            return (new, *args[1:]), kwargs
        return args, {**kwargs, key: new}

    def post(self, module, args, output):
        call = self.model._call
        if call is None or call.in_reference_pass:
            return None
        h = output[0] if isinstance(output, tuple) else output
        if h.shape[0] != 2 * call.bsz:
            return None
        new = self._blend(h, h[call.bsz:], call)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    @staticmethod
    def _mid_output(module, args, kwargs, call: _Call) -> torch.Tensor:
        """The reference rows' mid block output from their own input (PFB-Diff blends the
        mid input with it), the feature hooks off for that pass."""
        b = call.bsz

        def pick(x):
            return x[b:] if torch.is_tensor(x) and x.ndim and x.shape[0] == 2 * b else x

        call.in_reference_pass = True
        try:
            return module.forward(*[pick(a) for a in args],
                                  **{k: pick(v) for k, v in kwargs.items()})
        finally:
            call.in_reference_pass = False


class _EditRows:
    """IE's row selector in the training call (:meth:`~xmgie.mgie_core.trainable.
    IdentityInjection.hook`): the edit rows [0, bsz) get the call's e_id; the reference
    rows, PFB's reference pass and calls outside training get nothing."""

    def __init__(self, model: XMGIEModel):
        self.model = model

    def __call__(self, h: torch.Tensor):
        call = self.model._call
        if call is None or call.in_reference_pass or h.shape[0] != 2 * call.bsz:
            return None
        return slice(0, call.bsz), call.e_id


class _RowCAM(AttnHook):
    """CAM on the logits with a token set per edit row (the batch's prompts differ):
    in the CAM layers, the row's IN tokens get -inf logits at pixels outside its mask.
    Calls of another batch size (the reference rows' own mid pass, recomputed under
    gradient checkpointing) are left alone."""

    def __init__(self, model: XMGIEModel, layers=CAMHook.DEFAULT_LAYERS):
        self.model, self.layers = model, tuple(layers)
        self._batch = None

    def qk_override(self, layer, ctx, query, key):
        self._batch = query.shape[0]       # logit_bias is not told the batch size
        return None

    def logit_bias(self, layer, ctx, n_query, n_key, device, dtype):
        call = self.model._call
        if (call is None or call.cam is None or not layer.is_cross
                or not layer.in_set(self.layers) or self._batch != 2 * call.bsz):
            return None
        from ..mgie_core.architecture import layer_hw

        m = call.cam.at(layer_hw(ctx.latent_hw, n_query), device).flatten(1)   # [b, HW]
        tokens = call.cam_tokens[:, :n_key].to(device)                           # [b, K]
        masked = (1 - m)[:, :, None] * tokens[:, None, :]                        # [b,HW,K]
        neg = torch.finfo(dtype).min
        bias = torch.where(masked > 0, torch.tensor(neg, dtype=dtype, device=device),
                           torch.tensor(0, dtype=dtype, device=device))
        return torch.cat([bias, torch.zeros_like(bias)])[:, None]


# --- the generator step -----------------------------------------------------------------

class XMGIEModel(nn.Module):
    """Everything the generator step runs, as one module (what accelerate wraps):
    frozen SD and identity encoder, trained PFB weights, IE and optional LoRA."""

    def __init__(self, sd, encoder, pfb: nn.Module, ie: nn.Module, settings: Settings):
        super().__init__()
        self.unet, self.vae, self.text_encoder = sd.unet, sd.vae, sd.text_encoder
        self.id_model = encoder.model
        self.pfb, self.ie = pfb, ie
        self.settings = settings
        self.sd_info = sd            # plain attributes (not modules): tokenizer, scheduler
        self.encoder_info = encoder
        abar = sd.scheduler.alphas_cumprod.float()
        self.register_buffer("alphas_cumprod", abar, persistent=False)
        self._call: _Call | None = None
        m = settings.model
        self.preset = m["pfb"]["preset"]
        self._hooks = []
        modules = dict(self.unet.named_modules())
        self.sites = pfb_diff_sites(self.unet, self.preset)
        # IE first: where a site is both, PFB's mask then confines the injected change to
        # the edited region, as in the sampler (the IE control listed before PFB's)
        select = _EditRows(self)
        for k, name in enumerate(self.ie.sites):
            self._hooks.append(modules[name].register_forward_hook(self.ie.hook(k, select)))
        for site in self.sites:
            hook = _PFBSiteHook(self, site)
            if site.hook == "input":
                self._hooks.append(modules[site.module].register_forward_pre_hook(
                    hook.pre, with_kwargs=True))
            else:
                self._hooks.append(modules[site.module].register_forward_hook(hook.post))
        from ..mgie_core import attention

        self.controller = attention.install(self.unet)
        self.cam_hook = _RowCAM(self)

    # -- frozen encoders ---------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device

    def _vae_dtype(self):
        return next(self.vae.parameters()).dtype

    @torch.no_grad()
    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] 0..1 -> scaled latents (posterior mode), float32."""
        z = self.vae.encode((x * 2 - 1).to(self._vae_dtype())).latent_dist.mode()
        return z.float() * self.vae.config.scaling_factor

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Differentiable decode, checkpointed block by block -> [B,3,H,W] 0..1 float32."""
        with checkpointed_decoder(self.vae):
            x = self.vae.decode((z / self.vae.config.scaling_factor).to(self._vae_dtype()))
        return ((x.sample.float() + 1) / 2).clamp(0, 1)

    def tokens(self, prompts: list[str]) -> torch.Tensor:
        tok = self.sd_info.tokenizer
        return tok(prompts, padding="max_length", max_length=tok.model_max_length,
                   truncation=True, return_tensors="pt").input_ids

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        return self.text_encoder(self.tokens(prompts).to(self.device))[0]

    def identity_encoder(self):
        enc = self.encoder_info
        if enc.device != self.device:
            enc = dataclasses.replace(enc, device=self.device)
            self.encoder_info = enc
        return enc

    def embed_identity(self, images: torch.Tensor, masks: torch.Tensor,
                       has_mask: torch.Tensor) -> torch.Tensor:
        """L2-normalised E_id of [B,3,H,W] images, each cropped to its mask's box (10 %
        margin) when it has one; differentiable in the images."""
        from ..mgie_core.models.identity import crop_to_mask

        enc = self.identity_encoder()
        rows = []
        for i in range(images.shape[0]):
            img = images[i:i + 1].permute(0, 2, 3, 1)
            if bool(has_mask[i]) and bool((masks[i] > 0.5).any()):
                img = crop_to_mask(img, masks[i, 0])
            rows.append(enc.preprocess(img))
        x = torch.cat(rows)
        feats = (self.id_model(pixel_values=x).image_embeds if enc.kind == "clip_vision"
                 else self.id_model(x))
        return F.normalize(feats.float(), dim=-1)

    # -- one call's inputs -----------------------------------------------------------------
    def _timesteps(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Timesteps and the low-noise rows: n_low = fraction x b, rounded stochastically
        (an exact fraction on average); those rows draw t from [0, image_max_t)."""
        m = self.settings.model
        exact = float(m["image_fraction"]) * b
        n_low = int(math.floor(exact))
        if torch.rand(()) < exact - n_low:
            n_low += 1
        n_low = min(n_low, b)
        t_all = torch.randint(0, len(self.alphas_cumprod), (b,))
        t_low = torch.randint(0, int(m["image_max_t"]), (b,))
        low = torch.arange(b) < n_low
        return torch.where(low, t_low, t_all).to(self.device), low.to(self.device)

    def _cam_tokens(self, edit_prompts: list[str], source_prompts: list[str],
                    use: list[bool]) -> torch.Tensor | None:
        """[B, 77] 1 at the edit prompt's tokens that the source prompt does not have
        (prompt-to-prompt's alignment of the padded token sequences)."""
        tok = self.sd_info.tokenizer
        length = tok.model_max_length
        out = torch.zeros(len(edit_prompts), length)
        src_ids, tgt_ids = self.tokens(source_prompts), self.tokens(edit_prompts)
        for i, on in enumerate(use):
            if not on:
                continue
            mapper = token_alignment(src_ids[i].tolist(), tgt_ids[i].tolist())
            n = len(tok(edit_prompts[i], truncation=True, max_length=length).input_ids)
            for k in range(1, n - 1):             # words only: not start/end of text
                if int(mapper[k]) < 0:
                    out[i, k] = 1.0
        return out if bool(out.any()) else None

    def _blend_region(self, mask: torch.Tensor) -> torch.Tensor:
        cfg = PRESETS[self.preset]
        m = (mask[:, 0] > 0.5).float()
        return 1 - dilate(m, cfg["dilate_px"]) if cfg["background"] else m

    # -- forward -------------------------------------------------------------------------
    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        dev = self.device
        src = batch["source"].to(dev, torch.float32)
        tgt = batch["target"].to(dev, torch.float32)
        mask = batch["mask"].to(dev, torch.float32)
        has_mask = torch.as_tensor(batch["has_mask"], dtype=torch.bool)
        b = src.shape[0]
        target_prompts = [tp if tp.strip() else ins for tp, ins in
                          zip(batch["target_prompt"], batch["instruction"])]
        source_prompts = list(batch["source_prompt"])
        m = self.settings.model

        with torch.no_grad():
            z_src, z_tgt = self.encode_images(src), self.encode_images(tgt)
            emb = self.encode_text(target_prompts + source_prompts)
            e_id = embed_sources(self.identity_encoder(), src)   # as the IE control does
        t, low = self._timesteps(b)
        noise = torch.randn_like(z_tgt)
        abar = self.alphas_cumprod[t][:, None, None, None]
        zt_edit = abar.sqrt() * z_tgt + (1 - abar).sqrt() * noise
        zt_ref = abar.sqrt() * z_src + (1 - abar).sqrt() * noise

        cam = None
        cam_tokens = None
        if m["cam"]:
            use = [bool(tp.strip()) and bool(sp.strip()) for tp, sp in
                   zip(batch["target_prompt"], source_prompts)]
            cam_tokens = self._cam_tokens(target_prompts, source_prompts, use)
            cam = MaskPyramid((mask[:, 0] > 0.5).float()) if cam_tokens is not None else None
        min_t = PRESETS[self.preset]["min_t"]
        self._call = _Call(b, MaskPyramid(self._blend_region(mask)), t > min_t, e_id, cam,
                           cam_tokens)
        ctl = self.controller
        ctl.hooks = [self.cam_hook] if cam is not None else []
        ctl.reset_call(AttnContext(0, 1, LAYOUT, tuple(z_tgt.shape[-2:])))
        udt = next(self.unet.parameters()).dtype
        eps = self.unet(torch.cat([zt_edit, zt_ref]).to(udt), torch.cat([t, t]),
                        encoder_hidden_states=emb.to(udt), return_dict=False)[0]
        eps_edit = eps[:b].float()
        x0 = (zt_edit - (1 - abar).sqrt() * eps_edit) / abar.sqrt()

        l_latent = losses.recon_l1(eps_edit, noise)      # the diffusion term
        zero = eps_edit.sum() * 0.0
        n_low = int(low.sum())
        if n_low:
            idx = torch.nonzero(low).flatten()
            ms = mask[idx]
            decoded = self.decode_latents(x0[idx])
            pasted = ms * decoded + (1 - ms) * src[idx]
            out = self.seam_blur(pasted, ms)
            l_pixel = losses.recon_l1(out, tgt[idx])
            with torch.no_grad():
                e_gt = self.embed_identity(tgt[idx], ms, has_mask[idx.cpu()])
            l_id = losses.identity_l2(self.embed_identity(out, ms, has_mask[idx.cpu()]), e_gt)
            ml = MaskPyramid((ms[:, 0] > 0.5).float()).at(tuple(x0.shape[-2:]), dev)[:, None]
            # both of the critic's samples pasted into the source latent the same way, so
            # it judges the edited region and its seam, never the background's difference
            fake = ml * x0[idx] + (1 - ml) * z_src[idx]
            real = ml * z_tgt[idx] + (1 - ml) * z_src[idx]
        else:
            l_pixel, l_id = zero, zero
            fake = x0[:0]
            real = z_tgt[:0]
        loss = losses.xmgie_total({"recon": l_pixel, "id": l_id, "diffusion": l_latent},
                                  self.settings.weights)
        return {"loss": loss, "l_recon": l_pixel, "l_diffusion": l_latent, "l_id": l_id,
                "low_t_rows": torch.tensor(float(n_low), device=dev),
                "real": real, "fake": fake}

    def seam_blur(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """GB on [B,3,H,W] images with [B,1,H,W] masks, its sigmas (pixels at 512 px)
        scaled to the image width."""
        from ..mgie_core.blur import gb_blur

        gb = self.settings.model["gb"]
        scale = images.shape[-1] / 512
        with warnings.catch_warnings():
            # the image check reads min/max of a tensor that carries a gradient: harmless
            warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad")
            out = gb_blur(images.permute(0, 2, 3, 1), masks[:, 0],
                          sigma_max=float(gb["sigma_max"]) * scale,
                          sigma_s=max(float(gb["sigma_s"]) * scale, 1e-3))
        return out.permute(0, 3, 1, 2)

    def release(self) -> None:
        """Remove the feature hooks from the UNet (the model is not used afterwards)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._call = None


# --- the task ---------------------------------------------------------------------------

def _new_words(source_prompt: str, target_prompt: str) -> list[str]:
    """Words of the target prompt that the source prompt does not have (CAM's IN words
    in validation; training aligns the tokens the same way)."""
    def words(text: str) -> list[str]:
        return [w for w in (w.strip(".,;:!?\"'()[]") for w in text.split()) if w]

    have = {w.lower() for w in words(source_prompt)}
    return [w for w in words(target_prompt) if w.lower() not in have]


class XMGIETask:
    """xMGIE's modules under its total loss (the module docstring says how)."""

    name = NAME

    def __init__(self, model: XMGIEModel, critic: nn.Module, settings: Settings,
                 accelerator=None):
        self.model, self.critic = model, critic
        self.settings = settings
        self.weights = dict(settings.weights)
        self.accelerator = accelerator
        self.kind = settings.model["critic"]["kind"]

    # -- adversarial ---------------------------------------------------------------------
    def generator_adversarial(self, critic: nn.Module, fake: torch.Tensor) -> torch.Tensor:
        if fake.shape[0] == 0:          # no low-noise row in this batch
            return fake.float().sum() * 0.0
        return losses.adversarial_generator(critic(fake), self.kind)

    def critic_loss(self, critic: nn.Module, real: torch.Tensor, fake: torch.Tensor
                    ) -> torch.Tensor:
        if real.shape[0] == 0:
            # still a forward through the (possibly DDP-wrapped) critic, so every process
            # takes part in the gradient reduction
            return critic(real).float().sum() * 0.0
        dtype = next(critic.parameters()).dtype
        logits = critic(torch.cat([real, fake]).to(dtype))
        n = real.shape[0]
        return losses.adversarial_critic(logits[:n], logits[n:], self.kind)

    # -- state ---------------------------------------------------------------------------
    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        m = unwrap(model, XMGIEModel)
        return {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}

    def load_trainable_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        load_trainable_state(unwrap(model, XMGIEModel), state, "this xMGIE run")

    # -- validation ----------------------------------------------------------------------
    def validate(self, model: nn.Module, batches: list[dict[str, Any]]) -> dict[str, float]:
        from ..evaluation import metrics

        m = unwrap(model, XMGIEModel)
        v = self.settings.model["validation"]
        limit = int(v["pairs"])
        edits, targets, sources, masks = [], [], [], []
        with torch.no_grad():
            for batch in batches:
                for i in range(len(batch["id"])):
                    if len(edits) >= limit:
                        break
                    edits.append(self.edit_pair(m, {k: (val[i:i + 1] if torch.is_tensor(val)
                                                        else [val[i]])
                                                    for k, val in batch.items()}))
                    targets.append(batch["target"][i:i + 1].float().cpu())
                    sources.append(batch["source"][i:i + 1].float().cpu())
                    masks.append(batch["mask"][i:i + 1].float().cpu())
        if not edits:
            return {}
        pred, tgt = torch.cat(edits), torch.cat(targets)
        src, msk = torch.cat(sources), torch.cat(masks)
        bg_pred, bg_src = metrics.background(pred, src, msk)
        return {"val_psnr": metrics.finite_mean(metrics.psnr(pred, tgt).tolist()),
                "val_ssim": float(metrics.ssim(pred, tgt).mean()),
                "val_l1": float((pred - tgt).abs().mean()),
                "val_bg_psnr": metrics.finite_mean(metrics.psnr(bg_pred, bg_src).tolist()),
                "val_bg_ssim": float(metrics.ssim(bg_pred, bg_src).mean())}

    def edit_pair(self, m: XMGIEModel, pair: dict[str, Any]) -> torch.Tensor:
        """One pair edited as the pipeline edits with trained modules: inversion of the
        source, the two-branch sampler with the learned PFB, IE and CAM, decode, GB on
        the mask's seam. Returns [1,3,H,W] in 0..1 on the CPU."""
        from ..mgie_core import inversion, sampler
        from ..mgie_core.models.sd import SDModel
        from ..mgie_core.pfb import PFBControl
        v = self.settings.model["validation"]
        dev = m.device
        info = m.sd_info
        sd = SDModel(unet=m.unet, vae=m.vae, text_encoder=m.text_encoder,
                     tokenizer=info.tokenizer, scheduler=info.scheduler, device=dev,
                     dtype=next(m.unet.parameters()).dtype, source=info.source)
        src = pair["source"].to(dev, torch.float32)
        mask = pair["mask"].to(dev, torch.float32)
        source_prompt = pair["source_prompt"][0]
        target_prompt = pair["target_prompt"][0].strip() or pair["instruction"][0]
        m._call = None                        # the training hooks stand aside
        m.controller.clear()
        z0 = m.encode_images(src)
        inv = inversion.invert(sd, z0, source_prompt, method=v["inversion"],
                               steps=int(v["steps"]), guidance_scale=float(v["guidance"]))
        words = _new_words(source_prompt, target_prompt) if pair["target_prompt"][0].strip() \
            else []
        cam = sampler.CAMSettings(in_words=words) if (self.settings.model["cam"] and words) \
            else None
        controls = [IdentityEmbeddingControl(m.ie, m.identity_encoder(),
                                             source=src.permute(0, 2, 3, 1)),
                    PFBControl(alpha=m.pfb, preset=m.preset)]
        try:
            res = sampler.edit(sd, inv, target_prompt, mask=mask[:, 0], cam=cam,
                               controls=controls, keep_reconstruction=False)
        except InputError:
            if cam is None:
                raise
            # a new word the tokenizer does not find as a whole word: edit without CAM
            log.info("validation: CAM words %s not found in %r; edited without CAM", words,
                     target_prompt)
            res = sampler.edit(sd, inv, target_prompt, mask=mask[:, 0], cam=None,
                               controls=controls, keep_reconstruction=False)
        # not pasted into the photo (training pastes): the background metrics then
        # measure what the edit itself kept of it
        return m.seam_blur(m.decode_latents(res.edit), mask).float().cpu()

    # -- export --------------------------------------------------------------------------
    def export(self, model: nn.Module, folder: Path) -> None:
        """``folder`` = the run's ``final/``: the trained PFB weights and IE in the format
        the nodes load (:func:`~xmgie.mgie_core.trained.save_xmgie`) and, with LoRA, the
        UNet adapter in diffusers' LoRA layout under ``unet_lora/``
        (``unet.load_lora_adapter(str(folder / "unet_lora"), prefix=None,
        weight_name="pytorch_lora_weights.safetensors")`` applies it to the base UNet;
        trained.json's ``unet_lora`` names the folder, the file and the adapter's
        settings, null without LoRA)."""
        from ..mgie_core.trained import save_xmgie

        m = unwrap(model, XMGIEModel)
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        extra = {"task": NAME, "base_model": Path(str(m.sd_info.source)).name,
                 "unet_lora": None}
        if self.settings.lora is not None:
            m.unet.save_lora_adapter(str(folder / LORA_FOLDER))
            extra["unet_lora"] = {"folder": LORA_FOLDER, "weight_name": LORA_WEIGHTS,
                                  "layout": "diffusers", **self.settings.lora}
        save_xmgie(folder, m.pfb, m.ie, extra=extra)


def check_config(config) -> Settings:
    """The task's settings of ``config``, checked without loading anything (a caller may
    run this before it touches the data or the run folder)."""
    settings = Settings.from_config(config)
    c = settings.model["critic"]
    data = getattr(config, "data", None)
    resolution = getattr(data, "resolution", None)
    need = min_latent_size(int(c["n_layers"]))
    if resolution is not None and resolution // 8 < need:
        raise TrainConfigError(getattr(config, "source", "config"), "model.critic.n_layers",
                               f"is {c['n_layers']}, whose PatchGAN needs latents of at "
                               f"least {need}x{need} ({need * 8} px), but data.resolution "
                               f"is {resolution}",
                               f"data.resolution >= {need * 8}, or fewer critic layers",
                               "Lower model.critic.n_layers (1 takes 48 px) or raise "
                               "data.resolution.")
    return settings


def build_task(config, accelerator, tiny: bool, models: dict | None = None) -> XMGIETask:
    """The xMGIE task for ``config`` (``models``: already loaded "sd" / "identity" to use
    instead of loading by name)."""
    settings = check_config(config)
    device = torch.device(accelerator.device) if accelerator is not None else torch.device("cpu")
    sd, encoder = _load_models(settings, config, device, tiny, models)
    if models and "sd" in models:
        sd = dataclasses.replace(sd, unet=copy.deepcopy(sd.unet))   # hooks, LoRA go here
    sd.unet.requires_grad_(False)
    sd.vae.requires_grad_(False)
    sd.text_encoder.requires_grad_(False)
    encoder.model.requires_grad_(False)
    if settings.lora is not None:
        _add_lora(sd.unet, settings.lora)
    if getattr(config, "gradient_checkpointing", False):
        sd.unet.enable_gradient_checkpointing()
    with torch.no_grad():   # the embedding's width, from the encoder itself
        id_dim = int(encoder.embed(torch.zeros(1, *encoder.size, 3)).shape[-1])
    pfb = PFBWeights.for_unet(sd.unet, preset=settings.model["pfb"]["preset"],
                              placement=settings.model["pfb"]["placement"])
    try:
        ie = IdentityInjection.for_unet(sd.unet, id_dim, sites=settings.model["ie"]["sites"],
                                        encoder_kind=encoder.kind)
    except InputError as exc:
        raise TrainConfigError(getattr(config, "source", "config"), "model.ie.sites",
                               str(exc), "module names of this UNet, e.g. mid_block, "
                               "up_blocks.1.attentions.0") from exc
    model = XMGIEModel(sd, encoder, pfb, ie, settings).to(device)
    c = settings.model["critic"]
    critic = LatentPatchDiscriminator(in_channels=4, ndf=int(c["ndf"]),
                                      n_layers=int(c["n_layers"]), norm=c["norm"]).to(device)
    return XMGIETask(model, critic, settings, accelerator)
