"""Audio input: any media file or raw PCM16 chunks -> mono float32 samples at 16 kHz.

Every function here returns `float32 [N]` at 16 kHz, range [-1, 1] (as decoded; nothing is
normalised), which is what MuseTalk gets from `librosa.load(path, sr=16000)`:
- channels are averaged to mono (librosa's downmix);
- the rate is converted with soxr at "HQ" quality (librosa's default `soxr_hq`), and the length is
  then fixed to `ceil(n * 16000 / rate)` samples as librosa does.
No VAD, no loudness normalisation: silence is valid audio (see `rms_dbfs`)."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import av
import numpy as np
import soxr

from lipstream.errors import (
    AudioDecodeError,
    AudioFormatError,
    AudioNotFoundError,
    AudioTooLongError,
    EmptyAudioError,
    NoAudioStreamError,
)

SAMPLE_RATE = 16000
SOXR_QUALITY = "HQ"

AudioSource = str | os.PathLike | bytes


def load_audio(source: AudioSource, *, max_seconds: float | None = None,
               name: str | None = None) -> np.ndarray:
    """Decode a media file (WAV, MP3, OGG, FLAC, M4A, a video's audio track...) with PyAV.

    source: a path, or the file's bytes. max_seconds: reject longer input (checked while decoding,
    so a huge file is not decoded in full). name: how to call the input in error messages (defaults
    to the path, or "<N bytes>").
    Returns float32 [N] at 16 kHz, mono, range [-1, 1].
    Raises AudioNotFoundError, AudioDecodeError, NoAudioStreamError, EmptyAudioError, AudioTooLongError."""
    label = name or (f"<{len(source)} bytes>" if isinstance(source, bytes) else str(source))
    if isinstance(source, bytes):
        if not source:
            raise EmptyAudioError(f"audio {label} is empty (0 bytes); send a non-empty audio file")
        file: str | io.BytesIO = io.BytesIO(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise AudioNotFoundError(f"audio file {label} does not exist; check the path")
        if path.stat().st_size == 0:
            raise EmptyAudioError(f"audio file {label} is empty (0 bytes); give a non-empty audio file")
        file = str(path)
    try:
        mono = _decode_mono(file, label, max_seconds)
    except av.error.FFmpegError as exc:
        raise AudioDecodeError(
            f"cannot decode audio {label}: {exc.strerror or exc}; "
            "give a valid audio file (WAV, MP3, OGG, FLAC, M4A...)"
        ) from exc
    if mono.size == 0:
        raise EmptyAudioError(f"audio {label} has an audio stream but 0 samples; give audio with sound in it")
    return mono


def _decode_mono(file: str | io.BytesIO, label: str, max_seconds: float | None) -> np.ndarray:
    """Decode the first audio stream to float32 [n] mono at 16 kHz, resampled as it is decoded (so
    only the 16 kHz result is held, whatever the source's rate). A stream that declares more than
    `max_seconds`, or a rate above MAX_SOURCE_RATE, is refused before anything is decoded; one that
    decodes to more than `max_seconds` (a false declaration) is refused as soon as it has."""
    with av.open(file, mode="r") as container:
        if not container.streams.audio:
            found = ", ".join(f"{s.type} ({s.codec_context.name})" for s in container.streams) or "nothing"
            raise NoAudioStreamError(
                f"{label} has no audio stream (read as {container.format.name}: {found}); "
                "give a file that contains audio"
            )
        stream = container.streams.audio[0]
        _check_declared(stream, container, label, max_seconds)
        resampler: av.AudioResampler | None = None
        to_16k: _Resampler | None = None
        max_samples = math.inf
        for frame in container.decode(stream):
            if resampler is None:
                # Planar float at the first frame's rate and layout: format conversion only, so
                # the downmix (a plain mean, as librosa does) and the rate change stay ours.
                _check_rate(frame.sample_rate, label)
                resampler = av.AudioResampler(format="fltp", layout=frame.layout, rate=frame.sample_rate)
                to_16k = _Resampler(frame.sample_rate)
                if max_seconds is not None:
                    max_samples = max_seconds * frame.sample_rate
            for converted in resampler.resample(frame):
                to_16k.push(converted.to_ndarray().mean(axis=0, dtype=np.float32))  # [channels, n] -> [n]
            if to_16k.samples_in > max_samples:
                raise _too_long(label, max_seconds)
        if resampler is None:
            return np.zeros(0, np.float32)
        for converted in resampler.resample(None):
            to_16k.push(converted.to_ndarray().mean(axis=0, dtype=np.float32))
    if to_16k.samples_in > max_samples:
        raise _too_long(label, max_seconds)
    return to_16k.finish()


MAX_SOURCE_RATE = 384_000  # the highest sample rate decoded (studio formats stop at 384 kHz)


def _check_rate(rate: int, label: str) -> None:
    if not 0 < rate <= MAX_SOURCE_RATE:
        raise AudioFormatError(f"audio {label} declares a sample rate of {rate} Hz; lipstream decodes rates up "
                               f"to {MAX_SOURCE_RATE} Hz: convert it (e.g. to 16 or 48 kHz) first")


def _check_declared(stream: av.audio.stream.AudioStream, container: av.container.InputContainer, label: str,
                    max_seconds: float | None) -> None:
    """Refuse, before decoding, a stream whose declared rate or duration is over the limits."""
    if stream.codec_context.sample_rate:
        _check_rate(stream.codec_context.sample_rate, label)
    if max_seconds is None:
        return
    if stream.duration is not None and stream.time_base is not None:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        seconds = container.duration / av.time_base
    else:
        return  # nothing declared: the decoded length is checked as it grows
    if seconds > max_seconds:
        raise _too_long(label, max_seconds, f" (it declares {seconds:.1f} s)")


class _Resampler:
    """float32 mono chunks at `rate` -> 16 kHz, streamed (soxr HQ, the same samples as resampling
    the whole signal at once), with librosa's output length: ceil(n * 16000 / rate)."""

    def __init__(self, rate: int):
        self.rate = rate
        self.samples_in = 0
        self._stream = None if rate == SAMPLE_RATE else soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32",
                                                                             quality=SOXR_QUALITY)
        self._out: list[np.ndarray] = []

    def push(self, samples: np.ndarray) -> None:
        self.samples_in += samples.size
        self._out.append(samples if self._stream is None else self._stream.resample_chunk(samples, last=False))

    def finish(self) -> np.ndarray:
        if self._stream is not None:
            self._out.append(self._stream.resample_chunk(np.zeros(0, np.float32), last=True))
        out = np.concatenate(self._out) if self._out else np.zeros(0, np.float32)
        return _librosa_length(out, self.samples_in, self.rate)


def _too_long(label: str, max_seconds: float | None, declared: str = "") -> AudioTooLongError:
    return AudioTooLongError(
        f"audio {label} is longer than the {max_seconds:g} s allowed{declared}; send a shorter clip"
    )


def resample_to_16k(samples: np.ndarray, rate: int) -> np.ndarray:
    """float32 [n] mono at `rate` -> float32 [ceil(n*16000/rate)] at 16 kHz (soxr HQ, librosa's length)."""
    samples = np.ascontiguousarray(samples, dtype=np.float32)
    if rate == SAMPLE_RATE:
        return samples
    return _librosa_length(soxr.resample(samples, rate, SAMPLE_RATE, quality=SOXR_QUALITY), samples.shape[-1], rate)


def _librosa_length(out: np.ndarray, samples_in: int, rate: int) -> np.ndarray:
    """16 kHz float32 output of `samples_in` samples at `rate`, cut or zero-padded to librosa's length."""
    size = int(np.ceil(samples_in * (SAMPLE_RATE / rate)))
    if out.size >= size:
        return np.ascontiguousarray(out[:size], dtype=np.float32)
    return np.pad(out, (0, size - out.size)).astype(np.float32, copy=False)


def as_float_mono(samples: np.ndarray) -> np.ndarray:
    """Live audio as the feature streams take it: float32 [n] in [-1, 1] (kept) or int16 [n] PCM16
    (scaled by 1/32768) -> float32 [n]. Raises ValueError for anything that is not mono."""
    samples = np.asarray(samples)
    if samples.ndim != 1:
        raise ValueError(f"samples must be mono [n], got shape {samples.shape}")
    if samples.dtype == np.int16:
        return samples.astype(np.float32) / 32768.0
    return samples.astype(np.float32, copy=False)


def pcm16_to_float(data: bytes, channels: int = 1) -> np.ndarray:
    """PCM16 little-endian interleaved bytes -> float32 [n] mono (channel mean), x / 32768.

    `len(data)` must be a multiple of 2 * channels."""
    frame_bytes = 2 * channels
    if len(data) % frame_bytes:
        raise ValueError(f"PCM16 data of {len(data)} bytes is not whole {channels}-channel samples")
    ints = np.frombuffer(data, dtype="<i2").reshape(-1, channels)
    return (ints.astype(np.float32) / 32768.0).mean(axis=1, dtype=np.float32)


def decode_pcm16(data: bytes, sample_rate: int, channels: int = 1) -> np.ndarray:
    """A whole PCM16 LE buffer at `sample_rate` -> float32 [N] mono at 16 kHz (same path as `load_audio`)."""
    return resample_to_16k(pcm16_to_float(data, channels), sample_rate)


class PcmStream:
    """Live PCM16 LE chunks at any rate -> float32 mono 16 kHz, chunk by chunk.

    Chunks may split a sample anywhere; the leftover bytes wait for the next chunk. Resampling is
    stateful (soxr stream, HQ), so chunk edges leave no clicks; the resampler's delay is returned
    by `flush()` at the end of the stream."""

    def __init__(self, sample_rate: int, channels: int = 1):
        if sample_rate <= 0 or channels <= 0:
            raise ValueError(f"bad PCM format: sample_rate={sample_rate}, channels={channels}")
        self.sample_rate = sample_rate
        self.channels = channels
        self._pending = b""
        self._resampler = self._new_resampler()

    def _new_resampler(self) -> soxr.ResampleStream | None:
        if self.sample_rate == SAMPLE_RATE:
            return None
        return soxr.ResampleStream(self.sample_rate, SAMPLE_RATE, 1, dtype="float32", quality=SOXR_QUALITY)

    def push(self, data: bytes) -> np.ndarray:
        """One chunk of PCM16 LE bytes -> float32 [n] at 16 kHz (n may be 0)."""
        data = self._pending + data
        whole = len(data) - len(data) % (2 * self.channels)
        self._pending = data[whole:]
        mono = pcm16_to_float(data[:whole], self.channels)
        if self._resampler is None:
            return mono
        return self._resampler.resample_chunk(mono, last=False)

    def flush(self) -> np.ndarray:
        """End of stream: float32 [n] at 16 kHz still held by the resampler; then the stream restarts."""
        self._pending = b""
        if self._resampler is None:
            return np.zeros(0, np.float32)
        tail = self._resampler.resample_chunk(np.zeros(0, np.float32), last=True)
        self._resampler = self._new_resampler()
        return tail


def rms_dbfs(samples: np.ndarray) -> float:
    """Loudness of float32 [N] samples in [-1, 1] as RMS dBFS (a full-scale sine is -3.01 dBFS,
    digital silence is -inf). Use it to detect silence; `load_audio` never rejects it."""
    if samples.size == 0:
        return -math.inf
    rms = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64))))
    return 20.0 * math.log10(rms) if rms > 0 else -math.inf
