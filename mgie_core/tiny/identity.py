"""Tiny random-weight identity encoders in the real layouts: a CLIP vision Hugging Face
folder (config.json, model.safetensors, preprocessor_config.json) and an ArcFace IResNet
state dict with arcface_torch's key names."""

from __future__ import annotations

from pathlib import Path

import torch

from ..models.iresnet import IResNet, IResNetConfig

TINY_CLIP_IMAGE_SIZE = 32
TINY_IRESNET = IResNetConfig(layers=(1, 1, 1, 1), width=8, num_features=32)


def make_clip_vision(folder: Path | str, seed: int = 0) -> None:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    folder = Path(folder)
    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=TINY_CLIP_IMAGE_SIZE, patch_size=8, projection_dim=16)
    model = CLIPVisionModelWithProjection(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    CLIPImageProcessor(
        size={"shortest_edge": TINY_CLIP_IMAGE_SIZE},
        crop_size={"height": TINY_CLIP_IMAGE_SIZE, "width": TINY_CLIP_IMAGE_SIZE},
    ).save_pretrained(folder)


def make_face_recognition(path: Path | str, seed: int = 0) -> None:
    torch.manual_seed(seed)
    model = IResNet(TINY_IRESNET)
    with torch.no_grad():
        # Non-trivial BatchNorm statistics, as a trained network has.
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    torch.save(model.state_dict(), Path(path))
