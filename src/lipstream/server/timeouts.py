"""A deadline for request heads: a connection that has not sent a whole request line and headers
within `header_timeout_s` of connecting (or of its previous response, on a kept-alive connection) is
closed, so half-sent requests cannot hold the server's sockets. uvicorn itself only times out idle
kept-alive connections, and only until their first byte. Request bodies have their own read timeout
(`body_limit`)."""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _DefaultProtocol
except ImportError:  # no httptools: uvicorn's "auto" falls back to h11 too
    _DefaultProtocol = H11Protocol


class _HeadDeadline:
    """Mixed into a uvicorn HTTP protocol class (`self.cycle` is the request being served, made once
    a request's head is complete; `self.transport` the connection)."""

    header_timeout_s: float

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._arm_head_deadline()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        upgraded = self.transport.get_protocol() is not self  # now a WebSocket
        if self._head_timer is not None and (upgraded or self.cycle is not self._head_of):
            self._disarm_head_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self._arm_head_deadline()  # kept alive: the next request's head has the same deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_deadline()
        super().connection_lost(exc)

    def _arm_head_deadline(self) -> None:
        self._disarm_head_deadline()
        self._head_of = self.cycle  # the head is complete once a new cycle replaces this one
        self._head_timer = asyncio.get_running_loop().call_later(self.header_timeout_s, self._head_overdue)

    def _disarm_head_deadline(self) -> None:
        if getattr(self, "_head_timer", None) is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_overdue(self) -> None:
        self._head_timer = None
        if self.cycle is self._head_of and not self.transport.is_closing():
            self.transport.close()


def http_protocol(header_timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class (httptools when installed, else h11) with a deadline of
    `header_timeout_s` for every request head; give it to uvicorn as `http=`."""
    return type("HeadDeadlineProtocol", (_HeadDeadline, _DefaultProtocol), {"header_timeout_s": header_timeout_s})
