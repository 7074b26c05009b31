"""LipstreamVideoService in remote mode, against a real `lipstream serve` (warp engine) on loopback: speech
in and the avatar out through lipstream.client, and an unknown avatar, a refused key, an unreachable
server and a session the server closes mid-stream as ErrorFrames, never a hung pipeline."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from pipecat.frames.frames import InterruptionFrame, TTSAudioRawFrame, TTSStartedFrame, TTSStoppedFrame
from pipecat.tests.utils import SleepFrame

from lipstream.bench.serve import free_port, served
from lipstream.client import LipstreamClient
from lipstream.integrations.pipecat import LipstreamVideoService
from pipecat_helpers import errors, images, run, sounds, spoken, tts_frames, tts_speech
from server_helpers import store_avatar

pytestmark = pytest.mark.anyio
FPS = 25


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("avatars")
    store_avatar(root)
    flags = {"avatars_root": root, "engine": "warp", "output_height": 128, "models_root": root / "no-models"}
    with served(flags, root / "server.log") as (url, key):
        yield url, key


async def test_speech_through_a_lipstream_server(server):
    url, key = server
    pcm = tts_speech(1.6)
    service = LipstreamVideoService(avatar="astronaut", url=url, api_key=key)
    down, up = await run(service, [TTSStartedFrame(), *tts_frames(pcm, 16000), TTSStoppedFrame(), SleepFrame(1.0),
                                   InterruptionFrame(), SleepFrame(0.3), TTSStartedFrame(),
                                   *tts_frames(pcm[:16000], 16000), TTSStoppedFrame()])
    assert errors(up) == []
    cut = next(i for i, f in enumerate(down) if isinstance(f, InterruptionFrame))
    first, second = down[:cut], down[cut + 1:]
    assert all(p.size == (128, 128) and p.sync_with_audio for p in images(down))
    assert len(images(down)) == len(sounds(down))
    heard = spoken(first)
    assert 0.2 * 16000 < heard.size < 1.5 * 16000 and np.array_equal(heard, pcm[:heard.size]), \
        "the first answer plays until the interruption"
    again = spoken(second)
    assert np.array_equal(again[:16000], pcm[:16000]) and not again[16000:].any(), \
        "after the interruption only the second answer is heard, all of it"
    talking = [p for p in images(second) if p.metadata["lipstream"]["speaking"]]
    assert abs(len(talking) - FPS) <= 1
    async with LipstreamClient(url, key) as client:
        assert await client.sessions() == [], "the end of the pipeline closed the session"


@pytest.mark.parametrize("case, reason", [
    ("avatar", "no avatar 'nobody'"),
    ("key", "API key is not accepted"),
    ("unreachable", "cannot reach the lipstream server"),
])
async def test_a_session_that_cannot_open_is_an_error_frame(server, case, reason):
    url, key = server
    kwargs = {"avatar": "nobody" if case == "avatar" else "astronaut", "api_key": "wrong" if case == "key" else key,
              "url": f"http://127.0.0.1:{free_port()}" if case == "unreachable" else url}
    speech = tts_frames(tts_speech(0.2), 16000)
    down, up = await run(LipstreamVideoService(**kwargs), [TTSStartedFrame(), *speech, TTSStoppedFrame()])
    [error] = errors(up)
    assert reason in error and "could not open a session of avatar" in error
    assert not images(down) and [f for f in down if isinstance(f, TTSAudioRawFrame)] == speech


async def test_a_session_the_server_closes_mid_stream_is_an_error_frame(server):
    url, key = server
    service = LipstreamVideoService(avatar="astronaut", url=url, api_key=key)
    later = tts_frames(tts_speech(0.2), 16000)

    async def close_it() -> None:
        while service.session is None:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        async with LipstreamClient(url, key) as client:
            await client.close_session(service.session.id)

    closing = asyncio.create_task(close_it())
    down, up = await run(service, [SleepFrame(1.5), TTSStartedFrame(), *later, TTSStoppedFrame()])
    await closing
    [error] = errors(up)
    assert "ended" in error and "closed session" in error and "without a face" in error
    assert images(down), "frames came until the server closed the session"
    assert [f for f in down if isinstance(f, TTSAudioRawFrame)] == later, "then the voice goes on without a face"
