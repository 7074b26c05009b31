"""Where rendered video goes: one interface for an MP4 file and for a folder of PNG frames + WAV.

    with open_output("out.mp4", fps=25, frame_size=(720, 1280), audio=samples) as out:
        out.write(frames)            # uint8 [B, H, W, 3] BGR, any number of times
    # on leaving the block: finished and renamed to out.mp4; on an exception: nothing is left

Everything is written under a hidden temporary name next to the output and renamed at the end, so a
failed or interrupted render never leaves a truncated file (or folder) under the output's name."""

from __future__ import annotations

import os
import queue
import threading
from fractions import Fraction
from pathlib import Path
from typing import Self

import numpy as np

from lipstream.audio.load import SAMPLE_RATE
from lipstream.errors import OutputPathError
from lipstream.media.base import Frames, VideoOutput
from lipstream.media.frames_folder import FolderOutput
from lipstream.media.mp4 import Mp4Output

MP4_SUFFIX = ".mp4"


def open_output(path: str | os.PathLike, fps: float | Fraction, frame_size: tuple[int, int],
                audio: np.ndarray | None = None, sample_rate: int = SAMPLE_RATE) -> VideoOutput:
    """The writer `output_kind(path)` chooses, writing to a temporary name next to `path`. Raises
    OutputPathError when `path` cannot be an output (its folder must exist: no folder is made)."""
    return output_kind(path)(Path(path), fps, frame_size, audio, sample_rate)


def output_kind(path: str | os.PathLike) -> type[VideoOutput]:
    """Mp4Output when `path` ends in .mp4; FolderOutput (PNG frames + audio.wav) when it is a folder:
    an existing one, a name without a suffix, or a name ending in "/". Checks the destination, so that
    a render can fail before any frame is made: raises OutputPathError with the fix (also when the
    folder it goes into does not exist: outputs never make folders on their own)."""
    text = os.fspath(path)
    target = Path(text)
    parent = target.absolute().parent
    if not parent.is_dir():
        what = "is not a folder" if parent.exists() else "does not exist"
        raise OutputPathError(f"cannot write {text}: the folder {target.parent} {what}; create it first, "
                              "or give an output in an existing folder")
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
