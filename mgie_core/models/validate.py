"""The rules every loader applies to what it reads, in one place.

Three kinds of check, shared by the SD, MGIE, SAM, BLIP-2, VLM and identity loaders:

* **Configs are data.** A model folder is somebody else's files: a ``model_index.json``
  names a Python module and class for each component, a Hugging Face ``config.json`` or
  ``tokenizer_config.json`` may carry an ``auto_map`` pointing at code. diffusers imports
  the module a ``model_index.json`` names (from the working directory, if a file of that
  name is there), and transformers runs ``auto_map`` code when asked to trust it. So every
  JSON config is read here with :func:`json.loads` first, an entry that asks for code
  (``auto_map``, ``custom_pipeline``) is refused, and each component may only be one of
  the classes the loader knows (:data:`SD_COMPONENTS`, the per-loader lists of
  transformers classes). Nothing a folder says is ever imported.
* **Every weight accounted for.** A missing weight leaves a layer at its random
  initialisation and an unexpected one means the file is another model; both are
  errors naming the file and the first keys (:func:`check_state_dict_keys`,
  :func:`load_state_dict_checked` for state dicts we load ourselves,
  :func:`check_loading_info` for ``from_pretrained``). Keys a file may carry without
  harm are listed by each loader as a documented allow-list of patterns.
* **A tokenizer that is really there** (:func:`check_tokenizer`): transformers 5 can
  return a stub tokenizer silently when tokenizer files are missing (tiny vocabulary,
  model_max_length of 1e30); that must be a failed load, not a model that later
  produces garbage.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch

from ..errors import ModelLoadError

MIN_VOCAB = 1000
MAX_MODEL_MAX_LENGTH = 1_000_000

# Config entries that make diffusers or transformers import Python code.
CODE_KEYS = ("auto_map", "custom_pipeline", "custom_pipelines")
# JSON files of a Hugging Face folder that are vocabularies or weight maps, not configs.
NOT_CONFIGS = ("tokenizer.json", "vocab.json", "added_tokens.json")
# Config fields that name a transformers class; each must be a class transformers itself
# defines (a name it does not know can only be resolved through custom code).
CLASS_FIELDS = ("tokenizer_class", "processor_class", "image_processor_type",
                "feature_extractor_type", "video_processor_type")

NO_CODE_FIX = ("xMGIE never imports or runs code from model folders. Use the model's "
               "standard files (a model that needs its own Python code is not supported), "
               "or delete that entry if the model is a standard one.")


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "(no message)"


def _short(value, n: int = 80) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) \
        else repr(value)
    return text if len(text) <= n else text[:n - 3] + "..."


# --- configs are data ---------------------------------------------------------------

def refuse_code(data, path: Path | str, what: str) -> None:
    """Refuse a config that asks for Python code anywhere in it (``auto_map`` ...)."""
    stack = [(data, "")]
    while stack:
        obj, where = stack.pop()
        if isinstance(obj, dict):
            for key, value in obj.items():
                if key in CODE_KEYS and value:
                    raise ModelLoadError(what, path, f"its '{where}{key}' entry names Python "
                                         f"code to import ({_short(value)})", NO_CODE_FIX)
                stack.append((value, f"{where}{key}."))
        elif isinstance(obj, list):
            stack.extend((v, where) for v in obj)


def read_json(path: Path | str, what: str, fix: str = "") -> dict:
    """A JSON config read as data, refused when it asks for code; errors name the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ModelLoadError(what, path, f"it could not be read ({first_line(e)})",
                             fix or "Copy the model's files again.") from e
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ModelLoadError(what, path, f"it is not valid JSON ({first_line(e)})",
                             fix or "Copy the model's files again.") from e
    if not isinstance(data, dict):
        raise ModelLoadError(what, path, f"it holds a JSON {type(data).__name__}, not an "
                             "object", fix or "Copy the model's files again.")
    refuse_code(data, path, what)
    return data


def _transformers_names(names: Iterable[str]) -> list[str]:
    """The names transformers does not define (looked up in transformers only). The
    legacy ``...FeatureExtractor`` names published configs still carry (e.g. OpenAI
    CLIP's ``CLIPFeatureExtractor``) count as their ``...ImageProcessor`` successors,
    which is how transformers 5 reads them."""
    import transformers

    def known(name) -> bool:
        if not (isinstance(name, str) and name.isidentifier()):
            return False
        return any(hasattr(transformers, n) for n in
                   (name, name.replace("FeatureExtractor", "ImageProcessor")))

    return [n for n in names if not known(n)]


def check_hf_folder(folder: Path | str, what: str, *, model_types: Iterable[str] | None = None,
                    architectures: Iterable[str] | None = None,
                    config_name: str = "config.json") -> dict:
    """Check every JSON config of a Hugging Face folder before transformers reads it.

    No config may ask for code; class names in tokenizer/processor configs must be
    transformers classes; ``config.json``'s ``model_type`` must be one of
    ``model_types`` and its ``architectures`` among ``architectures`` (None: any class
    transformers defines). Returns ``config.json`` (empty when the folder has none)."""
    folder = Path(folder)
    config: dict = {}
    for f in sorted(folder.glob("*.json")):
        if f.name in NOT_CONFIGS or f.name.endswith(".index.json"):
            continue
        data = read_json(f, what)
        if f.name == config_name:
            config = data
        stack = [data]
        while stack:
            obj = stack.pop()
            if not isinstance(obj, dict):
                continue
            for key in CLASS_FIELDS:
                if isinstance(obj.get(key), str):
                    bad = _transformers_names([obj[key]])
                    if bad:
                        raise ModelLoadError(what, f, f"its {key} '{bad[0]}' is not a class "
                                             "of transformers", NO_CODE_FIX)
            stack += [v for v in obj.values() if isinstance(v, dict)]
    if config_name in {f.name for f in folder.glob("*.json")}:
        _check_model_classes(config, folder / config_name, what, model_types, architectures)
    return config


def _check_model_classes(config: dict, path: Path, what: str,
                         model_types: Iterable[str] | None,
                         architectures: Iterable[str] | None) -> None:
    if model_types is not None:
        allowed = sorted(set(model_types))
        if config.get("model_type") not in allowed:
            shown = ", ".join(allowed[:8]) + (", ..." if len(allowed) > 8 else "")
            raise ModelLoadError(what, path, f"its model_type is {_short(config.get('model_type'))}"
                                 f", not one this loader reads ({shown})",
                                 "Pick a model folder of the kind this loader expects.")
    archs = config.get("architectures") or []
    if not isinstance(archs, list):
        raise ModelLoadError(what, path, f"its architectures entry is {_short(archs)}, not a "
                             "list of class names")
    if architectures is not None:
        allowed = set(architectures)
        bad = [a for a in archs if a not in allowed]
    else:
        bad = _transformers_names(archs)
    if bad:
        raise ModelLoadError(what, path, f"its architectures name {_short(bad[0])}, which "
                             "this loader does not build", NO_CODE_FIX)


# CLIP folders (identity encoder, MGIE's vision tower): the classes their config.json may
# name (the vision tower is always built with transformers' CLIP vision classes), and the
# weights a whole CLIP folder carries besides the vision tower (documented allow-list):
# the text tower, its projection and the logit scale, and position_ids buffers of older
# exports, which transformers computes.
CLIP_ARCHITECTURES = ("CLIPModel", "CLIPVisionModel", "CLIPVisionModelWithProjection")
CLIP_TEXT_KEYS = ("text_model.*", "text_projection.*", "logit_scale", "*.position_ids")


# --- diffusers folders ------------------------------------------------------------------

# Schedulers a Stable Diffusion model_index.json may name (only their numbers are read:
# sampling always uses DDIM with the settings of docs/algorithms.md section 0).
SD_SCHEDULERS = frozenset({
    "DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler",
    "EulerDiscreteScheduler", "HeunDiscreteScheduler", "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler", "DEISMultistepScheduler", "UniPCMultistepScheduler",
    "DPMSolverSDEScheduler", "LCMScheduler", "TCDScheduler"})
# Component -> the (library, class) pairs it may be; [null, null] means "absent".
SD_COMPONENTS: dict[str, frozenset] = {
    "unet": frozenset({("diffusers", "UNet2DConditionModel")}),
    "vae": frozenset({("diffusers", "AutoencoderKL")}),
    "text_encoder": frozenset({("transformers", "CLIPTextModel")}),
    "tokenizer": frozenset({("transformers", "CLIPTokenizer"),
                            ("transformers", "CLIPTokenizerFast")}),
    "scheduler": frozenset(("diffusers", s) for s in SD_SCHEDULERS),
    # Never loaded by xMGIE, but published SD folders name them.
    "safety_checker": frozenset({("stable_diffusion", "StableDiffusionSafetyChecker")}),
    "feature_extractor": frozenset({("transformers", "CLIPImageProcessor"),
                                    ("transformers", "CLIPFeatureExtractor")}),
    "image_encoder": frozenset({("transformers", "CLIPVisionModelWithProjection")}),
    # SDXL: OpenCLIP-bigG with its projection, and its tokenizer.
    "text_encoder_2": frozenset({("transformers", "CLIPTextModelWithProjection")}),
    "tokenizer_2": frozenset({("transformers", "CLIPTokenizer"),
                              ("transformers", "CLIPTokenizerFast")}),
}
SD_PIPELINES = frozenset({"StableDiffusionPipeline", "StableDiffusionInstructPix2PixPipeline",
                          "StableDiffusionImg2ImgPipeline", "StableDiffusionXLPipeline",
                          "StableDiffusionXLImg2ImgPipeline",
                          "StableDiffusionXLInstructPix2PixPipeline"})
# Component sub-folder -> (config file, field, allowed values) checked in it.
SD_COMPONENT_CONFIGS = {
    "unet": ("config.json", "_class_name", frozenset({"UNet2DConditionModel"})),
    "vae": ("config.json", "_class_name", frozenset({"AutoencoderKL"})),
    "text_encoder": ("config.json", "model_type", frozenset({"clip_text_model"})),
    "scheduler": ("scheduler_config.json", "_class_name", SD_SCHEDULERS),
}
SD_TEXT_ENCODER_ARCHITECTURES = ("CLIPTextModel",)
SD_TEXT_ENCODER_2_ARCHITECTURES = ("CLIPTextModelWithProjection",)
SD_TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast")


def check_model_index(folder: Path | str, what: str) -> dict:
    """``model_index.json`` of a Stable Diffusion folder, every component checked against
    :data:`SD_COMPONENTS` (never imported)."""
    path = Path(folder) / "model_index.json"
    index = read_json(path, what)
    fix = ("A Stable Diffusion model_index.json names diffusers/transformers classes "
           "only, e.g. \"unet\": [\"diffusers\", \"UNet2DConditionModel\"]. " + NO_CODE_FIX)
    if index.get("_class_name") not in SD_PIPELINES:
        raise ModelLoadError(what, path, f"its _class_name is {_short(index.get('_class_name'))}"
                             f", not one of {', '.join(sorted(SD_PIPELINES))}", fix)
    for name, value in index.items():
        if name.startswith("_") or isinstance(value, (bool, int, float, str, type(None))):
            continue
        if not (isinstance(value, list) and len(value) == 2):
            raise ModelLoadError(what, path, f"its entry '{name}' is {_short(value)}, not a "
                                 "[library, class] pair", fix)
        if value == [None, None]:
            continue
        allowed = SD_COMPONENTS.get(name)
        if allowed is None:
            raise ModelLoadError(what, path, f"it names a component '{name}' "
                                 f"({_short(value)}) that Stable Diffusion (1.x, 2.x, XL) "
                                 "does not have", fix)
        if tuple(value) not in allowed:
            shown = ", ".join(f"{lib}.{cls}" for lib, cls in sorted(allowed)[:4])
            raise ModelLoadError(what, path, f"its component '{name}' is {_short(value)}; "
                                 f"only {shown}{', ...' if len(allowed) > 4 else ''} is allowed",
                                 fix)
    return index


def read_sd_configs(folder: Path | str, what: str) -> dict[str, dict]:
    """The configs of a Stable Diffusion diffusers (or config-only) folder, as data:
    ``model_index.json`` and the unet/vae/text_encoder/scheduler configs, each checked
    (component classes, no code), plus the tokenizer folder's configs when present."""
    folder = Path(folder)
    out = {"model_index": check_model_index(folder, what)}
    for component, (name, field, allowed) in SD_COMPONENT_CONFIGS.items():
        path = folder / component / name
        cfg = read_json(path, what, f"A diffusers Stable Diffusion folder has {component}/{name}.")
        if cfg.get(field) not in allowed:
            shown = ", ".join(sorted(allowed)[:4]) + (", ..." if len(allowed) > 4 else "")
            raise ModelLoadError(what, path, f"its {field} is {_short(cfg.get(field))}, not "
                                 f"{shown}", NO_CODE_FIX)
        for f in sorted((folder / component).glob("*.json")):
            if f.name != name and not f.name.endswith(".index.json"):
                read_json(f, what)
        out[component] = cfg
    _check_model_classes(out["text_encoder"], folder / "text_encoder" / "config.json", what,
                         None, SD_TEXT_ENCODER_ARCHITECTURES)
    if out["model_index"].get("text_encoder_2", [None, None]) != [None, None]:
        # SDXL's second text encoder
        path = folder / "text_encoder_2" / "config.json"
        cfg = read_json(path, what, "An SDXL folder has text_encoder_2/config.json.")
        _check_model_classes(cfg, path, what, ("clip_text_model",),
                             SD_TEXT_ENCODER_2_ARCHITECTURES)
        out["text_encoder_2"] = cfg
    for name in ("tokenizer", "tokenizer_2"):
        if (folder / name).is_dir():
            check_tokenizer_folder(folder / name, what)
    return out


def check_tokenizer_folder(folder: Path | str, what: str,
                           classes: Sequence[str] = SD_TOKENIZER_CLASSES) -> None:
    """A CLIP tokenizer folder: configs without code, a CLIP tokenizer class if named."""
    check_hf_folder(folder, what)
    path = Path(folder) / "tokenizer_config.json"
    if path.exists():
        cls = read_json(path, what).get("tokenizer_class")
        if cls is not None and cls not in classes:
            raise ModelLoadError(what, path, f"its tokenizer_class is {_short(cls)}, not "
                                 f"{' or '.join(classes)}", NO_CODE_FIX)


# --- tokenizers and files -----------------------------------------------------------

def check_tokenizer(tokenizer, path: Path | str, what: str = "tokenizer") -> None:
    size = len(tokenizer)
    if size < MIN_VOCAB:
        raise ModelLoadError(
            what, path, f"the tokenizer has only {size} entries (at least {MIN_VOCAB} expected): "
            "its files (tokenizer.json, or vocab.json + merges.txt, or tokenizer.model) are "
            "missing or incomplete", "Copy the tokenizer files of the model into this folder.")
    mml = getattr(tokenizer, "model_max_length", None)
    if mml is not None and mml > MAX_MODEL_MAX_LENGTH:
        raise ModelLoadError(
            what, path, f"the tokenizer's model_max_length is {mml:g}, which means its "
            "tokenizer_config.json was not found", "Copy tokenizer_config.json of the model "
            "into this folder.")


def check_files(folder: Path, required: Iterable[str], what: str, fix: str = "") -> None:
    missing = [r for r in required if not (Path(folder) / r).exists()]
    if missing:
        raise ModelLoadError(what, folder, "missing " + ", ".join(missing), fix)


# --- weights ------------------------------------------------------------------------

def _matches(key: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def check_state_dict_keys(what: str, path: Path | str, missing: Iterable[str],
                          unexpected: Iterable[str], mismatched: Iterable[str] = (),
                          optional: Sequence[str] = (), limit: int = 8) -> None:
    """Raise when weights are missing, unexpected or of the wrong shape, naming the file
    and the first keys of each. ``optional`` are fnmatch patterns of keys a file may
    carry or lack without harm (each loader documents its own)."""
    missing = sorted(k for k in missing if not _matches(k, optional))
    unexpected = sorted(k for k in unexpected if not _matches(k, optional))
    mismatched = list(mismatched)
    if not missing and not unexpected and not mismatched:
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} weights missing (e.g. {', '.join(missing[:limit])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected weights (e.g. {', '.join(unexpected[:limit])})")
    if mismatched:
        parts.append(f"{len(mismatched)} weights of the wrong shape "
                     f"({'; '.join(mismatched[:limit])})")
    raise ModelLoadError(what, path, "; ".join(parts),
                         "Check that the file is the model this loader expects, and download "
                         "it again if it may be incomplete.")


def _core_shape(shape) -> tuple[int, ...]:
    # A 1x1 convolution and a linear layer hold the same weights (VAE attention).
    shape = tuple(shape)
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def compare_state_dicts(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor],
                        *, loose_1x1: bool = False) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, mismatched) of ``got`` against ``expected``; mismatched
    entries read ``key (file shape, model shape)``."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    mismatched = []
    for k, v in got.items():
        if k in expected and isinstance(v, torch.Tensor):
            a, b = tuple(v.shape), tuple(expected[k].shape)
            if a != b and not (loose_1x1 and _core_shape(a) == _core_shape(b)):
                mismatched.append(f"{k}: {a} in the file, {b} in the model")
    return missing, unexpected, mismatched


def load_state_dict_checked(module: torch.nn.Module, state: Mapping[str, torch.Tensor],
                            what: str, path: Path | str, optional: Sequence[str] = ()) -> None:
    """Load ``state`` into ``module`` after checking every key and shape (errors name the
    file and the tensors); keys matching ``optional`` may be absent or extra."""
    own = module.state_dict()
    missing, unexpected, mismatched = compare_state_dicts(own, state)
    check_state_dict_keys(what, path, missing, unexpected, mismatched, optional)
    module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


def check_loading_info(info: Mapping, what: str, path: Path | str,
                       optional: Sequence[str] = ()) -> None:
    """Check what ``from_pretrained(..., output_loading_info=True)`` reports."""
    mismatched = []
    for item in info.get("mismatched_keys", ()) or ():
        if isinstance(item, (tuple, list)) and len(item) == 3:
            mismatched.append(f"{item[0]}: {tuple(item[1])} in the file, {tuple(item[2])} "
                              "in the model")
        else:
            mismatched.append(str(item[0] if isinstance(item, (tuple, list)) else item))
    check_state_dict_keys(what, path, info.get("missing_keys", ()) or (),
                          info.get("unexpected_keys", ()) or (), mismatched, optional)


def weights_file(folder: Path | str) -> Path:
    """The weights file of a model folder, for messages (the folder when there are
    several shards or none)."""
    folder = Path(folder)
    files = sorted(p for p in folder.glob("*") if p.suffix in (".safetensors", ".bin"))
    return files[0] if len(files) == 1 else folder


def describe_load_error(exc: BaseException) -> str:
    """The useful part of a loading exception: torch's "size mismatch for <tensor>"
    lines when there are any (they come after a generic first line), else line one."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    sizes = [ln for ln in lines if ln.startswith(("size mismatch for", "Missing key",
                                                  "Unexpected key"))]
    if sizes:
        return "; ".join(sizes[:4]) + (f"; ... ({len(sizes)} in all)" if len(sizes) > 4 else "")
    return f"{type(exc).__name__}: {lines[0] if lines else '(no message)'}"


def read_weights_file(path: Path | str, what: str, wrappers: Sequence[str] = ("state_dict",),
                      unwrap_unless: str = "", mmap: bool = False) -> dict[str, torch.Tensor]:
    """A .safetensors file or a ``torch.load(weights_only=True)`` pickle as a dict of
    tensors (unwrapping the first of ``wrappers`` found, unless a key starting with
    ``unwrap_unless`` is at the top); every failure names the file."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            try:
                state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError:
                if not mmap:
                    raise
                # Files in the legacy (non-zip) format cannot be memory-mapped.
                state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a zip/pickle, a pickled object (weights_only)
        raise ModelLoadError(what, path, f"it could not be read as weights ({type(e).__name__}: "
                             f"{first_line(e)})", "Download it again; a file holding "
                             "anything but tensors is refused (weights_only).") from e
    if isinstance(state, dict) and not (unwrap_unless and any(
            str(k).startswith(unwrap_unless) for k in state)):
        for wrapper in wrappers:
            if isinstance(state.get(wrapper), dict):
                state = state[wrapper]
                break
    if not isinstance(state, dict):
        raise ModelLoadError(what, path, f"it holds a {type(state).__name__}, not a state dict "
                             "of tensors", "Use the published weights file.")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ModelLoadError(what, path, f"{len(bad)} entries are not tensors (e.g. "
                             f"{', '.join(map(str, bad[:4]))})", "Use the published weights file.")
    return state
