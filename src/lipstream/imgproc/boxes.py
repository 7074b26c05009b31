"""Face boxes and crop boxes: validation and the geometry of the blend.

A box is `(x1, y1, x2, y2)` in integer pixels of the full frame, x2/y2 exclusive, as MuseTalk stores
them in coords.pkl and mask_coords.pkl. Crop boxes may extend past the frame edges."""

from __future__ import annotations

from collections.abc import Sequence

Box = tuple[int, int, int, int]
Slices = tuple[slice, slice]


def as_box(value: Sequence[float], what: str = "box") -> Box:
    """Validate a box and return it as four ints. Raises ValueError for malformed, empty or inverted boxes."""
    try:
        coords = [float(v) for v in value]
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be four numbers (x1, y1, x2, y2), got {value!r}") from None
    if len(coords) != 4:
        raise ValueError(f"{what} must be four numbers (x1, y1, x2, y2), got {len(coords)}: {value!r}")
    if not all(c.is_integer() for c in coords):
        raise ValueError(f"{what} must hold whole pixel coordinates, got {value!r}")
    x1, y1, x2, y2 = (int(c) for c in coords)
    if x2 <= x1 or y2 <= y1:
        hint = " (MuseTalk's placeholder for a frame without a face)" if (x1, y1, x2, y2) == (0, 0, 0, 0) else ""
        raise ValueError(f"{what} {(x1, y1, x2, y2)} is empty or inverted{hint}: need x2 > x1 and y2 > y1")
    return x1, y1, x2, y2


def box_size(box: Box) -> tuple[int, int]:
    """(height, width) of a box."""
    return box[3] - box[1], box[2] - box[0]


def blend_region(face_box: Box, crop_box: Box, frame_h: int, frame_w: int) -> tuple[Slices, Slices, Slices] | None:
    """Where a face pasted at `face_box` inside `crop_box` changes a frame of frame_h x frame_w.

    MuseTalk pastes the face into the crop (clipped to the crop), then pastes the crop into the frame
    with the mask (clipped to the frame); outside the face box the crop equals the frame, so the blend
    there is the identity. The pixels that can change are face box ∩ crop box ∩ frame.
    Returns (frame slices, face slices, mask slices) for [y, x] indexing, or None when nothing changes."""
    fx1, fy1, fx2, fy2 = face_box
    cx1, cy1, cx2, cy2 = crop_box
    x1, y1 = max(fx1, cx1, 0), max(fy1, cy1, 0)
    x2, y2 = min(fx2, cx2, frame_w), min(fy2, cy2, frame_h)
    if x2 <= x1 or y2 <= y1:
        return None
    frame = (slice(y1, y2), slice(x1, x2))
    face = (slice(y1 - fy1, y2 - fy1), slice(x1 - fx1, x2 - fx1))
    mask = (slice(y1 - cy1, y2 - cy1), slice(x1 - cx1, x2 - cx1))
    return frame, face, mask
