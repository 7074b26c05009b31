"""What the two transports share: a client's messages applied to its session (within the
connection's input limits), and the events sent before a frame.

Both the WebSocket and the WebRTC data channel carry the same client messages (see `wire`)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable

from lipstream.config import Settings
from lipstream.errors import LipstreamError, MessageTooLargeError
from lipstream.server import wire
from lipstream.server.avatar_switch import change_avatar
from lipstream.server.http_errors import public_text
from lipstream.server.registry import OpenSession
from lipstream.stream.session import OutputFrame


class _Bucket:
    """A token bucket: `rate` tokens a second, holding at most one second's worth."""

    def __init__(self, rate: float, now: float):
        self.rate = rate
        self.tokens = rate
        self.at = now

    def refill(self, now: float) -> None:
        self.tokens = min(self.rate, self.tokens + (now - self.at) * self.rate)
        self.at = now


class InputLimits:
    """One connection's input limits: messages of at most `max_bytes`, at most `messages_per_s`
    messages and `bytes_per_s` bytes a second, in bursts of up to one second's worth. `now`: the clock."""

    def __init__(self, max_bytes: int, messages_per_s: float, bytes_per_s: float,
                 now: Callable[[], float] = time.monotonic):
        self.max_bytes = max_bytes
        self.now = now
        self._messages = _Bucket(messages_per_s, now())
        self._bytes = _Bucket(bytes_per_s, now())

    @classmethod
    def of(cls, settings: Settings) -> InputLimits:
        """The limits the settings give every connection."""
        return cls(settings.max_message_bytes, settings.max_messages_per_s, settings.max_input_bytes_per_s)

    def wait_s(self, size: int) -> float:
        """Count a message of `size` bytes; returns how long to wait before reading the next one to stay
        within the rates (0 within them). A reader that waits it out slows the sender (TCP backpressure)."""
        now = self.now()
        debt = 0.0
        for bucket, amount in ((self._messages, 1), (self._bytes, size)):
            bucket.refill(now)
            bucket.tokens -= amount
            debt = max(debt, -bucket.tokens / bucket.rate)
        return debt

    def allow(self, size: int) -> bool:
        """Count a message of `size` bytes if it is within the rates now; False (nothing counted) if
        not. For transports that cannot slow their sender down (the data channel): it drops the message."""
        now = self.now()
        for bucket in (self._messages, self._bytes):
            bucket.refill(now)
        if self._messages.tokens < 1 or self._bytes.tokens < size:
            return False
        self._messages.tokens -= 1
        self._bytes.tokens -= size
        return True


class ClientMessages:
    """One viewer's messages to its session. state: the app's state; send(text): a reply to the client
    (a pong, or an error: a bad message never ends the connection; one over the setting
    `max_message_bytes` is not used). Audio and control apply at once,
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
            size = message_size(data)
            max_bytes = self.state.settings.max_message_bytes
            if size > max_bytes:
                raise MessageTooLargeError(f"a message has at most {max_bytes} bytes (setting max_message_bytes); "
                                           f"got {size}: send audio in smaller chunks")
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


def message_size(data: bytes | str) -> int:
    """Bytes of a client's message as it came (text counted as UTF-8)."""
    return len(data) if isinstance(data, bytes) else len(data.encode())


def frame_events(entry: OpenSession, frame: OutputFrame) -> list[str]:
    """The event messages to send just before `frame`; "avatar_changed" says which avatar and the
    streamed size of its frames from then on."""
    messages = []
    for event in frame.events:
        details = {}
        if event == "avatar_changed":
            height, width = frame.compositor.frame_size
            details = {"avatar": frame.avatar, "width": width, "height": height}
        messages.append(wire.event_message(event, frame.index, frame.pts, **details))
    return messages
