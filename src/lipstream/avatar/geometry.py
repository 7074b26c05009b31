"""MuseTalk v1.5's face geometry from MediaPipe landmarks (reference spec 2.4 and 2.7).

Boxes are `(x1, y1, x2, y2)` integer pixels of the full frame, x2/y2 exclusive, as in coords.pkl."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from lipstream.avatar.landmarks import IBUG_68
from lipstream.imgproc.boxes import Box

JAW_MARGIN = 10       # v1.5's `extra_margin`: px added below the chin line, clamped to the frame
CROP_EXPAND = 1.5     # the square crop box is 1.5x the face box's larger half-side
CROP_SIZE = 256       # the engines' face crop, height = width
_NOSE_BRIDGE_LOW = 29  # iBUG point just above the nose tip: the top half of the box mirrors it


def face_box(landmarks: np.ndarray, frame_hw: tuple[int, int], margin: int = JAW_MARGIN) -> Box | None:
    """The v1.5 face box of one face, or None when it is empty inside the frame.

    landmarks: float32 [478, 2] face-mesh (x, y) pixels. frame_hw: (height, width).
    Read on the 68 iBUG points (truncated to int, as MuseTalk casts DWPose's): the top is the
    lower nose-bridge point mirrored above itself (`p.y - (chin.y - p.y)`, at least 0), the bottom
    the chin line plus `margin` (at most the frame height), the sides the outermost points (kept
    inside the frame, where MuseTalk would fall back to its S3FD box)."""
    h, w = frame_hw
    points = landmarks[list(IBUG_68)].astype(np.int32)
    bottom = int(points[:, 1].max())
    p_y = int(points[_NOSE_BRIDGE_LOW, 1])
    x1, y1 = max(int(points[:, 0].min()), 0), max(p_y - (bottom - p_y), 0)
    x2, y2 = min(int(points[:, 0].max()), w), min(bottom + margin, h)
    if x2 <= x1 or y2 <= y1:
        return None
    return x1, y1, x2, y2


def crop_box_for(box: Box, expand: float = CROP_EXPAND) -> Box:
    """The square crop box around a face box: centred on it, half-side int(floor(max(w, h) / 2) * expand).
    It may extend past the frame."""
    x1, y1, x2, y2 = box
    xc, yc = (x1 + x2) // 2, (y1 + y2) // 2
    s = int((max(x2 - x1, y2 - y1) // 2) * expand)
    return xc - s, yc - s, xc + s, yc + s


def crop_face(frame: np.ndarray, box: Box) -> np.ndarray:
    """frame: uint8 [H, W, 3] BGR -> uint8 [256, 256, 3]: the face box resized with Lanczos (aspect not kept)."""
    x1, y1, x2, y2 = box
    return cv2.resize(frame[y1:y2, x1:x2], (CROP_SIZE, CROP_SIZE), interpolation=cv2.INTER_LANCZOS4)


def nearest_detected(detected: Sequence[bool] | np.ndarray) -> np.ndarray:
    """int64 [N]: for every frame, the index of the nearest frame with a face (itself when it has one;
    the earlier one on a tie). Raises ValueError when no frame has a face."""
    found = np.flatnonzero(np.asarray(detected, dtype=bool))
    if found.size == 0:
        raise ValueError("no frame has a face")
    index = np.arange(len(detected))
    after = np.minimum(np.searchsorted(found, index), found.size - 1)
    before = np.maximum(after - 1, 0)
    take_before = np.abs(index - found[before]) <= np.abs(found[after] - index)
    return np.where(take_before, found[before], found[after])
