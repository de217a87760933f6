"""Where models live, and the one search order every loader uses.

Search order for a model ``name`` of a family:
  1. ``name`` itself, when it is an existing path (absolute, or relative to the cwd);
  2. ComfyUI's model folders for the family (only when the ComfyUI adapter registered
     a provider: the library never imports ComfyUI);
  3. ``<models_dir>/<folder>`` for each models dir given by :func:`configure`
     (``xmgie --models-dir``) and by ``XMGIE_MODELS_DIR`` (os.pathsep-separated);
  4. the Hugging Face cache, local files only (never a download).

Tiny mode (``xmgie run --tiny``, and the tests) points every family at the random-weight
models written by :mod:`mgie_core.tiny`, whatever name a workflow asks for.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import ModelNotFoundError

ENV_MODELS_DIR = "XMGIE_MODELS_DIR"


@dataclasses.dataclass(frozen=True)
class Family:
    key: str                    # stable id used by loaders and nodes
    what: str                   # human name for messages
    folder: str                 # sub-folder name under a models dir / ComfyUI folder name
    kind: str                   # "file" or "folder"
    extensions: tuple[str, ...] = ()
    default_names: tuple[str, ...] = ()
    published: str = ""
    hf_repos: tuple[str, ...] = ()       # Hub ids looked up in the local HF cache
    folder_marker: str = ""              # a file a valid folder must contain
    comfy_folders: tuple[str, ...] = ()  # ComfyUI folder names (defaults to (folder,))
    tiny_name: str = ""                  # path of the tiny model under <tiny_root>/<folder>/

    @property
    def comfy_names(self) -> tuple[str, ...]:
        return self.comfy_folders or (self.folder,)


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    FAMILIES[family.key] = family
    return family


SD_CHECKPOINT = register_family(Family(
    key="sd_checkpoint", what="Stable Diffusion 1.x checkpoint", folder="checkpoints",
    kind="file", extensions=(".safetensors", ".ckpt"),
    default_names=("v1-5-pruned-emaonly.safetensors",),
    published="https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5 "
              "(v1-5-pruned-emaonly.safetensors), or any SD 1.x fine-tune",
    tiny_name="tiny-sd15.safetensors"))

# SDXL and SD 2.x single files sit in the same checkpoints folder and load through the
# same loaders (the file's keys tell the family); these two entries name their tiny
# models, which tiny mode gives for a checkpoint name that says SDXL or SD 2.x.
SDXL_CHECKPOINT = register_family(Family(
    key="sdxl_checkpoint", what="Stable Diffusion XL checkpoint", folder="checkpoints",
    kind="file", extensions=(".safetensors", ".ckpt"),
    default_names=("sd_xl_base_1.0.safetensors",),
    published="https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0 "
              "(sd_xl_base_1.0.safetensors), or any SDXL fine-tune",
    tiny_name="tiny-sdxl.safetensors"))

SD2_CHECKPOINT = register_family(Family(
    key="sd2_checkpoint", what="Stable Diffusion 2.x checkpoint", folder="checkpoints",
    kind="file", extensions=(".safetensors", ".ckpt"),
    default_names=("v2-1_768-ema-pruned.safetensors",),
    published="https://huggingface.co/stabilityai/stable-diffusion-2-1 "
              "(v2-1_768-ema-pruned.safetensors), or any SD 2.x fine-tune",
    tiny_name="tiny-sd2.safetensors"))

# Words by which a name says SDXL or SD 2.x (tiny mode's rule: see tiny_family)
SDXL_WORDS = ("xl",)
SD2_WORDS = ("v2", "sd2", "2-1", "2.1", "768-v")

SD_DIFFUSERS = register_family(Family(
    key="sd_diffusers", what="Stable Diffusion 1.x diffusers folder", folder="diffusers",
    kind="folder", folder_marker="model_index.json",
    default_names=("stable-diffusion-v1-5",),
    hf_repos=("stable-diffusion-v1-5/stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5"),
    published="https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5 "
              "(the whole repository, diffusers layout)",
    tiny_name="tiny-sd15"))

IP2P_DIFFUSERS = register_family(Family(
    key="ip2p_diffusers", what="InstructPix2Pix diffusers folder", folder="diffusers",
    kind="folder", folder_marker="model_index.json",
    default_names=("instruct-pix2pix",),
    hf_repos=("timbrooks/instruct-pix2pix",),
    published="https://huggingface.co/timbrooks/instruct-pix2pix (diffusers layout)",
    tiny_name="tiny-ip2p"))

SDXL_DIFFUSERS = register_family(Family(
    key="sdxl", what="SDXL diffusers folder", folder="diffusers",
    kind="folder", folder_marker="model_index.json",
    default_names=("stable-diffusion-xl-base-1.0",),
    hf_repos=("stabilityai/stable-diffusion-xl-base-1.0",),
    published="https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0 (diffusers "
              "layout), or any SDXL fine-tune in that layout",
    tiny_name="tiny-sdxl"))

SDXL_IP2P_DIFFUSERS = register_family(Family(
    key="sdxl_ip2p", what="SDXL InstructPix2Pix diffusers folder", folder="diffusers",
    kind="folder", folder_marker="model_index.json",
    default_names=("sdxl-instructpix2pix-768",),
    hf_repos=("diffusers/sdxl-instructpix2pix-768",),
    published="https://huggingface.co/diffusers/sdxl-instructpix2pix-768 (diffusers layout)",
    tiny_name="tiny-sdxl-ip2p"))

SD2_DIFFUSERS = register_family(Family(
    key="sd2", what="Stable Diffusion 2.x diffusers folder", folder="diffusers",
    kind="folder", folder_marker="model_index.json",
    default_names=("stable-diffusion-2-1",),
    hf_repos=("stabilityai/stable-diffusion-2-1",),
    published="https://huggingface.co/stabilityai/stable-diffusion-2-1 (diffusers layout, "
              "768 px v-prediction), or stable-diffusion-2-1-base",
    tiny_name="tiny-sd2"))

MGIE_UNET = register_family(Family(
    key="mgie_unet", what="MGIE instruction UNet (unet.pt)", folder="mgie",
    kind="file", extensions=(".pt", ".pth", ".safetensors"),
    default_names=("unet.pt",),
    published="Apple's MGIE release (github.com/apple/ml-mgie, checkpoint mgie_7b: "
              "unet.pt and mllm.pt); put unet.pt in the mgie folder",
    tiny_name="unet.pt"))

CLIP_TOKENIZER = register_family(Family(
    key="clip_tokenizer", what="CLIP tokenizer for SD 1.x single-file checkpoints",
    folder="clip_tokenizer", kind="folder", folder_marker="vocab.json",
    # ComfyUI ships this tokenizer as comfy/sd1_tokenizer; the adapter registers it.
    default_names=("clip-vit-large-patch14", "sd1_tokenizer"),
    hf_repos=("openai/clip-vit-large-patch14",),
    published="the tokenizer files (vocab.json, merges.txt, tokenizer_config.json, "
              "special_tokens_map.json) of https://huggingface.co/openai/clip-vit-large-patch14 "
              "or the tokenizer/ folder of stable-diffusion-v1-5; inside ComfyUI its own "
              "comfy/sd1_tokenizer is used",
    tiny_name="tiny-clip-tokenizer"))

MGIE = register_family(Family(
    key="mgie", what="MGIE multimodal LLM (mllm.pt + LLaVA-7B v1)", folder="mgie",
    kind="folder", folder_marker="mllm.pt", default_names=("mgie_7b",),
    published="Apple's MGIE release (github.com/apple/ml-mgie, checkpoint mgie_7b: mllm.pt) "
              "on top of LLaVA-7B v1 (the LLaVA-7b-delta-v1 applied to LLaMA-7B) and "
              "https://huggingface.co/openai/clip-vit-large-patch14; see "
              "mgie_core/models/mgie/layout.py for the folder layout",
    tiny_name="tiny-mgie"))

SAM = register_family(Family(
    key="sam", what="Segment Anything checkpoint", folder="sams",
    kind="file", extensions=(".pth", ".pt"),
    default_names=("sam_vit_b_01ec64.pth", "sam_vit_l_0b3195.pth", "sam_vit_h_4b8939.pth"),
    published="https://github.com/facebookresearch/segment-anything#model-checkpoints",
    tiny_name="sam_vit_tiny.pth"))

BLIP2 = register_family(Family(
    key="blip2", what="BLIP-2 captioner (Hugging Face folder)", folder="blip2",
    kind="folder", folder_marker="config.json",
    default_names=("blip2-opt-2.7b",),
    hf_repos=("Salesforce/blip2-opt-2.7b",),
    published="https://huggingface.co/Salesforce/blip2-opt-2.7b (the whole repository)",
    tiny_name="tiny-blip2"))

VLM = register_family(Family(
    key="vlm", what="vision-language model (Hugging Face folder, image-text-to-text)",
    folder="vlm", kind="folder", folder_marker="config.json",
    comfy_folders=("vlm", "LLM"),
    default_names=("Qwen2.5-VL-3B-Instruct", "llava-1.5-7b-hf"),
    hf_repos=("Qwen/Qwen2.5-VL-3B-Instruct", "llava-hf/llava-1.5-7b-hf"),
    published="any transformers image-text-to-text model with a chat template, e.g. "
              "https://huggingface.co/Qwen/Qwen2.5-VL-3B-Instruct",
    tiny_name="tiny-vlm"))

CLIP_VISION = register_family(Family(
    key="clip_vision", what="CLIP vision encoder (Hugging Face folder)", folder="clip_vision",
    kind="folder", folder_marker="config.json",
    default_names=("clip-vit-large-patch14",),
    hf_repos=("openai/clip-vit-large-patch14",),
    published="https://huggingface.co/openai/clip-vit-large-patch14 (the whole repository)",
    tiny_name="tiny-clip-vision"))

FACE_RECOGNITION = register_family(Family(
    key="face_recognition", what="face-recognition state dict (ArcFace IResNet)",
    folder="face_recognition", kind="file", extensions=(".pth", ".pt", ".safetensors"),
    default_names=("arcface_r100.pth",),
    published="insightface arcface_torch (github.com/deepinsight/insightface, "
              "recognition/arcface_torch: an IResNet backbone.pth); rename it as you like",
    tiny_name="arcface_tiny.pth"))

TRAINED = register_family(Family(
    key="xmgie_trained", what="trained xMGIE or MGIE modules (a folder with trained.json)",
    folder="xmgie_trained", kind="folder", folder_marker="trained.json",
    default_names=("xmgie-trained",),
    published="the final/ folder of a training run (xmgie train configs/train/xmgie.yaml "
              "--out RUN writes RUN/final/), or the trained output of the xMGIE Train "
              "Edit Modules node; copy or link it into the xmgie_trained models folder "
              "under a name of your choice",
    tiny_name="tiny-xmgie-trained"))

MMIG = register_family(Family(
    key="mmig", what="MMIG modules (MM-Adapter and/or MMSM, one .safetensors file)",
    folder="xmgie_mmig", kind="file", extensions=(".safetensors",),
    default_names=("mmig.safetensors",),
    published="the mmig.safetensors an MMIG training run writes to its final/ folder "
              "(xmgie train configs/train/mmig_stage1.yaml ... mmig_stage5.yaml --out RUN); "
              "copy or link it into the xmgie_mmig models folder under a name of your choice",
    tiny_name="tiny-mmig.safetensors"))


# --- configuration ------------------------------------------------------------------

_models_dirs: list[Path] = []
_tiny_root: Path | None = None
# Returns the ComfyUI folders for a ComfyUI folder name; installed by the adapter.
_comfy_provider: Callable[[str], list[str]] | None = None


def configure(models_dir: Iterable[str | Path] | str | Path | None = None,
              tiny_root: str | Path | None = None, *, reset: bool = False) -> None:
    """Set the ``--models-dir`` folders and/or tiny mode. ``reset`` clears both first."""
    global _models_dirs, _tiny_root
    if reset:
        _models_dirs = []
        _tiny_root = None
    if models_dir is not None:
        if isinstance(models_dir, (str, Path)):
            models_dir = [models_dir]
        _models_dirs = [Path(p).expanduser() for p in models_dir]
    if tiny_root is not None:
        _tiny_root = Path(tiny_root)


def tiny_root() -> Path | None:
    return _tiny_root


def set_comfy_provider(provider: Callable[[str], list[str]] | None) -> None:
    global _comfy_provider
    _comfy_provider = provider


def models_dirs() -> list[Path]:
    dirs = list(_models_dirs)
    env = os.environ.get(ENV_MODELS_DIR, "")
    dirs += [Path(p).expanduser() for p in env.split(os.pathsep) if p]
    return dirs


def search_dirs(family: Family | str) -> list[Path]:
    """Folders searched for a family, in order (HF cache not included)."""
    fam = FAMILIES[family] if isinstance(family, str) else family
    dirs: list[Path] = []
    if _comfy_provider is not None:
        for name in fam.comfy_names:
            try:
                dirs += [Path(p) for p in _comfy_provider(name)]
            except Exception:  # an unregistered folder name in an older ComfyUI
                pass
    dirs += [d / fam.folder for d in models_dirs()]
    seen, out = set(), []
    for d in dirs:
        if str(d) not in seen:
            seen.add(str(d))
            out.append(d)
    return out


def _valid(fam: Family, p: Path) -> bool:
    if fam.kind == "folder":
        return p.is_dir() and (not fam.folder_marker or (p / fam.folder_marker).exists())
    return p.is_file()


def _hf_cache(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        return None


def _wording() -> dict[str, tuple[tuple[Family, tuple[str, ...]], ...]]:
    """For a family whose loaders also read SDXL and SD 2.x models (the same folder, the
    same nodes): those families, each with the words by which a name says it, in order
    (a name saying none is the family's own)."""
    return {SD_CHECKPOINT.key: ((SDXL_CHECKPOINT, SDXL_WORDS), (SD2_CHECKPOINT, SD2_WORDS)),
            SD_DIFFUSERS.key: ((SDXL_DIFFUSERS, SDXL_WORDS), (SD2_DIFFUSERS, SD2_WORDS)),
            IP2P_DIFFUSERS.key: ((SDXL_IP2P_DIFFUSERS, SDXL_WORDS),)}


def tiny_family(family: Family | str, name: str) -> Family:
    """The family whose tiny model tiny mode gives for ``name``: a checkpoint or folder
    name that says SDXL or SD 2.x gets that family's (``juggernautXL_v9.safetensors``:
    the tiny SDXL single file; ``sdxl-instructpix2pix-768``: the tiny SDXL
    InstructPix2Pix), so a workflow naming an SDXL model runs on the tiny SDXL; any
    other name its own family's."""
    fam = FAMILIES[family] if isinstance(family, str) else family
    low = Path(name or "").name.lower()
    for other, words in _wording().get(fam.key, ()):
        if any(w in low for w in words):
            return other
    return fam


def _default_names(fam: Family) -> list[str]:
    """The names a loader of ``fam`` offers when nothing is found: its own defaults, then
    those of the SDXL and SD 2.x families it also reads."""
    names = list(fam.default_names)
    names += [n for other, _ in _wording().get(fam.key, ()) for n in other.default_names]
    return names


def resolve(family: Family | str, name: str) -> Path:
    """Find model ``name`` of ``family`` or raise :class:`ModelNotFoundError`."""
    fam = FAMILIES[family] if isinstance(family, str) else family
    if _tiny_root is not None:
        fam = tiny_family(fam, name)
        p = _tiny_root / fam.folder / fam.tiny_name
        if not _valid(fam, p):
            raise ModelNotFoundError(f"tiny {fam.what}", fam.tiny_name, [p],
                                     hint="Tiny models are written by xmgie's tiny module; "
                                          "rerun with --tiny to rebuild them.")
        return p
    searched: list[Path | str] = []
    if name:
        direct = Path(name).expanduser()
        if _valid(fam, direct):
            return direct
        if direct.is_absolute():
            searched.append(direct)
        for d in search_dirs(fam):
            p = d / name
            searched.append(p)
            if _valid(fam, p):
                return p
    repos = ([name] if name.count("/") == 1 and not Path(name).is_absolute() else []) \
        + list(fam.hf_repos if name in fam.default_names or not name else ())
    for repo in repos:
        searched.append(f"Hugging Face cache (local files only): {repo}")
        p = _hf_cache(repo)
        if p is not None and _valid(fam, p):
            return p
    raise ModelNotFoundError(fam.what, name, searched, fam.published, hint=where_to_put(fam))


def in_comfyui() -> bool:
    """True when ComfyUI is the host: its adapter (``nodes/_comfy.py``) registered
    ComfyUI's model folders as the first place to search."""
    return _comfy_provider is not None


def where_to_put(family: Family | str) -> str:
    """Where a missing model of ``family`` goes, said for the host that runs the pack:
    ComfyUI's model folders inside ComfyUI; the models dir options standalone."""
    fam = FAMILIES[family] if isinstance(family, str) else family
    if in_comfyui():
        names = " or ".join(f"models/{n}" for n in fam.comfy_names)
        return (f"Put it in ComfyUI's {names} folder (or a '{fam.comfy_names[0]}' folder "
                f"that extra_model_paths.yaml adds), then refresh the node definitions "
                f"(press R in the browser) so the loader lists it.")
    return (f"Put it in a '{fam.folder}' folder inside a models folder and name that "
            f"folder with --models-dir (xmgie run/check/batch) or the {ENV_MODELS_DIR} "
            f"environment variable (Python: mgie_core.paths.configure(models_dir=...)).")


def _cached_defaults(fam: Family) -> list[str]:
    """Default names a local Hugging Face cache answers (no download): one default with
    any of the family's repositories, else each default with its repository in order."""
    if not fam.hf_repos:
        return []
    if len(fam.default_names) == 1:
        pairs = [(fam.default_names[0], r) for r in fam.hf_repos]
    else:
        pairs = list(zip(fam.default_names, fam.hf_repos, strict=False))
    out: list[str] = []
    for name, repo in pairs:
        if name not in out:
            p = _hf_cache(repo)
            if p is not None and _valid(fam, p):
                out.append(name)
    return out


def _part_of_folder_model(fam: Family, root: Path, file: Path) -> bool:
    """True when ``file`` (found under ``root``) belongs to a folder model of another
    family kept in the same folder: in models/mgie, the MGIE folder (mgie_7b/: mllm.pt,
    the LLaVA and CLIP weights) sits beside unet.pt, and its files are no MGIE UNets. A
    file at that folder's top level other than its marker stays listed (Apple's mgie_7b
    holds unet.pt beside mllm.pt)."""
    others = [o for o in FAMILIES.values() if o.kind == "folder" and o is not fam
              and set(o.comfy_names) & set(fam.comfy_names)]
    for sub in list(file.relative_to(root).parents)[:-1]:
        for other in others:
            if _valid(other, root / sub):
                return not (file.parent == root / sub and file.name != other.folder_marker)
    return False


def list_models(family: Family | str) -> list[str]:
    """Names to offer in a node's dropdown.

    Inside ComfyUI (:func:`in_comfyui`): only the models that exist (in its folders, the
    models dirs, or the local Hugging Face cache under a default name), as ComfyUI's own
    loaders list theirs, so its frontend can flag a workflow's missing model before the
    run. Standalone (``xmgie run``/``check``, the library), the published default names
    follow what is found: a workflow naming a missing default then reaches the loader's
    not-found error, which says where to get the model and where to put it. Tiny mode:
    the defaults, which it answers whatever the name."""
    fam = FAMILIES[family] if isinstance(family, str) else family
    if _tiny_root is not None:
        return _default_names(fam)
    found: list[str] = []
    for d in search_dirs(fam):
        if not d.is_dir():
            continue
        for p in sorted(d.rglob("*") if fam.kind == "file" else d.iterdir()):
            if fam.kind == "file" and p.is_file() and p.suffix.lower() in fam.extensions:
                if not _part_of_folder_model(fam, d, p):
                    found.append(p.relative_to(d).as_posix())
            elif fam.kind == "folder" and _valid(fam, p):
                found.append(p.name)
    more = _cached_defaults(fam) if in_comfyui() else _default_names(fam)
    out = []
    for n in found + more:
        if n not in out:
            out.append(n)
    return out
