"""Audio input: any media file or raw PCM16 chunks -> mono float32 samples at 16 kHz.

Every function here returns `float32 [N]` at 16 kHz, range [-1, 1] (as decoded; nothing is
normalised), which is what MuseTalk gets from `librosa.load(path, sr=16000)`:
- channels are averaged to mono (librosa's downmix);
- the rate is converted with soxr at "HQ" quality (librosa's default `soxr_hq`), and the length is
  then fixed to `ceil(n * 16000 / rate)` samples as librosa does (live chunks, `PcmStream`: with
  libswresample, for its low delay).
No VAD, no loudness normalisation: silence is valid audio (see `rms_dbfs`).

`load_clip` keeps the input as it is instead (its channels and rate), for outputs that carry the
input's own sound (a render's MP4); `AudioClip.mono_16k()` is then what `load_audio` returns."""

from __future__ import annotations

import contextlib
import functools
import io
import itertools
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lipstream.errors import (
    AudioDecodeError,
    AudioFormatError,
    AudioNotFoundError,
    AudioTooLongError,
    EmptyAudioError,
    NoAudioStreamError,
    shorten,
)

if TYPE_CHECKING:
    import av

# PyAV and soxr are imported where they are used: what needs no decoding (the constants, PCM
# conversion) imports without them.

SAMPLE_RATE = 16000  # the rate of all audio inside lipstream (MuseTalk's, whisper's)
SOXR_QUALITY = "HQ"

AudioSource = str | os.PathLike | bytes


@dataclass(frozen=True)
class AudioClip:
    """Decoded audio as the input holds it: samples float32 [channels, n] in [-1, 1] at `rate` Hz."""

    samples: np.ndarray
    rate: int

    @property
    def channels(self) -> int:
        return int(self.samples.shape[0])

    def mono_16k(self) -> np.ndarray:
        """float32 [N] at 16 kHz, mono: the channels' mean (librosa's downmix), resampled (`resample_to_16k`)."""
        return resample_to_16k(self.samples.mean(axis=0, dtype=np.float32), self.rate)


def load_audio(source: AudioSource, *, max_seconds: float | None = None,
               name: str | None = None) -> np.ndarray:
    """Decode a media file (WAV, MP3, OGG, FLAC, M4A, a video's audio track...) with PyAV, resampled to
    16 kHz as it is decoded (only the 16 kHz result is held, whatever the source's rate).

    source: a path, or the file's bytes. max_seconds: reject longer input (a declared length before
    decoding, the decoded length as it grows, so a huge file is never decoded in full). name: how to
    call the input in error messages (defaults to the path, or "<N bytes>").
    Returns float32 [N] at 16 kHz, mono, range [-1, 1].
    Raises AudioNotFoundError, AudioDecodeError, AudioFormatError, NoAudioStreamError, EmptyAudioError,
    AudioTooLongError."""
    file, label = _open_source(source, name)
    to_16k: _Resampler | None = None
    with _decode_errors(label):
        for rate, piece in _decoded(file, label, max_seconds):
            to_16k = to_16k or _Resampler(rate)
            to_16k.push(piece.mean(axis=0, dtype=np.float32))  # [channels, n] -> [n], librosa's downmix
    if to_16k is None or to_16k.samples_in == 0:
        raise _no_samples(label)
    return to_16k.finish()


def load_clip(source: AudioSource, *, max_seconds: float | None = None, name: str | None = None) -> AudioClip:
    """`load_audio`'s input as it is: its first audio stream's channels at its own rate (the rate and
    channel layout of its first frame). Same arguments and errors as `load_audio`."""
    file, label = _open_source(source, name)
    pieces: list[np.ndarray] = []
    rate = 0
    with _decode_errors(label):
        for rate, piece in _decoded(file, label, max_seconds):
            pieces.append(piece)
    if not sum(piece.shape[1] for piece in pieces):
        raise _no_samples(label)
    return AudioClip(np.ascontiguousarray(np.concatenate(pieces, axis=1), dtype=np.float32), rate)


def _open_source(source: AudioSource, name: str | None) -> tuple[str | io.BytesIO, str]:
    """(what PyAV opens, how messages call it); EmptyAudioError / AudioNotFoundError before decoding."""
    label = shorten(name, 80) if name else (f"<{len(source)} bytes>" if isinstance(source, bytes) else str(source))
    if isinstance(source, bytes):
        if not source:
            raise EmptyAudioError(f"audio {label} is empty (0 bytes); send a non-empty audio file")
        return io.BytesIO(source), label
    path = Path(source)
    if not path.is_file():
        raise AudioNotFoundError(f"audio file {label} does not exist; check the path")
    if path.stat().st_size == 0:
        raise EmptyAudioError(f"audio file {label} is empty (0 bytes); give a non-empty audio file")
    return str(path), label


@contextlib.contextmanager
def _decode_errors(label: str) -> Iterator[None]:
    import av

    try:
        yield
    except av.error.FFmpegError as exc:
        raise AudioDecodeError(
            f"cannot decode audio {label}: {exc.strerror or exc}; "
            "give a valid audio file (WAV, MP3, OGG, FLAC, M4A...)"
        ) from exc


def _no_samples(label: str) -> EmptyAudioError:
    return EmptyAudioError(f"audio {label} has an audio stream but 0 samples; give audio with sound in it")


def _decoded(file: str | io.BytesIO, label: str, max_seconds: float | None) -> Iterator[tuple[int, np.ndarray]]:
    """The first audio stream as it is decoded: (rate, float32 [channels, n]) pieces at its first
    frame's rate and channel layout. A stream that declares more than `max_seconds`, or a rate above
    MAX_SOURCE_RATE, is refused before anything is decoded; one that decodes to more than
    `max_seconds` (a false declaration) is refused as soon as it has."""
    import av

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
        rate, total, max_samples = 0, 0, math.inf
        for frame in itertools.chain(container.decode(stream), [None]):  # None: what the converter holds
            if resampler is None:
                if frame is None:
                    return
                # Planar float at the first frame's rate and layout: format conversion only, so
                # the downmix (a plain mean, as librosa does) and the rate change stay ours.
                rate = frame.sample_rate
                _check_rate(rate, label)
                resampler = av.AudioResampler(format="fltp", layout=frame.layout, rate=rate)
                if max_seconds is not None:
                    max_samples = max_seconds * rate
            for converted in resampler.resample(frame):
                piece = converted.to_ndarray()
                total += piece.shape[1]
                if total > max_samples:
                    raise _too_long(label, max_seconds)
                yield rate, piece


MAX_SOURCE_RATE = 384_000  # the highest sample rate decoded (studio formats stop at 384 kHz)


def _check_rate(rate: int, label: str) -> None:
    if not 0 < rate <= MAX_SOURCE_RATE:
        raise AudioFormatError(f"audio {label} declares a sample rate of {rate} Hz; lipstream decodes rates up "
                               f"to {MAX_SOURCE_RATE} Hz: convert it (e.g. to 16 or 48 kHz) first")


def _check_declared(stream: av.audio.stream.AudioStream, container: av.container.InputContainer, label: str,
                    max_seconds: float | None) -> None:
    """Refuse, before decoding, a stream whose declared rate or duration is over the limits."""
    import av

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
        import soxr

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
    import soxr

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
    stateful, so chunk edges leave no clicks, and low-delay: libswresample (through PyAV) holds back
    1-2 ms of audio (`resampler_delay`), where a soxr HQ stream holds about 10 ms and lets it out in
    uneven blocks (40 ms chunks at 24 kHz come out as 30, 30, 30, 61 ms). Within a sample (1/32768)
    of `decode_pcm16`'s soxr HQ away from the stream's two ends. `flush()` returns what the resampler
    holds at the end of the stream.

    lead_in: each stream (after the start or a flush) begins with `resampler_delay` samples of
    silence, so that after every chunk as much audio has come out as went in. A live frame clock needs
    that: a frame whose audio is all in can be made at once, not a chunk later."""

    def __init__(self, sample_rate: int, channels: int = 1, *, lead_in: bool = False):
        if sample_rate <= 0 or channels <= 0:
            raise ValueError(f"bad PCM format: sample_rate={sample_rate}, channels={channels}")
        self.sample_rate = sample_rate
        self.channels = channels
        self.lead_in = lead_in
        self._pending = b""
        self._resampler = self._new_resampler()
        self._started = False

    def _new_resampler(self) -> av.AudioResampler | None:
        import av

        if self.sample_rate == SAMPLE_RATE:
            return None
        return av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)

    def push(self, data: bytes) -> np.ndarray:
        """One chunk of PCM16 LE bytes -> float32 [n] at 16 kHz (n may be 0)."""
        import av

        data = self._pending + data
        whole = len(data) - len(data) % (2 * self.channels)
        self._pending = data[whole:]
        mono = pcm16_to_float(data[:whole], self.channels)
        if self._resampler is None or not mono.size:
            return mono
        frame = av.AudioFrame.from_ndarray(mono[None], format="flt", layout="mono")
        frame.sample_rate = self.sample_rate
        out = self._resampled(frame)
        if self.lead_in and not self._started:
            out = np.concatenate([np.zeros(resampler_delay(self.sample_rate), np.float32), out])
        self._started = True
        return out

    def flush(self) -> np.ndarray:
        """End of stream: float32 [n] at 16 kHz still held by the resampler; then the stream restarts."""
        self._pending = b""
        self._started = False
        if self._resampler is None:
            return np.zeros(0, np.float32)
        tail = self._resampled(None)
        self._resampler = self._new_resampler()
        return tail

    def _resampled(self, frame: av.AudioFrame | None) -> np.ndarray:
        out = [resampled.to_ndarray()[0] for resampled in self._resampler.resample(frame)]
        return np.concatenate(out) if out else np.zeros(0, np.float32)


@functools.lru_cache(maxsize=16)
def resampler_delay(sample_rate: int) -> int:
    """16 kHz samples PcmStream's resampler holds back from `sample_rate` until the stream's end (16 for
    the usual TTS and microphone rates, 32 from 8 kHz); 0 at 16 kHz. Measured on one second of silence."""
    import av

    if sample_rate == SAMPLE_RATE:
        return 0
    resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
    second = av.AudioFrame.from_ndarray(np.zeros((1, sample_rate), np.float32), format="flt", layout="mono")
    second.sample_rate = sample_rate
    return SAMPLE_RATE - sum(frame.samples for frame in resampler.resample(second))


def rms_dbfs(samples: np.ndarray) -> float:
    """Loudness of float32 [N] samples in [-1, 1] as RMS dBFS (a full-scale sine is -3.01 dBFS,
    digital silence is -inf). Use it to detect silence; `load_audio` never rejects it."""
    if samples.size == 0:
        return -math.inf
    rms = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64))))
    return 20.0 * math.log10(rms) if rms > 0 else -math.inf
