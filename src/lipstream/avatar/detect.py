"""Face-mesh landmarks over a sequence of frames, with MuseTalk's forward+reversed cycle in mind."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

from lipstream.avatar.geometry import nearest_detected
from lipstream.avatar.landmarks import FaceMesh


def detect_landmarks(frames: Sequence[np.ndarray] | np.ndarray, *, progress: bool = True,
                     label: str = "") -> np.ndarray | None:
    """frames: L uint8 [H, W, 3] BGR frames in playing order (tracked from frame to frame).

    Returns float32 [L, 478, 2]: each frame's points, where a frame without a face takes the nearest
    frame's that has one; None when no frame has a face. A frame equal to its mirror partner
    (index L-1-i, as in the reversed half of a cycle) reuses that frame's points."""
    count = len(frames)
    points: list[np.ndarray | None] = []
    with FaceMesh(static=False, max_faces=1) as mesh:
        for i in tqdm(range(count), desc=f"{label}: landmarks".lstrip(": "), unit="frame", disable=not progress):
            j = count - 1 - i
            if j < i and np.array_equal(frames[i], frames[j]):
                points.append(points[j])
            else:
                points.append(mesh.detect(frames[i]))
    found = [p is not None for p in points]
    if not any(found):
        return None
    return np.stack([points[k] for k in nearest_detected(found)]).astype(np.float32)
