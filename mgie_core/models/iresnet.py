"""ArcFace IResNet backbone (insightface ``recognition/arcface_torch``), written from the
architecture's description with the same parameter names, so its ``backbone.pth`` files
(iresnet18/34/50/100/200) load directly.

Layout, for a 112x112 RGB face normalised to [-1, 1]:
  stem     conv1 (3x3, stride 1) -> bn1 -> prelu
  layer1-4 "improved" basic blocks; the first block of each layer halves the resolution
           (112 -> 56 -> 28 -> 14 -> 7) and has a 1x1-conv + BN shortcut (downsample.0/.1)
           block: bn1 -> conv1 (3x3) -> bn2 -> prelu -> conv2 (3x3, stride) -> bn3, + shortcut
  head     bn2 -> flatten -> dropout -> fc (width*8*7*7 -> 512) -> features (BatchNorm1d)
Layer counts and the base width are read from the state dict (:func:`infer_config`).
"""

from __future__ import annotations

import dataclasses
import re

import torch
from torch import nn

BN_EPS = 1e-5
INPUT_SIZE = 112
FINAL_GRID = INPUT_SIZE // 16  # four stride-2 stages: 112 -> 7

# Published depths, for names in messages.
KNOWN_LAYERS = {(2, 2, 2, 2): "iresnet18", (3, 4, 6, 3): "iresnet34",
                (3, 4, 14, 3): "iresnet50", (3, 13, 30, 3): "iresnet100",
                (6, 26, 60, 6): "iresnet200"}


@dataclasses.dataclass(frozen=True)
class IResNetConfig:
    layers: tuple[int, int, int, int] = (3, 4, 14, 3)
    width: int = 64            # channels of the stem and layer1; doubled at each layer
    num_features: int = 512    # embedding size
    dropout: float = 0.0

    @property
    def name(self) -> str:
        base = KNOWN_LAYERS.get(tuple(self.layers), "iresnet" + "-".join(map(str, self.layers)))
        return base if self.width == 64 else f"{base}-w{self.width}"


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """Pre-BN residual block with PReLU between the two 3x3 convolutions."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=BN_EPS)
        self.conv1 = _conv3x3(cin, cout)
        self.bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.prelu = nn.PReLU(cout)
        self.conv2 = _conv3x3(cout, cout, stride)
        self.bn3 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                nn.BatchNorm2d(cout, eps=BN_EPS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


class IResNet(nn.Module):
    def __init__(self, config: IResNetConfig = IResNetConfig()):
        super().__init__()
        self.config = config
        w = config.width
        self.conv1 = nn.Conv2d(3, w, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w, eps=BN_EPS)
        self.prelu = nn.PReLU(w)
        cin = w
        for i, n in enumerate(config.layers):
            cout = w * 2 ** i
            blocks = [IBasicBlock(cin, cout, stride=2)]
            blocks += [IBasicBlock(cout, cout) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            cin = cout
        self.bn2 = nn.BatchNorm2d(cin, eps=BN_EPS)
        self.dropout = nn.Dropout(p=config.dropout)
        self.fc = nn.Linear(cin * FINAL_GRID * FINAL_GRID, config.num_features)
        self.features = nn.BatchNorm1d(config.num_features, eps=BN_EPS)
        # arcface_torch freezes the scale of the final BN at 1.
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: [B,3,112,112] RGB in [-1, 1]. Returns [B, num_features] (not normalised)."""
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


class IResNetConfigError(ValueError):
    """The state dict does not describe an IResNet (the message says which part)."""


def strip_prefix(sd: dict) -> dict:
    """Drop a DataParallel/DDP ``module.`` or a wrapper ``backbone.`` prefix on every key."""
    for prefix in ("module.", "backbone."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def infer_config(sd: dict) -> IResNetConfig:
    """Read layer counts, base width and embedding size from an arcface_torch state dict."""
    for key in ("conv1.weight", "fc.weight"):
        if key not in sd:
            raise IResNetConfigError(f"the weight '{key}' is missing")
    width = int(sd["conv1.weight"].shape[0])
    layers = []
    for i in range(1, 5):
        pat = re.compile(rf"layer{i}\.(\d+)\.")
        idx = {int(m.group(1)) for k in sd for m in [pat.match(k)] if m}
        if not idx:
            raise IResNetConfigError(f"no blocks for layer{i} (layer{i}.0.*)")
        n = max(idx) + 1
        if idx != set(range(n)):
            raise IResNetConfigError(f"layer{i} has gaps in its block numbers {sorted(idx)}")
        layers.append(n)
    num_features, fc_in = (int(s) for s in sd["fc.weight"].shape)
    expected = width * 8 * FINAL_GRID * FINAL_GRID
    if fc_in != expected:
        raise IResNetConfigError(
            f"fc takes {fc_in} inputs but a width-{width} IResNet at {INPUT_SIZE}x{INPUT_SIZE} "
            f"gives {expected}")
    return IResNetConfig(layers=tuple(layers), width=width, num_features=num_features)
