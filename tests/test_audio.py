"""Audio input and MuseTalk's offline audio features (reference/musetalk_v15_spec.md section 3)."""

from __future__ import annotations

import io
import math

import av
import numpy as np
import pytest
import soundfile as sf
import torch

from audio_helpers import tiny_whisper
from lipstream.audio import (
    PcmStream,
    audio_features,
    decode_pcm16,
    frame_windows,
    load_audio,
    num_video_frames,
    rms_dbfs,
    whisper_steps,
)
from lipstream.audio.features import num_whisper_steps
from lipstream.audio.load import resampler_delay
from lipstream.errors import (
    AudioDecodeError,
    AudioFormatError,
    AudioNotFoundError,
    AudioTooLongError,
    EmptyAudioError,
    NoAudioStreamError,
)


@pytest.fixture(scope="module")
def whisper():
    return tiny_whisper()


def sine(freq: float, seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def peak_hz(samples: np.ndarray, rate: int = 16000) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(samples.size)))
    return float(np.argmax(spectrum) * rate / samples.size)


def encode_with_pyav(samples: np.ndarray, rate: int, fmt: str, codec: str) -> bytes:
    """float32 [n, channels] -> an encoded file's bytes."""
    buffer = io.BytesIO()
    layout = "stereo" if samples.shape[1] == 2 else "mono"
    with av.open(buffer, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate, layout=layout)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples.T), format="fltp", layout=layout)
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    return buffer.getvalue()


# ---------------------------------------------------------------- load


@pytest.mark.parametrize("fmt", ["WAV", "FLAC"])
def test_load_44k_stereo_resamples_and_downmixes(tmp_path, fmt):
    left, right = sine(440, 1.0, 44100, 0.6), sine(440, 1.0, 44100, 0.2)
    path = tmp_path / f"a.{fmt.lower()}"
    sf.write(path, np.stack([left, right], axis=1), 44100, format=fmt)
    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.shape == (16000,)  # ceil(44100 * 16000/44100)
    assert abs(peak_hz(audio) - 440) < 2
    assert abs(np.abs(audio[1000:-1000]).max() - 0.4) < 0.01  # mean of the channels


def test_load_8k_flac_upsamples(tmp_path):
    path = tmp_path / "b.flac"
    sf.write(path, sine(1000, 0.75, 8000), 8000)
    audio = load_audio(path)
    assert audio.shape == (12000,)
    assert abs(peak_hz(audio) - 1000) < 3


def test_load_16k_wav_is_exact(tmp_path):
    pcm = (np.random.default_rng(0).uniform(-0.9, 0.9, 8000) * 32768).astype(np.int16)
    path = tmp_path / "c.wav"
    sf.write(path, pcm, 16000, subtype="PCM_16")
    np.testing.assert_array_equal(load_audio(path), pcm.astype(np.float32) / 32768)


def test_load_mp3_bytes():
    stereo = np.stack([sine(330, 1.0, 44100), sine(330, 1.0, 44100)], axis=1)
    audio = load_audio(encode_with_pyav(stereo, 44100, "mp3", "libmp3lame"))
    assert abs(audio.shape[0] - 16000) < 16000 * 0.06  # the codec may add or trim a frame
    assert abs(peak_hz(audio) - 330) < 3


def test_silence_is_valid_audio(tmp_path):
    path = tmp_path / "silence.wav"
    sf.write(path, np.zeros(1600, np.float32), 16000)
    audio = load_audio(path)
    assert audio.shape == (1600,) and rms_dbfs(audio) == -math.inf


def test_rms_dbfs():
    assert rms_dbfs(sine(1000, 1.0, 16000, 1.0)) == pytest.approx(-3.01, abs=0.01)
    assert rms_dbfs(np.full(100, 0.1, np.float32)) == pytest.approx(-20.0, abs=1e-4)


def test_corrupt_bytes_raise_decode_error():
    junk = np.random.default_rng(1).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    with pytest.raises(AudioDecodeError, match=r"upload\.mp3"):
        load_audio(junk, name="upload.mp3")


def test_text_file_raises_no_audio_stream(tmp_path):
    path = tmp_path / "notes.txt"  # FFmpeg reads text as a "tty" video: no audio stream
    path.write_text("this is not audio\n" * 50)
    with pytest.raises(NoAudioStreamError, match=r"notes\.txt"):
        load_audio(path)


def test_truncated_file_raises_decode_error(tmp_path):
    path = tmp_path / "cut.flac"
    sf.write(path, sine(440, 1.0, 16000), 16000)
    path.write_bytes(path.read_bytes()[:30])  # header cut short
    with pytest.raises(AudioDecodeError, match=r"cut\.flac"):
        load_audio(path)


def test_video_without_audio_raises_no_audio_stream(tmp_path):
    path = tmp_path / "silent.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for _ in range(3):
            frame = av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    with pytest.raises(NoAudioStreamError, match=r"silent\.mp4"):
        load_audio(path)


def test_empty_inputs_raise_empty_audio(tmp_path):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(EmptyAudioError, match=r"empty\.wav"):
        load_audio(empty)
    with pytest.raises(EmptyAudioError):
        load_audio(b"")
    no_samples = tmp_path / "zero.wav"
    sf.write(no_samples, np.zeros(0, np.float32), 16000)
    with pytest.raises(EmptyAudioError, match=r"zero\.wav"):
        load_audio(no_samples)


def test_missing_file_raises_not_found(tmp_path):
    with pytest.raises(AudioNotFoundError, match=r"nope\.wav"):
        load_audio(tmp_path / "nope.wav")


def test_too_long_raises(tmp_path):
    path = tmp_path / "long.wav"
    sf.write(path, sine(200, 2.0, 22050), 22050)
    with pytest.raises(AudioTooLongError, match=r"long\.wav"):
        load_audio(path, max_seconds=1.5)
    assert load_audio(path, max_seconds=2.0).shape == (math.ceil(44100 * 16000 / 22050),)


def test_a_declared_length_over_the_limit_is_refused_before_decoding(tmp_path):
    path = tmp_path / "long.flac"
    sf.write(path, sine(200, 3.0, 48000), 48000, format="FLAC")
    with pytest.raises(AudioTooLongError, match=r"it declares 3\.0 s"):
        load_audio(path, max_seconds=2.0)


def test_an_absurd_sample_rate_is_refused_before_decoding():
    """FLAC allows 655350 Hz: 599 s of it would decode to 1.5 GB of float samples."""
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(655350, np.float32), 655350, format="FLAC")
    with pytest.raises(AudioFormatError, match="655350 Hz"):
        load_audio(buffer.getvalue())


def test_decoding_holds_only_the_16k_result(tmp_path):
    """10 s of 192 kHz stereo is resampled as it is decoded: the float samples held at any time are
    about the 16 kHz result (640 kB), not the source's 7.7 MB of mono floats."""
    import tracemalloc

    path = tmp_path / "hi.wav"
    tone = sine(440, 10.0, 192000)
    sf.write(path, np.stack([tone, tone], axis=1), 192000, subtype="PCM_16")
    tracemalloc.start()
    try:
        audio = load_audio(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert audio.shape == (160000,) and abs(peak_hz(audio) - 440) < 2
    assert peak < 4 * audio.nbytes, f"peak {peak / 1e6:.1f} MB while decoding"


def test_pcm_stream_matches_one_shot():
    stereo = np.stack([sine(300, 1.0, 48000), sine(500, 1.0, 48000)], axis=1)
    data = (stereo * 32767).astype("<i2").tobytes()
    stream = PcmStream(48000, channels=2)
    pieces = [stream.push(data[i:i + 777]) for i in range(0, len(data), 777)]
    chunked = np.concatenate([*pieces, stream.flush()])
    whole = decode_pcm16(data, 48000, channels=2)
    assert whole.shape == chunked.shape == (16000,)
    np.testing.assert_allclose(chunked[50:-50], whole[50:-50], atol=1 / 32768)
    np.testing.assert_allclose(chunked, whole, atol=0.01)  # the ends: each pads the edges its own way
    live = PcmStream(24000)  # low delay: a 40 ms chunk comes out at once, but for a millisecond
    assert [live.push(data[i:i + 1920]).size for i in range(0, 3 * 1920, 1920)] == [624, 640, 640]
    assert resampler_delay(24000) == 16 and resampler_delay(8000) == 32 and resampler_delay(16000) == 0
    paced = PcmStream(24000, lead_in=True)  # that millisecond as silence first: out keeps pace with in
    for _ in range(2):  # and again after a flush
        out = [paced.push(data[i:i + 1920]) for i in range(0, 3 * 1920, 1920)]
        assert [o.size for o in out] == [640, 640, 640] and not out[0][:16].any() and out[0][16:].any()
        assert paced.flush().size == 16
    passthrough = PcmStream(16000)
    assert passthrough.push(b"\x00\x40\x00").tolist() == [0.5]  # the odd byte waits for the next chunk
    assert passthrough.push(b"\xc0").tolist() == [-0.5]


# ---------------------------------------------------------------- frame windows


def reference_windows(steps: np.ndarray, fps: int, count: int) -> np.ndarray:
    """MuseTalk's windowing written out loop by loop: pad ceil(50/fps)*2 zero steps in front and
    ceil(50/fps)*6 behind, take 10 steps from floor(f*50/fps), flatten time-major."""
    pad = math.ceil(50 / fps)
    hidden, dim = steps.shape[1:]
    padded = np.concatenate([np.zeros((2 * pad, hidden, dim)), steps, np.zeros((6 * pad, hidden, dim))])
    out = np.zeros((count, 10 * hidden, dim))
    for f in range(count):
        start = math.floor(f * (50 / fps))
        for t in range(10):
            for layer in range(hidden):
                out[f, t * hidden + layer] = padded[start + t, layer]
    return out


@pytest.mark.parametrize("fps", [25, 30, 24])
@pytest.mark.parametrize("num_samples", [16000, 23456, 18560, 700])
def test_frame_windows_match_reference(fps, num_samples):
    steps = torch.randn(num_whisper_steps(num_samples), 5, 6, dtype=torch.float64)
    frames = num_video_frames(num_samples, fps)
    got = frame_windows(steps, fps, 0, frames)
    expected = reference_windows(steps.numpy(), fps, frames)
    assert got.shape == (frames, 50, 6)
    np.testing.assert_array_equal(got.numpy(), expected)


def test_frame_windows_at_25fps_are_steps_2f_minus_4_to_2f_plus_6():
    steps = torch.randn(100, 5, 3)
    windows = frame_windows(steps, 25, 0, 50)
    for f in range(50):
        for t, step in enumerate(range(2 * f - 4, 2 * f + 6)):
            expected = steps[step] if 0 <= step < 100 else torch.zeros(5, 3)
            assert torch.equal(windows[f, 5 * t:5 * t + 5], expected)


def test_frame_windows_with_offset_and_first_frame():
    steps = torch.randn(300, 5, 4)
    whole = frame_windows(steps, 25, 0, 140)
    part = frame_windows(steps[90:200], 25, 50, 97, step_offset=90)
    assert torch.equal(part, whole[50:97])


def test_frame_counts():
    for fps in (25, 30):
        for seconds in (0.01, 1.0, 1.37, 4.999, 31.2):
            n = round(seconds * 16000)
            assert num_video_frames(n, fps) == math.floor(n / 16000 * fps)
    assert num_video_frames(18560, 25) == 28  # MuseTalk's float arithmetic; exact division gives 29


# ---------------------------------------------------------------- whisper features


def test_features_follow_musetalk_path(whisper):
    encoder, extractor = whisper
    audio = np.random.default_rng(2).standard_normal(21999).astype(np.float32) * 0.1
    mel = extractor(audio, sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        hidden = encoder(mel, output_hidden_states=True).hidden_states
    direct = torch.stack(hidden, dim=2)[0, :68]  # floor(21999/16000*50) = 68
    steps = whisper_steps(audio, encoder, extractor)
    torch.testing.assert_close(steps, direct)
    for fps in (25, 30):
        features = audio_features(audio, encoder, extractor, fps=fps)
        assert features.shape == (math.floor(21999 / 16000 * fps), 50, 32)
        expected = reference_windows(direct.numpy(), fps, features.shape[0])
        np.testing.assert_allclose(features.numpy(), expected, atol=1e-6)


def test_features_over_30s_use_one_pass_per_segment(whisper):
    encoder, extractor = whisper
    audio = np.random.default_rng(3).standard_normal(480000 + 40000).astype(np.float32) * 0.1
    steps = whisper_steps(audio, encoder, extractor, batch_segments=2)
    assert steps.shape == (1625, 5, 32)
    second = whisper_steps(audio[480000:], encoder, extractor)
    torch.testing.assert_close(steps[1500:], second, atol=1e-5, rtol=1e-4)
    one_by_one = whisper_steps(audio, encoder, extractor, batch_segments=1)
    torch.testing.assert_close(steps, one_by_one, atol=1e-5, rtol=1e-4)
    features = audio_features(audio, encoder, extractor)
    assert features.shape == (812, 50, 32)  # floor(520000/16000*25)
    torch.testing.assert_close(features[750:752], frame_windows(steps, 25, 750, 752))


def test_features_use_the_encoder_dtype(whisper):
    encoder, extractor = whisper
    audio = np.zeros(4000, np.float32)
    features = audio_features(audio, encoder.double(), extractor)
    encoder.float()
    assert features.dtype == torch.float64 and features.shape == (6, 50, 32)
    with pytest.raises(ValueError):
        audio_features(np.zeros(0, np.float32), encoder, extractor)
    with pytest.raises(ValueError):
        audio_features(audio, encoder, extractor, fps=29.97)
