"""Where rendered video goes: one interface for an MP4 file and for a folder of PNG frames + WAV.

    with open_output("out.mp4", fps=25, frame_size=(720, 1280), audio=samples) as out:
        out.write(frames)            # uint8 [B, H, W, 3] BGR, any number of times
    # on leaving the block: finished and renamed to out.mp4; on an exception: nothing is left

Everything is written under a hidden temporary name next to the output and renamed at the end, so a
failed or interrupted render never leaves a truncated file (or folder) under the output's name."""

from __future__ import annotations

import os
import queue
import shutil
import threading
import uuid
from abc import ABC, abstractmethod
from fractions import Fraction
from pathlib import Path
from typing import Self

import numpy as np
import torch

from lipstream.audio.load import SAMPLE_RATE
from lipstream.errors import OutputPathError

MP4_SUFFIX = ".mp4"

Frames = np.ndarray | torch.Tensor


def as_audio(audio: np.ndarray | None) -> np.ndarray | None:
    """Check an output's audio: float32 [N] in [-1, 1] or int16 [N], mono. Returns it contiguous."""
    if audio is None:
        return None
    if audio.ndim != 1 or audio.dtype not in (np.float32, np.int16):
        raise ValueError(f"audio must be float32 or int16 [N] mono, got {audio.dtype} {audio.shape}")
    return np.ascontiguousarray(audio)


def as_fps(fps: float | Fraction) -> Fraction:
    """A positive frame rate as an exact fraction (29.97 -> 2997/100)."""
    rate = Fraction(fps).limit_denominator(1001)
    if rate <= 0:
        raise ValueError(f"fps must be positive, got {fps!r}")
    return rate


class VideoOutput(ABC):
    """Frames in, one finished file or folder out (see the module doc).

    path: the final output. fps: frames per second. frame_size: (height, width) of every frame.
    audio: float32 [N] in [-1, 1] or int16 [N] mono at `sample_rate`, or None; written whole.
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


def open_output(path: str | os.PathLike, fps: float | Fraction, frame_size: tuple[int, int],
                audio: np.ndarray | None = None, sample_rate: int = SAMPLE_RATE) -> VideoOutput:
    """The writer `output_kind(path)` chooses, writing to a temporary name next to `path`
    (missing parent folders are made). Raises OutputPathError when `path` cannot be an output."""
    kind = output_kind(path)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    return kind(target, fps, frame_size, audio, sample_rate)


def output_kind(path: str | os.PathLike) -> type[VideoOutput]:
    """Mp4Output when `path` ends in .mp4; FolderOutput (PNG frames + audio.wav) when it is a folder:
    an existing one, a name without a suffix, or a name ending in "/". Checks the destination, so that
    a render can fail before any frame is made: raises OutputPathError with the fix."""
    from lipstream.media.frames_folder import FolderOutput
    from lipstream.media.mp4 import Mp4Output

    text = os.fspath(path)
    target = Path(text)
    if target.suffix.lower() == MP4_SUFFIX and not target.is_dir():
        return Mp4Output
    if not (target.is_dir() or not target.suffix or text.endswith(("/", os.sep))):
        raise OutputPathError(f"cannot write {text}: give a path ending in {MP4_SUFFIX} for a video, "
                              "or a folder (e.g. ending in /) for PNG frames + audio.wav")
    if target.exists() and not target.is_dir():
        raise OutputPathError(f"{text} is a file, not a folder; give a new folder for PNG frames + audio.wav")
    FolderOutput.check_replaceable(target)
    return FolderOutput


class OutputThread:
    """Writes to a `VideoOutput` on a background thread, so that encoding overlaps the engine's work.

    `write` queues frames (blocking while `depth` batches wait) and re-raises the first error of the
    writer thread; `join` (or leaving the `with` block) waits for the queue to drain. Use it inside the
    output's `with` block:

        with open_output(...) as out, OutputThread(out) as writer:
            writer.write(frames)"""

    _DONE = object()

    def __init__(self, output: VideoOutput, depth: int = 2):
        self.output = output
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="lipstream-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (frames := self._queue.get()) is not self._DONE:
            if self._error is None:  # after an error, keep draining so that `write` never blocks forever
                try:
                    self.output.write(frames)
                except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                    self._error = exc

    def write(self, frames: Frames) -> None:
        """Queue frames (see `VideoOutput.write`). A tensor is copied to the host on the writer thread."""
        self._raise_error()
        self._queue.put(frames)

    def join(self) -> None:
        """Wait until every queued frame is written; re-raise the writer's error, if any."""
        if self._thread.is_alive():
            self._queue.put(self._DONE)
            self._thread.join()
        self._raise_error()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.join()
        else:  # the caller's error wins; still stop the thread before the output is discarded
            self._error = self._error or exc
            self._queue.put(self._DONE)
            self._thread.join()
