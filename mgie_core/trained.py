"""The on-disk form of trained modules, which the nodes load (docs/algorithms.md §14).

One idea: a trained folder says what it holds in ``trained.json`` and keeps the tensors
in one safetensors file, so a loader knows the kind before reading any weights and
never unpickles anything.

An xMGIE folder (the ``final/`` of ``xmgie train configs/train/xmgie.yaml``)::

    trained.json              {"kind": "xmgie", "format": 1,
                               "pfb": {"sites": [...], "preset": ..., "placement": ...},
                               "ie": {"sites": [...], "channels": [...], "id_dim": D,
                                      "encoder_kind": ...}, ...}   (either may be null)
    xmgie_modules.safetensors pfb.<site>  raw_l, shape [1] (a_l = clamp(raw_l, 0, 1))
                              ie.<site>.weight, ie.<site>.bias  (the 1x1 projection)

An MGIE folder has ``"kind": "mgie"`` and its own files
(:mod:`.models.mgie.trained`); :func:`read_kind` tells them apart.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from . import random_state
from .atomic import write_atomic, write_json
from .errors import InputError
from .trainable import IdentityInjection, PFBWeights

MANIFEST = "trained.json"
WEIGHTS = "xmgie_modules.safetensors"
KINDS = ("xmgie", "mgie")
FORMAT = 1
HOW_TO_MAKE = ("Make one with `xmgie train configs/train/xmgie.yaml --out DIR` (DIR/final/ "
               "is such a folder).")


class TrainedFolderError(InputError):
    """A trained-modules folder that is missing, of another kind, or does not fit."""

    def __init__(self, folder: Path | str, problem: str, expected: str, fix: str = HOW_TO_MAKE):
        super().__init__(f"trained modules folder {folder}", problem, expected, fix)


@dataclasses.dataclass
class TrainedXMGIE:
    """What an xMGIE trained folder holds: PFB's weights and IE (None when not trained)."""

    pfb: PFBWeights | None
    ie: IdentityInjection | None
    meta: dict
    folder: Path


def _read_manifest(folder: Path | str) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise TrainedFolderError(folder, "is no folder" if not folder.exists()
                                 else "is a file, not a folder",
                                 f"a folder with {MANIFEST} and {WEIGHTS}")
    path = folder / MANIFEST
    if not path.is_file():
        raise TrainedFolderError(folder, f"has no {MANIFEST}",
                                 "the output of a training run (its final/ folder)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TrainedFolderError(folder, f"has a {MANIFEST} that is not readable JSON ({exc})",
                                 "the trained.json a training run writes") from exc
    if not isinstance(meta, dict) or meta.get("kind") not in KINDS:
        kind = meta.get("kind") if isinstance(meta, dict) else None
        raise TrainedFolderError(folder, f"has a {MANIFEST} of kind {kind!r}",
                                 f"kind {' or '.join(KINDS)}")
    return meta


def read_kind(folder: Path | str) -> str:
    """"xmgie" or "mgie": the kind of a trained folder, from its trained.json."""
    return _read_manifest(folder)["kind"]


def save_xmgie(folder: Path | str, pfb: PFBWeights | None, ie: IdentityInjection | None,
               extra: dict | None = None) -> Path:
    """Write ``folder`` (created if needed) with the given modules; the weights first,
    then trained.json, each written to a temporary name and renamed, so a folder with a
    trained.json always has its weights. ``extra``: more fields for trained.json (the
    config, steps, metrics)."""
    from safetensors.torch import save_file

    if pfb is None and ie is None:
        raise InputError("trained modules", "are nothing (no PFB weights, no IE)",
                         "PFB weights, an identity injection, or both")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    meta: dict = {"kind": "xmgie", "format": FORMAT, "pfb": None, "ie": None}
    if pfb is not None:
        for site, v in pfb.site_values().items():
            tensors[f"pfb.{site}"] = v.reshape(1).contiguous()
        meta["pfb"] = {"sites": list(pfb.sites), "preset": pfb.preset,
                       "placement": pfb.placement,
                       "alpha": {s: float(v.clamp(0, 1)) for s, v in pfb.site_values().items()}}
    if ie is not None:
        for site, proj in zip(ie.sites, ie.proj):
            tensors[f"ie.{site}.weight"] = proj.weight.detach().float().cpu().contiguous()
            tensors[f"ie.{site}.bias"] = proj.bias.detach().float().cpu().contiguous()
        meta["ie"] = {"sites": list(ie.sites), "channels": list(ie.channels),
                      "id_dim": ie.id_dim, "encoder_kind": ie.encoder_kind}
    meta.update({k: v for k, v in (extra or {}).items() if k not in meta})
    write_atomic(folder / WEIGHTS, lambda p: save_file(tensors, str(p),
                                                       metadata={"kind": "xmgie"}))
    write_json(folder / MANIFEST, meta)
    return folder


def _take(state: dict, key: str, shape: tuple, folder: Path) -> torch.Tensor:
    t = state.get(key)
    if t is None:
        raise TrainedFolderError(folder, f"has {WEIGHTS} without {key!r} (missing where "
                                 f"{MANIFEST} lists it)", f"the {WEIGHTS} written with "
                                 f"this {MANIFEST}", "Copy the whole folder the training run "
                                 "wrote. " + HOW_TO_MAKE)
    if tuple(t.shape) != tuple(shape):
        raise TrainedFolderError(folder, f"has {WEIGHTS} with {key!r} of shape "
                                 f"{tuple(t.shape)}", f"shape {tuple(shape)} ({MANIFEST})")
    return t


def load_xmgie(folder: Path | str, unet=None, device=None) -> TrainedXMGIE:
    """Read an xMGIE trained folder. With ``unet``, check the modules fit it (every site
    exists, IE's widths match) and name what does not. Modules come on ``device``
    (default CPU), float32."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = _read_manifest(folder)
    if meta["kind"] != "xmgie":
        raise TrainedFolderError(folder, f"holds MGIE's trained parts ({MANIFEST} kind "
                                 f"{meta['kind']!r}), not xMGIE's modules",
                                 "an xMGIE trained folder",
                                 "Load it with the MGIE trained-model loader, or make an "
                                 "xMGIE one: `xmgie train configs/train/xmgie.yaml`.")
    if meta.get("format") != FORMAT:
        raise TrainedFolderError(folder, f"has format {meta.get('format')!r}",
                                 f"format {FORMAT}", "Update the pack, or train again. "
                                 + HOW_TO_MAKE)
    path = folder / WEIGHTS
    if not path.is_file():
        raise TrainedFolderError(folder, f"has no {WEIGHTS}",
                                 f"{WEIGHTS} beside {MANIFEST}",
                                 "Copy the whole folder the training run wrote. " + HOW_TO_MAKE)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise TrainedFolderError(folder, f"has a {WEIGHTS} that cannot be read ({exc})",
                                 "a safetensors file") from exc
    pfb = ie = None
    try:
        if meta.get("pfb"):
            m = meta["pfb"]
            pfb = PFBWeights(m["sites"], m.get("preset", "object"),
                             m.get("placement", "pfb_diff"))
            pfb.load_site_values({s: _take(state, f"pfb.{s}", (1,), folder)
                                  for s in pfb.sites})
        if meta.get("ie"):
            m = meta["ie"]
            with random_state.preserved():   # its init draws are overwritten below
                ie = IdentityInjection(m["sites"], m["channels"], m["id_dim"],
                                       m.get("encoder_kind", ""))
            with torch.no_grad():
                for site, c, proj in zip(ie.sites, ie.channels, ie.proj):
                    proj.weight.copy_(_take(state, f"ie.{site}.weight",
                                            (c, c + ie.id_dim, 1, 1), folder))
                    proj.bias.copy_(_take(state, f"ie.{site}.bias", (c,), folder))
    except (KeyError, TypeError) as exc:
        raise TrainedFolderError(folder, f"has a {MANIFEST} without the field {exc}",
                                 "the trained.json a training run writes") from exc
    known = {f"pfb.{s}" for s in (pfb.sites if pfb else ())}
    known |= {f"ie.{s}.{p}" for s in (ie.sites if ie else ()) for p in ("weight", "bias")}
    unknown = sorted(set(state) - known)
    if unknown:
        raise TrainedFolderError(folder, f"has {WEIGHTS} with keys {MANIFEST} does not "
                                 f"list: {unknown[:5]}", "the file written with this "
                                 f"{MANIFEST}")
    if unet is not None:
        check_fits(folder, pfb, ie, unet)
    if device is not None:
        pfb = pfb.to(device) if pfb is not None else None
        ie = ie.to(device) if ie is not None else None
    return TrainedXMGIE(pfb, ie, meta, folder)


def check_fits(folder: Path | str, pfb: PFBWeights | None, ie: IdentityInjection | None,
               unet) -> None:
    """Raise naming the keys of ``folder``'s modules that do not fit ``unet``."""
    modules = dict(unet.named_modules())
    problems = [f"pfb.{s} (no such module)" for s in (pfb.sites if pfb else ())
                if s not in modules]
    problems += [f"ie.{p}" for p in (ie.check_unet(unet) if ie else ())]
    if problems:
        raise TrainedFolderError(folder, f"has {WEIGHTS} keys that do not fit this UNet: "
                                 f"{problems}", "modules trained on this base model",
                                 "Load the base model the modules were trained with, or "
                                 "train for this one: `xmgie train configs/train/xmgie.yaml`.")
