"""The torch implementation of lipstream.imgproc: any device, batched.

Every function here takes and returns channels-last tensors `[B,H,W,C]` (views are fine) and works in
float32. With `integer=True` it reproduces OpenCV's uint8 arithmetic: the resize uses its 11-bit
fixed-point weights and rounding, the Gaussian blur uses OpenCV's 8-bit fixed-point taps exactly (integer sums are exact in
float32 up to 2^24), the unsharp result is rounded and saturated, and the blend uses PIL's rounding.

Resampling is a separable gather with per-sample source coordinates, so one call resizes each image
of a batch to its own size, and can produce the reflect-101 border the blur needs in the same pass.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from lipstream.imgproc.boxes import Box, Slices, blend_region
from lipstream.imgproc.kernels import FIXED_ONE, fixed_point_taps, gaussian_taps

_FIXED_SCALE = float(FIXED_ONE * FIXED_ONE)  # two separable passes of x256 taps


RESIZE_COEF_BITS = 11  # OpenCV's INTER_RESIZE_COEF_BITS: uint8 resize weights are multiples of 1/2048
RESIZE_COEF_ONE = 1 << RESIZE_COEF_BITS


@dataclass(frozen=True)
class AxisSampling:
    """Where each output position of one axis reads its input, per sample.

    lo, hi: int64 [B, n] source indices; weight: float32 [B, n], the share of `hi`;
    fixed: int32 [B, n], that share in OpenCV's 11-bit fixed point (the share of `lo` is 2048 - fixed)."""

    lo: torch.Tensor
    hi: torch.Tensor
    weight: torch.Tensor
    fixed: torch.Tensor

    def select(self, index: torch.Tensor) -> AxisSampling:
        """The samplings of the samples `index` (int64 [b], on their device)."""
        return AxisSampling(*(t.index_select(0, index) for t in (self.lo, self.hi, self.weight, self.fixed)))


def reflect101(positions: np.ndarray, length: int) -> np.ndarray:
    """Map integer positions onto [0, length) by OpenCV's BORDER_REFLECT_101 (…2 1 | 0 1 2 … n-1 | n-2 …)."""
    if length == 1:
        return np.zeros_like(positions)
    period = 2 * (length - 1)
    p = np.mod(positions, period)
    return np.where(p >= length, period - p, p)


@functools.lru_cache(maxsize=4096)
def _axis_row(src_len: int, dst: int, pad: int, n: int, mode: str, shift: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(lo int64 [n], weight float32 [n]) of one sample: see axis_sampling. Cached (read-only arrays):
    an avatar's boxes repeat, and this NumPy work would otherwise cost the host ~35 µs per frame and axis."""
    q = reflect101(np.arange(n) - pad - shift, dst).astype(np.float64)
    scale = src_len / dst
    if mode == "bilinear":
        f = np.maximum(((q + 0.5) * scale - 0.5).astype(np.float32), np.float32(0))
        i0 = np.floor(f)
        weight = f - i0
    else:  # nearest
        i0 = np.floor(q * scale)
        weight = np.zeros(n, dtype=np.float32)
    lo = np.minimum(i0, src_len - 1).astype(np.int64)
    lo.flags.writeable = weight.flags.writeable = False
    return lo, weight


def axis_sampling(src_len: int, dst_lens: list[int], pad: int, mode: str, device: torch.device, *,
                  shifts: list[int] | None = None, n: int | None = None) -> AxisSampling:
    """Sampling of one axis: sample b is resized from `src_len` to `dst_lens[b]` pixels, then extended
    by `pad` reflect-101 pixels on both sides and filled up to `n` positions (default
    `max(dst_lens) + 2*pad`). shifts: where each resized sample starts on the output grid (position
    p reads resized pixel p - pad - shift, reflected; default 0).

    Bilinear follows cv2.INTER_LINEAR (half-pixel centres computed in float32, edge clamp, no
    antialias); nearest follows cv2.INTER_NEAREST (floor(dst * src/dst))."""
    n = max(dst_lens) + 2 * pad if n is None else n
    shifts = shifts or [0] * len(dst_lens)
    rows = [_axis_row(src_len, dst, pad, n, mode, shift) for dst, shift in zip(dst_lens, shifts)]
    lo = np.stack([r[0] for r in rows])
    weight = np.stack([r[1] for r in rows])
    hi = np.minimum(lo + 1, src_len - 1)
    fixed = np.rint(weight * np.float32(RESIZE_COEF_ONE)).astype(np.int32)
    return AxisSampling(*(torch.from_numpy(a).to(device, non_blocking=True) for a in (lo, hi, weight, fixed)))


def _gather(x: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """x: [B,H,W,C]; index: [B,n] -> x with axis `dim` (1 or 2) replaced by the n indexed positions."""
    shape = list(x.shape)
    shape[dim] = index.shape[1]
    view = index[:, :, None, None] if dim == 1 else index[:, None, :, None]
    return torch.gather(x, dim, view.expand(shape))


def resample(x: torch.Tensor, rows: AxisSampling, cols: AxisSampling, *, integer: bool) -> torch.Tensor:
    """x: float [B,H,W,C] -> float [B,rows.n,cols.n,C], separable linear interpolation.

    With `integer` the arithmetic is OpenCV's uint8 fixed point, including the rounding of its
    vectorised vertical pass (`((h0>>4)*b0 >> 16) + ((h1>>4)*b1 >> 16) + 2 >> 2`), in int32: equal to
    cv2.resize on all but a few border values, and never more than 1 off."""
    if not integer:
        y = torch.lerp(_gather(x, 1, rows.lo), _gather(x, 1, rows.hi), rows.weight[:, :, None, None])
        return torch.lerp(_gather(y, 2, cols.lo), _gather(y, 2, cols.hi), cols.weight[:, None, :, None])
    xi = x.to(torch.int32)
    a1 = cols.fixed[:, None, :, None]
    horizontal = _gather(xi, 2, cols.lo) * (RESIZE_COEF_ONE - a1) + _gather(xi, 2, cols.hi) * a1
    b1 = rows.fixed[:, :, None, None]
    top = (_gather(horizontal, 1, rows.lo) >> 4) * (RESIZE_COEF_ONE - b1) >> 16
    bottom = (_gather(horizontal, 1, rows.hi) >> 4) * b1 >> 16
    return ((top + bottom + 2) >> 2).clamp_(0, 255).to(torch.float32)


def pad_reflect101(x: torch.Tensor, pad: int) -> torch.Tensor:
    """x: [B,H,W,C] -> [B,H+2p,W+2p,C] with OpenCV's default border (any pad, even past the size)."""
    _, h, w, _ = x.shape
    rows = torch.from_numpy(reflect101(np.arange(-pad, h + pad), h)).to(x.device)
    cols = torch.from_numpy(reflect101(np.arange(-pad, w + pad), w)).to(x.device)
    return x.index_select(1, rows).index_select(2, cols)


def blur_valid(xp: torch.Tensor, ksize: int, sigma: float, *, integer: bool) -> torch.Tensor:
    """Separable Gaussian over an already padded float [B,H+k-1,W+k-1,C] -> [B,H,W,C].

    Shift-and-add (k multiply-adds per axis): exact for the integer taps on any device, where a
    convolution could run in TF32, and faster than NCHW depthwise convolution on CPUs."""
    taps = gaussian_taps(ksize, sigma)
    weights = fixed_point_taps(taps).tolist() if integer else taps.tolist()
    h = xp.shape[1] - ksize + 1
    w = xp.shape[2] - ksize + 1
    horizontal = xp[:, :, 0:w] * weights[0]
    for i in range(1, ksize):
        horizontal.add_(xp[:, :, i:i + w], alpha=weights[i])
    out = horizontal[:, 0:h] * weights[0]
    for i in range(1, ksize):
        out.add_(horizontal[:, i:i + h], alpha=weights[i])
    if integer:  # OpenCV rounds its fixed-point result half-up
        out.add_(_FIXED_SCALE / 2).div_(_FIXED_SCALE).floor_()
    return out


def sharpen(x: torch.Tensor, blurred: torch.Tensor, amount: float, threshold: float, *, integer: bool) -> torch.Tensor:
    """`x*(1+amount) - blurred*amount`, keeping `x` where |x - blurred| < threshold; saturated to uint8 range
    with `integer` (rounded half-to-even like cv2.addWeighted)."""
    out = x * (1.0 + amount) - blurred * amount
    out = torch.where((x - blurred).abs() < threshold, x, out)
    if integer:
        out = out.round_().clamp_(0, 255)
    return out


def resize(x: torch.Tensor, size: tuple[int, int], mode: str, *, integer: bool) -> torch.Tensor:
    """float [B,H,W,C] -> float [B,h,w,C]."""
    b, h, w, _ = x.shape
    rows = axis_sampling(h, [size[0]] * b, 0, mode, x.device)
    cols = axis_sampling(w, [size[1]] * b, 0, mode, x.device)
    return resample(x, rows, cols, integer=integer)


def gaussian_blur(x: torch.Tensor, ksize: int, sigma: float, *, integer: bool) -> torch.Tensor:
    return blur_valid(pad_reflect101(x, ksize // 2), ksize, sigma, integer=integer)


def unsharp_mask(x: torch.Tensor, ksize: int, sigma: float, amount: float, threshold: float, *,
                 integer: bool) -> torch.Tensor:
    blurred = gaussian_blur(x, ksize, sigma, integer=integer)
    return sharpen(x, blurred, amount, threshold, integer=integer)


Patch = tuple[int, Slices, torch.Tensor]


def blend_patch(frame: torch.Tensor, face: torch.Tensor, face_box: Box, mask: torch.Tensor, crop_box: Box, *,
                integer: bool) -> tuple[Slices, torch.Tensor] | None:
    """The blended face-box region of one frame, or None when the face box misses the frame.

    frame: [H,W,C] uint8 or float (read only); face: float [fh,fw,C] at the face-box size; mask: uint8
    or float [ch,cw] sized to the crop box, 0..255. Returns (frame slices [y, x], float region [h,w,C])."""
    region = blend_region(face_box, crop_box, frame.shape[0], frame.shape[1])
    if region is None:
        return None
    target, face_part, mask_part = region
    m = mask[mask_part].to(torch.float32).unsqueeze(-1)
    mixed = face[face_part] * m + frame[target].to(torch.float32) * (255.0 - m)
    if integer:  # PIL's paste-with-mask: DIV255 rounds to nearest, exact in float32 for these integers
        return target, mixed.div_(255.0).add_(0.5).floor_()
    return target, mixed.div_(255.0)


def _resized_sharpened(faces: torch.Tensor, rows: AxisSampling, cols: AxisSampling,
                       sharpen_params: tuple[int, float, float, float] | None, *, integer: bool) -> torch.Tensor:
    """faces [B, fh, fw, C] resampled by rows/cols (which read the sharpening's pad, ksize // 2, beyond
    each side), then unsharp, which consumes that pad: [B, len(rows) - 2 pad, len(cols) - 2 pad, C] (pad
    0 without sharpen_params)."""
    resized = resample(faces, rows, cols, integer=integer)
    if sharpen_params:
        ksize, sigma, amount, threshold = sharpen_params
        pad = ksize // 2
        blurred = blur_valid(resized, ksize, sigma, integer=integer)
        resized = sharpen(resized[:, pad:pad + blurred.shape[1], pad:pad + blurred.shape[2]], blurred,
                          amount, threshold, integer=integer)
    return resized


def composite_patches(frames: torch.Tensor, faces: torch.Tensor, face_boxes: list[Box], masks: list[torch.Tensor],
                      crop_boxes: list[Box], *, sharpen_params: tuple[int, float, float, float] | None,
                      integer: bool) -> list[Patch]:
    """Resize each face to its own face box, optionally unsharp it, and blend it with its frame.

    frames: [B,H,W,C] (read only); faces: float [B,fh,fw,C]; masks: uint8 or float [ch,cw] per frame;
    sharpen_params: (ksize, sigma, amount, threshold) or None. The resize and the sharpening run as
    one batched computation at the largest box size; only the blend is per frame. Returns one
    (frame index, frame slices, float region) per frame that changes; nothing is written."""
    heights = [box[3] - box[1] for box in face_boxes]
    widths = [box[2] - box[0] for box in face_boxes]
    pad = sharpen_params[0] // 2 if sharpen_params else 0
    rows = axis_sampling(faces.shape[1], heights, pad, "bilinear", faces.device)
    cols = axis_sampling(faces.shape[2], widths, pad, "bilinear", faces.device)
    resized = _resized_sharpened(faces, rows, cols, sharpen_params, integer=integer)
    patches = []
    for b in range(frames.shape[0]):
        face = resized[b, :heights[b], :widths[b]]
        patch = blend_patch(frames[b], face, face_boxes[b], masks[b], crop_boxes[b], integer=integer)
        if patch is not None:
            patches.append((b, *patch))
    return patches


def composite_on_grid(under: torch.Tensor, faces: torch.Tensor, masks: torch.Tensor, rows: AxisSampling,
                      cols: AxisSampling, *, sharpen_params: tuple[int, float, float, float] | None) -> torch.Tensor:
    """A batch of faces composited onto fixed-size grids (the compositor's patches), as one computation.

    under: uint8 [B, PH, PW, C], the frame under each grid; faces: float [B, fh, fw, C] (0..255);
    masks: uint8 [B, PH, PW], the blend mask on the grid (0 where the face does not reach);
    rows/cols: where each grid position (extended by the sharpening's pad on both sides) reads its
    face: `axis_sampling` with the face box's size and offset on the grid. sharpen_params: (ksize,
    sigma, amount, threshold) or None. OpenCV's uint8 arithmetic throughout (resize, unsharp) and
    PIL's rounding for the blend, as `composite_patches`; where the mask is 0 the result is `under`
    exactly. Returns uint8 [B, PH, PW, C]."""
    resized = _resized_sharpened(faces, rows, cols, sharpen_params, integer=True)
    m = masks.unsqueeze(-1).to(torch.float32)
    mixed = resized * m + under.to(torch.float32) * (255.0 - m)
    return mixed.div_(255.0).add_(0.5).floor_().to(torch.uint8)
