"""examples/pipecat_avatar_bot.py end to end, offline: an aiortc peer in the test connects to the echo bot
over SmallWebRTC (through Pipecat's request handler, as its runner connects a browser), speaks a
sentence, and gets the bot's video and audio: the bot answers in espeak-ng's voice, and the avatar's
mouth moves while the answer plays (and nothing else of the face does)."""

from __future__ import annotations

import asyncio
import fractions
import importlib.util
import shutil
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
import soxr
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack
from pipecat.transports.smallwebrtc.request_handler import SmallWebRTCRequest, SmallWebRTCRequestHandler

from lipstream.demo import synthesize_speech
from server_helpers import astronaut_avatar, store_avatar

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="the echo bot speaks with espeak-ng (not installed)"),
]
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "pipecat_avatar_bot.py"
HEIGHT = 256  # the avatar (512x512) is streamed at this size
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


async def test_the_echo_bot_answers_with_its_face_over_smallwebrtc(tmp_path, monkeypatch):
    store_avatar(tmp_path)
    for name, value in {"LIPSTREAM_AVATARS": str(tmp_path), "LIPSTREAM_ENGINE": "warp", "LIPSTREAM_MODELS":
                        str(tmp_path / "no-models"), "LIPSTREAM_OUTPUT_HEIGHT": str(HEIGHT),
                        "LIPSTREAM_BOT_AVATAR": "astronaut", "BOT_GREETING": ""}.items():
        monkeypatch.setenv(name, value)
    example = load_example()
    sentence = synthesize_speech("Hello there. Can you see me? I would like to talk with you for a while.")
    words = np.round(soxr.resample(sentence, 16000, RATE) * 32767).astype(np.int16)

    microphone = Microphone()
    pc = RTCPeerConnection()
    pc.addTrack(microphone)
    pc.addTransceiver("video", direction="recvonly")
    tracks: dict = {}
    pc.on("track", lambda track: tracks.__setitem__(track.kind, track))
    await pc.setLocalDescription(await pc.createOffer())
    handler = SmallWebRTCRequestHandler()
    bots: list[asyncio.Task] = []

    async def start(connection) -> None:
        bots.append(asyncio.create_task(example.run_bot(connection, example.BotConfig.from_env())))

    answer = await handler.handle_web_request(SmallWebRTCRequest(sdp=pc.localDescription.sdp, type="offer"), start)
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
    video, audio = [], []
    try:
        async with asyncio.timeout(30):
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
        async with asyncio.timeout(10):
            await asyncio.gather(*bots)  # the bot ends when the peer leaves
        await handler.close()

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
