"""A session's frames as the transports send them: JPEG (the WebSocket) and av.VideoFrame (WebRTC),
made on the server's `EncodingPool`, with as little work per frame and per viewer as the frame allows.

Frames come from the compositor at the streamed size already (no scaling here) and are mostly the
avatar's own images: an idle frame is one of the cycle's images, a speaking frame one of them with a
small face patch. So what depends only on the cycle image is made once per compositor and kept
(`IdleImages`: each image's JPEG at a quality, its I420 planes), and per frame only the patch is
encoded or converted: a patch JPEG for a WebSocket viewer that holds the images (patch frames), a
whole-frame JPEG only for a speaking frame of a viewer that takes whole frames, and for WebRTC a copy
of the cached I420 image with the patch's planes written in (BGR -> I420 of the patch alone, exactly
the same values as converting the whole frame: both are computed per 2x2 block, and patches are
aligned to 16 pixels)."""

from __future__ import annotations

import asyncio
import fractions
import functools
import os
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import cv2
import numpy as np

from lipstream.metrics import STAGE_SECONDS
from lipstream.stream.capacity import Capacity, timed

if TYPE_CHECKING:
    import av

    from lipstream.stream.compositor import Compositor, FacePatch
    from lipstream.stream.session import OutputFrame

T = TypeVar("T")
VIDEO_TIME_BASE = fractions.Fraction(1, 90000)  # RTP's video clock


def _check_quality(quality: int) -> None:
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in [1, 100], got {quality}")


def encode_jpeg(frame: np.ndarray, quality: int = 85) -> bytes:
    """frame: uint8 [H, W, 3] BGR (NumPy). quality: 1-100 (OpenCV's, libjpeg scale). Returns JPEG bytes
    (baseline, 4:2:0)."""
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"frame must be uint8 [H, W, 3] BGR, got {frame.dtype} {frame.shape}")
    _check_quality(quality)
    ok, data = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {frame.shape} frame as JPEG")
    return data.tobytes()


def to_i420(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] BGR (H, W even) -> I420 planes uint8 [H * 3 / 2, W]: Y, then U and V (each
    [H/2, W/2], packed row after row), as av's yuv420p frames take them."""
    return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_BGR2YUV_I420)


class IdleImages:
    """What is made once per cycle image of a compositor (by its `key`): the JPEG at a quality and the
    I420 planes. Thread-safe; an image asked for by two threads at once may be made twice."""

    def __init__(self, compositor: Compositor):
        self.compositor = compositor
        self._jpegs: dict[tuple[int, int], bytes] = {}
        self._i420: dict[int, np.ndarray] = {}

    def cached_jpeg(self, key: int, quality: int) -> bytes | None:
        """The image's JPEG if it was made already (never makes it: safe on the event loop)."""
        return self._jpegs.get((key, quality))

    def jpeg(self, key: int, quality: int) -> bytes:
        data = self._jpegs.get((key, quality))
        if data is None:
            data = self._jpegs[key, quality] = encode_jpeg(self.compositor.frames[key], quality)
        return data

    def i420(self, key: int) -> np.ndarray:
        planes = self._i420.get(key)
        if planes is None:
            planes = self._i420[key] = to_i420(self.compositor.frames[key])
            planes.flags.writeable = False
        return planes


_idle: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_idle_lock = threading.Lock()


def idle_images(compositor: Compositor) -> IdleImages:
    """The compositor's `IdleImages` (made on first use, dropped with the compositor)."""
    with _idle_lock:
        images = _idle.get(compositor)
        if images is None:
            images = _idle[compositor] = IdleImages(compositor)
        return images


def frame_jpeg(frame: OutputFrame, quality: int) -> bytes:
    """The whole frame as a JPEG: the cycle image's, made once, for a frame without a patch."""
    if frame.patch is None:
        return idle_images(frame.compositor).jpeg(frame.compositor.key(frame.cycle), quality)
    return encode_jpeg(frame.image, quality)


def patch_jpeg(patch: FacePatch, quality: int) -> bytes:
    """A frame's face patch as a JPEG (its blocks line up with a JPEG of the whole frame)."""
    return encode_jpeg(np.ascontiguousarray(patch.pixels), quality)


def video_frame(frame: OutputFrame) -> av.VideoFrame:
    """The frame as an av.VideoFrame (yuv420p) stamped `frame.pts` seconds on the 90 kHz clock, for a
    WebRTC video track: the cycle image's cached I420 planes copied into it once, the patch's own
    planes written over them."""
    import av  # (only WebRTC needs PyAV here)

    planes = idle_images(frame.compositor).i420(frame.compositor.key(frame.cycle))
    video = av.VideoFrame.from_ndarray(planes, format="yuv420p")
    if frame.patch is not None:
        _write_patch(video, frame.patch)
    video.pts, video.time_base = round(frame.pts * 90000), VIDEO_TIME_BASE
    return video


def _write_patch(video: av.VideoFrame, patch: FacePatch) -> None:
    """Write the I420 planes of `patch` (x, y and sizes even) into the frame's planes."""
    h, w = patch.pixels.shape[:2]
    i420 = to_i420(patch.pixels)
    y_plane, u_plane, v_plane = (np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)
                                 for plane in video.planes)
    y_plane[patch.y:patch.y + h, patch.x:patch.x + w] = i420[:h]
    chroma = i420[h:].reshape(2, h // 2, w // 2)
    cy, cx = patch.y // 2, patch.x // 2
    u_plane[cy:cy + h // 2, cx:cx + w // 2] = chroma[0]
    v_plane[cy:cy + h // 2, cx:cx + w // 2] = chroma[1]


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
