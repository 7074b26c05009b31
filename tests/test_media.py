"""Media outputs: MP4 (H.264 + AAC) with exact frames and intact audio, PNG + WAV folders, no partial files."""

from __future__ import annotations

import av
import cv2
import numpy as np
import pytest
import soundfile
import torch

from lipstream.audio.load import SAMPLE_RATE as SR
from lipstream.errors import OutputPathError
from lipstream.media import OutputThread, encode_jpeg, open_output
from lipstream.media.frames_folder import FolderOutput
from lipstream.media.mp4 import Mp4Output


def frames_like_video(n: int, h: int, w: int) -> np.ndarray:
    """uint8 [n, h, w, 3] BGR: smooth colour ramps that move with the frame index (codec friendly,
    and a swapped channel order or a reordered frame shows up as a large difference)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.empty((n, h, w, 3), np.uint8)
    for k in range(n):
        out[k, ..., 0] = 40 + 150 * x / w
        out[k, ..., 1] = 200 - 150 * y / h
        out[k, ..., 2] = 30 + 7 * k
    return out


def tone(seconds: float, dtype=np.float32) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    x = 0.4 * np.sin(2 * np.pi * 220 * t) + 0.2 * np.sin(2 * np.pi * 530 * t)
    return x.astype(np.float32) if dtype == np.float32 else np.round(x * 32767).astype(np.int16)


def snr_db(got: np.ndarray, want: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(want.astype(np.float64) ** 2) / np.sum((got - want) ** 2)))


def decode(path) -> tuple[list[av.VideoFrame], np.ndarray, av.AudioStream]:
    with av.open(str(path)) as container:
        video = list(container.decode(video=0))
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate
        audio = np.concatenate([f.to_ndarray()[0] for f in container.decode(stream)])
    return video, audio, rate


def leftovers(folder, keep=()) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def test_mp4_has_exactly_the_frames_written_odd_size_padded_and_the_audio_intact(tmp_path):
    frames = frames_like_video(13, 61, 83)  # odd height and width
    audio = tone(0.77)
    path = tmp_path / "out.mp4"
    with open_output(path, 25, (61, 83), audio) as out:
        assert isinstance(out, Mp4Output)
        out.write(frames[:5])
        out.write(torch.from_numpy(frames[5:]))  # tensors are accepted too
    assert leftovers(tmp_path) == ["out.mp4"]

    video, decoded, rate = decode(path)
    assert len(video) == 13
    assert (video[0].height, video[0].width) == (62, 84)
    assert [round(f.time * 25, 6) for f in video] == list(range(13))
    for k, picture in enumerate(video):
        got = picture.to_ndarray(format="bgr24")
        assert np.abs(got[:61, :83].astype(int) - frames[k]).mean() < 3, f"frame {k} differs"
        assert np.abs(got[61].astype(int) - got[60]).mean() < 3  # the padding row repeats the last row

    assert rate == SR
    assert abs(decoded.size - audio.size) <= 1024  # AAC pads the last frame at most
    assert decoded.size >= audio.size
    assert snr_db(decoded[:audio.size], audio) > 30  # intact and not shifted by the encoder delay


def test_mp4_takes_int16_audio_and_no_audio(tmp_path):
    pcm = tone(0.5, np.int16)
    with open_output(tmp_path / "a.mp4", 25, (32, 32), pcm) as out:
        out.write(frames_like_video(12, 32, 32))
    _, decoded, _ = decode(tmp_path / "a.mp4")
    assert snr_db(decoded[:pcm.size], pcm / 32768.0) > 30
    assert np.abs(decoded).max() < 0.7  # scaled by 1/32768, not written as raw integers

    with open_output(tmp_path / "silent.mp4", 30, (32, 32)) as out:
        out.write(frames_like_video(7, 32, 32))
    with av.open(str(tmp_path / "silent.mp4")) as container:
        assert not container.streams.audio
        assert sum(1 for _ in container.decode(video=0)) == 7


@pytest.mark.parametrize("dtype, subtype", [(np.float32, "FLOAT"), (np.int16, "PCM_16")])
def test_folder_has_lossless_frames_and_the_exact_audio(tmp_path, dtype, subtype):
    frames = np.random.default_rng(0).integers(0, 256, (3, 21, 17, 3), dtype=np.uint8)
    audio = tone(0.3, dtype)
    target = tmp_path / "frames"
    with open_output(target, 25, (21, 17), audio) as out:
        assert isinstance(out, FolderOutput)
        out.write(frames[0])  # a single [H, W, 3] frame
        out.write(frames[1:])
    assert leftovers(tmp_path) == ["frames"]
    assert leftovers(target) == ["00000000.png", "00000001.png", "00000002.png", "audio.wav"]
    for k in range(3):
        assert np.array_equal(cv2.imread(str(target / f"{k:08d}.png")), frames[k])
    read, rate = soundfile.read(target / "audio.wav", dtype=audio.dtype)
    assert rate == SR and soundfile.info(target / "audio.wav").subtype == subtype
    assert np.array_equal(read, audio)


def test_folder_output_is_chosen_by_path(tmp_path):
    (tmp_path / "exists.mp4").mkdir()  # an existing folder is a folder, whatever its name
    assert isinstance(open_output(tmp_path / "exists.mp4", 25, (8, 8)), FolderOutput)
    assert isinstance(open_output(f"{tmp_path}/dotted.v2/", 25, (8, 8)), FolderOutput)
    assert isinstance(open_output(tmp_path / "UPPER.MP4", 25, (8, 8)), Mp4Output)
    with pytest.raises(OutputPathError, match=r"\.mp4"):
        open_output(tmp_path / "out.avi", 25, (8, 8))
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputPathError, match="is a file"):
        open_output(tmp_path / "file", 25, (8, 8))


def test_folder_replaces_a_previous_render_but_not_other_files(tmp_path):
    target = tmp_path / "out"
    with open_output(target, 25, (4, 4), tone(0.1)) as out:
        out.write(frames_like_video(5, 4, 4))
    with open_output(target, 25, (4, 4)) as out:
        out.write(frames_like_video(2, 4, 4))
    assert leftovers(target) == ["00000000.png", "00000001.png"]  # no stale frames or audio
    assert leftovers(tmp_path) == ["out"]

    (target / "notes.txt").write_text("mine")
    with pytest.raises(OutputPathError, match="notes.txt"):
        open_output(target, 25, (4, 4))
    assert (target / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("name", ["out.mp4", "out"])
def test_a_failed_output_leaves_nothing(tmp_path, name):
    with pytest.raises(RuntimeError, match="engine broke"), open_output(tmp_path / name, 25, (16, 16), tone(0.2)) as out:
        out.write(frames_like_video(3, 16, 16))
        raise RuntimeError("engine broke")
    assert leftovers(tmp_path) == []

    with pytest.raises(ValueError, match=r"uint8 \[B, 16, 16, 3\]"), open_output(tmp_path / name, 25, (16, 16)) as out:
        out.write(frames_like_video(1, 16, 18))
    with pytest.raises(ValueError, match="no frames"), open_output(tmp_path / name, 25, (16, 16)):
        pass
    assert leftovers(tmp_path) == []


def test_an_existing_output_survives_a_failed_render(tmp_path):
    path = tmp_path / "out.mp4"
    path.write_bytes(b"previous video")
    with pytest.raises(RuntimeError), open_output(path, 25, (16, 16)) as out:
        out.write(frames_like_video(2, 16, 16))
        raise RuntimeError("interrupted")
    assert path.read_bytes() == b"previous video"
    assert leftovers(tmp_path) == ["out.mp4"]


def test_output_thread_writes_everything_in_order_and_reports_errors(tmp_path):
    frames = np.random.default_rng(1).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    with open_output(tmp_path / "ok", 25, (8, 8)) as out, OutputThread(out, depth=1) as writer:
        for k in range(0, 6, 2):
            writer.write(frames[k:k + 2])
    assert all(np.array_equal(cv2.imread(str(tmp_path / "ok" / f"{k:08d}.png")), frames[k]) for k in range(6))

    with (pytest.raises(ValueError, match="frames must be uint8"),
          open_output(tmp_path / "bad.mp4", 25, (8, 8)) as out, OutputThread(out, depth=1) as writer):
        writer.write(frames[:1])
        for _ in range(4):  # the bad batch fails on the thread; later writes must not block
            writer.write(frames[:1, :4])
    assert leftovers(tmp_path) == ["ok"]


def test_encode_jpeg_round_trips():
    frame = frames_like_video(1, 48, 64)[0]
    data = encode_jpeg(frame, quality=90)
    assert data[:2] == b"\xff\xd8"
    back = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert back.shape == frame.shape and np.abs(back.astype(int) - frame).mean() < 3
    assert len(encode_jpeg(frame, quality=10)) < len(data)
    with pytest.raises(ValueError, match="uint8"):
        encode_jpeg(frame.astype(np.float32))
