"""MuseTalk audio features for live audio: frames come out while the speech is still arriving.

Offline (features.py) encodes each 30 s segment of the clip once and cuts 10-step windows out of it.
Live, the audio after a frame is not there yet, so frames are computed in passes: a pass encodes
the 30 s segment(s) holding the frames' windows exactly as offline would, except that the audio
not received yet is zeros (offline's own padding) and audio older than `context_s` is zeros too.
The audio keeps its offline position inside the 30 s input: Whisper adds an absolute positional
embedding to every step and carries it through all hidden states, so shifting audio to another
position changes every feature (the bench `audio-streaming` measures that alternative).

Frame f (window = whisper steps [2f-4, 2f+6) at 25 fps, i.e. audio up to sample (2f+6)*320) is
ready once that audio plus `lookahead_ms` has arrived. Passes are batched on a fixed grid: one
pass when the received audio crosses a multiple of `step_ms` (and only if a frame became ready),
covering every frame ready at that grid point. Outputs therefore depend only on the audio and the
grid, not on how the audio was chunked, as long as no chunk spans more than one grid point (a
longer chunk gets one pass at its last grid point, so its frames see more look-ahead).
`flush()` at the end of speech emits the remaining frames exactly like offline: steps after the
audio read as zeros, and the frame count becomes floor(N/16000*fps).

A frame therefore comes out 80 ms (its window's right edge at 25 fps) + `lookahead_ms` + up to
`step_ms` of audio after its own end, plus the pass's compute time.

What still differs from offline: Whisper's attention and the log-mel's per-input maximum see the
segment only up to the pass's end (and only the last `context_s` of it, if set), not all of it.
Each pass costs one full 30 s encoder call whatever `context_s` is (the encoder accepts nothing
shorter), two segments in one batched call when a frame's window straddles a 30 s boundary."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from transformers import WhisperFeatureExtractor

from lipstream.audio.buffer import PcmBuffer
from lipstream.audio.features import (
    SAMPLE_RATE,
    SEGMENT_SAMPLES,
    SEGMENT_STEPS,
    STEP_SAMPLES,
    WINDOW_STEPS,
    check_fps,
    encode_mels,
    frame_windows,
    num_video_frames,
    num_whisper_steps,
    segment_mels,
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


class StreamingFeatures:
    """Per-frame MuseTalk audio features [n, 10*H, D] ([n, 50, 384] for whisper-tiny) from live audio.

    encoder: a Whisper encoder (`WhisperModel(...).encoder`), already on its device and dtype;
    outputs are in that dtype, on that device, without the positional encoding (the engine adds it).
    feature_extractor: the matching `WhisperFeatureExtractor`.
    fps: video frame rate (int).
    context_s: seconds of audio before each pass's end that the encoder sees; older audio reads as
    silence (never audio a frame's own window needs). None: the whole segment, closest to offline.
    lookahead_ms: audio required past a frame's window before it is emitted (0..1000).
    step_ms: the pass grid; at most one pass per `step_ms` of audio.
    encode: runs the encoder on log-mel segments [S, 80, 3000] -> steps [S*1500, H, D]; default a
    direct call. Streams of many sessions pass one `EncoderBatcher.encode` to share calls.

    One instance per audio stream; all state lives in the instance. After `flush()`, call `reset()`
    before pushing the next utterance."""

    def __init__(self, encoder: nn.Module, feature_extractor: WhisperFeatureExtractor, fps: int = 25,
                 context_s: float | None = DEFAULT_CONTEXT_S, lookahead_ms: float = DEFAULT_LOOKAHEAD_MS,
                 step_ms: float = DEFAULT_STEP_MS,
                 encode: Callable[[torch.Tensor], torch.Tensor] | None = None):
        if context_s is not None and context_s <= 0:
            raise ValueError(f"context_s must be > 0 or None, got {context_s}")
        if not 0 <= lookahead_ms <= 1000:
            raise ValueError(f"lookahead_ms must be in [0, 1000], got {lookahead_ms}")
        if step_ms <= 0:
            raise ValueError(f"step_ms must be > 0, got {step_ms}")
        self.encoder = encoder
        self.feature_extractor = feature_extractor
        self._encode_mels = encode or (lambda mels: encode_mels(mels, encoder))
        self.fps = check_fps(fps)
        self.context_samples = None if context_s is None else round(context_s * SAMPLE_RATE)
        self.lookahead_samples = round(lookahead_ms * SAMPLE_RATE / 1000)
        self.step_samples = max(1, round(step_ms * SAMPLE_RATE / 1000))
        param = next(encoder.parameters())
        self._no_steps = param.new_zeros(0, encoder.config.encoder_layers + 1, encoder.config.d_model)
        self.reset()

    def reset(self) -> None:
        """Forget all audio and start a new stream at frame 0."""
        self._audio = PcmBuffer(np.float32)  # what later passes still need of the samples received
        self._received = 0
        self._frames_emitted = 0
        self._flushed = False
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

    def push(self, samples: np.ndarray) -> torch.Tensor:
        """Add audio: float32 [n] in [-1, 1] or int16 [n] (PCM16), mono 16 kHz (see load.PcmStream).

        Returns the frames that became ready, [k, 10*H, D] (k may be 0), in frame order."""
        if self._flushed:
            raise RuntimeError("push() after flush(): call reset() to start a new stream")
        samples = as_float_mono(samples)
        self._audio.append(samples)
        self._received += samples.shape[0]
        return self._emit(self._received - self._received % self.step_samples, final=False)

    def flush(self) -> torch.Tensor:
        """End of speech: the remaining frames [k, 10*H, D], with steps after the audio as zeros.

        Afterwards `frames_emitted == floor(samples_received/16000*fps)`, as offline."""
        self._flushed = True
        return self._emit(self._received, final=True)

    def _ready(self, end: int, final: bool) -> int:
        """Number of frames (counted from 0) whose features can be computed from audio [0, end)."""
        available = num_video_frames(end, self.fps)
        if final or available <= self._frames_emitted:
            return available
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

    def _emit(self, end: int, final: bool) -> torch.Tensor:
        first, last = self._frames_emitted, self._ready(end, final)
        offset, steps = self._encode(first, last, end) if last > first else (0, self._no_steps)
        frames = frame_windows(steps, self.fps, first, last, step_offset=offset)
        self._frames_emitted = last
        self._drop_before(self._context_start(self._frames_emitted, end))
        return frames

    def _encode(self, first: int, last: int, end: int) -> tuple[int, torch.Tensor]:
        """Encoder pass for frames [first, last) with audio [0, end) received.

        Returns (absolute index of the first step, steps [T, H, D] of real audio only)."""
        first_step = self._first_step(first)
        end_step = min(int(window_starts(np.array([last - 1]), self.fps)[0]) + WINDOW_STEPS,
                       num_whisper_steps(end))
        segment = first_step // SEGMENT_STEPS
        offset = segment * SEGMENT_STEPS
        if end_step <= first_step:  # flush: these frames' windows lie past the audio, all zeros
            return offset, self._no_steps
        base = segment * SEGMENT_SAMPLES
        stop = min(end, -(-end_step // SEGMENT_STEPS) * SEGMENT_SAMPLES)
        keep = max(base, self._context_start(first, end))
        audio = np.zeros(stop - base, np.float32)
        audio[keep - base:] = self._audio.read(keep, stop)
        return offset, self._run_encoder(audio)[:num_whisper_steps(end) - offset]

    def _run_encoder(self, audio: np.ndarray) -> torch.Tensor:
        """float32 [n] audio from a segment start -> steps [ceil(n/480000)*1500, H, D]; timed."""
        began = time.perf_counter()
        steps = self._encode_mels(segment_mels(audio, self.feature_extractor))
        if steps.device.type == "cuda":
            torch.cuda.synchronize(steps.device)
        self.last_pass_seconds = time.perf_counter() - began
        self.passes += 1
        return steps

    def _drop_before(self, sample: int) -> None:
        self._audio.release(sample)
