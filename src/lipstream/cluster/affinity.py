"""Which replica a request belongs to, read from its URL alone (browsers cannot put headers on a
WebSocket): the routing key that the cluster's proxy middleware hands Ray Serve's router.

A replica's session and job ids start with its name (setting `instance`: `<replica>.<hex>`), so every
later request of a session (REST, the WebSocket, the WebRTC offer, the LiveKit leave) and every poll of
a job names the replica that holds it. The requests that make a session or a job are placed by free
capacity instead; anything else may go to any replica.

Routing keys (the value of Ray Serve's session header):
  PLACE        a request that makes a session or a job: the replica with the most free capacity
  <replica>    a request of a session or job of that replica
  (none)       any replica"""

from __future__ import annotations

import re

from lipstream.config import instance_of

PLACE = "+place"  # cannot be an instance name (those start with a letter or digit)
PLACED_PATHS = ("/api/sessions", "/api/livekit/sessions", "/api/avatars")
_OWNED = re.compile(r"^/api/(?:livekit/)?(?:sessions|jobs)/([^/]+)")


def routing_key(method: str, path: str) -> str | None:
    """The routing key of a request (`method` upper-case, `path` without the query), or None."""
    if method == "POST" and path.rstrip("/") in PLACED_PATHS:
        return PLACE
    match = _OWNED.match(path)
    return instance_of(match.group(1)) if match else None
