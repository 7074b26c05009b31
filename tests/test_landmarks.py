"""MediaPipe face mesh on the bundled astronaut photo (no downloads)."""

from __future__ import annotations

import numpy as np
import pytest

from lipstream.avatar.landmarks import CHIN, LIPS_OUTER, LOWER_LIP_INNER, NOSE_TIP, UPPER_LIP_INNER, FaceMesh


@pytest.fixture(scope="module")
def mesh():
    with FaceMesh() as m:
        yield m


def test_landmarks_sit_on_the_astronauts_face(mesh, astronaut_bgr):
    points = mesh.detect(astronaut_bgr)
    assert points.shape == (478, 2) and points.dtype == np.float32
    lips = points[list(LIPS_OUTER)]
    # the lips lie inside the face the Haar cascade finds at [177, 66, 95, 95] (x, y, w, h)
    assert (lips[:, 0] > 177).all() and (lips[:, 0] < 272).all()
    assert (lips[:, 1] > 120).all() and (lips[:, 1] < 175).all()
    nose, upper, lower, chin = points[[NOSE_TIP, UPPER_LIP_INNER, LOWER_LIP_INNER, CHIN]]
    assert nose[1] < upper[1] < lower[1] < chin[1]


def test_no_face_gives_none_and_bad_input_an_error(mesh):
    assert mesh.detect(np.full((240, 320, 3), 90, np.uint8)) is None
    with pytest.raises(ValueError, match="uint8"):
        mesh.detect(np.zeros((10, 10), np.float32))
