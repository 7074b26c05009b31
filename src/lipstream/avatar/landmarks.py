"""Face landmarks without downloaded weights: MediaPipe's face mesh (its models ship in the wheel).

`FaceMesh.detect(frame)` -> float32 [478, 2] pixel (x, y) points of the largest face, or None.
Indices are MediaPipe's canonical face-mesh indices (refined: 468-477 are the irises)."""

from __future__ import annotations

from typing import Self

import cv2
import numpy as np

# Landmark index sets used across lipstream (MediaPipe face-mesh topology).
JAW_LINE = (10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377, 152,
            148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109)  # face oval
LIPS_OUTER = (61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291, 375, 321, 405, 314, 17, 84, 181, 91, 146)
LIPS_INNER = (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308, 324, 318, 402, 317, 14, 87, 178, 88, 95)
UPPER_LIP_INNER, LOWER_LIP_INNER = 13, 14
MOUTH_LEFT, MOUTH_RIGHT = 61, 291
NOSE_TIP, NOSE_BRIDGE_LOW = 1, 168
CHIN = 152

# The 68 iBUG / DWPose face points (what MuseTalk's box rule reads) as face-mesh indices, in iBUG
# order: 0-16 jaw, 17-26 brows, 27-30 nose bridge down to the tip, 31-35 nostrils, 36-47 eyes, 48-67 lips.
IBUG_68 = (127, 234, 93, 132, 58, 136, 150, 176, 152, 400, 379, 365, 288, 361, 323, 454, 356,
           70, 63, 105, 66, 107, 336, 296, 334, 293, 300,
           168, 197, 5, 4, 75, 97, 2, 326, 305,
           33, 160, 158, 133, 153, 144, 362, 385, 387, 263, 373, 380,
           61, 39, 37, 0, 267, 269, 291, 405, 314, 17, 84, 181, 78, 82, 13, 312, 308, 317, 14, 87)
# The nose from the bridge to the nostrils (MediaPipe's FACEMESH_NOSE points); its convex hull is the nose.
NOSE = (1, 2, 4, 5, 6, 19, 45, 48, 64, 94, 97, 98, 115, 168, 195, 197, 220, 275, 278, 294, 326, 327, 344, 440)


class FaceMesh:
    """One MediaPipe face-mesh graph (not thread-safe: one per thread). static=True treats every
    frame independently (photos, shuffled frames); False tracks across consecutive video frames.
    max_faces: faces looked for; `detect` returns the largest. While fewer are tracked, tracking
    re-runs the face detector on every frame, so 1 is the fast choice for a one-person video."""

    def __init__(self, static: bool = True, min_confidence: float = 0.5, max_faces: int = 4):
        _restore_get_prototype()
        from mediapipe.python.solutions import face_mesh

        self._mesh = face_mesh.FaceMesh(static_image_mode=static, max_num_faces=max_faces, refine_landmarks=True,
                                        min_detection_confidence=min_confidence)

    def detect(self, frame: np.ndarray) -> np.ndarray | None:
        """frame: uint8 [H, W, 3] BGR. Returns float32 [478, 2] (x, y) pixels of the largest face, or None."""
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise ValueError(f"frame must be uint8 [H, W, 3] BGR, got {frame.dtype} {frame.shape}")
        result = self._mesh.process(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))  # 20x faster than a NumPy flip
        if not result.multi_face_landmarks:
            return None
        h, w = frame.shape[:2]
        faces = [np.array([(p.x * w, p.y * h) for p in face.landmark], np.float32)
                 for face in result.multi_face_landmarks]
        return max(faces, key=lambda pts: float(np.ptp(pts[:, 0]) * np.ptp(pts[:, 1])))

    def close(self) -> None:
        self._mesh.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _restore_get_prototype() -> None:
    """MediaPipe 0.10.21's bindings call `MessageFactory.GetPrototype`, which protobuf 5 removed (it
    prints an AttributeError on import, then falls back). Restore it as the alias of
    `GetMessageClass` it was, before mediapipe is first imported."""
    from google.protobuf import message_factory

    if not hasattr(message_factory.MessageFactory, "GetPrototype"):
        message_factory.MessageFactory.GetPrototype = lambda self, descriptor: message_factory.GetMessageClass(
            descriptor)
