"""The agent's side of the LiveKit avatar, without a LiveKit server: the token it mints for the avatar
(decoded and verified), the in-process wiring into an AgentSession, and the lipstream server's answers
through lipstream.client. Joining a real room: test_livekit_room.py."""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
import sys
import time
from datetime import timedelta
from pathlib import Path

import jwt
import pytest
from livekit import api, rtc
from livekit.agents import AgentSession
from livekit.agents.voice.avatar import QueueAudioOutput

from lipstream.bench.serve import free_port
from lipstream.client import LipstreamClient
from lipstream.errors import LiveKitJoinError, LiveKitTokenError, SessionNotFoundError, SettingsError
from lipstream.integrations.livekit import AvatarSession, avatar_token
from lipstream.integrations.local import LocalSessions
from pipecat_helpers import tts_speech
from server_helpers import server_settings, store_avatar, warp_server

pytestmark = pytest.mark.anyio
LK_KEY, LK_SECRET = "devkey", "a-secret-of-at-least-32-characters-long"


def test_the_avatar_token_lets_it_join_the_room_as_an_agent_publishing_for_the_agent():
    minted = avatar_token(room="room-7", agent_identity="agent-AJ_1", api_key=LK_KEY, api_secret=LK_SECRET,
                          ttl=timedelta(minutes=10))
    claims = api.TokenVerifier(LK_KEY, LK_SECRET).verify(minted)  # checks the signature too
    assert (claims.identity, claims.name, claims.kind) == ("lipstream-avatar", "lipstream", "agent")
    assert claims.video.room_join is True and claims.video.room == "room-7"
    assert claims.attributes == {"lk.publish_on_behalf": "agent-AJ_1"}
    raw = jwt.decode(minted, LK_SECRET, algorithms=["HS256"], issuer=LK_KEY)
    assert raw["exp"] - raw["nbf"] == 600 and raw["exp"] > time.time()
    with pytest.raises(jwt.InvalidSignatureError):
        api.TokenVerifier(LK_KEY, "another-secret-of-at-least-32-characters").verify(minted)
    named = api.TokenVerifier(LK_KEY, LK_SECRET).verify(avatar_token(
        room="r", agent_identity="a", api_key=LK_KEY, api_secret=LK_SECRET, identity="face-2", name="Face"))
    assert (named.identity, named.name) == ("face-2", "Face")


async def test_in_process_one_call_makes_the_avatar_the_agent_s_audio_output(tmp_path):
    """No room can be joined here: the runner waits for it to publish, but the agent's audio must
    already reach the lipstream session."""
    store_avatar(tmp_path)
    host = LocalSessions(server_settings(tmp_path, engine="warp", output_height=128))
    agent_session = AgentSession()
    avatar = AvatarSession(avatar="astronaut", host=host)
    await avatar.start(agent_session, rtc.Room())
    try:
        output = agent_session.output.audio
        assert isinstance(output, QueueAudioOutput) and output.sample_rate == 16000
        assert avatar.provider == "lipstream" and avatar.session_id is not None
        pcm = tts_speech(0.5)
        for at in range(0, pcm.size, 1600):
            await output.capture_frame(rtc.AudioFrame(pcm[at:at + 1600].tobytes(), 16000, 1, 1600))
        output.flush()
        [session] = host._open
        async with asyncio.timeout(10):
            while session.session.stats()["audio_queued_s"] < 0.5:
                await asyncio.sleep(0.02)
        assert session.id == avatar.session_id
    finally:
        await avatar.aclose()
    assert not host._open and host._scheduler is None, "closing the avatar closed its session"


async def test_on_a_server_the_avatar_needs_the_livekit_credentials(monkeypatch):
    for name in ("LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET"):
        monkeypatch.delenv(name, raising=False)
    avatar = AvatarSession(avatar="astronaut", url="http://127.0.0.1:1", api_key="k")
    with pytest.raises(SettingsError, match="LIVEKIT_URL, LIVEKIT_API_KEY, LIVEKIT_API_SECRET"):
        await avatar.start(AgentSession(), rtc.Room())
    with pytest.raises(ValueError, match="either url"):
        AvatarSession(avatar="astronaut", url="http://127.0.0.1:1", host=LocalSessions())


async def test_the_server_s_refusals_come_back_as_their_errors(tmp_path):
    with warp_server(tmp_path) as server:
        async with LipstreamClient(server.url, "k-default") as client:
            nowhere = f"ws://127.0.0.1:{free_port()}"
            good = avatar_token(room="r", agent_identity="a", api_key=LK_KEY, api_secret=LK_SECRET)
            with pytest.raises(LiveKitJoinError, match="could not join the LiveKit room"):
                await client.create_livekit_session("astronaut", nowhere, good)
            with pytest.raises(LiveKitTokenError, match="not a JWT"):
                await client.create_livekit_session("astronaut", nowhere, "nope")
            with pytest.raises(SessionNotFoundError):
                await client.close_livekit_session("nope")
            assert await client.sessions() == []


def example_agent():
    """examples/livekit_avatar_agent.py as a module (it runs in a LiveKit room: test_livekit_room.py)."""
    path = Path(__file__).parents[1] / "examples" / "livekit_avatar_agent.py"
    spec = importlib.util.spec_from_file_location("livekit_avatar_agent", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


async def test_the_example_agent_reads_its_settings_and_speaks_offline():
    example = example_agent()
    config = example.AgentConfig.from_env({})
    assert (config.avatar, config.url, config.stt, config.llm, config.tts) == ("demo-astronaut", None, None, None, None)
    config = example.AgentConfig.from_env({"LIPSTREAM_URL": "http://gpu:2160", "LLM_SERVICE": "m:LLM",
                                           "LLM_ARGS": '{"model": "x"}', "AGENT_GREETING": ""})
    assert config.url == "http://gpu:2160" and config.llm == ("m:LLM", {"model": "x"}) and config.greeting == ""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (the example's offline voice)")
    frames = [frame async for frame in await example.espeak_frames("Hello.")]
    assert len(frames) > 3 and all((f.sample_rate, f.num_channels) == (16000, 1) for f in frames)
    assert all(f.samples_per_channel == 1600 for f in frames[:-1])
