"""Hand-built in-memory avatars for tests that need one without running avatar preparation."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lipstream.avatar.model import Avatar
from lipstream.bench.scene import Scene


def scene_avatar(scenes: Sequence[Scene], name: str = "test") -> Avatar:
    """An avatar whose cycle frame i is `scenes[i]` (its frame, face box, crop box, mask; its face as the crop)."""
    return Avatar(name, "", None, frames=np.stack([s.frame for s in scenes]),
                  face_boxes=np.int32([s.face_box for s in scenes]),
                  crop_boxes=np.int32([s.crop_box for s in scenes]),
                  masks=[s.mask for s in scenes], crops=np.stack([s.face for s in scenes]))
