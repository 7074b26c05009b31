"""The compositor stage: generated faces pasted into the avatar's own frames, as patches.

One `Compositor` per (avatar, device, output height), shared by every session that shows the avatar
at that size. Compositing a face changes only a small rectangle of its frame (the face box where the
blend mask reaches), so the compositor's product is that rectangle, a *patch*: uint8 [PH, PW, 3]
BGR at a fixed size per compositor, placed at a per-frame origin. The rest of a composited frame is
the avatar's own frame, which never changes: idle frames are read from it without a copy, a whole
frame is made only where a consumer needs one (`FacePatch.paste`), and a viewer that already holds
the idle frame needs only the patch (the WebSocket's patch frames).

Sizes: a compositor made with a `size` works at that (streamed) size from the start: the avatar's
frames, boxes and masks are scaled once (area averaging, as a video scaler would), and each face is
resized straight to its scaled face box, so no frame is ever composited at full size and scaled
afterwards. Patches are aligned to 16 pixels with at least 8 pixels of unchanged frame around the
changed area: a JPEG of a patch then has the same 8x8 and 16x16 blocks as a JPEG of its whole frame.

Backends: "opencv" (NumPy frames, uint8 OpenCV code, the CPU's) and "torch" (a batch of patches as
one computation on the compositor's device, the GPU's). On a GPU only the patch-sized parts of the
frames live in device memory (the frame around each face and its mask, uint8), uploaded once on the
stream of the first caller: a 10 s 1080p avatar takes tens of MB there, not GB. Both backends give
the same pixels (the torch one reproduces OpenCV's uint8 arithmetic)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
import torch

from lipstream.avatar.model import Avatar
from lipstream.imgproc import cv_ops, torch_ops
from lipstream.imgproc.boxes import blend_region
from lipstream.imgproc.kernels import resolve_kernel
from lipstream.stream.device import to_device

PATCH_ALIGN = 16  # patch origins and sizes: multiples of the JPEG's largest block (4:2:0 MCU)
PATCH_MARGIN = 8  # unchanged pixels kept around the changed area, at least
SHARPEN = (1.2, 1.0, 5.0)  # the unsharp mask's amount, sigma, threshold (imgproc.composite's defaults)


@dataclass(frozen=True)
class FacePatch:
    """Where a composited frame differs from the avatar's own frame: pixels uint8 [h, w, 3] BGR (host)
    whose top-left corner is at (x, y) of the frame (x, y multiples of 16; h, w up to the compositor's
    patch size, less where the frame ends)."""

    x: int
    y: int
    pixels: np.ndarray

    def paste(self, frame: np.ndarray) -> np.ndarray:
        """A new frame: a copy of `frame` (uint8 [H, W, 3]) with this patch in it."""
        out = frame.copy()
        h, w = self.pixels.shape[:2]
        out[self.y:self.y + h, self.x:self.x + w] = self.pixels
        return out


def output_size(frame_size: tuple[int, int], height: int) -> tuple[int, int]:
    """(height, width) of the streamed frames for frames of `frame_size` (height, width): scaled to
    `height` (0: unscaled), width keeping the aspect ratio; both even, as video encoders need."""
    h, w = frame_size
    if height <= 0 or height == h:
        return h - h % 2, w - w % 2
    return height - height % 2, max(2, round(w * height / h / 2) * 2)


class Compositor:
    """avatar: the frames to paste into. device: "cpu" or a CUDA device. sharpen: the unsharp mask on
    the resized face, this system's addition (MuseTalk's own composition, with it off, only resizes
    and blends). size: (height, width) of the composited frames (None: the avatar's own; streamed
    frames: `output_size`, whose even cut of an odd size crops instead of scaling).
    backend: "opencv" or "torch" (default: OpenCV on the CPU, torch elsewhere).

    Frame index i means cycle frame i mod len(avatar). `frame_size` is the composited frames' size."""

    def __init__(self, avatar: Avatar, device: torch.device | str = "cpu", *, sharpen: bool = True,
                 size: tuple[int, int] | None = None, backend: Literal["opencv", "torch"] | None = None):
        self.avatar = avatar
        self.device = torch.device(device)
        self.sharpen = sharpen
        self.backend = backend or ("opencv" if self.device.type == "cpu" else "torch")
        if self.backend not in ("opencv", "torch") or (self.backend == "opencv" and self.device.type != "cpu"):
            raise ValueError(f"backend {self.backend!r} on {self.device}: use opencv on the CPU, or torch")
        # slot[i]: where cycle frame i is kept. A forward+reversed cycle keeps only its first half.
        self.slot = avatar.mirrored_slots or list(range(len(avatar)))
        kept = max(self.slot) + 1
        self.frame_size = avatar.frame_size if size is None else (int(size[0]), int(size[1]))
        self.frames, face_boxes, crop_boxes, self.masks = _scaled(avatar, kept, self.frame_size)
        self.face_boxes = [tuple(int(v) for v in box) for box in face_boxes]
        self.crop_boxes = [tuple(int(v) for v in box) for box in crop_boxes]
        self.origins, self.patch_size = _patch_layout(self.face_boxes, self.crop_boxes, self.masks, self.frame_size)
        self._sharpen = (resolve_kernel(SHARPEN[1], None, integer=True)[0], SHARPEN[1], SHARPEN[0], SHARPEN[2]) \
            if sharpen else None
        self._tensors: _TensorPatches | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.avatar)

    def _slots(self, indices: Sequence[int]) -> list[int]:
        n = len(self)
        return [self.slot[int(i) % n] for i in indices]

    def key(self, index: int) -> int:
        """The number of the image cycle frame `index` shows (frames of a mirrored cycle share one)."""
        return self.slot[int(index) % len(self)]

    def frame(self, index: int) -> np.ndarray:
        """Cycle frame `index` without a copy: a read-only uint8 [H, W, 3] BGR view."""
        view = self.frames[self.key(index)]
        view.flags.writeable = False
        return view

    def idle(self, indices: Sequence[int]) -> np.ndarray:
        """The avatar's own frames, uint8 [B, H, W, 3] BGR (a new array, safe to modify)."""
        return self.frames[self._slots(indices)]

    def patches(self, indices: Sequence[int], faces: torch.Tensor) -> np.ndarray | torch.Tensor:
        """indices: [B] frame indices; faces: uint8 [B, 256, 256, 3] BGR from an engine (any device).

        Returns the patches uint8 [B, PH, PW, 3] BGR: np.ndarray (opencv backend) or a tensor on the
        compositor's device (torch backend, computed on the current stream). Patch b covers the frame
        from `origins[slot]` (see `patch`); where the frame ends before the patch does, it holds zeros."""
        if faces.ndim != 4 or faces.shape[0] != len(indices) or faces.dtype != torch.uint8:
            raise ValueError(f"faces must be uint8 [{len(indices)}, h, w, 3], got {faces.dtype} {tuple(faces.shape)}")
        slots = self._slots(indices)
        if self.backend == "torch":
            return self.tensors().compose(slots, faces.to(self.device))
        return self._opencv_patches(slots, faces.cpu().numpy())

    def patch(self, index: int, pixels: np.ndarray) -> FacePatch:
        """Frame `index`'s patch from its row of `patches` (on the host), cut to the frame."""
        slot = self.key(index)
        x, y = self.origins[slot]
        h, w = self.frame_size
        return FacePatch(x, y, pixels[:h - y, :w - x])

    def compose(self, indices: Sequence[int], faces: torch.Tensor) -> np.ndarray:
        """Whole composited frames, uint8 [B, H, W, 3] BGR on the host (for writing a video; a live
        session uses `patches`). Only each frame's patch differs from `idle(indices)`."""
        frames = self.idle(indices)
        self.draw(frames, range(len(indices)), indices, faces)
        return frames

    def draw(self, frames: np.ndarray, rows: Sequence[int], indices: Sequence[int], faces: torch.Tensor) -> None:
        """Composite the faces of frames `indices` (as `patches`) into `frames` (uint8 [N, H, W, 3] BGR,
        `idle` frames), rows `rows` of it, in place."""
        patches = self.patches(indices, faces)
        host = patches.cpu().numpy() if isinstance(patches, torch.Tensor) else patches
        for b, (row, index) in enumerate(zip(rows, indices, strict=True)):
            patch = self.patch(index, host[b])
            h, w = patch.pixels.shape[:2]
            frames[row, patch.y:patch.y + h, patch.x:patch.x + w] = patch.pixels

    def tensors(self) -> _TensorPatches:
        """The torch backend's resident data, made (and on a GPU uploaded, on the current stream) on
        first use."""
        with self._lock:
            if self._tensors is None:
                self._tensors = _TensorPatches(self, self.device)
            return self._tensors

    def _opencv_patches(self, slots: list[int], faces: np.ndarray) -> np.ndarray:
        out = np.zeros((len(slots), *self.patch_size, 3), np.uint8)

        def one(b: int) -> None:
            s = slots[b]
            x, y = self.origins[s]
            under = self.frames[s, y:y + self.patch_size[0], x:x + self.patch_size[1]]
            target = out[b, :under.shape[0], :under.shape[1]]
            target[...] = under
            shifted = [(box[0] - x, box[1] - y, box[2] - x, box[3] - y) for box in (self.face_boxes[s], self.crop_boxes[s])]
            cv_ops.composite_frame(target, target, np.ascontiguousarray(faces[b]), shifted[0], self.masks[s],
                                   shifted[1], sharpen_params=self._sharpen)

        cv_ops.for_each_frame(one, len(slots))
        return out


class _TensorPatches:
    """The torch backend's data for one compositor on one device: for each kept frame the frame
    around its patch (uint8 [K, PH, PW, 3]), its blend mask on the patch's grid (uint8 [K, PH, PW];
    0 where the face does not reach), and where each patch position reads the 256x256 face (the
    bilinear sampling onto the face box, extended by the sharpening's reach with OpenCV's
    reflect-101 border)."""

    def __init__(self, compositor: Compositor, device: torch.device):
        ph, pw = compositor.patch_size
        height, width = compositor.frame_size
        kept = compositor.frames.shape[0]
        under = np.zeros((kept, ph, pw, 3), np.uint8)
        masks = np.zeros((kept, ph, pw), np.uint8)
        self.pad = compositor._sharpen[0] // 2 if compositor._sharpen else 0
        self.sharpen = compositor._sharpen
        rows, cols = [], []
        for s in range(kept):
            x, y = compositor.origins[s]
            frame_part = compositor.frames[s, y:y + ph, x:x + pw]
            under[s, :frame_part.shape[0], :frame_part.shape[1]] = frame_part
            face_box, crop_box = compositor.face_boxes[s], compositor.crop_boxes[s]
            # the mask where the face is blended, on the patch's grid (it is 0 outside the patch anyway)
            shifted = [(b[0] - x, b[1] - y, b[2] - x, b[3] - y) for b in (face_box, crop_box)]
            region = blend_region(*shifted, min(ph, height - y), min(pw, width - x))
            if region is not None:
                target, _, mask_part = region
                masks[s][target] = compositor.masks[s][mask_part]
            rows.append((face_box[3] - face_box[1], face_box[1] - y))
            cols.append((face_box[2] - face_box[0], face_box[0] - x))
        self.under = to_device(under, device)
        self.masks = to_device(masks, device)
        self.rows = torch_ops.axis_sampling(256, [h for h, _ in rows], self.pad, "bilinear", device,
                                            shifts=[o for _, o in rows], n=ph + 2 * self.pad)
        self.cols = torch_ops.axis_sampling(256, [w for w, _ in cols], self.pad, "bilinear", device,
                                            shifts=[o for _, o in cols], n=pw + 2 * self.pad)
        self.device = device

    def compose(self, slots: list[int], faces: torch.Tensor) -> torch.Tensor:
        index = to_device(torch.tensor(slots, dtype=torch.long), self.device)
        return torch_ops.composite_on_grid(
            self.under.index_select(0, index), faces.to(torch.float32), self.masks.index_select(0, index),
            self.rows.select(index), self.cols.select(index), sharpen_params=self.sharpen)


def _scaled(avatar: Avatar, kept: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
    """The avatar's first `kept` frames at `size` (height, width) with their boxes and masks: the frames
    area-averaged (cropped by a row or column when `size` is their size cut to even), boxes scaled and
    rounded, masks resized to the scaled crop boxes."""
    h, w = avatar.frame_size
    frames = avatar.frames[:kept]
    if size[0] in (h, h - h % 2) and size[1] in (w, w - w % 2):
        frames = frames[:, :size[0], :size[1]] if size != (h, w) else frames
        return frames, avatar.face_boxes[:kept], avatar.crop_boxes[:kept], list(avatar.masks[:kept])
    sy, sx = size[0] / h, size[1] / w
    interpolation = cv2.INTER_AREA if size[0] < h else cv2.INTER_LINEAR
    frames = np.stack([cv2.resize(f, (size[1], size[0]), interpolation=interpolation) for f in frames])
    scale = np.array([sx, sy, sx, sy])
    face_boxes = np.round(avatar.face_boxes[:kept] * scale).astype(np.int32)
    crop_boxes = np.round(avatar.crop_boxes[:kept] * scale).astype(np.int32)
    for boxes in (face_boxes, crop_boxes):  # never empty
        boxes[:, 2] = np.maximum(boxes[:, 2], boxes[:, 0] + 1)
        boxes[:, 3] = np.maximum(boxes[:, 3], boxes[:, 1] + 1)
    masks = [cv2.resize(m, (int(c[2] - c[0]), int(c[3] - c[1])), interpolation=cv2.INTER_LINEAR)
             for m, c in zip(avatar.masks[:kept], crop_boxes)]
    return frames, face_boxes, crop_boxes, masks


def _patch_layout(face_boxes: list, crop_boxes: list, masks: list, size: tuple[int, int]
                  ) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """Each kept frame's patch origin (x, y) and the patch size (PH, PW) shared by all: the area a face
    changes (cv_ops.changed_region) widened by PATCH_MARGIN, then aligned to PATCH_ALIGN."""
    height, width = size
    areas = []
    for face_box, crop_box, mask in zip(face_boxes, crop_boxes, masks):
        region = cv_ops.changed_region(face_box, mask, crop_box, height, width)
        if region is None:
            areas.append(None)
            continue
        ys, xs = region[0]
        y1 = max(0, ys.start - PATCH_MARGIN) // PATCH_ALIGN * PATCH_ALIGN
        x1 = max(0, xs.start - PATCH_MARGIN) // PATCH_ALIGN * PATCH_ALIGN
        areas.append((x1, y1, xs.stop + PATCH_MARGIN, ys.stop + PATCH_MARGIN))
    found = [a for a in areas if a is not None]
    if not found:
        return [(0, 0)] * len(areas), (PATCH_ALIGN, PATCH_ALIGN)
    ph = -(-max(a[3] - a[1] for a in found) // PATCH_ALIGN) * PATCH_ALIGN
    pw = -(-max(a[2] - a[0] for a in found) // PATCH_ALIGN) * PATCH_ALIGN
    return [(0, 0) if a is None else (a[0], a[1]) for a in areas], (ph, pw)
