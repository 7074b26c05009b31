"""JPEG frames for the WebSocket transport (one image per message).

Two encoders: OpenCV's libjpeg on the CPU, and nvJPEG on the GPU (torchvision.io.encode_jpeg on a
CUDA tensor), which keeps a CUDA session's frames on the GPU: only the JPEG bytes cross the bus."""

from __future__ import annotations

import functools

import cv2
import numpy as np
import torch


def _check_quality(quality: int) -> None:
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in [1, 100], got {quality}")


def encode_jpeg(frame: np.ndarray, quality: int = 85) -> bytes:
    """frame: uint8 [H, W, 3] BGR (NumPy). quality: 1-100 (OpenCV's, libjpeg scale). Returns JPEG bytes."""
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"frame must be uint8 [H, W, 3] BGR, got {frame.dtype} {frame.shape}")
    _check_quality(quality)
    ok, data = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {frame.shape} frame as JPEG")
    return data.tobytes()


@functools.cache
def nvjpeg_available() -> bool:
    """True when torchvision can encode JPEG from CUDA tensors (torchvision >= 0.19 with CUDA)."""
    if not torch.cuda.is_available():
        return False
    try:
        from torchvision.io import encode_jpeg as tv_encode_jpeg
    except ImportError:
        return False
    try:
        tv_encode_jpeg(torch.zeros(3, 16, 16, dtype=torch.uint8, device="cuda"), quality=80)
    except (RuntimeError, TypeError):  # a CPU-only torchvision build, or one without nvJPEG
        return False
    return True


def encode_jpeg_cuda(frame: torch.Tensor, quality: int = 85) -> bytes:
    """frame: uint8 [H, W, 3] BGR on a CUDA device. Encoded by nvJPEG on that device; only the
    JPEG bytes are copied to the host. Raises RuntimeError when nvJPEG is not available."""
    if frame.dtype != torch.uint8 or frame.ndim != 3 or frame.shape[2] != 3 or frame.device.type != "cuda":
        raise ValueError(f"frame must be a CUDA uint8 [H, W, 3] BGR tensor, got {frame.dtype} "
                         f"{tuple(frame.shape)} on {frame.device}")
    _check_quality(quality)
    if not nvjpeg_available():
        raise RuntimeError("nvJPEG needs torchvision >= 0.19 built with CUDA (pip install torchvision "
                           "matching your torch), or set jpeg_encoder=opencv")
    from torchvision.io import encode_jpeg as tv_encode_jpeg

    rgb_chw = frame.flip(-1).permute(2, 0, 1).contiguous()
    return tv_encode_jpeg(rgb_chw, quality=int(quality)).cpu().numpy().tobytes()
