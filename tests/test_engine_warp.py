"""The `warp` engine on the astronaut photo: mouth states from audio, the mouth warp, the engine
interface, and engine selection."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess

import numpy as np
import pytest
import torch

from face_avatar import photo_avatar
from lipstream import imgproc
from lipstream.audio.load import load_audio
from lipstream.avatar.landmarks import (
    LIPS_OUTER,
    LOWER_LIP_INNER,
    MOUTH_LEFT,
    MOUTH_RIGHT,
    NOSE_TIP,
    UPPER_LIP_INNER,
    FaceMesh,
)
from lipstream.avatar.model import Avatar
from lipstream.engines.base import Engine, concat, take
from lipstream.engines.mouth_warp import EDGE, NOSE_BASE, warp_mouth
from lipstream.engines.select import load_engine
from lipstream.engines.warp import WarpEngine
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
def mesh():
    with FaceMesh() as m:
        yield m


def silence(seconds: float) -> np.ndarray:
    return np.zeros(round(seconds * 16000), np.float32)


@pytest.fixture(scope="module")
def bursts() -> np.ndarray:
    """0.4 s silence, a loud "a" (0.4 s, -14 dBFS), 0.4 s silence, the same 12 dB quieter, 0.6 s silence
    (each part a whole number of frames: frame 10 starts the first burst, frame 30 the second)."""
    return np.concatenate([silence(0.4), vowel(0.4, -14), silence(0.4), vowel(0.4, -26), silence(0.6)])


def test_material_and_interface(engine, avatar, material):
    assert isinstance(engine, Engine) and engine.name == "warp"
    assert engine.device == torch.device("cpu") and engine.dtype == torch.float32
    crops, landmarks = material["crops"], material["landmarks"]
    assert crops.dtype == torch.uint8 and crops.shape == (1, 256, 256, 3)
    assert torch.equal(crops, torch.from_numpy(avatar.crops))
    assert landmarks.dtype == torch.float32 and landmarks.shape == (1, 478, 2)
    # frame pixels mapped into the crop: the lips sit in the crop's lower half, inside it
    upper, lower = landmarks[0, UPPER_LIP_INNER], landmarks[0, LOWER_LIP_INNER]
    assert 128 < upper[1] < lower[1] < 230 and 80 < upper[0] < 176


def test_mouth_state_follows_loudness(engine, bursts):
    states = engine.features(bursts, FPS)
    assert states.dtype == torch.float32 and states.shape == (len(bursts) * FPS // 16000, 3)
    assert (states >= 0).all() and (states <= 1).all()
    open_ = states[:, 0]
    assert torch.equal(states[:9], torch.zeros(9, 3))  # silence, up to the frame before the burst
    assert open_[9] > 0  # the look-ahead: the mouth starts to move a frame early
    loud, quiet = open_[12:20], open_[32:40]
    assert loud.min() > 0.6 and quiet.min() > 0.1
    assert quiet.max() < loud.min()  # 12 dB quieter opens less
    assert torch.equal(states[28:29], torch.zeros(1, 3))  # closed again between the bursts
    assert torch.equal(states[-6:], torch.zeros(6, 3))  # and after them: an exact zero state


def test_mouth_shapes_follow_the_vowel(engine):
    """An "oo" (low formants) rounds the mouth, an "ee" (high second formant) widens it, an "a" neither."""
    oo = engine.features(vowel(0.4, -16, formants=(300, 800)), FPS)[4:]
    ee = engine.features(vowel(0.4, -16, formants=(300, 2300)), FPS)[4:]
    a = engine.features(vowel(0.4, -16, formants=(700, 1200)), FPS)[4:]
    assert oo[:, 2].min() > 0.3 and oo[:, 1].max() < 0.1
    assert ee[:, 1].min() > 0.3 and ee[:, 2].max() < 0.1
    assert a[:, 0].min() > 0.8 and a[:, 1:].max() < 0.1


def inner_lip_gap(mesh: FaceMesh, face: np.ndarray) -> float:
    points = mesh.detect(face)
    assert points is not None, "the face mesh must still find the face"
    return float(points[LOWER_LIP_INNER, 1] - points[UPPER_LIP_INNER, 1])


def test_rendered_mouth_opens_and_closes_with_the_audio(engine, material, mesh, bursts):
    states = engine.features(bursts, FPS)
    frames = [5, 15, 28, 35, 52]  # silence, loud, silence, quiet, silence
    faces = engine.generate(take(material, [0] * len(frames)), states[frames])
    crop = material["crops"][0]
    for k in (0, 2, 4):
        assert torch.equal(faces[k], crop)  # silence: the avatar's own face, byte for byte
    gaps = [inner_lip_gap(mesh, face) for face in faces.numpy()]
    assert gaps[1] > gaps[0] + 8  # loud: open wide
    assert gaps[0] + 2 < gaps[3] < gaps[1]  # quiet: open, less

    # the opening is dark: the mouth's box (the lips and a jaw drop below them) holds many more dark pixels
    (x1, y1), (x2, y2) = material["landmarks"][0, list(LIPS_OUTER)].aminmax(dim=0)
    box = slice(int(y1), int(y2) + 25), slice(int(x1), int(x2))

    def dark(face: torch.Tensor) -> int:
        return int((face[box].float().mean(-1) < 70).sum())

    assert dark(faces[1]) > dark(faces[0]) + 400 and dark(faces[3]) > dark(faces[0]) + 100


def test_only_the_mouth_region_moves(material):
    crop, landmarks = material["crops"][0].numpy(), material["landmarks"][0].numpy()
    axis = landmarks[MOUTH_RIGHT] - landmarks[MOUTH_LEFT]
    down = np.array([-axis[1], axis[0]]) / np.hypot(*axis)  # the face's "down", square to the mouth
    for state in ([1, 0, 0], [1, 1, 0], [1, 0, 1], [0.3, 0, 1]):
        face = warp_mouth(crop, landmarks, np.float32(state))
        changed = np.argwhere((face != crop).any(-1))
        assert changed.size, f"state {state} changes nothing"
        assert changed[:, 0].min() > landmarks[NOSE_TIP, 1]  # eyes and nose: untouched
        below_nose = (changed[:, ::-1] - landmarks[NOSE_BASE]) @ down
        assert below_nose.min() > 0  # nothing above the base of the nose moves
        # the crop's border band never moves, so the blend mask's soft edge has nothing to tear
        assert changed.min() >= EDGE and changed.max() < 256 - EDGE


def test_the_warp_neither_folds_nor_tears(material):
    """Warp an image whose colours are its own coordinates (green = x, red = 255 everywhere): outside
    the drawn mouth interior, coordinates must still rise along every row and column, in small steps."""
    landmarks = material["landmarks"][0].numpy()
    ramp = np.arange(256, dtype=np.uint8)
    chart = np.stack([np.repeat(ramp[:, None], 256, 1), np.repeat(ramp[None, :], 256, 0),
                      np.full((256, 256), 255, np.uint8)], -1)  # B = y, G = x, R = 255
    for state in ([1, 1, 0], [1, 0, 1]):
        face = warp_mouth(chart, landmarks, np.float32(state)).astype(int)
        warped = face[..., 2] == 255  # the interior is drawn darker than pure red
        assert 200 < (~warped).sum() < 5000
        for axis, channel in ((0, 0), (1, 1)):
            step = np.diff(face[..., channel], axis=axis)
            both = np.logical_and(*(np.take(warped, range(a, a + 255), axis=axis) for a in (0, 1)))
            assert step[both].min() >= -1  # no fold (1 for rounding)
            assert step[both].max() <= 3  # no tear: at most a 3x stretch
        assert np.abs(face[..., :2] - chart[..., :2]).max() > 10


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
    subprocess.run(["espeak-ng", "-w", str(wav), "Hello, this is the warp engine speaking."], check=True)
    audio = np.concatenate([load_audio(wav), silence(0.5)])
    states = engine.features(audio, FPS)
    speech = states[:-13, 0]
    assert (speech > 0.3).float().mean() > 0.4 and (speech < 0.2).any()  # opens, and closes between words
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
    assert row["size"] == "720p" and row["frames_per_s"] > 0 and row["open_fraction"] > 0.5
