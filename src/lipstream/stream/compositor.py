"""The compositor stage: generated faces pasted into the avatar's own frames.

One `Compositor` per (avatar, device), shared by every session that shows the avatar. It keeps the
avatar's frames, boxes and blend masks resident where compositing runs (GPU memory for a CUDA
device, so no full frame crosses the bus; NumPy for the CPU, where OpenCV does the work)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch

from lipstream.avatar.model import Avatar
from lipstream.imgproc import composite

Frames = np.ndarray | torch.Tensor


class Compositor:
    """avatar: the frames to paste into. device: "cpu" (NumPy/OpenCV, returns np.ndarray) or a CUDA
    device (torch, returns tensors on it). sharpen: the unsharp mask on the resized face, this system's
    addition (MuseTalk's own composition, with it off, only resizes and blends).

    Frame index i means cycle frame i mod len(avatar)."""

    def __init__(self, avatar: Avatar, device: torch.device | str = "cpu", *, sharpen: bool = True):
        self.avatar = avatar
        self.device = torch.device(device)
        self.sharpen = sharpen
        self.face_boxes = [tuple(int(v) for v in box) for box in avatar.face_boxes]
        self.crop_boxes = [tuple(int(v) for v in box) for box in avatar.crop_boxes]
        # slot[i]: where cycle frame i is kept. A forward+reversed cycle keeps only its first half.
        self.slot = avatar.mirrored_slots or list(range(len(avatar)))
        kept = max(self.slot) + 1
        if self.device.type == "cpu":
            self.frames: Frames = avatar.frames[:kept]  # a view: no copy
            self.masks: list = list(avatar.masks[:kept])
        else:
            self.frames = torch.from_numpy(avatar.frames[:kept]).to(self.device)
            self.masks = [torch.from_numpy(m).to(self.device, torch.float32) for m in avatar.masks[:kept]]

    def __len__(self) -> int:
        return len(self.avatar)

    def _cycle(self, indices: Sequence[int]) -> list[int]:
        n = len(self)
        return [int(i) % n for i in indices]

    def idle(self, indices: Sequence[int]) -> Frames:
        """The avatar's own frames, uint8 [B, H, W, 3] BGR (a new array/tensor, safe to modify)."""
        slots = [self.slot[i] for i in self._cycle(indices)]
        if isinstance(self.frames, np.ndarray):
            return self.frames[slots]
        return self.frames[torch.tensor(slots, device=self.device)]

    def frame(self, index: int) -> np.ndarray | torch.Tensor:
        """Cycle frame `index` without a copy, uint8 [H, W, 3] BGR: a read-only view (np.ndarray) on
        the CPU, a view of the resident tensor on a CUDA device (do not write to it)."""
        i = self.slot[int(index) % len(self)]
        if isinstance(self.frames, np.ndarray):
            view = self.frames[i]
            view.flags.writeable = False
            return view
        return self.frames[i]

    def compose(self, indices: Sequence[int], faces: torch.Tensor) -> Frames:
        """indices: [B] frame indices; faces: uint8 [B, 256, 256, 3] BGR from an engine (any device).

        Returns uint8 [B, H, W, 3] BGR frames: np.ndarray for a CPU compositor, else a tensor on
        its device. Only each frame's face box differs from `idle(indices)`."""
        if faces.ndim != 4 or faces.shape[0] != len(indices) or faces.dtype != torch.uint8:
            raise ValueError(f"faces must be uint8 [{len(indices)}, h, w, 3], got {faces.dtype} {tuple(faces.shape)}")
        cycle = self._cycle(indices)
        slots = [self.slot[i] for i in cycle]
        per_frame = ([self.face_boxes[i] for i in cycle], [self.masks[s] for s in slots],
                     [self.crop_boxes[i] for i in cycle])
        if isinstance(self.frames, np.ndarray):
            faces = faces.cpu().numpy()
            step = slots[1] - slots[0] if len(slots) > 1 else 1
            if step and all(b - a == step for a, b in itertools.pairwise(slots)):
                # consecutive cycle frames: read them in place; each new frame is filled in parallel,
                # around its face, as it is composited
                return composite(self.frames[slots[0]::step][:len(slots)], faces, *per_frame, sharpen=self.sharpen)
        else:
            faces = faces.to(self.device)
        frames = self.idle(cycle)
        return composite(frames, faces, *per_frame, sharpen=self.sharpen, out=frames)
