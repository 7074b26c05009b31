"""What the two transports share: a client's messages applied to its session, and the events sent
before a frame.

Both the WebSocket and the WebRTC data channel carry the same client messages (see `wire`)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

from lipstream.errors import LipstreamError
from lipstream.media.encoding import output_size
from lipstream.server import wire
from lipstream.server.avatar_switch import change_avatar
from lipstream.server.http_errors import public_text
from lipstream.server.registry import OpenSession
from lipstream.stream.session import OutputFrame


class ClientMessages:
    """One viewer's messages to its session. state: the app's state; send(text): a reply to the client
    (a pong, or an error: a bad message never ends the connection). Audio and control apply at once,
    in order; an avatar change loads the avatar in the background and replies only if it fails (its
    "avatar_changed" event comes with the frame). `close()` stops what still runs."""

    def __init__(self, state, entry: OpenSession, send: Callable[[str], Awaitable[None]]):
        self.state = state
        self.entry = entry
        self.send = send
        self._changes: set[asyncio.Task] = set()

    async def handle(self, data: bytes | str) -> None:
        reply = self._apply(data)
        if reply is not None:
            await self.send(reply)

    def _apply(self, data: bytes | str) -> str | None:
        try:
            if isinstance(data, bytes):
                samples = wire.pcm16_samples(data)
                if samples.size:
                    self.entry.session.push_audio(samples)
                return None
            message = wire.parse_control(data)
            if message["type"] == "end":
                self.entry.session.end_speech()
            elif message["type"] == "interrupt":
                self.entry.session.interrupt()
            elif message["type"] == "avatar":
                task = asyncio.create_task(self._change(message["avatar"]))
                self._changes.add(task)
                task.add_done_callback(self._changes.discard)
            else:
                return json.dumps({"type": "pong", "t": message.get("t")})
        except LipstreamError as exc:
            return self._error(exc)
        return None

    async def _change(self, name: str) -> None:
        try:
            await change_avatar(self.state, self.entry, name)
        except LipstreamError as exc:
            await self.send(self._error(exc))

    def _error(self, exc: LipstreamError) -> str:
        return wire.error_message(type(exc).__name__, public_text(str(exc), self.state))

    def close(self) -> None:
        for task in self._changes:
            task.cancel()


def frame_events(entry: OpenSession, frame: OutputFrame) -> list[str]:
    """The event messages to send just before `frame`; "avatar_changed" says which avatar and the
    streamed size of its frames from then on."""
    messages = []
    for event in frame.events:
        details = {}
        if event == "avatar_changed":
            height, width = output_size(tuple(frame.image.shape[:2]), entry.output_height)
            details = {"avatar": frame.avatar, "width": width, "height": height}
        messages.append(wire.event_message(event, frame.index, frame.pts, **details))
    return messages
