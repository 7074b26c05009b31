"""The open sessions of the server: who owns each, who watches it, and closing them.

A session belongs to the API key that made it (and so to the key's tenant); other tenants get 404 for
it. It has at most one viewer (a WebSocket or a WebRTC connection). When the viewer goes, the session
closes; a session that never gets a viewer closes after `detached_timeout_s`."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lipstream.errors import SessionBusyError, SessionLimitError, SessionNotFoundError, excerpt
from lipstream.metrics import SERVER_VIEWERS

if TYPE_CHECKING:
    from lipstream.stream.session import Session

log = logging.getLogger(__name__)


@dataclass(eq=False)
class OpenSession:
    """A session and its server-side facts. fps: its frame rate. size: (height, width) of the streamed
    frames; output_height: what they are scaled to (0: not scaled). viewer: "websocket", "webrtc" or
    None. closed: set once the session is closed; viewers stop on it. on_close: what closing must undo
    (a viewer's peer connection, the session's share of the capacity), run once when it closes.
    changing: held while its avatar is being changed (changes apply in order). instance: the name of
    the server that holds it (setting instance; "" for none); public_url: where clients reach that server
    directly (setting public_url; "" for the address they used)."""

    session: Session
    key: str
    tenant: str
    avatar: str
    engine: str
    fps: int
    size: tuple[int, int]
    output_height: int
    viewer: str | None = None
    detached_since: float = field(default_factory=time.monotonic)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    on_close: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    changing: asyncio.Lock = field(default_factory=asyncio.Lock)
    instance: str = ""
    public_url: str = ""

    @property
    def id(self) -> str:
        return self.session.id


class SessionRegistry:
    """All open sessions. Not thread-safe: use it from the server's event loop."""

    def __init__(self, max_per_key: int, detached_timeout_s: float):
        self.max_per_key = max_per_key
        self.detached_timeout_s = detached_timeout_s
        self._open: dict[str, OpenSession] = {}

    def __len__(self) -> int:
        return len(self._open)

    def check_room(self, key: str) -> None:
        """SessionLimitError when `key` may not open another session."""
        count = sum(1 for entry in self._open.values() if entry.key == key)
        if count >= self.max_per_key:
            raise SessionLimitError(f"this API key has {count} open sessions, the most it may have (setting "
                                    "max_sessions_per_key); close one (DELETE /api/sessions/{id}) first")

    def add(self, entry: OpenSession) -> None:
        self.check_room(entry.key)
        self._open[entry.id] = entry

    def get(self, session_id: str, tenant: str) -> OpenSession:
        """The open session `session_id` of `tenant`; SessionNotFoundError otherwise."""
        entry = self._open.get(session_id)
        if entry is None or entry.tenant != tenant:
            raise SessionNotFoundError(f"no open session {excerpt(session_id)}; it was closed, timed out, or never "
                                       "existed (create one with POST /api/sessions)")
        return entry

    def for_tenant(self, tenant: str) -> list[OpenSession]:
        return [entry for entry in self._open.values() if entry.tenant == tenant]

    def avatars_shown(self) -> set[tuple[str, str]]:
        """(tenant, avatar name) of every avatar an open session shows."""
        return {(entry.tenant, entry.avatar) for entry in self._open.values()}

    def attach(self, entry: OpenSession, viewer: str) -> None:
        """Mark `viewer` ("websocket" or "webrtc") as the session's one viewer; SessionBusyError if taken."""
        if entry.viewer is not None:
            raise SessionBusyError(f"session {entry.id} already has a {entry.viewer} viewer; one viewer per "
                                   "session: create another session for another viewer")
        if entry.closed.is_set():
            raise SessionNotFoundError(f"session {entry.id} is closed")
        entry.viewer = viewer
        SERVER_VIEWERS.labels(viewer).inc()

    def detach(self, entry: OpenSession) -> None:
        """Undo `attach` (a viewer that failed to connect); the detached timeout starts again."""
        if entry.viewer is not None:
            SERVER_VIEWERS.labels(entry.viewer).dec()
            entry.viewer = None
            entry.detached_since = time.monotonic()

    async def close(self, entry: OpenSession) -> None:
        """Close the session and free it (idempotent). Once begun, the closing completes even when the
        caller is cancelled (e.g. the task of a viewer that went away)."""
        if self._open.pop(entry.id, None) is None:
            return
        await asyncio.shield(self._teardown(entry))

    async def _teardown(self, entry: OpenSession) -> None:
        if entry.viewer is not None:
            SERVER_VIEWERS.labels(entry.viewer).dec()
        entry.closed.set()
        await entry.session.aclose()
        for undo in entry.on_close:
            try:
                await undo()
            except Exception:  # one viewer's failing teardown must not keep the session registered
                log.exception("closing the viewer of session %s failed", entry.id)

    async def close_all(self) -> int:
        """Close every session; returns how many were open."""
        entries = list(self._open.values())
        for entry in entries:
            await self.close(entry)
        return len(entries)

    async def close_detached(self, now: float | None = None) -> int:
        """Close the sessions without a viewer for longer than the timeout; returns how many."""
        now = time.monotonic() if now is None else now
        stale = [entry for entry in self._open.values()
                 if entry.viewer is None and now - entry.detached_since > self.detached_timeout_s]
        for entry in stale:
            log.info("session %s had no viewer for %.0f s; closing it", entry.id, self.detached_timeout_s)
            await self.close(entry)
        return len(stale)
