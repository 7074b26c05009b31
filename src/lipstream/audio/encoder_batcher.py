"""Whisper encoder passes of many live streams, run as one call.

Every live MuseTalk stream needs one encoder pass per `step_ms` of audio (audio/streaming.py). With
many sessions on one GPU those passes are small and many; `EncoderBatcher.encode` lets concurrent
callers (the scheduler's feature threads) share a call: the first caller waits up to `wait_ms` for
others, runs the encoder once over every waiting request (at most `max_segments` 30 s segments),
and hands each caller its own rows. A caller alone pays at most `wait_ms` more."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch
from torch import nn

from lipstream.audio.features import encode_mels


@dataclass(eq=False)
class _Request:
    mels: torch.Tensor  # [S, 80, 3000]
    steps: torch.Tensor | None = None
    error: BaseException | None = None
    done: bool = False


class EncoderBatcher:
    """encoder: a Whisper encoder on its device. max_segments: most 30 s segments in one call.
    wait_ms: how long the first waiting request waits for others to join. `calls` counts encoder
    calls (for metrics and tests). Thread-safe; one per encoder."""

    def __init__(self, encoder: nn.Module, *, max_segments: int = 32, wait_ms: float = 2.0):
        if max_segments < 1 or wait_ms < 0:
            raise ValueError("max_segments must be >= 1 and wait_ms >= 0")
        self.encoder = encoder
        self.max_segments = max_segments
        self.wait_s = wait_ms / 1000
        self.calls = 0
        self._cond = threading.Condition()
        self._queue: list[_Request] = []
        self._leader = False

    def encode(self, mels: torch.Tensor) -> torch.Tensor:
        """mels: [S, 80, 3000] log-mel segments -> steps [S*1500, H, D], as `encode_mels(mels, encoder)`."""
        request = _Request(mels)
        with self._cond:
            self._queue.append(request)
            self._cond.notify_all()
            while not request.done and self._leader:
                self._cond.wait()
            if request.done:
                return self._result(request)
            self._leader = True
        try:
            while not request.done:  # lead until this caller's own request has run
                self._run(self._gather())
        finally:
            with self._cond:
                self._leader = False
                self._cond.notify_all()
        return self._result(request)

    def _gather(self) -> list[_Request]:
        """Wait up to wait_s for a full batch, then take the oldest requests that fit."""
        deadline = time.monotonic() + self.wait_s
        with self._cond:
            while sum(r.mels.shape[0] for r in self._queue) < self.max_segments:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch, segments = [], 0
            while self._queue and (not batch or segments + self._queue[0].mels.shape[0] <= self.max_segments):
                segments += self._queue[0].mels.shape[0]
                batch.append(self._queue.pop(0))
            return batch

    def _run(self, batch: list[_Request]) -> None:
        try:
            steps = encode_mels(torch.cat([r.mels for r in batch]), self.encoder, batch_segments=self.max_segments)
            per_segment = steps.shape[0] // sum(r.mels.shape[0] for r in batch)
            rows = steps.split([r.mels.shape[0] * per_segment for r in batch])
            for request, part in zip(batch, rows):
                request.steps = part
        except Exception as exc:  # noqa: BLE001 (re-raised in every caller of the batch)
            for request in batch:
                request.error = exc
        finally:
            self.calls += 1
            with self._cond:
                for request in batch:
                    if request.steps is None and request.error is None:  # the leader was interrupted
                        request.error = RuntimeError("the batched encoder pass was interrupted")
                    request.done = True
                self._cond.notify_all()

    @staticmethod
    def _result(request: _Request) -> torch.Tensor:
        if request.error is not None:
            raise request.error
        return request.steps
