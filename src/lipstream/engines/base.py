"""The engine interface: what the rest of lipstream calls without knowing which engine runs."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch


class Engine(ABC):
    """Turns per-frame conditioning plus an avatar's material into face crops, on `device`.

    name: the engine's id ("musetalk", ...). device/dtype: where and in which precision it computes.
    Engines are stateless between calls; one engine may serve many sessions (batched together)."""

    name: ClassVar[str]

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device = device
        self.dtype = dtype

    @abstractmethod
    def generate(self, latents: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """One batch of frames.

        latents: [B, 8, 32, 32], the avatar's material for each frame.
        audio: float [B, 50, 384], whisper window features for each frame (no positional encoding).
        Returns faces: uint8 [B, 256, 256, 3] BGR, contiguous, on `device`."""
