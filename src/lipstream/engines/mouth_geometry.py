"""The mouth's coordinate frame on a 256x256 face crop, from its face-mesh landmarks (for the `warp`
engine). Local coordinates: origin between the mouth corners, x along the line from the left corner
to the right one, y perpendicular to it (down the face), both in half mouth widths. The "seam" is the
midline between the inner lip contours; the "gap" the distance between them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lipstream.avatar.landmarks import CHIN, JAW_LINE, MOUTH_LEFT, MOUTH_RIGHT

# the inner lip contours from corner (78) to corner (308); point i of one faces point i of the other
UPPER_INNER = (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308)
LOWER_INNER = (78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308)
UPPER_OUTER_TOP = 0  # top of the upper lip's outer edge (Cupid's bow)
LOWER_OUTER_BOTTOM = 17  # bottom of the lower lip's outer edge
NOSE_BASE = 2  # subnasale


@dataclass(frozen=True)
class MouthFrame:
    """One face's mouth frame in crop pixels (see the module doc).

    inner_x: local x of the inner contours' points, ascending; upper_y, lower_y: the upper and lower
    inner lip's local heights there. nose_y, lip_top_y, lip_bottom_y, chin_y: local heights of the
    base of the nose, the top of the upper lip, the bottom of the lower lip and the chin.
    oval_left, oval_right: the face oval's lower half on each side as (local y ascending, local |x|)."""

    origin: np.ndarray  # [2] pixels
    axis_x: np.ndarray  # [2] unit vector, left corner -> right corner
    axis_y: np.ndarray  # [2] unit vector, down the face
    scale: float  # half mouth width, pixels
    inner_x: np.ndarray
    upper_y: np.ndarray
    lower_y: np.ndarray
    nose_y: float
    lip_top_y: float
    lip_bottom_y: float
    chin_y: float
    oval_left: tuple[np.ndarray, np.ndarray]
    oval_right: tuple[np.ndarray, np.ndarray]

    def to_local(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[..., 2] pixel points -> local (x, y), float32 for float32 points."""
        d = points - self.origin.astype(points.dtype)
        x = d @ (self.axis_x / self.scale).astype(points.dtype)
        return x, d @ (self.axis_y / self.scale).astype(points.dtype)

    def to_pixels(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Local (x, y) -> [..., 2] pixel points."""
        return self.origin + self.scale * (np.multiply.outer(x, self.axis_x)
                                           + np.multiply.outer(y, self.axis_y))

    def upper(self, x: np.ndarray) -> np.ndarray:
        """Local height of the upper lip's inner edge at local x (level beyond the corners)."""
        return np.interp(x, self.inner_x, self.upper_y)

    def lower(self, x: np.ndarray) -> np.ndarray:
        """Local height of the lower lip's inner edge at local x."""
        return np.interp(x, self.inner_x, self.lower_y)

    def seam(self, x: np.ndarray) -> np.ndarray:
        """Local height of the inner-lip midline at local x."""
        return np.interp(x, self.inner_x, (self.upper_y + self.lower_y) / 2)

    def gap(self, x: np.ndarray) -> np.ndarray:
        """Distance between the inner lips at local x (0 at and beyond the corners)."""
        return np.interp(x, self.inner_x, np.maximum(self.lower_y - self.upper_y, 0.0), left=0.0, right=0.0)

    @property
    def lips_apart(self) -> float:
        """The inner lips' distance at the centre (13 to 14), half mouth widths."""
        return float(self.gap(np.zeros(1))[0])

    def oval(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """The face oval's local half width on the side of x, at local height y (clamped to its ends)."""
        return np.where(x < 0, np.interp(y, *self.oval_left), np.interp(y, *self.oval_right))


def mouth_frame(landmarks: np.ndarray) -> MouthFrame:
    """The mouth frame of one face: landmarks float32 [478, 2] in crop pixels. Raises ValueError when
    the mouth corners are too close for a mouth."""
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
    inner_x = (x[upper] + x[lower]) / 2
    order = np.argsort(inner_x)
    upper_y, lower_y = y[upper][order], y[lower][order]
    lower_y[[0, -1]] = upper_y[[0, -1]] = (upper_y[[0, -1]] + lower_y[[0, -1]]) / 2  # the corners
    seam = float(np.interp(0.0, inner_x[order], (upper_y + lower_y) / 2))
    lip_top = min(y[UPPER_OUTER_TOP], seam - 0.05)
    lip_bottom = max(y[LOWER_OUTER_BOTTOM], seam + 0.05)
    chin = max(y[CHIN], lip_bottom + 0.1)
    oval = np.array(JAW_LINE)
    below = oval[y[oval] > 0]  # the oval's lower half: below the corners' line

    def side(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if points.size == 0:  # a face seen so much from the side that one side has no oval below the mouth
            return np.array([0.0, 1.0]), np.array([1.0, 1.0])
        ys, order_y = np.unique(y[points], return_index=True)
        return ys, np.abs(x[points][order_y])

    return MouthFrame(origin, axis_x, axis_y, scale, inner_x[order], upper_y, lower_y,
                      nose_y=min(y[NOSE_BASE], lip_top - 0.05), lip_top_y=lip_top, lip_bottom_y=lip_bottom,
                      chin_y=chin, oval_left=side(below[x[below] < 0]), oval_right=side(below[x[below] >= 0]))

