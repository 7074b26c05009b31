"""Synthetic but photographic test scenes built from scikit-image's astronaut photo (public domain):
for the post-processing, a frame, a generated 256x256 face and MuseTalk v1.5-style boxes and blend
mask; for avatar preparation, short face videos with small head motion and faceless frames."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from lipstream.avatar.geometry import crop_box_for
from lipstream.avatar.masks import feather
from lipstream.imgproc.boxes import Box


def soft_mask_for(face_box: Box, crop_box: Box) -> np.ndarray:
    """uint8 [ch,cw]: the lower half of the face box, feathered with a Gaussian about 10% of the crop wide."""
    x1, _, x2, y2 = face_box
    xs, ys, xe, ye = crop_box
    mask = np.zeros((ye - ys, xe - xs), np.uint8)
    mask[(ye - ys) // 2:y2 - ys, x1 - xs:x2 - xs] = 255
    return feather(mask)


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


def face_video_frames(photo: np.ndarray, frame_hw: tuple[int, int], count: int, sway_px: int = 6,
                      blank: Sequence[int] = ()) -> Iterator[np.ndarray]:
    """`count` uint8 [H, W, 3] BGR frames: `photo` scaled to the frame height, centred on grey, swaying
    left and right by up to `sway_px` (a small head motion, one period every 2 s at 25 fps). The
    frames listed in `blank` are plain grey (no face)."""
    h, w = frame_hw
    face = cv2.resize(photo, (h * photo.shape[1] // photo.shape[0], h), interpolation=cv2.INTER_AREA)
    grey = np.full((h, w, 3), 128, np.uint8)
    for i in range(count):
        frame = grey.copy()
        if i not in blank:
            x = (w - face.shape[1]) // 2 + round(sway_px * np.sin(2 * np.pi * i / 50))
            frame[:, max(x, 0):x + face.shape[1]] = face[:, max(-x, 0):w - x]
        yield frame


def write_face_video(path: str | os.PathLike, photo: np.ndarray, frame_hw: tuple[int, int] = (720, 1280),
                     seconds: float = 2.0, fps: int = 25, **kwargs) -> Path:
    """An H.264 MP4 (yuv420p, crf 18) of `face_video_frames(photo, frame_hw, seconds * fps, **kwargs)`."""
    import av

    path = Path(path)
    with av.open(os.fspath(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frame_hw
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast"}
        for frame in face_video_frames(photo, frame_hw, round(seconds * fps), **kwargs):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="bgr24")))
        container.mux(stream.encode())
    return path
