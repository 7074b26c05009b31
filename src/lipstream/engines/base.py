"""The engine interface: what the rest of lipstream calls without knowing which engine runs.

An engine turns per-frame audio conditioning plus an avatar's per-frame material into 256x256 face
crops, which the compositor pastes into the avatar's frames:

    material = engine.material(avatar)                # once per avatar: {key: [N, ...]} on device
    cond = engine.features(audio, fps)                 # a whole clip: [F, ...] on device
    stream = engine.feature_stream(fps)                # or live: push(chunk) -> [k, ...] as ready
    faces = engine.generate(take(material, idx), cond) # uint8 [B, 256, 256, 3] BGR on device

Batches may mix avatars and sessions: `gather` takes each frame's row of its avatar's material (one
index per avatar, not one per frame). Live feature passes of many streams go through
`engine.feature_passes`, which an engine may run as one batched call."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar, Protocol

import numpy as np
import torch

if TYPE_CHECKING:
    from lipstream.avatar.model import Avatar

# Per-frame material of one avatar: every value has the cycle length N (or the batch size B) first.
Material = dict[str, torch.Tensor]


def take(material: Mapping[str, torch.Tensor], index: torch.Tensor | Sequence[int]) -> Material:
    """The material of the cycle frames `index` ([B] ints): {key: value[index]}."""
    index = torch.as_tensor(index, dtype=torch.long)
    return {key: value[index.to(value.device)] for key, value in material.items()}


def concat(materials: Sequence[Mapping[str, torch.Tensor]]) -> Material:
    """Several batches' material joined along the batch dimension (same keys in all)."""
    return {key: torch.cat([m[key] for m in materials]) for key in materials[0]}


def gather(rows: Sequence[tuple[Mapping[str, torch.Tensor], int]], device: torch.device) -> Material:
    """The material of a batch: rows[i] = (an avatar's material, a cycle frame of it). Frames of the
    same material are taken with one index, staged through pinned memory on a CUDA device (see
    `stream.device.to_device`); the parts are joined in row order."""
    from lipstream.stream.device import to_device

    groups: dict[int, tuple[Mapping[str, torch.Tensor], list[int], list[int]]] = {}
    for position, (material, frame) in enumerate(rows):
        groups.setdefault(id(material), (material, [], []))[1].append(frame)
        groups[id(material)][2].append(position)
    parts, order = [], []
    for material, frames, positions in groups.values():
        index = to_device(torch.tensor(frames, dtype=torch.long), device)
        parts.append({key: value.index_select(0, index) for key, value in material.items()})
        order += positions
    batch = parts[0] if len(parts) == 1 else concat(parts)
    if order == sorted(order):
        return batch
    inverse = to_device(torch.tensor(np.argsort(order), dtype=torch.long), device)
    return {key: value.index_select(0, inverse) for key, value in batch.items()}


class FeatureStream(Protocol):
    """Live audio in, per-frame conditioning out, one per audio stream (see audio/streaming.py)."""

    fps: int

    def push(self, samples: np.ndarray) -> torch.Tensor:
        """samples: float32 [n] in [-1, 1] or int16 [n], mono 16 kHz. Returns the frames [k, ...] that
        became ready (k may be 0), in order."""

    def flush(self) -> torch.Tensor:
        """End of speech: the remaining frames, so that floor(samples/16000*fps) came out in all."""

    def reset(self) -> None:
        """Forget everything; the next push starts frame 0 of a new utterance."""

    def start_lead_s(self, received: int) -> float:
        """With `received` samples of the utterance in and frame 0 just out: how much later than frame 0
        alone needs, the utterance should start so that the frames after it, coming out as the rest
        of the audio arrives in real time, are never later relative to their display than frame 0 (a
        stream that emits frames in groups makes the first of a group wait for the group's last)."""


class Engine(ABC):
    """name: the engine's id ("musetalk", "warp"). device/dtype: where and in which precision it
    computes. Engines hold no per-session state; one engine serves many sessions, batched."""

    name: ClassVar[str]
    # How long after its audio falls silent a frame still gets a generated face (the hangover of the
    # silence gate, `audio.gate`): the time the engine takes to bring the mouth back to rest. After it,
    # the avatar's own frame is shown, pixel for pixel.
    silence_hangover_ms: ClassVar[float] = 80.0
    # Intra-op threads the engine's torch work wants on a CPU device (None: torch's default, every core).
    # An engine whose work is NumPy/OpenCV, torch only moving rows, wants 1: a parallel region for a
    # small copy makes its threads spin, and on a busy machine that costs more than the copy.
    torch_threads: ClassVar[int | None] = None

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device = device
        self.dtype = dtype

    @abstractmethod
    def material(self, avatar: Avatar) -> Material:
        """What this engine needs of each cycle frame of `avatar`, on `device` (computed once)."""

    @abstractmethod
    def features(self, audio: np.ndarray, fps: int = 25) -> torch.Tensor:
        """Conditioning for a whole clip: float32 [S] 16 kHz mono -> [floor(S/16000*fps), ...]."""

    @abstractmethod
    def feature_stream(self, fps: int = 25) -> FeatureStream:
        """A live form of `features`, for one audio stream."""

    def warmup(self, max_batch: int) -> None:
        """Prepare every batch size up to `max_batch` before the first session (compile it, capture its
        CUDA graphs, let cuDNN measure its convolutions). The scheduler calls it on the thread that
        will run `generate`: graph state is per thread."""

    def feature_passes(self, passes: Sequence[tuple[FeatureStream, np.ndarray | None]]
                       ) -> list[torch.Tensor | Exception]:
        """One live feature pass for each (stream, audio) pair: `stream.push(audio)`, or
        `stream.flush()` for None. Returns each pass's frames, or the exception it raised (one
        stream's failure is not the others'). Engines whose passes share a model override this to run
        them as one batched call."""
        results: list[torch.Tensor | Exception] = []
        for stream, samples in passes:
            try:
                results.append(stream.flush() if samples is None else stream.push(samples))
            except Exception as exc:  # noqa: BLE001 (handed to that stream's caller)
                results.append(exc)
        return results

    @abstractmethod
    def generate(self, material: Mapping[str, torch.Tensor], conditioning: torch.Tensor) -> torch.Tensor:
        """One batch: material values [B, ...] (from `take`), conditioning [B, ...] (from `features`).
        Returns faces: uint8 [B, 256, 256, 3] BGR, contiguous, on `device`."""
