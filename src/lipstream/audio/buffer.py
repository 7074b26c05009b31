"""Live audio held by position: what an utterance or a feature stream still needs of the samples it
was given, without copying the whole history on every chunk."""

from __future__ import annotations

import numpy as np
from numpy.typing import DTypeLike


class PcmBuffer:
    """A growing run of samples addressed by absolute position (0 = the first sample appended).
    dtype: the samples' type (int16 PCM, or float32 in [-1, 1]); appended samples are cast to it.

    Appending is amortised O(1) (the storage doubles); `release(p)` forgets the samples before p, and
    the storage is compacted once the released part is more than half of it, so a long stream keeps
    only about what is still to be read."""

    def __init__(self, dtype: DTypeLike = np.int16) -> None:
        self._data = np.zeros(4096, dtype)
        self._offset = 0  # index in _data of the first held sample
        self._start = 0  # absolute position of that sample
        self._length = 0  # held samples

    @property
    def start(self) -> int:
        """First position still held."""
        return self._start

    @property
    def end(self) -> int:
        """Samples appended so far (the position after the last one)."""
        return self._start + self._length

    def append(self, samples: np.ndarray) -> None:
        """samples: [n] of the buffer's dtype."""
        n = samples.shape[0]
        if self._offset + self._length + n > self._data.shape[0]:
            capacity = self._data.shape[0]
            while capacity < 2 * (self._length + n):
                capacity *= 2
            grown = np.zeros(capacity, self._data.dtype)
            grown[:self._length] = self._data[self._offset:self._offset + self._length]
            self._data, self._offset = grown, 0
        self._data[self._offset + self._length:self._offset + self._length + n] = samples
        self._length += n

    def read(self, a: int, b: int) -> np.ndarray:
        """A copy of samples [a, b), [b - a] of the buffer's dtype; positions at or past `end` read as zeros."""
        if a < self._start or b < a:
            raise ValueError(f"cannot read [{a}, {b}): samples before {self._start} were released")
        out = np.zeros(b - a, self._data.dtype)
        stop = min(b, self.end)
        if stop > a:
            first = self._offset + a - self._start
            out[:stop - a] = self._data[first:first + stop - a]
        return out

    def release(self, position: int) -> None:
        """Forget the samples before `position`."""
        drop = min(position, self.end) - self._start
        if drop <= 0:
            return
        self._offset += drop
        self._start += drop
        self._length -= drop
        if self._offset > self._data.shape[0] // 2:
            keep = max(4096, 2 * self._length)
            compact = np.zeros(keep, self._data.dtype)
            compact[:self._length] = self._data[self._offset:self._offset + self._length]
            self._data, self._offset = compact, 0
