"""Live sessions inside this process, for integrations that embed lipstream in an agent's own program:
the server's Session, Scheduler, engine choice and avatar store, without HTTP.

    host = LocalSessions()                     # settings as `lipstream serve` reads them (LIPSTREAM_*, config file)
    session = await host.open("astronaut")     # an avatar name (under avatars_root) or an avatar folder
    await session.push_audio(pcm)              # int16 (or float32) [n], mono 16 kHz
    await session.end_speech()
    async for frame in session.frames(): ...   # lipstream.client.AvatarFrame, as a RemoteSession yields them
    await session.aclose()

A `LocalSession` has the interface of `lipstream.client.RemoteSession`, so an integration drives either.
The engine (setting `engine`; `auto`: MuseTalk when its weights are installed, else warp) loads once per
process and stays, as a server's does. A host runs one scheduler for all its sessions (their frames
share engine batches; its worker owns the engine's tensor work and warms the engine up when it
starts) on the event loop of its sessions: started with the first open session and stopped with the
last, so no thread outlives them. Each avatar loads once per host."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import cv2
import numpy as np

from lipstream.avatar.model import Avatar
from lipstream.avatar.store import load_avatar
from lipstream.client import AvatarFrame, Color
from lipstream.config import Settings, load_settings
from lipstream.engines.base import Engine, Material
from lipstream.errors import AudioFormatError
from lipstream.server.avatars import AvatarLibrary
from lipstream.server.engines import load_engine_for
from lipstream.stream.compositor import Compositor, output_size
from lipstream.stream.scheduler import Scheduler
from lipstream.stream.session import OutputFrame, Session

log = logging.getLogger(__name__)
T = TypeVar("T")

_ENGINES: dict[tuple, tuple[Engine, str]] = {}  # the loaded models: one engine per settings that choose it
_ENGINES_LOCK = threading.Lock()


def shared_engine(settings: Settings) -> tuple[Engine, str]:
    """The engine `settings` choose, loaded on first use in this process (blocking): (engine, one line
    saying which runs and why)."""
    key = (settings.engine, str(settings.models_root), settings.device, settings.dtype, settings.compile_mode,
           settings.max_batch)
    with _ENGINES_LOCK:
        if key not in _ENGINES:
            _ENGINES[key] = load_engine_for(settings, settings.engine)
            log.info("%s", _ENGINES[key][1])
        return _ENGINES[key]


def is_path(avatar: str | os.PathLike) -> bool:
    """Whether an avatar reference is a folder (a PathLike, or text with a path separator) rather than a name."""
    return isinstance(avatar, os.PathLike) or "/" in avatar or os.sep in avatar


class LocalSessions:
    """settings: engine, models and avatars roots, device, batching, queue limits (default: read as
    `lipstream serve` reads them). Use from one event loop."""

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or load_settings()
        self._library = AvatarLibrary(self.settings.avatars_root)
        self._folders: dict[tuple[Path, str], tuple[Avatar, Compositor, Material]] = {}
        self._scheduler: Scheduler | None = None
        self._open: set[LocalSession] = set()

    async def open(self, avatar: str | os.PathLike, *, fps: int | None = None,
                   output_height: int | None = None) -> LocalSession:
        """A live session of `avatar` (a name under the avatars root, or a folder). fps: default the
        setting; output_height: frames scaled to this height (default the setting; 0: the avatar's own).
        Raises what loading raises: AvatarNotFoundError, AvatarCorruptError, MissingWeightsError, ..."""
        engine, _ = await asyncio.to_thread(shared_engine, self.settings)
        if self._scheduler is None:
            scheduler = Scheduler(engine, max_batch=self.settings.max_batch, max_wait_ms=self.settings.max_wait_ms)
            await scheduler.warm_start()
            self._scheduler = scheduler
        height = self.settings.output_height if output_height is None else output_height
        avatar, compositor, material = await self._prepared(avatar, engine, self._scheduler, height)
        session = Session(avatar, engine, self._scheduler, fps=fps or self.settings.fps, compositor=compositor,
                          material=material, max_queue_s=self.settings.max_queued_audio_s,
                          auto_end_ms=self.settings.auto_end_ms or None)
        local = LocalSession(session, self)
        self._open.add(local)
        return local

    async def aclose(self) -> None:
        """Close every open session (and so the scheduler)."""
        for session in list(self._open):
            await session.aclose()

    async def _prepared(self, ref: str | os.PathLike, engine: Engine, scheduler: Scheduler, height: int
                        ) -> tuple[Avatar, Compositor, Material]:
        if not is_path(ref):
            return await self._library.get(str(ref), "", engine, scheduler, height)
        key = (Path(ref).resolve(), engine.name, height)
        if key not in self._folders:
            avatar = await asyncio.to_thread(load_avatar, Path(ref))
            compositor = Compositor(avatar, engine.device, size=output_size(avatar.frame_size, height))
            self._folders[key] = (avatar, compositor, await scheduler.run(engine.material, avatar))
        return self._folders[key]

    async def _release(self, local: LocalSession) -> None:
        self._open.discard(local)
        await local.session.aclose()
        if not self._open and self._scheduler is not None:
            scheduler, self._scheduler = self._scheduler, None
            await scheduler.aclose()


class LocalSession:
    """A `Session` of this process behind the interface of `lipstream.client.RemoteSession`.

    id, avatar, engine, fps, width, height: the session's (the frames' size: its compositor's).
    session: the `Session` itself. host: the `LocalSessions` that opened it (closing releases it there),
    or None (closing closes the Session)."""

    def __init__(self, session: Session, host: LocalSessions | None = None):
        self.host = host
        self.session = session
        self.id = session.id
        self.avatar = session.avatar.name
        self.engine = session.engine.name
        self.fps = session.fps
        self.height, self.width = session.compositor.frame_size

    async def push_audio(self, samples: np.ndarray) -> None:
        """Speech: int16 [n], or float32 [n] in [-1, 1], mono 16 kHz. AudioFormatError for other arrays;
        QueueFullError beyond the queue limit."""
        try:
            self.session.push_audio(samples)
        except ValueError as exc:
            raise AudioFormatError(str(exc)) from exc

    async def end_speech(self) -> None:
        self.session.end_speech()

    async def interrupt(self) -> None:
        self.session.interrupt()

    async def stats(self) -> dict:
        return self.session.stats()

    async def frames(self, color: Color | None = "rgb") -> AsyncIterator[AvatarFrame]:
        """The session's frames in real time, each image made whole and converted (`convert`) to uint8
        [H, W, 3] in `color` order (None: no image). Ends when the session is closed."""
        async for frame in self.session.frames():
            image = None if color is None else await self.convert(_host_image, frame, color)
            yield AvatarFrame(frame.index, frame.pts, frame.speaking, frame.audio, image, None, frame.events,
                              speech_samples=frame.speech_samples)

    async def convert(self, fn: Callable[..., T], /, *args: Any) -> T:
        """Run fn(*args), a frame's conversion, off the event loop (here: on a worker thread)."""
        return await asyncio.to_thread(fn, *args)

    async def aclose(self) -> None:
        """Close the session (idempotent); a host stops its scheduler after its last session."""
        if self.host is not None:
            await self.host._release(self)
        else:
            await self.session.aclose()


def _host_image(frame: OutputFrame, color: Color) -> np.ndarray:
    """A session frame, whole (BGR), in `color` order: a new array."""
    bgr = frame.image
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB) if color == "rgb" else bgr.copy()
