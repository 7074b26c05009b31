"""The NumPy implementation of lipstream.imgproc: OpenCV uint8 code, one image `[H,W,C]` at a time.

These are the reference semantics (cv2.resize INTER_LINEAR, cv2.GaussianBlur with BORDER_REFLECT_101,
PIL's paste-with-mask rounding) and the fast CPU path: about 1 ms per 1080p frame for the whole
resize -> unsharp -> blend pipeline on one core, where the MuseTalk original spends ~29 ms."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import cv2
import numpy as np

from lipstream.imgproc.boxes import Box, blend_region

_INTERPOLATION = {"bilinear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST}


def _keep_channels(result: np.ndarray, channels: int) -> np.ndarray:
    """OpenCV drops a trailing channel axis of size 1; put it back."""
    return result.reshape(result.shape[0], result.shape[1], channels)


def resize(img: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    """uint8 [H,W,C] -> uint8 [h,w,C] with size = (h, w)."""
    out = cv2.resize(img, (size[1], size[0]), interpolation=_INTERPOLATION[mode])
    return _keep_channels(out, img.shape[2])


def gaussian_blur(img: np.ndarray, ksize: int, sigma: float) -> np.ndarray:
    """uint8 [H,W,C] -> uint8 [H,W,C]; OpenCV's bit-exact 8-bit fixed-point filter."""
    out = cv2.GaussianBlur(img, (ksize, ksize), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)
    return _keep_channels(out, img.shape[2])


def unsharp_mask(img: np.ndarray, ksize: int, sigma: float, amount: float, threshold: float) -> np.ndarray:
    """uint8 [H,W,C] -> uint8 [H,W,C]: saturate(img*(1+amount) - blur*amount), img where |img-blur| < threshold."""
    blurred = gaussian_blur(img, ksize, sigma)
    sharp = _keep_channels(cv2.addWeighted(img, 1.0 + amount, blurred, -amount, 0.0), img.shape[2])
    # absdiff: no uint8 wrap-around; the comparison is exact for any real threshold
    low_contrast = cv2.compare(cv2.absdiff(img, blurred), math.ceil(threshold), cv2.CMP_LT)
    cv2.copyTo(img, low_contrast, sharp)
    return sharp


def blend_into(frame: np.ndarray, face: np.ndarray, face_box: Box, mask: np.ndarray, crop_box: Box) -> None:
    """Composite one face into one frame in place, over the face box only, with PIL's rounding.

    frame: uint8 [H,W,C]; face: uint8 [fh,fw,C] at the face-box size; mask: uint8 [ch,cw] crop-box sized.
    Only the face box's rows that the mask reaches are touched (elsewhere the blend is the identity)."""
    rows = mask_rows(face_box, mask, crop_box)
    if rows is None:
        return
    if rows != (0, face_box[3] - face_box[1]):
        face = face[rows[0]:rows[1]]
        face_box = (face_box[0], face_box[1] + rows[0], face_box[2], face_box[1] + rows[1])
    region = blend_region(face_box, crop_box, frame.shape[0], frame.shape[1])
    if region is None:
        return
    target, face_part, mask_part = region
    linear_blend(face[face_part], frame[target], mask[mask_part])


# cv2.blendLinear computes (a*w1 + b*w2) / (w1 + w2 + 1e-5) in float32 and rounds to nearest. With the
# weights scaled to sum to 1000 the 1e-5 is negligible, and the result equals PIL's integer
# DIV255(a*m + b*(255-m)) for every (a, b, m): t/255 is never within float32's error of a .5 boundary.
_BLEND_WEIGHT_SCALE = np.float32(1000 / 255)


def linear_blend(face: np.ndarray, dst: np.ndarray, mask: np.ndarray) -> None:
    """dst = face*m/255 + dst*(1-m/255) with PIL's rounding, in place; one fused OpenCV pass.

    face, dst: uint8 [h,w,C] (dst may be a view into a frame); mask: uint8 [h,w]."""
    weight = mask.astype(np.float32)
    rest = 255 - weight
    weight *= _BLEND_WEIGHT_SCALE
    rest *= _BLEND_WEIGHT_SCALE
    cv2.blendLinear(face, dst, weight, rest, dst=dst)  # writes into the view (checked by the tests)


def mask_rows(face_box: Box, mask: np.ndarray, crop_box: Box) -> tuple[int, int] | None:
    """Rows [r0, r1) of the face box (0 = its top row) where `mask` is non-zero, or None.

    Elsewhere the blend is the identity: with mask 0, PIL's rounding gives back the frame exactly.
    MuseTalk's masks cover the lower half of the face box, so this halves the work below."""
    x1, y1, x2, y2 = face_box
    xs, ys = crop_box[0], crop_box[1]
    top, bottom = max(0, y1 - ys), min(mask.shape[0], y2 - ys)
    left, right = max(0, x1 - xs), min(mask.shape[1], x2 - xs)
    if bottom <= top or right <= left:
        return None
    rows = np.flatnonzero(mask[top:bottom, left:right].any(axis=1))
    if rows.size == 0:
        return None
    offset = top - (y1 - ys)
    return offset + int(rows[0]), offset + int(rows[-1]) + 1


def composite_one(frame: np.ndarray, face: np.ndarray, face_box: Box, mask: np.ndarray, crop_box: Box,
                  sharpen_params: tuple[int, float, float, float] | None) -> None:
    """Resize `face` (uint8 [fh,fw,C], any size) to the face box, optionally unsharp it
    (ksize, sigma, amount, threshold), and blend it into `frame` in place.

    Only the rows the mask reaches are sharpened and blended; the sharpening reads `ksize // 2`
    rows beyond them, so the result is bit-identical to processing the whole face box."""
    rows = mask_rows(face_box, mask, crop_box)
    if rows is None:
        return
    (r0, r1), (x1, y1, x2, y2) = rows, face_box
    resized = resize(face, (y2 - y1, x2 - x1), "bilinear")
    if sharpen_params:
        pad = sharpen_params[0] // 2
        a, b = max(0, r0 - pad), min(y2 - y1, r1 + pad)
        resized = unsharp_mask(resized[a:b], *sharpen_params)[r0 - a:r1 - a]
    else:
        resized = resized[r0:r1]
    blend_into(frame, resized, (x1, y1 + r0, x2, y1 + r1), mask, crop_box)


@cache
def _frame_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="lipstream-imgproc")


def for_each_frame(work: Callable[[int], None], count: int) -> None:
    """work(0) ... work(count-1), spread over one thread per CPU core when count > 1 (OpenCV and
    NumPy release the GIL, so a batch's frames composite in parallel). Exceptions propagate."""
    if count == 1:
        work(0)
        return
    for _ in _frame_pool().map(work, range(count)):
        pass
