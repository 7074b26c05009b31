"""Shared by the engine tests: a one-frame Avatar from a photo, with MediaPipe landmarks."""

from __future__ import annotations

import cv2
import numpy as np

from lipstream.avatar.landmarks import CHIN, JAW_LINE, NOSE_TIP, FaceMesh
from lipstream.avatar.model import Avatar
from lipstream.synthetic import crop_box_for, soft_mask_for


def photo_avatar(photo: np.ndarray, name: str = "photo") -> Avatar:
    """photo: uint8 [H, W, 3] BGR with one face. The face box spans the face oval's width and runs
    from as far above the nose tip as the chin (+10 px) lies below it, roughly MuseTalk v1.5's box."""
    with FaceMesh() as mesh:
        points = mesh.detect(photo)
    assert points is not None, "no face in the photo"
    oval = points[list(JAW_LINE)]
    bottom = points[CHIN, 1] + 10
    top = 2 * points[NOSE_TIP, 1] - bottom
    face_box = tuple(int(v) for v in np.rint([oval[:, 0].min(), top, oval[:, 0].max(), bottom]))
    x1, y1, x2, y2 = face_box
    crop = cv2.resize(photo[y1:y2, x1:x2], (256, 256), interpolation=cv2.INTER_LANCZOS4)
    crop_box = crop_box_for(face_box)
    return Avatar(name, "", None, frames=photo[None].copy(), face_boxes=np.int32([face_box]),
                  crop_boxes=np.int32([crop_box]), masks=[soft_mask_for(face_box, crop_box)],
                  crops=crop[None], landmarks=points[None])
