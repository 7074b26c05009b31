"""One utterance of a session: its audio as pushed, its per-frame features and voicing, its frames' work.

Utterance frame j owns the utterance's samples [floor(j*16000/fps), floor((j+1)*16000/fps)); a
`VoiceGate` says which frames are voiced: only those go to the engine, the others show the avatar's
own frame."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np
import torch

from lipstream.audio.buffer import PcmBuffer
from lipstream.audio.gate import VoiceGate
from lipstream.audio.load import SAMPLE_RATE


class Utterance:
    """State of one utterance; the session drives it. Times are on the session clock."""

    def __init__(self, fps: int, silence_dbfs: float, hangover: int):
        self.fps = fps
        self.gate = VoiceGate(hangover, silence_dbfs)
        self.pcm = PcmBuffer()
        self.fed = 0  # samples handed to the feature stream
        self.ended = False  # end_speech() was called
        self.flush_sent = False  # the feature stream's flush() was started
        self.flushed = False  # every frame's features are known
        self.cancelled = False  # interrupted or closed: late results are thrown away
        self.featured = 0  # frames whose features (and voicing) are known
        self.submitted = 0  # frames handed to the scheduler (voiced) or passed over (silent)
        self.next_j = 0  # next frame to show
        self.played = 0  # samples played
        self.c0: int | None = None  # cycle frame of frame 0, fixed when frame 0 is submitted
        self.started = False
        self.conditioning: dict[int, torch.Tensor] = {}  # j -> its conditioning row (device), until shown
        self.voiced: dict[int, bool] = {}  # j -> voiced, until shown
        self.futures: dict[int, asyncio.Future] = {}  # j -> the scheduler's result, until shown
        self.first_push_at: float | None = None  # arrival of the first audio
        self.last_push_at: float | None = None  # arrival of the latest audio
        self.ended_at: float | None = None
        self.frame0_input_at: float | None = None  # arrival of the audio that completed frame 0's features
        self.frame0_featured_at: float | None = None  # when frame 0's features came back

    def append(self, pcm: np.ndarray, now: float) -> None:
        """pcm: int16 [n] arriving at `now`."""
        self.pcm.append(pcm)
        if self.first_push_at is None:
            self.first_push_at = now
        self.last_push_at = now

    @property
    def queued_samples(self) -> int:
        """Samples pushed but not played yet."""
        return self.pcm.end - self.played

    def add_features(self, rows: Sequence[torch.Tensor], input_at: float | None, now: float) -> None:
        """rows: the conditioning of frames [featured, featured + k), one per frame, in order (held, never
        computed with here); input_at: arrival time of the newest audio they were computed from; now:
        when they came."""
        if rows and self.featured == 0:
            self.frame0_input_at, self.frame0_featured_at = input_at, now
        for row in rows:
            j = self.featured
            self.voiced[j] = self.gate(self.pcm.read(j * SAMPLE_RATE // self.fps, (j + 1) * SAMPLE_RATE // self.fps))
            self.conditioning[j] = row
            self.featured += 1
        self._release()

    def take_audio(self, n: int) -> np.ndarray:
        """The next n samples to play, int16 [n] (zeros past the end of the audio)."""
        audio = self.pcm.read(self.played, self.played + n)
        self.played = min(self.played + n, self.pcm.end)
        self._release()
        return audio

    def finished(self) -> bool:
        """All its frames shown and all its audio played."""
        return self.flushed and self.next_j >= self.featured and self.played >= self.pcm.end

    def withdraw_frames(self) -> None:
        """Cancel the frames submitted to the scheduler and forget them."""
        for future in self.futures.values():
            future.cancel()
        self.futures.clear()

    def cancel(self) -> None:
        """Interrupted or closed: withdraw its frames and forget its data."""
        self.cancelled = True
        self.withdraw_frames()
        self.conditioning.clear()
        self.voiced.clear()

    def _release(self) -> None:
        gate = self.featured * SAMPLE_RATE // self.fps
        self.pcm.release(min(self.fed, self.played, gate))
