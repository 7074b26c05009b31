"""The `warp` engine's image step: one 256x256 face crop + its face-mesh landmarks + a mouth state
(open, wide, round) -> the face with the mouth opened, widened or rounded.

Geometry lives in a mouth frame from the landmarks: origin between the mouth corners, x along the
line from corner to corner, y perpendicular to it (down), both in half mouth widths; the "seam" is
the midline between the inner lip contours. A displacement field moves
  - the lower lip, lower teeth and jaw down by up to OPEN_LOWER (the chin less: the motion fades out
    a little below the chin, or before the crop's border band),
  - the upper lip up by up to OPEN_UPPER (fading to nothing at the base of the nose),
  - the corners out (wide) or in (round), fading with distance,
in a lens-shaped profile between the corners, and cv2.remap samples the crop through it. Between the
moved lips lies the mouth's interior: filled with the avatar's lip colour, darkened, with anti-aliased
edges (and a hint of upper teeth where the photo's lips are closed). The field is exactly zero above
the base of the nose, in the crop's border band (EDGE pixels) and beyond the jaw, and only a region
around the mouth is computed at all: the rest of the face is copied as is. A zero state returns the
crop unchanged, byte for byte."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from lipstream.avatar.landmarks import (
    CHIN,
    LIPS_OUTER,
    LOWER_LIP_INNER,
    MOUTH_LEFT,
    MOUTH_RIGHT,
    UPPER_LIP_INNER,
)

CROP = 256
# the inner lip contours from corner (78) to corner (308); point i of one faces point i of the other
UPPER_INNER = (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308)
LOWER_INNER = (78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308)
UPPER_OUTER_TOP = 0  # top of the upper lip's outer edge (Cupid's bow)
NOSE_BASE = 2  # subnasale: nothing at or above it moves

OPEN_LOWER = 0.34  # lower lip drop at open=1, in half mouth widths
OPEN_UPPER = 0.10  # upper lip lift at open=1
WIDEN, NARROW = 0.12, 0.18  # corner motion at wide=1 / round=1
LENS_FLAT = 0.35  # the opening is full height over this fraction of its half width
JAW_WIDENING = 0.6  # the jaw's moving part widens by this much per half mouth width of depth
JAW_HOLD = 0.4  # the jaw moves fully down to this fraction of JAW_END, then fades
JAW_BELOW_CHIN = 0.3  # JAW_END: this far below the chin (or EDGE before the crop's bottom)
SIDE_REACH = 1.9  # the corners' motion fades to zero this far from the centre
EDGE = 16  # pixels along the crop's border that never move (the field fades in over the next EDGE)
INTERIOR_SHADE = (0.55, 0.25)  # interior brightness vs the lips' colour: at the lips, in the middle
INTERIOR_TINT = np.float32([0.7, 0.7, 1.0])  # BGR: the interior is redder than the lips
LIPS_CLOSED = 0.08  # inner lips closer than this (half mouth widths): the photo shows no teeth, draw some
TEETH_HEIGHT, TEETH_MAX = 0.3, 0.1  # the teeth band: this share of the opening, at most this high
TEETH_BRIGHTNESS = 1.05  # teeth grey vs the lips' brightest channel


@dataclass(frozen=True)
class MouthFrame:
    """The mouth's coordinate frame in crop pixels (see the module doc). Local coordinates are in half
    mouth widths from the point between the corners, y down the face. seam_x/seam_y: the inner-lip
    midline (sorted by x). nose_y, lip_top_y, jaw_hold_y, jaw_end_y: local heights of the base of the
    nose, the top of the upper lip, where the jaw starts to fade and where it stops moving."""

    origin: np.ndarray  # [2] pixels
    axis_x: np.ndarray  # [2] unit vector, left corner -> right corner
    axis_y: np.ndarray  # [2] unit vector, down the face
    scale: float  # half mouth width, pixels
    seam_x: np.ndarray
    seam_y: np.ndarray
    nose_y: float
    lip_top_y: float
    jaw_hold_y: float
    jaw_end_y: float
    lips_apart: float  # inner-lip gap at the centre (13 to 14), half mouth widths

    def to_local(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[..., 2] pixel points -> local (x, y)."""
        d = (points - self.origin) / self.scale
        return d @ self.axis_x, d @ self.axis_y

    def to_pixels(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Local (x, y) -> [..., 2] pixel points."""
        return self.origin + self.scale * (np.multiply.outer(x, self.axis_x)
                                           + np.multiply.outer(y, self.axis_y))

    def seam(self, x: np.ndarray) -> np.ndarray:
        """Local height of the inner-lip midline at local x (level beyond the corners)."""
        return np.interp(x, self.seam_x, self.seam_y)

    def reach(self) -> float:
        """How far sideways (local |x|) the field can be non-zero."""
        return max(SIDE_REACH, (1 + WIDEN) * (1 + JAW_WIDENING * (self.jaw_end_y - self.seam_y.min())))


def mouth_frame(landmarks: np.ndarray) -> MouthFrame:
    """The mouth frame of one face: landmarks float32 [478, 2] in crop pixels."""
    points = landmarks.astype(np.float64)
    left, right = points[MOUTH_LEFT], points[MOUTH_RIGHT]
    scale = float(np.hypot(*(right - left))) / 2
    if scale < 2:
        raise ValueError(f"mouth corners {left} and {right} are too close for a mouth")
    axis_x = (right - left) / (2 * scale)
    axis_y = np.array([-axis_x[1], axis_x[0]])
    origin = (left + right) / 2
    x, y = ((points - origin) / scale) @ axis_x, ((points - origin) / scale) @ axis_y
    upper, lower = list(UPPER_INNER), list(LOWER_INNER)
    seam_x, seam_y = (x[upper] + x[lower]) / 2, (y[upper] + y[lower]) / 2
    order = np.argsort(seam_x)
    seam_x, seam_y = seam_x[order], seam_y[order]
    seam = float(np.interp(0.0, seam_x, seam_y))
    crop_bottom = float(((CROP - 2 * EDGE - origin) / scale) @ axis_y)  # the crop's still border band
    jaw_end = max(min(y[CHIN] + JAW_BELOW_CHIN, crop_bottom), seam + 0.2)
    lip_top = min(y[UPPER_OUTER_TOP], seam - 0.05)
    return MouthFrame(origin, axis_x, axis_y, scale, seam_x, seam_y, nose_y=min(y[NOSE_BASE], lip_top - 0.05),
                      lip_top_y=lip_top, jaw_hold_y=seam + JAW_HOLD * (jaw_end - seam), jaw_end_y=jaw_end,
                      lips_apart=float(np.hypot(x[LOWER_LIP_INNER] - x[UPPER_LIP_INNER],
                                                y[LOWER_LIP_INNER] - y[UPPER_LIP_INNER])))


def _fall(t: np.ndarray, full: float, zero: float) -> np.ndarray:
    """1 up to `full`, 0 from `zero` on, a half cosine between (works in either direction)."""
    u = np.clip((t - full) / (zero - full), 0.0, 1.0)
    return 0.5 + 0.5 * np.cos(np.pi * u)


def _region(frame: MouthFrame) -> tuple[int, int, int, int]:
    """The crop pixels the field can reach, (x0, y0, x1, y1), clipped to the moving part of the crop."""
    reach = frame.reach()
    corners = frame.to_pixels(np.array([-reach, reach, -reach, reach]),
                              np.array([frame.nose_y, frame.nose_y, frame.jaw_end_y, frame.jaw_end_y]))
    x0, y0 = np.floor(corners.min(0)).astype(int)
    x1, y1 = np.ceil(corners.max(0)).astype(int) + 1
    return max(x0, EDGE), max(y0, EDGE), min(x1, CROP - EDGE), min(y1, CROP - EDGE)


def lip_colour(crop: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """Mean BGR colour (float32 [3]) of the crop at the outer lip contour."""
    points = np.clip(np.round(landmarks[list(LIPS_OUTER)]).astype(int), 0, CROP - 1)
    return crop[points[:, 1], points[:, 0]].astype(np.float32).mean(0)


def warp_mouth(crop: np.ndarray, landmarks: np.ndarray, state: np.ndarray) -> np.ndarray:
    """crop: uint8 [256, 256, 3] BGR; landmarks: float32 [478, 2] in crop pixels; state: [3] (open, wide,
    round) in [0, 1]. Returns a new uint8 [256, 256, 3] BGR face (the crop itself when the state is 0)."""
    open_, wide, rounded = (float(v) for v in state)
    out = crop.copy()
    if open_ == wide == rounded == 0:
        return out
    frame = mouth_frame(landmarks)
    x0, y0, x1, y1 = _region(frame)
    if x1 <= x0 or y1 <= y0:
        return out
    columns, rows = np.arange(x0, x1, dtype=np.float32), np.arange(y0, y1, dtype=np.float32)
    pixels = np.stack(np.meshgrid(columns, rows), -1)
    x, y = frame.to_local(pixels)
    width = 1.0 + WIDEN * wide - NARROW * rounded  # where the corners go, in half mouth widths
    s = y - frame.seam(x)  # height below the seam
    dx, upper, lower = _motion(frame, pixels, x, y, s, open_, width)
    dy = np.where(s >= lower, lower, np.where(s <= -upper, -upper, s))  # inside the opening: sample the seam
    shift = frame.scale * (dx[..., None] * frame.axis_x + dy[..., None] * frame.axis_y)
    maps = pixels - shift.astype(np.float32)
    region = cv2.remap(crop, maps[..., 0], maps[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    alpha = np.clip(np.minimum(s + upper, lower - s) * frame.scale + 0.5, 0.0, 1.0)
    alpha *= np.minimum((lower + upper) * frame.scale, 1.0)  # no opening, no interior
    if alpha.any():
        interior = _interior(frame, lip_colour(crop, landmarks), x, s, upper, lower, width)
        region = np.round(region + alpha[..., None] * (interior - region)).astype(np.uint8)
    out[y0:y1, x0:x1] = region
    return out


def _motion(frame: MouthFrame, pixels: np.ndarray, x: np.ndarray, y: np.ndarray, s: np.ndarray,
            open_: float, width: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """At output points (local x, y; s: y below the seam): the corners' sideways motion dx, and how far
    the upper lip rises (upper) and the lower lip and jaw drop (lower) there, all in half mouth widths.
    Zero above the nose's base, below the jaw's end, beyond `frame.reach()` and in the border band."""
    # nothing moves on the crop's border (EDGE pixels), then the field fades in over EDGE pixels
    border = np.minimum(np.minimum(pixels[..., 0], CROP - 1 - pixels[..., 0]),
                        np.minimum(pixels[..., 1], CROP - 1 - pixels[..., 1]))
    movable = _fall(border, 2 * EDGE, EDGE)
    upper_fade = _fall(y, frame.lip_top_y, frame.nose_y) * (y >= frame.nose_y) * movable
    # corners in/out: x scaled about the centre, fading away from the mouth and towards nose and chin
    side = _fall(np.abs(x), 1.0, SIDE_REACH) / float(_fall(np.array(1.0), 1.0, SIDE_REACH))
    jaw_fade = _fall(y, frame.jaw_hold_y, frame.jaw_end_y) * movable
    dx = (width - 1.0) * x * side * upper_fade * jaw_fade
    # the opening: lens-shaped between the corners; below the seam the jaw's moving part widens
    jaw_width = width * (1.0 + JAW_WIDENING * np.maximum(s, 0.0))
    lower = OPEN_LOWER * open_ * _fall(np.abs(x) / jaw_width, LENS_FLAT, 1.0) * jaw_fade
    upper = OPEN_UPPER * open_ * _fall(np.abs(x) / width, LENS_FLAT, 1.0) * upper_fade
    return dx, upper, lower


def _interior(frame: MouthFrame, lips: np.ndarray, x: np.ndarray, s: np.ndarray, upper: np.ndarray,
              lower: np.ndarray, width: float) -> np.ndarray:
    """The mouth's inside at local x, s below the seam, float32 [h, w, 3] BGR: the lips' colour, redder
    and darkest mid-way between the lips; on a face whose lips are closed, upper teeth under the upper lip."""
    depth = np.clip((s + upper) / np.maximum(lower + upper, 1e-6), 0.0, 1.0)
    shade = INTERIOR_SHADE[0] + (INTERIOR_SHADE[1] - INTERIOR_SHADE[0]) * np.sin(np.pi * depth)
    interior = shade[..., None] * (lips * INTERIOR_TINT)
    if frame.lips_apart < LIPS_CLOSED:  # an open mouth in the photo shows its own teeth
        below_lip = (s + upper) * frame.scale  # pixels under the upper lip
        height = np.minimum(TEETH_HEIGHT * (lower + upper), TEETH_MAX) * frame.scale
        teeth = _fall(below_lip, height - 1.0, height) * _fall(np.abs(x) / width, 0.4, 0.75)
        interior += teeth[..., None] * (min(255.0, TEETH_BRIGHTNESS * float(lips.max())) - interior)
    return interior
