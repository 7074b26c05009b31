"""Gaussian kernels with OpenCV's semantics.

OpenCV picks `ksize = cvRound(sigma * (3 if uint8 else 4) * 2 + 1) | 1` when no size is given, uses
fixed tables for sigma <= 0 and ksize <= 9, and for uint8 images filters with taps quantised to
1/256 (error-diffused so that they sum to exactly 256). These functions reproduce that, so the torch
path gives OpenCV's uint8 blur bit for bit."""

from __future__ import annotations

import math

import numpy as np

FIXED_POINT_BITS = 8
FIXED_ONE = 1 << FIXED_POINT_BITS

# OpenCV's fixed kernels for sigma <= 0 (values x 256), e.g. cv2.getGaussianKernel(9, 0) * 256.
_SMALL_KERNELS_X256 = {
    1: [256],
    3: [64, 128, 64],
    5: [16, 64, 96, 64, 16],
    7: [8, 28, 56, 72, 56, 28, 8],
    9: [4, 13, 30, 51, 60, 51, 30, 13, 4],
}


def resolve_kernel(sigma: float, ksize: int | None, *, integer: bool) -> tuple[int, float]:
    """(ksize, sigma) as OpenCV's GaussianBlur would use them. Raises ValueError on impossible values."""
    sigma = float(sigma)
    if not math.isfinite(sigma):
        raise ValueError(f"sigma must be a finite number, got {sigma}")
    if ksize is None:
        if sigma <= 0:
            raise ValueError(f"sigma must be > 0 when ksize is not given, got {sigma}")
        ksize = round(sigma * (3 if integer else 4) * 2 + 1) | 1
    ksize = int(ksize)
    if ksize < 1 or ksize % 2 == 0:
        raise ValueError(f"ksize must be a positive odd integer, got {ksize}")
    return ksize, max(sigma, 0.0)


def gaussian_taps(ksize: int, sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian taps, float64 [ksize], as cv2.getGaussianKernel(ksize, sigma)."""
    if sigma <= 0 and ksize in _SMALL_KERNELS_X256:
        return np.asarray(_SMALL_KERNELS_X256[ksize], dtype=np.float64) / FIXED_ONE
    if sigma <= 0:
        sigma = 0.3 * ((ksize - 1) * 0.5 - 1) + 0.8
    x = np.arange(ksize, dtype=np.float64) - (ksize - 1) / 2
    taps = np.exp(-(x * x) / (2 * sigma * sigma))
    return taps / taps.sum()


def fixed_point_taps(taps: np.ndarray) -> np.ndarray:
    """Taps quantised to integers summing to 256, int64 [ksize], as OpenCV's uint8 GaussianBlur uses.

    The outer taps are rounded from the outside in, carrying each rounding error to the next tap;
    the centre tap takes what is left, so the sum is exact."""
    n = len(taps)
    out = np.empty(n, dtype=np.int64)
    err = 0.0
    for i in range(n // 2):
        v = taps[i] * FIXED_ONE + err
        q = round(v)
        err = v - q
        out[i] = out[n - 1 - i] = q
    out[n // 2] = FIXED_ONE - 2 * int(out[: n // 2].sum())
    return out
