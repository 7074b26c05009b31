"""The FastAPI application: `create_app(settings)`.

At start (lifespan) it loads the engine and times its stages (the server's capacity), in the
background, and cleans up what killed writers left (avatar build folders, upload folders): /health
answers at once, /ready once that is done. Avatars load on first use. At shutdown (SIGTERM under
uvicorn) `app.state.before_shutdown` is awaited when set (a cluster replica drains there), then every
session is closed, with its viewer, the schedulers and the encoding pool stop, and avatar jobs end (a
running one within `shutdown_grace_s`, queued ones failed)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from importlib import resources
from urllib.parse import quote

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from lipstream import __version__
from lipstream.avatar.store import sweep_stale_builds
from lipstream.config import Settings
from lipstream.engines.base import Engine
from lipstream.media.encoding import EncodingPool, encode_jpeg
from lipstream.server import avatar_switch, http_errors, livekit_rooms, rest, webrtc, websocket
from lipstream.server.auth import ApiKeys, CallerDep
from lipstream.server.avatars import AvatarLibrary
from lipstream.server.body_limit import BodyLimitMiddleware
from lipstream.server.engines import EngineHub
from lipstream.server.http_errors import public_text
from lipstream.server.jobs import AvatarJobs, sweep_upload_folders
from lipstream.server.logs import install_key_redaction
from lipstream.server.registry import SessionRegistry
from lipstream.stream.capacity import Capacity

log = logging.getLogger(__name__)

STATIC = resources.files("lipstream.server") / "static"
REAP_EVERY_S = 5.0
SAMPLE_EVERY_S = 1.0


def create_app(settings: Settings, *, engine: Engine | None = None, engine_reason: str | None = None,
               keys: ApiKeys | None = None) -> FastAPI:
    """The server for `settings`. engine: an engine loaded already, instead of the one the settings
    name (loaded at start); engine_reason: why it runs, for /ready. keys: the API keys (default: from
    the settings, or one generated key when they name none: `app.state.keys.generated`)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = app.state
        tasks = [asyncio.create_task(_load(app)), asyncio.create_task(_reap(state.sessions)),
                 asyncio.create_task(_sample(state.capacity))]
        try:
            yield
        finally:
            if state.before_shutdown is not None:  # a cluster replica drains here (its reaper still runs)
                try:
                    await state.before_shutdown()
                except Exception:
                    log.exception("before shutting down")
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            log.info("shutting down: closed %d sessions", await state.sessions.close_all())
            await state.engines.aclose()
            await asyncio.to_thread(state.jobs.shutdown, settings.shutdown_grace_s)
            state.encoding.shutdown()

    install_key_redaction()
    app = FastAPI(title="lipstream", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    state = app.state
    state.settings = settings
    state.keys = keys or ApiKeys(settings.api_keys)
    state.capacity = Capacity(target=settings.capacity_target, max_batch=settings.max_batch, fps=settings.fps,
                              output_height=settings.output_height, max_sessions=settings.max_sessions or None)
    state.engines = EngineHub(settings, engine, engine_reason, capacity=state.capacity,
                              encode_probe=lambda frame: encode_jpeg(frame, settings.jpeg_quality))
    state.encoding = EncodingPool(capacity=state.capacity)
    state.sessions = SessionRegistry(settings.max_sessions_per_key, settings.detached_session_timeout_s)
    state.avatars = AvatarLibrary(settings.avatars_root, settings.avatar_cache_mb << 20,
                                  in_use=state.sessions.avatars_shown, sharpen=settings.sharpen)
    state.jobs = AvatarJobs(settings.avatars_root, settings.models_root,
                            None if settings.device == "auto" else settings.device,
                            max_per_tenant=settings.max_jobs_per_tenant, behind=state.capacity.behind,
                            instance=settings.instance, shared_vae=state.engines.shared_vae)
    state.ready = asyncio.Event()
    state.startup_error = None
    state.draining = False  # set: no new sessions (503), /ready answers 503; the open ones go on
    state.before_shutdown = None  # an async callable awaited first at shutdown, before sessions close

    http_errors.install(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes, read_timeout_s=settings.body_timeout_s)
    app.include_router(rest.router)
    app.include_router(websocket.router)
    app.include_router(webrtc.router)
    app.include_router(avatar_switch.router)
    app.include_router(livekit_rooms.router)
    if settings.api_docs:
        _add_api_docs(app)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    return app


def _add_api_docs(app: FastAPI) -> None:
    """/openapi.json, /docs (Swagger UI) and /redoc, behind the API key like the API itself."""

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(caller: CallerDep) -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    async def swagger(caller: CallerDep) -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=f"/openapi.json?key={quote(caller.key)}", title="lipstream API")

    @app.get("/redoc", include_in_schema=False)
    async def redoc(caller: CallerDep) -> HTMLResponse:
        return get_redoc_html(openapi_url=f"/openapi.json?key={quote(caller.key)}", title="lipstream API")


async def drain(app: FastAPI, timeout_s: float, poll_s: float = 0.5) -> int:
    """Take no new sessions (they are refused with 503, /ready answers 503) and wait until the open ones
    have ended, for at most `timeout_s`; returns how many are still open. The sessions are not touched:
    their viewers end them."""
    state = app.state
    state.draining = True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while len(state.sessions) and loop.time() < deadline:
        await asyncio.sleep(min(poll_s, max(0.0, deadline - loop.time())))
    return len(state.sessions)


async def _load(app: FastAPI) -> None:
    """Load and time the default engine, and clean up what killed writers left; then the server is ready."""
    state = app.state
    state.capacity.sample()  # with the one at the end: the cores other processes take, measured before ready
    try:
        await state.engines.start()
        swept = await asyncio.to_thread(sweep_stale_builds, state.keys.tenants, state.avatars.root)
        for what, folder in swept:
            log.info("%s %s, left by an avatar write that was interrupted", what, folder)
        for folder in await asyncio.to_thread(sweep_upload_folders):
            log.info("removed %s, the uploads of a server that is gone", folder)
        state.capacity.sample()
        state.ready.set()
    except Exception as exc:  # reported by /ready; /health stays up for diagnosis
        log.exception("the server could not load its engine")
        state.startup_error = public_text(f"{type(exc).__name__}: {exc}", state)  # for clients: no paths


async def _reap(sessions: SessionRegistry) -> None:
    """Close the sessions that never got (or lost) a viewer, every few seconds."""
    while True:
        await asyncio.sleep(REAP_EVERY_S)
        await sessions.close_detached()


async def _sample(capacity: Capacity) -> None:
    """Measure what the stages do not time, every second (see `Capacity.sample`)."""
    while True:
        await asyncio.sleep(SAMPLE_EVERY_S)
        capacity.sample()
