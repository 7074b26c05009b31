"""MuseTalk audio features for live audio: frames come out while the speech is still arriving.

Offline (features.py) encodes each 30 s segment of the clip once and cuts 10-step windows out of it.
Live, the audio after a frame is not there yet, so frames are computed in passes: a pass encodes
the 30 s segment(s) holding the frames' windows exactly as offline would, except that the audio
not received yet is zeros (offline's own padding) and audio older than `context_s` is zeros too.
The audio keeps its offline position inside the 30 s input: Whisper adds an absolute positional
embedding to every step and carries it through all hidden states, so shifting audio to another
position changes every feature (the bench `audio-streaming` measures that alternative).

Frame f (window = whisper steps [2f-4, 2f+6) at 25 fps, i.e. audio up to sample (2f+6)*320) is
ready once that audio plus `lookahead_ms` has arrived. The first pass of an utterance runs as soon
as frame 0 is ready (at 25 fps with 40 ms look-ahead: after 160 ms of audio), over exactly the audio
up to that point; later passes are batched on a fixed grid: one pass when the received audio
crosses a multiple of `step_ms` (and only if a frame became ready), covering every frame ready at
that grid point. Outputs therefore depend only on the audio and the grid, not on how the audio was
chunked, as long as no chunk spans more than one grid point (a longer chunk gets one pass at its last
grid point, so its frames see more look-ahead). `flush()` at the end of speech emits the remaining
frames exactly like offline: steps after the audio read as zeros, and the frame count becomes
floor(N/16000*fps).

A frame therefore comes out 80 ms (its window's right edge at 25 fps) + `lookahead_ms` + up to
`step_ms` of audio after its own end (frame 0: without the `step_ms`), plus the pass's compute time.

A pass is two steps around the encoder: `prepare` (on the host: the pass's frames and its log-mel
input, [S, 80, 3000]) and `finish` (the frames' windows from the encoder's steps), so that a device
worker can run the encoder once for the passes of many streams (`encode_passes`). The log-mel blocks
of audio already complete are kept from pass to pass (only the blocks the new audio reaches are
computed), which makes a pass's host work a fraction of a millisecond instead of a 30 s spectrogram.

What still differs from offline: Whisper's attention and the log-mel's per-input maximum see the
segment only up to the pass's end (and only the last `context_s` of it, if set), not all of it.
Each pass costs one full 30 s encoder call whatever `context_s` is (the encoder accepts nothing
shorter), two segments in one batched call when a frame's window straddles a 30 s boundary."""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers import WhisperFeatureExtractor

from lipstream.audio.buffer import PcmBuffer
from lipstream.audio.features import (
    MEL_BLOCK,
    SAMPLE_RATE,
    SEGMENT_FRAMES,
    SEGMENT_SAMPLES,
    SEGMENT_STEPS,
    STEP_SAMPLES,
    WINDOW_STEPS,
    LogMel,
    check_fps,
    encode_mels,
    frame_windows,
    num_video_frames,
    num_whisper_steps,
    window_starts,
)
from lipstream.audio.load import as_float_mono

# Defaults (bench `audio-streaming`): the whole segment as context, since a shorter one costs the
# same and only adds error; 40 ms look-ahead, which covers the receptive field of a window's last
# step (conv stem + STFT reach 12.5 ms past it) with margin and removes most of the 0 ms error;
# a 120 ms grid: 3 frames a pass at 25 fps, 8.3 encoder passes a second per stream.
DEFAULT_CONTEXT_S = None
DEFAULT_LOOKAHEAD_MS = 40.0
DEFAULT_STEP_MS = 120.0


@dataclass
class FeaturePass:
    """One pass of one stream between `prepare` and `finish`: frames [first, last) from audio [0, end),
    whose steps start at absolute step `offset`; `keep` steps of the encoder's output are real audio;
    mels: the encoder's input [S, 80, 3000] (float32, host), or None when the frames need no encoder
    call. began: when it was prepared (time.perf_counter)."""

    first: int
    last: int
    end: int
    offset: int = 0
    keep: int = 0
    mels: torch.Tensor | None = None
    began: float = 0.0


class StreamingFeatures:
    """Per-frame MuseTalk audio features [n, 10*H, D] ([n, 50, 384] for whisper-tiny) from live audio.

    encoder: a Whisper encoder (`WhisperModel(...).encoder`), already on its device and dtype;
    outputs are in that dtype, on that device, without the positional encoding (the engine adds it).
    feature_extractor: the matching `WhisperFeatureExtractor` (its log-mel settings).
    fps: video frame rate (int).
    context_s: seconds of audio before each pass's end that the encoder sees; older audio reads as
    silence (never audio a frame's own window needs). None: the whole segment, closest to offline.
    lookahead_ms: audio required past a frame's window before it is emitted (0..1000).
    step_ms: the pass grid after the first pass; at most one pass per `step_ms` of audio.

    One instance per audio stream; all state lives in the instance. After `flush()`, call `reset()`
    before pushing the next utterance."""

    def __init__(self, encoder: nn.Module, feature_extractor: WhisperFeatureExtractor, fps: int = 25,
                 context_s: float | None = DEFAULT_CONTEXT_S, lookahead_ms: float = DEFAULT_LOOKAHEAD_MS,
                 step_ms: float = DEFAULT_STEP_MS):
        if context_s is not None and context_s <= 0:
            raise ValueError(f"context_s must be > 0 or None, got {context_s}")
        if not 0 <= lookahead_ms <= 1000:
            raise ValueError(f"lookahead_ms must be in [0, 1000], got {lookahead_ms}")
        if step_ms <= 0:
            raise ValueError(f"step_ms must be > 0, got {step_ms}")
        self.encoder = encoder
        self.feature_extractor = feature_extractor
        self.fps = check_fps(fps)
        self.context_samples = None if context_s is None else round(context_s * SAMPLE_RATE)
        self.lookahead_samples = round(lookahead_ms * SAMPLE_RATE / 1000)
        self.step_samples = max(1, round(step_ms * SAMPLE_RATE / 1000))
        self.first_pass_samples = self._ready_end(0)
        self.reset()

    # Made on the first pass, where passes run (a stream is often made on an event loop, which does no
    # tensor work).
    @functools.cached_property
    def mel(self) -> LogMel:
        return LogMel(self.feature_extractor)

    @functools.cached_property
    def _no_steps(self) -> torch.Tensor:
        param = next(self.encoder.parameters())
        return param.new_zeros(0, self.encoder.config.encoder_layers + 1, self.encoder.config.d_model)

    def reset(self) -> None:
        """Forget all audio and start a new stream at frame 0."""
        self._audio = PcmBuffer(np.float32)  # what later passes still need of the samples received
        self._received = 0
        self._frames_emitted = 0
        self._flushed = False
        self._mels: dict[int, tuple[int, torch.Tensor]] = {}  # segment -> (context start, its complete raw blocks)
        self.passes = 0
        self.last_pass_seconds: float | None = None

    @property
    def frames_emitted(self) -> int:
        """Frames returned so far by push()/flush() since the last reset()."""
        return self._frames_emitted

    @property
    def samples_received(self) -> int:
        """16 kHz samples pushed since the last reset()."""
        return self._received

    # ---- one call: prepare, encode, finish ------------------------------------------------------

    def push(self, samples: np.ndarray) -> torch.Tensor:
        """Add audio: float32 [n] in [-1, 1] or int16 [n] (PCM16), mono 16 kHz (see load.PcmStream).

        Returns the frames that became ready, [k, 10*H, D] (k may be 0), in frame order."""
        return self._run(self.prepare(samples))

    def flush(self) -> torch.Tensor:
        """End of speech: the remaining frames [k, 10*H, D], with steps after the audio as zeros.

        Afterwards `frames_emitted == floor(samples_received/16000*fps)`, as offline."""
        return self._run(self.prepare(None))

    def _run(self, feature_pass: FeaturePass) -> torch.Tensor:
        steps = None if feature_pass.mels is None else encode_mels(feature_pass.mels, self.encoder)
        return self.finish(feature_pass, steps)

    # ---- the two halves of a pass ---------------------------------------------------------------

    def prepare(self, samples: np.ndarray | None) -> FeaturePass:
        """The host half of a pass: `samples` as push() takes them, or None for the flush. Returns the
        pass; give it to `finish` with the encoder's output for its `mels` (when not None)."""
        began = time.perf_counter()
        if samples is None:
            self._flushed = True
            end, final = self._received, True
        else:
            if self._flushed:
                raise RuntimeError("push() after flush(): call reset() to start a new stream")
            samples = as_float_mono(samples)
            self._audio.append(samples)
            self._received += samples.shape[0]
            end, final = self._pass_end(), False
        first, last = self._frames_emitted, self._ready(end, final)
        feature_pass = FeaturePass(first, last, end, began=began)
        if last > first:
            self._plan_encoder(feature_pass)
        self._frames_emitted = last
        return feature_pass

    def finish(self, feature_pass: FeaturePass, steps: torch.Tensor | None) -> torch.Tensor:
        """The frames of a prepared pass, [last - first, 10*H, D]; steps: the encoder's output for its
        `mels` ([S*1500, H, D]), None when it has none."""
        if feature_pass.mels is not None:
            if steps is None:
                raise ValueError("this pass needs the encoder's output for its mels")
            steps = steps[:feature_pass.keep]
            self.passes += 1
            self.last_pass_seconds = time.perf_counter() - feature_pass.began
        frames = frame_windows(self._no_steps if steps is None else steps, self.fps, feature_pass.first,
                               feature_pass.last, step_offset=feature_pass.offset)
        self._drop_before(self._context_start(feature_pass.last, feature_pass.end))
        return frames

    # ---- where passes fall ----------------------------------------------------------------------

    def _pass_end(self) -> int:
        """The audio a push's pass covers: up to the last grid point; the first pass of the stream as
        soon as frame 0 is ready, over exactly the audio that makes it ready."""
        grid = self._received - self._received % self.step_samples
        if self._frames_emitted == 0 and grid < self.first_pass_samples <= self._received:
            return self.first_pass_samples
        return grid

    def _ready_end(self, frame: int) -> int:
        """The fewest samples with which `frame` is ready (its window and the look-ahead)."""
        window_end = int(window_starts(np.array([frame]), self.fps)[0]) + WINDOW_STEPS
        end = max(0, window_end * STEP_SAMPLES - STEP_SAMPLES) + self.lookahead_samples
        while num_whisper_steps(max(0, end - self.lookahead_samples)) < window_end \
                or num_video_frames(end, self.fps) <= frame:
            end += 1
        return end

    def start_lead_s(self, received: int) -> float:
        """(FeatureStream) Frame j after frame 0 comes out at the grid point after its audio; with the
        audio arriving in real time from `received` samples on, that is (grid point - received) from
        now, and it is shown j frames after frame 0: the lead is the most any frame of the next few
        grid periods would be late by (0 once the audio in covers them)."""
        frame_samples = SAMPLE_RATE / self.fps
        periods = 2 + round(self.step_samples / frame_samples)
        lead = 0.0
        for frame in range(1, num_video_frames(received, self.fps) + 2 * periods):
            at = -(-self._ready_end(frame) // self.step_samples) * self.step_samples
            lead = max(lead, (max(0, at - received) - frame * frame_samples) / SAMPLE_RATE)
        return lead

    def _ready(self, end: int, final: bool) -> int:
        """Number of frames (counted from 0) whose features can be computed from audio [0, end)."""
        available = num_video_frames(end, self.fps)
        if final or available <= self._frames_emitted:
            return max(available, self._frames_emitted)
        window_ends = window_starts(np.arange(self._frames_emitted, available), self.fps) + WINDOW_STEPS
        last_step = num_whisper_steps(max(0, end - self.lookahead_samples))
        return self._frames_emitted + int(np.searchsorted(window_ends, last_step, side="right"))

    def _first_step(self, frame: int) -> int:
        return max(0, int(window_starts(np.array([frame]), self.fps)[0]))

    def _context_start(self, first_frame: int, end: int) -> int:
        """First sample a pass ending at `end` keeps: `context_s` back, but never after the first
        step `first_frame` needs. Monotone in both arguments, so older audio can be dropped."""
        needed = self._first_step(first_frame) * STEP_SAMPLES
        if self.context_samples is None:
            return needed - needed % SEGMENT_SAMPLES
        return min(needed, max(0, end - self.context_samples))

    def _plan_encoder(self, feature_pass: FeaturePass) -> None:
        """Fill in the pass's encoder input for its frames [first, last) from its audio [0, end)."""
        first, last, end = feature_pass.first, feature_pass.last, feature_pass.end
        first_step = self._first_step(first)
        end_step = min(int(window_starts(np.array([last - 1]), self.fps)[0]) + WINDOW_STEPS,
                       num_whisper_steps(end))
        segment = first_step // SEGMENT_STEPS
        feature_pass.offset = segment * SEGMENT_STEPS
        if end_step <= first_step:  # flush: these frames' windows lie past the audio, all zeros
            return
        base = segment * SEGMENT_SAMPLES
        stop = min(end, -(-end_step // SEGMENT_STEPS) * SEGMENT_SAMPLES)
        keep = max(base, self._context_start(first, end))
        audio = np.zeros(stop - base, np.float32)
        audio[keep - base:] = self._audio.read(keep, stop)
        feature_pass.mels = self._segment_mels(audio, segment, keep - base)
        feature_pass.keep = num_whisper_steps(end) - feature_pass.offset

    def _segment_mels(self, audio: np.ndarray, segment: int, context: int) -> torch.Tensor:
        """The encoder input of `audio` (samples from the start of 30 s segment `segment`, zeros
        before `context`) -> [S, 80, 3000], reusing the log-mel blocks that were complete at an
        earlier pass with the same context start."""
        mels = []
        for k, start in enumerate(range(0, audio.shape[0], SEGMENT_SAMPLES)):
            part = audio[start:start + SEGMENT_SAMPLES]
            context_here = max(0, context - start)
            kept_context, kept = self._mels.get(segment + k, (context_here, None))
            done = 0 if kept is None or kept_context != context_here else kept.shape[1]
            raw = kept if done == SEGMENT_FRAMES else self.mel.raw(part, done, SEGMENT_FRAMES)
            if 0 < done < SEGMENT_FRAMES:
                raw = torch.cat([kept, raw], dim=1)
            self._mels[segment + k] = (context_here, raw[:, :self._complete_frames(part.shape[0])])
            mels.append(self.mel.normalize(raw))
        for key in [key for key in self._mels if key < segment]:
            del self._mels[key]
        return torch.stack(mels)

    def _complete_frames(self, samples: int) -> int:
        """Log-mel frames of a segment holding its first `samples` samples that later audio cannot
        change: the leading whole blocks whose windows lie in those samples (all of a full segment)."""
        if samples >= SEGMENT_SAMPLES:
            return SEGMENT_FRAMES
        frames = 0
        while frames + MEL_BLOCK <= SEGMENT_FRAMES and self.mel.reach(frames + MEL_BLOCK - 1) <= samples:
            frames += MEL_BLOCK
        return frames

    def _drop_before(self, sample: int) -> None:
        self._audio.release(sample)


def encode_passes(encoder: nn.Module, passes: Sequence[FeaturePass]) -> list[torch.Tensor | None]:
    """The encoder's output for each prepared pass (None for those without mels), from one batched
    encoder call over all their segments."""
    with_mels = [p for p in passes if p.mels is not None]
    if not with_mels:
        return [None] * len(passes)
    steps = encode_mels(torch.cat([p.mels for p in with_mels]), encoder, batch_segments=len(with_mels) * 2)
    per_segment = steps.shape[0] // sum(p.mels.shape[0] for p in with_mels)
    parts = iter(steps.split([p.mels.shape[0] * per_segment for p in with_mels]))
    return [next(parts) if p.mels is not None else None for p in passes]
