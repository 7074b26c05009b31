"""The server's avatars: each tenant's avatars under the avatars root, loaded once and shared by every
session that shows them, with their compositor and engine material made once per engine."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from lipstream.avatar.layout import clean_name
from lipstream.avatar.model import Avatar
from lipstream.avatar.store import AvatarCache, AvatarSummary, delete_avatar, list_avatars
from lipstream.engines.base import Engine, Material
from lipstream.stream.compositor import Compositor

log = logging.getLogger(__name__)


def describe(summary: AvatarSummary) -> dict:
    """An avatar as the API lists it."""
    height, width = summary.frame_size or (0, 0)
    return {"name": summary.name, "frames": summary.cycle_frames, "width": width, "height": height,
            "fps": summary.fps, "latents": summary.latents, "landmarks": summary.landmarks,
            "created": summary.created}


class AvatarLibrary:
    """root: the avatars root (see `lipstream.avatar.layout`). sharpen: the compositors' unsharp mask
    (setting `sharpen`)."""

    def __init__(self, root: str | os.PathLike, sharpen: bool = True):
        self.root = Path(root)
        self.sharpen = sharpen
        self._cache = AvatarCache(self.root)
        self._prepared: dict[tuple[str, str, str], tuple[Avatar, Compositor, Material]] = {}

    def list(self, tenant: str) -> list[dict]:
        return [describe(summary) for summary in list_avatars(tenant, self.root)]

    async def get(self, name: str, tenant: str, engine: Engine) -> tuple[Avatar, Compositor, Material]:
        """The avatar (loaded once; again after its folder changed), its compositor on the engine's
        device and the engine's material for it. Raises AvatarNotFoundError, AvatarNameError,
        AvatarCorruptError (and NoFaceError from an engine that needs a face it cannot find)."""
        avatar = await asyncio.to_thread(self._cache.get, name, tenant)
        key = (tenant, avatar.name, engine.name)
        prepared = self._prepared.get(key)
        if prepared is None or prepared[0] is not avatar:
            compositor, material = await asyncio.to_thread(
                lambda: (Compositor(avatar, engine.device, sharpen=self.sharpen), engine.material(avatar)))
            prepared = self._prepared[key] = (avatar, compositor, material)
        return prepared

    async def preload(self, tenants: set[str], engine: Engine) -> int:
        """Load every avatar of `tenants` for `engine` (so the first session of each starts at once);
        returns how many. An avatar that fails to load is logged and skipped."""
        count = 0
        for tenant in sorted(tenants):
            for summary in await asyncio.to_thread(list_avatars, tenant, self.root):
                try:
                    await self.get(summary.name, tenant, engine)
                    count += 1
                except Exception as exc:  # noqa: BLE001 - one broken avatar must not stop the server
                    log.warning("avatar %r (tenant %r) does not load: %s", summary.name, tenant, exc)
        return count

    def forget(self, name: str, tenant: str) -> None:
        """Drop a loaded avatar (after it was deleted; a replaced one is reloaded by `get` anyway).
        Safe off the event loop: it takes the avatar cache's lock, and reads the prepared avatars only
        through a snapshot of their keys (`get` may add one meanwhile)."""
        name = clean_name(name)
        self._cache.evict(name, tenant)
        for key in [k for k in list(self._prepared) if k[:2] == (tenant, name)]:
            self._prepared.pop(key, None)

    async def delete(self, name: str, tenant: str) -> None:
        """Delete the avatar's folder (AvatarNotFoundError when there is none). Open sessions keep showing it."""
        await asyncio.to_thread(delete_avatar, name, tenant=tenant, root=self.root)
        await asyncio.to_thread(self.forget, name, tenant)
