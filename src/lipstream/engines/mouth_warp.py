"""The `warp` engine's image step: one 256x256 face crop + its face-mesh landmarks + its teeth + a
mouth state (open, wide, round; mouth_features.py) -> the face speaking that state.

Geometry is in the mouth frame (mouth_geometry.py: half mouth widths, y down the face, the seam
between the inner lips). A displacement field, computed only over the region it can reach, moves

  - open > 0: the inner lips apart by `opening` at the centre, OPEN_APERTURE further than the
    avatar's own gap at open=1 (a jaw drops as far from a smile with parted lips as from closed
    lips). The upper lip rises by UPPER_SHARE of it (fading to nothing at the base of the nose); the
    jaw drops by JAW_SHARE of it (as far as the crop leaves room below the chin), and the lower lip by
    the rest on top of the jaw (fading by the chin). The jaw's moving part is lens-shaped at the lips
    (the corners stay) and widens into a block towards the chin, within the face oval; it moves whole
    down to where the rows left below the chin must take its drop up, and from there its motion falls
    off linearly to the crop's bottom rows (`_Jaw`), so the neck there is squeezed (at most
    1/(1-SQUEEZE) times), never folded or torn;
  - open < 0: the lips towards each other: they close their own gap and press together by PRESS,
    the lower half of it with the jaw rising by JAW_SHARE of its part;
  - wide / round: the corners out / in, fading with distance;

and cv2.remap samples the crop through it. The new opening between the moved lips is drawn by
mouth_interior.py: the avatar's own teeth and mouth where its lips are apart (they move with the
lips they sit under; the lower row first comes out from behind the upper one, so the first OVERBITE
of the new gap, less towards the corners, shows the seam's row drawn out (where a smile's teeth
meet), and the dark mouth opens only past it), else its teeth texture (its own, from another frame, or drawn), over a
depth-shaded cavity. The field is exactly zero above the base of the nose, in the crop's border band
(EDGE pixels at the top and sides, BOTTOM_STILL rows at the bottom) and outside the face oval's
reach; a zero state returns the crop unchanged, byte for byte."""

from __future__ import annotations

import cv2
import numpy as np

from lipstream.avatar.landmarks import CHIN, LIPS_OUTER
from lipstream.engines.mouth_geometry import MouthFrame, mouth_frame
from lipstream.engines.mouth_interior import Teeth, paint_opening

CROP = 256
OPEN_APERTURE = 0.5  # open=1 parts the inner lips this much further than the avatar's own, half mouth widths
UPPER_SHARE, JAW_SHARE = 0.15, 0.55  # of the opening: the upper lip's rise, the jaw's drop
PRESS = 0.05  # at open=-1 the lips close their gap and press together by this much
WIDEN, NARROW = 0.12, 0.18  # corner motion at wide=1 / round=1
LENS_FLAT, JAW_FLAT = 0.35, 0.7  # the motion is full over this share of its half width: lips, chin
JAW_WIDENING = 0.6  # the jaw's moving part widens by this much per half mouth width below the seam
OVAL_SHARE = 0.9  # ... but stays within this share of the face oval's half width
OVAL_ABOVE_CHIN = 0.3  # below this height above the chin the oval's width is held (it ends at the chin)
SQUEEZE = 0.75  # the steepest the jaw's fade below the chin may get (pixels of motion per pixel)
JAW_BEND = 4.0  # pixels over which the jaw's whole drop bends into that fade
SIDE_REACH = 1.9  # the corners' motion fades to zero this far from the centre
EDGE = 16  # pixels along the crop's top and sides that never move (the field fades in over the next EDGE)
BOTTOM_STILL = 2  # rows at the crop's bottom that never move
OWN_TEETH = 0.12  # inner lips this far apart (half mouth widths) show the avatar's own teeth
OVERBITE = 0.08  # ... whose lower row comes out from behind the upper one over this much of the opening


def _fall(t: np.ndarray, full: float, zero: float) -> np.ndarray:
    """1 up to `full`, 0 from `zero` on, a smoothstep between (works in either direction); its
    steepest slope is 1.5 / |zero - full|."""
    u = np.clip((t - full) * np.float32(1.0 / (zero - full)), 0.0, 1.0)
    return 1.0 - u * u * (3.0 - 2.0 * u)


class _Jaw:
    """How far the jaw can move in one crop. A drop is whole down to where the rows left above the
    crop's last moving row (end_row) must take it up; from there it falls off linearly, SQUEEZE pixels
    per pixel (the neck is squeezed, never folded), through a rounded bend JAW_BEND pixels long.
    max_drop (half mouth widths): the largest drop that still moves the chin (nearly) whole."""

    def __init__(self, frame: MouthFrame, landmarks: np.ndarray):
        self.scale = frame.scale
        self.end_row = float(CROP - 1 - BOTTOM_STILL)
        self.max_drop = SQUEEZE * max(self.end_row - float(landmarks[CHIN, 1]), 0.0) / frame.scale

    def drop_at(self, drop: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """A wanted drop (half mouth widths; < 0: the jaw rises) at pixel rows -> the drop there."""
        want = np.abs(drop) * self.scale  # pixels
        above = np.maximum(self.end_row - rows, 0.0)  # pixels above the last moving row
        reach = want * np.float32(1.0 / SQUEEZE)  # the linear part's length
        bend = np.maximum(np.minimum(reach, JAW_BEND), 1e-6)
        rounded = want - SQUEEZE * np.square(reach + bend - above) / (4.0 * bend)
        moved = np.where(above <= reach - bend, SQUEEZE * above, np.where(above >= reach + bend, want, rounded))
        return np.copysign(moved, drop) * np.float32(1.0 / self.scale)


def _region(frame: MouthFrame, reach: float) -> tuple[int, int, int, int]:
    """The crop pixels the field can reach, (x0, y0, x1, y1), within the moving part of the crop."""
    corners = frame.to_pixels(np.array([-reach, reach, -reach, reach]),
                              np.array([frame.nose_y, frame.nose_y, frame.chin_y, frame.chin_y]))
    x0, y0 = np.floor(corners.min(0)).astype(int)
    x1 = int(np.ceil(corners[:, 0].max())) + 1
    return max(x0, EDGE), max(y0, EDGE), min(x1, CROP - EDGE), CROP - BOTTOM_STILL


def lip_colour(crop: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """Mean BGR colour (float32 [3]) of the crop at the outer lip contour."""
    points = np.clip(np.round(landmarks[list(LIPS_OUTER)]).astype(int), 0, CROP - 1)
    return crop[points[:, 1], points[:, 0]].astype(np.float32).mean(0)


def warp_mouth(crop: np.ndarray, landmarks: np.ndarray, state: np.ndarray, teeth: Teeth) -> np.ndarray:
    """crop: uint8 [256, 256, 3] BGR; landmarks: float32 [478, 2] in crop pixels; state: [3] (open in
    [-1, 1], wide, round in [0, 1]); teeth: the avatar's teeth (mouth_interior.Teeth). Returns a new
    uint8 [256, 256, 3] BGR face (the crop itself when the state is 0)."""
    open_, wide, rounded = (float(v) for v in state)
    out = crop.copy()
    if open_ == wide == rounded == 0:
        return out
    frame = mouth_frame(landmarks)
    jaw = _Jaw(frame, landmarks)
    width = 1.0 + WIDEN * wide - NARROW * rounded  # where the corners go, in half mouth widths
    reach = max(SIDE_REACH, width * (1.0 + JAW_WIDENING * (frame.chin_y - frame.seam(np.zeros(1))[0])))
    x0, y0, x1, y1 = _region(frame, reach)
    if x1 <= x0 or y1 <= y0:
        return out
    columns, rows = np.arange(x0, x1, dtype=np.float32), np.arange(y0, y1, dtype=np.float32)
    pixels = np.stack(np.meshgrid(columns, rows), -1)
    x, y = frame.to_local(pixels)
    s = y - frame.seam(x)  # height below the seam
    dx, dy_upper, dy_lower = _motion(frame, jaw, pixels, x, y, s, open_, width)
    middle = (dy_upper + dy_lower) / 2  # where closing lips meet
    dy = np.where(s < np.minimum(dy_upper, middle), dy_upper,
                  np.where(s >= np.maximum(dy_lower, middle), dy_lower, s))  # in the opening: the seam
    shift = frame.scale * (dx[..., None] * frame.axis_x + dy[..., None] * frame.axis_y)
    maps = pixels - shift.astype(np.float32)
    region = cv2.remap(crop, maps[..., 0], maps[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    own = frame.lips_apart >= OWN_TEETH  # the crop shows its own teeth: they moved with the lips
    tips = OVERBITE * _fall(np.abs(x) / width, LENS_FLAT, 1.0) if own else 0.0  # as much less at the sides
    a, b = s - dy_upper, dy_lower - s - tips  # below the upper lip's inner edge, above the lower lip's
    alpha = np.clip(np.minimum(a, b) * frame.scale + 0.5, 0.0, 1.0)
    alpha *= np.clip((dy_lower - dy_upper - tips) * frame.scale, 0.0, 1.0)  # no opening, no interior
    if alpha.any():
        region = paint_opening(region.astype(np.float32), alpha, lip_colour(crop, landmarks), x / width, a, b,
                               frame.scale, None if own else teeth)
    out[y0:y1, x0:x1] = region
    return out


def _motion(frame: MouthFrame, jaw: _Jaw, pixels: np.ndarray, x: np.ndarray, y: np.ndarray, s: np.ndarray,
            open_: float, width: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """At output points (pixels [h, w, 2]; local x, y; s: y below the seam): the corners' sideways
    motion dx and the downward motion of what lies above the seam (dy_upper) and below it (dy_lower),
    all in half mouth widths."""
    opening, closing = max(open_, 0.0), max(-open_, 0.0)
    grow = opening * OPEN_APERTURE
    rise = UPPER_SHARE * grow
    lift = JAW_SHARE * closing * (frame.lips_apart + PRESS) / 2  # closing lips: the jaw rises with them
    drop = min(JAW_SHARE * grow, jaw.max_drop) - lift
    lip_drop = grow - rise - drop - lift  # the lower lip's own part, on top of the jaw
    # nothing moves on the crop's top and side borders (EDGE pixels), then the field fades in over EDGE
    border = np.minimum(np.minimum(pixels[..., 0], CROP - 1 - pixels[..., 0]), pixels[..., 1])
    movable = _fall(border, 2 * EDGE, EDGE)
    lens = _fall(np.abs(x) / width, LENS_FLAT, 1.0)  # the lips' opening, zero at the corners
    press = closing * (frame.gap(x) + PRESS * lens) / 2
    upper_fade = _fall(y, frame.lip_top_y, frame.nose_y) * (y >= frame.nose_y) * movable
    dy_upper = (press - rise * lens) * upper_fade
    # the jaw: lens-shaped at the lips, a block at the chin, within the face oval, fading below the chin
    depth = np.maximum(s, 0.0)
    to_chin = np.clip(depth / max(frame.chin_y - frame.seam(np.zeros(1))[0], 1e-3), 0.0, 1.0)
    oval = OVAL_SHARE * frame.oval(x, np.minimum(y, frame.chin_y - OVAL_ABOVE_CHIN))
    jaw_width = np.minimum(width * (1.0 + JAW_WIDENING * depth), np.maximum(oval, width))
    block = _fall(np.abs(x) / jaw_width, LENS_FLAT + (JAW_FLAT - LENS_FLAT) * to_chin, 1.0)
    jaw_drop = jaw.drop_at(drop * block, pixels[..., 1])
    lip_own = lip_drop * lens - np.maximum(press - lift * block, 0.0)
    # the lower lip's own motion fades out half-way from the lip to the chin, both where they were
    # before it moved: the moved lip keeps its shape, the skin below it gives way
    lip_fade = _fall(y - jaw_drop - lip_own, frame.lip_bottom_y, (frame.lip_bottom_y + frame.chin_y) / 2)
    dy_lower = (jaw_drop + lip_own * lip_fade) * movable
    # corners in/out: x scaled about the centre, fading away from the mouth and towards nose and chin
    side = _fall(np.abs(x), 1.0, SIDE_REACH) / float(_fall(np.array(1.0), 1.0, SIDE_REACH))
    dx = (width - 1.0) * x * side * upper_fade * lip_fade
    return dx, dy_upper, dy_lower
