"""The server's avatars: each tenant's avatars under the avatars root, loaded on first use and shared by
every session that shows them, with their engine material made once per engine (on the engine's
device worker) and their compositor once per device and streamed size; the least recently used ones
that no session shows are unloaded above a memory budget."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Collection
from pathlib import Path

from lipstream.avatar.model import Avatar
from lipstream.avatar.store import AvatarCache, AvatarSummary, CacheKey, delete_avatar, list_avatars
from lipstream.engines.base import Engine, Material
from lipstream.stream.compositor import Compositor, output_size
from lipstream.stream.scheduler import Scheduler

log = logging.getLogger(__name__)


def describe(summary: AvatarSummary) -> dict:
    """An avatar as the API lists it."""
    height, width = summary.frame_size or (0, 0)
    return {"name": summary.name, "frames": summary.cycle_frames, "width": width, "height": height,
            "fps": summary.fps, "latents": summary.latents, "landmarks": summary.landmarks,
            "created": summary.created}


class AvatarLibrary:
    """root: the avatars root (see `lipstream.avatar.layout`). max_bytes: memory budget of the loaded
    avatars (None: no limit). in_use: the (tenant, name) of the avatars open sessions show (never
    unloaded: their memory stays taken until the sessions close). sharpen: the compositors' unsharp
    mask (setting `sharpen`). Use it from the event loop."""

    def __init__(self, root: str | os.PathLike, max_bytes: int | None = None,
                 in_use: Callable[[], Collection[CacheKey]] = frozenset, sharpen: bool = True):
        self.root = Path(root)
        self.sharpen = sharpen
        self._cache = AvatarCache(self.root, max_bytes)
        self._in_use = in_use

    def list(self, tenant: str) -> list[dict]:
        return [describe(summary) for summary in list_avatars(tenant, self.root)]

    async def avatar(self, name: str, tenant: str) -> Avatar:
        """The avatar, loaded on first use (what `get` raises)."""
        return await asyncio.to_thread(self._cache.get, name, tenant)

    async def get(self, name: str, tenant: str, engine: Engine, scheduler: Scheduler | None = None,
                  height: int = 0) -> tuple[Avatar, Compositor, Material]:
        """The avatar (loaded on first use; again after its folder changed), its compositor on the
        engine's device at the streamed `height` (0: its own size) and the engine's material for it,
        each made once however many sessions ask at the same time. With the engine's `scheduler` the
        material is made on its worker and the compositor's device data uploaded by its
        post-processing lane before the first frame. Raises AvatarNotFoundError, AvatarNameError,
        AvatarCorruptError (and NoFaceError from an engine that needs a face it cannot find)."""
        def material(avatar: Avatar) -> Material:
            return engine.material(avatar) if scheduler is None else scheduler.call(engine.material, avatar).result()

        def compositor(avatar: Avatar) -> Compositor:
            return Compositor(avatar, engine.device, sharpen=self.sharpen, size=output_size(avatar.frame_size, height))

        device = str(engine.device)
        tags = ("material", engine.name, device), ("compositor", device, height, self.sharpen)
        avatar, made = await asyncio.to_thread(self._cache.get_derived, name, tenant,
                                               dict(zip(tags, (material, compositor))))
        paste = made[tags[1]]
        if scheduler is not None and paste.backend == "torch":
            await scheduler.post(paste.tensors)
        for key in self._cache.trim(keep=self._in_use()):
            log.info("unloaded avatar %r (tenant %r): the loaded avatars are over avatar_cache_mb", key[1], key[0])
        return avatar, paste, made[tags[0]]

    @property
    def loaded(self) -> int:
        """How many avatars are in memory."""
        return len(self._cache.loaded)

    @property
    def nbytes(self) -> int:
        return self._cache.nbytes

    def forget(self, name: str, tenant: str) -> None:
        """Drop a loaded avatar with what was made from it (after it was deleted; a replaced one is
        reloaded by `get` anyway). Never waits: a load in progress finishes for its caller only."""
        self._cache.evict(name, tenant)

    async def delete(self, name: str, tenant: str) -> None:
        """Delete the avatar's folder (AvatarNotFoundError when there is none). Open sessions keep showing it."""
        await asyncio.to_thread(delete_avatar, name, tenant=tenant, root=self.root)
        self.forget(name, tenant)
