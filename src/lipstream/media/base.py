"""What every rendered-video output is: frames in, one finished file or folder out, written under a
temporary name next to the output and renamed at the end (see `media.output` for choosing one)."""

from __future__ import annotations

import os
import shutil
import uuid
from abc import ABC, abstractmethod
from fractions import Fraction
from pathlib import Path
from typing import Self

import numpy as np
import torch

from lipstream.audio.load import SAMPLE_RATE

Frames = np.ndarray | torch.Tensor


def as_audio(audio: np.ndarray | None) -> np.ndarray | None:
    """Check an output's audio: float32 in [-1, 1] or int16, [N] (mono) or [channels, N]. Returns it
    contiguous, always [channels, N]."""
    if audio is None:
        return None
    if audio.ndim not in (1, 2) or audio.dtype not in (np.float32, np.int16) or audio.shape[0] == 0:
        raise ValueError(f"audio must be float32 or int16 [N] or [channels, N], got {audio.dtype} {audio.shape}")
    return np.ascontiguousarray(audio if audio.ndim == 2 else audio[None])


def as_fps(fps: float | Fraction) -> Fraction:
    """A positive frame rate as an exact fraction (29.97 -> 2997/100)."""
    rate = Fraction(fps).limit_denominator(1001)
    if rate <= 0:
        raise ValueError(f"fps must be positive, got {fps!r}")
    return rate


class VideoOutput(ABC):
    """Frames in, one finished file or folder out (see the module doc).

    path: the final output. fps: frames per second. frame_size: (height, width) of every frame.
    audio: float32 in [-1, 1] or int16, [N] (mono) or [channels, N], at `sample_rate`, or None; written
    whole, as it is (its rate and channels). Held as [channels, N] (`as_audio`).
    `frames_written` counts the frames so far."""

    def __init__(self, path: str | os.PathLike, fps: float | Fraction, frame_size: tuple[int, int],
                 audio: np.ndarray | None = None, sample_rate: int = SAMPLE_RATE):
        self.path = Path(path)
        self.fps = as_fps(fps)
        self.frame_size = (int(frame_size[0]), int(frame_size[1]))
        if min(self.frame_size) <= 0:
            raise ValueError(f"frame_size must be (height, width) > 0, got {frame_size}")
        self.audio = as_audio(audio)
        self.sample_rate = int(sample_rate)
        self.frames_written = 0
        self.temp_path = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}.partial")
        self._closed = False

    def write(self, frames: Frames) -> None:
        """frames: uint8 [B, H, W, 3] BGR (or [H, W, 3]), a NumPy array or a tensor on any device."""
        if isinstance(frames, torch.Tensor):
            frames = frames.cpu().numpy()
        if frames.ndim == 3:
            frames = frames[None]
        h, w = self.frame_size
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (h, w, 3):
            raise ValueError(f"frames must be uint8 [B, {h}, {w}, 3] BGR, got {frames.dtype} {frames.shape}")
        self._write(frames)
        self.frames_written += frames.shape[0]

    def close(self) -> Path:
        """Finish the output and move it to `path` (replacing an older one). Returns `path`."""
        if self._closed:
            return self.path
        if self.frames_written == 0:
            self.abort()
            raise ValueError(f"no frames were written to {self.path}")
        try:
            self._finish()
            self._replace()
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return self.path

    def abort(self) -> None:
        """Discard everything written; nothing is left under `path` or the temporary name."""
        if self._closed:
            return
        self._closed = True
        try:
            self._release()
        finally:
            if self.temp_path.is_dir():
                shutil.rmtree(self.temp_path, ignore_errors=True)
            else:
                self.temp_path.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _replace(self) -> None:
        os.replace(self.temp_path, self.path)

    @abstractmethod
    def _write(self, frames: np.ndarray) -> None:
        """Write checked uint8 [B, H, W, 3] BGR host frames to `temp_path`."""

    @abstractmethod
    def _finish(self) -> None:
        """Complete `temp_path` (audio, trailers); it is then renamed to `path`."""

    @abstractmethod
    def _release(self) -> None:
        """Close open handles without finishing (before the temporary output is deleted)."""
