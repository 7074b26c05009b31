"""Blend masks in MuseTalk v1.5's geometry (reference spec 2.7), with the face region drawn from
MediaPipe landmarks where MuseTalk runs BiSeNet face parsing (whose weights cannot be had offline).

Per frame: the face region is drawn on the square crop box at the parser's 512x512 size (face oval
as skin; nose and lips as their own classes), put through the `jaw` mode's morphology (dilated in
the central band, eroded on the cheeks, nose removed, lips added), resized to the crop box,
restricted to the face box, cut to its lower half and feathered with a Gaussian ~10% of the crop."""

from __future__ import annotations

import cv2
import numpy as np

from lipstream.avatar.landmarks import JAW_LINE, LIPS_OUTER, NOSE
from lipstream.imgproc.boxes import Box

PARSE_SIZE = 512         # the parser's working size
CHEEK_WIDTH = 90         # v1.5 scripts' left/right_cheek_width: half-width of the central band at 512
FEATHER_FRACTION = 0.1   # Gaussian kernel ~10% of the crop width (the real-time scripts' value)


def _jaw_dilate_kernel() -> np.ndarray:
    """MuseTalk's `jaw` dilation element: 33x33, anchored at its centre; rows 10-20 a cone of widths
    1, 3, ..., 21, rows 21-32 a run of 21 (columns 6-26)."""
    kernel = np.zeros((33, 33), np.uint8)
    for row, half in zip(range(10, 21), range(11), strict=True):
        kernel[row, 16 - half:17 + half] = 1
    kernel[21:, 6:27] = 1
    return kernel


_DILATE = _jaw_dilate_kernel()
_ERODE = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (35, 3))
_CHEEKS = np.zeros((PARSE_SIZE, PARSE_SIZE), bool)  # the side bands where the eroded skin is used
_CHEEKS[:, :PARSE_SIZE // 2 - CHEEK_WIDTH + 1] = True
_CHEEKS[:, PARSE_SIZE // 2 + CHEEK_WIDTH:] = True


def feather_kernel_size(crop_width: int) -> int:
    """The odd Gaussian kernel size for a crop box `crop_width` (= 2s) wide: int(floor(0.1*2s/2)*2)+1."""
    return int(FEATHER_FRACTION * crop_width / 2) * 2 + 1


def feather(mask: np.ndarray) -> np.ndarray:
    """uint8 [ch, cw] -> the same blurred with the crop-sized Gaussian (sigma 0: OpenCV derives it from k)."""
    k = feather_kernel_size(mask.shape[1])
    return cv2.GaussianBlur(mask, (k, k), 0)


def _polygon(shape: tuple[int, int], points: np.ndarray, hull: bool = False) -> np.ndarray:
    canvas = np.zeros(shape, np.uint8)
    points = np.round(points).astype(np.int32)
    cv2.fillPoly(canvas, [cv2.convexHull(points) if hull else points], 255)
    return canvas > 0


def face_region(landmarks: np.ndarray, crop_box: Box, top: int = 0) -> np.ndarray:
    """The `jaw`-mode face region on the crop box at the parser's size, rows `top`..511:
    bool [512 - top, 512].

    landmarks: float32 [478, 2] frame pixels. crop_box: the square 1.5x crop box (2s wide)."""
    xs, ys, xe, _ = crop_box
    points = (landmarks - np.float32([xs, ys])) * (PARSE_SIZE / (xe - xs)) - np.float32([0, top])
    shape = (PARSE_SIZE - top, PARSE_SIZE)
    nose = _polygon(shape, points[list(NOSE)], hull=True)
    lips = _polygon(shape, points[list(LIPS_OUTER)])
    skin = (_polygon(shape, points[list(JAW_LINE)]) & ~nose & ~lips).astype(np.uint8) * 255
    dilated = cv2.dilate(skin, _DILATE) > 0
    eroded = cv2.erode(dilated.astype(np.uint8) * 255, _ERODE, iterations=2) > 0
    region = np.where(_CHEEKS[top:], eroded, dilated)
    return (region & ~nose) | lips


# Rows of the face region that the kept lower half depends on: the dilation looks 16 rows down and 6
# up, the two erosions 2 rows, the cubic resize 2; rows from here on are exact, the ones above unused.
_REGION_TOP = PARSE_SIZE // 2 - 16


def blend_mask(landmarks: np.ndarray, box: Box, crop_box: Box) -> np.ndarray:
    """uint8 [2s, 2s]: the blend mask of one frame (see the module doc), crop-box sized.

    landmarks: float32 [478, 2] frame pixels; box: the face box; crop_box: `crop_box_for(box)`."""
    region = np.zeros((PARSE_SIZE, PARSE_SIZE), np.uint8)
    region[_REGION_TOP:] = face_region(landmarks, crop_box, _REGION_TOP) * np.uint8(255)
    return restrict_and_feather(region, box, crop_box)


def restrict_and_feather(region: np.ndarray, box: Box, crop_box: Box) -> np.ndarray:
    """uint8 [512, 512] face region -> the blend mask [2s, 2s]: resized to the crop box, kept inside
    the face box and below the crop's middle row (s), feathered."""
    xs, ys, xe, ye = crop_box
    size = xe - xs
    region = cv2.resize(region, (size, size), interpolation=cv2.INTER_CUBIC)
    x1, y1, x2, y2 = box
    rows = slice(max(y1 - ys, size // 2), max(min(y2 - ys, size), 0))  # face box, lower half of the crop
    cols = slice(max(x1 - xs, 0), max(min(x2 - xs, size), 0))
    mask = np.zeros((ye - ys, size), np.uint8)
    mask[rows, cols] = region[rows, cols]
    return feather(mask)
