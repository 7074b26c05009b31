"""Offline render with tiny random MuseTalk weights: exact frame counts, intact audio, untouched
background, the same frames as the engine and compositor called directly, and no output on errors."""

from __future__ import annotations

import av
import cv2
import numpy as np
import pytest
import soundfile

from lipstream.audio.load import SAMPLE_RATE as SR
from lipstream.avatar.store import save_avatar
from lipstream.bench import original
from lipstream.cli import main
from lipstream.engines.base import take
from lipstream.engines.musetalk import MuseTalkEngine
from lipstream.errors import AudioTooShortError
from lipstream.stream.compositor import Compositor
from lipstream.stream.render import render, render_frames
from lipstream.synthetic import moving_avatar, vowel
from lipstream.synthetic import speech as speech_like
from musetalk_tiny import write_tiny_musetalk

FRAME_HW = (181, 321)  # odd on purpose: the MP4 pads to even, the PNGs keep the size


@pytest.fixture(scope="module")
def models_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    write_tiny_musetalk(root)
    return root


@pytest.fixture(scope="module")
def engine(models_root) -> MuseTalkEngine:
    return MuseTalkEngine.load(models_root, device="cpu")


@pytest.fixture(scope="module")
def avatar():
    return moving_avatar(FRAME_HW, (120, 40, 200, 140), 3, step_px=3)


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    """1.23 s of a speech-like signal (30.75 frames at 25 fps -> 30 frames), float32 16 kHz, over a quiet vowel
    (-30 dBFS), so that every frame is voiced: all get a generated face."""
    return speech_like(1.23) + vowel(1.23, -30)


@pytest.fixture(scope="module")
def folder_render(tmp_path_factory, avatar, engine, speech):
    out = tmp_path_factory.mktemp("render") / "frames"
    result = render(avatar, engine, speech, out, fps=25, batch_size=4, progress=False)
    return result, out


def test_render_folder_has_floor_duration_times_fps_frames_and_the_exact_audio(folder_render, speech):
    result, out = folder_render
    assert result.path == out and result.frames == 30 == int(speech.size / SR * 25)
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == [f"{k:08d}.png" for k in range(30)]
    samples, rate = soundfile.read(out / "audio.wav", dtype="float32")
    assert rate == SR and np.array_equal(samples, speech)


def test_render_changes_only_the_face_boxes_of_the_cycle_frames(folder_render, avatar):
    _, out = folder_render
    for k in range(30):
        frame = cv2.imread(str(out / f"{k:08d}.png"))
        cycle = k % len(avatar)
        x1, y1, x2, y2 = avatar.face_boxes[cycle]
        outside = np.ones(frame.shape[:2], bool)
        outside[y1:y2, x1:x2] = False
        assert frame.shape == (*FRAME_HW, 3)
        assert np.array_equal(frame[outside], avatar.frames[cycle][outside]), f"frame {k} outside its face box"
        assert not np.array_equal(frame[y1:y2, x1:x2], avatar.frames[cycle][y1:y2, x1:x2])


def test_render_frames_are_the_engine_and_compositor_output(folder_render, avatar, engine, speech):
    """Frames 4..7 (the second batch of 4) recomputed by hand: cycle frames 1, 2, 0, 1, features 4..7."""
    _, out = folder_render
    material = engine.material(avatar)
    conditioning = engine.features(speech, 25)
    faces = engine.generate(take(material, [1, 2, 0, 1]), conditioning[4:8])
    expected = Compositor(avatar).compose([4, 5, 6, 7], faces)
    for k in range(4):
        assert np.array_equal(cv2.imread(str(out / f"{4 + k:08d}.png")), expected[k])


def test_render_mp4_is_playable_with_exact_frames_and_the_audio(tmp_path, avatar, engine, speech, folder_render):
    out = tmp_path / "speech.mp4"
    result = render(avatar, engine, speech, out, fps=25, batch_size=8, progress=False)
    assert result.path == out and result.frames == 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["speech.mp4"]
    with av.open(str(out)) as container:
        frames = [f.to_ndarray(format="bgr24") for f in container.decode(video=0)]
    with av.open(str(out)) as container:
        rate = container.streams.audio[0].codec_context.sample_rate
        audio = np.concatenate([f.to_ndarray()[0] for f in container.decode(audio=0)])
    assert len(frames) == 30
    assert frames[0].shape == (182, 322, 3)  # padded to even for yuv420p
    assert rate == SR and 0 <= audio.size - speech.size <= 1024  # within one AAC frame
    # the same pictures as the lossless PNGs, in BGR and in order (H.264 4:2:0 blurs the colour detail;
    # the random tiny-model faces are noise, the hardest content to encode)
    _, pngs = folder_render
    for k in (0, 13, 29):
        video = frames[k][:181, :321].astype(int)
        png, next_png = (cv2.imread(str(pngs / f"{i:08d}.png")).astype(int) for i in (k, (k + 1) % 30))
        assert np.abs(video - png).mean() < 8 < np.abs(video - png[..., ::-1]).mean()
        x1, y1, x2, y2 = avatar.face_boxes[k % len(avatar)]
        face_error = np.abs(video - png)[y1:y2, x1:x2].mean()
        assert face_error < 0.8 * np.abs(video - next_png)[y1:y2, x1:x2].mean()


def test_render_at_another_fps(tmp_path, avatar, engine, speech):
    result = render(avatar, engine, speech, tmp_path / "out", fps=30, batch_size=16, progress=False)
    assert result.frames == int(speech.size / SR * 30) == 36
    assert len(list((tmp_path / "out").glob("*.png"))) == 36


@pytest.mark.parametrize("samples", [0, 600])
def test_audio_shorter_than_a_frame_is_an_error_and_leaves_nothing(tmp_path, avatar, engine, samples):
    with pytest.raises(AudioTooShortError, match="shorter than one video frame"):
        render(avatar, engine, np.zeros(samples, np.float32), tmp_path / "out.mp4", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_silence_renders_a_video(tmp_path, avatar, engine):
    result = render(avatar, engine, np.zeros(SR // 5, np.float32), tmp_path / "quiet", progress=False)
    assert result.frames == 5 and len(list((tmp_path / "quiet").glob("*.png"))) == 5


def test_silent_frames_are_the_avatars_own_pixels_with_sharpening_on(avatar, engine, speech):
    """Speech, 1 s of digital silence, speech: after the 2-frame hangover the silent frames are the
    avatar's own frames byte for byte (the sharpening touches generated faces only); speech frames are not."""
    audio = np.concatenate([speech[:SR // 2], np.zeros(SR, np.float32), speech[:SR // 2]])  # 12.5 + 25 + 12.5
    frames = np.concatenate(list(render_frames(avatar, engine, audio, batch_size=4,
                                               compositor=Compositor(avatar, sharpen=True))))
    own = [np.array_equal(frame, avatar.frames[k % len(avatar)]) for k, frame in enumerate(frames)]
    assert len(frames) == 50 and all(own[15:37]) and not any(own[:12]) and not any(own[38:])


def test_the_silence_gate_waits_as_long_as_the_engine_needs_to_bring_the_mouth_to_rest(avatar, engine, speech,
                                                                                      monkeypatch):
    monkeypatch.setattr(engine, "silence_hangover_ms", 400.0)  # 10 frames at 25 fps
    audio = np.concatenate([speech[:SR // 2], np.zeros(SR, np.float32), speech[:SR // 2]])
    frames = np.concatenate(list(render_frames(avatar, engine, audio, batch_size=4)))
    own = [np.array_equal(frame, avatar.frames[k % len(avatar)]) for k, frame in enumerate(frames)]
    assert not any(own[:23]) and all(own[23:37])


def test_without_sharpening_a_frame_is_musetalks_own_composition(avatar, engine, speech):
    frames = list(render_frames(avatar, engine, speech, batch_size=4, compositor=Compositor(avatar, sharpen=False)))
    faces = engine.generate(take(engine.material(avatar), [1, 2, 0, 1]), engine.features(speech, 25)[4:8]).numpy()
    for k in range(4):
        i = (4 + k) % len(avatar)
        expected = original.musetalk_composition(avatar.frames[i], faces[k], tuple(avatar.face_boxes[i]),
                                                 avatar.masks[i], tuple(avatar.crop_boxes[i]))
        assert np.array_equal(frames[1][k], expected)


# ---- the `lipstream render` command: a stored avatar, an audio file, the engine choice, clear errors


@pytest.fixture(scope="module")
def avatars_root(tmp_path_factory, avatar):
    root = tmp_path_factory.mktemp("avatars")
    save_avatar(avatar, name="studio", root=root)
    return root


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory, speech):
    path = tmp_path_factory.mktemp("audio") / "speech.wav"
    soundfile.write(path, speech, SR, subtype="FLOAT")
    return path


def cli(*args, avatars_root, models_root) -> int:
    return main(["render", *map(str, args), "--avatars", str(avatars_root), "--models", str(models_root),
                 "--device", "cpu"])


def test_cli_renders_a_stored_avatar_by_name_and_says_which_engine(tmp_path, avatars_root, models_root,
                                                                     speech_wav, capsys):
    out = tmp_path / "clip.mp4"
    assert cli("studio", speech_wav, "-o", out, "--batch-size", "16",
               avatars_root=avatars_root, models_root=models_root) == 0
    stdout = capsys.readouterr().out
    assert f"engine musetalk: its weights are under {models_root}" in stdout  # auto found the weights
    assert f"wrote {out}: 30 frames (1.20 s at 25 fps)" in stdout
    with av.open(str(out)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 30


def test_cli_takes_an_avatar_folder_path(tmp_path, avatars_root, models_root, speech_wav, capsys):
    folder = avatars_root / "v15" / "avatars" / "studio"
    assert cli(folder, speech_wav, "-o", tmp_path / "frames", "--engine", "musetalk", "--fps", "10",
               avatars_root=tmp_path / "elsewhere", models_root=models_root) == 0
    assert "engine musetalk: asked for" in capsys.readouterr().out
    assert len(list((tmp_path / "frames").glob("*.png"))) == 12  # floor(1.23 s * 10)


def bad_inputs(tmp_path, speech_wav):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    no_samples = tmp_path / "no_samples.wav"
    soundfile.write(no_samples, np.zeros(0, np.float32), SR)
    blip = tmp_path / "blip.wav"
    soundfile.write(blip, np.zeros(160, np.float32), SR)
    return {
        "missing audio": (("studio", tmp_path / "missing.wav"), "does not exist"),
        "empty audio file": (("studio", empty), "is empty"),
        "audio without samples": (("studio", no_samples), "0 samples"),
        "audio shorter than a frame": (("studio", blip), "10 ms long, shorter than one video frame"),
        "unknown avatar": (("nobody", speech_wav), "no avatar 'nobody'"),
    }


@pytest.mark.parametrize("case", ["missing audio", "empty audio file", "audio without samples",
                                  "audio shorter than a frame", "unknown avatar"])
@pytest.mark.parametrize("output", ["out.mp4", "out"])
def test_cli_bad_inputs_fail_clearly_and_leave_no_output(tmp_path, avatars_root, models_root, speech_wav,
                                                          capsys, case, output):
    (avatar, audio), message = bad_inputs(tmp_path, speech_wav)[case]
    out_dir = tmp_path / "out_dir"
    out_dir.mkdir()
    assert cli(avatar, audio, "-o", out_dir / output, avatars_root=avatars_root, models_root=models_root) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and message in captured.err
    assert "engine" not in captured.out  # failed before loading an engine
    assert list(out_dir.iterdir()) == []


def test_cli_rejects_an_unsupported_output_before_rendering(tmp_path, avatars_root, models_root, speech_wav,
                                                            capsys):
    assert cli("studio", speech_wav, "-o", tmp_path / "out.avi", avatars_root=avatars_root,
               models_root=models_root) == 1
    assert "ending in .mp4" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cli_output_carries_the_inputs_own_audio_rate_and_channels(tmp_path, avatars_root, models_root, speech):
    """A 48 kHz stereo MP3 in: the MP4 has 48 kHz stereo AAC at 192 kb/s, close to the input; a WAV in: the
    folder's audio.wav holds its exact samples, rate and channels."""
    t = np.arange(round(speech.size * 3)) / 48000
    left = np.interp(t, np.arange(speech.size) / SR, speech)
    stereo = np.stack([left, 0.2 * np.sin(2 * np.pi * 440 * t)], axis=1).astype(np.float32)  # [n, 2]
    mp3 = tmp_path / "stereo.mp3"
    soundfile.write(mp3, stereo, 48000, format="MP3")
    out = tmp_path / "clip.mp4"
    assert cli("studio", mp3, "-o", out, avatars_root=avatars_root, models_root=models_root) == 0
    with av.open(str(out)) as container:
        stream = container.streams.audio[0]
        assert (stream.codec_context.name, stream.rate, stream.channels) == ("aac", 48000, 2)
        assert stream.bit_rate >= 150_000
        decoded = np.concatenate([f.to_ndarray() for f in container.decode(audio=0)], axis=1)  # [2, n]
    right = decoded[1, 4096:4096 + 48000]
    tone = 0.2 * np.sin(2 * np.pi * 440 * np.arange(right.size) / 48000)
    lag = max(range(48), key=lambda d: np.dot(right[d:d + 40000], tone[:40000]))  # the encoder's delay
    left = decoded[0, 4096:4096 + 48000]
    assert np.corrcoef(right[lag:lag + 40000], tone[:40000])[0, 1] > 0.95, "the right channel is the tone"
    assert abs(np.corrcoef(left[lag:lag + 40000], tone[:40000])[0, 1]) < 0.5, "the left one is not"
    wav = tmp_path / "stereo.wav"
    soundfile.write(wav, stereo, 48000, subtype="FLOAT")
    assert cli("studio", wav, "-o", tmp_path / "frames", avatars_root=avatars_root,
               models_root=models_root) == 0
    samples, rate = soundfile.read(tmp_path / "frames" / "audio.wav", dtype="float32")
    assert rate == 48000 and np.array_equal(samples, stereo)


@pytest.mark.parametrize("output", ["missing/dir/out.mp4", "missing/dir/frames/"])
def test_cli_a_missing_output_folder_is_an_error_and_no_folder_is_made(tmp_path, avatars_root, models_root,
                                                                      speech_wav, capsys, output):
    assert cli("studio", speech_wav, "-o", f"{tmp_path}/{output}", avatars_root=avatars_root,
               models_root=models_root) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not exist; create it first" in err
    assert not (tmp_path / "missing").exists()
