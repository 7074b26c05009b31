"""`lipstream cluster` on this machine: one module-wide local Ray with 2 CPU replicas of the warp engine
(max_sessions 2 each) behind Ray Serve's proxy on a loopback port, driven through its HTTP API,
WebSocket and WebRTC signalling as a client of one server would: placement over both replicas, every
request of a session reaching its own replica, capacity refusal, an avatar prepared through one replica
shown by both, /ready and /metrics of every replica, and a replica's process killed mid-session.

The cluster runs with `frames="direct"`: session replies name each replica's own port for the WebSocket
and the offer, which the client follows; the same paths through the proxy are used alongside."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

import cv2
import httpx
import pytest

pytest.importorskip("ray.serve", reason="the cluster needs the `cluster` extra (Ray Serve)")

from aiortc import RTCPeerConnection

from lipstream.bench.serve import free_port
from lipstream.client import LipstreamClient
from lipstream.cluster import launch, proxy
from lipstream.cluster.router import STATS_PERIOD_S
from lipstream.errors import OverloadedError, SessionClosedError, SessionNotFoundError
from server_helpers import replicas_until, server_settings, store_avatar

pytestmark = pytest.mark.anyio
KEY = {"X-API-Key": "k-default"}
PER_REPLICA = 2


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared-avatars")  # the store every replica reads: here a local folder
    store_avatar(root)
    settings = server_settings(root, host="127.0.0.1", port=free_port(), output_height=128, max_sessions=PER_REPLICA)
    running = launch.start(settings, launch.ClusterOptions(replicas=2, cpus_per_replica=0.5, num_cpus=2,
                                                           proxy_location="HeadOnly", frames="direct",
                                                           ready_timeout_s=180))
    try:
        yield running
    finally:
        launch.stop(running)


async def ready_replicas(client: LipstreamClient) -> dict[str, dict]:
    return {r["name"]: r for r in (await client.ready())["replicas"] if r["ready"]}


async def settled(client: LipstreamClient) -> dict:
    """/ready once every replica reports no session, and the router has had its next reports: placement
    follows reports a second or two old, and a test that places sessions starts from an idle cluster."""
    deadline = time.monotonic() + 20
    while (ready := await client.ready())["capacity"]["sessions"]:
        assert time.monotonic() < deadline, ready
        await asyncio.sleep(0.2)
    await asyncio.sleep(3 * STATS_PERIOD_S)
    return ready


def through_proxy(info: dict) -> dict:
    """The session reply with its WebSocket as the path on the cluster's port (through Serve's proxy)."""
    return {**info, "ws": f"/api/sessions/{info['id']}/ws"}


async def offer(url: str) -> httpx.Response:
    """A WebRTC offer (recvonly video and audio, a data channel) posted to `url`."""
    pc = RTCPeerConnection()
    try:
        pc.addTransceiver("video", direction="recvonly")
        pc.addTransceiver("audio", direction="recvonly")
        pc.createDataChannel("control")
        await pc.setLocalDescription(await pc.createOffer())
        async with httpx.AsyncClient(headers=KEY) as http:
            return await http.post(url, json={"sdp": pc.localDescription.sdp, "type": "offer"})
    finally:
        await pc.close()


async def test_sessions_spread_over_the_replicas_and_every_request_reaches_its_own(cluster):
    async with LipstreamClient(cluster.url, "k-default") as client:
        await settled(client)
        replicas = await ready_replicas(client)
        assert len(replicas) == 2 and all(r["engine"] == "warp" and r["device"] == "cpu" for r in replicas.values())
        infos = [await client.create_session("astronaut") for _ in range(2 * PER_REPLICA)]
        held = sorted(info["instance"] for info in infos)
        assert held == sorted(list(replicas) * PER_REPLICA), "two sessions on each replica"
        assert all(info["id"].startswith(info["instance"] + ".") for info in infos)

        with pytest.raises(OverloadedError) as refused:  # every replica full: 503 with Retry-After
            await client.create_session("astronaut")
        assert refused.value.retry_after_s > 0 and "max_sessions" in str(refused.value)

        listed = {s["id"] for s in await client.sessions()}
        assert listed == {info["id"] for info in infos}, "GET /api/sessions lists the sessions of every replica"
        for info in infos:  # REST: a replica that does not hold the session would answer 404
            stats = await client.session_stats(info["id"])
            assert stats["id"] == info["id"]
            await client.interrupt(info["id"])

        first, second = sorted(infos, key=lambda i: i["instance"])[::PER_REPLICA]  # one on each replica
        for info in (first, second):  # the reply leads to the replica's own port
            assert info["ws"].startswith("ws://") and info["offer"].startswith("http://")
            assert info["ws"].split("/")[2] != cluster.url.split("/")[2]
        # the WebSocket: straight to the replica (as the reply says), and through the proxy
        remote = [await client.connect(first), await client.connect(through_proxy(second))]
        for session, info in zip(remote, (first, second), strict=True):
            assert session.hello["session"] == info["id"]
            frame = await anext(session.frames())
            assert frame.image.shape == (128, 128, 3)
        others = [info for info in infos if info not in (first, second)]
        # the WebRTC offer, to the URL of the reply and through the proxy: answered by the session's replica
        for info, url in zip(others, (others[0]["offer"], f"{cluster.url}/api/sessions/{others[1]['id']}/offer"),
                             strict=True):
            reply = await offer(url)
            assert reply.status_code == 200 and reply.json()["type"] == "answer", reply.text
            assert (await client.sessions()) and [s["viewer"] for s in await client.sessions()
                                                  if s["id"] == info["id"]] == ["webrtc"]
        for session in remote:
            await session.aclose()
        for info in others:  # their peer connections are closed already: their replicas may have closed them
            with contextlib.suppress(SessionNotFoundError):
                await client.close_session(info["id"])
        assert await client.sessions() == []


async def test_ready_and_metrics_cover_every_replica(cluster):
    async with LipstreamClient(cluster.url, "k-default") as client:
        ready = await settled(client)
        names = set(await ready_replicas(client))
        assert ready["ready"] and len(names) == 2
        assert ready["capacity"]["free_sessions"] == 2 * PER_REPLICA
    async with httpx.AsyncClient() as http:
        reply = await http.get(f"{cluster.url}/metrics", headers={"Authorization": "Bearer k-metrics"})
    assert reply.status_code == 200 and reply.headers[proxy.MARK_HEADER.decode()] == "-"
    labelled = {line.split('replica="')[1].split('"')[0] for line in reply.text.splitlines() if 'replica="' in line}
    assert labelled == names
    assert reply.text.count("# TYPE lipstream_server_viewers gauge") == 1, "one family block for all replicas"


async def test_an_avatar_prepared_through_one_replica_is_shown_by_every_replica(cluster, astronaut_bgr):
    photo = cv2.imencode(".png", astronaut_bgr)[1].tobytes()
    async with LipstreamClient(cluster.url, "k-default") as client:
        await settled(client)
    async with httpx.AsyncClient(base_url=cluster.url, headers=KEY, timeout=30) as http:
        reply = await http.post("/api/avatars", data={"name": "prepared"}, files={"file": ("face.png", photo)})
        assert reply.status_code == 202, reply.text
        job = reply.json()["job"]
        deadline = time.monotonic() + 120
        while job["status"] in ("queued", "running"):  # each poll reaches the replica that runs the job
            assert time.monotonic() < deadline, job
            await asyncio.sleep(0.5)
            reply = await http.get(f"/api/jobs/{job['id']}")
            assert reply.status_code == 200, reply.text
            job = reply.json()
        assert job["status"] == "done", job
        replicas = {r["name"] for r in (await http.get("/ready")).json()["replicas"]}
        made = []  # sessions until each replica shows it (placement follows reports a second old: at most all 4)
        while {m["instance"] for m in made} != replicas and len(made) < 2 * PER_REPLICA:
            reply = await http.post("/api/sessions", json={"avatar": "prepared"})
            assert reply.status_code == 201, reply.text
            made.append(reply.json())
        assert {m["instance"] for m in made} == replicas
        for info in made:
            assert info["avatar"] == "prepared"
            assert (await http.delete(f"/api/sessions/{info['id']}")).status_code == 204


async def test_a_replica_killed_mid_session(cluster):
    """Its sessions end: the one whose WebSocket goes through the proxy with close code 1011 and a reason,
    the one connected straight to it with a lost connection; the other replica's session keeps 25 fps;
    new sessions go to the survivor; Ray starts a replica in its place."""
    async with LipstreamClient(cluster.url, "k-default") as client:
        await settled(client)
        replicas = await ready_replicas(client)
        infos = [await client.create_session("astronaut") for _ in range(3)]  # 2 on one replica, 1 on the other
        held = {name: [info for info in infos if info["instance"] == name] for name in replicas}
        victim = next(name for name, sessions in held.items() if len(sessions) == 2)
        doomed, [survivor_info] = held[victim], next(sessions for name, sessions in held.items() if name != victim)
        proxied, direct = await client.connect(through_proxy(doomed[0])), await client.connect(doomed[1])
        survivor = await client.connect(survivor_info)
        survivor_frames = survivor.frames(color=None)
        await anext(survivor_frames)

        os.kill(replicas[victim]["pid"], signal.SIGKILL)

        async def closed_with(session) -> SessionClosedError:
            with pytest.raises(SessionClosedError) as ended:
                async for _ in session.frames(color=None):
                    pass
            return ended.value

        async def frames_for(seconds: float) -> list:
            frames, began = [], time.monotonic()
            async for frame in survivor_frames:
                frames.append(frame)
                if time.monotonic() - began >= seconds:
                    return frames
            raise AssertionError("the survivor's frames ended")

        through, straight, frames = await asyncio.gather(asyncio.wait_for(closed_with(proxied), 30),
                                                         asyncio.wait_for(closed_with(direct), 30), frames_for(3.0))
        assert "code 1011" in str(through) and "stopped" in str(through)
        assert "lost" in str(straight)
        indices = [f.index for f in frames]
        assert indices == list(range(indices[0], indices[0] + len(indices))), "no frame of the survivor lost"
        assert len(frames) >= 0.9 * 25 * 3, f"{len(frames)} frames in 3 s"

        fresh = await client.create_session("astronaut")  # the dead replica is out of the routing
        assert fresh["instance"] == survivor.info["instance"]
        await client.close_session(fresh["id"])

        def replaced(listed: list[dict]) -> bool:  # Ray Serve starts a new replica (a new name) in place of the dead one
            ready = {r["name"] for r in listed if r["ready"]}
            return len(ready) == 2 and victim not in ready

        await replicas_until(client, replaced, "a replacement replica", 120)
        for session in (survivor, proxied, direct):
            await session.aclose()
