"""The cluster's ASGI middleware, run inside each of Ray Serve's HTTP proxies (Ray loads it from the
import path in the environment variable RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH, which
`lipstream cluster` sets for the Ray it starts; see the README for a Ray cluster of your own).

It does two things no replica can do:
- it gives every request its routing key (`affinity.routing_key`, from the URL) in Ray Serve's
  session header, which Serve's proxy hands to the router (`lipstream.cluster.router`); a key a client
  sent itself is dropped;
- a WebSocket whose replica died (the proxy's stream from it ended without a close) is closed with code
  `REPLICA_LOST` and a reason, instead of being dropped without one."""

from __future__ import annotations

import logging
import os

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lipstream.cluster.affinity import routing_key

log = logging.getLogger(__name__)

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "lipstream.cluster.proxy:middlewares"
SESSION_HEADER_ENV = "RAY_SERVE_SESSION_ID_HEADER_KEY"  # Ray Serve's; its default is x-session-id
MARK_HEADER = b"x-lipstream-route"  # on every HTTP reply that went through this middleware
REPLICA_LOST = 1011
REPLICA_LOST_REASON = "the server process that held this session stopped (it is being restarted); open a new session"


def session_header() -> bytes:
    return os.environ.get(SESSION_HEADER_ENV, "x-session-id").lower().encode()


class SessionAffinity:
    """ASGI middleware: the routing key header on every request, and a clear close of a WebSocket whose
    replica is gone."""

    def __init__(self, app: ASGIApp):
        self.app = app
        self.header = session_header()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        key = routing_key(scope.get("method", "GET"), scope["path"])
        headers = [(name, value) for name, value in scope["headers"] if name.lower() != self.header]
        if key is not None:
            headers.append((self.header, key.encode()))
        scope = {**scope, "headers": headers}
        if scope["type"] == "http":
            await self.app(scope, receive, _marking(send, key))
        else:
            await self._websocket(scope, receive, send)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = {"accepted": False, "closed": False, "left": False}

        async def tracked_receive() -> Message:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                state["left"] = True
            return message

        async def tracked_send(message: Message) -> None:
            if message["type"] == "websocket.accept":
                state["accepted"] = True
            elif message["type"] == "websocket.close":
                state["closed"] = True
            await send(message)

        try:
            await self.app(scope, tracked_receive, tracked_send)
        finally:
            if state["accepted"] and not state["closed"] and not state["left"]:
                log.warning("the replica of %s stopped without closing its WebSocket; closing it with %d",
                            scope["path"], REPLICA_LOST)
                try:
                    await send({"type": "websocket.close", "code": REPLICA_LOST, "reason": REPLICA_LOST_REASON})
                except (OSError, RuntimeError) as exc:  # the client went meanwhile
                    log.info("the client of %s left before its close (%s)", scope["path"], exc)


def _marking(send: Send, key: str | None) -> Send:
    """`send`, adding the MARK_HEADER (the routing key, or "-") to the reply's head."""
    async def marked(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), (MARK_HEADER, (key or "-").encode())]}
        await send(message)

    return marked


def middlewares() -> list[Middleware]:
    """The callback Ray Serve's proxies call at start (CALLBACK_ENV = CALLBACK)."""
    return [Middleware(SessionAffinity)]
