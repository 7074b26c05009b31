"""A session's frames as the transports send them, all in one place: scaled to the streamed size
(`output_size`), then JPEG-encoded (`frame_jpeg`, the WebSocket) or made an av.VideoFrame
(`video_frame`, WebRTC), on the server's `EncodingPool`.

Two JPEG encoders: OpenCV's libjpeg on the CPU, and nvJPEG on the GPU (torchvision.io.encode_jpeg on
a CUDA tensor), which keeps a CUDA session's frames on the GPU: only the JPEG bytes cross the bus.
Frames are uint8 [H, W, 3] BGR, NumPy or a tensor on the compositor's device."""

from __future__ import annotations

import asyncio
import fractions
import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import av
import cv2
import numpy as np
import torch

from lipstream.metrics import STAGE_SECONDS
from lipstream.stream.capacity import Capacity, timed

T = TypeVar("T")
VIDEO_TIME_BASE = fractions.Fraction(1, 90000)  # RTP's video clock


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


def output_size(frame_size: tuple[int, int], height: int) -> tuple[int, int]:
    """(height, width) of the streamed frames for frames of `frame_size` (height, width): scaled to
    `height` (0: unscaled), width keeping the aspect ratio; both even, as video encoders need."""
    h, w = frame_size
    if height <= 0 or height == h:
        return h - h % 2, w - w % 2
    return height - height % 2, max(2, round(w * height / h / 2) * 2)


def output_tensor(image: torch.Tensor, height: int) -> torch.Tensor:
    """`output_image` for a uint8 [H, W, 3] tensor that stays on its device (area-averaged when
    shrinking, bilinear when enlarging, as OpenCV; values may differ from it by a level or two)."""
    h, w = image.shape[:2]
    th, tw = output_size((h, w), height)
    if (th, tw) == (h, w):
        return image
    if height <= 0 or height == h:
        return image[:th, :tw]
    chw = image.permute(2, 0, 1)[None].float()
    scaled = torch.nn.functional.interpolate(chw, size=(th, tw), mode="area" if th < h else "bilinear")
    return scaled[0].round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0)


def output_image(image: np.ndarray | torch.Tensor, height: int) -> np.ndarray:
    """A frame, uint8 [H, W, 3] BGR (NumPy, or a tensor on any device), as a NumPy array at
    `output_size` (an odd last row or column is dropped when not scaling)."""
    if isinstance(image, torch.Tensor):
        image = image.cpu().numpy()
    h, w = image.shape[:2]
    th, tw = output_size((h, w), height)
    if (th, tw) == (h, w):
        return image
    if height <= 0 or height == h:
        return np.ascontiguousarray(image[:th, :tw])
    return cv2.resize(image, (tw, th), interpolation=cv2.INTER_AREA if th < h else cv2.INTER_LINEAR)


def frame_jpeg(image: np.ndarray | torch.Tensor, height: int, quality: int, encoder: str = "auto") -> bytes:
    """A session frame (NumPy, or a tensor on its device) scaled to `height` and JPEG-encoded.
    encoder: "opencv", "nvjpeg", or "auto" (nvJPEG for CUDA frames when available): with nvJPEG the
    frame is scaled and encoded on its GPU and only the JPEG bytes come to the host."""
    on_gpu = isinstance(image, torch.Tensor) and image.device.type == "cuda"
    if on_gpu and (encoder == "nvjpeg" or (encoder == "auto" and nvjpeg_available())):
        return encode_jpeg_cuda(output_tensor(image, height), quality)
    return encode_jpeg(output_image(image, height), quality)


def video_frame(image: np.ndarray | torch.Tensor, height: int, pts: float) -> av.VideoFrame:
    """A session frame scaled to `height` as an av.VideoFrame (bgr24) stamped `pts` seconds on the
    90 kHz clock, for a WebRTC video track."""
    video = av.VideoFrame.from_ndarray(output_image(image, height), format="bgr24")
    video.pts, video.time_base = round(pts * 90000), VIDEO_TIME_BASE
    return video


def default_workers() -> int:
    """One thread per CPU core, at least 2 and at most 8 (encoding releases the GIL; more threads than
    cores only queue in the OS instead)."""
    return max(2, min(8, os.cpu_count() or 2))


class EncodingPool:
    """The thread pool of per-frame work (JPEG encoding, WebRTC frame conversion). It is the server's
    own (one per app, its threads made on first use, sized by the CPU count), so a burst of frames
    never queues behind, nor holds up, what else runs on asyncio's default executor (avatar loads,
    uploads, audio decoding).

    `await pool.run(fn, *args)` runs fn(*args) on the pool's threads; `await pool.encode(pixels, fn,
    *args)` too, timed as the "encode" stage of a frame of `pixels` pixels (reported to `capacity`).
    `shutdown()` (at app shutdown) stops them; running it afterwards raises RuntimeError."""

    def __init__(self, workers: int | None = None, capacity: Capacity | None = None):
        self.workers = workers or default_workers()
        self.capacity = capacity
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._shut = False

    def executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._shut:
                raise RuntimeError("the encoding pool is shut down (the server is stopping)")
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="lipstream-encode")
            return self._executor

    async def run(self, fn: Callable[..., T], /, *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor(), functools.partial(fn, *args))

    async def encode(self, pixels: int, fn: Callable[..., T], /, *args: Any) -> T:
        return await self.run(self._timed, pixels, fn, *args)

    def _timed(self, pixels: int, fn: Callable[..., T], *args: Any) -> T:
        result, timing = timed(fn, *args)
        STAGE_SECONDS.labels("encode").observe(timing.wall)
        if self.capacity is not None:
            self.capacity.observe_encode(pixels, timing)
        return result

    def shutdown(self, wait: bool = False) -> None:
        """Stop the threads: work not started is cancelled; with `wait`, what runs is waited for."""
        with self._lock:
            executor, self._executor, self._shut = self._executor, None, True
        if executor is not None:
            executor.shutdown(wait=wait, cancel_futures=True)
