"""An agent's speech as its framework streams it (Pipecat's TTS frames, LiveKit's audio frames): chunks
of 16-bit PCM, each with its own sample rate and channel count, made the float32 mono 16 kHz a session
takes."""

from __future__ import annotations

import numpy as np

from lipstream.audio.load import PcmStream
from lipstream.errors import AudioFormatError

RATES = (8000, 192000)  # the sample rates a chunk may have


class AgentSpeech:
    """One utterance's chunks -> float32 [n] mono 16 kHz, chunk by chunk, through a `PcmStream` with
    `lead_in` (so each chunk's audio comes out as it goes in: its resampler's millisecond of delay is
    a millisecond of silence first). A chunk of another rate or channel count starts a new stream,
    after the old one's tail. `what` names a chunk in the errors ("a TTSAudioRawFrame")."""

    def __init__(self, what: str):
        self.what = what
        self._pcm: PcmStream | None = None

    def push(self, audio: bytes | bytearray | memoryview, rate: int, channels: int) -> np.ndarray:
        """One chunk: 16-bit PCM bytes (interleaved when channels > 1) at `rate` Hz. Returns float32 [n]
        at 16 kHz (n may be 0). AudioFormatError for a chunk that is not that; the stream is unchanged."""
        if not isinstance(audio, bytes | bytearray | memoryview) or not isinstance(channels, int) or channels < 1:
            raise AudioFormatError(f"{self.what} must carry 16-bit PCM bytes with >= 1 channel; got "
                                   f"{type(audio).__name__} with num_channels={channels!r}")
        if len(audio) % (2 * channels):
            raise AudioFormatError(f"{self.what}'s audio is not 16-bit PCM: {len(audio)} bytes is not a whole "
                                   f"number of {channels}-channel samples of 2 bytes; the chunk was dropped")
        if not isinstance(rate, int) or not RATES[0] <= rate <= RATES[1]:
            raise AudioFormatError(f"{self.what}'s sample rate is {rate!r} Hz; lipstream takes "
                                   f"{RATES[0]}..{RATES[1]} Hz")
        tail = np.zeros(0, np.float32)
        if self._pcm is not None and (self._pcm.sample_rate, self._pcm.channels) != (rate, channels):
            tail = self.flush()
        if self._pcm is None:
            self._pcm = PcmStream(rate, channels, lead_in=True)
        return np.concatenate([tail, self._pcm.push(bytes(audio))])

    def flush(self) -> np.ndarray:
        """The end of the utterance: float32 [n] at 16 kHz the resampler still held (empty when none)."""
        pcm, self._pcm = self._pcm, None
        return pcm.flush() if pcm is not None else np.zeros(0, np.float32)

    def reset(self) -> None:
        """Forget the utterance (an interruption): its held audio is dropped."""
        self._pcm = None
