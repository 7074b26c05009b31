"""Where an integration's lipstream session comes from, as its user gave it: an avatar, and either a
lipstream server (`url`, `api_key`) or this process (a `LocalSessions` host, shared or its own)."""

from __future__ import annotations

import os

from lipstream.integrations.local import LocalSession, LocalSessions


class SessionSource:
    """avatar: an avatar name (in-process: under the avatars root; on a server: one of the key's) or, in
    process, an avatar folder. url / api_key: a lipstream server; without `url` the session runs in this
    process, on `host` (a `LocalSessions` to share between integrations or to set the settings with;
    default: one of its own, with the settings `lipstream serve` would read, made on first use and
    closed by `aclose`). fps, output_height: the session's (None: the settings'; height 0: the avatar's)."""

    def __init__(self, avatar: str | os.PathLike, url: str | None = None, api_key: str | None = None,
                 fps: int | None = None, output_height: int | None = None, host: LocalSessions | None = None):
        if url is not None and host is not None:
            raise ValueError("give either url (a lipstream server) or host (sessions in this process), not both")
        self.avatar = avatar
        self.url = url
        self.api_key = api_key
        self.fps = fps
        self.output_height = output_height
        self.host = host
        self._own_host = host is None and url is None

    async def open_local(self) -> LocalSession:
        """A session of the avatar in this process (on the host, made now if need be)."""
        if self.host is None:
            self.host = LocalSessions()
        return await self.host.open(self.avatar, fps=self.fps, output_height=self.output_height)

    async def aclose(self) -> None:
        """Close the host if it is its own (and so every session still open on it)."""
        if self._own_host and self.host is not None:
            host, self.host = self.host, None
            await host.aclose()
