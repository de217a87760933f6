"""Training configs: one YAML file, checked whole before anything runs.

A config names the task (``xmgie``, ``mgie``, ``mmig``), what the task reads (``model``, ``loss``,
free-form mappings the task validates) and what the engine reads (``data``, ``optim``,
``batch``, ``precision``, ``ema``, ``steps``, ``early_stopping``, ``seed``). A ``tiny:``
mapping is deep-merged over the rest under ``--tiny`` (tiny models, synthetic data, a few
steps). Every unknown key, wrong type or out-of-range value is an error that names the key
and the file, so a typo never silently falls back to a default.

Relative ``data.path`` / ``data.val_path`` are read relative to the config file's folder
(a config and its data can move together); ``--dataset`` on the command line is relative
to the working directory as usual.

The shipped configs live in ``configs/train/`` inside the package and can be named by
their short name (``xmgie``, ``mgie``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..mgie_core.errors import InputError

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "configs" / "train"
TASKS = ("xmgie", "mgie", "mmig")
PRECISIONS = ("no", "fp16", "bf16")
SCHEDULES = ("constant", "cosine")
MODES = ("min", "max")


class TrainConfigError(InputError):
    """A config key is missing, unknown, of the wrong type or out of range."""

    def __init__(self, source: str, key: str, problem: str, expected: str, fix: str = ""):
        self.key = key
        super().__init__(f"{source}: {key}", problem, expected, fix)


# The engine's schema: section -> {key: default}. ``model`` and ``loss`` are the task's.
DEFAULTS: dict[str, Any] = {
    "task": None,
    "model": {},
    "loss": {},
    "data": {"path": None, "format": "auto", "resolution": 256, "val_fraction": 0.05,
             "val_path": None, "columns": None, "split": None, "num_workers": 0,
             "synthetic_items": 16},
    "optim": {"lr": 1e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0,
              "schedule": "constant", "warmup_ratio": 0.0, "max_grad_norm": 1.0,
              "critic_lr": None, "critic_betas": None},
    "batch": {"global": 32, "per_device": 4},
    "precision": "no",
    "gradient_checkpointing": False,
    "ema": {"enabled": False, "decay": 0.999},
    "steps": {"max": 1000, "log_every": 10, "val_every": 100, "checkpoint_every": 500,
              "keep_checkpoints": 3},
    "early_stopping": {"metric": None, "mode": "min", "patience": 5},
    "seed": 0,
}
FREE_FORM = ("model", "loss")


@dataclass(frozen=True)
class DataConfig:
    path: Path | None
    format: str
    resolution: int
    val_fraction: float
    val_path: Path | None
    columns: dict[str, str] | None
    split: str | None
    num_workers: int
    synthetic_items: int


@dataclass(frozen=True)
class OptimConfig:
    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    schedule: str
    warmup_ratio: float
    max_grad_norm: float | None        # None: no clipping
    critic_lr: float                   # defaults to lr
    critic_betas: tuple[float, float]  # defaults to betas


@dataclass(frozen=True)
class BatchConfig:
    global_: int
    per_device: int

    def accumulation(self, num_processes: int, source: str = "config") -> int:
        """Micro-batches each process accumulates per optimiser step so that every step
        sees ``global`` pairs: global / (per_device x processes), which must divide."""
        per_step = self.per_device * num_processes
        if self.global_ % per_step:
            raise TrainConfigError(
                source, "batch.global",
                f"{self.global_} pairs per step cannot be split into micro-batches of "
                f"{self.per_device} on {num_processes} process(es)",
                f"a multiple of batch.per_device x processes = {per_step}",
                "Change batch.global or batch.per_device, or the number of processes.")
        return self.global_ // per_step


@dataclass(frozen=True)
class EMAConfig:
    enabled: bool
    decay: float


@dataclass(frozen=True)
class StepsConfig:
    max: int
    log_every: int
    val_every: int          # 0: no validation
    checkpoint_every: int   # 0: only the final (and interruption) checkpoints
    keep_checkpoints: int   # the last N are kept


@dataclass(frozen=True)
class EarlyStoppingConfig:
    metric: str | None      # None: no early stopping
    mode: str
    patience: int           # validations without improvement before stopping


@dataclass(frozen=True)
class TrainConfig:
    task: str
    model: dict[str, Any]
    loss: dict[str, Any]
    data: DataConfig
    optim: OptimConfig
    batch: BatchConfig
    precision: str
    gradient_checkpointing: bool
    ema: EMAConfig
    steps: StepsConfig
    early_stopping: EarlyStoppingConfig
    seed: int
    tiny: bool = False
    source: str = "config"             # the file it came from (for messages)
    name: str = "run"                  # the file's stem: the default output folder's name
    raw: dict[str, Any] = field(default_factory=dict, repr=False)  # merged mapping

    def flat(self) -> dict[str, Any]:
        """Scalar settings as ``section.key`` -> value (TensorBoard's hparams, logs)."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, Mapping):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            elif isinstance(value, bool | int | float | str):
                out[prefix] = value
            elif value is None:
                out[prefix] = "none"
            else:
                out[prefix] = str(value)

        walk("", {k: v for k, v in self.raw.items() if k != "tiny"})
        out["tiny"] = self.tiny
        return out

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data (written to the run folder)."""
        d = asdict(self)
        d.pop("raw")
        d["batch"] = {"global": self.batch.global_, "per_device": self.batch.per_device}
        for section in ("data",):
            for k, v in d[section].items():
                if isinstance(v, Path):
                    d[section][k] = str(v)
        return d


def resolve_config_path(name: str | Path) -> Path:
    """A config file path, or a shipped config's short name (``xmgie``, ``mgie``)."""
    path = Path(name)
    if path.is_file():
        return path
    if path.suffix == "" and len(path.parts) == 1:
        shipped = SHIPPED_DIR / f"{path.name}.yaml"
        if shipped.is_file():
            return shipped
    known = sorted(p.stem for p in SHIPPED_DIR.glob("*.yaml"))
    raise InputError("config", f"{str(name)!r} is neither a file nor a shipped config",
                     f"a YAML file or one of {', '.join(known) or '(none shipped)'}",
                     "Check the path, or copy a shipped config from "
                     f"{SHIPPED_DIR} and edit it.")


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError("config", f"{path} could not be read ({exc.strerror or exc})",
                         "a readable YAML file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise InputError("config", f"{path} is not valid YAML{line}",
                         "a YAML mapping of the training settings",
                         f"Fix the file ({getattr(exc, 'problem', exc)}).") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise TrainConfigError(str(path), "(top level)", f"found a {type(data).__name__}",
                               "a mapping of sections (task, model, loss, data, ...)")
    return data


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` merged into a copy of ``base``: mappings recursively, anything else
    replaced (a list replaces a list)."""
    out = copy.deepcopy(dict(base))
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def merge_section(defaults: Mapping[str, Any], given: Any, where: str,
                  source: str = "config") -> dict[str, Any]:
    """A task's section (``model``, ``loss``, or a mapping inside one) over its defaults,
    checked: every given key must be one of ``defaults``' (else a
    :class:`TrainConfigError` naming ``where.key`` and the file ``source``); a key whose
    default is a mapping is merged the same way, one level down; None or a missing key
    keeps the default. ``where`` is the section's dotted name (``model.critic``)."""
    if given is None:
        given = {}
    if not isinstance(given, Mapping):
        raise TrainConfigError(source, where, f"found {given!r}", "a mapping")
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise TrainConfigError(source, f"{where}.{unknown[0]}", "unknown key",
                               f"one of {', '.join(defaults)}", "Check the spelling.")
    out = {}
    for key, default in defaults.items():
        value = given.get(key, default)
        if isinstance(default, Mapping):
            out[key] = merge_section(default, value, f"{where}.{key}", source)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _expand_dotted(overrides: Mapping[str, Any]) -> dict[str, Any]:
    # {"steps.max": 5} -> {"steps": {"max": 5}}; nested mappings pass through.
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        parts = str(key).split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        if isinstance(value, Mapping) and isinstance(node.get(parts[-1]), Mapping):
            node[parts[-1]] = deep_merge(node[parts[-1]], value)
        else:
            node[parts[-1]] = value
    return out


class _Checker:
    def __init__(self, source: str):
        self.source = source

    def fail(self, key: str, problem: str, expected: str, fix: str = "") -> None:
        raise TrainConfigError(self.source, key, problem, expected, fix)

    def section(self, raw: dict, name: str) -> dict:
        value = raw.get(name)
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            self.fail(name, f"found {value!r}", "a mapping")
        unknown = sorted(set(value) - set(DEFAULTS[name]))
        if unknown:
            self.fail(f"{name}.{unknown[0]}", "unknown key",
                      f"one of {', '.join(DEFAULTS[name])}", "Check the spelling.")
        return {**DEFAULTS[name], **value}

    def integer(self, key: str, value: Any, minimum: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(key, f"found {value!r}", f"a whole number >= {minimum}")
        if value < minimum:
            self.fail(key, f"found {value}", f"a whole number >= {minimum}")
        return value

    def number(self, key: str, value: Any, low: float, high: float | None = None,
               low_open: bool = False) -> float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(key, f"found {value!r}", "a number")
        value = float(value)
        bad_low = value <= low if low_open else value < low
        if bad_low or (high is not None and value > high):
            span = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high is not None
                                                          else "")
            self.fail(key, f"found {value}", f"a number {span}")
        return value

    def boolean(self, key: str, value: Any) -> bool:
        if not isinstance(value, bool):
            self.fail(key, f"found {value!r}", "true or false")
        return value

    def choice(self, key: str, value: Any, choices: tuple[str, ...]) -> str:
        if value not in choices:
            self.fail(key, f"found {value!r}", f"one of {', '.join(choices)}")
        return value

    def betas(self, key: str, value: Any) -> tuple[float, float]:
        if not isinstance(value, list | tuple) or len(value) != 2:
            self.fail(key, f"found {value!r}", "two numbers in [0, 1), e.g. [0.9, 0.999]")
        b1 = self.number(key, value[0], 0.0, 1.0)
        b2 = self.number(key, value[1], 0.0, 1.0)
        if b1 >= 1.0 or b2 >= 1.0:
            self.fail(key, f"found {value!r}", "two numbers in [0, 1)")
        return b1, b2

    def path(self, key: str, value: Any, base: Path | None) -> Path | None:
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            self.fail(key, f"found {value!r}", "a path (text) or null")
        p = Path(value).expanduser()
        if not p.is_absolute() and base is not None:
            p = base / p
        return p


def load_config(path_or_dict: str | Path | Mapping[str, Any], *, tiny: bool = False,
                overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """Read and check a training config.

    ``path_or_dict``: a YAML file, a shipped config's short name, or a mapping (relative
    data paths are then relative to the working directory). ``tiny``: merge the config's
    ``tiny:`` section over it. ``overrides``: merged last; keys may be nested mappings or
    dotted (``{"steps.max": 5}``).
    """
    if isinstance(path_or_dict, Mapping):
        raw = copy.deepcopy(dict(path_or_dict))
        source, base, name = "config", None, str(raw.get("task") or "run")
    else:
        file = resolve_config_path(path_or_dict)
        raw = _read_yaml(file)
        source, base, name = str(file), file.resolve().parent, file.stem
    check = _Checker(source)

    tiny_section = raw.pop("tiny", None)
    if tiny_section is not None and not isinstance(tiny_section, Mapping):
        check.fail("tiny", f"found {tiny_section!r}", "a mapping merged over the config "
                   "under --tiny")
    unknown = sorted(set(raw) - set(DEFAULTS))
    if unknown:
        check.fail(unknown[0], "unknown key", f"one of {', '.join([*DEFAULTS, 'tiny'])}",
                   "Check the spelling.")
    if tiny and tiny_section:
        bad = sorted(set(tiny_section) - set(DEFAULTS))
        if bad:
            check.fail(f"tiny.{bad[0]}", "unknown key", f"one of {', '.join(DEFAULTS)}")
        raw = deep_merge(raw, tiny_section)
    if overrides:
        raw = deep_merge(raw, _expand_dotted(overrides))
    merged = copy.deepcopy(raw)
    if tiny_section is not None:
        merged["tiny"] = copy.deepcopy(tiny_section)

    task = raw.get("task")
    if task is None:
        check.fail("task", "missing", f"one of {', '.join(TASKS)}")
    check.choice("task", task, TASKS)
    for section in FREE_FORM:
        value = raw.get(section) or {}
        if not isinstance(value, Mapping):
            check.fail(section, f"found {value!r}", "a mapping (read by the task)")
    model, loss = dict(raw.get("model") or {}), dict(raw.get("loss") or {})

    d = check.section(raw, "data")
    if d["format"] not in ("auto", "manifest", "ip2p", "magicbrush", "hf"):
        check.fail("data.format", f"found {d['format']!r}",
                   "one of auto, manifest, ip2p, magicbrush, hf")
    columns = d["columns"]
    if columns is not None and (not isinstance(columns, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in columns.items())):
        check.fail("data.columns", f"found {columns!r}",
                   "a mapping from batch field to dataset column, e.g. {source: input_image}")
    if d["split"] is not None and not isinstance(d["split"], str):
        check.fail("data.split", f"found {d['split']!r}", "a split name or null")
    data = DataConfig(
        path=check.path("data.path", d["path"], base),
        format=d["format"],
        resolution=check.integer("data.resolution", d["resolution"], 8),
        val_fraction=check.number("data.val_fraction", d["val_fraction"], 0.0, 0.9),
        val_path=check.path("data.val_path", d["val_path"], base),
        columns=dict(columns) if columns else None,
        split=d["split"],
        num_workers=check.integer("data.num_workers", d["num_workers"], 0),
        synthetic_items=check.integer("data.synthetic_items", d["synthetic_items"], 2),
    )
    if data.resolution % 8:
        check.fail("data.resolution", f"found {data.resolution}",
                   "a multiple of 8 (the VAE's downsampling)")

    o = check.section(raw, "optim")
    betas = check.betas("optim.betas", o["betas"])
    lr = check.number("optim.lr", o["lr"], 0.0, low_open=True)
    optim = OptimConfig(
        lr=lr, betas=betas,
        eps=check.number("optim.eps", o["eps"], 0.0, low_open=True),
        weight_decay=check.number("optim.weight_decay", o["weight_decay"], 0.0),
        schedule=check.choice("optim.schedule", o["schedule"], SCHEDULES),
        warmup_ratio=check.number("optim.warmup_ratio", o["warmup_ratio"], 0.0, 1.0),
        max_grad_norm=(None if o["max_grad_norm"] in (None, 0) else
                       check.number("optim.max_grad_norm", o["max_grad_norm"], 0.0,
                                    low_open=True)),
        critic_lr=(lr if o["critic_lr"] is None else
                   check.number("optim.critic_lr", o["critic_lr"], 0.0, low_open=True)),
        critic_betas=(betas if o["critic_betas"] is None else
                      check.betas("optim.critic_betas", o["critic_betas"])),
    )

    b = check.section(raw, "batch")
    batch = BatchConfig(global_=check.integer("batch.global", b["global"], 1),
                        per_device=check.integer("batch.per_device", b["per_device"], 1))
    if batch.global_ % batch.per_device:
        check.fail("batch.global", f"{batch.global_} is not a multiple of batch.per_device "
                   f"= {batch.per_device}", "a multiple of batch.per_device")

    precision = raw.get("precision", DEFAULTS["precision"])
    if precision is False:  # YAML 1.1 reads a bare `no` as false
        precision = "no"
    check.choice("precision", precision, PRECISIONS)
    gc = check.boolean("gradient_checkpointing",
                       raw.get("gradient_checkpointing", DEFAULTS["gradient_checkpointing"]))

    e = check.section(raw, "ema")
    ema = EMAConfig(enabled=check.boolean("ema.enabled", e["enabled"]),
                    decay=check.number("ema.decay", e["decay"], 0.0, 1.0))

    s = check.section(raw, "steps")
    steps = StepsConfig(
        max=check.integer("steps.max", s["max"], 1),
        log_every=check.integer("steps.log_every", s["log_every"], 1),
        val_every=check.integer("steps.val_every", s["val_every"], 0),
        checkpoint_every=check.integer("steps.checkpoint_every", s["checkpoint_every"], 0),
        keep_checkpoints=check.integer("steps.keep_checkpoints", s["keep_checkpoints"], 1),
    )

    es_raw = raw.get("early_stopping")
    if es_raw is None:
        es_raw = {"metric": None}
    es = check.section({"early_stopping": es_raw}, "early_stopping")
    metric = es["metric"]
    if metric is not None and (not isinstance(metric, str) or not metric.startswith("val_")):
        check.fail("early_stopping.metric", f"found {metric!r}",
                   "a validation metric name starting with val_ (or null for none)")
    early = EarlyStoppingConfig(
        metric=metric, mode=check.choice("early_stopping.mode", es["mode"], MODES),
        patience=check.integer("early_stopping.patience", es["patience"], 1))
    if early.metric is not None and steps.val_every == 0:
        check.fail("early_stopping.metric", f"{metric!r} is set but steps.val_every is 0",
                   "steps.val_every >= 1 (validation feeds early stopping)")
    if early.metric is not None and data.val_fraction == 0 and data.val_path is None:
        check.fail("early_stopping.metric", f"{metric!r} is set but no pair is held out "
                   "(data.val_fraction is 0 and data.val_path is null)",
                   "data.val_fraction > 0 or a data.val_path to validate on")

    seed = check.integer("seed", raw.get("seed", DEFAULTS["seed"]), 0)
    return TrainConfig(task=task, model=model, loss=loss, data=data, optim=optim,
                       batch=batch, precision=precision, gradient_checkpointing=gc, ema=ema,
                       steps=steps, early_stopping=early, seed=seed, tiny=tiny,
                       source=source, name=name, raw=merged)
