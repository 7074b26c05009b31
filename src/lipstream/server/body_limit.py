"""Request bodies: a cap on their size (larger ones get 413 before they are read in full, or at all)
and a read timeout (a body that stops arriving gets 408, so a stalled upload cannot hold a socket).

A declared Content-Length over the cap is refused at once; a body sent without one (chunked) is
counted as it arrives, and reading it fails with 413 when it crosses the cap. Each part of a body
must arrive within `read_timeout_s` of the previous one (or of the head)."""

from __future__ import annotations

import asyncio
import json

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


def _too_large_text(max_bytes: int) -> str:
    return (f"the request body is larger than the {max_bytes} bytes this server accepts "
            "(setting max_upload_bytes); send a smaller file")


class BodyTooLarge(HTTPException):
    """Raised while a handler reads the body (FastAPI passes HTTPExceptions through body parsing)."""

    def __init__(self, max_bytes: int):
        super().__init__(413, _too_large_text(max_bytes))


class BodyTimeout(HTTPException):
    """Raised while a handler reads a body that stopped arriving."""

    def __init__(self, seconds: float):
        super().__init__(408, f"the request body stopped arriving for {seconds:g} s (setting body_timeout_s); "
                              "send it again", headers={"Connection": "close"})


class BodyLimitMiddleware:
    """Pure ASGI middleware around the app: counts every HTTP request body against `max_bytes` and
    waits at most `read_timeout_s` for each of its parts."""

    def __init__(self, app: ASGIApp, max_bytes: int, read_timeout_s: float):
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout_s = read_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            body = json.dumps({"detail": _too_large_text(self.max_bytes), "error": "UploadTooLargeError"}).encode()
            await send({"type": "http.response.start", "status": 413,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body})
            return
        seen = 0
        complete = False

        async def counting_receive() -> Message:
            nonlocal seen, complete
            if complete:  # after the body: e.g. a wait for the disconnect
                message = await receive()
            else:
                try:
                    message = await asyncio.wait_for(receive(), self.read_timeout_s)
                except TimeoutError:
                    raise BodyTimeout(self.read_timeout_s) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, counting_receive, send)
