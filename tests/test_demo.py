"""`lipstream demo`: offline, no weights (the warp engine), the astronaut avatar prepared once, an MP4
with video and audio; speech from an audio file, or from text through espeak-ng when it is installed."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import av
import numpy as np
import pytest
import soundfile

from lipstream.audio.load import SAMPLE_RATE as SR
from lipstream.bench.serve import free_port, stop_process
from lipstream.cli import main
from lipstream.demo import SAMPLE_AVATAR


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """(avatars root, an empty models root): no MuseTalk weights, so `auto` runs warp."""
    base = tmp_path_factory.mktemp("demo")
    (base / "models").mkdir()
    return base / "avatars", base / "models"


@pytest.fixture(scope="module")
def voice_wav(tmp_path_factory):
    """1.5 s of a voiced, syllable-like signal as a 44.1 kHz stereo WAV (resampled to 16 kHz mono on load)."""
    t = np.arange(int(1.5 * 44100)) / 44100
    voice = np.clip(np.sin(2 * np.pi * 2.5 * t), 0, None) * 0.4 * np.sin(2 * np.pi * 160 * t)
    path = tmp_path_factory.mktemp("speech") / "voice.wav"
    soundfile.write(path, np.stack([voice, voice], axis=1), 44100)
    return path


def demo(*args, roots) -> int:
    avatars, models = roots
    return main(["demo", *map(str, args), "--avatars", str(avatars), "--models", str(models)])


def decoded(path) -> tuple[int, tuple[int, int], float]:
    """(video frames, (height, width), audio seconds) of an MP4."""
    with av.open(str(path)) as container:
        frames = [f for f in container.decode(video=0)]
    with av.open(str(path)) as container:
        audio = sum(f.samples for f in container.decode(audio=0)) / container.streams.audio[0].sample_rate
    return len(frames), (frames[0].height, frames[0].width), audio


def test_demo_with_an_audio_file_prepares_the_sample_once_and_writes_an_mp4(tmp_path, roots, voice_wav, capsys):
    out = tmp_path / "demo.mp4"
    assert demo("-o", out, "--audio", voice_wav, roots=roots) == 0
    stdout = capsys.readouterr().out
    assert f"avatar: {SAMPLE_AVATAR} (prepared now" in stdout and "public domain" in stdout
    assert "engine warp: no MuseTalk weights" in stdout
    frames, size, seconds = decoded(out)
    assert frames == 37  # floor(1.5 s * 25)
    assert size == (512, 512)  # the astronaut photo
    assert abs(seconds - 1.5) <= 1024 / SR

    manifest = roots[0] / "v15" / "avatars" / SAMPLE_AVATAR / "lipstream.json"
    prepared_at = manifest.stat().st_mtime_ns
    assert demo("-o", tmp_path / "again.mp4", "--audio", voice_wav, roots=roots) == 0
    assert f"avatar: {SAMPLE_AVATAR} (prepared before" in capsys.readouterr().out
    assert manifest.stat().st_mtime_ns == prepared_at


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (optional system program)")
def test_demo_speaks_text_with_espeak(tmp_path, roots, capsys):
    out = tmp_path / "hello.mp4"
    assert demo("-o", out, "--text", "Hello, this is a test.", roots=roots) == 0
    assert "speech: espeak-ng" in capsys.readouterr().out
    frames, _, seconds = decoded(out)
    assert seconds > 1.0 and frames == pytest.approx(seconds * 25, abs=1)
    with av.open(str(out)) as container:
        audio = np.concatenate([f.to_ndarray()[0] for f in container.decode(audio=0)])
    assert np.sqrt(np.mean(audio ** 2)) > 0.02  # speech, not silence


def test_demo_without_espeak_says_how_to_install_it_or_to_pass_audio(tmp_path, roots, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without espeak-ng
    assert demo("-o", tmp_path / "demo.mp4", roots=roots) == 1
    err = capsys.readouterr().err
    assert "espeak-ng is not installed" in err and "apt-get install espeak-ng" in err and "--audio FILE" in err
    assert not (tmp_path / "demo.mp4").exists()


@pytest.mark.slow
def test_demo_serve_runs_the_server_with_the_sample_avatar(tmp_path, roots, voice_wav):
    avatars, models = roots
    port = free_port()
    command = [sys.executable, "-m", "lipstream.cli", "demo", "-o", str(tmp_path / "demo.mp4"), "--audio",
               str(voice_wav), "--serve", "--port", str(port), "--avatars", str(avatars), "--models", str(models)]
    env = {**os.environ, "LIPSTREAM_HOST": "127.0.0.1"}
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in server.stdout], daemon=True).start()
        deadline = time.monotonic() + 120
        url = None
        while url is None:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))  # queue.Empty: did not start in time
            if "open http://" in line:
                url = line.split("open ", 1)[1].strip()
        assert url.startswith(f"http://127.0.0.1:{port}/?key=")
        assert (tmp_path / "demo.mp4").is_file()  # rendered before serving
        key = url.split("key=", 1)[1]
        for _ in range(100):  # uvicorn binds the port after printing the URL
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/avatars?key={key}", timeout=5) as reply:
                    listed = json.loads(reply.read())
                break
            except OSError:
                time.sleep(0.2)
        assert SAMPLE_AVATAR in json.dumps(listed)
    finally:
        stop_process(server, signal.SIGINT)
