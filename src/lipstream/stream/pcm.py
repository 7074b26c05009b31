"""Speech audio as the session holds it: int16 mono 16 kHz samples, converted once on the way in."""

from __future__ import annotations

import numpy as np


def to_pcm16(samples: np.ndarray) -> np.ndarray:
    """int16 [n] as is, or float32 [n] in [-1, 1] -> int16 [n] (x * 32768, rounded and clipped: the
    inverse of the x / 32768 the feature streams apply to int16). Other dtypes or shapes: ValueError."""
    samples = np.asarray(samples)
    if samples.ndim != 1 or samples.dtype not in (np.int16, np.float32):
        raise ValueError(f"audio must be int16 or float32 [n] mono 16 kHz, got {samples.dtype} {samples.shape}")
    if samples.dtype == np.int16:
        return samples
    return np.clip(np.rint(samples * 32768.0), -32768, 32767).astype(np.int16)


class PcmBuffer:
    """A growing run of int16 samples addressed by absolute position (0 = the first sample appended).

    Appending is amortised O(1) (the storage doubles); `release(p)` forgets the samples before p, and
    the storage is compacted once the released part is more than half of it, so a long stream keeps
    only about what is still to be read."""

    def __init__(self) -> None:
        self._data = np.zeros(4096, np.int16)
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
        """samples: int16 [n]."""
        n = samples.shape[0]
        if self._offset + self._length + n > self._data.shape[0]:
            capacity = self._data.shape[0]
            while capacity < 2 * (self._length + n):
                capacity *= 2
            grown = np.zeros(capacity, np.int16)
            grown[:self._length] = self._data[self._offset:self._offset + self._length]
            self._data, self._offset = grown, 0
        self._data[self._offset + self._length:self._offset + self._length + n] = samples
        self._length += n

    def read(self, a: int, b: int) -> np.ndarray:
        """A copy of samples [a, b), int16 [b - a]; positions at or past `end` read as zeros."""
        if a < self._start or b < a:
            raise ValueError(f"cannot read [{a}, {b}): samples before {self._start} were released")
        out = np.zeros(b - a, np.int16)
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
            compact = np.zeros(keep, np.int16)
            compact[:self._length] = self._data[self._offset:self._offset + self._length]
            self._data, self._offset = compact, 0
