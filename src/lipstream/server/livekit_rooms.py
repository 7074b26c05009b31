"""LiveKit rooms: a session as the avatar of a LiveKit agent, in the agent's room.

`POST /api/livekit/sessions` {"livekit_url", "livekit_token", "avatar", "fps"?, "engine"?,
"output_height"?} makes a session of one of the tenant's avatars and has it join the token's room as the
token's participant, the avatar of the room's agent (`lipstream.integrations.livekit.RoomAvatar`: the
agent's speech in over data streams, `avatar_video` and `avatar_audio` out); it answers once it is in the
room. `DELETE /api/livekit/sessions/{id}` makes it leave. The session is one of the server's like any
other (the same per-key limit, listed by /api/sessions, its stats, the metrics), whose viewer is the
room ("livekit"); it closes when the avatar leaves: the agent left, the room closed or removed it.

Before anything is made, the token must be a JWT granting to join a room, not expired (400
LiveKitTokenError; its signature is the LiveKit server's to check), and the URL a ws://, wss://, http://
or https:// one (422). A room that cannot be joined is a 502 LiveKitJoinError, and the session is closed
again. The room side needs the `livekit` extra (501 LiveKitUnavailableError without it); nothing here
imports LiveKit until a room is joined."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

from fastapi import APIRouter, Request
from pydantic import Field, field_validator

from lipstream.client import AvatarFrame, Color
from lipstream.errors import LiveKitTokenError, LiveKitUnavailableError, SessionNotFoundError, excerpt
from lipstream.integrations.local import LocalSession
from lipstream.metrics import SERVER_FRAMES_SENT
from lipstream.server.auth import CallerDep
from lipstream.server.registry import OpenSession
from lipstream.server.rest import SessionRequest, describe_session, open_session

router = APIRouter()

VIEWER = "livekit"
URL_SCHEMES = ("ws", "wss", "http", "https")
PUBLISH_ON_BEHALF = "lk.publish_on_behalf"  # the token attribute naming the agent the avatar publishes for
T = TypeVar("T")


class LiveKitSessionRequest(SessionRequest):
    livekit_url: str = Field(description="the LiveKit server (ws://, wss://, http:// or https://), as this "
                                         "server reaches it")
    livekit_token: str = Field(description="an access token of that server for the avatar participant: a "
                                           "JWT granting to join the room (minted by the agent)")

    @field_validator("livekit_url")
    @classmethod
    def _livekit_url(cls, value: str) -> str:
        try:
            url = urlsplit(value)
            port_ok = url.port is None or url.port > 0
        except ValueError:
            port_ok = False
        if not port_ok or url.scheme.lower() not in URL_SCHEMES or not url.hostname \
                or any(c.isspace() for c in value):
            raise ValueError(f"{excerpt(value, 100)} is not the URL of a LiveKit server; give ws://, wss://, "
                             "http:// or https:// with its host, e.g. wss://my-project.livekit.cloud")
        return value


@dataclass(frozen=True)
class RoomGrant:
    """What a LiveKit token lets its bearer do, as far as lipstream needs it: join `room` as `identity`,
    publishing on behalf of the agent `agent_identity` (None when the token does not say)."""

    room: str
    identity: str
    agent_identity: str | None


def room_grant(token: str, now: float | None = None) -> RoomGrant:
    """The room grant of a LiveKit access token (its claims are read, not verified: the signature is
    the LiveKit server's to check). LiveKitTokenError when it is not a JWT, grants no room to join, has
    no identity, or has expired (`exp` before `now`, default the time now)."""
    now = time.time() if now is None else now
    parts = token.split(".")
    if len(parts) != 3:
        raise LiveKitTokenError("livekit_token is not a JWT (three base64url parts joined by dots); give the "
                                "access token the agent minted for the avatar")
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except ValueError as exc:
        raise LiveKitTokenError(f"livekit_token's claims are not base64url JSON ({exc}); give a LiveKit "
                                "access token") from exc
    if not isinstance(claims, dict):
        raise LiveKitTokenError("livekit_token's claims are not a JSON object; give a LiveKit access token")
    expires = claims.get("exp")
    if expires is not None and (isinstance(expires, bool) or not isinstance(expires, int | float)):
        raise LiveKitTokenError(f"livekit_token's expiry (`exp`) is {excerpt(expires)}, not a time; give a "
                                "LiveKit access token")
    if expires is not None and expires <= now:
        raise LiveKitTokenError(f"livekit_token expired {now - expires:.0f} s ago; mint a new one")
    video = claims.get("video")
    if not isinstance(video, dict) or video.get("roomJoin") is not True or not video.get("room"):
        raise LiveKitTokenError("livekit_token does not allow joining a room; it needs a video grant with "
                                'roomJoin and the room, e.g. VideoGrants(room_join=True, room="my-room")')
    identity = claims.get("sub")
    if not isinstance(identity, str) or not identity:
        raise LiveKitTokenError("livekit_token has no participant identity (its `sub`); mint it with one")
    attributes = claims.get("attributes")
    agent = attributes.get(PUBLISH_ON_BEHALF) if isinstance(attributes, dict) else None
    return RoomGrant(str(video["room"]), identity, agent if isinstance(agent, str) and agent else None)


class RoomSession(LocalSession):
    """A session of the server as a room avatar drives it: frames converted on the server's encoding
    pool and counted as sent to a "livekit" viewer; closing it closes the server's session."""

    def __init__(self, entry: OpenSession, state):
        super().__init__(entry.session)
        self.entry = entry
        self.registry = state.sessions
        self.encoding = state.encoding
        self._sent = SERVER_FRAMES_SENT.labels(VIEWER)

    async def frames(self, color: Color | None = "rgb") -> AsyncIterator[AvatarFrame]:
        async for frame in super().frames(color):
            self._sent.inc()
            yield frame

    async def convert(self, fn: Callable[..., T], /, *args: Any) -> T:
        return await self.encoding.run(fn, *args)

    async def aclose(self) -> None:
        await self.registry.close(self.entry)


def _room_avatar() -> type:
    """lipstream.integrations.livekit.RoomAvatar; LiveKitUnavailableError without the livekit extra."""
    try:
        from lipstream.integrations.livekit.room import RoomAvatar
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] != "livekit":
            raise
        raise LiveKitUnavailableError("this lipstream server cannot join LiveKit rooms: it was installed "
                                      "without the livekit extra; install lipstream[livekit] and restart it") from exc
    return RoomAvatar


@router.post("/api/livekit/sessions", status_code=201)
async def create_livekit_session(body: LiveKitSessionRequest, request: Request, caller: CallerDep) -> dict:
    """A session of `avatar` in the token's LiveKit room, as the avatar of its agent; answers once it
    has joined: the session (as POST /api/sessions describes it), "room" and "identity" (its participant's)."""
    grant = room_grant(body.livekit_token)
    room_avatar = _room_avatar()
    registry = request.app.state.sessions
    entry = await open_session(body, request, caller)
    registry.attach(entry, VIEWER)
    try:
        avatar = await room_avatar.join(RoomSession(entry, request.app.state), body.livekit_url, body.livekit_token,
                                        agent_identity=grant.agent_identity)
    except BaseException:
        await registry.close(entry)
        raise
    if entry.closed.is_set():  # closed while it joined
        await avatar.aclose()
        raise SessionNotFoundError(f"session {entry.id} was closed while it joined the room")
    entry.on_close.append(avatar.aclose)
    return {**describe_session(entry), "room": grant.room, "identity": grant.identity}


@router.delete("/api/livekit/sessions/{session_id}", status_code=204)
async def close_livekit_session(session_id: str, request: Request, caller: CallerDep) -> None:
    """The avatar leaves its room, and its session closes."""
    registry = request.app.state.sessions
    entry = registry.get(session_id, caller.tenant)
    if entry.viewer != VIEWER:
        raise SessionNotFoundError(f"session {entry.id} is not in a LiveKit room; close it with "
                                   f"DELETE /api/sessions/{entry.id}")
    await registry.close(entry)
