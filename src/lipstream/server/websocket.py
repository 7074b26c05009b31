"""The WebSocket transport: `WS /api/sessions/{id}/ws[?frames=jpeg|patches]`. Audio and control in,
frames with their audio and the speech events out (format: `wire`): whole JPEG frames, or with
`frames=patches` each of the avatar's images once and then per frame only its face patch (what a
viewer costs the host: an idle frame nothing, a speaking one a JPEG of its patch). The connection is
the session's viewer: when it goes, the session closes.

Close codes: 4400 an unknown `frames`, 4401 no key, 4403 key not accepted, 4404 no such session, 4409
the session has a viewer already, 1000 the session was closed (by DELETE, or the server shutting down)."""

from __future__ import annotations

import asyncio
import json
import logging
import time

from fastapi import APIRouter, HTTPException, WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketState

from lipstream.audio.load import SAMPLE_RATE
from lipstream.config import Settings
from lipstream.errors import SessionBusyError, SessionNotFoundError
from lipstream.media.encoding import EncodingPool, frame_jpeg, idle_images, patch_jpeg
from lipstream.metrics import SERVER_FRAMES_SENT
from lipstream.server import wire
from lipstream.server.auth import request_key
from lipstream.server.registry import OpenSession
from lipstream.server.viewer import ClientMessages, InputLimits, frame_events
from lipstream.stream.compositor import PATCH_MARGIN, Compositor
from lipstream.stream.session import OutputFrame

log = logging.getLogger(__name__)

router = APIRouter()


@router.websocket("/api/sessions/{session_id}/ws")
async def session_websocket(websocket: WebSocket, session_id: str) -> None:
    await websocket.accept()  # accept first: a browser only sees close codes and reasons after that
    state = websocket.app.state
    frames = websocket.query_params.get("frames", "jpeg")
    if frames not in wire.FORMATS:
        await websocket.close(4400, f"frames must be one of {', '.join(wire.FORMATS)}; got {frames[:40]!r}")
        return
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
        await _serve(websocket, entry, state, frames)
    finally:
        await state.sessions.close(entry)
        if websocket.client_state == WebSocketState.CONNECTED:
            try:
                await websocket.close(1000, "session closed")
            except RuntimeError:  # the client went at the same moment
                pass


async def _serve(websocket: WebSocket, entry: OpenSession, state, frames: str) -> None:
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
                           "format": wire.FORMATS[frames].decode()}))
    pack = _PatchFrames(encoding, settings.jpeg_quality, send) if frames == "patches" else \
        _JpegFrames(encoding, settings.jpeg_quality)

    async def frames_out() -> None:
        async for frame in session.frames():
            for event in frame_events(entry, frame):
                await send(event)
            began = time.perf_counter()
            message = await pack(frame)
            encoded = time.perf_counter()
            await send(message)
            SERVER_FRAMES_SENT.labels("websocket").inc()
            if "speech_started" in frame.events:
                session.record_delivery(frame.index, encoded - began, time.perf_counter() - encoded)

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


class _JpegFrames:
    """Frames as whole JPEGs ("LSF1"): an idle frame's is its image's, made once; a speaking frame is
    encoded on the pool."""

    def __init__(self, encoding: EncodingPool, quality: int):
        self.encoding = encoding
        self.quality = quality

    async def __call__(self, frame: OutputFrame) -> bytes:
        jpeg = idle_images(frame.compositor).cached_jpeg(frame.compositor.key(frame.cycle), self.quality) \
            if frame.patch is None else None
        if jpeg is None:
            height, width = frame.compositor.frame_size
            jpeg = await self.encoding.encode(height * width, frame_jpeg, frame, self.quality)
        return wire.pack_frame(frame.index, frame.pts, frame.speaking, frame.audio, jpeg)


class _PatchFrames:
    """Frames as patches ("LSP1") over images sent once ("LSI1", through `send`): per frame at most a
    JPEG of its patch is encoded (on the pool)."""

    def __init__(self, encoding: EncodingPool, quality: int, send):
        self.encoding = encoding
        self.quality = quality
        self.send = send
        self.compositor: Compositor | None = None
        self.sent: set[int] = set()  # the images of `compositor` the client has

    async def __call__(self, frame: OutputFrame) -> bytes:
        compositor = frame.compositor
        if compositor is not self.compositor:  # another avatar (or size): its images are new
            self.compositor, self.sent = compositor, set()
        key = compositor.key(frame.cycle)
        if key not in self.sent:
            images = idle_images(compositor)
            image = images.cached_jpeg(key, self.quality) or await self.encoding.run(images.jpeg, key, self.quality)
            await self.send(wire.pack_image(key, image))
            self.sent.add(key)
        at, draw, jpeg = (0, 0), (0, 0, 0, 0), b""
        if frame.patch is not None:
            patch = frame.patch
            height, width = compositor.frame_size
            jpeg = await self.encoding.encode(height * width, patch_jpeg, patch, self.quality)
            at = (patch.x, patch.y)
            draw = wire.draw_rect(patch.x, patch.y, patch.pixels.shape[1], patch.pixels.shape[0],
                                  compositor.frame_size, PATCH_MARGIN)
        return wire.pack_patch_frame(frame.index, frame.pts, frame.speaking, frame.audio, key, at, draw, jpeg)
