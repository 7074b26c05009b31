"""Changing a live session's avatar: `POST /api/sessions/{id}/avatar` `{"avatar": name}`, or the message
`{"type": "avatar", "avatar": name}` on its WebSocket or WebRTC data channel.

The avatar is one of the caller's tenant's, loaded for the session's engine; the next frame shows it
(event "avatar_changed", with the new streamed size). The connection, the clock and the queued speech
carry on. An avatar of another frame size is fine: WebSocket frames are JPEGs of the new size (the
event says which), and the WebRTC video track goes on at the new size (the encoder restarts with a key
frame; the browser's video element resizes)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from lipstream.errors import SessionNotFoundError
from lipstream.server.auth import CallerDep
from lipstream.server.registry import OpenSession
from lipstream.server.rest import describe_session

router = APIRouter()


class AvatarChange(BaseModel):
    avatar: str = Field(description="name of one of the tenant's avatars")


async def change_avatar(state, entry: OpenSession, name: str) -> None:
    """Show the tenant's avatar `name` in the session from its next frame on. Changes are applied in
    the order they were asked for. Raises AvatarNotFoundError, AvatarNameError, AvatarCorruptError,
    NoFaceError (an engine that needs a face it cannot find), SessionNotFoundError (closed meanwhile)."""
    async with entry.changing:
        session = entry.session
        avatar, compositor, material = await state.avatars.get(name, entry.tenant, session.engine, session.scheduler,
                                                               entry.output_height)
        if entry.closed.is_set():
            raise SessionNotFoundError(f"session {entry.id} was closed")
        session.switch_avatar(avatar, compositor, material)
        entry.avatar = avatar.name
        entry.size = compositor.frame_size


@router.post("/api/sessions/{session_id}/avatar")
async def switch_avatar(session_id: str, body: AvatarChange, request: Request, caller: CallerDep) -> dict:
    """Show another of the tenant's avatars from the session's next frame on; the session as it is now."""
    state = request.app.state
    entry = state.sessions.get(session_id, caller.tenant)
    await change_avatar(state, entry, body.avatar)
    return describe_session(entry)
