"""Benchmark full masked edits: inversion + two-branch sampling (CAM + PFB +
MAG) + VAE decode + GB blur, in three call patterns, with random-weight models.

    python bench/edit_bench.py --size sd15 --device cuda --out results.json   # the GPU run
    python bench/edit_bench.py --size tiny --steps 4 --limit 1                # CPU smoke run
    python bench/edit_bench.py --size sdxl --device cuda --modes b,c --out sdxl.json  # SDXL

Modes (one full edit per example each; settings in ``MODES``):
  a  reference call pattern: null-text inversion (10 inner iterations), two separate
     guided UNet calls per step (sampler ``batched=False``), MAG 15 iterations x 25/50
     steps recomputing the reconstruction branch every iteration (``cache_source=False``)
     with a full forward for the loss (``truncate=False``);
  b  our fast default: direct inversion (no optimisation), one batched UNet call per step,
     MAG with ``FAST_MAG`` (15 iterations x the first 8/50 steps, cached source, truncated
     forward; see bench/mag_frontier.py);
  c  seed-faithful: null-text (10 inner) + MAG 15 x 25/50, with our batching, caching and
     truncation.

Like with like. Modes a and c run the same settings and give the same edit;
they share ONE null-text inversion per example (timed and counted once, reported for
both), so a / c measures only the sampler's call pattern (reference against ours). Two
ratios come out of one run: ``a_over_c`` (whole edit, and sampling alone) and
``a_over_b`` (the reference against our fast default). ``same_output_a_c`` is the largest
difference between a's and c's edited latents and images (float noise of batching and
truncation, ~1e-5).

Host synchronisations: per mode, one untimed edit of ``--sync-steps`` steps
runs under bench/syncs.py's counter; ``syncs`` in the JSON gives per loop stage the
largest count in one step and the totals by kind, and the table's ``syncs/step`` column
the largest per step of the inversion loops / of the sampling loop. The fast path counts
0 / 0; null-text reads once per inner iteration (on the CPU the counter also sees Adam's
host step counter: see bench/RESULTS.md).

Device residency: the decoded image stays on the device into the GB blur
(``vae.decode(to_cpu=False)``), the inversion's trajectory stays on the device, and the
blur's mask is put there once per example, before timing.

``--compile {default,reduce-overhead}`` compiles the UNet's compute modules in place
(mgie_core/models/compile.py); the warm-up edits compile every shape, and one mode-b edit
is compared against the same edit made eagerly before compiling (``compile_check``).
``--compile graphs`` captures whole UNet calls as CUDA graphs instead
(mgie_core/graphs.py): every edit captures its graphs in its first calls (their
warm-up passes are not counted as the edit's passes; ``graphs`` in the JSON counts
replays, captures and eager calls per call site), replayed passes are counted through
the graphs' observer, and ``compile_check`` compares a graphed mode-b edit with the
eager one.

Models: ``--size sd15`` builds UNet2DConditionModel / AutoencoderKL / CLIPTextModel from
the shipped SD 1.5 configs (mgie_core/configs/sd15) with random initialisation -- the same
compute and memory as real weights -- at 512 px; ``--size tiny`` uses the tiny random
models of mgie_core/tiny at 128 px (seconds on a CPU). The tokenizer is the offline tiny
CLIP tokenizer in both cases (its ids stay below SD's 49408). ``--size sdxl`` builds the
SDXL UNet, VAE and both text encoders (CLIPTextModel, CLIPTextModelWithProjection) from
the shipped SDXL configs (mgie_core/configs/sdxl) the same way, at 1024 px, with that
tokenizer for both encoders; ``--size tiny_sdxl`` builds the tiny SDXL of
mgie_core/tiny at 128 px (the SDXL code paths in seconds on a CPU). Every UNet call of
the bench goes through the pack's conditioning (``diffusion.split_condition``: SDXL's
pooled embedding and time ids).

Memory. On CUDA every stage's peak allocated and reserved memory is recorded
(``peak_vram_gib``, ``peak_reserved_gib`` per mode): the number to hold against a card's
size. bench/sdxl_memory.py estimates SDXL's at 1024 px without a GPU (an estimate).

Counting. UNet forwards: a forward PRE-hook on the UNet module (a post-hook would miss the
forwards that MAG's truncation stops early; a post-hook counts the completed ones, the
difference is reported as ``truncated``). UNet backwards: in the pre-hook, when grad is
enabled and the latent or the text embedding requires grad, those inputs are passed
through an identity autograd Function whose backward increments the counter: exactly one
count per backward pass that reaches the UNet's inputs (MAG: gradient w.r.t. the latent;
null-text: w.r.t. the unconditional embedding, which a backward hook on ``conv_in`` would
not see). Only inputs that already require grad are tapped, so no extra gradient work.

Timing: every stage is bracketed by ``torch.cuda.synchronize()`` on CUDA; one short
warm-up edit (all code paths) runs before anything is timed. The UNet pass time (batch 4,
warm, median) is measured in the same run, plus batch 1 and 2 forwards and a batch-1
forward+backward for a cost model (see ``overhead`` in the JSON and bench/RESULTS.md).
Ctrl-C stops the run and still prints and writes what was measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def _import_xmgie():
    """The repo root is the package ``xmgie``. When the program is a bench script (this
    one, or another script of bench/ that imports it, e.g. train_gpu_memory.py), the
    bench imports THIS checkout under that name: on a bare checkout (e.g. a GPU machine
    where it is not pip-installed), or where another copy is installed (an editable
    install of another worktree), through a symlink in a temporary folder placed first on
    the path. Loaded as a module by another program (tests/test_bench.py), it uses the
    ``xmgie`` its caller already has."""
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    here = Path(__file__).resolve().parent
    bench_script = main is not None and Path(main).resolve().parent == here
    try:
        import xmgie
        if not bench_script or Path(xmgie.__file__).resolve().parent == REPO:
            return
    except ImportError:
        pass
    for name in [m for m in sys.modules if m == "xmgie" or m.startswith("xmgie.")]:
        del sys.modules[name]
    tmp = Path(tempfile.mkdtemp(prefix="xmgie-path-"))
    (tmp / "xmgie").symlink_to(REPO, target_is_directory=True)
    sys.path.insert(0, str(tmp))


_import_xmgie()

from xmgie.mgie_core import (  # noqa: E402
    blur,
    diffusion,
    graphs,
    vae,
)
from xmgie.mgie_core.inversion import invert  # noqa: E402
from xmgie.mgie_core.mag import FAST_SETTINGS, MAGControl  # noqa: E402
from xmgie.mgie_core.models.compile import COMPILE_MODES, compile_unet  # noqa: E402
from xmgie.mgie_core.models.sd import CONFIG_DIR, SDModel, ddim_scheduler  # noqa: E402
from xmgie.mgie_core.pfb import PFBControl  # noqa: E402
from xmgie.mgie_core.sampler import CAMSettings, edit  # noqa: E402

# The sync counter lives beside this file (a diagnostic, not part of the library). Run as
# a script its folder is on the path already; loaded as a module (the tests), it is not.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import syncs  # noqa: E402

ENV_EXAMPLES = "XMGIE_BENCH_EXAMPLES"
DEFAULT_EXAMPLES = REPO / "example_data"

GUIDANCE = 7.5
NULL_TEXT_INNER = 10                                   # official null-text default
REFERENCE_MAG = dict(iterations=15, opt_fraction=25 / 50, truncate=False, cache_source=False)
SEED_MAG = dict(iterations=15, opt_fraction=25 / 50, truncate=True, cache_source=True)
# Our fast default (mag.FAST_SETTINGS, chosen on bench/mag_frontier.py's frontier): the
# official 15 updates per optimised step in the first 8 of 50 steps, with the cached source
# and the truncated loss forward: 8 x 15 = 120 truncated forward+backward pairs instead of
# 375 (5 x 25 = 125 before, five times farther from the full edit).
FAST_MAG = dict(FAST_SETTINGS, truncate=True, cache_source=True)

MODES = {
    "a": dict(label="reference", method="null_text", batched=False, mag=REFERENCE_MAG),
    "b": dict(label="fast", method="direct", batched=True, mag=FAST_MAG),
    "c": dict(label="seed-faithful", method="null_text", batched=True, mag=SEED_MAG),
}
# The fp16 edit's tolerance the pack states (tests/test_fast_paths.py: an fp16 edit
# within 6% relative L2 of the fp32 one); compiled and graphed edits are held to it.
FP16_EDIT_TOLERANCE = 0.06
STAGES = ("encode", "inversion", "sampling", "decode", "gb")
COUNTED = ("inversion", "sampling")
# Image side of each model size (px)
SIZES = {"tiny": 128, "sd15": 512, "tiny_sdxl": 128, "sdxl": 1024}
SDXL_CONFIG_DIR = CONFIG_DIR.parent / "sdxl"


# --- models -----------------------------------------------------------------------------

def _tokenizer():
    from transformers import CLIPTokenizer

    from xmgie.mgie_core.tiny.tokenizers import write_clip_tokenizer

    folder = Path(tempfile.mkdtemp(prefix="xmgie-bench-tok-"))
    write_clip_tokenizer(folder)
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def _text_config(folder: Path, sub: str):
    from transformers import CLIPTextConfig

    cfg = json.loads((folder / sub / "config.json").read_text())
    return CLIPTextConfig(**{k: v for k, v in cfg.items()
                             if not k.startswith("_") and k not in ("architectures",
                                                                    "torch_dtype")})


def build_model(size: str, device: torch.device, dtype: torch.dtype) -> SDModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    folder = SDXL_CONFIG_DIR if size == "sdxl" else CONFIG_DIR
    sched_cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    text_2 = tokenizer_2 = None
    if size == "tiny":
        from xmgie.mgie_core.tiny import sd as tiny

        unet, vae_m, text = tiny.build()
    elif size == "tiny_sdxl":
        from xmgie.mgie_core.tiny import sdxl as tiny_sdxl

        parts = tiny_sdxl.build()
        unet, vae_m, text, text_2 = (parts[k] for k in ("unet", "vae", "text_encoder",
                                                         "text_encoder_2"))
        tokenizer_2 = _tokenizer()
        sched_cfg = dict(tiny_sdxl.EULER_SETTINGS)
    else:
        cfg = lambda sub: json.loads((folder / sub / "config.json").read_text())  # noqa
        # Initialise on the target device: random init of 0.9 (SD 1.5) or 3.5 (SDXL)
        # billion parameters on a CPU is slow.
        with torch.device(device):
            unet = UNet2DConditionModel.from_config(cfg("unet"))
            vae_m = AutoencoderKL.from_config(cfg("vae"))
            text = CLIPTextModel(_text_config(folder, "text_encoder"))
            if size == "sdxl":
                text_2 = CLIPTextModelWithProjection(_text_config(folder, "text_encoder_2"))
                tokenizer_2 = _tokenizer()
    for m in (unet, vae_m, text, text_2):
        if m is not None:
            m.requires_grad_(False).eval().to(device=device, dtype=dtype)
    return SDModel(unet=unet, vae=vae_m, text_encoder=text, tokenizer=_tokenizer(),
                   scheduler=ddim_scheduler(sched_cfg), device=device, dtype=dtype,
                   source=f"random {size}", text_encoder_2=text_2, tokenizer_2=tokenizer_2)


def _short(mode: dict) -> dict:
    """A mode with 2 MAG updates per optimised step (warm-up and check edits)."""
    return dict(mode, mag=dict(mode["mag"], iterations=2))


# --- counting -----------------------------------------------------------------------------

class _Tap(torch.autograd.Function):
    """Identity on the UNet's grad-requiring inputs; counts one backward pass."""

    @staticmethod
    def forward(ctx, counter, *xs):
        ctx.counter = counter
        return tuple(x.clone() for x in xs)

    @staticmethod
    def backward(ctx, *grads):
        ctx.counter.backward()
        return (None, *grads)


class PassCounter:
    """UNet forwards (started / completed, by batch size) and backwards, per stage."""

    def __init__(self, unet):
        self.stage = None
        self.counts: dict[str, dict] = {}
        self._handles = [
            unet.register_forward_pre_hook(self._pre, with_kwargs=True),
            unet.register_forward_hook(self._post),
        ]
        graphs.OBSERVERS.append(self._replayed)

    def _slot(self):
        return self.counts.setdefault(self.stage, {"fwd": 0, "bwd": 0, "completed": 0,
                                                   "fwd_by_batch": {}})

    def _replayed(self, site, batch, backward, completed):
        """A replayed CUDA graph (``--compile graphs``): a pass no module hook sees."""
        if self.stage is None:
            return
        s = self._slot()
        s["fwd"] += 1
        s["fwd_by_batch"][str(batch)] = s["fwd_by_batch"].get(str(batch), 0) + 1
        s["completed"] += bool(completed)
        s["bwd"] += bool(backward)

    def _pre(self, module, args, kwargs):
        # a graph's warm-up and capture are not passes of the edit (counted apart:
        # ``graphs`` in the JSON), and the tap must not enter a captured graph
        if self.stage is None or graphs.capturing():
            return None
        s = self._slot()
        sample = args[0] if args else kwargs["sample"]
        s["fwd"] += 1
        b = str(int(sample.shape[0]))
        s["fwd_by_batch"][b] = s["fwd_by_batch"].get(b, 0) + 1
        if not torch.is_grad_enabled():
            return None
        ehs = kwargs.get("encoder_hidden_states")
        if not (sample.requires_grad or (ehs is not None and ehs.requires_grad)):
            return None
        if args:
            args = list(args)
        if sample.requires_grad and ehs is not None and ehs.requires_grad:
            sample, ehs = _Tap.apply(self, sample, ehs)
        elif sample.requires_grad:
            (sample,) = _Tap.apply(self, sample)
        else:
            (ehs,) = _Tap.apply(self, ehs)
        if args:
            args[0] = sample
        else:
            kwargs["sample"] = sample
        kwargs["encoder_hidden_states"] = ehs
        return tuple(args), kwargs

    def _post(self, module, args, output):
        if self.stage is not None and not graphs.capturing():
            self._slot()["completed"] += 1

    def backward(self):
        if self.stage is not None:
            self._slot()["bwd"] += 1

    def remove(self):
        for h in self._handles:
            h.remove()
        if self._replayed in graphs.OBSERVERS:
            graphs.OBSERVERS.remove(self._replayed)


def _finish_counts(raw: dict) -> dict:
    return {st: {"fwd": c["fwd"], "bwd": c["bwd"], "truncated": c["fwd"] - c["completed"],
                 "fwd_by_batch": dict(sorted(c["fwd_by_batch"].items()))}
            for st, c in raw.items()}


def theoretical_counts(mode: dict, steps: int) -> dict:
    """UNet passes of one full edit, assuming null-text never stops early (its early stop
    at loss < 1e-5 + 2e-5 i, or a non-finite gradient, would lower both of its numbers).

      DDIM trajectory                 N forwards (every method)
      null-text, per step             1 conditional forward (no grad), K inner forward +
                                      backward pairs, 1 guided forward (batch 2)
      sampler                         N batch-4 forwards (batched) or 2N batch-2 (not)
      MAG, per optimised step         I edit-row forward + backward pairs, and the source
                                      row once (cached) or I times (cache_source=False);
                                      truncation stops those forwards early (same count)
    """
    n, mag = steps, mode["mag"]
    n_opt, iters = int(round(mag["opt_fraction"] * n)), mag["iterations"]
    inv_fwd, inv_bwd = n, 0
    if mode["method"] == "null_text":
        inv_fwd += n * (1 + NULL_TEXT_INNER + 1)
        inv_bwd = n * NULL_TEXT_INNER
    src = n_opt if mag["cache_source"] else n_opt * iters
    edit_rows = n_opt * iters
    samp_fwd = (n if mode["batched"] else 2 * n) + src + edit_rows
    return {"inversion": {"fwd": inv_fwd, "bwd": inv_bwd, "truncated": 0},
            "sampling": {"fwd": samp_fwd, "bwd": edit_rows,
                         "truncated": src + edit_rows if mag["truncate"] else 0}}


# --- timing -------------------------------------------------------------------------------

def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device):
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


def _peak_reserved(device):
    return torch.cuda.max_memory_reserved(device) / 2 ** 30 if device.type == "cuda" else None


def _median_time(fn, device, warmup: int, repeat: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _condition(sd: SDModel, batch: int, g: torch.Generator) -> torch.Tensor:
    """A random conditioning of the model's layout (SDXL: the packed 77 token rows and
    the pooled row), in the model's dtype on its device."""
    e = diffusion.encode_prompt(sd, "")
    return torch.randn(batch, *e.shape[1:], generator=g).to(sd.device, sd.dtype)


def _unet(sd: SDModel, z, t, e, ids=None) -> torch.Tensor:
    """One UNet call with the conditioning unpacked as every stage unpacks it."""
    tokens, added = diffusion.split_condition(sd, e, tuple(z.shape[-2:]), ids)
    return sd.unet(z, t, encoder_hidden_states=tokens, added_cond_kwargs=added,
                   return_dict=False)[0]


def unet_pass_times(sd: SDModel, latent_hw: int, warmup: int, repeat: int) -> dict:
    """Warm UNet passes on random data (never zeros), in the same state the sampler uses
    (controlled attention processors installed, no hooks active)."""
    from xmgie.mgie_core import attention

    attention.install(sd.unet)
    dev = sd.device
    g = torch.Generator("cpu").manual_seed(1)
    out = {}
    for b in (1, 2, 4):
        z = torch.randn(b, 4, latent_hw, latent_hw, generator=g).to(dev, sd.dtype)
        e = _condition(sd, b, g)
        t = torch.full((b,), 501, device=dev, dtype=torch.long)
        with torch.no_grad():
            out[f"fwd_b{b}_ms"] = 1e3 * _median_time(
                lambda z=z, t=t, e=e: _unet(sd, z, t, e), dev, warmup, repeat)
    z = torch.randn(1, 4, latent_hw, latent_hw, generator=g).to(dev, sd.dtype)
    e = _condition(sd, 1, g)
    t = torch.full((1,), 501, device=dev, dtype=torch.long)

    def fwd_bwd():
        zv = z.detach().requires_grad_(True)
        y = _unet(sd, zv, t, e)
        torch.autograd.grad(y.float().square().mean(), zv)

    out["fwd_bwd_b1_ms"] = 1e3 * _median_time(fwd_bwd, dev, warmup, repeat)
    return out


def graphed_pass_times(sd: SDModel, latent_hw: int, warmup: int, repeat: int) -> dict | None:
    """The same passes as :func:`unet_pass_times`, each captured once as a CUDA graph
    and replayed (``--compile graphs``; None where nothing can be captured): what a
    replayed call costs, input copies and output clones included."""
    cache = graphs.for_run(sd)
    if not cache.active:
        return None
    dev = sd.device
    g = torch.Generator("cpu").manual_seed(1)
    out = {}
    ids = diffusion.time_ids(sd, (latent_hw, latent_hw))     # made outside the capture

    def fwd(z, t, e):
        return _unet(sd, z, t, e, ids)

    def fwd_bwd(z, t, e):
        y = _unet(sd, z, t, e, ids)
        return torch.autograd.grad(y.float().square().mean(), z)[0]

    for b in (1, 2, 4):
        inputs = {"z": torch.randn(b, 4, latent_hw, latent_hw, generator=g).to(dev, sd.dtype),
                  "t": torch.full((b,), 501, device=dev, dtype=torch.long),
                  "e": _condition(sd, b, g)}
        with torch.no_grad():
            out[f"fwd_b{b}_ms"] = 1e3 * _median_time(
                lambda inputs=inputs: cache.call("pass", ("fwd",), fwd, inputs), dev,
                warmup, repeat)
    inputs = {"z": torch.randn(1, 4, latent_hw, latent_hw, generator=g).to(dev, sd.dtype)
              .requires_grad_(True), "t": torch.full((1,), 501, device=dev, dtype=torch.long),
              "e": _condition(sd, 1, g)}
    out["fwd_bwd_b1_ms"] = 1e3 * _median_time(
        lambda: cache.call("pass", ("fwd_bwd",), fwd_bwd, inputs), dev, warmup, repeat)
    out["eager_calls"] = cache.stats.get("pass.eager", 0)    # a capture that fell back
    return out


def cost_model_s(counts: dict, passes: dict) -> float:
    """Seconds the counted passes cost at the measured warm pass times (backward = the
    batch-1 forward+backward minus the forward; truncated forwards counted as full)."""
    t = 0.0
    for b, n in counts["fwd_by_batch"].items():
        key = f"fwd_b{b}_ms"
        per = passes[key] if key in passes else passes["fwd_b1_ms"] * int(b)
        t += n * per
    t += counts["bwd"] * max(passes["fwd_bwd_b1_ms"] - passes["fwd_b1_ms"], 0.0)
    return t / 1e3


# --- data -----------------------------------------------------------------------------------

def load_examples(folder: Path, size: int, limit: int | None):
    manifest = json.loads((folder / "manifest.json").read_text())
    out = []
    for ex in manifest["examples"][:limit]:
        img = np.asarray(Image.open(folder / ex["image"]).convert("RGB")
                         .resize((size, size), Image.BICUBIC))
        msk = np.asarray(Image.open(folder / ex["mask"]).convert("L")
                         .resize((size, size), Image.NEAREST))
        out.append(dict(ex, image_t=torch.from_numpy(img.copy()).float()[None] / 255,
                        mask_t=(torch.from_numpy(msk.copy()).float()[None] / 255 > 0.5).float()))
    return out


# --- one full edit ------------------------------------------------------------------------

class _Stages:
    """Times (synchronised on CUDA), peak-memory segments and the pass counter's stage."""

    def __init__(self, device, counter: PassCounter | None):
        self.device, self.counter = device, counter
        self.times: dict[str, float] = {}
        self.peaks: dict[str, float | None] = {}
        self.reserved: dict[str, float | None] = {}

    @contextlib.contextmanager
    def __call__(self, name: str, peak_group: str | None):
        counter, dev = self.counter, self.device
        if counter is not None:
            counter.stage = name if name in COUNTED else None
        if peak_group is not None:
            _peak_reset(dev)
        _sync(dev)
        t = time.perf_counter()
        try:
            yield
        finally:
            _sync(dev)
            self.times[name] = time.perf_counter() - t
            if counter is not None:
                counter.stage = None
            if peak_group is not None:
                for store, p in ((self.peaks, _peak(dev)), (self.reserved, _peak_reserved(dev))):
                    old = store.get(peak_group)
                    store[peak_group] = p if old is None or p is None else max(old, p)


def encode_and_invert(sd: SDModel, ex: dict, method: str, steps: int,
                      counter: PassCounter | None):
    """Encode and invert: (latents, inversion, _Stages). Modes a and c run this once per
    example and share the result (the same null-text inversion)."""
    st = _Stages(sd.device, counter)
    with st("encode", "encode"):
        lat = vae.encode(sd, ex["image_t"])
    with st("inversion", "diffusion"):
        inv = invert(sd, lat.samples, ex["source_prompt"], method, steps, GUIDANCE,
                     NULL_TEXT_INNER, image_size=lat.image_size)
    return lat, inv, st


def sample_decode_blur(sd: SDModel, ex: dict, mode: dict, inv, st: _Stages):
    """Two-branch sampling with CAM, PFB and MAG, decode, GB seam blur; the decoded
    image stays on the device into the blur (``vae.decode(to_cpu=False)``). Returns the
    edit latent, the blurred image and MAG's own pass report."""
    mask = ex["mask_t"]
    mag = MAGControl(mask, list(ex["edit_words"]), **mode["mag"])
    with st("sampling", "diffusion"):
        res = edit(sd, inv, ex["target_prompt"], mask=mask,
                   cam=CAMSettings(in_words=list(ex["edit_words"])),
                   controls=[PFBControl(mask, preset="object"), mag],
                   batched=mode["batched"], keep_reconstruction=False)
    with st("decode", "post"):
        image = vae.decode(sd, res.edit, to_cpu=False)
    with st("gb", "post"):
        out = blur.gb_blur(image, ex["mask_dev"])
    return res.edit, out, dict(getattr(mag, "passes", {}))


def full_edit(sd: SDModel, ex: dict, mode: dict, steps: int, counter: PassCounter | None,
              shared=None):
    """One full edit; ``shared``: (latents, inversion, stages) of an inversion made for
    another mode with the same method (its times and peaks are reported for this mode
    too). Returns (stage seconds, peaks in GiB, MAG passes, edit latent, image, the
    inversion's (latents, inversion, stages), peaks reserved by the allocator in GiB)."""
    if shared is None:
        shared = encode_and_invert(sd, ex, mode["method"], steps, counter)
    lat, inv, inv_stages = shared
    st = _Stages(sd.device, counter)
    st.times.update(inv_stages.times)
    st.peaks.update(inv_stages.peaks)
    st.reserved.update(inv_stages.reserved)
    z, image, mag_passes = sample_decode_blur(sd, ex, mode, inv, st)
    st.times["total"] = sum(st.times[s] for s in STAGES)
    return st.times, dict(st.peaks), mag_passes, z, image, shared, dict(st.reserved)


def sync_counts(sd: SDModel, ex: dict, mode: dict, steps: int) -> dict:
    """Host synchronisations of one full edit at ``steps`` steps, per stage and step
    (bench/syncs.py; untimed: the counter slows every operation down). Stages: the
    progress bars of the loops ("DDIM inversion", "null-text inversion", "editing") and
    "outside" (encode, setup, decode, GB, reading the run's report)."""
    with syncs.SyncCounter(device=sd.device) as counter:
        full_edit(sd, ex, mode, steps, None)
    out = {}
    for name, s in counter.summary().items():
        out[name] = {"steps": s["steps"], "max_per_step": s["max_per_step"],
                     "total": s["total"], "by_kind": s["by_kind"]}
    return out


# --- report ---------------------------------------------------------------------------------

def _fmt(x, spec=".2f"):
    return "n/a" if x is None else format(x, spec)


def _loop_syncs(m: dict) -> str:
    """Max host syncs in one step of the inversion loops / of the sampling loop."""
    sc = m.get("syncs") or {}
    inv = max([sc.get(k, {}).get("max_per_step", 0)
               for k in ("DDIM inversion", "null-text inversion")] or [0])
    return f"{inv} / {sc.get('editing', {}).get('max_per_step', 0)}" if sc else "n/a"


def markdown_table(results: dict) -> str:
    lines = ["| mode | edits | encode s | inversion s | sampling s | decode s | gb s | "
             "total s | UNet fwd (trunc) | UNet bwd | = theory | overhead inv / samp | "
             "syncs/step inv / samp | peak VRAM GiB (diffusion / all) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, m in results["modes"].items():
        if not m.get("per_example"):
            continue
        t, c = m["mean_s"], m["counts"]
        fwd = c["inversion"]["fwd"] + c["sampling"]["fwd"]
        trunc = c["inversion"]["truncated"] + c["sampling"]["truncated"]
        bwd = c["inversion"]["bwd"] + c["sampling"]["bwd"]
        ov = m["overhead"]
        lines.append(
            f"| {key} {m['label']} | {len(m['per_example'])} | {t['encode']:.3f} | "
            f"{t['inversion']:.3f} | {t['sampling']:.3f} | {t['decode']:.3f} | {t['gb']:.3f} | "
            f"{t['total']:.3f} | {fwd} ({trunc}) | {bwd} | "
            f"{'yes' if m['counts_match_theory'] else 'NO'} | "
            f"{_fmt(ov['inversion']['model'])} / {_fmt(ov['sampling']['model'])} | "
            f"{_loop_syncs(m)} | "
            f"{_fmt(m['peak_vram_diffusion_gib'])} / {_fmt(m['peak_vram_gib'])} |")
    reserved = {k: m.get("peak_reserved_gib") for k, m in results["modes"].items()
                if m.get("peak_reserved_gib") is not None}
    if reserved:
        lines.append("")
        lines.append("peak reserved by the allocator, GiB (what the card must hold): " + "; ".join(
            f"{k} {v:.2f}" for k, v in reserved.items()))
    p = results.get("unet_pass", {})
    if p:
        lines.append("")
        lines.append(f"UNet pass (warm, median): batch 4 {p['fwd_b4_ms']:.2f} ms; batch 2 "
                     f"{p['fwd_b2_ms']:.2f} ms; batch 1 {p['fwd_b1_ms']:.2f} ms; batch 1 "
                     f"forward+backward {p['fwd_bwd_b1_ms']:.2f} ms")
    gp = results.get("graphed_pass")
    if gp:
        lines.append(f"UNet pass replayed as a CUDA graph (median): batch 4 "
                     f"{gp['fwd_b4_ms']:.2f} ms; batch 2 {gp['fwd_b2_ms']:.2f} ms; batch 1 "
                     f"{gp['fwd_b1_ms']:.2f} ms; batch 1 forward+backward "
                     f"{gp['fwd_bwd_b1_ms']:.2f} ms"
                     + (f" (eager calls: {gp['eager_calls']})" if gp["eager_calls"] else ""))
    r = results.get("ratios", {})
    if r.get("a_over_c") is not None:
        same = results.get("same_output_a_c") or {}
        # the same edit up to float noise; on a GPU the two call patterns run other
        # kernels (batch sizes, TF32 convolutions) and a random-weight UNet amplifies
        # their rounding step by step (bench/RESULTS.md, "GPU")
        lines.append(f"a / c (reference call pattern / ours, same settings, same null-text "
                     f"inversion; output difference: max |latent diff| "
                     f"{_fmt(same.get('max_abs_latent'), '.1e')}): "
                     f"{r['a_over_c']:.2f}x whole edit, {r['a_over_c_sampling']:.2f}x sampling")
    if r.get("a_over_b") is not None:
        lines.append(f"a / b (reference / our fast default): {r['a_over_b']:.2f}x whole edit")
    checks = results.get("compile_checks") or (
        {"b": results["compile_check"]} if results.get("compile_check") else {})
    for key, cc in checks.items():
        tol = cc.get("tolerance")
        verdict = "" if tol is None else (
            f" ({'within' if cc['within_tolerance'] else 'OUTSIDE'} {tol:g})")
        steps = f" of {cc['steps']} steps" if "steps" in cc else ""
        lines.append(f"compiled ({results['config']['compile']}) against eager, mode {key} "
                     f"edit{steps}: "
                     f"max |latent diff| {cc['max_abs_latent']:.2e}, relative "
                     f"{cc['relative']:.2e}{verdict}")
    for key, m in results["modes"].items():
        g = (m.get("per_example") or [{}])[0].get("graphs")
        if g:
            lines.append(f"CUDA graphs, mode {key} (first example; replays / captures / "
                         "eager calls per site): " + "; ".join(
                             f"{site} {g.get(site + '.replay', 0)} / "
                             f"{g.get(site + '.capture', 0)} / {g.get(site + '.eager', 0)}"
                             for site in sorted({k.rsplit('.', 1)[0] for k in g})))
    if results.get("interrupted"):
        lines.append("")
        lines.append("**interrupted: partial results**")
    return "\n".join(lines)


def summarise(results: dict) -> None:
    passes = results.get("unet_pass")
    for m in results["modes"].values():
        rows = m["per_example"]
        if not rows:
            continue
        m["mean_s"] = {s: statistics.mean(r["times_s"][s] for r in rows)
                       for s in (*STAGES, "total")}
        m["counts"] = rows[0]["counts"]
        m["counts_same_for_all_examples"] = all(r["counts"] == rows[0]["counts"] for r in rows)
        m["counts_match_theory"] = all(
            {k: r["counts"][st][k] for k in ("fwd", "bwd", "truncated")} == m["theory"][st]
            for r in rows for st in COUNTED)
        peaks = [v for r in rows for v in r["peaks_gib"].values() if v is not None]
        m["peak_vram_gib"] = max(peaks) if peaks else None
        reserved = [v for r in rows for v in r.get("reserved_gib", {}).values()
                    if v is not None]
        m["peak_reserved_gib"] = max(reserved) if reserved else None
        dif = [r["peaks_gib"].get("diffusion") for r in rows]
        m["peak_vram_diffusion_gib"] = max(dif) if all(v is not None for v in dif) else None
        m["overhead"] = {}
        for st in COUNTED:
            t, c = m["mean_s"][st], m["counts"][st]
            ov = {"model": None, "per_b4_pass": None}
            if passes:
                est = cost_model_s(c, passes)
                ov["model"] = t / est if est > 0 else None
                n = c["fwd"] + c["bwd"]
                ov["per_b4_pass"] = t / (n * passes["fwd_b4_ms"] / 1e3) if n else None
            m["overhead"][st] = ov
    modes = results["modes"]
    done = {k: m for k, m in modes.items() if m.get("per_example")}
    ratios = {}
    if "a" in done and "c" in done:
        ratios["a_over_c"] = done["a"]["mean_s"]["total"] / done["c"]["mean_s"]["total"]
        ratios["a_over_c_sampling"] = (done["a"]["mean_s"]["sampling"]
                                       / done["c"]["mean_s"]["sampling"])
    if "a" in done and "b" in done:
        ratios["a_over_b"] = done["a"]["mean_s"]["total"] / done["b"]["mean_s"]["total"]
    results["ratios"] = ratios


# --- main -------------------------------------------------------------------------------------

def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=tuple(SIZES), default="sd15",
                    help="random models: tiny / tiny_sdxl (128 px), SD 1.5 size (512 px), "
                         "SDXL size (1024 px)")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--dtype", choices=("auto", "fp16", "bf16", "fp32"), default="auto",
                    help="auto: fp16 on CUDA, fp32 on CPU")
    ap.add_argument("--examples", type=Path,
                    default=Path(os.environ.get(ENV_EXAMPLES, DEFAULT_EXAMPLES)),
                    help=f"folder with manifest.json (default ${ENV_EXAMPLES} or "
                         "the repository's example_data/)")
    ap.add_argument("--modes", default="a,b,c")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--limit", type=int, default=None, help="first N examples only")
    ap.add_argument("--fast-mag-iterations", type=int, default=FAST_MAG["iterations"],
                    help="MAG iterations per step in mode b (default: FAST_MAG)")
    ap.add_argument("--warmup-steps", type=int, default=2,
                    help="steps of the untimed warm-up edit (0: none)")
    ap.add_argument("--sync-steps", type=int, default=4,
                    help="steps of the untimed edit per mode whose host synchronisations "
                         "are counted (0: skip the count)")
    ap.add_argument("--pass-repeat", type=int, default=None,
                    help="timed repeats of each UNet pass (default 10 on CUDA, 3 on CPU)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (0: 1 for the tiny sizes on a CPU, where the "
                         "tiny layers gain nothing from more and contention on a shared "
                         "machine made passes 10-50x slower; else torch's default)")
    ap.add_argument("--compile", choices=COMPILE_MODES, default="off",
                    help="torch.compile the UNet's compute modules in place "
                         "(mgie_core/models/compile.py; never max-autotune). The warm-up "
                         "edit compiles; an eager mode-b edit is compared with the "
                         "compiled one (compile_check)")
    ap.add_argument("--check-steps", type=int, default=0,
                    help="steps of the --compile check edits (0: --warmup-steps, or 2)")
    ap.add_argument("--deterministic", action="store_true",
                    help="no TF32 (cuDNN convolutions use it in float32 by default) and "
                         "deterministic cuDNN kernels: with --dtype fp32, checks on a GPU "
                         "whether a and c give the same edit (same_output_a_c)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"unknown modes {bad}; choose from {','.join(MODES)}")
    args.modes = modes
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("XMGIE_NO_PROGRESS", "1")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tiny = args.size.startswith("tiny")
    threads = args.threads or (1 if tiny and device.type == "cpu" else 0)
    if threads:
        torch.set_num_threads(threads)
    if args.deterministic:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
             "auto": torch.float16 if device.type == "cuda" else torch.float32}[args.dtype]
    size = SIZES[args.size]
    modes = {k: dict(MODES[k]) for k in args.modes}
    if "b" in modes:
        modes["b"]["mag"] = dict(FAST_MAG, iterations=args.fast_mag_iterations)

    results = {
        "config": {
            "size": args.size, "image_px": size, "device": str(device), "dtype": str(dtype),
            "steps": args.steps, "guidance": GUIDANCE, "null_text_inner": NULL_TEXT_INNER,
            "examples": str(args.examples), "limit": args.limit, "compile": args.compile,
            "sync_steps": args.sync_steps, "deterministic": args.deterministic,
            "torch": torch.__version__, "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "cpu_threads": torch.get_num_threads(),
        },
        "modes": {k: {"label": m["label"],
                      "settings": {"method": m["method"], "batched": m["batched"], **m["mag"]},
                      "theory": theoretical_counts(m, args.steps), "per_example": []}
                  for k, m in modes.items()},
        "interrupted": False,
    }
    counter = None
    try:
        examples = load_examples(args.examples, size, args.limit)
        for ex in examples:
            ex["mask_dev"] = ex["mask_t"].to(device)       # the blur's mask, once
        t0 = time.perf_counter()
        sd = build_model(args.size, device, dtype)
        results["config"]["build_s"] = time.perf_counter() - t0
        results["config"]["family"] = sd.family
        if device.type == "cuda":
            # the float32 random init before the cast to --dtype leaves cached blocks
            # (14 GiB for SDXL) that would count in every reserved peak below
            torch.cuda.empty_cache()
        # --compile: short edits made eagerly now and again compiled after the warm-up
        # (compile_check; with graphs, every requested mode: b and c are the fast and
        # the seed-faithful edit)
        check_steps = args.check_steps or args.warmup_steps or 2
        checked = [k for k in modes] if args.compile == "graphs" else ["b"]
        eager_ref = {}
        if args.compile != "off" and examples:
            for k in checked:
                eager_ref[k] = full_edit(sd, examples[0], _short(modes.get(k, MODES[k])),
                                         check_steps, None)[3]
            t0 = time.perf_counter()
            results["config"]["compiled_modules"] = compile_unet(sd.unet, args.compile)
        if args.warmup_steps > 0 and examples:
            # every requested call pattern once, short (with --compile: every shape)
            for mode in modes.values():
                full_edit(sd, examples[0], _short(mode), args.warmup_steps, None)
        if args.compile != "off" and examples:
            results["config"]["compile_and_warmup_s"] = time.perf_counter() - t0
            checks = {}
            for k in checked:
                z = full_edit(sd, examples[0], _short(modes.get(k, MODES[k])), check_steps,
                              None)[3]
                ref = eager_ref[k]
                rel = float((z - ref).norm() / ref.norm())
                checks[k] = {"steps": check_steps, "max_abs_latent": float((z - ref).abs().max()),
                             "relative": rel, "tolerance": FP16_EDIT_TOLERANCE,
                             "within_tolerance": rel <= FP16_EDIT_TOLERANCE}
            results["compile_check"] = checks.get("b", next(iter(checks.values())))
            results["compile_checks"] = checks
        if args.sync_steps > 0 and examples:
            for key, mode in modes.items():
                results["modes"][key]["syncs"] = sync_counts(sd, examples[0], mode,
                                                             args.sync_steps)
        repeat = args.pass_repeat or (10 if device.type == "cuda" else 3)
        results["unet_pass"] = unet_pass_times(sd, size // 8, warmup=3, repeat=repeat)
        if args.compile == "graphs":
            results["graphed_pass"] = graphed_pass_times(sd, size // 8, warmup=3,
                                                         repeat=repeat)
        counter = PassCounter(sd.unet)
        for ex in examples:
            shared: dict[str, tuple] = {}    # method -> ((latents, inversion, stages), counts)
            edits = {}
            for key, mode in modes.items():
                # a and c share one null-text inversion: timed and counted once
                reuse = shared.get(mode["method"])
                before = dict(graphs.TOTALS)
                times, peaks, mag_passes, z, image, inv_run, reserved = full_edit(
                    sd, ex, mode, args.steps, counter, reuse[0] if reuse else None)
                graph_stats = {k: v - before.get(k, 0) for k, v in graphs.TOTALS.items()
                               if v - before.get(k, 0)}
                raw = {st: counter.counts.get(st, {"fwd": 0, "bwd": 0, "completed": 0,
                                                   "fwd_by_batch": {}}) for st in COUNTED}
                if reuse:
                    raw["inversion"] = reuse[1]
                else:
                    shared[mode["method"]] = (inv_run, raw["inversion"])
                counter.counts = {}
                edits[key] = (z, image)
                results["modes"][key]["per_example"].append(
                    {"example": ex["name"], "times_s": times, "peaks_gib": peaks,
                     "reserved_gib": reserved,
                     "counts": _finish_counts(raw), "mag_passes": mag_passes,
                     "inversion_shared": reuse is not None, "graphs": graph_stats})
                print(f"[{key}] {ex['name']}: total {times['total']:.3f} s", flush=True)
            if "a" in edits and "c" in edits:
                same = results.setdefault("same_output_a_c", {"max_abs_latent": 0.0,
                                                              "max_abs_image": 0.0})
                (za, ia), (zc, ic) = edits["a"], edits["c"]
                same["max_abs_latent"] = max(same["max_abs_latent"],
                                             float((za - zc).abs().max()))
                same["max_abs_image"] = max(same["max_abs_image"],
                                            float((ia - ic).abs().max()))
    except KeyboardInterrupt:
        results["interrupted"] = True
        print("interrupted: reporting partial results", flush=True)
    finally:
        if counter is not None:
            counter.remove()
        summarise(results)
        table = markdown_table(results)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1, default=str))
        print()
        print(f"edit_bench: {args.size} {size}px, {device} {dtype}, {args.steps} steps, "
              f"{len(next(iter(results['modes'].values()), {}).get('per_example', []))} "
              f"example(s) per mode")
        print(table, flush=True)
    return results


if __name__ == "__main__":
    main()
