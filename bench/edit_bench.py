"""Benchmark full masked edits (issue #6): inversion + two-branch sampling (CAM + PFB +
MAG) + VAE decode + GB blur, in three call patterns, with random-weight models.

    python bench/edit_bench.py --size sd15 --device cuda --out results.json   # the GPU run
    python bench/edit_bench.py --size tiny --steps 4 --limit 1                # CPU smoke run

Modes (one full edit per example each; settings in ``MODES``):
  a  reference call pattern: null-text inversion (10 inner iterations), two separate
     guided UNet calls per step (sampler ``batched=False``), MAG 15 iterations x 25/50
     steps recomputing the reconstruction branch every iteration (``cache_source=False``)
     with a full forward for the loss (``truncate=False``);
  b  our fast default: direct inversion (no optimisation), one batched UNet call per step,
     MAG with ``FAST_MAG`` (5 iterations x 25/50 steps, cached source, truncated forward);
  c  seed-faithful: null-text (10 inner) + MAG 15 x 25/50, with our batching, caching and
     truncation.

Models: ``--size sd15`` builds UNet2DConditionModel / AutoencoderKL / CLIPTextModel from
the shipped SD 1.5 configs (mgie_core/configs/sd15) with random initialisation -- the same
compute and memory as real weights -- at 512 px; ``--size tiny`` uses the tiny random
models of mgie_core/tiny at 128 px (seconds on a CPU). The tokenizer is the offline tiny
CLIP tokenizer in both cases (its ids stay below SD's 49408).

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
    """The repo root is the package ``xmgie``; on a bare checkout (the GPU machine, where
    it is not pip-installed) expose it through a symlink in a temporary folder."""
    try:
        import xmgie  # noqa: F401
        return
    except ImportError:
        pass
    tmp = Path(tempfile.mkdtemp(prefix="xmgie-path-"))
    (tmp / "xmgie").symlink_to(REPO, target_is_directory=True)
    sys.path.insert(0, str(tmp))


_import_xmgie()

from xmgie.mgie_core import blur, vae  # noqa: E402
from xmgie.mgie_core.inversion import invert  # noqa: E402
from xmgie.mgie_core.mag import MAGControl  # noqa: E402
from xmgie.mgie_core.models.sd import CONFIG_DIR, SDModel, ddim_scheduler  # noqa: E402
from xmgie.mgie_core.pfb import PFBControl  # noqa: E402
from xmgie.mgie_core.sampler import CAMSettings, edit  # noqa: E402

ENV_EXAMPLES = "XMGIE_BENCH_EXAMPLES"
DEFAULT_EXAMPLES = REPO.parent / "shared" / "data" / "examples"

GUIDANCE = 7.5
NULL_TEXT_INNER = 10                                   # official null-text default
REFERENCE_MAG = dict(iterations=15, opt_fraction=25 / 50, truncate=False, cache_source=False)
SEED_MAG = dict(iterations=15, opt_fraction=25 / 50, truncate=True, cache_source=True)
# Our fast default: a third of the official 15 updates per optimised step, over the same
# first 25 of 50 steps, with the cached source and the truncated loss forward. Chosen for
# the 3 s budget: 25 x 5 = 125 truncated forward+backward pairs instead of 375.
FAST_MAG = dict(iterations=5, opt_fraction=25 / 50, truncate=True, cache_source=True)

MODES = {
    "a": dict(label="reference", method="null_text", batched=False, mag=REFERENCE_MAG),
    "b": dict(label="fast", method="direct", batched=True, mag=FAST_MAG),
    "c": dict(label="seed-faithful", method="null_text", batched=True, mag=SEED_MAG),
}
STAGES = ("encode", "inversion", "sampling", "decode", "gb")
COUNTED = ("inversion", "sampling")


# --- models -----------------------------------------------------------------------------

def _tokenizer():
    from transformers import CLIPTokenizer

    from xmgie.mgie_core.tiny.tokenizers import write_clip_tokenizer

    folder = Path(tempfile.mkdtemp(prefix="xmgie-bench-tok-"))
    write_clip_tokenizer(folder)
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def build_model(size: str, device: torch.device, dtype: torch.dtype) -> SDModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    sched_cfg = json.loads((CONFIG_DIR / "scheduler" / "scheduler_config.json").read_text())
    if size == "tiny":
        from xmgie.mgie_core.tiny import sd as tiny

        unet, vae_m, text = tiny.build()
    else:
        cfg = lambda sub: json.loads((CONFIG_DIR / sub / "config.json").read_text())  # noqa
        # Initialise on the target device: random init of 860M parameters on a CPU is slow.
        with torch.device(device):
            unet = UNet2DConditionModel.from_config(cfg("unet"))
            vae_m = AutoencoderKL.from_config(cfg("vae"))
            tcfg = {k: v for k, v in cfg("text_encoder").items()
                    if not k.startswith("_") and k not in ("architectures", "torch_dtype")}
            text = CLIPTextModel(CLIPTextConfig(**tcfg))
    for m in (unet, vae_m, text):
        m.requires_grad_(False).eval().to(device=device, dtype=dtype)
    return SDModel(unet=unet, vae=vae_m, text_encoder=text, tokenizer=_tokenizer(),
                   scheduler=ddim_scheduler(sched_cfg), device=device, dtype=dtype,
                   source=f"random {size}")


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

    def _slot(self):
        return self.counts.setdefault(self.stage, {"fwd": 0, "bwd": 0, "completed": 0,
                                                   "fwd_by_batch": {}})

    def _pre(self, module, args, kwargs):
        if self.stage is None:
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
        if self.stage is not None:
            self._slot()["completed"] += 1

    def backward(self):
        if self.stage is not None:
            self._slot()["bwd"] += 1

    def remove(self):
        for h in self._handles:
            h.remove()


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


def unet_pass_times(sd: SDModel, latent_hw: int, warmup: int, repeat: int) -> dict:
    """Warm UNet passes on random data (never zeros), in the same state the sampler uses
    (controlled attention processors installed, no hooks active)."""
    from xmgie.mgie_core import attention

    attention.install(sd.unet)
    dev, d = sd.device, sd.text_encoder.config.hidden_size
    g = torch.Generator("cpu").manual_seed(1)
    out = {}
    for b in (1, 2, 4):
        z = torch.randn(b, 4, latent_hw, latent_hw, generator=g).to(dev, sd.dtype)
        e = torch.randn(b, 77, d, generator=g).to(dev, sd.dtype)
        t = torch.full((b,), 501, device=dev, dtype=torch.long)
        with torch.no_grad():
            out[f"fwd_b{b}_ms"] = 1e3 * _median_time(
                lambda: sd.unet(z, t, encoder_hidden_states=e, return_dict=False),
                dev, warmup, repeat)
    z = torch.randn(1, 4, latent_hw, latent_hw, generator=g).to(dev, sd.dtype)
    e = torch.randn(1, 77, d, generator=g).to(dev, sd.dtype)
    t = torch.full((1,), 501, device=dev, dtype=torch.long)

    def fwd_bwd():
        zv = z.detach().requires_grad_(True)
        y = sd.unet(zv, t, encoder_hidden_states=e, return_dict=False)[0]
        torch.autograd.grad(y.float().square().mean(), zv)

    out["fwd_bwd_b1_ms"] = 1e3 * _median_time(fwd_bwd, dev, warmup, repeat)
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

def full_edit(sd: SDModel, ex: dict, mode: dict, steps: int, counter: PassCounter | None):
    """Returns (stage seconds, stage peaks in GiB, MAG's own pass report)."""
    dev = sd.device
    times, peaks = {}, {}
    mask = ex["mask_t"]

    @contextlib.contextmanager
    def stage(name, peak_group):
        if counter is not None:
            counter.stage = name if name in COUNTED else None
        if peak_group is not None and peak_group not in peaks:
            _peak_reset(dev)
        _sync(dev)
        t = time.perf_counter()
        try:
            yield
        finally:
            _sync(dev)
            times[name] = time.perf_counter() - t
            if counter is not None:
                counter.stage = None
            if peak_group is not None:
                peaks[peak_group] = _peak(dev)

    with stage("encode", "encode"):
        lat = vae.encode(sd, ex["image_t"])
    with stage("inversion", "diffusion"):
        inv = invert(sd, lat.samples, ex["source_prompt"], mode["method"], steps,
                     GUIDANCE, NULL_TEXT_INNER, image_size=lat.image_size)
    mag = MAGControl(mask, list(ex["edit_words"]), **mode["mag"])
    with stage("sampling", "diffusion"):
        res = edit(sd, inv, ex["target_prompt"], mask=mask,
                   cam=CAMSettings(in_words=list(ex["edit_words"])),
                   controls=[PFBControl(mask, preset="object"), mag],
                   batched=mode["batched"], keep_reconstruction=False)
    with stage("decode", "post"):
        image = vae.decode(sd, res.edit)
    with stage("gb", "post"):
        blur.gb_blur(image.to(dev), mask.to(dev))
    times["total"] = sum(times[s] for s in STAGES)
    return times, peaks, dict(getattr(mag, "passes", {}))


# --- report ---------------------------------------------------------------------------------

def _fmt(x, spec=".2f"):
    return "n/a" if x is None else format(x, spec)


def markdown_table(results: dict) -> str:
    lines = ["| mode | edits | encode s | inversion s | sampling s | decode s | gb s | "
             "total s | UNet fwd (trunc) | UNet bwd | = theory | overhead inv / samp | "
             "peak VRAM GiB (diffusion / all) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
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
            f"{_fmt(m['peak_vram_diffusion_gib'])} / {_fmt(m['peak_vram_gib'])} |")
    p = results.get("unet_pass", {})
    if p:
        lines.append("")
        lines.append(f"UNet pass (warm, median): batch 4 {p['fwd_b4_ms']:.2f} ms; batch 2 "
                     f"{p['fwd_b2_ms']:.2f} ms; batch 1 {p['fwd_b1_ms']:.2f} ms; batch 1 "
                     f"forward+backward {p['fwd_bwd_b1_ms']:.2f} ms")
    if results.get("ratio_reference_over_seed") is not None:
        lines.append(f"reference / seed-faithful total time: "
                     f"{results['ratio_reference_over_seed']:.2f}x")
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
        dif = [r["peaks_gib"].get("diffusion") for r in rows]
        m["peak_vram_diffusion_gib"] = max(dif) if all(v is not None for v in dif) else None
        m["overhead"] = {}
        for st in COUNTED:
            t, c = m["mean_s"][st], m["counts"][st]
            ov = {"model": None, "issue": None}
            if passes:
                est = cost_model_s(c, passes)
                ov["model"] = t / est if est > 0 else None
                n = c["fwd"] + c["bwd"]
                ov["issue"] = t / (n * passes["fwd_b4_ms"] / 1e3) if n else None
            m["overhead"][st] = ov
    a, c = results["modes"].get("a", {}), results["modes"].get("c", {})
    if a.get("per_example") and c.get("per_example"):
        results["ratio_reference_over_seed"] = a["mean_s"]["total"] / c["mean_s"]["total"]


# --- main -------------------------------------------------------------------------------------

def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("tiny", "sd15"), default="sd15")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--dtype", choices=("auto", "fp16", "bf16", "fp32"), default="auto",
                    help="auto: fp16 on CUDA, fp32 on CPU")
    ap.add_argument("--examples", type=Path,
                    default=Path(os.environ.get(ENV_EXAMPLES, DEFAULT_EXAMPLES)),
                    help=f"folder with manifest.json (default ${ENV_EXAMPLES} or "
                         "../shared/data/examples beside the repo)")
    ap.add_argument("--modes", default="a,b,c")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--limit", type=int, default=None, help="first N examples only")
    ap.add_argument("--fast-mag-iterations", type=int, default=FAST_MAG["iterations"],
                    help="MAG iterations per step in mode b (default: FAST_MAG)")
    ap.add_argument("--warmup-steps", type=int, default=2,
                    help="steps of the untimed warm-up edit (0: none)")
    ap.add_argument("--pass-repeat", type=int, default=None,
                    help="timed repeats of each UNet pass (default 10 on CUDA, 3 on CPU)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (0: 1 for --size tiny on a CPU, where the "
                         "tiny layers gain nothing from more and contention on a shared "
                         "machine made passes 10-50x slower; else torch's default)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the UNet in place (default mode only; never "
                         "max-autotune). Off by default")
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
    threads = args.threads or (1 if args.size == "tiny" and device.type == "cpu" else 0)
    if threads:
        torch.set_num_threads(threads)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
             "auto": torch.float16 if device.type == "cuda" else torch.float32}[args.dtype]
    size = 128 if args.size == "tiny" else 512
    modes = {k: dict(MODES[k]) for k in args.modes}
    if "b" in modes:
        modes["b"]["mag"] = dict(FAST_MAG, iterations=args.fast_mag_iterations)

    results = {
        "config": {
            "size": args.size, "image_px": size, "device": str(device), "dtype": str(dtype),
            "steps": args.steps, "guidance": GUIDANCE, "null_text_inner": NULL_TEXT_INNER,
            "examples": str(args.examples), "limit": args.limit, "compile": args.compile,
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
        t0 = time.perf_counter()
        sd = build_model(args.size, device, dtype)
        if args.compile:
            sd.unet.compile()            # in place: module names and hooks stay
        results["config"]["build_s"] = time.perf_counter() - t0
        if args.warmup_steps > 0 and examples:
            warm = dict(MODES["c"], mag=dict(SEED_MAG, iterations=2))
            full_edit(sd, examples[0], warm, args.warmup_steps, None)
            if "a" in modes:
                full_edit(sd, examples[0], dict(warm, batched=False,
                                                mag=dict(REFERENCE_MAG, iterations=2)),
                          args.warmup_steps, None)
        repeat = args.pass_repeat or (10 if device.type == "cuda" else 3)
        results["unet_pass"] = unet_pass_times(sd, size // 8, warmup=3, repeat=repeat)
        counter = PassCounter(sd.unet)
        for key, mode in modes.items():
            for ex in examples:
                times, peaks, mag_passes = full_edit(sd, ex, mode, args.steps, counter)
                raw = {st: counter.counts.get(st, {"fwd": 0, "bwd": 0, "completed": 0,
                                                   "fwd_by_batch": {}}) for st in COUNTED}
                counter.counts = {}
                results["modes"][key]["per_example"].append(
                    {"example": ex["name"], "times_s": times, "peaks_gib": peaks,
                     "counts": _finish_counts(raw), "mag_passes": mag_passes})
                print(f"[{key}] {ex['name']}: total {times['total']:.3f} s", flush=True)
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
