"""Mouth states from speech audio, for the `warp` engine: per video frame (open, wide, round).

    open  in [-1, 1]: > 0 opens the mouth (jaw and lips) beyond the avatar's own; < 0 closes the
                      avatar's lips and presses them together (m, b, p, and short pauses in speech)
    wide  in [0, 1]:  spread lips (i, e; and s, z, whose lips are spread and teeth close)
    round in [0, 1]:  rounded lips (o, u, w)

Each video frame f owns the audio samples [f*16000//fps, (f+1)*16000//fps) (40 ms at 25 fps). Its
power spectrum (Hann window) gives a handful of cheap numbers (`Analysis`): the level, the spectral
centroids of the first-formant band (250-1000 Hz: high for open vowels) and of the second-formant
band (1000-3500 Hz: high for front, spread vowels), the share of energy in that upper band (low for
back, rounded vowels), the share below 400 Hz (a nasal murmur or the voice bar of a closure), and
the share above 3 kHz (hiss: fricatives). From them (`MouthFeatureStream._shape`):

    open  = loudness (level against a slowly falling recent peak, a power curve over RANGE_DB; 0 under
            the noise gate) x openness from the first-formant centroid, less for hiss and rounding;
            a frame DIP_DB below the recent peak (a stop's closure, a pause) or a quieter low murmur
            (a nasal) turns it towards -1: the lips close, for at most PAUSE_HOLD_MS after speech
    wide  = second-formant centroid high, or hiss
    round = little upper-band energy, second-formant centroid low, first formant not open

then a one-frame look-ahead (the mouth starts to open just before the sound, as real speakers do)
and one-pole smoothing per parameter (quick to open, quick to close, slower for the lip shape), and
values under SNAP read as exactly 0. From SETTLE_MS after the last audible frame on, the state is
exactly zero (the engine then returns the avatar's own face unchanged) until the frame before the
next sound.

Limits, honestly: these are spectral cues of a 40 ms frame, not phonemes. m and n (and a quiet u)
look alike (all read as nearly closed, NASAL_CLOSING), and so may a voiced fricative (z, th, v) with
little hiss; a stop reads as closed only when its closure is near-silent (DIP_DB);
rounding and spreading are measured on the voiced sound, so lips that round or spread ahead of the
vowel (co-articulation) are not seen; a very high voice or heavy background noise blurs the bands.

Everything is causal except the one-frame look-ahead, and one code path does the work one frame at a
time: `MouthFeatureStream` (live) gives exactly the states `mouth_features` (a whole clip) gives for
the same audio, however it is chunked. Live, frame f comes out once the audio of frame f+1 is in."""

from __future__ import annotations

import math
from collections import deque
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch

from lipstream.audio.buffer import PcmBuffer
from lipstream.audio.features import check_fps, num_video_frames
from lipstream.audio.load import SAMPLE_RATE, as_float_mono

MOUTH_PARAMS = ("open", "wide", "round")  # the conditioning's columns

GATE_DB = -50.0  # frames quieter than this (RMS dBFS) are silence: the mouth does not open
RANGE_DB = 20.0  # open goes 0 -> 1 over this many dB below the reference level
OPEN_CURVE = 1.5  # open = (share of RANGE_DB) ** OPEN_CURVE: quieter syllables open clearly less
REFERENCE_FLOOR_DB = -30.0  # the reference never drops below this, so quiet noise is not amplified
REFERENCE_FALL_DB_PER_S = 3.0  # the reference follows peaks at once and falls this slowly
# spectral bands (Hz)
F1_BAND, F2_BAND = (250.0, 1000.0), (1000.0, 3500.0)
LOW_HZ, HISS_HZ = 400.0, 3000.0
# cue ramps: (value where the cue is 0, value where it is 1)
OPENNESS_HZ = (300.0, 650.0)  # first-formant centroid: close vowels (i, u) -> open ones (a)
OPENNESS_MIN = 0.45  # a close vowel still opens this much of a loud open one
WIDE_HZ = (1600.0, 2200.0)  # second-formant centroid: spread lips
UPPER_SHARE_FOR_F2 = (0.04, 0.12)  # the second-formant centroid counts once the band holds this much
ROUND_UPPER_SHARE = (0.35, 0.15)  # upper-band share: rounded vowels have little
ROUND_F2_HZ = (2100.0, 1700.0)  # second-formant centroid: rounded vowels are back
ROUND_F1_HZ = (700.0, 600.0)  # first-formant centroid: an open a is not rounded
NASAL_LOW_SHARE = (0.8, 0.9)  # energy below LOW_HZ: a nasal murmur or a closure's voice bar
NASAL_CLOSING = 0.7  # ... closes the lips this much: m is closed, but n, ng (and a voiced z) look the same
NASAL_BELOW_DB = (4.0, 9.0)  # ... that is this much quieter than the reference
DIP_DB = (16.0, 26.0)  # a frame this far below the reference, after speech, closes the lips
SPEECH_LOUDNESS = 0.3  # a frame at least this loud (0..1) is speech
PAUSE_HOLD_MS = 400.0  # the lips stay closed this long after the last speech frame, then relax
SETTLE_MS = 640.0  # from this long after the last audible frame on, the state is exactly zero
LEAD = 0.6  # how much of the next frame's opening and shape a frame anticipates
LOOKAHEAD_FRAMES = 1
OPEN_MS, CLOSE_MS, RELAX_MS, SHAPE_MS = 25.0, 35.0, 70.0, 60.0  # smoothing time constants: opening,
# closing, closed lips relaxing back to the avatar's own mouth, lip shape
SNAP = 0.01  # smoothed values within this of 0 become exactly 0


def frame_start(frame: int, fps: int) -> int:
    """First sample of video frame `frame` (16 kHz)."""
    return frame * SAMPLE_RATE // fps


class Analysis(NamedTuple):
    """One frame's cues (see the module doc). level: RMS dBFS; f1_hz, f2_hz: the band centroids;
    upper_share: energy in F2_BAND over F1_BAND..F2_BAND; low_share: below LOW_HZ over all up to 4 kHz;
    hiss: above HISS_HZ over all."""

    level: float
    f1_hz: float
    f2_hz: float
    upper_share: float
    low_share: float
    hiss: float


@lru_cache(maxsize=8)
def _spectrum_tables(n: int) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """For an n-sample frame: Hann window [n], bin frequencies [n//2+1] (Hz), band masks."""
    freqs = np.fft.rfftfreq(n, 1 / SAMPLE_RATE)
    bands = {"f1": (freqs >= F1_BAND[0]) & (freqs < F1_BAND[1]),
             "f2": (freqs >= F2_BAND[0]) & (freqs < F2_BAND[1]),
             "voice": (freqs >= 60.0) & (freqs < 4000.0), "low": (freqs >= 60.0) & (freqs < LOW_HZ),
             "hiss": freqs >= HISS_HZ}
    return np.hanning(n), freqs, bands


def analyse(samples: np.ndarray) -> Analysis:
    """One frame's float32 [n] samples -> its `Analysis`."""
    x = samples.astype(np.float64)
    power = float(np.mean(x * x))
    level = 10.0 * math.log10(power) if power > 0 else -math.inf
    window, freqs, bands = _spectrum_tables(x.shape[0])
    spectrum = np.abs(np.fft.rfft(x * window)) ** 2
    total = float(spectrum.sum())
    if total <= 0:
        return Analysis(level, 0.0, 0.0, 0.0, 0.0, 0.0)
    energy = {name: float(spectrum[mask].sum()) for name, mask in bands.items()}

    def centroid(name: str) -> float:
        mask = bands[name]
        return float(spectrum[mask] @ freqs[mask]) / energy[name] if energy[name] > 0 else 0.0

    formants = energy["f1"] + energy["f2"]
    return Analysis(level, centroid("f1"), centroid("f2"), energy["f2"] / formants if formants > 0 else 0.0,
                    energy["low"] / energy["voice"] if energy["voice"] > 0 else 0.0, energy["hiss"] / total)


def _ramp(value: float, zero_at: float, one_at: float) -> float:
    """0 at `zero_at`, 1 at `one_at`, linear between, clamped (either direction)."""
    return min(1.0, max(0.0, (value - zero_at) / (one_at - zero_at)))


def _rate(ms: float, frame_s: float) -> float:
    """One-pole smoothing coefficient per frame for time constant `ms`."""
    return 1.0 - math.exp(-1000.0 * frame_s / ms)


class MouthFeatureStream:
    """Live mouth states: push audio chunks, get float32 [k, 3] (open, wide, round) for the frames that
    became ready. One per audio stream; `features` of the warp engine is this over a whole clip."""

    def __init__(self, fps: int = 25):
        self.fps = check_fps(fps)
        frame_s = 1.0 / fps
        self._open_rate, self._close_rate = _rate(OPEN_MS, frame_s), _rate(CLOSE_MS, frame_s)
        self._relax_rate, self._shape_rate = _rate(RELAX_MS, frame_s), _rate(SHAPE_MS, frame_s)
        self._reference_fall = REFERENCE_FALL_DB_PER_S * frame_s
        self._hold_frames = PAUSE_HOLD_MS / 1000.0 * fps
        self._settle_frames = SETTLE_MS / 1000.0 * fps
        self.reset()

    def reset(self) -> None:
        """Forget everything; the next push starts frame 0 of a new utterance."""
        self._audio = PcmBuffer(np.float32)  # samples of the frames not analysed yet
        self._received = 0
        self._analysed = 0  # frames whose raw state is known
        self._emitted = 0
        self._pending: deque[np.ndarray] = deque()  # raw states + settled flag of frames [_emitted, _analysed)
        self._reference = REFERENCE_FLOOR_DB
        self._since_speech = math.inf  # frames since the last speech frame
        self._since_audible = math.inf  # frames since the last frame over the gate
        self._state = np.zeros(len(MOUTH_PARAMS))
        self._flushed = False

    def start_lead_s(self, received: int) -> float:
        """0: each frame comes out one frame of audio after its own, at the pace frames are shown."""
        return 0.0

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
        self._pending.append(self._shape(analyse(self._audio.read(start, end))))
        self._analysed += 1
        self._audio.release(end)

    def _shape(self, a: Analysis) -> np.ndarray:
        """Raw (open, wide, round, settled) of one frame; updates the reference level and the counts of
        frames since speech and since sound. settled: 1.0 from SETTLE_MS after the last audible frame."""
        self._reference = max(a.level, self._reference - self._reference_fall, REFERENCE_FLOOR_DB)
        below = self._reference - a.level  # dB under the recent peak (inf for digital silence)
        loud = _ramp(a.level, self._reference - RANGE_DB, self._reference) if a.level >= GATE_DB else 0.0
        self._since_speech = 0 if loud >= SPEECH_LOUDNESS else self._since_speech + 1
        self._since_audible = 0 if a.level >= GATE_DB else self._since_audible + 1
        settled = float(self._since_audible >= self._settle_frames)
        if self._since_speech > self._hold_frames:
            closing = 0.0
        else:
            nasal = NASAL_CLOSING * _ramp(a.low_share, *NASAL_LOW_SHARE) * _ramp(below, *NASAL_BELOW_DB)
            nasal *= max(0.0, 1.0 - 2.0 * a.hiss)  # a voiced fricative has a voice bar too, and hiss
            closing = max(_ramp(below, *DIP_DB), nasal)
        if loud == 0.0:
            return np.array([-closing, 0.0, 0.0, settled])
        voiced = min(1.0, 2.0 * loud) * (1.0 - a.hiss) * (1.0 - closing)
        seen = _ramp(a.upper_share, *UPPER_SHARE_FOR_F2)  # an empty band has no meaningful centroid
        front = seen * _ramp(a.f2_hz, *WIDE_HZ)
        back = 1.0 - seen * (1.0 - _ramp(a.f2_hz, *ROUND_F2_HZ))
        rounded = voiced * _ramp(a.upper_share, *ROUND_UPPER_SHARE) * back * _ramp(a.f1_hz, *ROUND_F1_HZ)
        wide = max(voiced * front * (1.0 - rounded), a.hiss * (1.0 - closing))
        openness = OPENNESS_MIN + (1.0 - OPENNESS_MIN) * _ramp(a.f1_hz, *OPENNESS_HZ)
        opening = loud ** OPEN_CURVE * openness * (1.0 - 0.7 * a.hiss) * (1.0 - 0.3 * rounded)
        return np.array([opening * (1.0 - closing) - closing, wide, rounded, settled])

    def _emit(self, count: int) -> torch.Tensor:
        """Smoothed states of frames [_emitted, count) as float32 [k, 3]."""
        out, n = [], len(MOUTH_PARAMS)
        while self._emitted < count:
            raw = self._pending.popleft()
            target = raw[:n].copy()
            ahead = self._pending[0][:n] if self._pending else np.zeros(n)  # the next frame
            settled = raw[n] > 0 and not ahead.any()  # at rest, and nothing to anticipate
            if target[0] >= 0:  # anticipate an opening, never cut a closure short
                target[0] = max(target[0], LEAD * ahead[0])
            target[1:] = np.maximum(target[1:], LEAD * ahead[1:])
            rate = np.full(n, self._shape_rate)
            if target[0] < self._state[0]:
                rate[0] = self._close_rate
            else:  # opening is quick; closed lips relax back to the avatar's own mouth slowly
                rate[0] = self._open_rate if target[0] > 0 else self._relax_rate
            state = self._state + rate * (target - self._state)
            self._state = np.where((np.abs(state) < SNAP) | settled, 0.0, state)
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
