"""`lipstream cluster`'s autoscaling, live on this machine: a local Ray with CPU replicas of the warp
engine (max_sessions 3 each), between 1 and 2 replicas, room 3 sessions a replica and headroom 1, with
delays of a second so that it runs in a test. Sessions fill the first replica and the policy adds a
second; sessions close until one replica would do, both still holding a live session, and the one Ray
Serve stops drains: its session keeps streaming without a lost frame, new sessions go to the other,
and the replica stops only once its session has ended. (The policy's arithmetic: test_cluster_routing.)"""

from __future__ import annotations

import asyncio
import os
import time

import pytest

pytest.importorskip("ray.serve", reason="the cluster needs the `cluster` extra (Ray Serve)")

from lipstream.bench.serve import free_port
from lipstream.client import LipstreamClient, RemoteSession
from lipstream.cluster import launch
from lipstream.cluster.router import STATS_PERIOD_S
from server_helpers import replicas_until, server_settings, store_avatar

pytestmark = pytest.mark.anyio
PER_REPLICA = 3
FAST_METRICS = {"RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5"}  # read by the replicas Ray starts


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared-avatars")
    store_avatar(root)
    settings = server_settings(root, host="127.0.0.1", port=free_port(), output_height=128, max_sessions=PER_REPLICA)
    options = launch.ClusterOptions(min_replicas=1, max_replicas=2, sessions_per_replica=PER_REPLICA, headroom=1,
                                    upscale_delay_s=1, downscale_delay_s=1, look_back_s=1, drain_timeout_s=120,
                                    cpus_per_replica=0.5, num_cpus=2, proxy_location="HeadOnly", frames="direct",
                                    ready_timeout_s=180)
    saved = {name: os.environ.get(name) for name in FAST_METRICS}
    os.environ.update(FAST_METRICS)
    try:
        running = launch.start(settings, options)
    finally:
        for name, value in saved.items():
            os.environ.pop(name) if value is None else os.environ.__setitem__(name, value)
    try:
        yield running
    finally:
        launch.stop(running)


class Watched:
    """A connected session whose frame indices are recorded as they arrive (with their arrival time)."""

    def __init__(self, session: RemoteSession):
        self.session = session
        self.frames: list[tuple[float, int]] = []
        self.task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        async for frame in self.session.frames(color=None):
            self.frames.append((time.monotonic(), frame.index))

    def indices_since(self, since: float) -> list[int]:
        return [index for at, index in self.frames if at >= since]

    async def aclose(self) -> None:
        await self.session.aclose()
        await asyncio.wait_for(self.task, 10)


def assert_unbroken(indices: list[int], seconds: float) -> None:
    assert indices == list(range(indices[0], indices[0] + len(indices))), "a frame was lost"
    assert len(indices) >= 0.85 * 25 * seconds, f"{len(indices)} frames in {seconds:g} s"


async def test_a_replica_added_for_the_sessions_and_one_removed_drains_its_live_session(cluster):
    async with LipstreamClient(cluster.url, "k-default") as client:
        [first] = await replicas_until(client, lambda rs: len(rs) == 1 and rs[0]["ready"], "one replica")
        infos = [await client.create_session("astronaut") for _ in range(PER_REPLICA)]  # the first replica full
        assert {info["instance"] for info in infos} == {first["name"]}
        kept = Watched(await client.connect(infos[0]))

        # 3 sessions + headroom 1 need a second replica
        replicas = await replicas_until(client, lambda rs: sum(r["ready"] for r in rs) == 2, "a second replica")
        [second] = [r["name"] for r in replicas if r["name"] != first["name"]]
        await asyncio.sleep(3 * STATS_PERIOD_S)  # the router's next reports of the new replica
        other = await client.create_session("astronaut")
        assert other["instance"] == second, "the first replica is full"
        watched = {first["name"]: kept, second: Watched(await client.connect(other))}

        # 2 live sessions, one on each replica, + headroom 1 fit one replica: Serve stops one of them
        for info in infos[1:]:
            await client.close_session(info["id"])
        replicas = await replicas_until(client, lambda rs: any(r["draining"] for r in rs), "a replica draining", 60)
        [draining] = [r["name"] for r in replicas if r["draining"]]
        [staying] = [name for name in watched if name != draining]
        since = time.monotonic()
        await asyncio.sleep(3)
        for session in watched.values():  # both sessions go on, the draining replica's too
            assert_unbroken(session.indices_since(since), 3)
        fresh = await client.create_session("astronaut")
        assert fresh["instance"] == staying, "no new session on a draining replica"
        await client.close_session(fresh["id"])
        assert draining in {r["name"] for r in (await client.ready())["replicas"]}, "it waits for its session"

        await watched[draining].aclose()  # its last session ends: the replica stops
        await replicas_until(client, lambda rs: draining not in {r["name"] for r in rs}, "the drained replica gone", 60)
        assert_unbroken(watched[staying].indices_since(since), time.monotonic() - since)
        await watched[staying].aclose()
