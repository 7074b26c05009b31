"""POST/DELETE /api/livekit/sessions without a LiveKit server (none runs here): keys and tenants, the
per-key limit, the URL and token checked before anything is made, a room that cannot be joined (a
closed port: LiveKit's SDK gives up at once) as a 502 with no session left behind, and a server without
the livekit extra as a 501. Joining a real room: test_livekit_room.py."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
import time
from datetime import timedelta

import pytest
from livekit import api

from lipstream.bench.serve import free_port
from lipstream.engines.warp import WarpEngine
from lipstream.errors import LiveKitTokenError
from lipstream.server.app import create_app
from lipstream.server.livekit_rooms import RoomGrant, room_grant
from server_helpers import server_settings, start, store_tenant_avatars

DEFAULT = {"Authorization": "Bearer k-default"}
OTHER = {"X-API-Key": "k-other"}
LK_KEY, LK_SECRET = "devkey", "a-secret-of-at-least-32-characters-long"


def token(room: str = "room-1", identity: str = "lipstream-avatar", agent: str | None = "agent-1", *,
          join: bool = True, ttl: timedelta | None = None) -> str:
    minted = api.AccessToken(LK_KEY, LK_SECRET).with_kind("agent").with_identity(identity)
    minted = minted.with_grants(api.VideoGrants(room_join=join, room=room))
    if agent:
        minted = minted.with_attributes({"lk.publish_on_behalf": agent})
    return (minted.with_ttl(ttl) if ttl is not None else minted).to_jwt()


@pytest.fixture(scope="module")
def avatars_root(tmp_path_factory):
    return store_tenant_avatars(tmp_path_factory.mktemp("avatars"))


@pytest.fixture
def client(avatars_root):
    client = start(create_app(server_settings(avatars_root, max_sessions_per_key=2), engine=WarpEngine()))
    yield client
    client.__exit__(None, None, None)


def closed_port_url() -> str:
    return f"ws://127.0.0.1:{free_port()}"


def join(client, headers=DEFAULT, **body):
    body = {"livekit_url": closed_port_url(), "livekit_token": token(), "avatar": "astronaut", **body}
    return client.post("/api/livekit/sessions", json=body, headers=headers)


def sessions(client, headers=DEFAULT) -> list:
    return client.get("/api/sessions", headers=headers).json()["sessions"]


def metric(client, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", client.get("/metrics", headers=DEFAULT).text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_a_key_is_needed(client):
    assert join(client, headers={}).status_code == 401
    assert join(client, headers={"X-API-Key": "nope"}).status_code == 403
    assert client.delete("/api/livekit/sessions/abc").status_code == 401


def test_a_room_that_cannot_be_joined_is_a_502_and_leaves_no_session(client):
    active = metric(client, "lipstream_active_sessions")
    started = time.monotonic()
    reply = join(client)
    assert reply.status_code == 502, reply.text
    assert reply.json()["error"] == "LiveKitJoinError"
    assert "could not join the LiveKit room at 'ws://127.0.0.1:" in reply.json()["detail"]
    assert time.monotonic() - started < 10, "a closed port is a refusal, not a wait"
    assert sessions(client) == []
    assert metric(client, "lipstream_active_sessions") == active
    assert metric(client, 'lipstream_server_viewers{transport="livekit"}') == 0
    for _ in range(3):  # and again: nothing adds up against the key's limit of 2
        assert join(client).status_code == 502
    assert sessions(client) == []


def test_livekit_sessions_count_against_the_key_s_limit(client):
    for _ in range(2):
        assert client.post("/api/sessions", json={"avatar": "astronaut"}, headers=DEFAULT).status_code == 201
    reply = join(client)
    assert reply.status_code == 429 and reply.json()["error"] == "SessionLimitError"
    assert len(sessions(client)) == 2


def test_only_the_tenant_s_own_avatars_and_sessions(client):
    reply = join(client, headers=OTHER)  # "astronaut" is the default tenant's
    assert reply.status_code == 404 and reply.json()["error"] == "AvatarNotFoundError"
    assert sessions(client, OTHER) == []
    sid = client.post("/api/sessions", json={"avatar": "astronaut"}, headers=DEFAULT).json()["id"]
    assert client.delete(f"/api/livekit/sessions/{sid}", headers=OTHER).status_code == 404
    not_livekit = client.delete(f"/api/livekit/sessions/{sid}", headers=DEFAULT)
    assert not_livekit.status_code == 404 and "not in a LiveKit room" in not_livekit.json()["detail"]
    assert [s["id"] for s in sessions(client)] == [sid], "a session of another kind is not closed by it"
    assert client.delete("/api/livekit/sessions/nope", headers=DEFAULT).status_code == 404


@pytest.mark.parametrize("url", ["ftp://livekit.example", "livekit.example:7880", "wss://", "http://host:99999",
                                 "", "ws://exa mple:7880"])
def test_a_url_that_is_not_a_livekit_server_s_is_a_422(client, url):
    reply = join(client, livekit_url=url)
    assert reply.status_code == 422 and "livekit_url" in reply.json()["detail"]
    assert "not the URL of a LiveKit server" in reply.json()["detail"]
    assert sessions(client) == []


@pytest.mark.parametrize("bad, reason", [
    ("not-a-token", "not a JWT"),
    ("a.b.c", "not base64url JSON"),
    ("eyJhbGciOiJIUzI1NiJ9.WzFd.sig", "not a JSON object"),
    (token(join=False), "does not allow joining a room"),
    (token(ttl=timedelta(seconds=-120)), "s ago; mint a new one"),  # minted at collection: 120 s or more
])
def test_a_token_that_cannot_join_a_room_is_a_400_before_anything_is_made(client, bad, reason):
    reply = join(client, livekit_token=bad)
    assert reply.status_code == 400 and reply.json()["error"] == "LiveKitTokenError"
    assert reason in reply.json()["detail"]
    assert sessions(client) == []


def test_the_room_grant_of_a_token():
    assert room_grant(token("room-9", "face", "agent-7")) == RoomGrant("room-9", "face", "agent-7")
    assert room_grant(token(agent=None)) == RoomGrant("room-1", "lipstream-avatar", None)
    expires_soon = token(ttl=timedelta(seconds=30))
    with pytest.raises(LiveKitTokenError, match="expired"):
        room_grant(expires_soon, now=time.time() + 60)
    no_identity = ".".join([*token().split(".")[:1], "eyJ2aWRlbyI6eyJyb29tSm9pbiI6dHJ1ZSwicm9vbSI6InIifX0", "x"])
    with pytest.raises(LiveKitTokenError, match="no participant identity"):
        room_grant(no_identity)  # {"video": {"roomJoin": true, "room": "r"}}


WITHOUT_LIVEKIT = """
import sys, importlib.abc
class NoLiveKit(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "livekit" or name.startswith("livekit."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoLiveKit())
sys.path.insert(0, "tests")
from pathlib import Path
from lipstream.engines.warp import WarpEngine
from lipstream.server.app import create_app
from server_helpers import server_settings, start
root, url, token = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
client = start(create_app(server_settings(root), engine=WarpEngine()))
reply = client.post("/api/livekit/sessions", headers={"X-API-Key": "k-default"},
                    json={"livekit_url": url, "livekit_token": token, "avatar": "astronaut"})
print(reply.status_code, reply.json()["error"], reply.json()["detail"])
print(len(client.get("/api/sessions", headers={"X-API-Key": "k-default"}).json()["sessions"]))
client.__exit__(None, None, None)
"""


def test_a_server_without_the_livekit_extra_says_so(avatars_root):
    done = subprocess.run([sys.executable, "-c", WITHOUT_LIVEKIT, str(avatars_root), closed_port_url(), token()],
                          check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    answer, count = done.stdout.strip().splitlines()[-2:]
    assert answer.startswith("501 LiveKitUnavailableError") and "lipstream[livekit]" in answer
    assert count == "0"


def test_the_room_receiver_keeps_its_clear_buffer_handler_to_its_room():
    """RoomAudioReceiver replaces the one step of LiveKit's receiver that registers lk.clear_buffer in a
    table for the whole process; if LiveKit renames that step, the replacement no longer applies."""
    from livekit.agents.voice.avatar import DataStreamAudioReceiver

    from lipstream.integrations.livekit.room import RPC_CLEAR_BUFFER, RoomAudioReceiver

    assert "self._register_clear_buffer_rpc(" in inspect.getsource(DataStreamAudioReceiver.start)
    assert RoomAudioReceiver._register_clear_buffer_rpc.__func__ is not \
        DataStreamAudioReceiver._register_clear_buffer_rpc.__func__
    assert f'RPC_CLEAR_BUFFER = "{RPC_CLEAR_BUFFER}"' in inspect.getsource(inspect.getmodule(DataStreamAudioReceiver))
