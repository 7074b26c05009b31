"""JPEG frames for the WebSocket transport (one image per message)."""

from __future__ import annotations

import cv2
import numpy as np


def encode_jpeg(frame: np.ndarray, quality: int = 85) -> bytes:
    """frame: uint8 [H, W, 3] BGR (NumPy). quality: 1-100 (OpenCV's, libjpeg scale). Returns JPEG bytes."""
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"frame must be uint8 [H, W, 3] BGR, got {frame.dtype} {frame.shape}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in [1, 100], got {quality}")
    ok, data = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {frame.shape} frame as JPEG")
    return data.tobytes()
