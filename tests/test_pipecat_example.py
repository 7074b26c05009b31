"""examples/pipecat_avatar_bot.py end to end, offline: its web server (uvicorn) serves the page, an aiortc
peer in the test sends it a WebRTC offer as the page does, speaks a sentence over SmallWebRTC, and gets
the bot's video and audio: the bot answers in espeak-ng's voice, and the avatar's mouth moves while the
answer plays (and nothing else of the face does). And the page itself in Chromium: it connects, shows
the avatar, and the mouth moves while the bot greets."""

from __future__ import annotations

import asyncio
import fractions
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import httpx
import numpy as np
import pytest
import soxr
import uvicorn
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack

from lipstream.bench.serve import free_port, stop_process
from lipstream.demo import synthesize_speech
from server_helpers import SR, astronaut_avatar, store_avatar, wav_bytes

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="the echo bot speaks with espeak-ng (not installed)"),
]
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "pipecat_avatar_bot.py"
HEIGHT = 256  # the avatar (512x512) is streamed at this size
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
RATE = 48000
PTIME = 960  # samples of 20 ms


def load_example():
    spec = importlib.util.spec_from_file_location("pipecat_avatar_bot", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class Microphone(AudioStreamTrack):
    """A microphone for the test's peer: silence, and `say(samples)` (int16 [n] at 48 kHz) once, paced
    in real time in 20 ms frames."""

    def __init__(self):
        super().__init__()
        self._pending = np.zeros(0, np.int16)
        self._start: float | None = None
        self._pts = 0

    def say(self, samples: np.ndarray) -> None:
        self._pending = np.concatenate([self._pending, samples])

    async def recv(self) -> av.AudioFrame:
        if self._start is None:
            self._start = time.time()
        else:
            self._pts += PTIME
            await asyncio.sleep(max(0.0, self._start + self._pts / RATE - time.time()))
        chunk = np.zeros(PTIME, np.int16)
        take = min(PTIME, self._pending.size)
        chunk[:take], self._pending = self._pending[:take], self._pending[take:]
        frame = av.AudioFrame.from_ndarray(chunk[None], format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = RATE, self._pts, fractions.Fraction(1, RATE)
        return frame


async def collect(track, into: list) -> None:
    while True:
        frame = await track.recv()
        into.append((time.monotonic(), frame))


def regions() -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """(mouth, eyes) of the astronaut in the streamed frames, as (rows, columns)."""
    x1, y1, x2, y2 = (int(v * HEIGHT / 512) for v in astronaut_avatar().face_boxes[0])
    h, w = y2 - y1, x2 - x1
    mouth = slice(y1 + int(0.62 * h), y2 - int(0.08 * h)), slice(x1 + w // 4, x2 - w // 4)
    eyes = slice(y1 + int(0.2 * h), y1 + int(0.45 * h)), slice(x1 + w // 6, x2 - w // 6)
    return mouth, eyes


def bot_env(root: Path) -> dict[str, str]:
    """The example's environment: the astronaut avatar under `root`, the warp engine, frames of HEIGHT."""
    store_avatar(root)
    return {"LIPSTREAM_AVATARS": str(root), "LIPSTREAM_ENGINE": "warp", "LIPSTREAM_MODELS": str(root / "no-models"),
            "LIPSTREAM_OUTPUT_HEIGHT": str(HEIGHT), "LIPSTREAM_BOT_AVATAR": "astronaut"}


async def test_the_echo_bot_answers_with_its_face_over_smallwebrtc(tmp_path, monkeypatch):
    for name, value in {**bot_env(tmp_path), "BOT_GREETING": ""}.items():
        monkeypatch.setenv(name, value)
    example = load_example()
    config = example.BotConfig.from_env()
    face = await example.find_face(config)
    assert (face.avatar, face.width, face.height) == ("astronaut", HEIGHT, HEIGHT)
    sentence = synthesize_speech("Hello there. Can you see me?").mono_16k()
    words = np.round(soxr.resample(sentence, 16000, RATE) * 32767).astype(np.int16)
    server = uvicorn.Server(uvicorn.Config(example.create_app(config, face), host="127.0.0.1", port=free_port(),
                                           log_level="warning"))
    serving = asyncio.create_task(server.serve())
    microphone = Microphone()
    pc = RTCPeerConnection()
    video, audio = [], []
    try:
        async with asyncio.timeout(30):
            while not server.started:
                await asyncio.sleep(0.05)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.config.port}") as http:
                page = await http.get("/")
                assert page.status_code == 200 and "api/offer" in page.text
                pc.addTrack(microphone)
                pc.addTransceiver("video", direction="recvonly")
                tracks: dict = {}
                pc.on("track", lambda track: tracks.__setitem__(track.kind, track))
                await pc.setLocalDescription(await pc.createOffer())
                reply = await http.post("/api/offer", json={"sdp": pc.localDescription.sdp, "type": "offer"})
                assert reply.status_code == 200, reply.text
            await pc.setRemoteDescription(RTCSessionDescription(sdp=reply.json()["sdp"], type="answer"))
            while set(tracks) != {"audio", "video"}:
                await asyncio.sleep(0.05)
            listeners = [asyncio.create_task(collect(tracks["video"], video)),
                         asyncio.create_task(collect(tracks["audio"], audio))]
            while len(video) < 25:  # a second of the idle avatar first
                await asyncio.sleep(0.05)
            spoke_at = time.monotonic()
            microphone.say(words)
            done_at = spoke_at + words.size / RATE
            while time.monotonic() < done_at + 6.0 and not answered(audio, done_at):
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)
        for listener in listeners:
            listener.cancel()
    finally:
        await pc.close()
        server.should_exit = True
        async with asyncio.timeout(15):
            await serving  # the bot ends with the call, the server after it

    loud = [t for t, f in audio if t > done_at and np.abs(f.to_ndarray()).max() > 3000]
    assert loud, "the bot answered after the user spoke"
    begin, end = loud[0], loud[-1]
    assert end - begin > 1.0, "a sentence, not a click"
    images = [(t, f.to_ndarray(format="rgb24")) for t, f in video]
    assert all(image.shape == (HEIGHT, HEIGHT, 3) for _, image in images)
    assert len(images) > 20 * (images[-1][0] - images[0][0]), "about 25 frames a second"
    idle = np.mean([image for t, image in images if t < spoke_at], axis=0)
    mouth, eyes = regions()

    def change(image: np.ndarray, region) -> float:
        return float(np.abs(image[region].astype(float) - idle[region]).mean())

    answering = [image for t, image in images if begin <= t <= end]
    quiet = [image for t, image in images if t < spoke_at]
    noise = max(change(image, mouth) for image in quiet)
    moved = [change(image, mouth) for image in answering]
    assert sum(m > 3 * noise + 2 for m in moved) >= 5, f"the mouth moves while the answer plays ({noise=:.2f})"
    assert max(change(image, eyes) for image in answering) < max(moved) / 3, "the eyes stay still"


def answered(audio: list, after: float) -> bool:
    """Some loud bot audio came after `after`, and then a second of quiet."""
    loud = [t for t, f in audio if t > after and np.abs(f.to_ndarray()).max() > 3000]
    return bool(loud) and audio[-1][0] - loud[-1] > 1.0


MOUTH_TRACE = """([rows0, rows1, cols0, cols1]) => new Promise((done) => {
  const video = document.getElementById("bot"), canvas = document.createElement("canvas");
  canvas.width = video.videoWidth; canvas.height = video.videoHeight;
  const context = canvas.getContext("2d", {willReadFrequently: true});
  let first = null; const changes = [];
  const timer = setInterval(() => {
    context.drawImage(video, 0, 0);
    const pixels = context.getImageData(cols0, rows0, cols1 - cols0, rows1 - rows0).data;
    if (first === null) first = pixels.slice();
    let sum = 0; for (let i = 0; i < pixels.length; i += 4) sum += Math.abs(pixels[i] - first[i]);
    changes.push(sum / (pixels.length / 4));
    if (changes.length >= 60) { clearInterval(timer); done(changes); }
  }, 80);
})"""


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_the_page_connects_and_the_avatar_greets(tmp_path):
    from playwright.sync_api import sync_playwright

    quiet = tmp_path / "quiet.wav"
    quiet.write_bytes(wav_bytes(np.zeros(SR, np.float32)))
    port = free_port()
    env = {**os.environ, **bot_env(tmp_path / "avatars")}
    log = tmp_path / "bot.log"
    with log.open("wb") as out:
        bot = subprocess.Popen([sys.executable, str(EXAMPLE), "--host", "127.0.0.1", "--port", str(port)], env=env,
                               stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while f"open http://127.0.0.1:{port}/" not in log.read_text(errors="replace"):
            assert bot.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.1)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--no-sandbox", "--headless", "--disable-gpu", "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={quiet}",
                "--autoplay-policy=no-user-gesture-required", "--disable-features=WebRtcHideLocalIpsWithMdns"])
            try:
                page = browser.new_page()
                for attempt in range(50):  # uvicorn starts after the line above
                    try:
                        page.goto(f"http://127.0.0.1:{port}/")
                        break
                    except Exception:  # noqa: BLE001 - not listening yet
                        time.sleep(0.2)
                page.click("#connect")
                page.wait_for_function("document.getElementById('status').textContent === 'connected'", timeout=20000)
                page.wait_for_function("document.getElementById('bot').videoWidth > 0", timeout=20000)
                size = page.evaluate("[document.getElementById('bot').videoWidth, document.getElementById('bot').videoHeight]")
                mouth, _ = regions()
                changes = page.evaluate(MOUTH_TRACE, [mouth[0].start, mouth[0].stop, mouth[1].start, mouth[1].stop])
                page.click("#connect")  # hang up
                status = page.inner_text("#status")
            finally:
                browser.close()
    finally:
        stop_process(bot, signal.SIGTERM)
    assert size == [HEIGHT, HEIGHT]
    assert max(changes) > 10, f"the mouth moves while the bot greets: {changes}"
    assert status == "not connected"
