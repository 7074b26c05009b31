"""What a server offers a proxy or a cluster in front of several servers: its name in every session
and job id (setting instance), a hard cap on its sessions (setting max_sessions), and draining."""

from __future__ import annotations

import asyncio
import time

import pytest

from lipstream.config import instance_of, load_settings, scoped_id
from lipstream.engines.warp import WarpEngine
from lipstream.errors import SettingsError
from lipstream.server.app import create_app, drain
from server_helpers import LiveServer, server_settings, start

KEY = {"X-API-Key": "k-default"}


def test_instance_names_are_checked_and_start_every_id():
    assert scoped_id("gpu-3", "ab12") == "gpu-3.ab12" and scoped_id("", "ab12") == "ab12"
    assert instance_of("gpu-3.ab12") == "gpu-3"
    assert instance_of("ab12") is None and instance_of("Bad!.ab12") is None and instance_of(".ab12") is None
    for bad in ("Upper", "has.dot", "-dash-first", "x" * 33):
        with pytest.raises(SettingsError, match="instance"):
            load_settings({"instance": bad}, environ={})
    for bad in ("10.0.0.5:2160", "http://host:2160/path", "ftp://host"):
        with pytest.raises(SettingsError, match="public_url"):
            load_settings({"public_url": bad}, environ={})


def test_a_named_server_names_itself_in_its_sessions_jobs_and_readiness(root, astronaut_bgr):
    import cv2

    client = start(create_app(server_settings(root, instance="node-a", public_url="http://10.1.2.3:2160/"),
                              engine=WarpEngine()))
    try:
        assert client.get("/ready", headers=KEY).json()["instance"] == "node-a"
        reply = client.post("/api/sessions", json={"avatar": "astronaut"}, headers=KEY)
        info = reply.json()
        assert reply.status_code == 201 and info["instance"] == "node-a" and info["id"].startswith("node-a.")
        assert info["ws"] == f"ws://10.1.2.3:2160/api/sessions/{info['id']}/ws"  # the server's own address
        assert info["offer"] == f"http://10.1.2.3:2160/api/sessions/{info['id']}/offer"
        assert client.get(f"/api/sessions/{info['id']}/stats", headers=KEY).json()["instance"] == "node-a"
        photo = cv2.imencode(".png", astronaut_bgr)[1].tobytes()
        job = client.post("/api/avatars", data={"name": "named"}, files={"file": ("f.png", photo)}, headers=KEY)
        assert job.status_code == 202 and job.json()["job"]["id"].startswith("node-a.")
        assert client.get(job.json()["url"], headers=KEY).status_code == 200
    finally:
        client.__exit__(None, None, None)


def test_max_sessions_caps_the_server_whatever_it_measures(root):
    """Admission control off (the measured capacity is not enforced): the cap still is, with 503."""
    client = start(create_app(server_settings(root, max_sessions=1), engine=WarpEngine()))
    try:
        first = client.post("/api/sessions", json={"avatar": "astronaut"}, headers=KEY)
        assert first.status_code == 201
        assert client.get("/api/capacity", headers=KEY).json()["free_sessions"] == 0
        refused = client.post("/api/sessions", json={"avatar": "astronaut"}, headers=KEY)
        assert refused.status_code == 503 and int(refused.headers["Retry-After"]) > 0
        assert "max_sessions" in refused.json()["detail"]
        client.delete(f"/api/sessions/{first.json()['id']}", headers=KEY)
        assert client.post("/api/sessions", json={"avatar": "astronaut"}, headers=KEY).status_code == 201
    finally:
        client.__exit__(None, None, None)


def test_a_draining_server_takes_no_new_session_and_waits_for_its_open_ones(root, tmp_path):
    """The open session keeps streaming while the server drains; drain returns once it has ended."""
    import httpx

    from lipstream.client import LipstreamClient

    with LiveServer(create_app(server_settings(root, output_height=64), engine=WarpEngine())) as server:
        async def run() -> None:
            async with LipstreamClient(server.url, "k-default") as client:
                session = await client.open_session("astronaut")
                loop = asyncio.get_running_loop()
                drained = asyncio.run_coroutine_threadsafe(drain(server.app, 30, poll_s=0.05), server.loop)
                await asyncio.sleep(0.3)
                async with httpx.AsyncClient(base_url=server.url, headers=KEY) as http:
                    refused = await http.post("/api/sessions", json={"avatar": "astronaut"})
                    assert refused.status_code == 503 and "draining" in refused.json()["detail"]
                    assert (await http.get("/ready")).json() == {"ready": False, "draining": True, "sessions": 1}
                began, frames = time.monotonic(), []
                async for frame in session.frames(color=None):
                    frames.append(frame.index)
                    if time.monotonic() - began > 1.0:
                        break
                assert len(frames) >= 20 and not drained.done(), "the session goes on while the server drains"
                await session.aclose()
                assert await loop.run_in_executor(None, drained.result, 10) == 0

        asyncio.run(run())

