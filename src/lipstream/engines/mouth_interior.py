"""What the `warp` engine shows inside an opening mouth: teeth and a depth-shaded oral cavity.

Teeth come as a texture per avatar, uint8 [2, TEETH_ROWS, TEETH_COLS, 4] BGRA (`Teeth`):
  [0] upper teeth, row r lying r * ROW_STEP half mouth widths below the upper lip's inner edge;
  [1] lower teeth, row r lying r * ROW_STEP above the lower lip's inner edge;
  columns span the opening from the left corner (u = -1) to the right one (u = +1); alpha 0 where
  there is no tooth (the cavity shows there).
Anchored that way, the upper teeth stay with the upper lip and the lower teeth move with the lower lip
and jaw; where the opening is too low for both, the upper teeth stand in front (an overbite).

The texture is the avatar's own where it has one (`teeth_from_frame`: the interior of its cycle frame
with the widest-open mouth, when that is open enough to show it), otherwise drawn (`drawn_teeth`): an
arch of incisors, laterals and canines, shaded darker towards the corners and under the lip, in a
tone taken from the face's skin (so the teeth share the photo's light and colour cast). Between the
teeth lies the cavity (`paint_opening`): the lips' colour, redder, darkest in the middle of the
opening and towards the corners, and the tongue: right behind the teeth it fills a mouth just
parted (TONGUE_PX), and as the mouth opens wider it lies lower, its rounded top rising from below
the dark mouth."""

from __future__ import annotations

import cv2
import numpy as np

from lipstream.engines.mouth_geometry import MouthFrame

ROW_STEP = 0.01  # half mouth widths per texture row
TEETH_ROWS, TEETH_COLS = 40, 64
UPPER_TEETH, LOWER_TEETH = 0.16, 0.08  # visible height of the drawn central teeth, half mouth widths
UPPER_EDGES = (0.0, 0.3, 0.53)  # boundaries (|u|) between the front teeth: central incisors, laterals, canines
LOWER_EDGES = (0.0, 0.2, 0.38)
GAP_SHADE = 0.12  # a boundary is this much darker
ARCH_END = (0.82, 0.5)  # the drawn upper and lower arches fade out by this |u| (the corners' shadow)
CORRIDOR = 1.0  # teeth darken by this x u^2 towards the corners
LOWER_SHADE = 0.75  # the lower teeth are in the upper teeth's and lip's shadow
TEETH_LUMA = (1.15, 110.0, 225.0)  # teeth brightness: skin luma x this, clamped to [lo, hi]
TEETH_TINT = 0.7  # how much of the skin's colour cast the teeth keep (0: neutral grey)
CAVITY_TINT = np.float32([0.7, 0.7, 1.0])  # BGR: the cavity is redder than the lips
CAVITY_SHADE = (0.4, 0.12)  # cavity brightness vs the lips' colour: at the lips, in the middle
TONGUE_TINT = np.float32([0.6, 0.62, 0.9])
TONGUE_TOP = (0.58, 0.3)  # the tongue's top: this share of the opening down, plus this x u^2
TONGUE_PX = (8.0, 18.0)  # the tongue fills an opening up to this high (pixels), is down at TONGUE_TOP from that
# skin samples for the teeth's tone: cheeks beside the nose wings and mouth, below the lower lip, the chin
SKIN_POINTS = (205, 425, 50, 280, 18, 200, 199)

Teeth = np.ndarray  # uint8 [2, TEETH_ROWS, TEETH_COLS, 4] BGRA (see the module doc)


def _luma(bgr: np.ndarray) -> np.ndarray:
    return bgr @ np.float32([0.114, 0.587, 0.299])


def teeth_tone(crop: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """The drawn teeth's BGR colour (float32 [3]) for a face: its skin's median colour, lightened to
    TEETH_LUMA and mostly desaturated. crop: uint8 [256, 256, 3] BGR; landmarks: float32 [478, 2]."""
    points = np.clip(np.round(landmarks[list(SKIN_POINTS)]).astype(int), 1, crop.shape[0] - 2)
    patches = [crop[y - 1:y + 2, x - 1:x + 2].reshape(-1, 3) for x, y in points]
    skin = np.maximum(np.median(np.concatenate(patches), axis=0).astype(np.float32), 1.0)  # black: grey teeth
    luma = float(_luma(skin))
    gain, low, high = TEETH_LUMA
    target = min(max(gain * luma, low), high)
    cast = (skin / luma) ** TEETH_TINT
    return np.clip(target * cast / float(_luma(cast)), 0, 255).astype(np.float32)


def _arch(u: np.ndarray, r: np.ndarray, height: float, edges: tuple[float, ...], end: float, shade: float,
          tone: np.ndarray) -> np.ndarray:
    """One drawn row of teeth: BGRA float32 [rows, cols, 4] for columns u [cols] and depths r [rows]
    (half mouth widths from the lip edge)."""
    side = np.abs(u)
    length = height * (1.0 - 0.35 * side**2)  # the central teeth are the longest
    alpha = np.clip((length[None] - r[:, None]) / (1.5 * ROW_STEP), 0.0, 1.0)
    alpha *= np.clip((end - side) / 0.15, 0.0, 1.0)[None]
    gaps = sum(np.exp(-(((side - e) / 0.012) ** 2)) for e in edges)
    light = (1.0 - CORRIDOR * side**2) * (1.0 - GAP_SHADE * np.minimum(gaps, 1.0))
    under_lip = 0.6 + 0.4 * np.clip(r / (3 * ROW_STEP), 0.0, 1.0)  # the lip's shadow
    brightness = shade * light[None] * under_lip[:, None]
    return np.concatenate([brightness[..., None] * tone, 255.0 * alpha[..., None]], axis=-1)


def drawn_teeth(tone: np.ndarray) -> Teeth:
    """Teeth drawn for a face that never shows its own, in BGR `tone` (float32 [3])."""
    u = np.linspace(-1.0, 1.0, TEETH_COLS)
    r = np.arange(TEETH_ROWS) * ROW_STEP
    upper = _arch(u, r, UPPER_TEETH, UPPER_EDGES, ARCH_END[0], 1.0, tone)
    lower = _arch(u, r, LOWER_TEETH, LOWER_EDGES, ARCH_END[1], LOWER_SHADE, tone)
    return np.round(np.clip(np.stack([upper, lower]), 0, 255)).astype(np.uint8)


def teeth_from_frame(crop: np.ndarray, frame: MouthFrame) -> Teeth:
    """The avatar's own teeth: the interior of an open mouth (crop uint8 [256, 256, 3] BGR, its mouth
    frame), split at its middle into the part under the upper lip and the part above the lower lip."""
    u = np.linspace(-1.0, 1.0, TEETH_COLS)
    r = np.arange(TEETH_ROWS) * ROW_STEP
    alpha = np.clip((frame.gap(u)[None] / 2 - r[:, None]) / ROW_STEP, 0.0, 1.0)
    out = []
    for y in (frame.upper(u)[None] + r[:, None], frame.lower(u)[None] - r[:, None]):
        points = frame.to_pixels(np.broadcast_to(u, y.shape), y).astype(np.float32)
        colour = cv2.remap(crop, points[..., 0], points[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        out.append(np.concatenate([colour, np.round(255 * alpha)[..., None].astype(np.uint8)], axis=-1))
    return np.stack(out)


def paint_opening(region: np.ndarray, alpha: np.ndarray, lips: np.ndarray, u: np.ndarray, a: np.ndarray,
                  b: np.ndarray, scale: float, teeth: Teeth | None) -> np.ndarray:
    """The inside of the opening drawn over `region` (float32 [h, w, 3] BGR, the warped crop), with
    coverage `alpha` [h, w]. lips: the lips' BGR colour [3]; u: position across the opening (-1 left
    corner, +1 right); a, b: distance below the upper lip's inner edge and above the lower lip's (half
    mouth widths); scale: pixels per half mouth width; teeth: the avatar's teeth, or None to show the
    cavity only (a mouth whose own teeth are already in `region`). Returns uint8 [h, w, 3]."""
    inside = alpha > 0
    if not inside.any():
        return np.round(region).astype(np.uint8)
    rows, cols = np.nonzero(inside)
    y0, y1, x0, x1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    box = (slice(y0, y1), slice(x0, x1))
    u, a, b, coverage = u[box], np.maximum(a[box], 0.0), np.maximum(b[box], 0.0), alpha[box]
    height = a + b
    depth = np.clip(a / np.maximum(height, 1e-6), 0.0, 1.0)
    corner = 1.0 - 0.35 * np.minimum(u * u, 1.0)
    shade = (CAVITY_SHADE[0] + (CAVITY_SHADE[1] - CAVITY_SHADE[0]) * np.sin(np.pi * depth)) * corner
    inner = shade[..., None] * (lips * CAVITY_TINT)
    sink = np.clip((height * scale - TONGUE_PX[0]) / (TONGUE_PX[1] - TONGUE_PX[0]), 0.0, 1.0)
    tongue_top = sink * (TONGUE_TOP[0] + TONGUE_TOP[1] * u * u)
    tongue = np.clip((depth - tongue_top) * height * scale / 2 + 0.5, 0.0, 1.0)
    tongue_colour = ((0.2 + 0.25 * depth) * corner)[..., None] * (lips * TONGUE_TINT)
    inner += tongue[..., None] * (tongue_colour - inner)
    if teeth is not None:
        column = ((u + 1.0) * (0.5 * (TEETH_COLS - 1))).astype(np.float32)
        for texture, distance in ((teeth[1], b), (teeth[0], a)):  # lower first: the upper stand in front
            sampled = cv2.remap(texture, column, (distance / ROW_STEP).astype(np.float32), cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_CONSTANT, borderValue=0).astype(np.float32)
            cover = sampled[..., 3:] / 255.0
            inner += cover * (sampled[..., :3] - inner)
    out = region.copy()
    out[box] += coverage[..., None] * (inner - region[box])
    return np.round(out).astype(np.uint8)
