"""The training loop: a task's losses minimised with Hugging Face accelerate.

One idea: everything generic (processes and devices, mixed precision, gradient
accumulation, optimisers and schedules, EMA, validation and early stopping, logging,
checkpoints and exact resume) lives here once, and a task (:mod:`.task`) only turns a
batch into losses. The same code runs as one CPU process or under ``accelerate launch``
on many GPUs (DDP, or FSDP / DeepSpeed through ``accelerate config``); there is no
distributed code of our own.

Exactness, on which resume and the multi-process check rest:

* the data order of epoch ``e`` is a permutation drawn from ``(seed, e)`` alone, and a
  resumed run skips the micro-batches its checkpoint had consumed
  (``accelerator.skip_first_batches``);
* before each micro-batch every generator (Python, NumPy, torch, CUDA) is seeded from
  ``(seed, g)``, ``g`` the micro-batch's index in the global data stream. The noise, the
  timesteps and the dropout a task draws for a batch are therefore the same whether the
  batch is the 2nd micro-batch of one process or the 1st of a second process, and the
  same after a resume. The generator states are still saved in every checkpoint.
* the learning-rate schedules step once per optimiser step, outside accelerate's
  scheduler wrapper (which would step once per process);
* a checkpoint is of a completed step: a Ctrl-C inside a step saves the weights, the data
  position and the critic's buffers as they were at the end of the step before (none is
  written between the optimiser's step and the step's logged row).

Adversarial tasks (``task.critic`` not None): each micro-batch takes the generator's
step (task loss + ``weights["adv"]`` x the generator's adversarial term through the
frozen critic), then the critic's step on the detached fake; the critic has its own Adam.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..mgie_core import host
from ..mgie_core.errors import InputError, XMGIEError
from . import checkpoint as ckpt
from .config import TrainConfig, TrainConfigError, load_config

METRICS = "metrics.jsonl"
FINAL = "final"
BEST = "best"
LOGS = "logs"
SYNTHETIC = "synthetic"
RUN_CONFIG = "config.json"
_NOT_TERMS = ("loss", "real", "fake")


class TrainError(XMGIEError, RuntimeError):
    """Training could not go on (a non-finite loss, a run folder in the way, ...)."""


@dataclass
class TrainResult:
    final_dir: Path | None          # None when interrupted before the end
    metrics: list[dict[str, Any]]   # the rows this call logged (metrics.jsonl's)
    stopped_early: bool
    steps: int                      # optimiser steps done, counting resumed ones
    interrupted: bool = False
    out_dir: Path | None = None
    checkpoint: Path | None = None  # the last checkpoint written


def check_task_config(config: TrainConfig) -> None:
    """The task's own settings (``model:``, ``loss:``) checked without loading anything,
    so a bad key fails before the data is read or the run folder is touched."""
    if config.task == "xmgie":
        from . import xmgie_task as module
        from .xmgie_task import check_config
    elif config.task == "mmig":
        from . import mmig_task as module
        from .mmig_task import check_config
    else:
        from . import mgie_task as module
        from .mgie_task import settings as check_config
    check_config(config)
    # the early-stopping metric among the names the task's validation returns
    names = getattr(module, "VAL_METRICS", None)
    metric = config.early_stopping.metric
    if names is not None and metric is not None and metric not in names:
        raise TrainConfigError(config.source, "early_stopping.metric",
                               f"{metric!r} is not a validation metric of the {config.task} "
                               "task", f"one of {', '.join(names)}")


def build_task(config: TrainConfig, accelerator, tiny: bool, models: dict | None = None):
    """The task named by ``config.task``; both tasks take the same arguments."""
    if config.task == "xmgie":
        from .xmgie_task import build_task as build
    elif config.task == "mgie":
        from .mgie_task import build_task as build
    elif config.task == "mmig":
        from .mmig_task import build_task as build
    else:  # load_config already refuses other names
        raise TrainConfigError(config.source, "task", f"found {config.task!r}",
                               "xmgie, mgie or mmig")
    if models:
        return build(config, accelerator, tiny, models=models)
    return build(config, accelerator, tiny)


def _mix(seed: int, *parts: int | str) -> int:
    """A 32-bit seed from ``seed`` and a path of indices (the stream position)."""
    text = ":".join(str(p) for p in (seed, *parts)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=4).digest(), "little")


class EpochSampler(torch.utils.data.Sampler[int]):
    """An epoch of whole optimiser steps, in an order that depends only on (seed, epoch).

    Each epoch is a fresh permutation of all ``n`` indices, cut to a multiple of the
    global batch (the few left over wait for a later epoch's order). An epoch then holds
    the same pairs in the same steps however the global batch is split into processes and
    micro-batches: accelerate hands process ``p`` the micro-batches ``p, p + P, ...``."""

    def __init__(self, n: int, seed: int, multiple: int = 1):
        self.n, self.seed, self.epoch = n, seed, 0
        self.size = n - n % multiple

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(_mix(self.seed, "epoch", self.epoch))
        return iter(torch.randperm(self.n, generator=g)[:self.size].tolist())


class _Stream:
    """Micro-batches across epochs, remembering where it is (epoch, batches consumed)."""

    def __init__(self, accelerator, loader, epoch: int = 0, index: int = 0):
        self.accelerator, self.loader = accelerator, loader
        self.epoch, self.index = epoch, index
        self.per_epoch = len(loader)

    def position(self) -> tuple[int, int]:
        if self.index >= self.per_epoch:
            return self.epoch + 1, 0
        return self.epoch, self.index

    def __iter__(self) -> Iterator[dict]:
        self.epoch, self.index = self.position()
        while True:
            loader = self.loader
            loader.set_epoch(self.epoch)
            if self.index:
                loader = self.accelerator.skip_first_batches(loader, self.index)
                loader.set_epoch(self.epoch)
            for batch in loader:
                self.index += 1
                yield batch
            self.epoch, self.index = self.epoch + 1, 0


def _lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


class _EMA:
    """Exponential moving average of the trainable parameters (float32 shadow)."""

    def __init__(self, params: dict[str, nn.Parameter], decay: float):
        self.params, self.decay = params, decay
        self.shadow = {k: p.detach().float().clone() for k, p in params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for k, p in self.params.items():
            self.shadow[k].lerp_(p.detach().float(), 1.0 - self.decay)

    @contextmanager
    def swapped(self):
        """The EMA weights in the model for the duration (validation, export)."""
        saved = {k: p.detach().clone() for k, p in self.params.items()}
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(self.shadow[k].to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(saved[k])


def _check_out_dir(out: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from, or None; refuses to overwrite another run."""
    existing = ckpt.latest_checkpoint(out)
    if resume:
        if existing is None:
            raise InputError("--resume", f"{out} holds no checkpoint-<step> folder",
                             "a run folder that a previous `xmgie train` wrote checkpoints to",
                             "Run without --resume to start, or pass that run's --out.")
        return existing
    if existing is not None or (out / METRICS).exists():
        raise InputError("--out", f"{out} already holds a training run",
                         "a new or empty folder",
                         "Pass --resume to continue it, or choose another --out.")
    return None


def _load_data(config: TrainConfig, dataset, accelerator, out: Path):
    """(train, val or None), all validated before anything is written (except the
    synthetic set of a --tiny run, which is written into the run folder)."""
    from . import data as data_mod

    d = config.data
    source = dataset if dataset is not None else d.path
    # --tiny without --dataset: the synthetic pairs, unless the tiny: section names data
    tiny_path = ((config.raw.get("tiny") or {}).get("data") or {}).get("path")
    if config.tiny and dataset is None and tiny_path is None:
        source = None
    if isinstance(source, torch.utils.data.Dataset):
        full = source
    else:
        if source is None and config.tiny:
            from .synthetic import make_synthetic

            source = out / SYNTHETIC
            with accelerator.main_process_first():
                if accelerator.is_main_process:
                    make_synthetic(source, n=d.synthetic_items, size=d.resolution,
                                   seed=config.seed)
        if source is None:
            raise TrainConfigError(config.source, "data.path", "not set",
                                   "the dataset folder or file to train on",
                                   "Set data.path in the config or pass --dataset D.")
        full = data_mod.load_pairs(Path(source), resolution=d.resolution, format=d.format,
                                   columns=d.columns, split=d.split)
    if config.steps.val_every == 0:
        return full, None
    if d.val_path is not None:
        val = data_mod.load_pairs(d.val_path, resolution=d.resolution, format=d.format,
                                  columns=d.columns, split=d.split)
        return full, val
    if d.val_fraction == 0:
        return full, None
    return data_mod.split_validation(full, d.val_fraction, config.seed)


def _scalar_terms(out: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v.detach().float() for k, v in out.items()
            if k not in _NOT_TERMS and isinstance(v, torch.Tensor) and v.dim() == 0}


def _cpu_only() -> bool:
    """Processes on CPUs only: ``accelerate launch --cpu`` says so (ACCELERATE_USE_CPU);
    so does a multi-process launch (``accelerate launch --multi_gpu``, ``torchrun``) on a
    machine with no GPU, which accelerate would otherwise run as N unrelated copies."""
    from accelerate.utils import parse_flag_from_env

    if parse_flag_from_env("ACCELERATE_USE_CPU"):
        return True
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    gpu = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    return launched and not gpu


_MPI_RANKS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "WORLD_SIZE")


def single_cpu_launch_note() -> str | None:
    """What to tell a user whose ``accelerate launch --cpu --num_processes N`` started one
    process: accelerate's CPU launcher starts several only through ``mpirun`` (with
    ``--mpirun_hostfile``); otherwise it runs the script once, with the rendezvous
    address of a multi-process launch (MASTER_ADDR) set but no rank or world size. The
    run is still correct (one process, the same global batch); only not parallel."""
    from accelerate.utils import parse_flag_from_env

    if not parse_flag_from_env("ACCELERATE_USE_CPU") or "MASTER_ADDR" not in os.environ:
        return None
    if any(os.environ.get(k) for k in _MPI_RANKS):
        return None
    return ("note: accelerate launch --cpu started ONE process (its CPU launcher starts "
            "several only through mpirun, with --mpirun_hostfile); for N gloo processes "
            "on CPUs run `accelerate launch --multi_gpu --num_processes N -m xmgie train "
            "...` on a machine without a GPU. Training goes on in this one process, "
            "with the same global batch.")


def _reset_accelerate_state() -> None:
    # One process may train several times (tests, the in-graph training node) with other
    # precisions or accumulation: accelerate keeps both in process-wide singletons.
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def train(config: TrainConfig | str | Path | Mapping, out_dir: str | Path, *,
          max_steps: int | None = None, resume: bool = False, dataset=None,
          progress: Callable[[int, int, dict], None] | None = None,
          should_stop: Callable[[], bool] | None = None,
          models: dict | None = None) -> TrainResult:
    """Train ``config``'s task into ``out_dir`` (see the module docstring and the README's
    Training section). ``dataset`` (a path or a Dataset) replaces ``data.path``;
    ``max_steps`` replaces ``steps.max``; ``progress(step, total, logs)`` is called after
    each step on the main process; ``should_stop()`` is polled after each step: when true
    a checkpoint is written and the result has ``interrupted=True``. Ctrl-C also writes a
    checkpoint (one process) and re-raises ``KeyboardInterrupt``."""
    from accelerate import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import (
        DistributedDataParallelKwargs,
        GradientAccumulationPlugin,
        ProjectConfiguration,
        set_seed,
    )

    if not isinstance(config, TrainConfig):
        config = load_config(config)
    out = Path(out_dir)
    total = int(max_steps) if max_steps is not None else config.steps.max
    if total < 1:
        raise InputError("--max-steps", f"found {total}", "a whole number >= 1")
    check_task_config(config)
    resume_from = _check_out_dir(out, resume)
    # a damaged state.json fails before the data and the models load
    state = ckpt.read_state(resume_from) if resume_from is not None else None

    _reset_accelerate_state()
    cpu = _cpu_only()
    note = single_cpu_launch_note()
    if note:
        print(note, file=sys.stderr)
    accum = config.batch.accumulation(PartialState(cpu=cpu).num_processes, config.source)
    log_with = None
    try:
        from accelerate.utils import is_tensorboard_available

        if is_tensorboard_available():
            log_with = "tensorboard"
    except ImportError:
        pass
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=config.precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=accum, sync_with_dataloader=False),
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / LOGS)),
        # Frozen parts and sites a batch may skip produce no gradient.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    set_seed(config.seed)
    main = accelerator.is_main_process
    nproc, rank = accelerator.num_processes, accelerator.process_index

    # Data first: a bad dataset fails before any model loads or anything is written.
    train_set, val_set = _load_data(config, dataset, accelerator, out)
    from .data import collate

    if len(train_set) < config.batch.global_:
        raise TrainError(f"the training set has {len(train_set)} pair(s), fewer than one "
                         f"optimiser step's batch.global = {config.batch.global_}; add pairs "
                         "or lower batch.global in the config")

    with accelerator.main_process_first():  # the first process builds tiny models alone
        task = build_task(config, accelerator, config.tiny, models)
    model, critic = task.model, task.critic
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise TrainError(f"the {config.task} task's model has no trainable parameter")
    o = config.optim
    optimizer = torch.optim.AdamW(list(params.values()), lr=o.lr, betas=o.betas, eps=o.eps,
                                  weight_decay=o.weight_decay)
    warmup = int(round(o.warmup_ratio * total))
    schedulers = [torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(o.schedule, warmup, total))]
    critic_opt = None
    if critic is not None:
        critic_opt = torch.optim.AdamW(critic.parameters(), lr=o.critic_lr,
                                       betas=o.critic_betas, eps=o.eps,
                                       weight_decay=o.weight_decay)
        schedulers.append(torch.optim.lr_scheduler.LambdaLR(
            critic_opt, _lr_lambda(o.schedule, warmup, total)))

    sampler = EpochSampler(len(train_set), config.seed, config.batch.global_)
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=config.batch.per_device, sampler=sampler, drop_last=True,
        collate_fn=collate, num_workers=config.data.num_workers)
    if critic is not None:
        model, critic, optimizer, critic_opt, loader = accelerator.prepare(
            model, critic, optimizer, critic_opt, loader)
    else:
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    raw_model = accelerator.unwrap_model(model)
    raw_critic = accelerator.unwrap_model(critic) if critic is not None else None
    ema = _EMA(params, config.ema.decay) if config.ema.enabled else None
    val_batches = None
    if val_set is not None:
        val_loader = torch.utils.data.DataLoader(val_set, batch_size=config.batch.per_device,
                                                 shuffle=False, collate_fn=collate)
        val_batches = [_to_device(b, accelerator.device) for b in val_loader]

    # Resume, or start.
    step, epoch, index = 0, 0, 0
    early = {"best": None, "best_step": None, "bad": 0}
    if resume_from is not None:
        # Each file read inside ckpt.reading: a damaged or foreign one is a one-line
        # CheckpointError naming the folder and the file.
        with ckpt.reading(resume_from / ckpt.TRAINABLE) as f:
            task.load_trainable_state(raw_model, ckpt.load_tensors(f))
        with ckpt.reading(resume_from / "optimizer.pt") as f:
            optimizer.load_state_dict(ckpt.load_pt(f))
        with ckpt.reading(resume_from / "scheduler.pt") as f:
            for s, st in zip(schedulers, ckpt.load_pt(f), strict=True):
                s.load_state_dict(st)
        if critic is not None:
            with ckpt.reading(resume_from / ckpt.CRITIC) as f:
                raw_critic.load_state_dict(ckpt.load_tensors(f))
            with ckpt.reading(resume_from / "critic_optimizer.pt") as f:
                critic_opt.load_state_dict(ckpt.load_pt(f))
        if ema is not None and (resume_from / ckpt.EMA).is_file():
            with ckpt.reading(resume_from / ckpt.EMA) as f:
                shadow = ckpt.load_tensors(f)
                if set(shadow) != set(ema.shadow):
                    raise ValueError("holds other parameters than this run trains")
                ema.shadow = {k: v.to(accelerator.device) for k, v in shadow.items()}
        if accelerator.scaler is not None and (resume_from / "scaler.pt").is_file():
            with ckpt.reading(resume_from / "scaler.pt") as f:
                accelerator.scaler.load_state_dict(ckpt.load_pt(f))
        rng_file = resume_from / f"rng-{rank}.pt"
        if rng_file.is_file():
            with ckpt.reading(rng_file) as f:
                ckpt.set_rng_state(ckpt.load_pt(f))
        step, epoch, index = state["step"], state["epoch"], state["index"]
        early = state.get("early_stopping", early)
        if state.get("processes", nproc) != nproc or state.get("per_device") != \
                config.batch.per_device:
            accelerator.print(
                f"warning: {resume_from.name} was written with {state.get('processes')} "
                f"process(es) x {state.get('per_device')} per device; the data order after "
                "the resume point will differ from an uninterrupted run")

    if main:
        out.mkdir(parents=True, exist_ok=True)
        resolved = config.to_dict()
        if models:   # models handed in (the in-graph node) replace the config's names
            resolved["models_given"] = {
                k: str(getattr(v, "source", None) or getattr(v, "path", None) or
                       type(v).__name__) for k, v in models.items()}
        (out / RUN_CONFIG).write_text(json.dumps(resolved, indent=1, default=str)
                                      + "\n", encoding="utf-8")
        _truncate_metrics(out / METRICS, step)
    if log_with:
        accelerator.init_trackers("train", config=config.flat())
    accelerator.wait_for_everyone()

    stream = _Stream(accelerator, loader, epoch, index)
    if stream.per_epoch == 0:
        raise TrainError("no full micro-batch per process in the training set")
    batches = iter(stream)
    micro = 0                                  # micro-batches consumed by this process
    micro_base = (epoch * stream.per_epoch + index)  # ... before this call
    adv_weight = float(task.weights.get("adv", 0.0)) if critic is not None else 0.0
    rows: list[dict[str, Any]] = []
    last_ckpt: Path | None = None
    stopped_early = interrupted = False
    bar = _progress_bar(main, total, step)
    busy, steps_since = 0.0, 0   # seconds in training steps since the last log
    # What a checkpoint of the last completed step records, kept at the step's end: a
    # Ctrl-C inside the next step finds the stream further on and, with accumulation, the
    # critic's buffers (spectral norm's power iteration) advanced by its micro-batches.
    pos_done = stream.position()
    critic_buffers = _buffers(raw_critic)
    # From the optimiser's step until the step's row is logged the weights are no longer
    # those of the last completed step and not yet a logged one: no checkpoint then.
    busy_update = [False]

    def save(at: int) -> Path:
        return _save_checkpoint(out, at, accelerator, task, raw_model, raw_critic, optimizer,
                                critic_opt, schedulers, ema, early, pos_done, config)

    def updating() -> None:
        busy_update[0] = True

    try:
        model.train()
        if critic is not None:
            critic.train()
        while step < total:
            sums: dict[str, torch.Tensor] = {}
            t0 = time.perf_counter()
            for _ in range(accum):
                batch = next(batches)
                g = (micro_base + micro) * nproc + rank   # index in the global stream
                micro += 1
                set_seed(_mix(config.seed, "batch", g))
                with accelerator.accumulate(model, *([critic] if critic is not None else [])):
                    terms = _micro_step(accelerator, task, model, critic, raw_critic, batch,
                                        optimizer, critic_opt, adv_weight, config, updating)
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0) + v / accum
            # accelerate has stepped the optimisers on the last micro-batch.
            lr = schedulers[0].get_last_lr()[0]   # the rate this step used
            busy_update[0] = True   # (already, unless no micro-batch synchronised)
            for s in schedulers:
                s.step()
            if ema is not None:
                ema.update()
            step += 1
            steps_since += 1
            busy += time.perf_counter() - t0   # validation and checkpoints not counted

            logs: dict[str, Any] = {}
            every = config.steps.checkpoint_every
            periodic = bool(every and step % every == 0) or step == total
            # a checkpoint step is also logged: its loss is checked finite before saving
            do_log = step % config.steps.log_every == 0 or periodic
            do_val = val_batches is not None and config.steps.val_every and (
                step % config.steps.val_every == 0 or step == total)
            if do_log:
                keys = sorted(sums)
                vec = accelerator.reduce(torch.stack([sums[k] for k in keys]), "mean")
                logs = {"step": step, "epoch": stream.position()[0],
                        **{k: float(v) for k, v in zip(keys, vec.tolist(), strict=True)},
                        "lr": lr,
                        "samples_per_s": config.batch.global_ * steps_since / max(busy, 1e-9)}
                busy, steps_since = 0.0, 0
                if not math.isfinite(logs["loss"]):
                    raise TrainError(f"the loss became {logs['loss']} at step {step}; lower "
                                     "optim.lr or use precision bf16/no instead of fp16")
            if do_val:
                val = _validate(task, raw_model, val_batches, ema, config)
                logs = {"step": step, **logs, **val}
                stopped_early = _early_stop(config, val, early, step, out, task, raw_model,
                                            ema, accelerator)
            if logs:
                rows.append(logs)
                if main:
                    with open(out / METRICS, "a", encoding="utf-8") as f:
                        f.write(json.dumps(logs) + "\n")
                if log_with:
                    accelerator.log({k: v for k, v in logs.items() if k != "step"}, step=step)
            # The step is complete (trained, logged, validated): the resume point.
            pos_done = stream.position()
            critic_buffers = _buffers(raw_critic)
            busy_update[0] = False
            if bar is not None:
                bar.update(1)
                if logs and "loss" in logs:
                    bar.set_postfix(loss=f"{logs['loss']:.4f}",
                                    samples_s=f"{logs['samples_per_s']:.1f}")
            if progress is not None and main:
                progress(step, total, logs)
            stop_now = _agree(accelerator, should_stop() if should_stop else False)
            if periodic or stopped_early or stop_now:
                last_ckpt = save(step)
            if stop_now:
                interrupted = True
                break
            if stopped_early:
                break
    except KeyboardInterrupt:
        # One process: the state after the last whole step is consistent, save it. Many
        # processes: each got the signal at another point, so the last periodic checkpoint
        # is the resume point.
        if nproc == 1 and not busy_update[0] and step > 0 and (
                last_ckpt is None or last_ckpt.name != f"{ckpt.PREFIX}{step}"):
            _restore_buffers(raw_critic, critic_buffers)
            save(step)
        _finish_trackers(accelerator)
        raise
    except BaseException:
        _finish_trackers(accelerator)
        raise
    finally:
        if bar is not None:
            bar.close()

    final = None
    if not interrupted:
        final = out / FINAL
        best = out / BEST
        if main:
            if config.early_stopping.metric and best.is_dir():
                ckpt.replace_folder(lambda tmp: _copy_tree(best, tmp), final)
            else:
                _export(task, raw_model, ema, final)
        accelerator.wait_for_everyone()
    accelerator.end_training()  # last: it also ends the process group of a launched run
    return TrainResult(final_dir=final, metrics=rows, stopped_early=stopped_early, steps=step,
                       interrupted=interrupted, out_dir=out, checkpoint=last_ckpt)


def _finish_trackers(accelerator) -> None:
    # Flush what was logged when the loop ends by an exception (end_training would also
    # tear down the process group the other processes may still be using).
    for tracker in accelerator.trackers:
        tracker.finish()


def _buffers(module: nn.Module | None) -> dict[str, torch.Tensor]:
    return {} if module is None else {k: b.detach().clone()
                                      for k, b in module.named_buffers()}


@torch.no_grad()
def _restore_buffers(module: nn.Module | None, saved: dict[str, torch.Tensor]) -> None:
    if module is not None:
        for k, b in module.named_buffers():
            b.copy_(saved[k])


def _micro_step(accelerator, task, model, critic, raw_critic, batch, optimizer, critic_opt,
                adv_weight: float, config: TrainConfig,
                updating: Callable[[], None]) -> dict[str, torch.Tensor]:
    """Forward and backward of one micro-batch; the optimisers step when accelerate says
    the accumulation is complete (they are no-ops otherwise), after ``updating()``."""
    out = model(batch)
    loss = out["loss"]
    terms = _scalar_terms(out)
    if critic is not None:
        raw_critic.requires_grad_(False)  # the generator's term must not train the critic
        try:
            l_adv = task.generator_adversarial(raw_critic, out["fake"])
        finally:
            raw_critic.requires_grad_(True)
        loss = loss + adv_weight * l_adv
        terms["l_adv"] = l_adv.detach().float()
    terms["loss"] = loss.detach().float()
    accelerator.backward(loss)
    if accelerator.sync_gradients and config.optim.max_grad_norm:
        accelerator.clip_grad_norm_(
            [p for p in model.parameters() if p.requires_grad], config.optim.max_grad_norm)
    if accelerator.sync_gradients:
        updating()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if critic is not None:
        c_loss = task.critic_loss(critic, out["real"].detach(), out["fake"].detach())
        terms["critic_loss"] = c_loss.detach().float()
        accelerator.backward(c_loss)
        if accelerator.sync_gradients and config.optim.max_grad_norm:
            accelerator.clip_grad_norm_(critic.parameters(), config.optim.max_grad_norm)
        critic_opt.step()
        critic_opt.zero_grad(set_to_none=True)
    return terms


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _validate(task, raw_model, batches, ema, config: TrainConfig) -> dict[str, float]:
    from accelerate.utils import set_seed

    # The same draws at every validation (the metric is comparable from one to the next);
    # the next micro-batch reseeds the generators, so training is unaffected.
    set_seed(_mix(config.seed, "validation"))
    was_training = raw_model.training
    raw_model.eval()
    try:
        with torch.no_grad(), host.no_progress(), \
                (ema.swapped() if ema is not None else nullcontext()):
            metrics = task.validate(raw_model, batches)
    finally:
        raw_model.train(was_training)
    return {k: float(v) for k, v in metrics.items()}


def _early_stop(config: TrainConfig, val: dict[str, float], early: dict, step: int, out: Path,
                task, raw_model, ema, accelerator) -> bool:
    """Update the early-stopping state; export ``best/`` on improvement; True to stop."""
    es = config.early_stopping
    if es.metric is None:
        return False
    if es.metric not in val:
        raise TrainConfigError(config.source, "early_stopping.metric",
                               f"{es.metric!r} is not among the validation metrics",
                               f"one of {', '.join(sorted(val)) or '(none)'}")
    value = val[es.metric]
    best = early["best"]
    better = best is None or (value < best if es.mode == "min" else value > best)
    if better:
        early.update(best=value, best_step=step, bad=0)
        if accelerator.is_main_process:
            _export(task, raw_model, ema, out / BEST)
        accelerator.wait_for_everyone()
        return False
    early["bad"] += 1
    return early["bad"] >= es.patience


def _export(task, raw_model, ema, target: Path) -> None:
    def build(tmp: Path) -> None:
        with torch.no_grad(), (ema.swapped() if ema is not None else nullcontext()):
            task.export(raw_model, tmp)

    ckpt.replace_folder(build, target)


def _copy_tree(src: Path, dst: Path) -> None:
    for child in src.iterdir():
        if child.is_dir():
            shutil.copytree(child, dst / child.name)
        else:
            shutil.copy2(child, dst / child.name)


def _agree(accelerator, flag: bool) -> bool:
    """Every process stops if any was asked to (they must leave the loop together)."""
    if accelerator.num_processes == 1:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, "sum").item() > 0)


def _save_checkpoint(out: Path, step: int, accelerator, task, raw_model, raw_critic, optimizer,
                     critic_opt, schedulers, ema, early: dict, position: tuple[int, int],
                     config: TrainConfig) -> Path:
    main = accelerator.is_main_process
    accelerator.wait_for_everyone()
    tmp = ckpt.tmp_dir(out, step)
    if main:
        ckpt.begin(out, step)
        ckpt.save_tensors(tmp / ckpt.TRAINABLE, task.trainable_state(raw_model))
        if raw_critic is not None:
            ckpt.save_tensors(tmp / ckpt.CRITIC, raw_critic.state_dict())
            ckpt.save_pt(tmp / "critic_optimizer.pt", critic_opt.state_dict())
        if ema is not None:
            ckpt.save_tensors(tmp / ckpt.EMA, ema.shadow)
        ckpt.save_pt(tmp / "optimizer.pt", optimizer.state_dict())
        ckpt.save_pt(tmp / "scheduler.pt", [s.state_dict() for s in schedulers])
        if accelerator.scaler is not None:
            ckpt.save_pt(tmp / "scaler.pt", accelerator.scaler.state_dict())
        epoch, index = position
        ckpt.write_state(tmp, {
            "step": step, "epoch": epoch, "index": index, "task": config.task,
            "processes": accelerator.num_processes, "per_device": config.batch.per_device,
            "early_stopping": early})
    accelerator.wait_for_everyone()
    ckpt.save_pt(tmp / f"rng-{accelerator.process_index}.pt", ckpt.rng_state())
    accelerator.wait_for_everyone()
    final = ckpt.final_dir(out, step)
    if main:
        ckpt.commit(out, step)
        ckpt.prune(out, config.steps.keep_checkpoints)
    accelerator.wait_for_everyone()
    return final


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop logged rows after ``step`` (a resumed run logs them again)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue
    path.write_text("".join(f"{line}\n" for line in keep), encoding="utf-8")


def _progress_bar(main: bool, total: int, start: int):
    if not main or os.environ.get("XMGIE_NO_PROGRESS"):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
