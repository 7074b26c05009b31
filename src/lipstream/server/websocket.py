"""The WebSocket transport: `WS /api/sessions/{id}/ws`. Audio and control in, JPEG frames with their
audio and the speech events out (format: `wire`). The connection is the session's viewer: when it
goes, the session closes.

Close codes: 4401 no key, 4403 key not accepted, 4404 no such session, 4409 the session has a viewer
already, 1000 the session was closed (by DELETE, or the server shutting down)."""

from __future__ import annotations

import asyncio
import json
import logging

from fastapi import APIRouter, HTTPException, WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketState

from lipstream.audio.load import SAMPLE_RATE
from lipstream.config import Settings
from lipstream.errors import SessionBusyError, SessionNotFoundError
from lipstream.media.encoding import EncodingPool, frame_jpeg
from lipstream.metrics import SERVER_FRAMES_SENT
from lipstream.server import wire
from lipstream.server.auth import request_key
from lipstream.server.registry import OpenSession
from lipstream.server.viewer import ClientMessages, InputLimits, frame_events

log = logging.getLogger(__name__)

router = APIRouter()


@router.websocket("/api/sessions/{session_id}/ws")
async def session_websocket(websocket: WebSocket, session_id: str) -> None:
    await websocket.accept()  # accept first: a browser only sees close codes and reasons after that
    state = websocket.app.state
    try:
        caller = state.keys.caller(request_key(websocket))
        entry = state.sessions.get(session_id, caller.tenant)
        state.sessions.attach(entry, "websocket")
    except HTTPException as exc:
        await websocket.close(4000 + exc.status_code, exc.detail[:120])
        return
    except (SessionNotFoundError, SessionBusyError) as exc:
        await websocket.close(4404 if isinstance(exc, SessionNotFoundError) else 4409, str(exc)[:120])
        return
    try:
        await _serve(websocket, entry, state)
    finally:
        await state.sessions.close(entry)
        if websocket.client_state == WebSocketState.CONNECTED:
            try:
                await websocket.close(1000, "session closed")
            except RuntimeError:  # the client went at the same moment
                pass


async def _serve(websocket: WebSocket, entry: OpenSession, state) -> None:
    """Run until the client leaves or the session closes. The frames are encoded on the app's pool; the
    client's messages are read within the settings' input limits (a faster client is read more slowly)."""
    encoding: EncodingPool = state.encoding
    settings: Settings = state.settings
    send_lock = asyncio.Lock()
    limits = InputLimits.of(settings)

    async def send(message: str | bytes) -> None:
        async with send_lock:
            if isinstance(message, bytes):
                await websocket.send_bytes(message)
            else:
                await websocket.send_text(message)

    session = entry.session
    await send(json.dumps({"type": "hello", "session": entry.id, "avatar": entry.avatar, "fps": entry.fps,
                           "width": entry.size[1], "height": entry.size[0], "sample_rate": SAMPLE_RATE,
                           "format": wire.MAGIC.decode()}))

    async def frames_out() -> None:
        async for frame in session.frames():
            for event in frame_events(entry, frame):
                await send(event)
            jpeg = await encoding.encode(entry.size[0] * entry.size[1], frame_jpeg, frame.image, entry.output_height,
                                         settings.jpeg_quality, settings.jpeg_encoder)
            await send(wire.pack_frame(frame.index, frame.pts, frame.speaking, frame.audio, jpeg))
            SERVER_FRAMES_SENT.labels("websocket").inc()

    client = ClientMessages(state, entry, send)

    async def messages_in() -> None:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("bytes")
            data = data if data is not None else message.get("text") or ""
            await client.handle(data)
            delay = limits.wait_s(len(data))
            if delay > 0:
                await asyncio.sleep(delay)

    tasks = [asyncio.create_task(frames_out()), asyncio.create_task(messages_in()),
             asyncio.create_task(entry.closed.wait())]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if not task.cancelled() and isinstance(task.exception(), Exception) \
                    and not isinstance(task.exception(), WebSocketDisconnect):
                log.error("session %s: WebSocket viewer failed", entry.id, exc_info=task.exception())
    finally:
        client.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
