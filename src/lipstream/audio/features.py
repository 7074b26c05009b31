"""MuseTalk v1.5 audio features, offline (reference/musetalk_v15_spec.md section 3).

audio float32 [N] 16 kHz
  -> 30 s segments -> Whisper's log-mel [S, 80, 3000] (each zero-padded to 30 s; `log_mel`)
  -> Whisper encoder, all hidden states (embedding, layers 1..L-1, final-norm layer L) stacked
  -> whisper steps [T, L+1, D] at 50 Hz, trimmed to floor(N/16000*50)
  -> per-video-frame windows of 10 steps -> [num_frames, 10*(L+1), D]   (whisper-tiny: [F, 50, 384])

The sinusoidal positional encoding over the 50 tokens is NOT added here: the engine adds it.

The log-mel is WhisperFeatureExtractor's own computation (its torch path: Hann window, STFT, power,
mel filters, log10, the segment's maximum less 8 dB as the floor, (x + 4) / 4), done here in blocks of
MEL_BLOCK frames aligned to the segment: equal to the extractor's output value for value, and a live
stream (streaming.py) can keep the blocks whose audio is complete instead of redoing 30 s each pass.

The arithmetic uses MuseTalk's float expressions (`floor(N / 16000 * 50)`, `floor(f * (50 / fps))`)
on purpose: they differ from exact integer division for some lengths, and the frame count and the
windows must match MuseTalk's for the same audio."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from transformers import WhisperFeatureExtractor

from lipstream.audio.load import SAMPLE_RATE
from lipstream.stream.device import to_device

STEP_RATE = 50  # whisper encoder steps per second
STEP_SAMPLES = SAMPLE_RATE // STEP_RATE  # 320 samples = 20 ms per step
SEGMENT_SAMPLES = 480_000  # 30 s: the only input length the Whisper encoder accepts
SEGMENT_STEPS = SEGMENT_SAMPLES // STEP_SAMPLES  # 1500
PAD_LEFT = 2  # MuseTalk's audio_padding_length_left / _right
PAD_RIGHT = 2
WINDOW_STEPS = 2 * (PAD_LEFT + PAD_RIGHT + 1)  # 10 steps = 200 ms per video frame


def num_whisper_steps(num_samples: int) -> int:
    """Whisper steps MuseTalk keeps for `num_samples` of 16 kHz audio: floor(N/16000*50)."""
    return math.floor(num_samples / SAMPLE_RATE * STEP_RATE)


def num_video_frames(num_samples: int, fps: int) -> int:
    """Video frames MuseTalk makes for `num_samples` of 16 kHz audio: floor(N/16000*fps)."""
    return math.floor(num_samples / SAMPLE_RATE * fps)


def check_fps(fps: int) -> int:
    """MuseTalk takes an integer frame rate (it casts with int()); windows are defined up to 50 fps."""
    if not isinstance(fps, int) or not 1 <= fps <= STEP_RATE:
        raise ValueError(f"fps must be an integer in [1, {STEP_RATE}], got {fps!r}")
    return fps


def window_starts(frames: np.ndarray, fps: int) -> np.ndarray:
    """First whisper step of each frame's window, in unpadded step indices: int64 [F].

    MuseTalk pads ceil(50/fps)*2 zero steps in front and takes 10 steps from floor(f*50/fps) in
    padded indices; unpadded, the window is [floor(f*mult) - 2*ceil(mult), +10).
    At 25 fps: [2f-4, 2f+6)."""
    mult = STEP_RATE / fps
    return np.floor(frames * mult).astype(np.int64) - PAD_LEFT * math.ceil(mult)


def frame_windows(steps: torch.Tensor, fps: int, first_frame: int, end_frame: int,
                  step_offset: int = 0) -> torch.Tensor:
    """Per-video-frame windows of whisper steps, MuseTalk's layout.

    steps: [T, H, D] whisper steps (H hidden states), absolute steps [step_offset, step_offset+T);
    every step outside that range reads as zeros (MuseTalk's zero padding).
    Returns [end_frame - first_frame, 10*H, D] (same dtype/device as `steps`), frame f's 10 steps
    flattened time-major: token = t*H + layer."""
    count = end_frame - first_frame
    _, hidden, dim = steps.shape
    if count <= 0:
        return steps.new_zeros(0, WINDOW_STEPS * hidden, dim)
    starts = window_starts(np.arange(first_frame, end_frame), fps) - step_offset
    left = max(0, -int(starts[0]))
    right = max(0, int(starts[-1]) + WINDOW_STEPS - steps.shape[0])
    padded = torch.cat([steps.new_zeros(left, hidden, dim), steps, steps.new_zeros(right, hidden, dim)])
    index = to_device(starts + left, steps.device)[:, None]  # pinned on CUDA: no wait for the whole stream
    index = index + torch.arange(WINDOW_STEPS, device=steps.device)
    return padded[index].reshape(count, WINDOW_STEPS * hidden, dim)


MEL_BLOCK = 16  # log-mel frames computed together (and kept together by a live stream)
SEGMENT_FRAMES = 3000  # log-mel frames of a 30 s segment (the STFT's last frame is dropped, as Whisper does)


class LogMel:
    """Whisper's log-mel spectrogram of 30 s segments (`feature_extractor`'s settings: 80 mel bins,
    400-sample FFT, 160-sample hop), as WhisperFeatureExtractor computes it with torch.

    `raw(audio, first, last)`: the log10 mel power of frames [first, last) of one segment, float32
    [80, last - first], before the segment's normalisation; `audio` holds the segment's samples from its
    start (zeros after them, reflected at both ends of the 30 s, as the extractor pads). Frames are
    computed in whole blocks of MEL_BLOCK aligned to the segment, so a frame's value never depends on
    which frames were asked for with it. `normalize(raw)`: [..., 80, 3000] -> the model's input."""

    def __init__(self, feature_extractor: WhisperFeatureExtractor):
        self.n_fft = feature_extractor.n_fft
        self.hop = feature_extractor.hop_length
        self.filters = torch.from_numpy(feature_extractor.mel_filters).to(torch.float32).T.contiguous()
        self.window = torch.hann_window(self.n_fft)
        self.silence = float(torch.tensor(1e-10, dtype=torch.float32).log10())  # a frame of zeros

    def reach(self, frame: int) -> int:
        """One past the last sample (of the segment) that frame `frame`'s window reads."""
        return frame * self.hop + self.n_fft // 2

    def audible_frames(self, samples: int) -> int:
        """Frames whose window reads any of the first `samples` samples (the rest are silence)."""
        return min(SEGMENT_FRAMES, -(-(samples + self.n_fft // 2) // self.hop))

    def raw(self, audio: np.ndarray, first: int, last: int) -> torch.Tensor:
        if first % MEL_BLOCK or not 0 <= first < last <= SEGMENT_FRAMES:
            raise ValueError(f"frames [{first}, {last}): the first must start a block of {MEL_BLOCK}, within 3000")
        half = self.n_fft // 2
        audible = self.audible_frames(audio.shape[0])
        blocks = []
        for start in range(first, last, MEL_BLOCK):
            stop = min(start + MEL_BLOCK, SEGMENT_FRAMES)
            if start >= audible:
                blocks.append(torch.full((self.filters.shape[0], stop - start), self.silence))
                continue
            index = np.abs(np.arange(start * self.hop - half, (stop - 1) * self.hop + half))  # reflected at 0 ...
            index = np.where(index >= SEGMENT_SAMPLES, 2 * (SEGMENT_SAMPLES - 1) - index, index)  # ... and at 30 s
            samples = np.zeros(index.shape[0], np.float32)
            inside = index < audio.shape[0]
            samples[inside] = audio[index[inside]]
            spectrum = torch.stft(torch.from_numpy(samples), self.n_fft, self.hop, window=self.window,
                                  center=False, return_complex=True)
            blocks.append(torch.clamp(self.filters @ (spectrum.abs() ** 2), min=1e-10).log10())
        return torch.cat(blocks, dim=1)[:, :last - first]

    @staticmethod
    def normalize(raw: torch.Tensor) -> torch.Tensor:
        peak = raw.amax(dim=(-2, -1), keepdim=True)
        return (torch.maximum(raw, peak - 8.0) + 4.0) / 4.0

    def segment(self, audio: np.ndarray) -> torch.Tensor:
        """float32 [n] (n <= 480000), a segment's samples from its start -> its model input [80, 3000]."""
        return self.normalize(self.raw(audio, 0, SEGMENT_FRAMES))


def segment_mels(audio: np.ndarray, feature_extractor: WhisperFeatureExtractor) -> torch.Tensor:
    """float32 [N] 16 kHz -> log-mel float32 [ceil(N/480000), 80, 3000]: one 30 s segment per row,
    the last one zero-padded to 30 s (each segment is featurised alone, as MuseTalk does)."""
    mel = LogMel(feature_extractor)
    return torch.stack([mel.segment(audio[i:i + SEGMENT_SAMPLES]) for i in range(0, audio.shape[0], SEGMENT_SAMPLES)])


@torch.no_grad()
def encode_mels(mels: torch.Tensor, encoder: nn.Module, batch_segments: int = 8) -> torch.Tensor:
    """log-mel [S, 80, 3000] -> whisper steps [S*1500, H, D] in the encoder's dtype and device
    (the encoder should be in eval mode; MuseTalk's whisper has no dropout anyway).

    H = encoder_layers + 1 hidden states: the embedding output, each layer's output, the last one
    after the final LayerNorm. `batch_segments` segments go through the encoder per call."""
    param = next(encoder.parameters())
    mels = to_device(mels, param.device)
    steps = []
    for i in range(0, mels.shape[0], batch_segments):
        out = encoder(mels[i:i + batch_segments].to(param.device, param.dtype), output_hidden_states=True)
        steps.append(torch.stack(out.hidden_states, dim=2).flatten(0, 1))
    return torch.cat(steps)


def whisper_steps(audio: np.ndarray, encoder: nn.Module, feature_extractor: WhisperFeatureExtractor,
                  batch_segments: int = 8) -> torch.Tensor:
    """MuseTalk's whisper features of a whole clip.

    audio: float32 [N] 16 kHz mono, N > 0. Each 30 s segment is encoded separately (zero-padded to
    30 s, as MuseTalk); `batch_segments` segments go through the encoder per call.
    Returns [floor(N/16000*50), H, D] in the encoder's dtype, on its device (whisper-tiny: H=5, D=384)."""
    if audio.ndim != 1 or audio.shape[0] == 0:
        raise ValueError(f"audio must be a non-empty float32 [N] array, got shape {audio.shape}")
    steps = encode_mels(segment_mels(audio, feature_extractor), encoder, batch_segments)
    return steps[:num_whisper_steps(audio.shape[0])]


def audio_features(audio: np.ndarray, encoder: nn.Module, feature_extractor: WhisperFeatureExtractor,
                   fps: int = 25, batch_segments: int = 8) -> torch.Tensor:
    """MuseTalk's per-frame audio conditioning for a whole clip (offline).

    audio: float32 [N] 16 kHz mono. fps: video frame rate (an int, as MuseTalk casts it).
    Returns [floor(N/16000*fps), 10*H, D] ([F, 50, 384] for whisper-tiny) in the encoder's dtype,
    on its device, without the positional encoding (the engine adds it)."""
    check_fps(fps)
    steps = whisper_steps(audio, encoder, feature_extractor, batch_segments)
    return frame_windows(steps, fps, 0, num_video_frames(audio.shape[0], fps))
