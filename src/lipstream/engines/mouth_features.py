"""Mouth states from speech audio, for the `warp` engine: per video frame (open, wide, round) in [0, 1].

Each video frame f owns the audio samples [f*16000//fps, (f+1)*16000//fps) (40 ms at 25 fps):

    samples --analyse--> level (RMS dBFS), spectral centroid (Hz), hiss (share of energy above 3 kHz)
            --shape----> raw state: open from the level relative to a slowly falling recent peak
                         (auto gain; a power curve over RANGE_DB), zero below the noise gate; round
                         for a low centroid (o, u, w), wide for a high one (e, i) and for hiss (s, z);
                         open shrinks on hiss (fricatives)
            --look-ahead one frame: target[f] = max(raw[f], LEAD * raw[f+1]) (the mouth starts to move
                         just before the sound, as real speakers do)
            --smooth---> one-pole filter, quick attack, slower release; values under SNAP read as 0,
                         so silence ends in an exact zero state (the engine then returns the avatar's
                         own face unchanged)

Everything is causal except the one-frame look-ahead, and one code path does the work one frame at a
time: `MouthFeatureStream` (live) gives exactly the states `mouth_features` (a whole clip) gives for
the same audio, however it is chunked. Live, frame f comes out once the audio of frame f+1 is in."""

from __future__ import annotations

import math
from collections import deque
from functools import lru_cache
from itertools import islice

import numpy as np
import torch

from lipstream.audio.buffer import PcmBuffer
from lipstream.audio.features import check_fps, num_video_frames
from lipstream.audio.load import SAMPLE_RATE, as_float_mono

MOUTH_PARAMS = ("open", "wide", "round")  # the conditioning's columns

GATE_DB = -50.0  # frames quieter than this (RMS dBFS) are silence: the mouth closes
RANGE_DB = 20.0  # open goes 0 -> 1 over this many dB below the reference level
OPEN_CURVE = 1.5  # open = (share of RANGE_DB) ** OPEN_CURVE: quieter syllables open clearly less
REFERENCE_FLOOR_DB = -30.0  # the reference never drops below this, so quiet noise is not amplified
REFERENCE_FALL_DB_PER_S = 3.0  # the reference follows peaks at once and falls this slowly
ROUND_HZ = (700.0, 400.0)  # centroid at which round starts (0) and saturates (1)
WIDE_HZ = (1000.0, 1600.0)  # centroid at which wide starts (0) and saturates (1)
HISS_HZ = 3000.0  # energy above this is hiss (fricatives)
LOOKAHEAD_FRAMES = 1
LEAD = 0.6  # how much of the next frame's state a frame anticipates
ATTACK_MS, RELEASE_MS = 25.0, 50.0  # smoothing time constants
SNAP = 0.01  # smoothed values below this become exactly 0


def frame_start(frame: int, fps: int) -> int:
    """First sample of video frame `frame` (16 kHz)."""
    return frame * SAMPLE_RATE // fps


@lru_cache(maxsize=8)
def _spectrum_tables(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For an n-sample frame: Hann window [n], bin frequencies [n//2+1] (Hz), the hiss bins (bool)."""
    freqs = np.fft.rfftfreq(n, 1 / SAMPLE_RATE)
    return np.hanning(n), freqs, freqs >= HISS_HZ


def analyse(samples: np.ndarray) -> tuple[float, float, float]:
    """One frame's float32 [n] samples -> (level dBFS, spectral centroid Hz, hiss share in [0, 1])."""
    x = samples.astype(np.float64)
    power = float(np.mean(x * x))
    level = 10.0 * math.log10(power) if power > 0 else -math.inf
    window, freqs, hiss_bins = _spectrum_tables(x.shape[0])
    spectrum = np.abs(np.fft.rfft(x * window)) ** 2
    total = float(spectrum.sum())
    if total <= 0:
        return level, 0.0, 0.0
    return level, float(spectrum @ freqs) / total, float(spectrum[hiss_bins].sum()) / total


def _ramp(value: float, zero_at: float, one_at: float) -> float:
    """0 at `zero_at`, 1 at `one_at`, linear between, clamped (either direction)."""
    return min(1.0, max(0.0, (value - zero_at) / (one_at - zero_at)))


class MouthFeatureStream:
    """Live mouth states: push audio chunks, get float32 [k, 3] (open, wide, round) for the frames that
    became ready. One per audio stream; `features` of the warp engine is this over a whole clip."""

    def __init__(self, fps: int = 25):
        self.fps = check_fps(fps)
        frame_s = 1.0 / fps
        self._attack = 1.0 - math.exp(-1000.0 * frame_s / ATTACK_MS)
        self._release = 1.0 - math.exp(-1000.0 * frame_s / RELEASE_MS)
        self._reference_fall = REFERENCE_FALL_DB_PER_S * frame_s
        self.reset()

    def reset(self) -> None:
        """Forget everything; the next push starts frame 0 of a new utterance."""
        self._audio = PcmBuffer(np.float32)  # samples of the frames not analysed yet
        self._received = 0
        self._analysed = 0  # frames whose raw state is known
        self._emitted = 0
        self._pending: deque[np.ndarray] = deque()  # raw states of frames [_emitted, _analysed)
        self._reference = REFERENCE_FLOOR_DB
        self._state = np.zeros(len(MOUTH_PARAMS))
        self._flushed = False

    def push(self, samples: np.ndarray) -> torch.Tensor:
        """samples: float32 [n] in [-1, 1] or int16 [n], mono 16 kHz. Returns float32 [k, 3]."""
        if self._flushed:
            raise RuntimeError("push() after flush(): call reset() to start a new stream")
        samples = as_float_mono(samples)
        self._audio.append(samples)
        self._received += samples.shape[0]
        while frame_start(self._analysed + 1, self.fps) <= self._received:
            self._analyse_next()
        ready = min(self._analysed - LOOKAHEAD_FRAMES, num_video_frames(self._received, self.fps))
        return self._emit(ready)

    def flush(self) -> torch.Tensor:
        """End of speech: the remaining frames, so that floor(samples/16000*fps) came out in all; the
        last frame's look-ahead (and a frame's samples past the end) read as silence."""
        self._flushed = True
        total = num_video_frames(self._received, self.fps)
        while self._analysed < total:
            self._analyse_next()
        return self._emit(total)

    def _analyse_next(self) -> None:
        """Raw state of frame `_analysed` (samples past the audio's end read as zeros)."""
        start, end = frame_start(self._analysed, self.fps), frame_start(self._analysed + 1, self.fps)
        self._pending.append(self._shape(*analyse(self._audio.read(start, end))))
        self._analysed += 1
        self._audio.release(end)

    def _shape(self, level: float, centroid: float, hiss: float) -> np.ndarray:
        """Raw (open, wide, round) of one frame; updates the reference level."""
        self._reference = max(level, self._reference - self._reference_fall, REFERENCE_FLOOR_DB)
        if level < GATE_DB:
            return np.zeros(len(MOUTH_PARAMS))
        loud = _ramp(level, self._reference - RANGE_DB, self._reference)
        voiced = min(1.0, 2.0 * loud)
        loud **= OPEN_CURVE
        rounded = _ramp(centroid, *ROUND_HZ) * (1.0 - hiss)
        wide = max(_ramp(centroid, *WIDE_HZ) * (1.0 - hiss), hiss)
        return np.array([loud * (1.0 - 0.7 * hiss) * (1.0 - 0.3 * rounded), voiced * wide, voiced * rounded])

    def _emit(self, count: int) -> torch.Tensor:
        """Smoothed states of frames [_emitted, count) as float32 [k, 3]."""
        out = []
        silence = np.zeros(len(MOUTH_PARAMS))
        while self._emitted < count:
            ahead = list(islice(self._pending, 1, 1 + LOOKAHEAD_FRAMES))
            ahead += [silence] * (LOOKAHEAD_FRAMES - len(ahead))
            target = np.maximum.reduce([self._pending.popleft()] + [LEAD * a for a in ahead])
            rate = np.where(target > self._state, self._attack, self._release)
            state = self._state + rate * (target - self._state)
            self._state = np.where(state < SNAP, 0.0, state)
            out.append(self._state.astype(np.float32))
            self._emitted += 1
        if not out:
            return torch.zeros(0, len(MOUTH_PARAMS))
        return torch.from_numpy(np.stack(out))


def mouth_features(audio: np.ndarray, fps: int = 25) -> torch.Tensor:
    """A whole clip: float32 [S] 16 kHz mono -> float32 [floor(S/16000*fps), 3] (open, wide, round)."""
    audio = np.asarray(audio)
    if audio.ndim != 1:
        raise ValueError(f"audio must be mono [S], got shape {audio.shape}")
    stream = MouthFeatureStream(fps)
    return torch.cat([stream.push(audio), stream.flush()])
