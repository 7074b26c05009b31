"""MuseTalk's original per-frame post-processing, re-implemented from its described behaviour
(reference spec 5.2): cv2.resize (bilinear), then get_image_blending through PIL with whole-frame
BGR<->RGB conversions (`musetalk_composition`). lipstream adds an unsharp mask between the two
(setting `sharpen`); `postprocess` does all three, the unsharp mask in NumPy float64.

This is the baseline the benchmarks compare against and the reference the tests check parity with.
It is deliberately not optimised."""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image


def resize(face: np.ndarray, face_box: tuple[int, int, int, int]) -> np.ndarray:
    """uint8 BGR face -> uint8 [y2-y1, x2-x1, 3]."""
    x1, y1, x2, y2 = face_box
    return cv2.resize(face, (x2 - x1, y2 - y1), interpolation=cv2.INTER_LINEAR)


def unsharp(img: np.ndarray, amount: float = 1.2, sigma: float = 1.0, threshold: float = 5.0) -> np.ndarray:
    """Float64 promotion, clip, round; pixels with |img - blur| < threshold keep img."""
    blurred = cv2.GaussianBlur(img, (0, 0), sigma)
    sharp = float(amount + 1) * img - float(amount) * blurred
    sharp = np.clip(sharp, 0, 255).round().astype(np.uint8)
    low_contrast = np.abs(img.astype(np.int16) - blurred) < threshold
    np.copyto(sharp, img, where=low_contrast)
    return sharp


def blend(frame: np.ndarray, face: np.ndarray, face_box: tuple[int, int, int, int], mask: np.ndarray,
          crop_box: tuple[int, int, int, int]) -> np.ndarray:
    """get_image_blending: whole frame to PIL RGB, crop, hard paste of the face, paste back with the mask."""
    body = Image.fromarray(frame[:, :, ::-1])
    face_image = Image.fromarray(face[:, :, ::-1])
    x1, y1, x2, y2 = face_box
    xs, ys, _, _ = crop_box
    face_large = body.crop(tuple(crop_box))
    face_large.paste(face_image, (x1 - xs, y1 - ys, x2 - xs, y2 - ys))
    body.paste(face_large, tuple(crop_box[:2]), Image.fromarray(mask).convert("L"))
    return np.array(body)[:, :, ::-1]


def musetalk_composition(frame: np.ndarray, face: np.ndarray, face_box: tuple[int, int, int, int],
                         mask: np.ndarray, crop_box: tuple[int, int, int, int]) -> np.ndarray:
    """MuseTalk's own composition of one frame: resize -> blend (no sharpening)."""
    return blend(frame, resize(face, face_box), face_box, mask, crop_box)


def postprocess(frame: np.ndarray, face: np.ndarray, face_box: tuple[int, int, int, int], mask: np.ndarray,
                crop_box: tuple[int, int, int, int]) -> np.ndarray:
    """The whole pipeline the benchmarks time, the original way: resize -> unsharp -> blend."""
    return blend(frame, unsharp(resize(face, face_box)), face_box, mask, crop_box)
