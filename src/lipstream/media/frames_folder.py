"""A folder output for editing pipelines: lossless PNG frames 00000000.png, 00000001.png, ... and
audio.wav with the exact input samples, rate and channels (float32 as 32-bit float WAV, int16 as
16-bit PCM)."""

from __future__ import annotations

import os
import re
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import soundfile

from lipstream.errors import OutputPathError
from lipstream.media.base import VideoOutput

FRAME_NAME = "{:08d}.png"
AUDIO_NAME = "audio.wav"
_OWN_FILE = re.compile(r"\d{8}\.png|audio\.wav")
# zlib level 1: PNG stays lossless; higher levels make files ~10% smaller and writing several times slower.
_PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 1]


class FolderOutput(VideoOutput):
    """PNG frames + audio.wav in the folder `path`. An existing folder is replaced only when it is empty
    or holds nothing but a previous render's files (frames and audio.wav).

    PNG compression is the slow part (~50-150 ms a 720p frame): a batch's frames are compressed on
    up to 4 threads (OpenCV releases the GIL)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.temp_path.mkdir()
        self._pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="png")

    @staticmethod
    def check_replaceable(folder: Path) -> None:
        """Raise OutputPathError when `folder` exists and holds anything a render did not write."""
        if not folder.is_dir():
            return
        foreign = sorted(p.name for p in folder.iterdir() if not _OWN_FILE.fullmatch(p.name))
        if foreign:
            raise OutputPathError(
                f"output folder {folder} holds other files ({', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}); give a new or empty folder")

    def _write(self, frames: np.ndarray) -> None:
        paths = [self.temp_path / FRAME_NAME.format(k) for k in range(self.frames_written,
                                                                       self.frames_written + len(frames))]
        for path, ok in zip(paths, self._pool.map(_write_png, paths, frames)):
            if not ok:
                raise OSError(f"cannot write {path}")

    def _finish(self) -> None:
        self._pool.shutdown()
        if self.audio is not None:
            subtype = "FLOAT" if self.audio.dtype == np.float32 else "PCM_16"
            soundfile.write(self.temp_path / AUDIO_NAME, self.audio.T, self.sample_rate, subtype=subtype)

    def _release(self) -> None:
        self._pool.shutdown()

    def _replace(self) -> None:
        if not self.path.exists():
            os.replace(self.temp_path, self.path)
            return
        self.check_replaceable(self.path)
        old = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}.old")
        os.replace(self.path, old)
        try:
            os.replace(self.temp_path, self.path)
        except BaseException:
            os.replace(old, self.path)
            raise
        shutil.rmtree(old, ignore_errors=True)


def _write_png(path: Path, frame: np.ndarray) -> bool:
    return cv2.imwrite(os.fspath(path), frame, _PNG_PARAMS)
