"""The `warp` engine on real photos (the astronaut, whose smile shows her teeth; Grace Hopper, whose
lips are closed): mouth states from audio, the mouth warp (jaw, teeth, closing lips), the engine
interface, engine selection, and the speech metrics read back with the face mesh."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import warnings

import numpy as np
import pytest
import soundfile
import torch

from face_avatar import photo_avatar
from lipstream import imgproc
from lipstream.audio.load import load_audio
from lipstream.avatar.landmarks import (
    CHIN,
    LIPS_OUTER,
    LOWER_LIP_INNER,
    MOUTH_LEFT,
    MOUTH_RIGHT,
    NOSE_TIP,
    UPPER_LIP_INNER,
    FaceMesh,
)
from lipstream.avatar.model import Avatar
from lipstream.bench import warp_faces
from lipstream.engines.base import Engine, concat, take
from lipstream.engines.mouth_features import SETTLE_MS
from lipstream.engines.mouth_geometry import NOSE_BASE, mouth_frame
from lipstream.engines.mouth_interior import TEETH_COLS, TEETH_ROWS, paint_opening, teeth_from_frame
from lipstream.engines.mouth_warp import BOTTOM_STILL, EDGE, OPEN_APERTURE, OVERBITE, SQUEEZE, warp_mouth
from lipstream.engines.select import load_engine
from lipstream.engines.warp import WarpEngine, avatar_teeth
from lipstream.errors import MissingWeightsError, NoFaceError
from lipstream.synthetic import speech, vowel
from musetalk_tiny import write_tiny_musetalk

FPS = 25
FRAME = 16000 // FPS


@pytest.fixture(scope="module")
def engine() -> WarpEngine:
    return WarpEngine()


@pytest.fixture(scope="module")
def avatar(astronaut_bgr):
    return photo_avatar(astronaut_bgr)


@pytest.fixture(scope="module")
def material(engine, avatar):
    return engine.material(avatar)


@pytest.fixture(scope="module")
def hopper_material(engine):
    """Grace Hopper (matplotlib's sample photo): a closed mouth, so the engine draws her teeth."""
    return engine.material(photo_avatar(warp_faces.face_photos()["grace-hopper"], name="hopper"))


@pytest.fixture(scope="module")
def mesh():
    with FaceMesh() as m:
        yield m


def silence(seconds: float) -> np.ndarray:
    return np.zeros(round(seconds * 16000), np.float32)


@pytest.fixture(scope="module")
def bursts() -> np.ndarray:
    """0.4 s silence, a loud "a" (0.4 s, -14 dBFS), 0.8 s silence, the same 12 dB quieter, 0.8 s silence
    (each part a whole number of frames: frame 10 starts the first burst, frame 40 the second)."""
    return np.concatenate([silence(0.4), vowel(0.4, -14), silence(0.8), vowel(0.4, -26), silence(0.8)])


def test_material_and_interface(engine, avatar, material):
    assert isinstance(engine, Engine) and engine.name == "warp"
    assert engine.device == torch.device("cpu") and engine.dtype == torch.float32
    crops, landmarks, teeth = material["crops"], material["landmarks"], material["teeth"]
    assert crops.dtype == torch.uint8 and crops.shape == (1, 256, 256, 3)
    assert torch.equal(crops, torch.from_numpy(avatar.crops))
    assert landmarks.dtype == torch.float32 and landmarks.shape == (1, 478, 2)
    assert teeth.dtype == torch.uint8 and teeth.shape == (1, 2, TEETH_ROWS, TEETH_COLS, 4)
    # frame pixels mapped into the crop: the lips sit in the crop's lower half, inside it
    upper, lower = landmarks[0, UPPER_LIP_INNER], landmarks[0, LOWER_LIP_INNER]
    assert 128 < upper[1] < lower[1] < 230 and 80 < upper[0] < 176


def test_mouth_state_follows_loudness(engine, bursts):
    states = engine.features(bursts, FPS)
    assert states.dtype == torch.float32 and states.shape == (len(bursts) * FPS // 16000, 3)
    assert (states[:, 0] >= -1).all() and (states[:, 0] <= 1).all()
    assert (states[:, 1:] >= 0).all() and (states[:, 1:] <= 1).all()
    open_ = states[:, 0]
    assert torch.equal(states[:9], torch.zeros(9, 3))  # silence, up to the frame before the burst
    assert open_[9] > 0  # the look-ahead: the mouth starts to move a frame early
    loud, quiet = open_[12:20], open_[42:50]
    assert loud.min() > 0.6 and quiet.min() > 0.1
    assert quiet.max() < loud.min()  # 12 dB quieter opens less
    # a pause closes the lips at once and holds them, then they relax to the avatar's own mouth
    assert open_[21:30].max() < -0.5
    settled = 20 + int(np.ceil(SETTLE_MS / 1000 * FPS))  # the first frame SETTLE_MS after the sound
    assert (open_[29:settled].diff() > 0).all() and torch.equal(states[settled:39], torch.zeros(39 - settled, 3))
    assert torch.equal(states[-4:], torch.zeros(4, 3))  # and after the last burst: an exact zero state


def test_lip_shapes_follow_the_sounds(engine):
    """Visemes from the spectrum: an "oo" (low formants) rounds the mouth, an "ee" (high second formant)
    spreads it, an "a" (high first formant) opens it most; a nasal murmur (m) and a stop's silent
    closure (b, p) between two "a"s close the lips."""
    oo = engine.features(vowel(0.4, -16, formants=(300, 800)), FPS)[4:]
    ee = engine.features(vowel(0.4, -16, formants=(300, 2300)), FPS)[4:]
    a = engine.features(vowel(0.4, -16, formants=(700, 1200)), FPS)[4:]
    assert oo[:, 2].min() > 0.8 and oo[:, 1].max() < 0.1
    assert ee[:, 1].min() > 0.8 and ee[:, 2].max() < 0.1
    assert a[:, 0].min() > 0.8 and a[:, 1:].max() < 0.1
    assert a[:, 0].min() > max(oo[:, 0].max(), ee[:, 0].max()) + 0.2  # close vowels open less
    aa = vowel(0.24, -14)
    for middle, closed in ((vowel(0.12, -26, formants=(250,)), -0.5), (silence(0.08), -0.7)):  # "ama", "apa"
        states = engine.features(np.concatenate([silence(0.2), aa, middle, aa]), FPS)[:, 0]
        closure = states[11:11 + len(middle) // FRAME]
        assert closure.min() < closed  # (nearly) closed lips
        assert states[5:11].min() > 0.7 and states[-4:].min() > 0.7  # open around it


def test_lip_shapes_change_smoothly(engine):
    """No flicker: over synthetic speech the lip shape moves at most half-way to a new target per
    frame; on a steady vowel over noise (with a slow tremolo) the state barely moves between frames."""
    states = engine.features(speech(6.0, seed=4), FPS)
    assert (states[:, 1:].diff(dim=0).abs() <= 0.5).all()
    rng = np.random.default_rng(5)
    steady = vowel(2.0, -18, formants=(500, 1700))
    steady *= (1 + 0.2 * np.sin(2 * np.pi * 3 * np.arange(steady.size) / 16000)).astype(np.float32)
    steady += rng.normal(0, 10 ** (-45 / 20), steady.size).astype(np.float32)
    held = engine.features(steady, FPS)[5:-2]
    assert held[:, 0].min() > 0.4 and (held.diff(dim=0).abs() < 0.12).all()  # it follows the tremolo, gently


def inner_lip_gap(mesh: FaceMesh, face: np.ndarray) -> float:
    points = mesh.detect(face)
    assert points is not None, "the face mesh must still find the face"
    return float(points[LOWER_LIP_INNER, 1] - points[UPPER_LIP_INNER, 1])


def test_rendered_mouth_opens_and_closes_with_the_audio(engine, material, mesh, bursts):
    states = engine.features(bursts, FPS)
    frames = [5, 15, 38, 45, 66, 24]  # silence, loud, silence, quiet, silence, a pause just after speech
    faces = engine.generate(take(material, [0] * len(frames)), states[frames])
    crop = material["crops"][0]
    for k in (0, 2, 4):
        assert torch.equal(faces[k], crop)  # silence: the avatar's own face, byte for byte
    points = [mesh.detect(face) for face in faces.numpy()]
    gaps = [float(p[LOWER_LIP_INNER, 1] - p[UPPER_LIP_INNER, 1]) for p in points]
    assert gaps[1] > gaps[0] + 8  # loud: open wide
    assert gaps[0] + 2 < gaps[3] < gaps[1]  # quiet: open, less
    assert gaps[5] < gaps[0] - 8 and gaps[5] < 3  # the pause: her smiling lips close
    # the jaw drops with the opening: the chin moves down, more for the loud "a"
    chin = [float(p[CHIN, 1]) for p in points]
    assert chin[1] > chin[0] + 4 and chin[0] + 1 < chin[3] < chin[1]

    # the opening is dark: the mouth's box (the lips and a jaw drop below them) holds many more dark pixels
    (x1, y1), (x2, y2) = material["landmarks"][0, list(LIPS_OUTER)].aminmax(dim=0)
    box = slice(int(y1), int(y2) + 25), slice(int(x1), int(x2))

    def dark(face: torch.Tensor) -> int:
        return int((face[box].float().mean(-1) < 70).sum())

    assert dark(faces[1]) > dark(faces[0]) + 400 and dark(faces[3]) > dark(faces[0]) + 100


def test_her_own_teeth_move_with_her_lips(material):
    """The astronaut shows her teeth: opening keeps them, the upper row with the upper lip and the lower
    row with the jaw, with the new dark gap between them; nothing is drawn over them."""
    crop, landmarks = material["crops"][0].numpy(), material["landmarks"][0].numpy()
    teeth = material["teeth"][0].numpy()
    assert np.array_equal(teeth, teeth_from_frame(crop, mouth_frame(landmarks)))  # her own, not drawn
    column = round(float(landmarks[UPPER_LIP_INNER, 0]))
    top, bottom = int(landmarks[UPPER_LIP_INNER, 1]), int(landmarks[LOWER_LIP_INNER, 1])
    rest = crop[top - 2:bottom + 3, column].astype(int).sum(-1)
    face = warp_mouth(crop, landmarks, np.float32([1, 0, 0]), teeth)
    moved = face[top - 10:bottom + 25, column].astype(int).sum(-1)
    bright = rest > 0.8 * rest.max()  # her teeth on this column
    upper_teeth = int(np.argmax(bright))  # first tooth pixel below the upper lip
    lower_teeth = len(bright) - 1 - int(np.argmax(bright[::-1]))
    # the same run of teeth pixels, found again: the upper ones a little higher, the lower ones lower
    found = np.flatnonzero(moved > 0.8 * rest.max())
    assert found.size >= 0.7 * bright.sum()
    assert found.min() - 8 < upper_teeth and found.max() - 8 > lower_teeth + 4
    gap = moved[upper_teeth + 8:lower_teeth + 12]
    assert (gap < 0.35 * rest.max()).sum() >= 6  # a dark mouth between them


def test_drawn_teeth_sit_under_the_upper_lip(hopper_material):
    """Grace Hopper's lips are closed in the photo: the opening shows drawn teeth, lighter than her
    skin, in its upper part (under the upper lip, rising with it), over a dark cavity."""
    crop, landmarks = hopper_material["crops"][0].numpy(), hopper_material["landmarks"][0].numpy()
    teeth = hopper_material["teeth"][0].numpy()
    mid = TEETH_COLS // 2
    assert teeth[0, 5, mid, 3] == 255 and teeth[0, -1, mid, 3] == 0  # the upper row: teeth, then none
    assert teeth[1, 2, mid, 3] == 255 and teeth[1, -1, mid, 3] == 0  # the lower row: shorter
    assert (teeth[0, :, mid, 3] > 0).sum() > (teeth[1, :, mid, 3] > 0).sum()
    skin = np.median(crop[200:230, 100:156].reshape(-1, 3), axis=0)
    assert teeth[0, 5, mid, :3].astype(int).sum() > skin.astype(int).sum()  # lighter than her skin
    tops = []
    for open_ in (0.5, 1.0):
        state = np.float32([open_, 0, 0])
        face = warp_mouth(crop, landmarks, state, teeth).astype(int)
        cavity = warp_mouth(crop, landmarks, state, np.zeros_like(teeth)).astype(int)
        drawn = np.argwhere(np.abs(face - cavity).sum(-1) > 30)  # where teeth cover the cavity
        opening = np.argwhere(np.abs(cavity - crop).sum(-1) > 60)
        assert len(drawn) > 40
        assert drawn[:, 0].mean() < opening[:, 0].mean()  # the teeth lie in the upper part
        assert face[tuple(drawn.T)].sum(-1).mean() > 2 * cavity[tuple(drawn.T)].sum(-1).mean()
        tops.append(np.percentile(drawn[:, 0], 5))
    assert tops[1] <= tops[0]  # the upper lip, and the teeth under it, rise as the mouth opens


def test_teeth_come_from_the_most_open_frame(hopper_material, material):
    """A video avatar whose frames show a closed and an open mouth gets the open frame's teeth for all."""
    crops = np.stack([hopper_material["crops"][0].numpy(), material["crops"][0].numpy()])
    landmarks = np.stack([hopper_material["landmarks"][0].numpy(), material["landmarks"][0].numpy()])
    assert np.array_equal(avatar_teeth(crops, landmarks), material["teeth"][0].numpy())
    assert np.array_equal(avatar_teeth(crops[:1], landmarks[:1]), hopper_material["teeth"][0].numpy())
    flat = avatar_teeth(np.full((1, 256, 256, 3), 90, np.uint8), np.zeros((1, 478, 2), np.float32))
    assert flat.shape == (2, TEETH_ROWS, TEETH_COLS, 4)  # landmarks without a mouth: drawn teeth, no error
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a black face: grey teeth, not NaN
        black = avatar_teeth(np.zeros((1, 256, 256, 3), np.uint8), np.zeros((1, 478, 2), np.float32))
    assert black[0, 5, TEETH_COLS // 2, :3].min() > 90 and np.ptp(black[0, 5, TEETH_COLS // 2, :3]) <= 1


def test_only_the_mouth_region_moves(material):
    crop, landmarks = material["crops"][0].numpy(), material["landmarks"][0].numpy()
    teeth = material["teeth"][0].numpy()
    axis = landmarks[MOUTH_RIGHT] - landmarks[MOUTH_LEFT]
    down = np.array([-axis[1], axis[0]]) / np.hypot(*axis)  # the face's "down", square to the mouth
    for state in ([1, 0, 0], [1, 1, 0], [1, 0, 1], [0.3, 0, 1], [-1, 0, 0], [0, 1, 0]):
        face = warp_mouth(crop, landmarks, np.float32(state), teeth)
        changed = np.argwhere((face != crop).any(-1))
        assert changed.size, f"state {state} changes nothing"
        assert changed[:, 0].min() > landmarks[NOSE_TIP, 1]  # eyes and nose: untouched
        below_nose = (changed[:, ::-1] - landmarks[NOSE_BASE]) @ down
        assert below_nose.min() > 0  # nothing above the base of the nose moves
        # the crop's border band never moves (the jaw's motion fades out by the bottom rows)
        assert changed[:, 1].min() >= EDGE and changed[:, 1].max() < 256 - EDGE
        assert changed[:, 0].max() < 256 - BOTTOM_STILL


def coordinate_chart() -> np.ndarray:
    """An image whose colours are its own coordinates: B = y, G = x, R = 255 everywhere."""
    ramp = np.arange(256, dtype=np.uint8)
    return np.stack([np.repeat(ramp[:, None], 256, 1), np.repeat(ramp[None, :], 256, 0),
                     np.full((256, 256), 255, np.uint8)], -1)


def test_the_warp_neither_folds_nor_tears(material):
    """Warp the coordinate chart: outside the drawn mouth interior, coordinates must still rise along
    every row and column, in small steps (closing lips hide what lies between them: one jump there)."""
    landmarks = material["landmarks"][0].numpy()
    no_teeth = np.zeros_like(material["teeth"][0].numpy())
    chart = coordinate_chart()
    for state in ([1, 1, 0], [1, 0, 1], [1, 0, 0], [-1, 0, 0]):
        face = warp_mouth(chart, landmarks, np.float32(state), no_teeth).astype(int)
        warped = face[..., 2] == 255  # the interior is drawn darker than pure red
        assert (200 < (~warped).sum() < 5000) == (state[0] > 0)
        for axis, channel in ((0, 0), (1, 1)):
            step = np.diff(face[..., channel], axis=axis)
            both = np.logical_and(*(np.take(warped, range(a, a + 255), axis=axis) for a in (0, 1)))
            assert step[both].min() >= -1  # no fold (1 for rounding)
            if state[0] > 0:
                assert step[both].max() <= 3  # no tear: at most a 3x stretch
        assert np.abs(face[..., :2] - chart[..., :2]).max() > (10 if state[0] > 0 else 4)


def test_the_jaw_drops_and_the_neck_below_gives_way(material):
    """On the chart: the chin moves down (it samples from higher up), in proportion to the opening, and
    the rows between the chin and the crop's bottom are squeezed, never folded, to a still bottom edge."""
    landmarks = material["landmarks"][0].numpy()
    no_teeth = np.zeros_like(material["teeth"][0].numpy())
    chart = coordinate_chart()
    x, y = np.round(landmarks[CHIN]).astype(int)
    drops = []
    for open_ in (0.5, 1.0):
        face = warp_mouth(chart, landmarks, np.float32([open_, 0, 0]), no_teeth).astype(int)
        drops.append(y - face[y, x, 0])  # how far from above the chin's pixel now samples
        column = face[y - 40:, x, 0]
        assert (np.diff(column) >= 0).all()  # down the chin and neck: no fold
        assert np.array_equal(face[256 - BOTTOM_STILL:], chart[256 - BOTTOM_STILL:])
    assert 2 < drops[0] < drops[1] < 20
    room = 256 - 1 - BOTTOM_STILL - landmarks[CHIN, 1]  # rows between the chin and the still bottom
    assert drops[1] >= SQUEEZE * room - 1.5  # the chin drops as far as squeezing the rows below allows
    cut = landmarks.copy()  # a chin at the crop's very bottom (the face box cut by the frame): no room
    cut[CHIN, 1] = 255.5
    face = warp_mouth(chart, cut, np.float32([1, 0, 0]), no_teeth)
    assert np.array_equal(face[256 - BOTTOM_STILL:], chart[256 - BOTTOM_STILL:])
    assert abs(int(face[250, x, 0]) - 250) <= 1  # the jaw could not drop: the rows above the edge stay


def centre_column(face: np.ndarray, landmarks: np.ndarray) -> tuple[np.ndarray, int, float]:
    """The chart warped to `face`, at the mouth's centre column: (its pixels [256, 3], the column, the
    seam's row there)."""
    frame = mouth_frame(landmarks)
    column, seam = frame.to_pixels(np.zeros(1), frame.seam(np.zeros(1)))[0]
    return face[:, round(column)], round(column), float(seam)


def test_openings_are_measured_from_the_lips_at_rest(material, hopper_material):
    """The astronaut's lips are apart in her smile, Grace Hopper's closed: an opening parts either pair
    by the same OPEN_APERTURE * open (half mouth widths) more, so her open vowels open clearly wider than
    her smile. On the chart, at the centre: the new rows between the lips (the drawn inside, or the
    seam's row drawn out where her lower teeth come out) number that many pixels."""
    chart = coordinate_chart()
    for material_ in (material, hopper_material):
        landmarks = material_["landmarks"][0].numpy()
        no_teeth = np.zeros_like(material_["teeth"][0].numpy())
        frame = mouth_frame(landmarks)
        for open_ in (0.5, 1.0):
            face = warp_mouth(chart, landmarks, np.float32([open_, 0, 0]), no_teeth).astype(int)
            column, _, seam = centre_column(face, landmarks)
            new_rows = (column[:, 2] < 255) | (np.abs(column[:, 0] - seam) <= 0.5)
            assert abs(new_rows.sum() - OPEN_APERTURE * open_ * frame.scale) <= 2, (open_, frame.lips_apart)
    assert mouth_frame(material["landmarks"][0].numpy()).lips_apart > 0.2  # hers: apart at rest


def test_the_lower_lip_keeps_its_shape(material, hopper_material):
    """As the mouth opens the lower lip moves down whole: its rows (from its inner edge to its outer
    one, where they were) come out as many on the chart's centre column; the skin below gives way."""
    chart = coordinate_chart()
    for material_ in (material, hopper_material):
        landmarks = material_["landmarks"][0].numpy()
        no_teeth = np.zeros_like(material_["teeth"][0].numpy())
        _, x, _ = centre_column(chart, landmarks)
        top, bottom = landmarks[LOWER_LIP_INNER, 1], landmarks[17, 1]  # 17: the lower lip's outer edge
        face = warp_mouth(chart, landmarks, np.float32([1, 0, 0]), no_teeth).astype(int)
        source = face[:, x, 0][face[:, x, 2] == 255]  # rows of the face, not the drawn inside
        lip = ((source >= top) & (source <= bottom)).sum()
        assert abs(lip - (bottom - top)) <= 2, (lip, bottom - top)


def test_her_lower_teeth_come_out_before_her_mouth_opens_dark(material):
    """The astronaut's lower teeth sit behind her upper ones: a small opening (less than OVERBITE) shows
    more of her teeth and no dark mouth; a larger one opens a dark gap between the rows."""
    crop, landmarks = material["crops"][0].numpy(), material["landmarks"][0].numpy()
    teeth = material["teeth"][0].numpy()
    small = 0.8 * OVERBITE / OPEN_APERTURE  # the lips part by 0.8 OVERBITE at the centre
    chart = coordinate_chart()
    for open_, dark in ((small, False), (0.5, True)):
        column, _, _ = centre_column(warp_mouth(chart, landmarks, np.float32([open_, 0, 0]), np.zeros_like(teeth)),
                                     landmarks)
        assert (column[:, 2] < 255).any() == dark  # the inside is drawn only past the overbite
    (x1, y1), (x2, y2) = landmarks[list(LIPS_OUTER)].min(0), landmarks[list(LIPS_OUTER)].max(0)
    box = slice(int(y1), int(y2) + 1), slice(int(x1), int(x2) + 1)

    def bright(face: np.ndarray) -> int:  # her teeth
        return int((face[box].astype(int).sum(-1) > 600).sum())

    assert bright(warp_mouth(crop, landmarks, np.float32([small, 0, 0]), teeth)) > bright(crop) + 30


def test_a_thin_opening_shows_the_tongue_a_wide_one_the_dark_above_it():
    """Just parted, the mouth shows the tongue right behind the teeth; wide open, the tongue lies low and
    a third of the way down the opening lies the darker mouth above it."""
    lips = np.float32([120, 120, 200])
    middle = []
    for height in (5, 40):  # pixels, one pixel per row: a = rows below the upper lip, b = above the lower
        rows = np.arange(height, dtype=np.float32)[:, None] + 0.5
        a, b = rows / 10, (height - rows) / 10  # 10 pixels per half mouth width
        region = np.broadcast_to(lips, (height, 1, 3)).copy()
        inside = paint_opening(region, np.ones((height, 1), np.float32), lips, np.zeros((height, 1), np.float32),
                               a, b, 10.0, None).astype(float)
        middle.append(inside[int(0.35 * height), 0])  # a third of the way down
    assert middle[0].sum() > 1.4 * middle[1].sum() and middle[1].sum() < 0.15 * lips.sum()


def test_the_mouth_follows_speech_on_real_faces(engine, avatar, mesh):
    """Read back with the face mesh on the composited frames (espeak-ng, else synthetic syllables):
    Grace Hopper's inner-lip aperture follows the audio envelope (r >= 0.8 at lag 0 over all frames),
    her chin drops with it, and silence leaves her mouth untouched. The astronaut's rest pose is an
    open smile, shown unchanged in silence, so her figure is taken over the frames outside silence."""
    audio, _ = warp_faces.speech_audio(("My name is Grace.", "Papa bought five blue boots, and we see the moon."))
    hopper = photo_avatar(warp_faces.face_photos()["grace-hopper"], name="hopper")
    for face, r_key in ((hopper, "aperture_envelope_r"), (avatar, "unsilent_r")):
        track = warp_faces.track_face(face, engine, audio, mesh)
        metrics = warp_faces.face_metrics(track, rest_aperture=float(np.nanmin(track.aperture)))
        assert metrics["face_found"] == 1.0
        assert metrics[r_key] >= 0.8 and abs(metrics["best_lag_frames"]) <= 1, (face.name, metrics)
        assert metrics["chin_aperture_r"] >= 0.8 and metrics["max_chin_drop"] > 0.03, (face.name, metrics)
        assert metrics["silent_frames"] >= 20 and metrics["silent_mouth_change"] == 0
    sheet = warp_faces.contact_sheet([("hopper", track)], start=20)
    assert sheet.shape == (warp_faces.TILE + warp_faces.PLOT_HEIGHT, warp_faces.TILES * warp_faces.TILE, 3)


def test_only_the_face_box_changes_in_the_frame(engine, avatar, material):
    face = engine.generate(material, torch.tensor([[1.0, 0.5, 0.0]]))[0].numpy()
    frame = avatar.frames[0]
    out = imgproc.composite(frame, face, avatar.face_boxes[0], avatar.masks[0], avatar.crop_boxes[0])
    x1, y1, x2, y2 = avatar.face_boxes[0]
    outside = np.ones(frame.shape[:2], bool)
    outside[y1:y2, x1:x2] = False
    assert np.array_equal(out[outside], frame[outside])
    assert (out[y1:y2, x1:x2] != frame[y1:y2, x1:x2]).any()


def test_streaming_gives_exactly_the_offline_states(engine, bursts):
    rng = np.random.default_rng(1)
    audio = np.concatenate([bursts, speech(3.0, seed=2), silence(0.013)])
    audio = (audio * 32768).astype(np.int16).astype(np.float32) / 32768  # int16 chunks carry it exactly
    for fps in (25, 30):  # 30: frames of 533 and 534 samples
        offline = engine.features(audio, fps)
        assert offline.shape[0] == int(len(audio) / 16000 * fps)
        stream = engine.feature_stream(fps)
        assert stream.fps == fps
        for _ in range(2):  # reset() starts afresh
            stream.reset()
            parts, i = [], 0
            while i < len(audio):
                n = int(rng.integers(1, 3 * FRAME))
                chunk = audio[i:i + n]
                parts.append(stream.push((chunk * 32768).astype(np.int16) if rng.random() < 0.3 else chunk))
                i += n
            parts.append(stream.flush())
            assert torch.equal(torch.cat(parts), offline)
    # live, a frame comes out once the next frame's audio is in (the one-frame look-ahead)
    stream = engine.feature_stream(FPS)
    assert stream.push(bursts[:FRAME]).shape == (0, 3)
    assert stream.push(bursts[FRAME:3 * FRAME]).shape == (2, 3)
    with pytest.raises(ValueError, match="mono"):
        stream.push(np.zeros((2, 10), np.float32))


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (real speech)")
def test_real_speech_moves_the_mouth(engine, tmp_path):
    wav = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), "Hello, my name is Pam, this is the warp engine speaking."],
                   check=True)
    audio = np.concatenate([load_audio(wav), silence(1.0)])
    states = engine.features(audio, FPS)
    speech = states[:-25, 0]
    assert (speech > 0.3).float().mean() > 0.25  # opens
    assert (speech < -0.5).any() and (speech < 0.1).float().mean() > 0.2  # and closes between words
    assert states[:-25, 1].max() > 0.5 and states[:-25, 2].max() > 0.3  # spreads and rounds
    assert torch.equal(states[-4:], torch.zeros(4, 3))  # the trailing silence closes it fully
    stream = engine.feature_stream(FPS)
    live = [stream.push(audio[i:i + 1000]) for i in range(0, len(audio), 1000)] + [stream.flush()]
    assert torch.equal(torch.cat(live), states)


def test_generate_a_batch_of_mixed_avatars(engine, material, astronaut_bgr):
    other = engine.material(photo_avatar(np.ascontiguousarray(astronaut_bgr[:, ::-1]), name="mirrored"))
    states = torch.tensor([[0.8, 0.0, 0.0], [0.5, 0.3, 0.0], [0.0, 0.0, 0.0]])
    batch = concat([take(material, [0, 0]), take(other, [0])])
    faces = engine.generate(batch, states)
    assert faces.shape == (3, 256, 256, 3) and faces.dtype == torch.uint8 and faces.is_contiguous()
    assert torch.equal(faces[0], engine.generate(material, states[:1])[0])
    assert torch.equal(faces[1], engine.generate(material, states[1:2])[0])
    assert torch.equal(faces[2], other["crops"][0])
    assert not torch.equal(faces[0], faces[1])
    with pytest.raises(ValueError, match="expected crops"):
        engine.generate(batch, states[:2])


def test_avatar_without_landmarks_gets_them_from_its_crops(engine, avatar, material):
    avatar.landmarks, landmarks = None, avatar.landmarks
    try:
        detected = engine.material(avatar)["landmarks"]
    finally:
        avatar.landmarks = landmarks
    assert detected.shape == (1, 478, 2) and detected.dtype == torch.float32
    assert (detected - material["landmarks"]).abs().mean() < 4  # pixels of the 256 crop

    blank = Avatar("blank", "", None, frames=np.zeros((1, 64, 64, 3), np.uint8),
                   face_boxes=np.int32([[0, 0, 64, 64]]),
                   crop_boxes=np.int32([[0, 0, 64, 64]]),
                   masks=[np.zeros((64, 64), np.uint8)],
                   crops=np.full((1, 256, 256, 3), 90, np.uint8))
    with pytest.raises(NoFaceError, match="no face"):
        engine.material(blank)


def test_engine_selection(tmp_path):
    empty = tmp_path / "empty"
    engine, reason = load_engine("auto", empty)
    assert isinstance(engine, WarpEngine)
    assert reason.startswith("engine warp") and str(empty) in reason and "lipstream models download" in reason
    engine, reason = load_engine("warp", empty)
    assert isinstance(engine, WarpEngine) and "asked for" in reason
    with pytest.raises(MissingWeightsError, match="lipstream models download"):
        load_engine("musetalk", empty)
    with pytest.raises(ValueError, match="auto, musetalk, warp"):
        load_engine("wav2lip")

    root = tmp_path / "models"
    write_tiny_musetalk(root)
    engine, reason = load_engine("auto", root, device="cpu")
    assert engine.name == "musetalk" and reason.startswith("engine musetalk") and str(root) in reason
    engine, reason = load_engine("warp", root)
    assert engine.name == "warp"


def test_bench_warp_runs_and_writes_json(tmp_path, capsys):
    from lipstream.bench import warp as bench_warp

    parser = argparse.ArgumentParser()
    bench_warp.add_arguments(parser)
    threads = torch.get_num_threads()
    try:
        assert bench_warp.run(parser.parse_args(["--frames", "30", "--out-dir", str(tmp_path)])) == 0
    finally:
        torch.set_num_threads(threads)
    assert "| 720p |" in capsys.readouterr().out
    doc = json.loads(next(tmp_path.glob("warp-*.json")).read_text())
    assert doc["benchmark"] == "warp" and doc["settings"]["threads"] == 1
    row = doc["rows"][0]
    assert row["size"] == "720p" and row["frames_per_s"] > 0 and row["moving_fraction"] > 0.5


def test_bench_warp_faces_writes_figures_and_a_contact_sheet(tmp_path, capsys):
    from lipstream.bench import cli

    wav = tmp_path / "speech.wav"
    pause = silence(0.8)
    soundfile.write(wav, np.concatenate([pause, speech(1.5, seed=3), pause]), 16000)
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["bench", "warp-faces", "--faces", "astronaut", "nobody", "--audio", str(wav),
                              "--out-dir", str(tmp_path)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "nobody: skipped, unknown face" in out and "| astronaut |" in out
    doc = json.loads(next(tmp_path.glob("warp-faces-*.json")).read_text())
    (row,) = doc["rows"]
    assert row["face"] == "astronaut" and row["frames"] == 77 and row["silent_mouth_change"] == 0
    assert row["unsilent_r"] > 0.7 and row["chin_aperture_r"] > 0.7
    sheet = next(tmp_path.glob("warp-faces-*.jpg"))
    assert sheet.stat().st_size < 300_000
