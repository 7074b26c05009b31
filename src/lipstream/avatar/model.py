"""The in-memory avatar: the idle cycle and what compositing and the engines need for each frame.

Index i of every per-frame field is cycle frame i (MuseTalk's forward+reversed cycle, spec 2.6);
output frame k of a session uses cycle frame k mod `len(avatar)`."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch


@dataclass
class Avatar:
    """name/tenant: identity (tenant "" is the default tenant). path: its folder on disk, or None.

    frames: uint8 [N, H, W, 3] BGR, the cycle (all frames share one size).
    face_boxes: int32 [N, 4] (x1, y1, x2, y2), the v15 face box incl. the 10 px jaw margin, always a
      real box (frames without a detected face carry the nearest detected frame's box).
    crop_boxes: int32 [N, 4] (x_s, y_s, x_e, y_e), the square 1.5x crop box; may extend past the frame.
    masks: N uint8 [ch, cw] blend masks, crop-box sized.
    crops: uint8 [N, 256, 256, 3] BGR face-box crops (Lanczos), the engines' reference image.
    landmarks: float32 [N, 478, 2] MediaPipe face-mesh points in frame pixels (x, y), or None
      (a MuseTalk folder read as it is, or imported without landmarks).
    latents: MuseTalk material [N, 8, 32, 32] (masked, reference), or None when prepared without the VAE.
    fps: the cycle's frame rate. meta: the manifest (version, source, checksums, ...)."""

    name: str
    tenant: str
    path: Path | None
    frames: np.ndarray
    face_boxes: np.ndarray
    crop_boxes: np.ndarray
    masks: list[np.ndarray]
    crops: np.ndarray
    landmarks: np.ndarray | None = None
    latents: torch.Tensor | None = None
    fps: float = 25.0
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.frames.shape[0])

    @property
    def nbytes(self) -> int:
        """Host memory of the per-frame data (frames, masks, crops, landmarks, latents), in bytes."""
        arrays = [self.frames, self.face_boxes, self.crop_boxes, self.crops, *self.masks]
        if self.landmarks is not None:
            arrays.append(self.landmarks)
        unique = {id(a): a.nbytes for a in arrays}  # masks shared by mirrored frames count once
        latents = 0 if self.latents is None else self.latents.numel() * self.latents.element_size()
        return sum(unique.values()) + latents

    @property
    def frame_size(self) -> tuple[int, int]:
        """(height, width) of every frame."""
        return int(self.frames.shape[1]), int(self.frames.shape[2])

    @functools.cached_property
    def mirrored_slots(self) -> list[int] | None:
        """MuseTalk's cycle is the video forward then reversed, so cycle frames i and 2N-1-i are the
        same image with the same boxes and mask. If this avatar is such a cycle: [0..N-1, N-1..0], the
        index of each cycle frame's copy in the first half; else None. Whatever is computed per frame
        (resident frames, latents) then needs only the first half. Computed once (it compares every
        frame), so the avatar's arrays must not change afterwards."""
        n = len(self)
        if n < 2 or n % 2:
            return None
        for i in range(n // 2):
            j = n - 1 - i
            same = (np.array_equal(self.face_boxes[i], self.face_boxes[j])
                    and np.array_equal(self.crop_boxes[i], self.crop_boxes[j])
                    and np.array_equal(self.masks[i], self.masks[j])
                    and np.array_equal(self.frames[i], self.frames[j]))
            if not same:
                return None
        half = list(range(n // 2))
        return half + half[::-1]

    def __post_init__(self) -> None:
        n = len(self)
        if self.frames.dtype != np.uint8 or self.frames.ndim != 4 or self.frames.shape[3] != 3:
            raise ValueError(f"frames must be uint8 [N, H, W, 3], got {self.frames.dtype} {self.frames.shape}")
        checks = {"face_boxes": (self.face_boxes, (n, 4)), "crop_boxes": (self.crop_boxes, (n, 4)),
                  "crops": (self.crops, (n, 256, 256, 3))}
        if self.landmarks is not None:
            checks["landmarks"] = (self.landmarks, (n, 478, 2))
        for what, (value, shape) in checks.items():
            if tuple(value.shape) != shape:
                raise ValueError(f"{what} must have shape {shape}, got {tuple(value.shape)}")
        if len(self.masks) != n:
            raise ValueError(f"expected {n} masks, got {len(self.masks)}")
        if self.latents is not None and (self.latents.ndim != 4 or self.latents.shape[0] != n):
            raise ValueError(f"latents must be [{n}, 8, 32, 32], got {tuple(self.latents.shape)}")
