"""Synthetic but photographic test scenes for the post-processing: a frame, a generated 256x256 face,
and MuseTalk v1.5-style boxes and blend mask, built from scikit-image's astronaut photo (public domain)."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

Box = tuple[int, int, int, int]


def crop_box_for(face_box: Box, expand: float = 1.5) -> Box:
    """MuseTalk v1.5's square crop box around a face box: centred, half-size floor(max(w,h)/2) * expand."""
    x1, y1, x2, y2 = face_box
    xc, yc = (x1 + x2) // 2, (y1 + y2) // 2
    s = int((max(x2 - x1, y2 - y1) // 2) * expand)
    return xc - s, yc - s, xc + s, yc + s


def soft_mask_for(face_box: Box, crop_box: Box) -> np.ndarray:
    """uint8 [ch,cw]: the lower half of the face box, feathered with a Gaussian about 10% of the crop wide."""
    x1, _, x2, y2 = face_box
    xs, ys, xe, ye = crop_box
    mask = np.zeros((ye - ys, xe - xs), np.uint8)
    mask[(ye - ys) // 2:y2 - ys, x1 - xs:x2 - xs] = 255
    k = int(0.1 * (xe - xs) / 2) * 2 + 1
    return cv2.GaussianBlur(mask, (k, k), 0)


@dataclass
class Scene:
    frame: np.ndarray   # uint8 [H,W,3] BGR
    face: np.ndarray    # uint8 [256,256,3] BGR, what the model would produce
    face_box: Box
    crop_box: Box
    mask: np.ndarray    # uint8 [ch,cw]


def astronaut_bgr() -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[:, :, ::-1])


def make_scene(frame_hw: tuple[int, int] = (720, 1280), face_box: Box = (500, 150, 760, 470), seed: int = 0,
               photo: np.ndarray | None = None) -> Scene:
    """A frame of `frame_hw` (height, width) and a face to blend at `face_box`; `seed` varies the face."""
    photo = astronaut_bgr() if photo is None else photo
    rng = np.random.default_rng(seed)
    frame = cv2.resize(photo, frame_hw[::-1], interpolation=cv2.INTER_AREA)
    face = cv2.resize(photo[30:190, 150:310], (256, 256), interpolation=cv2.INTER_CUBIC)
    face = np.clip(face.astype(np.int16) + rng.integers(-20, 21, 3), 0, 255).astype(np.uint8)
    crop_box = crop_box_for(face_box)
    return Scene(frame, face, face_box, crop_box, soft_mask_for(face_box, crop_box))
