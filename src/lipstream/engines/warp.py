"""The `warp` engine: no learned weights, real time on one CPU core.

    material:     {"crops": uint8 [N, 256, 256, 3] BGR, "landmarks": float32 [N, 478, 2] crop pixels}
    conditioning: float32 [F, 3] mouth states (open, wide, round) in [0, 1] (mouth_features.py)
    generate:     each crop with its mouth moved to its state (mouth_warp.py) -> uint8 [B, 256, 256, 3] BGR

An avatar's landmarks come from the avatar (frame pixels, mapped into its crops through the face
boxes); an avatar without them (e.g. imported from MuseTalk) gets them from MediaPipe's face mesh run
on its crops, each frame without a face borrowing the nearest frame's. Everything is on the CPU."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch

from lipstream.engines.base import Engine, Material
from lipstream.engines.mouth_features import MOUTH_PARAMS, MouthFeatureStream, mouth_features
from lipstream.engines.mouth_warp import CROP, warp_mouth
from lipstream.errors import NoFaceError

if TYPE_CHECKING:
    from lipstream.avatar.model import Avatar


def crop_landmarks(landmarks: np.ndarray, face_boxes: np.ndarray) -> np.ndarray:
    """Frame-pixel landmarks float32 [N, 478, 2] -> pixels of the 256x256 face-box crops, float32 [N, 478, 2]
    (the crops are the face boxes, int32 [N, 4] (x1, y1, x2, y2), resized without keeping the aspect)."""
    boxes = face_boxes.astype(np.float32)
    origin = boxes[:, None, :2]
    scale = CROP / (boxes[:, None, 2:] - boxes[:, None, :2])
    return ((landmarks - origin) * scale).astype(np.float32)


def detect_crop_landmarks(crops: np.ndarray, name: str = "avatar") -> np.ndarray:
    """Face-mesh landmarks of uint8 [N, 256, 256, 3] BGR crops: float32 [N, 478, 2] crop pixels. A crop
    without a face takes the nearest crop's landmarks; `NoFaceError` when no crop shows a face."""
    from lipstream.avatar.landmarks import FaceMesh

    with FaceMesh() as mesh:
        found = [mesh.detect(crop) for crop in crops]
    have = [i for i, points in enumerate(found) if points is not None]
    if not have:
        raise NoFaceError(f"{name}: the face mesh finds no face in any of its {len(crops)} face crops; "
                          f"prepare the avatar again from a video or photo with a clearly visible face")
    return np.stack([found[min(have, key=lambda j: abs(j - i))] for i in range(len(found))])


class WarpEngine(Engine):
    """Animates the avatar's own mouth from the audio's loudness and rough spectral shape."""

    name = "warp"

    def __init__(self):
        super().__init__(torch.device("cpu"), torch.float32)

    def material(self, avatar: Avatar) -> Material:
        """{"crops": uint8 [N, 256, 256, 3] BGR, "landmarks": float32 [N, 478, 2] in crop pixels}."""
        if avatar.landmarks is not None:
            landmarks = crop_landmarks(avatar.landmarks, avatar.face_boxes)
        else:
            landmarks = detect_crop_landmarks(avatar.crops, avatar.name)
        return {"crops": torch.from_numpy(np.require(avatar.crops, requirements=["C", "W"])),
                "landmarks": torch.from_numpy(landmarks)}

    def features(self, audio: np.ndarray, fps: int = 25) -> torch.Tensor:
        """float32 [S] 16 kHz mono -> mouth states float32 [floor(S/16000*fps), 3] (open, wide, round)."""
        return mouth_features(audio, fps)

    def feature_stream(self, fps: int = 25) -> MouthFeatureStream:
        """The live form of `features`: exactly the same states for the same audio, one frame behind."""
        return MouthFeatureStream(fps)

    def generate(self, material: Mapping[str, torch.Tensor], conditioning: torch.Tensor) -> torch.Tensor:
        """material: "crops" uint8 [B, 256, 256, 3], "landmarks" float [B, 478, 2]; conditioning: [B, 3].
        Returns faces: uint8 [B, 256, 256, 3] BGR, contiguous, on the CPU."""
        crops, landmarks = material["crops"], material["landmarks"]
        b = crops.shape[0]
        shapes = (tuple(crops.shape), tuple(landmarks.shape), tuple(conditioning.shape))
        if crops.dtype != torch.uint8 or shapes != ((b, CROP, CROP, 3), (b, 478, 2), (b, len(MOUTH_PARAMS))):
            raise ValueError(f"expected crops uint8 [B, {CROP}, {CROP}, 3], landmarks [B, 478, 2] and "
                             f"conditioning [B, {len(MOUTH_PARAMS)}], got {crops.dtype} {shapes[0]}, "
                             f"{shapes[1]} and {shapes[2]}")
        crops_np = crops.cpu().numpy()
        landmarks_np = landmarks.cpu().numpy().astype(np.float32, copy=False)
        states = conditioning.cpu().numpy()
        faces = torch.empty(b, CROP, CROP, 3, dtype=torch.uint8)
        out = faces.numpy()
        for i in range(b):
            out[i] = warp_mouth(crops_np[i], landmarks_np[i], states[i])
        return faces
