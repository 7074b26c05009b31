"""An asyncio client of a lipstream server: sessions over its REST API, speech in and frames out over
the session's WebSocket (messages packed and unpacked by `lipstream.server.wire`). Frames come as
patches by default (the avatar's images once, then per frame only its face: the cheapest for the
server and the network); `frames="jpeg"` asks for a whole JPEG per frame.

    async with LipstreamClient("http://localhost:2160", api_key=key) as client:
        session = await client.open_session("astronaut")    # POST /api/sessions, then its WebSocket
        await session.push_audio(pcm)                       # int16 (or float32) [n], mono 16 kHz, any length
        await session.end_speech()                          # the utterance is complete
        async for frame in session.frames():                # AvatarFrame: image, its audio, speaking, events
            ...
        await session.aclose()                              # the session is closed on the server

Every failure a user can cause is a `LipstreamError`. The server's own error classes come back by
name from its `{"detail", "error"}` replies (AvatarNotFoundError, SessionLimitError, QueueFullError,
...); ServerUnreachableError when no connection can be made; ApiKeyError for a refused key;
SessionClosedError when the server ends a session's WebSocket (closed by DELETE, timed out, or the
server stopping); ServerReplyError for any other error reply."""

from __future__ import annotations

import asyncio
import json
import os
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Self

import cv2
import httpx
import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from lipstream import errors
from lipstream.errors import (
    ApiKeyError,
    AudioFormatError,
    BadRequestError,
    LipstreamError,
    NotReadyError,
    OverloadedError,
    ServerReplyError,
    ServerUnreachableError,
    SessionBusyError,
    SessionClosedError,
    SessionNotFoundError,
)
from lipstream.server import wire
from lipstream.stream.pcm import to_pcm16

Color = Literal["rgb", "bgr"]
FrameFormat = Literal["patches", "jpeg"]
DEFAULT_TIMEOUT_S = 10.0
READY_POLL_S = 0.2
DECODED_IMAGES = 16  # of a patch-frames connection, the last images decoded, kept for the frames that follow


@dataclass
class AvatarFrame:
    """One frame of a session, as its viewer gets it.

    index: frame number since the session started; pts: index / fps, seconds.
    image: uint8 [H, W, 3] in the order asked for (RGB by default), or None when not decoded.
    jpeg: the frame as the server sent it, whole (None for in-process sessions and for patch frames).
    audio: int16 [n] mono 16 kHz, the samples that play during this frame (zeros when idle).
    speaking: an utterance is playing. events: "speech_started", "speech_ended", "interrupted" at
    this frame. errors: what the server answered to client messages since the last frame (e.g. a
    QueueFullError for audio pushed faster than it plays); the session goes on.
    speech_samples: how many of `audio`'s first samples are the speech pushed (the rest is silence the
    session added: idle or waiting for audio); known for in-process sessions, None from a server."""

    index: int
    pts: float
    speaking: bool
    audio: np.ndarray
    image: np.ndarray | None
    jpeg: bytes | None = None
    events: list[str] = field(default_factory=list)
    errors: list[LipstreamError] = field(default_factory=list)
    speech_samples: int | None = None


def decode_jpeg(jpeg: bytes, color: Color = "rgb") -> np.ndarray:
    """A JPEG frame -> uint8 [H, W, 3] in `color` order; ServerReplyError if it is not a JPEG."""
    flag = cv2.IMREAD_COLOR_RGB if color == "rgb" else cv2.IMREAD_COLOR
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), flag)
    if image is None:
        raise ServerReplyError(f"a frame's image ({len(jpeg)} bytes) is not a JPEG")
    return image


def websocket_url(server_url: str, info: dict) -> str:
    """The WebSocket URL of a session (`info`: the server's session reply) made through `server_url`: the
    reply's "ws" as it is when it is a URL (the server that holds the session named its own), else that
    path on the server (http -> ws, https -> wss)."""
    return info["ws"] if "://" in info["ws"] else "ws" + server_url.removeprefix("http") + info["ws"]


def error_from_reply(reply: httpx.Response) -> LipstreamError:
    """The LipstreamError an error reply of the server stands for: its own class by name when it names
    one, ApiKeyError for 401/403, BadRequestError for 422, ServerReplyError otherwise."""
    try:
        body = reply.json()
    except ValueError:
        body = None
    body = body if isinstance(body, dict) else {}
    detail = str(body.get("detail") or reply.text[:300] or reply.reason_phrase)
    cls = _error_class(body.get("error"))
    if cls is not None and issubclass(cls, OverloadedError) and reply.headers.get("retry-after", "").isdigit():
        return cls(detail, int(reply.headers["retry-after"]))
    if cls is not None:
        return cls(detail)
    if reply.status_code in (401, 403):
        return ApiKeyError(detail)
    if reply.status_code == 422:
        return BadRequestError(detail)
    return ServerReplyError(f"{reply.request.method} {reply.request.url.path}: HTTP {reply.status_code}: {detail}")


class LipstreamClient:
    """A lipstream server at `url` (e.g. "http://localhost:2160"), with `api_key` (the key it printed,
    or one of its `api_keys`). timeout_s: how long a connection or a reply may take."""

    def __init__(self, url: str, api_key: str | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout_s = timeout_s
        self._headers = {"X-API-Key": api_key} if api_key else {}
        self._http = httpx.AsyncClient(base_url=self.url, headers=self._headers, timeout=timeout_s)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP connections (open sessions stay open; close them first)."""
        await self._http.aclose()

    # ---- the server ------------------------------------------------------------------------------

    async def health(self) -> dict:
        return (await self._request("GET", "/health")).json()

    async def ready(self) -> dict:
        """The server's /ready answer: {"ready": True, "engine", "reason", "device", ...} once it has
        loaded its engine and avatars, else {"ready": False, "loading" | "error": ...}."""
        reply = await self._send("GET", "/ready")
        if reply.status_code not in (200, 503):
            raise error_from_reply(reply)
        return reply.json()

    async def wait_ready(self, timeout_s: float) -> dict:
        """Poll /ready until the server is ready (its answer) for at most `timeout_s`, also while it does
        not accept connections yet. NotReadyError when it could not load its engine or was not ready in
        time; ServerUnreachableError when it never answered."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            try:
                state = await self.ready()
            except ServerUnreachableError:
                if loop.time() > deadline:
                    raise
            else:
                if state.get("ready"):
                    return state
                if state.get("error"):
                    raise NotReadyError(f"the server at {self.url} could not load its engine: {state['error']}")
                if loop.time() > deadline:
                    raise NotReadyError(f"the server at {self.url} was not ready within {timeout_s:g} s")
            await asyncio.sleep(READY_POLL_S)

    async def capacity(self) -> dict:
        """The server's capacity and load: {"admission_control", "free_sessions", "free_fps", "load",
        "budget", ...} (GET /api/capacity; see `lipstream.stream.capacity.Capacity.report`)."""
        return (await self._request("GET", "/api/capacity")).json()

    async def config(self) -> dict:
        return (await self._request("GET", "/api/config")).json()

    async def metrics(self, metrics_key: str | None = None) -> str:
        """The server's Prometheus metrics, as text. metrics_key: the server's setting metrics_key
        (default: this client's API key, for a server whose metrics key it is); ApiKeyError otherwise."""
        headers = {"X-API-Key": metrics_key} if metrics_key else {}
        return (await self._request("GET", "/metrics", headers=headers)).text

    async def avatars(self) -> list[dict]:
        """The key's avatars: [{"name", "frames", "width", "height", "fps", ...}]."""
        return (await self._request("GET", "/api/avatars")).json()["avatars"]

    # ---- sessions --------------------------------------------------------------------------------

    async def create_session(self, avatar: str, *, fps: int | None = None, engine: str = "auto",
                             output_height: int | None = None) -> dict:
        """A new session of `avatar` (not connected yet): {"id", "width", "height", "fps", "ws", ...}.
        Raises AvatarNotFoundError, SessionLimitError, ... as the server answers."""
        body = {"avatar": avatar, "fps": fps, "engine": engine, "output_height": output_height}
        reply = await self._request("POST", "/api/sessions", json={k: v for k, v in body.items() if v is not None})
        return reply.json()

    async def open_session(self, avatar: str, *, fps: int | None = None, engine: str = "auto",
                           output_height: int | None = None, frames: FrameFormat = "patches") -> RemoteSession:
        """`create_session`, then connect its WebSocket (`frames`: see `connect`): a session ready for
        speech and frames. If the connection fails, the session is closed again."""
        info = await self.create_session(avatar, fps=fps, engine=engine, output_height=output_height)
        try:
            return await self.connect(info, frames=frames)
        except BaseException:
            try:
                await self.close_session(info["id"])
            except LipstreamError:
                pass
            raise

    async def connect(self, info: dict, *, frames: FrameFormat = "patches") -> RemoteSession:
        """Connect the WebSocket of a session made by `create_session` (its reply: "ws", a path on this
        server, or the URL of the server that holds the session); waits for the server's hello. frames:
        "patches" (the avatar's images once, then each frame's face patch) or "jpeg" (a whole JPEG per
        frame; `AvatarFrame.jpeg`). Raises ServerUnreachableError, ApiKeyError, SessionNotFoundError,
        SessionBusyError."""
        ws_url = websocket_url(self.url, info) + f"?frames={frames}"
        try:
            ws = await connect(ws_url, additional_headers=self._headers, max_size=None, open_timeout=self.timeout_s)
        except InvalidStatus as exc:
            raise ServerReplyError(f"{ws_url}: the server refused the WebSocket (HTTP "
                                   f"{exc.response.status_code}); is it a lipstream server?") from exc
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            raise ServerUnreachableError(f"cannot open the WebSocket of session {info['id']} at {ws_url} "
                                         f"({type(exc).__name__}: {exc})") from exc
        session = RemoteSession(self, ws, info)
        try:
            hello = json.loads(await _receive(ws, info["id"]))
        except BaseException:
            await ws.close()
            raise
        session.hello = hello
        return session

    async def offer(self, session_id: str, sdp: str) -> dict:
        """Answer a WebRTC offer for the session (its SDP): {"sdp", "type": "answer"}. The session's
        video and audio then go to that peer; its data channel carries the WebSocket's messages."""
        return (await self._request("POST", f"/api/sessions/{session_id}/offer",
                                    json={"sdp": sdp, "type": "offer"})).json()

    async def sessions(self) -> list[dict]:
        return (await self._request("GET", "/api/sessions")).json()["sessions"]

    async def close_session(self, session_id: str) -> None:
        """Close a session on the server (and its WebSocket). SessionNotFoundError if it is not open."""
        await self._request("DELETE", f"/api/sessions/{session_id}")

    async def session_stats(self, session_id: str) -> dict:
        """The session's counters (frames sent, dropped, first_frame_ms, ...: `Session.stats`)."""
        return (await self._request("GET", f"/api/sessions/{session_id}/stats")).json()["stats"]

    async def push_file(self, session_id: str, file: str | os.PathLike | bytes, *, end: bool = True) -> dict:
        """Speech from an audio file (a path, or its bytes: WAV, MP3, ... any format the server decodes)
        over REST; `end`: it ends the utterance. Returns {"samples", "seconds", "ended"}."""
        data = file if isinstance(file, bytes) else await asyncio.to_thread(Path(file).read_bytes)
        reply = await self._request("POST", f"/api/sessions/{session_id}/audio", params={"end": end}, content=data,
                                    headers={"Content-Type": "application/octet-stream"})
        return reply.json()

    async def interrupt(self, session_id: str) -> None:
        """Drop the session's queued speech (REST; a connected session can `interrupt()` instead)."""
        await self._request("POST", f"/api/sessions/{session_id}/interrupt")

    # ---- LiveKit rooms ---------------------------------------------------------------------------

    async def create_livekit_session(self, avatar: str, livekit_url: str, livekit_token: str, *,
                                     fps: int | None = None, engine: str = "auto",
                                     output_height: int | None = None) -> dict:
        """A session of `avatar` that joins a LiveKit room as the avatar of its agent (the token's room,
        as the token's participant): {"id", "room", "identity", "width", "height", "fps", ...}, once it
        has joined. Raises LiveKitTokenError, LiveKitJoinError, AvatarNotFoundError, SessionLimitError,
        ... as the server answers."""
        body = {"avatar": avatar, "livekit_url": livekit_url, "livekit_token": livekit_token, "fps": fps,
                "engine": engine, "output_height": output_height}
        reply = await self._request("POST", "/api/livekit/sessions",
                                    json={k: v for k, v in body.items() if v is not None})
        return reply.json()

    async def close_livekit_session(self, session_id: str) -> None:
        """Make the avatar leave its LiveKit room and close its session. SessionNotFoundError if it is
        not open."""
        await self._request("DELETE", f"/api/livekit/sessions/{session_id}")

    # ---- HTTP ------------------------------------------------------------------------------------

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise ServerUnreachableError(f"the lipstream server at {self.url} did not answer {method} {path} "
                                         f"within {self.timeout_s:g} s") from exc
        except httpx.TransportError as exc:
            raise ServerUnreachableError(f"cannot reach the lipstream server at {self.url} ({exc or type(exc).__name__});"
                                         " is `lipstream serve` running there?") from exc

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        reply = await self._send(method, path, **kwargs)
        if reply.status_code >= 400:
            raise error_from_reply(reply)
        return reply


class RemoteSession:
    """A session on a server with its WebSocket connected (made by `LipstreamClient.open_session`).

    id, avatar, engine, fps, width, height: the session's (the frames' size after the server's scaling);
    hello: the server's first message; bytes_received: of the binary messages (images and frames) so
    far. Use from one task at a time for sending and one for `frames()`."""

    def __init__(self, client: LipstreamClient, ws: ClientConnection, info: dict):
        self.client = client
        self.info = info
        self.id: str = info["id"]
        self.avatar: str = info["avatar"]
        self.engine: str = info["engine"]
        self.fps: int = info["fps"]
        self.width: int = info["width"]
        self.height: int = info["height"]
        self.hello: dict = {}
        self.bytes_received = 0
        self._ws = ws
        self._closed = False
        self._images = _Images()  # of a patch-frames connection: they come once, for every frames() call

    async def push_audio(self, samples: np.ndarray) -> None:
        """Speech: int16 [n], or float32 [n] in [-1, 1], mono 16 kHz, any length (appended to the
        current utterance, or starting one). AudioFormatError for other arrays."""
        try:
            pcm = to_pcm16(samples)
        except ValueError as exc:
            raise AudioFormatError(str(exc)) from exc
        if pcm.size:
            await self._send(pcm.astype("<i2", copy=False).tobytes())

    async def push_file(self, file: str | os.PathLike | bytes, *, end: bool = True) -> dict:
        """An audio file (path or bytes) as speech, sent over REST (see `LipstreamClient.push_file`)."""
        return await self.client.push_file(self.id, file, end=end)

    async def end_speech(self) -> None:
        """The current utterance is complete."""
        await self._send(json.dumps({"type": "end"}))

    async def interrupt(self) -> None:
        """Drop the queued speech: the avatar is idle within two frames."""
        await self._send(json.dumps({"type": "interrupt"}))

    async def stats(self) -> dict:
        return await self.client.session_stats(self.id)

    async def frames(self, color: Color | None = "rgb") -> AsyncIterator[AvatarFrame]:
        """The session's frames as the server sends them (in real time), each image decoded (on a
        worker thread) to `color` order, or not decoded with color=None. Ends when `aclose()` is
        called; SessionClosedError when the server closes the session."""
        events: list[str] = []
        problems: list[LipstreamError] = []
        images = self._images
        while True:
            try:
                message = await _receive(self._ws, self.id)
            except SessionClosedError:
                if self._closed:
                    return
                raise
            if isinstance(message, str):
                event = json.loads(message)
                if event.get("type") == "error":
                    problems.append(_server_error(event))
                elif event.get("type") != "pong":
                    events.append(event["type"])
                    if event["type"] == "avatar_changed":
                        images.clear()
                continue
            self.bytes_received += len(message)
            try:
                if message[:4] == wire.IMAGE_MAGIC:
                    images.add(*wire.unpack_image(message))
                    continue
                if message[:4] == wire.PATCH_MAGIC:
                    frame = wire.unpack_patch_frame(message)
                    image = None if color is None else await asyncio.to_thread(images.frame, frame, color)
                    jpeg = None
                else:
                    frame = wire.unpack_frame(message)
                    image = None if color is None else await asyncio.to_thread(decode_jpeg, frame.jpeg, color)
                    jpeg = frame.jpeg
            except (ValueError, KeyError) as exc:
                raise ServerReplyError(f"session {self.id}: a binary message is not a frame ({exc})") from exc
            yield AvatarFrame(frame.index, frame.pts, frame.speaking, frame.audio, image, jpeg, events, problems)
            events, problems = [], []

    async def aclose(self) -> None:
        """Close the session on the server and the WebSocket (idempotent; fine after the server closed it)."""
        if self._closed:
            return
        self._closed = True
        try:
            await self.client.close_session(self.id)
        except (SessionNotFoundError, ServerUnreachableError):
            pass  # closed already, or the server is gone
        finally:
            await self._ws.close()

    async def _send(self, message: str | bytes) -> None:
        if self._closed:
            raise SessionClosedError(f"session {self.id} is closed; open a new session")
        try:
            await self._ws.send(message)
        except ConnectionClosed as exc:
            raise _closed_error(exc, self.id) from exc


class _Images:
    """The avatar's images of a patch-frames connection: their JPEGs as sent, the last few decoded."""

    def __init__(self):
        self._jpegs: dict[int, bytes] = {}
        self._decoded: OrderedDict[tuple[int, str], np.ndarray] = OrderedDict()

    def clear(self) -> None:
        self._jpegs.clear()
        self._decoded.clear()

    def add(self, number: int, jpeg: bytes) -> None:
        self._jpegs[number] = jpeg
        for key in [key for key in self._decoded if key[0] == number]:
            del self._decoded[key]

    def frame(self, frame: wire.PatchFrame, color: Color) -> np.ndarray:
        """The whole frame: its image with its patch drawn (a new array). KeyError for an image not sent."""
        key = (frame.image, color)
        if key not in self._decoded:
            self._decoded[key] = decode_jpeg(self._jpegs[frame.image], color)
            if len(self._decoded) > DECODED_IMAGES:
                self._decoded.popitem(last=False)
        self._decoded.move_to_end(key)
        image = self._decoded[key].copy()
        x, y = frame.at
        dx, dy, dw, dh = frame.draw
        if dw and dh:
            patch = decode_jpeg(frame.patch, color)
            image[dy:dy + dh, dx:dx + dw] = patch[dy - y:dy - y + dh, dx - x:dx - x + dw]
        return image


async def _receive(ws: ClientConnection, session_id: str) -> str | bytes:
    """The next WebSocket message; the close, if it came, as its LipstreamError."""
    try:
        return await ws.recv()
    except ConnectionClosed as exc:
        raise _closed_error(exc, session_id) from exc


def _closed_error(exc: ConnectionClosed, session_id: str) -> LipstreamError:
    """What a close of a session's WebSocket means (close codes: `lipstream.server.websocket`)."""
    code = exc.rcvd.code if exc.rcvd is not None else None
    reason = exc.rcvd.reason if exc.rcvd is not None and exc.rcvd.reason else "no reason given"
    if code in (4401, 4403):
        return ApiKeyError(f"the server refused the WebSocket of session {session_id}: {reason}")
    if code == 4404:
        return SessionNotFoundError(f"session {session_id}: {reason}")
    if code == 4409:
        return SessionBusyError(f"session {session_id}: {reason}")
    if code == 1012:
        return SessionClosedError(f"session {session_id} was closed: the server is shutting down")
    if code is None:
        return SessionClosedError(f"the connection of session {session_id} was lost (no close message)")
    return SessionClosedError(f"the server closed session {session_id} (code {code}: {reason}); open a new session")


def _error_class(name: object) -> type[LipstreamError] | None:
    """The LipstreamError subclass of lipstream.errors the server named, or None."""
    cls = getattr(errors, str(name), None)
    return cls if isinstance(cls, type) and issubclass(cls, LipstreamError) else None


def _server_error(event: dict) -> LipstreamError:
    """A WebSocket error message {"type": "error", "code": class name, "message"} as its LipstreamError."""
    cls = _error_class(event.get("code"))
    message = str(event.get("message", ""))
    if cls is not None:
        return cls(message)
    return ServerReplyError(f"{event.get('code')}: {message}")
