"""Which video frames show speech: the energy gate of live sessions and offline renders alike.

Frame j owns the samples [floor(j*16000/fps), floor((j+1)*16000/fps)). It is *voiced* when those are
at least `silence_dbfs` loud (RMS) or one of the `hangover` frames before it was; only voiced frames
get a generated face, the others show the avatar's own frame, pixel for pixel (its closed mouth)."""

from __future__ import annotations

import math

import numpy as np

from lipstream.audio.features import num_video_frames
from lipstream.audio.load import SAMPLE_RATE, as_float_mono, rms_dbfs

DEFAULT_SILENCE_DBFS = -45.0


def hangover_frames(hangover_ms: float, fps: int) -> int:
    """The whole frames that cover `hangover_ms` at `fps` (e.g. an engine's `silence_hangover_ms`)."""
    return math.ceil(hangover_ms * fps / 1000 - 1e-9)


class VoiceGate:
    """The gate over consecutive frames of one stream: call it with each frame's samples in turn."""

    def __init__(self, hangover: int, silence_dbfs: float = DEFAULT_SILENCE_DBFS):
        self.silence_dbfs = silence_dbfs
        self.hangover = hangover
        self._frame = 0
        self._last_loud = -math.inf

    def __call__(self, samples: np.ndarray) -> bool:
        """samples: the next frame's audio, int16 or float32 [n]. Returns whether the frame is voiced."""
        if rms_dbfs(as_float_mono(samples)) >= self.silence_dbfs:
            self._last_loud = self._frame
        self._frame += 1
        return self._frame - 1 - self._last_loud <= self.hangover


def voiced_frames(audio: np.ndarray, fps: int, hangover: int, silence_dbfs: float = DEFAULT_SILENCE_DBFS) -> np.ndarray:
    """A whole clip's gate: audio float32 or int16 [N] 16 kHz -> bool [floor(N/16000*fps)]."""
    gate = VoiceGate(hangover, silence_dbfs)
    return np.array([gate(audio[j * SAMPLE_RATE // fps:(j + 1) * SAMPLE_RATE // fps])
                     for j in range(num_video_frames(audio.shape[0], fps))], bool)
