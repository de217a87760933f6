"""Identity encoders and the identity preservation score (docs/algorithms.md section 8).

e_id = E_id(X) is a frozen encoder: a face-recognition network (ArcFace IResNet) for
people, or a CLIP image embedding for objects. IPS = cos(E_id(edited), E_id(source)).

Identity guidance backpropagates through :meth:`IdentityEncoder.embed`, so the whole
preprocessing (resize, crop, normalise) is done with differentiable torch operations on
the image tensor, never through PIL or numpy.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import grad_mode, host, memory, paths
from ..errors import InputError, ModelLoadError, names_list
from . import iresnet
from .validate import (
    CLIP_ARCHITECTURES,
    CLIP_TEXT_KEYS,
    check_hf_folder,
    check_loading_info,
    describe_load_error,
    load_state_dict_checked,
    read_json,
    read_weights_file,
    weights_file,
)

KINDS = ("clip_vision", "face_recognition")
FAMILY_OF_KIND = {"clip_vision": paths.CLIP_VISION, "face_recognition": paths.FACE_RECOGNITION}

# OpenAI CLIP's normalisation, used only when a folder has no preprocessor_config.json.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass
class IdentityEncoder:
    """A frozen image/face encoder and how to prepare images for it.

    Preprocessing: optionally resize so the shortest edge is ``resize_shortest`` (keeping
    the aspect ratio; None resizes straight to ``size``), center-crop to ``size`` (H, W),
    then ``(x - mean) / std`` on 0..1 RGB."""

    kind: str                          # "clip_vision" | "face_recognition"
    model: nn.Module
    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_shortest: int | None
    interpolation: str                 # torch interpolate mode: "bicubic" or "bilinear"
    device: torch.device
    dtype: torch.dtype
    path: Path | None = None

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[B,H,W,3] 0..1 -> normalised [B,3,h,w] on the encoder's device and dtype."""
        if images.ndim == 3:
            images = images.unsqueeze(0)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise InputError("images", f"shape {tuple(images.shape)}",
                             "RGB images [B,H,W,3] with values in 0..1")
        x = host.place(images, self.device, torch.float32).permute(0, 3, 1, 2)
        th, tw = self.size
        h, w = x.shape[-2:]
        if self.resize_shortest is not None:
            scale = self.resize_shortest / min(h, w)
            nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
        else:
            nh, nw = th, tw
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode=self.interpolation, align_corners=False,
                              antialias=True)
        top, left = (nh - th) // 2, (nw - tw) // 2
        x = x[..., top:top + th, left:left + tw]
        mean, std = self._normalisation(x.device)
        return ((x - mean) / std).to(self.dtype)

    def _normalisation(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """mean and std as (1,3,1,1) float32 tensors on ``device``, made once (identity
        guidance embeds in every step of its window: host data each time would be a
        host-to-device copy per step), outside inference mode (the backward saves std)."""
        cache = self.__dict__.setdefault("_norm", {})
        key = host.device_key(device)
        if key not in cache:
            with grad_mode.normal_tensors():
                cache[key] = tuple(torch.tensor(v, dtype=torch.float32, device=device)
                                   .view(1, 3, 1, 1) for v in (self.mean, self.std))
        return cache[key]

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised embeddings [B,D] (float32, on the encoder's device) of [B,H,W,3]
        images in 0..1; differentiable with respect to ``images``."""
        x = self.preprocess(images)
        if self.kind == "clip_vision":
            feats = self.model(pixel_values=x).image_embeds
        else:
            feats = self.model(x)
        return F.normalize(feats.float(), dim=-1)


def ips(encoder: IdentityEncoder, edited: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Identity preservation score per image: cos(E_id(edited), E_id(source)), shape [B].

    A single source image is compared with every edited image."""
    a = encoder.embed(edited)
    b = encoder.embed(source)
    if b.shape[0] not in (1, a.shape[0]):
        raise InputError("source", f"{b.shape[0]} source images for {a.shape[0]} edited ones",
                         "one source image, or one per edited image")
    return (a * b).sum(-1)


def crop_to_mask(image: torch.Tensor, mask: torch.Tensor, margin: float = 0.1,
                 threshold: float = 0.5) -> torch.Tensor:
    """Crop ``image`` ([B,H,W,3] or [H,W,3]) to the bounding box of ``mask`` ([B,H,W] or
    [H,W], the union over the batch so every crop has the same size), grown by ``margin``
    times the box's size on each side and clipped to the image. Differentiable (slicing)."""
    squeeze = image.ndim == 3
    imgs = image.unsqueeze(0) if squeeze else image
    m = mask if mask.ndim == 2 else mask.reshape(-1, *mask.shape[-2:]).amax(0)
    h, w = imgs.shape[1:3]
    if tuple(m.shape) != (h, w):
        raise InputError("mask", f"size {tuple(m.shape)} differs from the image's {(h, w)}",
                         "a mask the size of the image")
    ys, xs = torch.nonzero(m > threshold, as_tuple=True)
    if ys.numel() == 0:
        raise InputError("mask", "it is empty (no pixel above "
                         f"{threshold:g})", "a mask that covers the region to crop",
                         "Check the mask (e.g. the SAM prompt) selects something.")
    y0, y1 = int(ys.min()), int(ys.max()) + 1
    x0, x1 = int(xs.min()), int(xs.max()) + 1
    my, mx = round((y1 - y0) * margin), round((x1 - x0) * margin)
    y0, y1 = max(0, y0 - my), min(h, y1 + my)
    x0, x1 = max(0, x0 - mx), min(w, x1 + mx)
    out = imgs[:, y0:y1, x0:x1, :]
    return out[0] if squeeze else out


# --- loaders ------------------------------------------------------------------------

def _target(device, dtype) -> tuple[torch.device, torch.dtype]:
    return (torch.device(device) if device is not None else host.device(),
            dtype or torch.float32)


def _freeze(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    # Frozen and in eval mode (BatchNorm running statistics), but gradients still flow
    # to the input images. Cast here; memory.manage puts it on ``device``.
    return model.eval().requires_grad_(False).to(dtype=dtype)


def _managed(encoder: IdentityEncoder) -> IdentityEncoder:
    name = f"{encoder.kind} {encoder.path.name if encoder.path else ''}".strip()
    return memory.manage(encoder, {name: encoder.model}, encoder.device)


def _size_of(value, what: str, path: Path) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if isinstance(value, dict):
        if "height" in value and "width" in value:
            return int(value["height"]), int(value["width"])
        if "shortest_edge" in value:
            return int(value["shortest_edge"]), int(value["shortest_edge"])
    raise ModelLoadError("CLIP vision preprocessor_config.json", path,
                         f"unreadable {what} {value!r}",
                         "Use the preprocessor_config.json published with the model.")


def _clip_preprocessing(folder: Path, image_size: int) -> dict:
    cfg_path = folder / "preprocessor_config.json"
    if not cfg_path.exists():
        warnings.warn(f"{folder} has no preprocessor_config.json; using OpenAI CLIP's "
                      f"normalisation at {image_size}x{image_size}", stacklevel=2)
        return dict(size=(image_size, image_size), mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
                    resize_shortest=image_size, interpolation="bicubic")
    cfg = read_json(cfg_path, "CLIP vision preprocessor_config.json")
    mean = tuple(float(v) for v in cfg.get("image_mean", OPENAI_CLIP_MEAN))
    std = tuple(float(v) for v in cfg.get("image_std", OPENAI_CLIP_STD))
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ModelLoadError("CLIP vision preprocessor_config.json", cfg_path,
                             f"image_mean {mean} / image_std {std} are not 3 values "
                             "(std > 0)")
    size_cfg = cfg.get("size") if cfg.get("do_resize", True) else None
    # {"shortest_edge": n} (CLIP) keeps the aspect ratio; {"height", "width"} resizes
    # straight to the input size, which resize_shortest=None does.
    shortest = None
    if isinstance(size_cfg, int) or (isinstance(size_cfg, dict) and "shortest_edge" in size_cfg):
        shortest = _size_of(size_cfg, "size", cfg_path)[0]
    if cfg.get("do_center_crop", True) and "crop_size" in cfg:
        size = _size_of(cfg["crop_size"], "crop_size", cfg_path)
    elif size_cfg is not None:
        size = _size_of(size_cfg, "size", cfg_path)
    else:
        size = (image_size, image_size)
    # resample 3 is PIL's BICUBIC (CLIP's), 2 BILINEAR.
    interpolation = "bilinear" if cfg.get("resample", 3) == 2 else "bicubic"
    return dict(size=size, mean=mean, std=std, resize_shortest=shortest,
                interpolation=interpolation)


def _clip_vision_config(folder: Path):
    """The vision config of a CLIP vision folder or of a whole CLIP model folder.

    A whole CLIP's projection width is the top-level ``projection_dim``; its nested vision
    config may carry the class default instead, so it is copied over."""
    from transformers import CLIPConfig, CLIPVisionConfig

    # Every config read as data first: no auto_map, CLIP classes only.
    model_type = check_hf_folder(folder, paths.CLIP_VISION.what,
                                 architectures=CLIP_ARCHITECTURES).get("model_type")
    if model_type == "clip":
        full = CLIPConfig.from_pretrained(folder, local_files_only=True)
        vision = full.vision_config
        vision.projection_dim = full.projection_dim
        return vision
    if model_type not in ("clip_vision_model", None):
        raise ModelLoadError(paths.CLIP_VISION.what, folder, f"config.json has model_type "
                             f"{model_type!r}, not a CLIP model ('clip' or 'clip_vision_model')",
                             "Pick a CLIP vision encoder folder, e.g. "
                             "openai/clip-vit-large-patch14.")
    return CLIPVisionConfig.from_pretrained(folder, local_files_only=True)


@grad_mode.builds_weights
def load_clip_vision(name: str, device=None, dtype: torch.dtype | None = None
                     ) -> IdentityEncoder:
    """CLIPVisionModelWithProjection from a Hugging Face folder (a CLIP vision folder or a
    whole CLIP model folder); embeddings are its projected ``image_embeds``."""
    from transformers import CLIPVisionModelWithProjection

    what = paths.CLIP_VISION.what
    folder = paths.resolve(paths.CLIP_VISION, name)
    device, dtype = _target(device, dtype)
    config = _clip_vision_config(folder)
    try:
        model, info = CLIPVisionModelWithProjection.from_pretrained(
            folder, config=config, local_files_only=True, output_loading_info=True)
    except Exception as e:  # no weights file, wrong model type, corrupt safetensors...
        raise ModelLoadError(what, folder, f"transformers could not load it "
                             f"({describe_load_error(e)})",
                             "The folder needs config.json and model.safetensors (or "
                             "pytorch_model.bin) of a CLIP model.") from e
    # Text-model weights of a whole CLIP folder are expected extras; missing, reshaped or
    # other unexpected weights mean random layers or another model.
    check_loading_info(info, what, weights_file(folder), CLIP_TEXT_KEYS)
    pre = _clip_preprocessing(folder, int(model.config.image_size))
    return _managed(IdentityEncoder(kind="clip_vision", model=_freeze(model, device, dtype),
                                    device=device, dtype=dtype, path=folder, **pre))


def _read_face_state_dict(path: Path) -> dict[str, torch.Tensor]:
    sd = read_weights_file(path, paths.FACE_RECOGNITION.what, wrappers=("state_dict", "model"),
                           unwrap_unless="conv1.")
    return iresnet.strip_prefix(sd)


# BatchNorm's update counters: unused in eval mode, absent from files of older torch.
FACE_OPTIONAL = ("*.num_batches_tracked",)


@grad_mode.builds_weights
def load_face_recognition(name: str, device=None, dtype: torch.dtype | None = None
                          ) -> IdentityEncoder:
    """ArcFace IResNet (insightface arcface_torch backbone) from a .pth/.pt/.safetensors
    state dict; takes 112x112 RGB faces normalised with (x - 0.5) / 0.5.

    The network was trained on aligned face crops: crop the face first
    (:func:`crop_to_mask`) for meaningful scores."""
    what = paths.FACE_RECOGNITION.what
    path = paths.resolve(paths.FACE_RECOGNITION, name)
    device, dtype = _target(device, dtype)
    sd = _read_face_state_dict(path)
    try:
        config = iresnet.infer_config(sd)
    except iresnet.IResNetConfigError as e:
        raise ModelLoadError(what, path, f"not an IResNet state dict: {e}",
                             "Use an insightface arcface_torch backbone (iresnet18/34/50/100)."
                             ) from e
    model = iresnet.IResNet(config)
    load_state_dict_checked(model, sd, f"{what} ({config.name})", path, FACE_OPTIONAL)
    size = (iresnet.INPUT_SIZE, iresnet.INPUT_SIZE)
    return _managed(IdentityEncoder(kind="face_recognition",
                                    model=_freeze(model, device, dtype), size=size,
                                    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                                    resize_shortest=None, interpolation="bilinear",
                                    device=device, dtype=dtype, path=path))


def load_identity_encoder(kind: str, name: str, device=None,
                          dtype: torch.dtype | None = None) -> IdentityEncoder:
    if kind == "clip_vision":
        return load_clip_vision(name, device, dtype)
    if kind == "face_recognition":
        return load_face_recognition(name, device, dtype)
    raise InputError("kind", f"unknown encoder kind {kind!r}", f"one of {names_list(KINDS)}")
