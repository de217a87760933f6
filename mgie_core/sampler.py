"""Two-branch editing sampler (docs/algorithms.md sections 0, 3, 4, 5), read top to bottom:

  1. prompts -> embeddings; the reconstruction branch starts from the inverted z*_T;
  2. every step, ONE batched UNet call holds every branch and both guidance halves;
     attention hooks (injection, CAM, capture) and feature hooks (PFB) act inside it;
  3. guidance per branch, a DDIM step per branch (direct inversion's offset on the
     source branch), then each control's end-of-step work (latent blending).

The instruction-UNet path (8 channels, InstructPix2Pix / MGIE) is the same loop with
its three-way guidance and an image latent concatenated to the input.

Controls are :class:`~.control.Control` objects chained by the nodes into one list; the
sampler calls their hooks (setup, attn_hooks, before_step, after_step, teardown) at fixed
points of the loop and shares the run's context with them as a :class:`SamplingRun`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import torch

from . import attention, attention_hooks, graph_calls, graphs, host, vae
from .architecture import architecture_of
from .attention import COND, UNCOND, AttnContext, BatchLayout, Branch, Half
from .control import Control, SamplingRun, check_controls
from .diffusion import (
    TOKENS,
    denoise_step,
    encode_prompt,
    instruct_solver,
    make_schedule,
    pack_condition,
    takes_added_condition,
    token_ids,
    unet_eps,
)
from .errors import InputError
from .images import Fit, check_mask
from .inversion import InversionResult
from .models.conditioning import Conditioning
from .models.sd import SDModel
from .plan import EditPlan, find_phrase, from_plan, split_words
from .report import UpdateReport
from .tokens import dropped_text, find_word_tokens, truncation_note

log = logging.getLogger(__name__)

REC, EDIT, REF = Branch.REC, Branch.EDIT, Branch.REF
IMG = Half.IMG   # instruction path: the text-null, image-conditioned guidance row


@dataclasses.dataclass
class CAMSettings:
    """Cross-attention masking. ``in_words``/``out_words``: words of the prompt (or the
    CLIP-encoded instruction) that attend only inside/outside the mask.
    ``whole_condition`` (instruction sampler): the whole condition acts only inside the
    mask and the null condition outside (:class:`attention_hooks.ConditionCAMHook`), for a
    condition without word positions such as MGIE's; always on the logits.
    ``layers`` None: the UNet architecture's CAM layers (``LayerChoices.cam_layers``)."""

    in_words: Sequence[str] = ()
    out_words: Sequence[str] = ()
    mode: str = "logits"
    layers: Sequence[str] | None = None
    whole_condition: bool = False


@dataclasses.dataclass
class EditResult:
    """What a sampler returns. The latents stay on the model's device, so a library
    caller's decode and seam blur never round-trip through the host; the nodes move
    them to the CPU at their outputs (ComfyUI's convention between nodes)."""

    edit: torch.Tensor            # (B,4,h,w) final edit-branch latent, float32, on device
    reconstruction: torch.Tensor | None
    settings: dict
    # Updates the optimising controls applied and skipped in this run.
    report: UpdateReport = dataclasses.field(default_factory=UpdateReport)
    # How the photo was fitted to the model: vae.decode(sd, edit, fit=...) crops it back.
    fit: Fit | None = None


def _finish(run: SamplingRun, controls: Sequence[Control]) -> None:
    """Leave the UNet as it was: no hooks, no context, no patches; let every control
    clean up."""
    run.controller.clear()
    for c in controls:
        c.teardown(run)
    run.report.log(log, "sampler")


def _setup_controls(run: SamplingRun, controls: Sequence[Control],
                    hooks: list[attention.AttnHook]) -> list[attention.AttnHook]:
    """Set every control up (tearing down those already set up if one fails) and return
    the sampler's hooks followed by the controls' own, prepared on the device."""
    done: list[Control] = []
    try:
        for c in controls:
            c.setup(run)
            done.append(c)
            hooks = hooks + list(c.attn_hooks(run))
        hw = _latent_hw(run.latents[EDIT])
        arch = architecture_of(run.sd.unet)
        for h in hooks:        # device-side data now, not in the first step
            h.prepare(run.sd.device, hw, arch)
    except BaseException:
        _finish(run, done)
        raise
    return hooks


def _latent_hw(z: torch.Tensor) -> tuple[int, int]:
    return int(z.shape[-2]), int(z.shape[-1])


def _word_tokens(sd: SDModel, prompt: str, words: Sequence[str], name: str) -> list[int]:
    try:
        return find_word_tokens(sd.tokenizer, prompt, list(words))
    except InputError:
        raise
    except Exception as exc:  # a plain ValueError from the tokenizer helper
        raise InputError(name, str(exc), "words that occur in the prompt") from exc


def _run_unet(run: SamplingRun, groups: list[tuple[BatchLayout, torch.Tensor, torch.Tensor]],
              t: int, i: int) -> torch.Tensor:
    """Call the UNet once per group (one group when batched); return eps rows in the
    order of the concatenated layouts."""
    outs = []
    cache = run.graphs
    for layout, z, emb in groups:
        run.controller.reset_call(AttnContext(i, run.schedule.num_steps, layout,
                                              _latent_hw(z)))
        run.layout = layout
        if cache is not None and cache.active and len(groups) == 1:
            # captured and replayed (graphs.py)
            outs.append(graphs.unet_eps(cache, "sampler", run.sd, z, t, emb, run.controller))
        elif cache is not None and cache.active:
            # unbatched guidance passes PFB's references from one call to the next
            # through Python state: eager
            outs.append(cache.eager("sampler", "unbatched guidance (batched=False)",
                                    lambda z=z, emb=emb: unet_eps(run.sd, z, t, emb), {}))
        else:
            outs.append(unet_eps(run.sd, z, t, emb))
    run.controller.reset_call(None)
    return torch.cat(outs)


def _validate_mask(mask, sd: SDModel, z: torch.Tensor, fit: Fit | None
                   ) -> torch.Tensor | None:
    """The run's mask, checked here once for every caller (the nodes pass it as given):
    [B,H,W], not empty, of the photo's size (then fitted as the photo was, see
    ``images.Fit.mask``), or of the size the model works on, or of the latent."""
    if mask is None:
        return None
    m = check_mask("mask", mask, allow_empty=True)
    hw = tuple(m.shape[1:])
    latent = _latent_hw(z)
    worked = (latent[0] * sd.vae_scale, latent[1] * sd.vae_scale)
    photo = fit.size if fit is not None else worked
    if hw not in (photo, worked, latent):
        raise InputError("mask", f"is {hw[1]}x{hw[0]} pixels but the image is "
                         f"{photo[1]}x{photo[0]}", "a mask of the image's size",
                         "Resize the mask to the image (e.g. with a mask resize node), or "
                         "make it from this image.")
    if fit is not None:
        m = fit.mask(m)
    return check_mask("mask", m, allow_empty=False, allow_full=True)


def _cam_from_plan(cam: CAMSettings | None, plan: EditPlan | None,
                   mask: torch.Tensor | None) -> CAMSettings | None:
    """Two-branch CAM by ``plan.PLAN_RULE``: asked for (``cam`` given) with no in-words,
    it takes the plan's edit words, but only where CAM can act, with a mask (empty
    words otherwise mean "off")."""
    if cam is None or cam.in_words or cam.whole_condition or mask is None:
        return cam
    words = from_plan("cam_in_words", [], plan, "edit_words", "words of the target prompt",
                      required=False)
    return dataclasses.replace(cam, in_words=words) if words else cam


def edit(sd: SDModel, inversion: InversionResult, target_prompt: str, *,
         mask: torch.Tensor | None = None, cam: CAMSettings | None = None,
         controls: Sequence[Control] = (), cross_replace: float = 0.8, self_replace: float = 0.5,
         self_max_res: int | None = None, guidance_scale: float | None = None,
         batched: bool = True, keep_reconstruction: bool = True,
         p2p_mode: str = "refine", plan: EditPlan | None = None,
         target_embedding: torch.Tensor | None = None) -> EditResult:
    """Two-branch prompt-to-prompt editing from an inversion (text-to-image UNet).

    ``mask`` and ``plan`` are the run's edit context (``SamplingRun.mask``/``.plan``):
    every control reads them unless it was given its own. The mask is checked here
    (callers pass it as given) and fitted as the photo was (``inversion.fit``). An empty
    ``target_prompt`` takes the plan's, and CAM settings with no in-words take the plan's
    edit words when there is a mask (``plan.PLAN_RULE``). A target prompt longer than the
    text encoder's window is noted in the result's report with the words it loses.

    ``p2p_mode``: "refine" (default; words may be added or removed: aligned tokens take
    the reconstruction's cross-attention maps, new tokens keep theirs) or "replace" (word
    swaps, the same number of words: every map of the edit comes from the source maps
    through P2P's replacement matrix, see :func:`attention_hooks.replace_mapper`).

    ``self_max_res``: where self-attention is injected; None (default) the
    architecture's levels (latent / 2 and coarser: "32x32 and below" at 512 px on SD 1.x,
    every attention layer on SDXL), a number a map side at SD 1.5's 64x64 latent
    (:class:`attention_hooks.InjectionHook`).

    ``target_embedding`` (a prompt's conditioning shape: (1, 77, D), SDXL's (1, 78, D)
    with its pooled row): the edit branch's condition instead of the target
    prompt's encoding (LayerDiffusion's mixed condition, :mod:`.layered`); the prompt
    still gives the tokens that injection, CAM and the controls' words address."""
    if sd.instruct:
        raise InputError("sd_model", "is an 8-channel instruction model",
                         "the text-to-image model the image was inverted with",
                         "Use the instruction sampler for InstructPix2Pix / MGIE models.")
    target_prompt = from_plan("target_prompt", target_prompt, plan, "target_prompt",
                              "a description of the edited image, e.g. 'a photo of a "
                              "yellow carpet'")
    n = inversion.num_steps
    sch = make_schedule(sd, n)
    if not torch.equal(sch.timesteps, inversion.timesteps):
        raise InputError("inversion", "was made with another schedule", f"{n} DDIM steps")
    scale = inversion.guidance_scale if guidance_scale is None else guidance_scale
    # The inversion's tensors on the device once (a no-op when they are there already):
    # the loop reads one row of each per step and never copies.
    traj = host.place(inversion.latents, sd.device, torch.float32)
    nulls = host.place(inversion.null_embeddings, sd.device, torch.float32) \
        if inversion.null_embeddings is not None else None
    z_T = traj[0]
    fit = inversion.fit
    mask = _validate_mask(mask, sd, z_T, fit)
    cam = _cam_from_plan(cam, plan, mask)

    report = UpdateReport()
    cond_src = encode_prompt(sd, inversion.source_prompt)   # its Invert node said so
    cond_tgt = encode_prompt(sd, target_prompt, "target_prompt", report)
    if target_embedding is not None:
        if tuple(target_embedding.shape) != tuple(cond_tgt.shape):
            raise InputError("target_embedding", f"has shape {tuple(target_embedding.shape)}",
                             f"the shape of a prompt's encoding {tuple(cond_tgt.shape)}")
        cond_tgt = host.place(target_embedding, sd.device, torch.float32)
    empty = encode_prompt(sd, "") if inversion.null_embeddings is None else None
    b = z_T.shape[0]
    controls = check_controls(controls)
    controller = attention.install(sd.unet)
    run = SamplingRun(sd, sch, BatchLayout(()), {REC: z_T.clone(), EDIT: z_T.clone()},
                      controller, mask=mask, inversion=inversion, reference=traj, plan=plan,
                      report=report, fit=fit)

    hooks: list[attention.AttnHook] = []
    if p2p_mode == "refine":
        mapper = attention_hooks.token_alignment(token_ids(sd, inversion.source_prompt),
                                                 token_ids(sd, target_prompt))
    elif p2p_mode == "replace":
        mapper = attention_hooks.replace_mapper(sd.tokenizer, inversion.source_prompt,
                                                target_prompt)
    else:
        raise InputError("p2p_mode", f"is {p2p_mode!r}", "refine or replace")
    cross_steps, self_steps = int(cross_replace * n), int(self_replace * n)
    injection = None
    if cross_steps or self_steps:
        injection = attention_hooks.InjectionHook(mapper, cross_steps, self_steps, self_max_res)
        hooks.append(injection)
    if cam is not None and cam.whole_condition:
        raise InputError("cam", "asks for whole-condition CAM", "CAM words on the two-branch "
                         "sampler", "Whole-condition CAM is for the instruction sampler.")
    if cam is not None and (cam.in_words or cam.out_words):
        if mask is None:
            raise InputError("mask", "is missing", "a mask for cross-attention masking (CAM)")
        hooks.append(attention_hooks.CAMHook(
            mask, _word_tokens(sd, target_prompt, cam.in_words, "cam_in_words"),
            _word_tokens(sd, target_prompt, cam.out_words, "cam_out_words"),
            layers=cam.layers, mode=cam.mode))
    # What latent-optimising controls (MAG, A-STAR, identity) need to re-run the edit
    # branch on their own: prompts, the injection to replay, the sampler's other hooks.
    run.source_prompt, run.target_prompt = inversion.source_prompt, target_prompt
    run.cond_src, run.cond_tgt, run.guidance_scale = cond_src, cond_tgt, scale
    run.injection, run.sampler_hooks = injection, list(hooks)
    controller.hooks = _setup_controls(run, controls, hooks)
    # compile_unet="graphs": the run's UNet calls captured as CUDA graphs where they can be
    run.graphs = graph_calls.for_run(sd, controls)

    rows = ((REC, UNCOND), (EDIT, UNCOND), (REC, COND), (EDIT, COND))
    try:
        with host.progress(n, "editing") as bar:
            for i in range(n):
                run.step = i
                t = sch.t(i)
                null = (nulls[i] if nulls is not None else empty).expand(b, -1, -1)
                run.null = null
                for c in controls:
                    c.before_step(run, i)
                zr, ze = run.latents[REC], run.latents[EDIT]
                z_rows = {REC: zr, EDIT: ze}
                e_rows = {(REC, UNCOND): null, (EDIT, UNCOND): null,
                          (REC, COND): cond_src.expand(b, -1, -1),
                          (EDIT, COND): cond_tgt.expand(b, -1, -1)}
                # unbatched: the conditional half first, so PFB's conditional reference
                # features exist when the unconditional call needs them
                groups = [rows] if batched else [rows[2:], rows[:2]]
                eps = _run_unet(run, [(BatchLayout(g), torch.cat([z_rows[r[0]] for r in g]),
                                       torch.cat([e_rows[r] for r in g])) for g in groups],
                                t, i)
                e = dict(zip([r for g in groups for r in g], eps.split(b)))
                for br in (REC, EDIT):
                    guided = e[(br, UNCOND)] + scale * (e[(br, COND)] - e[(br, UNCOND)])
                    if br == REC and inversion.method == "direct":
                        # step + offset_i, with the offset taken against this very step:
                        # the source branch lands on the stored z*_{t_{i+1}} exactly.
                        run.latents[br] = traj[i + 1]
                    else:
                        run.latents[br] = denoise_step(sch, i, run.latents[br], guided)
                for c in controls:
                    c.after_step(run, i)
                bar.update()
    finally:
        _finish(run, controls)
    return EditResult(run.latents[EDIT],
                      run.latents[REC] if keep_reconstruction else None,
                      {"target_prompt": target_prompt, "guidance_scale": scale,
                       "cross_replace": cross_replace, "self_replace": self_replace,
                       "p2p_mode": p2p_mode, "batched": batched, "steps": n,
                       "inversion": inversion.method},
                      run.report, fit)


def encode_instruction(sd: SDModel, text: str) -> Conditioning:
    """A CLIP-encoded instruction; words past the text encoder's window are logged and
    kept on the condition (``dropped``), so the sampler's report names them too."""
    cond = encode_prompt(sd, text, "instruction").cpu()       # logs the dropped words
    dropped = dropped_text(sd.tokenizer, text) if text.strip() else ""
    return Conditioning(cond, encode_prompt(sd, "").cpu(), text, "clip", dropped=dropped)


WHOLE_CONDITION = "*"


def instruction_cam(conditioning: Conditioning, cam_in_words: str = "",
                    plan: EditPlan | None = None) -> CAMSettings | None:
    """The instruction sampler's CAM from its typed words and the edit plan
    (``plan.PLAN_RULE``: typed words win, empty ones take the plan's).

    ``'*'`` keeps the whole condition inside the mask. Typed words address the CLIP-encoded
    instruction. From a plan: its edit words that occur in a CLIP-encoded instruction,
    else (none of them there, or an MGIE condition, which has no word positions) the
    whole condition. Neither words nor a plan: no CAM (None). CAM needs a mask: the
    instruction sampler node passes the plan here only when it has one."""
    typed = split_words(cam_in_words)
    if typed == [WHOLE_CONDITION]:
        return CAMSettings(whole_condition=True)
    if typed:
        return CAMSettings(typed)
    if plan is None or not plan.edit_words:
        return None
    if conditioning.source == "clip":
        words = [w for w in plan.edit_words if find_phrase(conditioning.text, w)]
        if words:
            return CAMSettings(words)
        log.info("CAM: the plan's edit words %s are not in the instruction %r: the whole "
                 "condition is kept inside the mask", plan.edit_words, conditioning.text)
    return CAMSettings(whole_condition=True)


def _condition_cam_keys(sd: SDModel, cond: torch.Tensor, null: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Whole-condition CAM's conditionings: [cond; null] token rows for the conditional
    rows, [null; null] for the others, and the token count of one condition. SDXL's
    packed conditioning joins its token rows only: each keeps its own pooled row (the
    condition's for the conditional rows), which goes to the time embedding, not to the
    keys."""
    if not takes_added_condition(sd.unet):
        return torch.cat([cond, null], 1), torch.cat([null, null], 1), cond.shape[1]
    n = TOKENS
    return (pack_condition(torch.cat([cond[:, :n], null[:, :n]], 1), cond[:, n]),
            pack_condition(torch.cat([null[:, :n], null[:, :n]], 1), null[:, n]), n)


def edit_instruct(sd: SDModel, image_latent: torch.Tensor, conditioning: Conditioning, *,
                  steps: int = 100, text_scale: float = 7.5, image_scale: float = 1.5,
                  seed: int = 0, mask: torch.Tensor | None = None,
                  source_latent: torch.Tensor | None = None,
                  cam: CAMSettings | None = None, controls: Sequence[Control] = (),
                  batched: bool = True, scheduler: str = "euler_ancestral",
                  plan: EditPlan | None = None, fit: Fit | None = None) -> EditResult:
    """Instruction-UNet sampling (section 0): rows [cond,img], [null,img], [null,0];
    eps = e_u + s_T (e_text - e_img) + s_I (e_img - e_u).

    ``image_latent`` is the VAE posterior mode *without* the scaling factor. With a
    ``source_latent`` (scaled), a reference branch runs on the source latent noised with
    the same noise, giving PFB its reference features and latent blending its target.

    ``scheduler``: "euler_ancestral" (default) is InstructPix2Pix's shipped scheduler,
    which MGIE's demo samples with through diffusers' InstructPix2Pix pipeline: with the
    same seed this sampler gives that pipeline's result (tested), so MGIE and IP2P edits
    match their authors' outputs. "ddim" is deterministic after the initial noise (the
    convention of the inversion-based stages, docs/algorithms.md section 0).

    ``mask`` and ``plan`` are the run's edit context, as in :func:`edit`; ``fit`` is how
    the photo was fitted to the model (:func:`vae.encode_photo`), for the mask and the
    result. CAM settings with no in-words take the plan's by :func:`instruction_cam`
    when there is a mask; typed in-words '*' mean the whole condition.
    :func:`edit_instruct_photo` starts from the photo itself."""
    if not sd.instruct:
        raise InputError("sd_model", "has a 4-channel UNet",
                         "an 8-channel instruction model (InstructPix2Pix or MGIE)",
                         "Load it with the InstructPix2Pix or MGIE UNet loader.")
    gen = torch.Generator("cpu").manual_seed(int(seed))
    solver = instruct_solver(scheduler, sd, steps, gen)
    sch = solver.schedule
    b = image_latent.shape[0]
    img = image_latent.to(sd.device, torch.float32)
    noise = torch.randn(img.shape, generator=gen).to(sd.device)
    cond = conditioning.cond.to(sd.device).float().expand(b, -1, -1)
    null = conditioning.null.to(sd.device).float().expand(b, -1, -1)
    mask = _validate_mask(mask, sd, img, fit)
    if cam is not None and list(cam.in_words) == [WHOLE_CONDITION]:
        cam = dataclasses.replace(cam, in_words=(), whole_condition=True)
    if cam is not None and not cam.in_words and not cam.whole_condition and mask is not None:
        cam = instruction_cam(conditioning, "", plan) or cam
    controls = check_controls(controls)
    controller = attention.install(sd.unet)

    reference = None
    if source_latent is not None:
        z0 = source_latent.to(sd.device, torch.float32)
        reference = torch.stack([solver.noised(z0, noise, i) for i in range(steps + 1)])
    run = SamplingRun(sd, sch, BatchLayout(()), {EDIT: solver.start(noise)}, controller,
                      mask=mask, reference=reference, plan=plan, fit=fit)
    if conditioning.dropped:
        run.report.note(truncation_note("instruction", conditioning.dropped,
                                        int(getattr(sd.tokenizer, "model_max_length", 77))))
    if reference is not None:
        run.latents[REF] = reference[0]

    hooks: list[attention.AttnHook] = []
    if cam is not None and cam.whole_condition:
        if mask is None:
            raise InputError("mask", "is missing", "a mask for cross-attention masking (CAM)")
        # The conditional rows attend to [cond; null], the others to [null; null] (the
        # same attention as [null]): see attention_hooks.ConditionCAMHook.
        cond, null, n_tokens = _condition_cam_keys(sd, cond, null)
        hooks.append(attention_hooks.ConditionCAMHook(mask, n_tokens, layers=cam.layers))
    elif cam is not None and (cam.in_words or cam.out_words):
        if mask is None:
            raise InputError("mask", "is missing", "a mask for cross-attention masking (CAM)")
        if conditioning.source != "clip":
            raise InputError("cam_in_words", f"names words, but this {conditioning.source} "
                             "condition has no word positions (MGIE's condition is its "
                             "visual tokens through the edit head, not the encoded text)",
                             "whole-condition CAM ('*' in the node) or a CLIP-encoded "
                             "instruction", "Use '*' to keep the whole condition inside "
                             "the mask.")
        text = conditioning.text
        hooks.append(attention_hooks.CAMHook(
            mask, _word_tokens(sd, text, cam.in_words, "cam_in_words"),
            _word_tokens(sd, text, cam.out_words, "cam_out_words"),
            layers=cam.layers, mode=cam.mode))
    controller.hooks = _setup_controls(run, controls, hooks)

    branches = [EDIT] + ([REF] if reference is not None else [])
    halves = (COND, IMG, UNCOND)     # the conditional half first (PFB's reference rows)
    rows = tuple((br, h) for h in halves for br in branches)
    zeros = torch.zeros_like(img)
    timesteps = solver.timesteps
    try:
        with host.progress(steps, "instruction editing") as bar:
            for i in range(steps):
                run.step = i
                t = timesteps[i]
                for c in controls:
                    c.before_step(run, i)
                if reference is not None:
                    run.latents[REF] = run.reference_at(i)
                scaled = {br: solver.model_input(run.latents[br], i) for br in branches}
                inputs = {(br, h): torch.cat([scaled[br], zeros if h == UNCOND else img], 1)
                          for br, h in rows}
                embs = {(br, h): cond if h == COND else null for br, h in rows}
                groups = [rows] if batched else [tuple(r for r in rows if r[1] == h)
                                                 for h in halves]
                eps = _run_unet(run, [(BatchLayout(g), torch.cat([inputs[r] for r in g]),
                                       torch.cat([embs[r] for r in g])) for g in groups], t, i)
                order = [r for g in groups for r in g]
                e = dict(zip(order, eps.split(b)))
                eu, ei, et = e[(EDIT, UNCOND)], e[(EDIT, IMG)], e[(EDIT, COND)]
                guided = eu + text_scale * (et - ei) + image_scale * (ei - eu)
                run.latents[EDIT] = solver.step(run.latents[EDIT], guided, i)
                for c in controls:
                    c.after_step(run, i)
                bar.update()
    finally:
        _finish(run, controls)
    return EditResult(run.latents[EDIT], None,
                      {"steps": steps, "text_scale": text_scale, "image_scale": image_scale,
                       "seed": seed, "batched": batched, "conditioning": conditioning.source,
                       "scheduler": scheduler},
                      run.report, fit)


def edit_instruct_photo(sd: SDModel, image: torch.Tensor, conditioning: Conditioning, *,
                        fit: str = "pad", **kwargs) -> EditResult:
    """:func:`edit_instruct` from a photo (IMAGE [1,H,W,3] in 0..1): checked, fitted to
    the model's size step by ``fit`` (``images.FITS``), encoded, and sampled with its
    latent as both the image condition and the reference branch's source. Decode the
    result with ``vae.decode(sd, result.edit, fit=result.fit)`` to get the photo's size."""
    lat = vae.encode_photo(sd, image, fit)
    unscaled = lat.samples / sd.vae.config.scaling_factor
    return edit_instruct(sd, unscaled, conditioning, source_latent=lat.samples, fit=lat.fit,
                         **kwargs)
