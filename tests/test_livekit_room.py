"""The example agent (examples/livekit_avatar_agent.py) in a real LiveKit room, with lipstream's face on a
lipstream server (the avatar joins as its own participant, publishing for the agent) and in the agent's
process (the agent's participant publishes it): a viewer in the room sees `avatar_video` and hears the
greeting on `avatar_audio`; when the room goes, the avatar leaves and its session closes.

Needs a LiveKit server: LIVEKIT_URL, LIVEKIT_API_KEY, LIVEKIT_API_SECRET (for `livekit-server --dev`:
ws://localhost:7880, devkey, secret); skipped without them. And espeak-ng (the agent's offline voice)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from livekit import api, rtc

from lipstream.client import LipstreamClient
from server_helpers import warp_server

LIVEKIT = {name: os.environ.get(name) for name in ("LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET")}
pytestmark = [
    pytest.mark.livekit,
    pytest.mark.anyio,
    pytest.mark.skipif(not all(LIVEKIT.values()), reason="needs a LiveKit server: set LIVEKIT_URL, LIVEKIT_API_KEY "
                       "and LIVEKIT_API_SECRET (livekit-server --dev: ws://localhost:7880, devkey, secret)"),
    pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="the example agent speaks with espeak-ng"),
]
EXAMPLE = Path(__file__).parents[1] / "examples" / "livekit_avatar_agent.py"
TIMEOUT_S = 90


def viewer_token(room: str) -> str:
    return (api.AccessToken(LIVEKIT["LIVEKIT_API_KEY"], LIVEKIT["LIVEKIT_API_SECRET"]).with_identity("viewer")
            .with_grants(api.VideoGrants(room_join=True, room=room)).to_jwt())


async def published(room: rtc.Room, name: str) -> tuple[rtc.RemoteParticipant, rtc.RemoteTrackPublication]:
    """The participant publishing a track `name`, and the track's publication, once subscribed."""
    while True:
        for participant in room.remote_participants.values():
            for publication in participant.track_publications.values():
                if publication.name == name and publication.track is not None:
                    return participant, publication
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("mode", ["server", "in-process"])
async def test_the_example_agent_has_a_face_in_a_livekit_room(tmp_path, mode):
    root = tmp_path / "avatars"
    room_name = f"lipstream-test-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, **LIVEKIT, "LIPSTREAM_AGENT_AVATAR": "astronaut", "AGENT_GREETING": "Hello there, viewer.",
           "LIPSTREAM_OUTPUT_HEIGHT": "128"}
    with warp_server(root, output_height=128) as lipstream:
        if mode == "server":
            env.update(LIPSTREAM_URL=lipstream.url, LIPSTREAM_API_KEY="k-default")
        else:  # the same avatars, read by the agent's own process
            env.update(LIPSTREAM_AVATARS=str(root), LIPSTREAM_ENGINE="warp", LIPSTREAM_MODELS=str(tmp_path / "none"))
        log_path = tmp_path / "agent.log"
        with log_path.open("w") as log:
            agent = await asyncio.create_subprocess_exec(sys.executable, str(EXAMPLE), "connect", "--room", room_name,
                                                         env=env, stdout=log, stderr=subprocess.STDOUT)
        viewer = rtc.Room()
        try:
            async with asyncio.timeout(TIMEOUT_S):
                await viewer.connect(LIVEKIT["LIVEKIT_URL"], viewer_token(room_name))
                face, video = await published(viewer, "avatar_video")
                _, sound = await published(viewer, "avatar_audio")
                agents = [p for p in viewer.remote_participants.values()
                          if p.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT and p is not face]
                if mode == "server":
                    assert face.identity == "lipstream-avatar" and len(agents) == 1
                    assert face.attributes.get("lk.publish_on_behalf") == agents[0].identity
                    async with LipstreamClient(lipstream.url, "k-default") as client:
                        [session] = await client.sessions()
                        assert session["viewer"] == "livekit"
                        assert 'lipstream_server_viewers{transport="livekit"} 1.0' in await client.metrics("k-metrics")
                else:
                    assert face.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT
                images = rtc.VideoStream(video.track)
                seen = []
                async for event in images:
                    seen.append((event.frame.width, event.frame.height))
                    if len(seen) == 25:
                        break
                assert all(height == 128 for _, height in seen), seen
                voice = rtc.AudioStream(sound.track, sample_rate=16000, num_channels=1)
                loudest = 0
                async for event in voice:  # the greeting comes within the first seconds
                    samples = np.frombuffer(bytes(event.frame.data), np.int16)
                    loudest = max(loudest, int(np.abs(samples).max(initial=0)))
                    if loudest > 1000:
                        break
                await images.aclose()
                await voice.aclose()
                async with api.LiveKitAPI(LIVEKIT["LIVEKIT_URL"], LIVEKIT["LIVEKIT_API_KEY"],
                                          LIVEKIT["LIVEKIT_API_SECRET"]) as livekit:
                    await livekit.room.delete_room(api.DeleteRoomRequest(room=room_name))
                if mode == "server":
                    async with LipstreamClient(lipstream.url, "k-default") as client:
                        while await client.sessions():
                            await asyncio.sleep(0.2)  # the avatar left with the room, and its session closed
        finally:
            await viewer.disconnect()
            agent.terminate()
            try:
                await asyncio.wait_for(agent.wait(), 20)
            except TimeoutError:
                agent.kill()
            print(log_path.read_text()[-5000:])  # the agent's log, shown when the test fails
