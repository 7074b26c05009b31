"""The `warp` engine: no learned weights, real time on one CPU core.

    material:     {"crops": uint8 [N, 256, 256, 3] BGR, "landmarks": float32 [N, 478, 2] crop pixels,
                   "teeth": uint8 [N, 2, 40, 64, 4] BGRA (mouth_interior.py; one texture for the avatar)}
    conditioning: float32 [F, 3] mouth states (open in [-1, 1], wide, round in [0, 1]) (mouth_features.py)
    generate:     each crop with its mouth moved to its state (mouth_warp.py) -> uint8 [B, 256, 256, 3] BGR

An avatar's landmarks come from the avatar (frame pixels, mapped into its crops through the face
boxes); an avatar without them (e.g. imported from MuseTalk) gets them from MediaPipe's face mesh run
on its crops, each frame without a face borrowing the nearest frame's. The teeth are the avatar's own
when one of its frames shows them (the frame whose lips are furthest apart, if at least OWN_TEETH),
else drawn in a tone from its skin. Everything is on the CPU."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch

from lipstream.engines.base import Engine, Material
from lipstream.engines.mouth_features import MOUTH_PARAMS, SETTLE_MS, MouthFeatureStream, mouth_features
from lipstream.engines.mouth_geometry import mouth_frame
from lipstream.engines.mouth_interior import (
    TEETH_COLS,
    TEETH_ROWS,
    Teeth,
    drawn_teeth,
    teeth_from_frame,
    teeth_tone,
)
from lipstream.engines.mouth_warp import CROP, OWN_TEETH, warp_mouth
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


def avatar_teeth(crops: np.ndarray, landmarks: np.ndarray) -> Teeth:
    """The teeth of an avatar (crops uint8 [N, 256, 256, 3] BGR, landmarks float32 [N, 478, 2] crop
    pixels): the interior of its most open mouth if that shows teeth, else drawn in its skin's tone."""
    def lips_apart(points: np.ndarray) -> float:
        try:
            return mouth_frame(points).lips_apart
        except ValueError:  # no mouth to speak of in this frame's landmarks: it shows no teeth either
            return 0.0

    apart = [lips_apart(points) for points in landmarks]
    best = int(np.argmax(apart))
    if apart[best] >= OWN_TEETH:
        return teeth_from_frame(crops[best], mouth_frame(landmarks[best]))
    return drawn_teeth(teeth_tone(crops[0], landmarks[0]))


class WarpEngine(Engine):
    """Animates the avatar's own mouth from the audio's loudness and rough spectral shape."""

    name = "warp"
    silence_hangover_ms = SETTLE_MS  # the mouth closes in pauses and comes to rest this long after speech
    torch_threads = 1  # torch only gathers its material's rows; the warp is NumPy/OpenCV

    def __init__(self):
        super().__init__(torch.device("cpu"), torch.float32)

    def material(self, avatar: Avatar) -> Material:
        """{"crops": uint8 [N, 256, 256, 3] BGR, "landmarks": float32 [N, 478, 2] in crop pixels,
        "teeth": uint8 [N, 2, 40, 64, 4] BGRA (the avatar's one texture, repeated without copies)}."""
        if avatar.landmarks is not None:
            landmarks = crop_landmarks(avatar.landmarks, avatar.face_boxes)
        else:
            landmarks = detect_crop_landmarks(avatar.crops, avatar.name)
        teeth = torch.from_numpy(avatar_teeth(avatar.crops, landmarks))
        return {"crops": torch.from_numpy(np.require(avatar.crops, requirements=["C", "W"])),
                "landmarks": torch.from_numpy(landmarks), "teeth": teeth.expand(len(avatar), *teeth.shape)}

    def features(self, audio: np.ndarray, fps: int = 25) -> torch.Tensor:
        """float32 [S] 16 kHz mono -> mouth states float32 [floor(S/16000*fps), 3] (open, wide, round)."""
        return mouth_features(audio, fps)

    def feature_stream(self, fps: int = 25) -> MouthFeatureStream:
        """The live form of `features`: exactly the same states for the same audio, one frame behind."""
        return MouthFeatureStream(fps)

    def generate(self, material: Mapping[str, torch.Tensor], conditioning: torch.Tensor) -> torch.Tensor:
        """material: "crops" uint8 [B, 256, 256, 3], "landmarks" float [B, 478, 2], "teeth" uint8
        [B, 2, 40, 64, 4]; conditioning: [B, 3]. Returns faces: uint8 [B, 256, 256, 3] BGR, contiguous,
        on the CPU."""
        crops, landmarks, teeth = material["crops"], material["landmarks"], material["teeth"]
        b = crops.shape[0]
        shapes = (tuple(crops.shape), tuple(landmarks.shape), tuple(teeth.shape), tuple(conditioning.shape))
        expected = ((b, CROP, CROP, 3), (b, 478, 2), (b, 2, TEETH_ROWS, TEETH_COLS, 4), (b, len(MOUTH_PARAMS)))
        if crops.dtype != torch.uint8 or teeth.dtype != torch.uint8 or shapes != expected:
            raise ValueError(f"expected crops uint8 [B, {CROP}, {CROP}, 3], landmarks [B, 478, 2], teeth uint8 "
                             f"[B, 2, {TEETH_ROWS}, {TEETH_COLS}, 4] and conditioning [B, {len(MOUTH_PARAMS)}], "
                             f"got {crops.dtype} {shapes[0]}, {shapes[1]}, {teeth.dtype} {shapes[2]} and {shapes[3]}")
        crops_np = crops.cpu().numpy()
        landmarks_np = landmarks.cpu().numpy().astype(np.float32, copy=False)
        teeth_np = teeth.cpu().numpy()
        states = conditioning.cpu().numpy()
        faces = torch.empty(b, CROP, CROP, 3, dtype=torch.uint8)
        out = faces.numpy()
        for i in range(b):
            out[i] = warp_mouth(crops_np[i], landmarks_np[i], states[i], teeth_np[i])
        return faces
