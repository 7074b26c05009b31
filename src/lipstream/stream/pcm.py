"""Speech audio as the session holds it: int16 mono 16 kHz samples, converted once on the way in
(and kept in an `audio.buffer.PcmBuffer`)."""

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
