"""The FastAPI application: `create_app(settings)`.

At start (lifespan) it loads the engine and every avatar of the known tenants once, in the
background: /health answers at once, /ready once loading is done. At shutdown (SIGTERM under
uvicorn) every session is closed, with its viewer, and the schedulers and the encoding pool stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from importlib import resources

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from lipstream import __version__
from lipstream.avatar.store import sweep_stale_builds
from lipstream.config import Settings
from lipstream.engines.base import Engine
from lipstream.errors import SettingsError
from lipstream.media.encoding import EncodingPool, nvjpeg_available
from lipstream.server import avatar_switch, http_errors, livekit_rooms, rest, webrtc, websocket
from lipstream.server.auth import ApiKeys
from lipstream.server.avatars import AvatarLibrary
from lipstream.server.body_limit import BodyLimitMiddleware
from lipstream.server.engines import EngineHub
from lipstream.server.http_errors import public_text
from lipstream.server.jobs import AvatarJobs
from lipstream.server.registry import SessionRegistry

log = logging.getLogger(__name__)

STATIC = resources.files("lipstream.server") / "static"
REAP_EVERY_S = 5.0


def create_app(settings: Settings, *, engine: Engine | None = None, engine_reason: str | None = None,
               keys: ApiKeys | None = None) -> FastAPI:
    """The server for `settings`. engine: an engine loaded already, instead of the one the settings
    name (loaded at start); engine_reason: why it runs, for /ready. keys: the API keys (default: from
    the settings, or one generated key when they name none: `app.state.keys.generated`)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = app.state
        loading = asyncio.create_task(_load(app))
        reaping = asyncio.create_task(_reap(state.sessions))
        try:
            yield
        finally:
            loading.cancel()
            reaping.cancel()
            await asyncio.gather(loading, reaping, return_exceptions=True)
            log.info("shutting down: closed %d sessions", await state.sessions.close_all())
            await state.engines.aclose()
            state.jobs.shutdown()
            state.encoding.shutdown()

    if settings.jpeg_encoder == "nvjpeg" and not nvjpeg_available():
        raise SettingsError("jpeg_encoder=nvjpeg needs a CUDA GPU and torchvision >= 0.19 built with CUDA "
                            "(install the torchvision that matches your torch), or use jpeg_encoder=auto")
    app = FastAPI(title="lipstream", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    app.state.keys = keys or ApiKeys(settings.api_keys)
    app.state.engines = EngineHub(settings, engine, engine_reason)
    app.state.avatars = AvatarLibrary(settings.avatars_root, sharpen=settings.sharpen)
    app.state.encoding = EncodingPool()
    app.state.sessions = SessionRegistry(settings.max_sessions_per_key, settings.detached_session_timeout_s)
    app.state.jobs = AvatarJobs(settings.avatars_root, settings.models_root,
                                None if settings.device == "auto" else settings.device)
    app.state.ready = asyncio.Event()
    app.state.startup_error = None
    app.state.avatars_loaded = 0

    http_errors.install(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes)
    app.include_router(rest.router)
    app.include_router(websocket.router)
    app.include_router(webrtc.router)
    app.include_router(avatar_switch.router)
    app.include_router(livekit_rooms.router)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    return app


async def _load(app: FastAPI) -> None:
    """Load the default engine, then every avatar of the known tenants; then the server is ready."""
    state = app.state
    try:
        slot = await state.engines.start()
        swept = await asyncio.to_thread(sweep_stale_builds, state.keys.tenants, state.avatars.root)
        for folder in swept:
            log.info("removed %s, left by an avatar build that was interrupted", folder)
        state.avatars_loaded = await state.avatars.preload(state.keys.tenants, slot.engine)
        log.info("%d avatars loaded from %s", state.avatars_loaded, state.avatars.root)
        state.ready.set()
    except Exception as exc:  # reported by /ready; /health stays up for diagnosis
        log.exception("the server could not load its engine")
        state.startup_error = public_text(f"{type(exc).__name__}: {exc}", state)  # for clients: no paths


async def _reap(sessions: SessionRegistry) -> None:
    """Close the sessions that never got (or lost) a viewer, every few seconds."""
    while True:
        await asyncio.sleep(REAP_EVERY_S)
        await sessions.close_detached()
