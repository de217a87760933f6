"""Image-editing metrics on tensors (images float [B, 3, H, W] in 0..1, masks [B, 1, H, W]
with 1 = the edited region).

Paired metrics (one value per image): PSNR, SSIM and MSE from torchmetrics, LPIPS from the
lpips package (v0.1 linear layers, inputs scaled to -1..1). Background preservation as
PIE-Bench computes it: both images multiplied by (1 - mask), then the metric over the
whole image (the zeroed edit region counts as a perfect match; that is PIE-Bench's
convention, so numbers are comparable with its tables). Set metrics: FID and IS with
torchmetrics on Inception features computed once per image. CLIP score: 100 * max(cos,
0) between the CLIP image and text embeddings (torchmetrics' scale); the edited-region
variant multiplies the image by the mask first, as PIE-Bench does. torchmetrics'
CLIPScore is not used because it expects ``get_image_features`` to return a tensor, which
transformers 5 no longer does. IPS: the pack's identity encoders, cos(E(edited),
E(source)), on crops around the mask when there is one (the IdentityScore node's rule).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

# name -> True when higher is better (for the report's arrows and charts).
HIGHER_IS_BETTER = {
    "psnr": True, "ssim": True, "lpips": False, "mse": False,
    "fid": False, "is": True, "clip_score": True, "clip_score_edited": True,
    "bg_psnr": True, "bg_ssim": True, "bg_lpips": False, "bg_mse": False, "ips": True,
    "aa": True, "aa_others": True, "aa_ceiling": True,
}
LABELS = {
    "psnr": "PSNR", "ssim": "SSIM", "lpips": "LPIPS", "mse": "MSE", "fid": "FID", "is": "IS",
    "clip_score": "CLIP score", "clip_score_edited": "CLIP score (edited region)",
    "bg_psnr": "Background PSNR", "bg_ssim": "Background SSIM",
    "bg_lpips": "Background LPIPS", "bg_mse": "Background MSE", "ips": "IPS",
    "aa": "AA", "aa_others": "AA: other attributes kept",
    "aa_ceiling": "AA ceiling (classifier on the unedited images)",
}


def mse(pred: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Mean squared error per image."""
    from torchmetrics.functional import mean_squared_error

    return torch.stack([mean_squared_error(p.flatten(), r.flatten()) for p, r in zip(pred, ref)])


def psnr(pred: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image, data range 1 (inf for identical images)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return peak_signal_noise_ratio(pred, ref, data_range=1.0, reduction="none", dim=(1, 2, 3))


def ssim(pred: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """SSIM per image (Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, data range 1).

    torchmetrics' convention, which PIE-Bench uses: the SSIM map is averaged over the
    whole image, its borders computed on reflect-padded images. scikit-image and Wang et
    al.'s code average only the windows inside the image, which differs slightly near
    the borders (tests/test_eval.py checks both against one formula)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(pred, ref, data_range=1.0, reduction="none")


def lpips_distance(model: torch.nn.Module, pred: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """LPIPS per image (0 = identical)."""
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(pred.to(device) * 2 - 1, ref.to(device) * 2 - 1)
    return out.flatten().float().cpu()


def background(pred: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Both images with the edit region zeroed (PIE-Bench's unedited-part convention)."""
    keep = 1.0 - (mask > 0.5).to(pred.dtype)
    return pred * keep, ref * keep


class _GivenFeatures(torch.nn.Module):
    """Lets torchmetrics' FID/IS run on features computed beforehand (one Inception pass
    per image serves both metrics)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Frechet distance between two sets of Inception features [N, D] (torchmetrics)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if real.shape[0] < 2 or fake.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 images in each set (got {real.shape[0]} "
                         f"reference and {fake.shape[0]} edited)")
    metric = FrechetInceptionDistance(feature=_GivenFeatures(real.shape[1]))
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return float(metric.compute())


def is_splits(n: int) -> int:
    """IS is the mean over 10 splits for large sets; small sets use one split."""
    return 10 if n >= 100 else 1


def inception_score(logits: torch.Tensor, splits: int | None = None) -> tuple[float, float]:
    """(mean, std) of the Inception Score of unbiased Inception logits [N, 1008]."""
    import warnings

    from torchmetrics.image.inception import InceptionScore

    with warnings.catch_warnings():
        # "will save all extracted features in buffer"; the std of a single split
        warnings.simplefilter("ignore")
        metric = InceptionScore(feature=_GivenFeatures(logits.shape[1]),
                                splits=splits or is_splits(logits.shape[0]))
        metric.update(logits.double())
        mean, std = metric.compute()
    return float(mean), float(std)


def clip_scores(model, processor, images_u8: Sequence[torch.Tensor], texts: Sequence[str]
                ) -> torch.Tensor:
    """100 * max(cos(image, text), 0) per pair; images uint8 [3, H, W]."""
    device = next(model.parameters()).device
    inputs = processor(text=list(texts), images=[i.cpu() for i in images_u8],
                       return_tensors="pt", padding=True, truncation=True)
    with torch.no_grad():
        out = model(**{k: v.to(device) for k, v in inputs.items()})
    img = F.normalize(out.image_embeds.float(), dim=-1)
    txt = F.normalize(out.text_embeds.float(), dim=-1)
    return (100 * (img * txt).sum(-1)).clamp(min=0).cpu()


def ips_scores(encoder, edited: torch.Tensor, source: torch.Tensor,
               mask: torch.Tensor | None = None, margin: float = 0.1) -> torch.Tensor:
    """IPS per image with the pack's identity encoder; images [B, 3, H, W]."""
    from ..mgie_core.models import identity

    e = edited.permute(0, 2, 3, 1)
    s = source.permute(0, 2, 3, 1)
    if mask is not None and bool((mask > 0.5).any()):
        m = mask[:, 0]
        e = identity.crop_to_mask(e, m, margin)
        s = identity.crop_to_mask(s, m, margin)
    with torch.no_grad():
        return identity.ips(encoder, e, s).float().cpu()


def finite_mean(values: Sequence[float]) -> float:
    """Mean of the values; inf when one is inf (identical images' PSNR), nan when empty."""
    values = [float(v) for v in values if not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return float("nan")
    return sum(values) / len(values)
