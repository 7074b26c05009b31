"""What the two transports share: applying a client's messages to its session.

Both the WebSocket and the WebRTC data channel carry the same client messages (see `wire`)."""

from __future__ import annotations

import json

from lipstream.errors import LipstreamError
from lipstream.server import wire
from lipstream.server.registry import OpenSession


def apply_client_message(entry: OpenSession, data: bytes | str) -> str | None:
    """Apply one client message (binary audio or JSON control) to the session. Returns the text to
    send back, if any: a pong, or an error message (a bad message never ends the connection)."""
    try:
        if isinstance(data, bytes):
            samples = wire.pcm16_samples(data)
            if samples.size:
                entry.session.push_audio(samples)
            return None
        message = wire.parse_control(data)
        if message["type"] == "end":
            entry.session.end_speech()
        elif message["type"] == "interrupt":
            entry.session.interrupt()
        else:
            return json.dumps({"type": "pong", "t": message.get("t")})
    except LipstreamError as exc:
        return wire.error_message(type(exc).__name__, str(exc))
    return None
