"""Random-weight metric networks in their real on-disk layouts, for tests and
``xmgie eval --tiny``: the loaders of :mod:`.networks` read them exactly as they read the
published files. Their numbers are meaningless.

* Inception: torchvision's Inception-v3 architecture with 1008 classes and no auxiliary
  head, whose parameter names and shapes are torch-fidelity's (so the file loads with
  torch-fidelity's strict ``load_state_dict``): full size, about 95 MB.
* LPIPS backbones: torchvision's AlexNet / VGG-16 ``features.*`` weights (the only ones
  LPIPS uses; the classifier is left out to keep the files small) and the whole
  SqueezeNet 1.1.
* CLIP: a small CLIPModel (text and vision towers) with an offline tokenizer and an
  image processor, in the Hugging Face folder layout.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch

from ..mgie_core import paths
from . import networks

TINY_CLIP_IMAGE_SIZE = 32


def _calibration_images() -> torch.Tensor:
    """Noise at two scales, upsampled to 299 px, in -1..1: smooth like photos."""
    import torch.nn.functional as F

    images = [F.interpolate(torch.rand(1, 3, side, side), size=(299, 299), mode="bilinear",
                            align_corners=False) for side in (8, 48)]
    return torch.cat(images) * 2 - 1


def make_inception(path: Path, seed: int = 0) -> None:
    from torchvision.models import inception_v3

    torch.manual_seed(seed)
    model = inception_v3(weights=None, aux_logits=False, init_weights=True, num_classes=1008)
    # Random convolutions with unit BatchNorm statistics blow activations up by orders of
    # magnitude per block; statistics measured on noise images keep the features O(1),
    # as a trained network's are.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a plain average over the calibration batch
    model.train()
    with torch.no_grad():
        model(_calibration_images())
        model.eval()
        # Logits of a few units, as a classifier's, not thousands (IS needs a softmax
        # that does not underflow).
        logits = model(_calibration_images())
        model.fc.weight.mul_(2.0 / float(logits.std()))
        model.fc.bias.zero_()
    torch.save(model.state_dict(), path)


def make_lpips_backbone(net: str):
    def make(path: Path, seed: int = 0) -> None:
        from torchvision import models

        torch.manual_seed(seed)
        builder = {"alex": models.alexnet, "vgg": models.vgg16,
                   "squeeze": models.squeezenet1_1}[net]
        state = builder(weights=None).state_dict()
        if net != "squeeze":
            state = {k: v for k, v in state.items() if k.startswith("features.")}
        torch.save(state, path)
    return make


def make_clip(folder: Path, seed: int = 0) -> None:
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPTextConfig,
        CLIPVisionConfig,
    )

    from ..mgie_core.tiny.sd import text_config
    from ..mgie_core.tiny.tokenizers import write_clip_tokenizer

    folder = Path(folder)
    torch.manual_seed(seed)
    text = CLIPTextConfig(**{**text_config(), "max_position_embeddings": 77})
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, image_size=TINY_CLIP_IMAGE_SIZE,
                              patch_size=8)
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                        projection_dim=16)
    CLIPModel(config).eval().save_pretrained(folder, safe_serialization=True)
    write_clip_tokenizer(folder)
    CLIPImageProcessor(
        size={"shortest_edge": TINY_CLIP_IMAGE_SIZE},
        crop_size={"height": TINY_CLIP_IMAGE_SIZE, "width": TINY_CLIP_IMAGE_SIZE},
    ).save_pretrained(folder)


MAKERS = {
    networks.FID_INCEPTION.key: make_inception,
    **{fam.key: make_lpips_backbone(net) for net, fam in networks.LPIPS_FAMILIES.items()},
    networks.CLIP_SCORE.key: make_clip,
}


def write(family: paths.Family, target: Path) -> Path:
    """Write a family's tiny network at ``target`` (write then rename)."""
    target = Path(target)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        MAKERS[family.key](tmp / target.name)
        os.replace(tmp / target.name, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure(root: Path | str, families: Iterable[str] | None = None) -> Path:
    """Tiny networks of ``families`` (keys; default all) under ``root`` in the layout tiny
    mode resolves (``<root>/<folder>/<tiny name>``)."""
    root = Path(root)
    for key in families or MAKERS:
        family = paths.FAMILIES[key]
        write(family, root / family.folder / family.tiny_name)
    return root


def write_models_dir(root: Path | str, families: Iterable[str] | None = None) -> Path:
    """Tiny networks under their published names in a models folder
    (``<root>/metrics/alexnet-owt-7be5be79.pth`` ...), as a user lays out real ones."""
    root = Path(root)
    for key in families or MAKERS:
        family = paths.FAMILIES[key]
        write(family, root / family.folder / family.default_names[0])
    return root
