"""`lipstream bench cluster`: what the cluster adds, per frame and per session set-up, over one server.

The same server settings run three times in one benchmark: as `lipstream serve` (the baseline), then
as a one-replica `lipstream cluster` on a local Ray, its WebSocket frames through Ray Serve's proxy
(`--frames proxy`: replica -> proxy -> client), then straight from the replica's port (`--frames
direct`; the REST calls still go through the proxy).
Through each, with the bench avatar and the warp engine by default:
- set-up: `--setups` times one after the other, POST /api/sessions, the WebSocket's hello, the first
  frame (ms, medians);
- message round trip: `--pings` pings over a session's WebSocket answered by the server (ms, median and
  p90): what a frame's trip costs twice (there and back) at the transport level;
- CPU per frame: `--sessions` sessions for `--seconds`, every frame read; the CPU time of the processes
  on the frames' path over the frames delivered (ms per frame): the server (or the replica) and Ray
  Serve's proxy, and the frames per second each session got.
The cluster's figures minus the baseline's are what it adds. Sizes: `--size` is the avatar's frames,
`--output-height` what is streamed (0: the avatar's own)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from lipstream.bench import FRAME_SIZES
from lipstream.bench.report import format_table, write_results
from lipstream.errors import SessionNotFoundError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", choices=sorted(FRAME_SIZES), default="720p", help="bench avatar frame size")
    parser.add_argument("--output-height", type=int, default=0, help="streamed frame height (0: the avatar's)")
    parser.add_argument("--engine", choices=("warp", "auto", "musetalk"), default="warp")
    parser.add_argument("--frames", choices=("patches", "jpeg"), default="patches",
                        help="the WebSocket's frames: face patches (the default of the page and the client) or "
                             "whole JPEGs")
    parser.add_argument("--sessions", type=int, default=2, help="sessions streaming at once (default 2)")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long they stream (default 10)")
    parser.add_argument("--setups", type=int, default=5, help="session set-ups timed (default 5)")
    parser.add_argument("--pings", type=int, default=100, help="WebSocket round trips timed (default 100)")
    parser.add_argument("--cpus-per-replica", type=float, default=1.0, help="the replica's CPUs (default 1)")
    parser.add_argument("--out-dir", default=None, help="where to write the JSON (default bench/results)")


def run(args: argparse.Namespace) -> int:
    from lipstream.avatar.store import save_avatar
    from lipstream.bench.serve import bench_avatar, served

    with tempfile.TemporaryDirectory(prefix="lipstream-bench-") as folder:
        root = Path(folder) / "avatars"
        save_avatar(bench_avatar(args.size), root=root)
        flags = {"avatars_root": root, "engine": args.engine, "output_height": args.output_height,
                 "admission_control": False, "max_sessions_per_key": max(args.sessions, 2)}
        started: dict = {}
        with served(flags, Path(folder) / "server.log", lambda p: started.update(pid=p.pid)) as (url, key):
            direct = asyncio.run(_measure(url, key, {"server": [started["pid"]]}, args))
        rows = [{"path": "lipstream serve", **direct}]
        for frames in ("proxy", "direct"):
            clustered, device = _measure_cluster(flags, frames, args)
            rows.append({"path": f"lipstream cluster, 1 replica, frames {frames}", **clustered})
    added = [{"path": f"added by the cluster, frames {row['path'].rsplit(' ', 1)[1]}",
              **{name: round(row[name] - direct.get(name, 0.0), 3) for name in row if "_ms" in name}}
             for row in rows[1:]]
    headers = ["path", "create ms", "hello ms", "first frame ms", "set-up ms", "ping ms", "ping p90 ms",
               "server CPU ms/frame", "proxy CPU ms/frame", "fps/session", "KiB/frame"]
    names = ["create_ms", "hello_ms", "first_frame_ms", "setup_ms", "ping_ms", "ping_p90_ms", "server_cpu_ms_per_frame",
             "proxy_cpu_ms_per_frame", "fps_per_session", "frame_kib"]
    print(format_table(headers, [[row["path"], *[row.get(n) for n in names]] for row in rows + added]))
    settings = {key: getattr(args, key) for key in ("size", "output_height", "engine", "frames", "sessions", "seconds", "setups",
                                                    "pings", "cpus_per_replica")}
    path = write_results("cluster", "cpu", {**settings, "device": device}, rows + added,
                         Path(args.out_dir) if args.out_dir else None)
    print(f"wrote {path}")
    return 0


def _measure_cluster(flags: dict, frames: str, args: argparse.Namespace) -> tuple[dict, str]:
    """The measures through a one-replica cluster on a local Ray (its frames by the path `frames`), and
    the replica's device."""
    import secrets

    from lipstream.bench.serve import free_port
    from lipstream.cluster import launch
    from lipstream.config import load_settings

    key = secrets.token_urlsafe(16)
    settings = load_settings({**flags, "host": "127.0.0.1", "port": free_port(), "api_keys": {key: ""},
                              "metrics_key": key}, environ={})
    cluster = launch.start(settings, launch.ClusterOptions(replicas=1, cpus_per_replica=args.cpus_per_replica,
                                                           proxy_location="HeadOnly", frames=frames))
    try:
        ready = json.loads(_get(f"{cluster.url}/ready", key))
        replica = ready["replicas"][0]
        pids = {"server": [replica["pid"]], "proxy": _proxy_pids()}
        return asyncio.run(_measure(cluster.url, key, pids, args)), replica["device"]
    finally:
        launch.stop(cluster)


def _get(url: str, key: str) -> str:
    import httpx

    return httpx.get(url, headers={"X-API-Key": key}, timeout=30).text


def _proxy_pids() -> list[int]:
    """Ray Serve's HTTP proxy processes on this machine (their process title names the actor)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"ProxyActor" in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds of the processes (Linux /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / ticks


async def _measure(url: str, key: str, pids: dict[str, list[int]], args: argparse.Namespace) -> dict:
    """Set-up times, WebSocket round trips and CPU per frame through the server at `url`; pids: {what:
    process ids} of the processes the frames pass through."""
    from lipstream.client import LipstreamClient

    async with LipstreamClient(url, key, timeout_s=30) as client:
        await client.wait_ready(60)
        avatar = (await client.avatars())[0]["name"]
        setups = [await _setup(client, avatar) for _ in range(args.setups)]
        rtts = await _round_trips(client, avatar, args.pings)
        cpu_ms, fps, frame_kib = await _stream(client, avatar, pids, args.sessions, args.seconds, args.frames)
    median = {name: round(statistics.median(s[name] for s in setups), 2) for name in setups[0]}
    return {**median, "ping_ms": round(statistics.median(rtts), 3),
            "ping_p90_ms": round(statistics.quantiles(rtts, n=10)[-1], 3),
            **{f"{what}_cpu_ms_per_frame": round(ms, 3) for what, ms in cpu_ms.items()},
            "fps_per_session": round(fps, 2), "frame_kib": round(frame_kib, 1)}


async def _setup(client, avatar: str) -> dict:
    began = time.perf_counter()
    info = await client.create_session(avatar)
    created = time.perf_counter()
    session = await client.connect(info)
    hello = time.perf_counter()
    await anext(session.frames(color=None))
    first = time.perf_counter()
    await session.aclose()
    return {"create_ms": 1e3 * (created - began), "hello_ms": 1e3 * (hello - created),
            "first_frame_ms": 1e3 * (first - hello), "setup_ms": 1e3 * (first - began)}


async def _round_trips(client, avatar: str, count: int) -> list[float]:
    """Milliseconds of `count` pings answered over one session's WebSocket (frames keep flowing)."""
    from websockets.asyncio.client import connect

    from lipstream.client import websocket_url

    info = await client.create_session(avatar)
    ws_url = websocket_url(client.url, info)
    try:
        async with connect(ws_url, additional_headers={"X-API-Key": client.api_key}, max_size=None) as ws:
            await ws.recv()  # hello
            rtts = []
            for i in range(count):
                sent = time.perf_counter()
                await ws.send(json.dumps({"type": "ping", "t": i}))
                while True:
                    message = await ws.recv()
                    if isinstance(message, str) and json.loads(message).get("t") == i:
                        rtts.append(1e3 * (time.perf_counter() - sent))
                        break
            return rtts
    finally:
        with contextlib.suppress(SessionNotFoundError):  # its viewer went: closed already
            await client.close_session(info["id"])


async def _stream(client, avatar: str, pids: dict[str, list[int]], sessions: int, seconds: float, frames: str
                  ) -> tuple[dict[str, float], float, float]:
    """({what: CPU ms of its processes (`pids`) per frame delivered}, frames/s per session, KiB of
    binary messages per frame) of `sessions` sessions (`frames`: their WebSocket's) read for `seconds`."""
    opened = [await client.open_session(avatar, frames=frames) for _ in range(sessions)]
    counts = [0] * sessions
    for session in opened:
        await anext(session.frames(color=None))
    received = [session.bytes_received for session in opened]
    cpu_before, began = {what: _cpu_s(ids) for what, ids in pids.items()}, time.perf_counter()

    async def read(i: int) -> None:
        async for _ in opened[i].frames(color=None):
            counts[i] += 1
            if time.perf_counter() - began >= seconds:
                return

    await asyncio.gather(*(read(i) for i in range(sessions)))
    elapsed = time.perf_counter() - began
    sizes = [session.bytes_received - before for session, before in zip(opened, received, strict=True)]
    cpu_ms = {what: 1e3 * (_cpu_s(ids) - cpu_before[what]) / max(1, sum(counts)) for what, ids in pids.items()}
    for session in opened:
        await session.aclose()
    return cpu_ms, sum(counts) / sessions / elapsed, sum(sizes) / max(1, sum(counts)) / 1024
