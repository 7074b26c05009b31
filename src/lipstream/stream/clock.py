"""One clock for a session's video and audio, so that the two can never drift apart.

Video frame k is due at `t0 + k/fps` (wall clock) and has the media timestamp `pts = k/fps`. The audio
travels with the video: frame k owns the 16 kHz samples [floor(k*16000/fps), floor((k+1)*16000/fps)),
so after K frames exactly floor(K*16000/fps) samples have been sent, and every frame's pts equals
the position of its first sample within 1/16000 s, however long the session runs. The arithmetic is
on integers; nothing accumulates."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

from lipstream.audio.load import SAMPLE_RATE


class MediaClock:
    """fps: frames per second (a positive int). now: the wall clock in seconds (monotonic; inject a
    fake one to simulate hours in a test). The clock starts (frame 0 is due) at its creation."""

    def __init__(self, fps: int, now: Callable[[], float] = time.monotonic):
        if not isinstance(fps, int) or fps <= 0:
            raise ValueError(f"fps must be a positive int, got {fps!r}")
        self.fps = fps
        self.now = now
        self.t0 = now()

    def pts(self, k: int) -> float:
        """Media timestamp of frame k, seconds since the session started: k/fps."""
        return k / self.fps

    def due(self, k: int) -> float:
        """Wall-clock time (in `now`'s seconds) at which frame k is shown."""
        return self.t0 + k / self.fps

    def frame_at(self, t: float) -> int:
        """The first frame due at or after wall-clock time `t` (>= 0)."""
        return max(0, math.ceil((t - self.t0) * self.fps - 1e-9))

    def audio_start(self, k: int) -> int:
        """First 16 kHz sample owned by frame k: floor(k*16000/fps)."""
        return k * SAMPLE_RATE // self.fps

    def audio_samples(self, k: int) -> int:
        """Number of 16 kHz samples frame k carries (16000/fps, give or take one)."""
        return self.audio_start(k + 1) - self.audio_start(k)

    def rebase(self, k: int) -> None:
        """Make frame k due now: a consumer that fell behind resumes in real time instead of
        catching up in a burst. Media timestamps (and so audio/video sync) are unaffected."""
        self.t0 = self.now() - k / self.fps

    async def wait(self, k: int) -> None:
        """Sleep until frame k is due (returns at once if it is due already)."""
        delay = self.due(k) - self.now()
        if delay > 0:
            await asyncio.sleep(delay)
