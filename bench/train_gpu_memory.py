"""Peak GPU memory and speed of `xmgie train` on the shipped xMGIE config, measured by
running a few optimiser steps of the real engine on SD 1.5-size random-weight models.

    python bench/train_gpu_memory.py --out train_gpu.json                # a CUDA GPU
    python bench/train_gpu_memory.py --size tiny --device cpu --steps 1  # dry run on a CPU

One idea: the README's per-GPU memory table for training is an estimate (parameter
counts, precisions, Adam's states and counted activations); this script replaces the
arithmetic by the allocator's own peaks for the same setting. It calls
``training.engine.train`` itself (accelerate, mixed precision, accumulation, the
adversarial critic's step, gradient clipping: everything ``xmgie train`` runs) with:

* models: ``--size sd15`` the SD 1.5-size UNet, VAE and text encoder that
  bench/edit_bench.py builds (:func:`edit_bench.build_model`: the shipped SD 1.5
  configs, random initialisation on the device: the same compute and memory as real
  weights) and a random CLIP ViT-L/14 vision encoder with projection (the config's
  ``clip-vit-large-patch14`` identity encoder) built the same way from its published
  shape; ``--size tiny`` the tiny SD of the same builder and the tiny CLIP vision folder
  loaded by name, with the config's ``tiny:`` section (64 px, float32);
* data: the synthetic pairs (training/synthetic.py) at the config's resolution (512 px),
  as many as one global batch;
* the config's precision (bf16), frozen-weight dtype, global batch (32) and
  ``--per-device`` pairs per micro-batch (4: the README table's setting), gradient
  checkpointing on and/or off (``--checkpointing both|on|off``); no validation and no
  periodic checkpoint (the final step's checkpoint is written after the timing ends).

Measured per setting, after ``--warmup-steps`` untimed optimiser steps (the first
allocates Adam's states and the critic's): ``torch.cuda.max_memory_allocated`` and
``max_memory_reserved`` (GiB) over the ``--steps`` timed steps, after
``reset_peak_memory_stats``, and the same peaks over the warm-up; optimiser steps per
second and pairs (samples) per second of the timed steps, each step synchronised; the
logged losses. The task deep-copies a given UNet (it puts hooks, LoRA and checkpointing
on the copy), so the bench drops its own UNet after the warm-up: the timed peaks hold one
UNet, as a run that loads its models by name does (``given_unet_released`` says the
bench's UNet was freed). ``max_memory_allocated`` leaves out the CUDA context (about
0.5-1 GiB) and the allocator's slack (reserved - allocated).

On a CPU (``--device cpu``: the dry run) the same steps run and are timed; memory is
n/a and the report says it is a dry run. A setting that runs out of GPU memory is
reported as such and the next one still runs; Ctrl-C (SIGINT, bench/gpu_run.sh's time
limit) prints and writes what was measured, the timed steps completed so far included.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import sys
import tempfile
import time
import weakref
from pathlib import Path

import torch

GIB = 2 ** 30

# The README's memory table (Training, "Memory per GPU (estimate)"), xMGIE on SD 1.5,
# 512 px, bf16, per_device 4: the totals without the CUDA context, in GiB.
README_ESTIMATE_GIB = {"on": 8.0, "off": 16.0}

# CLIP ViT-L/14's vision tower with projection (openai/clip-vit-large-patch14): the
# shipped config's identity encoder, 303 M parameters, 224 px input.
CLIP_VIT_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                    num_attention_heads=16, image_size=224, patch_size=14, projection_dim=768,
                    hidden_act="quick_gelu")


# edit_bench (beside this file) builds the models, and imports THIS checkout as the
# package xmgie when the program is a bench script: one builder and one import rule
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import edit_bench  # noqa: E402

from xmgie.training.config import load_config  # noqa: E402
from xmgie.training.engine import train  # noqa: E402
from xmgie.training.synthetic import make_synthetic  # noqa: E402
from xmgie.training.xmgie_task import _frozen_dtype  # noqa: E402

# --- models -------------------------------------------------------------------------------

def build_identity(size: str, device: torch.device, dtype: torch.dtype):
    """The identity encoder: sd15, a random CLIP ViT-L/14 vision encoder initialised on
    the device (as edit_bench initialises the SD 1.5 models); tiny, the tiny CLIP vision
    folder through the pack's loader."""
    from xmgie.mgie_core.models import identity as idm

    if size == "tiny":
        from xmgie.mgie_core import tiny

        root = tiny.ensure_tiny_models(None, ["clip_vision"])
        return idm.load_identity_encoder("clip_vision", str(tiny.tiny_path(root, "clip_vision")),
                                         device=device, dtype=dtype)
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    with torch.device(device):
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_VIT_L14))
    model.eval().requires_grad_(False).to(device=device, dtype=dtype)
    px = CLIP_VIT_L14["image_size"]
    return idm.IdentityEncoder(kind="clip_vision", model=model, size=(px, px),
                               mean=idm.OPENAI_CLIP_MEAN, std=idm.OPENAI_CLIP_STD,
                               resize_shortest=px, interpolation="bicubic", device=device,
                               dtype=dtype)


def build_models(size: str, device: torch.device, dtype: torch.dtype) -> dict:
    sd = edit_bench.build_model(size, device, dtype)
    if dtype == torch.float16:
        # as the task does for an fp16 model it loads: the pixel terms backpropagate
        # through the decoder, whose activations overflow half precision
        sd.vae.to(torch.float32)
    return {"sd": sd, "identity": build_identity(size, device, dtype)}


# --- one setting --------------------------------------------------------------------------

@contextlib.contextmanager
def _env(**values: str | None):
    """Environment variables set for the duration (restored after: the tests call
    :func:`main` in their own process)."""
    old = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peaks(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"max_allocated_gib": None, "max_reserved_gib": None}
    return {"max_allocated_gib": torch.cuda.max_memory_allocated(device) / GIB,
            "max_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB}


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_setting(args, checkpointing: bool, device: torch.device, pairs: Path,
                work: Path) -> dict:
    """A few optimiser steps of the config with gradient checkpointing on or off."""
    overrides = {
        "gradient_checkpointing": checkpointing,
        "batch.per_device": args.per_device,
        "steps.max": args.warmup_steps + args.steps,
        "steps.log_every": 1,
        "steps.val_every": 0,           # no validation edits inside the timed steps
        "steps.checkpoint_every": 0,    # the final step's checkpoint comes after timing
        "early_stopping.metric": None,  # (needs validation)
    }
    if args.global_batch:
        overrides["batch.global"] = args.global_batch
    if args.precision:
        overrides["precision"] = args.precision
    config = load_config(args.config, tiny=args.size == "tiny", overrides=overrides)
    dtype = _frozen_dtype(config.model.get("frozen_dtype", "auto"), config.precision, device)
    row: dict = {"checkpointing": "on" if checkpointing else "off",
                 "precision": config.precision, "frozen_dtype": str(dtype),
                 "per_device": config.batch.per_device, "global_batch": config.batch.global_,
                 "accumulation": config.batch.accumulation(1),
                 "resolution": config.data.resolution, "oom": False, "interrupted": False}
    state: dict = {}
    models = None

    def progress(step: int, total: int, logs: dict) -> None:
        if "loss" in logs:
            row.setdefault("losses", []).append(logs["loss"])
        if step == args.warmup_steps:
            _sync(device)
            row["warmup"] = {**_peaks(device), "seconds": time.perf_counter() - state["t"]}
            # the task trains a deep copy of the given UNet: drop the bench's own, so the
            # timed steps hold one UNet as a run that loads by name does
            models.pop("sd", None)
            _release(device)
            row["given_unet_released"] = state["unet"]() is None
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            state["t0"] = time.perf_counter()
        elif step > args.warmup_steps:
            # after every timed step, so that a run stopped at its time limit still
            # reports the steps it completed
            _sync(device)
            seconds = time.perf_counter() - state["t0"]
            done = step - args.warmup_steps
            row.update(_peaks(device), seconds=seconds, steps=done,
                       steps_per_s=done / seconds,
                       samples_per_s=done / seconds * config.batch.global_)

    t = time.perf_counter()
    try:
        models = build_models(args.size, device, dtype)
        state["unet"] = weakref.ref(models["sd"].unet)
        row["build_s"] = time.perf_counter() - t
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        state["t"] = time.perf_counter()
        # --device cpu: accelerate places everything on the CPU even where a GPU exists
        with _env(ACCELERATE_USE_CPU="1" if device.type == "cpu" else None):
            train(config, work / f"run-{row['checkpointing']}", dataset=pairs,
                  progress=progress, models=models)
    except torch.OutOfMemoryError as exc:
        row["oom"] = True
        row["error"] = str(exc).splitlines()[0][:300]
        row.update({f"{k}_at_oom": v for k, v in _peaks(device).items()})
    except KeyboardInterrupt:   # reported by the caller, with what was measured
        row["interrupted"] = True
    finally:
        models = None
        _release(device)
    return row


# --- report -------------------------------------------------------------------------------

def _fmt(x, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def text_table(res: dict) -> str:
    c = res["config"]
    head = (f"train_gpu_memory: {c['config']} {c['size']} {c['resolution']} px on "
            f"{c['gpu'] or c['device']}, {c['precision']}, per_device {c['per_device']} x "
            f"{c['accumulation']} micro-batches = global {c['global_batch']}, "
            f"{c['steps']} timed step(s) after {c['warmup_steps']} warm-up")
    lines = [head]
    if res["dry_run"]:
        lines.append("DRY RUN on a CPU: times only, no GPU memory measured")
    est = res.get("readme_estimate_gib")
    lines.append(f"{'checkpointing':<14} {'max alloc GiB':>13} {'max reserved GiB':>16} "
                 f"{'warm-up alloc':>13} {'steps/s':>8} {'samples/s':>9} "
                 f"{'README est. GiB':>15}")
    for r in res["settings"]:
        if r["oom"]:
            state = "out of GPU memory"
        elif "steps_per_s" not in r:
            state = "interrupted before a timed step"
        else:
            state = None
        warm = (r.get("warmup") or {}).get("max_allocated_gib")
        e = est.get(r["checkpointing"]) if est else None
        if state:
            lines.append(f"{r['checkpointing']:<14} {state}")
            continue
        lines.append(f"{r['checkpointing']:<14} {_fmt(r['max_allocated_gib']):>13} "
                     f"{_fmt(r['max_reserved_gib']):>16} {_fmt(warm):>13} "
                     f"{r['steps_per_s']:>8.3f} {r['samples_per_s']:>9.2f} "
                     f"{_fmt(e, '.0f'):>15}"
                     + (f"  (interrupted after {r['steps']} timed step(s))"
                        if r["interrupted"] else ""))
    return "\n".join(lines)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("tiny", "sd15"), default="sd15",
                    help="sd15: SD 1.5-size random models at the config's 512 px; tiny: the "
                         "tiny models with the config's tiny: section (64 px; a CPU dry run)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None,
                    help="default: cuda when available, else cpu (a dry run)")
    ap.add_argument("--config", default="xmgie", help="a training config (default: the "
                    "shipped xmgie)")
    ap.add_argument("--steps", type=int, default=3, help="timed optimiser steps (default 3)")
    ap.add_argument("--warmup-steps", type=int, default=1,
                    help="untimed optimiser steps first (default 1)")
    ap.add_argument("--per-device", type=int, default=4,
                    help="pairs per micro-batch (batch.per_device; default 4)")
    ap.add_argument("--global-batch", type=int, default=None,
                    help="pairs per optimiser step (batch.global; default: the config's)")
    ap.add_argument("--precision", choices=("no", "fp16", "bf16"), default=None,
                    help="default: the config's (bf16; the tiny section's: no)")
    ap.add_argument("--checkpointing", choices=("both", "on", "off"), default="both",
                    help="gradient checkpointing on, off or both (default, on first)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup_steps < 1:
        ap.error("--steps and --warmup-steps must be at least 1 (the warm-up allocates "
                 "Adam's states, which the timed peaks must hold)")
    if args.per_device < 1:
        ap.error("--per-device must be at least 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("XMGIE_NO_PROGRESS", "1")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA GPU; use --device cpu for a "
                         "dry run")
    base = load_config(args.config, tiny=args.size == "tiny")
    if base.task != "xmgie":
        raise SystemExit(f"--config: {args.config} trains {base.task!r}; this bench measures "
                         "the xmgie task")
    settings = {"both": [True, False], "on": [True], "off": [False]}[args.checkpointing]
    results: dict = {
        "config": {
            "config": args.config, "size": args.size, "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "gpu_total_gib": (torch.cuda.get_device_properties(device).total_memory / GIB
                              if device.type == "cuda" else None),
            "steps": args.steps, "warmup_steps": args.warmup_steps,
            "torch": torch.__version__, "python": platform.python_version(),
        },
        "dry_run": device.type != "cuda",
        "settings": [],
        "interrupted": False,
    }
    with tempfile.TemporaryDirectory(prefix="xmgie-train-gpu-") as tmp:
        work = Path(tmp)
        try:
            # the pairs once: one global batch at the config's resolution
            cfg = load_config(args.config, tiny=args.size == "tiny", overrides={
                "batch.per_device": args.per_device,
                **({"batch.global": args.global_batch} if args.global_batch else {})})
            t = time.perf_counter()
            make_synthetic(work / "pairs", n=cfg.batch.global_, size=cfg.data.resolution,
                           seed=cfg.seed)
            results["config"]["data_s"] = time.perf_counter() - t
            for checkpointing in settings:
                row = run_setting(args, checkpointing, device, work / "pairs", work)
                results["settings"].append(row)
                if row["interrupted"]:
                    results["interrupted"] = True
                    print("interrupted: reporting partial results", flush=True)
                    break
                print(f"[checkpointing {row['checkpointing']}] "
                      + ("out of GPU memory" if row["oom"] else
                         f"{row['steps_per_s']:.3f} steps/s, max allocated "
                         f"{_fmt(row['max_allocated_gib'])} GiB"), flush=True)
        except KeyboardInterrupt:   # before or between the settings
            results["interrupted"] = True
            print("interrupted: reporting partial results", flush=True)
        finally:
            r0 = results["settings"][0] if results["settings"] else {}
            for key in ("precision", "frozen_dtype", "per_device", "global_batch",
                        "accumulation", "resolution"):
                results["config"][key] = r0.get(key)
            if (args.size == "sd15" and r0.get("per_device") == 4
                    and r0.get("resolution") == 512):
                results["readme_estimate_gib"] = README_ESTIMATE_GIB
            table = text_table(results)
            results["table"] = table
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(results, indent=1, default=str))
            print()
            print(table, flush=True)
    return results


if __name__ == "__main__":
    main()
