"""Shared by the server tests: a stored avatar, audio encodings, settings, and a live uvicorn server."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from functools import cache
from pathlib import Path
from typing import Self

import numpy as np
import soundfile
import uvicorn
from fastapi.testclient import TestClient

from face_avatar import photo_avatar
from lipstream.audio.load import SAMPLE_RATE as SR
from lipstream.avatar.model import Avatar
from lipstream.avatar.store import save_avatar
from lipstream.bench.serve import free_port
from lipstream.config import Settings, load_settings
from lipstream.engines.warp import WarpEngine
from lipstream.server.app import create_app
from lipstream.server.serve import uvicorn_config
from lipstream.synthetic import astronaut_bgr


@cache
def astronaut_avatar() -> Avatar:
    """A one-frame avatar of the astronaut photo (512x512) with face-mesh landmarks (built once)."""
    return photo_avatar(astronaut_bgr(), name="astronaut")


@cache
def narrow_avatar() -> Avatar:
    """A one-frame avatar of the astronaut photo's middle 400 columns (512 high, 400 wide)."""
    return photo_avatar(np.ascontiguousarray(astronaut_bgr()[:, 56:456]), name="narrow")


def store_avatar(root: Path, name: str = "astronaut", tenant: str = "", avatar: Avatar | None = None) -> Path:
    """Write `avatar` (default: the astronaut avatar) under `root` as `name` for `tenant`."""
    avatar = avatar or astronaut_avatar()
    original = (avatar.name, avatar.tenant, avatar.path)
    try:
        return save_avatar(avatar, name=name, tenant=tenant, root=root)
    finally:
        avatar.name, avatar.tenant, avatar.path = original


def store_tenant_avatars(root: Path) -> Path:
    """The astronaut avatar as "astronaut" for the default tenant and as "astro-other" for tenant "other"."""
    store_avatar(root, "astronaut")
    store_avatar(root, "astro-other", tenant="other")
    return root


def wav_bytes(samples: np.ndarray, rate: int = SR) -> bytes:
    out = io.BytesIO()
    soundfile.write(out, samples, rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


def pcm16(samples: np.ndarray) -> bytes:
    return np.clip(np.rint(samples * 32768), -32768, 32767).astype("<i2").tobytes()


def server_settings(avatars_root: Path, **overrides) -> Settings:
    """Settings for a test server (no env vars read): keys k-default (default tenant), k-other (tenant
    "other") unless `api_keys` is given; metrics key k-metrics. Admission control is off (tests open
    sessions whatever the load of the machine) unless `admission_control` is given."""
    flags = {"avatars_root": str(avatars_root), "models_root": str(avatars_root / "no-models"),
             "api_keys": {"k-default": "", "k-other": "other"}, "metrics_key": "k-metrics",
             "admission_control": False, **overrides}
    return load_settings(flags, environ={})


def start(app) -> TestClient:
    """A TestClient of `app`, entered, once the app is ready (the key k-default asks)."""
    client = TestClient(app).__enter__()
    deadline = time.monotonic() + 30
    while client.get("/ready", headers={"X-API-Key": "k-default"}).status_code != 200:
        assert time.monotonic() < deadline, client.get("/ready", headers={"X-API-Key": "k-default"}).json()
        time.sleep(0.05)
    return client


class LiveServer:
    """A uvicorn server for `app` on a free port, on a thread with its own event loop, configured as
    `lipstream serve` configures it (`uvicorn_config`). log_level: uvicorn's. loop: the event loop it
    runs on (once started)."""

    def __init__(self, app, host: str = "127.0.0.1", log_level: str = "warning"):
        self.app = app
        self.port = free_port()
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn_config(app, app.state.settings, host=host, port=self.port,
                                                    log_level=log_level, timeout_graceful_shutdown=5))
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        await self.server.serve()

    def __enter__(self) -> Self:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        while not self.app.state.ready.is_set():
            if time.monotonic() > deadline or self.app.state.startup_error:
                raise RuntimeError(f"the test server did not get ready: {self.app.state.startup_error}")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def warp_server(root: Path, **overrides) -> LiveServer:
    """A LiveServer (not started yet) with the warp engine, over `root` holding the astronaut avatar;
    settings as `server_settings` makes them, with `overrides`."""
    store_avatar(root)
    return LiveServer(create_app(server_settings(root, **overrides), engine=WarpEngine()))


async def replicas_until(client, ok, what: str, timeout_s: float = 90) -> list[dict]:
    """A cluster's replicas as its /ready lists them once `ok(replicas)` holds (`client`: a
    LipstreamClient of the cluster); fails, saying `what` it waited for, after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not ok(replicas := (await client.ready())["replicas"]):
        assert time.monotonic() < deadline, f"{what} within {timeout_s:g} s: {replicas}"
        await asyncio.sleep(0.5)
    return replicas
