"""GB stage: spatially-varying Gaussian blur of the edit-mask seam (docs/algorithms.md section 9).

    D(p)     = Euclidean distance from a pixel inside the mask to the mask boundary
    sigma(D) = sigma_max * exp(-D^2 / (2 sigma_s^2))          (0 outside the mask)
    X_out    = X (1 - M) + (X * G_sigma(D)) M

The blur is strongest right at the seam and fades inside, which hides the seam.

Definitions used here (the tests pin each of them down):

* ``M`` is the binary mask ``mask > 0.5`` (a bool mask is used as is). A soft mask is
  therefore thresholded: its interior weight is ``M = mask > 0.5``, not the soft value.
* ``D`` is the *exact* Euclidean distance, in pixels, from the centre of a mask pixel to
  the centre of the nearest pixel outside the mask, so a mask pixel with an outside
  4-neighbour has D = 1; D = 0 outside the mask. Outside the image does NOT count as
  outside the mask: the image edge is not a seam (nothing was pasted beyond it), so a mask
  touching the border is measured only to its in-image outside pixels. A mask covering the
  whole image has no seam at all: D = inf, sigma = 0, nothing is blurred.
  kornia's ``distance_transform`` is not used: it is a cascaded soft-min approximation
  whose error reaches several pixels 10-30 px from the edge (short by up to 29 % along
  diagonals), far beyond the 1 px the sigma map needs.
* ``G_sigma`` is the sampled Gaussian exp(-x^2 / (2 sigma^2)) (kornia's
  ``get_gaussian_kernel1d``) truncated at ``ceil(4 sigma)`` pixels, normalised to sum 1,
  applied
  separably over the reflect-padded image (torch's "reflect": the edge pixel is not
  repeated; padding wider than the image keeps reflecting). sigma = 0 is the identity.
  The radius rounds up, so the kernel always reaches 4 sigma; scipy.ndimage's
  ``gaussian_filter`` rounds to nearest instead (radius ``int(4 sigma + 0.5)``: 1 rather
  than 2 at sigma = 0.3). The error bounds below are for this rule.

Implementation. The exact distance is a separable squared-distance transform: a column
pass gives each pixel the vertical distance g to the nearest outside pixel of its column,
a row pass takes D^2(i, j) = min_k (j - k)^2 + g(i, k)^2 by sweeping the offset |j - k|
until it exceeds the largest distance still possible (exact, vectorised over the image).

The blur evaluates a small stack of Gaussian levels at fixed sigmas (0, then a geometric
ladder from 0.33 to sigma_max with ratio <= 1.15: 22 levels for sigma_max = 5) and, per
pixel, interpolates them with a 4-point Lagrange rule in sigma. The parameter of that rule
is u = exp(-1 / (2 sigma^2)) for sigma <= 1 (a sampled Gaussian of small sigma is nearly
linear in its off-centre weight u) and ln(sigma) above (where the family is self-similar
and the ladder geometric). Because the output is a fixed linear combination of kernels,
the worst case over all images in [0, 1] is half the L1 norm of the difference between the
interpolated kernel and the exact one; for the default ladder that is at most 5.0e-4 at
sigma_max = 5 and 5.5e-4 for any sigma_max up to 20 (checked on a dense sigma grid; the
ladder is self-similar above 1 px, so larger values behave alike): the result differs
from the per-pixel Gaussian by less than that plus float32 rounding, on any image. Plain
linear interpolation between two levels needs about 65 levels for the same bound.

All levels go through two 1-D passes done as blocked banded matrix products shared by
the levels (fast on CPU and GPU, cost linear in the image size), on the bounding box of
the blurred pixels only. Each level equals kornia's ``gaussian_blur2d`` with reflect
padding (a test checks it); calling that once per level would cost about ten tensor
operations per level instead of ten in all, which dominates on a busy CPU. On CUDA they
run in float64 so a global TF32 setting cannot degrade them. The stage never changes
torch's process-wide thread settings.
Pixels outside the mask are copied from the input with ``torch.where``: bit-identical.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .errors import InputError
from .images import check_image, check_mask

TRUNCATE = 4.0          # kernel radius = ceil(TRUNCATE * sigma) (scipy: rounded)
FIRST_LEVEL = 0.33      # smallest non-zero level of the default ladder
LEVEL_RATIO = 1.15      # largest ratio between consecutive default levels
_U_PARAM_BELOW = 1.0    # interpolate in u = exp(-1/(2 s^2)) on intervals ending <= this
_INF2 = 1 << 30         # "no outside pixel" in the integer squared-distance passes
_BAND_PIXELS = 32768     # row band of the EDT row pass (torch's parallel grain size)


# --------------------------------------------------------------------------- distance

def _inside(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask > 0.5


def distance_to_boundary(mask: torch.Tensor) -> torch.Tensor:
    """Exact Euclidean distance (pixels, float32) from each pixel inside ``mask`` to the
    centre of the nearest in-image pixel outside it; 0 outside the mask, inf everywhere
    inside a mask that covers the whole image. ``mask``: [H,W] or [B,H,W], bool or float
    (inside = > 0.5). Same shape and device as ``mask``."""
    if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3):
        raise InputError("mask", f"got {getattr(mask, 'shape', type(mask).__name__)}",
                         "a mask tensor [H,W] or [B,H,W]")
    squeeze = mask.ndim == 2
    inside = _inside(mask if not squeeze else mask[None])
    out = torch.zeros(inside.shape, dtype=torch.float32, device=inside.device)
    _distance_into(out, inside)
    return out[0] if squeeze else out


def _distance_into(out: torch.Tensor, inside: torch.Tensor) -> None:
    for b in range(inside.shape[0]):
        m = inside[b]
        if not bool(m.any()):
            continue
        if bool(m.all()):
            out[b] = float("inf")
            continue
        # Crop to the mask's bounding box plus one pixel where the image allows: the
        # nearest outside pixel of a mask pixel always lies in that box (clamping any
        # outside point to the box brings it closer and keeps it outside), so the
        # crop is exact.
        rows = torch.nonzero(m.any(1)).flatten()
        cols = torch.nonzero(m.any(0)).flatten()
        r0, r1 = max(int(rows[0]) - 1, 0), min(int(rows[-1]) + 2, m.shape[0])
        c0, c1 = max(int(cols[0]) - 1, 0), min(int(cols[-1]) + 2, m.shape[1])
        d2 = _squared_edt(m[r0:r1, c0:c1])
        out[b, r0:r1, c0:c1] = torch.where(
            d2 >= _INF2, torch.full_like(d2, float("inf"), dtype=torch.float64),
            d2.double().sqrt()).float()


def _squared_edt(inside: torch.Tensor) -> torch.Tensor:
    """Exact squared distance (int32) to the nearest False pixel of a 2-D bool tensor;
    ``_INF2`` or more where there is none (widths below 32768 px)."""
    h, w = inside.shape
    outside = ~inside
    # Column pass: vertical distance to the nearest outside pixel of the same column.
    idx = torch.arange(h, device=inside.device, dtype=torch.int32)[:, None].expand(h, w)
    big = 4 * (h + w)
    above = torch.where(outside, idx, torch.full_like(idx, -big)).cummax(0).values
    below = torch.where(outside, idx, torch.full_like(idx, big)).flip(0).cummin(0).values.flip(0)
    g = torch.minimum(idx - above, below - idx)
    g2 = torch.where(g >= big // 2, torch.full_like(g, _INF2), g * g)
    # Row pass: D^2(i, j) = min_k (j - k)^2 + g2(i, k), sweeping the offset d = |j - k|
    # upwards, in place. An offset with d^2 >= D^2(i, j) cannot improve (i, j), so a
    # band of rows is final once d^2 reaches its largest current value: exact, about
    # max(D) steps per band. Bands of ~32k pixels: each band stops on its own (the deep
    # part of a mask is usually a few bands), and ops that small run on one core, so on
    # a busy CPU they never wait for a second one (a full-image op per step did: several
    # seconds at 512x512 under load). Compacting unfinished pixels into a work list was
    # tried too: the gathers made it ~10x slower.
    d2 = g2.clone()
    band = max(1, _BAND_PIXELS // w)
    for r in range(0, h, band):
        cd2, cg2 = d2[r:r + band], g2[r:r + band]
        d = 1
        while d < w:
            if d % 8 == 1 and int(cd2.max()) <= d * d:   # a sync on GPU: not every step
                break
            dd = d * d
            torch.minimum(cd2[:, d:], cg2[:, :-d] + dd, out=cd2[:, d:])
            torch.minimum(cd2[:, :-d], cg2[:, d:] + dd, out=cd2[:, :-d])
            d += 1
    return d2


def sigma_map(D: torch.Tensor, sigma_max: float = 5.0, sigma_s: float = 10.0) -> torch.Tensor:
    """sigma_max * exp(-D^2 / (2 sigma_s^2)) where D > 0 (inside the mask), 0 elsewhere."""
    s = sigma_max * torch.exp(-(D.float() ** 2) / (2.0 * sigma_s ** 2))
    return torch.where(D > 0, s, torch.zeros_like(s))


# --------------------------------------------------------------------------- levels

def default_levels(sigma_max: float) -> list[float]:
    """0, then a geometric ladder from ``FIRST_LEVEL`` to ``sigma_max`` whose ratio is at
    most ``LEVEL_RATIO`` (just [0, sigma_max] when sigma_max <= FIRST_LEVEL)."""
    if sigma_max <= 0:
        return [0.0]
    if sigma_max <= FIRST_LEVEL:
        return [0.0, float(sigma_max)]
    n = max(1, math.ceil(math.log(sigma_max / FIRST_LEVEL) / math.log(LEVEL_RATIO) - 1e-9))
    return [0.0] + [FIRST_LEVEL * (sigma_max / FIRST_LEVEL) ** (i / n) for i in range(n + 1)]


def _u(s: torch.Tensor) -> torch.Tensor:
    return torch.where(s > 0, torch.exp(-0.5 / s.clamp_min(1e-3) ** 2), torch.zeros_like(s))


def level_weights(sigma: torch.Tensor,
                  levels: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel interpolation: indices [N,k] into ``levels`` and weights [N,k] (float64,
    summing to 1) such that sum_j w_j G_{levels[idx_j]} ~= G_sigma. ``sigma``: [N] in
    [0, levels[-1]]. 4-point Lagrange in u = exp(-1/(2 s^2)) on intervals that start at 0
    or end at or below 1 px, in ln(s) above; stencils centred and clamped to the ladder."""
    lv = torch.as_tensor(levels, dtype=torch.float64, device=sigma.device)
    L = lv.numel()
    s = sigma.double().clamp(0, float(lv[-1]))
    if L == 1:
        return (torch.zeros(s.shape + (1,), dtype=torch.long, device=s.device),
                torch.ones(s.shape + (1,), dtype=torch.float64, device=s.device))
    i = (torch.searchsorted(lv, s, right=True) - 1).clamp(0, L - 2)
    use_u = (i == 0) | (lv[i + 1] <= _U_PARAM_BELOW) | (L < 3)
    k_u, k_l = min(4, L), min(4, L - 1)
    k = max(k_u, k_l)
    lo_u = (i - (k_u // 2 - 1)).clamp(0, L - k_u)
    lo_l = (i - (k_l // 2 - 1)).clamp(1, L - k_l)
    offs = torch.arange(k, device=s.device)
    idx_u = (lo_u[:, None] + offs.clamp(max=k_u - 1)[None])
    idx_l = (lo_l[:, None] + offs.clamp(max=k_l - 1)[None])
    idx = torch.where(use_u[:, None], idx_u, idx_l)
    valid = torch.where(use_u[:, None], offs[None] < k_u, offs[None] < k_l)
    q_lv_u, q_lv_l = _u(lv), torch.log(lv.clamp_min(1e-12))
    q = torch.where(use_u[:, None], q_lv_u[idx], q_lv_l[idx])
    qs = torch.where(use_u, _u(s), torch.log(s.clamp_min(1e-12)))[:, None]
    w = torch.ones_like(q)
    for m in range(k):
        qm = q[:, m:m + 1]
        factor = (qs - qm) / torch.where(offs[None] == m, torch.ones_like(q), q - qm)
        use = valid[:, m:m + 1] & (offs[None] != m)
        w = torch.where(use, w * factor, w)
    w = torch.where(valid, w, torch.zeros_like(w))
    return idx, w


def gaussian_kernel1d(sigma: float, dtype=torch.float64, device=None) -> torch.Tensor:
    """Sampled Gaussian truncated at ceil(TRUNCATE sigma), normalised; [1.] for sigma 0.
    kornia's kernel (computed in float64: exp(-x^2 / (2 sigma^2)) / sum)."""
    if sigma <= 0:
        return torch.ones(1, dtype=dtype, device=device)
    from kornia.filters import get_gaussian_kernel1d

    r = math.ceil(TRUNCATE * sigma)
    k = get_gaussian_kernel1d(2 * r + 1, float(sigma), dtype=torch.float64).flatten()
    return k.to(dtype=dtype, device=device)


# --------------------------------------------------------------------------- blur

def _reflect_index(n: int, lo: int, hi: int, device) -> torch.Tensor:
    """Indices of positions lo..hi-1 of a reflect-padded axis of length n (torch's
    "reflect", repeated for pads wider than the axis)."""
    i = torch.arange(lo, hi, device=device)
    if n == 1:
        return torch.zeros_like(i)
    p = 2 * (n - 1)
    i = i.remainder(p)
    return torch.where(i < n, i, p - i)


def _toeplitz(levels: Sequence[float], R: int, T: int, dtype, device) -> torch.Tensor:
    """[L, T + 2R, T]: column t of level l maps a window of T + 2R inputs to output t
    (kernel of level l zero-padded to radius R), so a valid 1-D correlation of a block is
    one matrix product."""
    kp = torch.zeros(len(levels), 2 * R + 1, dtype=torch.float64)
    for i, sg in enumerate(levels):
        k = gaussian_kernel1d(sg)
        r = (k.numel() - 1) // 2
        kp[i, R - r:R + r + 1] = k
    off = torch.arange(T + 2 * R)[:, None] - torch.arange(T)[None, :]
    ok = (off >= 0) & (off <= 2 * R)
    toe = torch.where(ok, kp[:, off.clamp(0, 2 * R)], torch.zeros(()))
    return toe.to(dtype=dtype, device=device)


def _level_stack(xc: torch.Tensor, levels: Sequence[float], r0: int, r1: int, c0: int,
                 c1: int) -> torch.Tensor:
    """G_s * xc for every s in ``levels`` (all > 0) on rows r0:r1, cols c0:c1:
    [L, C, r1 - r0, c1 - c0]. xc: [C,H,W], reflect padding.

    All levels go through the same two products: the rows are cut into blocks of T
    outputs, each block's T + 2R input rows are multiplied by the stacked Toeplitz
    matrices of every level at once (vertical pass), then the columns likewise with a
    batch over levels (horizontal pass). About ten tensor ops in all instead of several
    per level: on a busy CPU each parallel op can wait for a core, so the count matters.
    Cost per output per level ~ 2 (T + 2R) multiply-adds, linear in the image size."""
    C, h, w = xc.shape
    L = len(levels)
    R = math.ceil(TRUNCATE * max(levels))
    T = max(32, R)
    Ro, Co = r1 - r0, c1 - c0
    nbv, nbh = -(-Ro // T), -(-Co // T)
    Hs, Ws = nbv * T + 2 * R, nbh * T + 2 * R
    ri = _reflect_index(h, r0 - R, r0 - R + Hs, xc.device)
    ci = _reflect_index(w, c0 - R, c0 - R + Ws, xc.device)
    sub = xc.index_select(1, ri).index_select(2, ci)                      # [C, Hs, Ws]
    toe = _toeplitz(levels, R, T, xc.dtype, xc.device)                    # [L, T+2R, T]
    # Vertical: [C, nbv, Ws, T+2R] windows x [T+2R, L*T] -> [C, nbv, Ws, L, T].
    win = sub.unfold(1, T + 2 * R, T).reshape(-1, T + 2 * R)
    v = win @ toe.permute(1, 0, 2).reshape(T + 2 * R, L * T)
    v = v.view(C, nbv, Ws, L, T).permute(3, 0, 1, 4, 2).reshape(L, C * nbv * T, Ws)
    # Horizontal: per level, [rows * nbh, T+2R] windows x [T+2R, T].
    win = v.unfold(-1, T + 2 * R, T).reshape(L, -1, T + 2 * R)
    out = torch.bmm(win, toe)                                             # [L, C*rows*nbh, T]
    return out.view(L, C, nbv * T, nbh * T)[:, :, :Ro, :Co]


# Rows of the crop handled at once: bounds the level stack's memory for big images.
_STACK_BUDGET = 40_000_000     # elements of one [L, C, rows, cols] stack


def _blur_one(x: torch.Tensor, sig: torch.Tensor, levels: Sequence[float]) -> torch.Tensor:
    """x [H,W,3], sig [H,W] -> x with each pixel of sig > 0 replaced by its blur."""
    active = sig > 0
    if not bool(active.any()):
        return x
    rows = torch.nonzero(active.any(1)).flatten()
    cols = torch.nonzero(active.any(0)).flatten()
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    # float64 on CUDA: a global TF32 setting would otherwise cost ~1e-3 of accuracy.
    work = torch.float64 if x.device.type == "cuda" else torch.float32
    xc = x.permute(2, 0, 1).to(work)                                      # [3,H,W]
    # Interpolation weights depend on sigma alone, which takes few distinct values (one
    # per distinct integer D^2): compute them once per value, then gather.
    vals, inv = torch.unique(sig[r0:r1, c0:c1], return_inverse=True)
    idx, wts = level_weights(vals, levels)                                 # [U,k]
    table = torch.zeros(vals.numel(), len(levels), dtype=torch.float64, device=x.device)
    table.scatter_add_(1, idx, wts)
    used = [i for i in range(1, len(levels)) if bool((table[:, i] != 0).any())]
    wmap = table.to(work)[inv]                                             # [Ro,Co,L]
    acc = xc[:, r0:r1, c0:c1] * wmap[..., 0]
    if used:
        lv = [levels[i] for i in used]
        wl = wmap[..., used].permute(2, 0, 1)                               # [Lu,Ro,Co]
        per_row = len(lv) * 3 * (c1 - c0 + 8 * math.ceil(TRUNCATE * lv[-1]))
        step = max(1, _STACK_BUDGET // per_row)
        for a in range(r0, r1, step):
            b = min(a + step, r1)
            stack = _level_stack(xc, lv, a, b, c0, c1)                     # [Lu,3,rows,Co]
            acc[:, a - r0:b - r0] += (stack * wl[:, None, a - r0:b - r0]).sum(0)
    out = x.clone()
    crop = acc.permute(1, 2, 0).to(x.dtype)
    out[r0:r1, c0:c1] = torch.where(active[r0:r1, c0:c1, None], crop, x[r0:r1, c0:c1])
    return out


def gb_blur(image: torch.Tensor, mask: torch.Tensor, sigma_max: float = 5.0,
            sigma_s: float = 10.0, levels: Sequence[float] | None = None) -> torch.Tensor:
    """Blur the seam of ``mask`` in ``image`` with a Gaussian whose sigma decays with the
    distance to the mask boundary (module docstring). image [B,H,W,3] (or [H,W,3]) in
    0..1; mask [B,H,W] or [H,W] of the same size, batch 1 or B, M = mask > 0.5.
    ``levels``: the sigma ladder (ascending, starting at 0, ending at sigma_max); default
    :func:`default_levels`. Runs on the image's device; returns a new float32 tensor.
    Pixels outside M are bit-identical to the input; an empty mask returns a copy."""
    image = check_image("image", image)
    mask = check_mask("mask", mask, size=tuple(image.shape[1:3]), allow_empty=True)
    if not (isinstance(sigma_max, (int, float)) and math.isfinite(sigma_max) and sigma_max >= 0):
        raise InputError("sigma_max", f"is {sigma_max!r}", "a number >= 0 (pixels)")
    if not (isinstance(sigma_s, (int, float)) and math.isfinite(sigma_s) and sigma_s > 0):
        raise InputError("sigma_s", f"is {sigma_s!r}", "a number > 0 (pixels)")
    if mask.shape[0] not in (1, image.shape[0]):
        raise InputError("mask", f"has a batch of {mask.shape[0]} but the image has "
                         f"{image.shape[0]}", "one mask, or one per image")
    if levels is None:
        levels = default_levels(float(sigma_max))
    else:
        levels = [float(v) for v in levels]
        if (not levels or levels[0] != 0 or any(b <= a for a, b in zip(levels, levels[1:]))
                or abs(levels[-1] - sigma_max) > 1e-9):
            raise InputError("levels", f"is {levels}", "ascending sigmas from 0 to "
                             f"sigma_max ({sigma_max})", "Leave it unset for the default.")
    inside = (mask > 0.5).to(image.device)
    if sigma_max == 0 or not bool(inside.any()):
        return image.clone()
    inside = inside.expand(image.shape[0], -1, -1)
    sig = sigma_map(distance_to_boundary(inside), sigma_max, sigma_s)
    out = torch.stack([_blur_one(image[b], sig[b], levels) for b in range(image.shape[0])])
    # Outside the mask: the input itself, bit for bit (never recomposed arithmetically).
    return torch.where(inside[..., None], out, image)
