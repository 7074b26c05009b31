"""lipstream.client against a live server (uvicorn, warp engine): a session's speech in and frames out,
a file over REST, interrupt, each failure as its own LipstreamError, and the metrics with their key."""

from __future__ import annotations

import numpy as np
import pytest

from lipstream.bench.serve import free_port
from lipstream.client import LipstreamClient, decode_jpeg
from lipstream.errors import (
    ApiKeyError,
    AudioFormatError,
    AvatarNotFoundError,
    ServerUnreachableError,
    SessionClosedError,
    SessionNotFoundError,
)
from lipstream.synthetic import speech as speech_like
from server_helpers import warp_server, wav_bytes

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with warp_server(tmp_path_factory.mktemp("avatars"), output_height=128) as server:
        yield server


async def frames_until(session, event: str, limit: int = 150) -> list:
    """Frames up to and including the first that carries `event`."""
    frames = []
    async for frame in session.frames():
        frames.append(frame)
        if event in frame.events:
            return frames
        assert len(frames) < limit, f"no {event} within {limit} frames"
    raise AssertionError("the frames ended")


async def test_speech_in_frames_with_their_audio_out(server):
    async with LipstreamClient(server.url, "k-default") as client:
        assert (await client.wait_ready(5))["engine"] == "warp"
        assert [a["name"] for a in await client.avatars()] == ["astronaut"]
        session = await client.open_session("astronaut")
        assert (session.width, session.height, session.fps) == (128, 128, 25)
        assert session.hello["format"] == "LSP1"  # patch frames: the avatar's images once, then faces
        speech = np.round(speech_like(1.0) * 32767).astype(np.int16)
        for start in range(0, speech.size, 320):
            await session.push_audio(speech[start:start + 320])
        await session.end_speech()
        frames = await frames_until(session, "speech_started")
        frames += await frames_until(session, "speech_ended")
        await session.aclose()
        await session.aclose()  # idempotent
        assert await client.sessions() == []
    assert [f.index for f in frames] == list(range(frames[0].index, frames[0].index + len(frames)))
    assert all(f.image.shape == (128, 128, 3) and f.image.dtype == np.uint8 and f.jpeg is None for f in frames)
    spoken = [f for f in frames if f.speaking]
    assert spoken[0].events == ["speech_started"] and frames[-1].events == ["speech_ended"]
    audio = np.concatenate([f.audio for f in spoken])
    assert np.array_equal(audio[:speech.size], speech) and not audio[speech.size:].any()
    idle = frames[0].image.astype(int)
    assert max(int(np.abs(f.image.astype(int) - idle).max()) for f in spoken) > 60, "the mouth moves"


async def test_a_file_over_rest_and_an_interrupt(server):
    async with LipstreamClient(server.url, "k-default") as client:
        session = await client.open_session("astronaut", frames="jpeg")  # whole JPEG frames
        assert session.hello["format"] == "LSF1"
        reply = await session.push_file(wav_bytes(speech_like(3.0)), end=True)
        assert reply["seconds"] == pytest.approx(3.0)
        started = await frames_until(session, "speech_started")
        assert np.array_equal(started[-1].image, decode_jpeg(started[-1].jpeg))
        await session.interrupt()
        after = await frames_until(session, "interrupted")
        assert not after[-1].speaking and not after[-1].audio.any()
        assert (await session.stats())["interrupts"] == 1
        await session.aclose()


async def test_errors_are_lipstream_errors(server):
    async with LipstreamClient(server.url, "k-default") as client:
        with pytest.raises(AvatarNotFoundError, match="nobody"):
            await client.open_session("nobody")
        session = await client.open_session("astronaut")
        with pytest.raises(AudioFormatError, match="int16 or float32"):
            await session.push_audio(np.zeros(10, np.float64))
        await client.close_session(session.id)  # closed by someone else while it streams
        with pytest.raises(SessionClosedError, match=f"closed session {session.id}"):
            async for _ in session.frames():
                pass
        with pytest.raises(SessionNotFoundError):
            await client.session_stats(session.id)
        await session.aclose()
        assert await client.sessions() == []
    async with LipstreamClient(server.url, "wrong") as client:
        with pytest.raises(ApiKeyError, match="not accepted"):
            await client.avatars()
    async with LipstreamClient(f"http://127.0.0.1:{free_port()}", "k-default", timeout_s=2) as client:
        with pytest.raises(ServerUnreachableError, match="cannot reach"):
            await client.open_session("astronaut")


async def test_metrics_take_the_metrics_key_not_an_api_key(server):
    async with LipstreamClient(server.url, "k-default") as client:
        assert "# TYPE lipstream_server_viewers gauge" in await client.metrics("k-metrics")
        with pytest.raises(ApiKeyError, match="metrics key"):
            await client.metrics()
