"""`lipstream bench serve`: N simulated clients speaking to live sessions at real-time pace.

Each client streams synthetic speech as 16 kHz PCM16 chunks of `--chunk-ms` at real-time pace:
utterances of `--utterance-s`, each ended explicitly, `--gap-s` of quiet between them; clients start at
random offsets in the first second. Transports (`--transport`, one or more, each run with every N of
`--clients`):

- `websocket` (default): through a real server. With `--url` and `--key`, one already running (avatar
  `--avatar`, default the key's first); otherwise `lipstream serve` is started as a subprocess on a
  free localhost port (engine `--engine`) over a temporary avatars root holding the bench avatar (the
  astronaut scene at `--size`, 8 frames), and stopped with SIGTERM at the end. Each client is a
  `lipstream.client` session: it sends the audio over the session's WebSocket, ends each utterance,
  and reads the frames (`--frames`: patch frames, or whole JPEGs; not decoded) and events.
- `webrtc`: the same server, each client an aiortc peer (`bench.webrtc_viewer`) receiving the video
  and audio tracks (counted, not decoded: the clients share the server's cores) and sending its audio
  over the data channel. The clients of both run in this process, on the machine of a server they start.
- `inprocess`: each client is a `Session` on one shared `Scheduler` (one per device, as the server
  runs them), read through `Session.frames()` as a transport would, without network; `--encode`
  adds a viewer's encoding of each frame on a thread pool (patch or whole JPEGs), and a sampler
  measures how late the event loop wakes up (its lag) while the device works.

Per transport and N: delivered frames/s per session (frames received / wall time; min and mean);
first-frame latency per utterance, p50/p95/p99, as
  - chunk -> frame: from sending the utterance's first audio chunk to receiving its first speaking
    frame (includes the engine's audio look-ahead: a frame needs some audio after it before its
    features exist), and
  - ready -> frame: from the chunk that made the first frame's features computable to that frame
    being sent (the session's `first_frame_ms`; over a network read from its stats): the server's own
    latency (scheduling, engine, compositing, tick);
and where the first frame's time went, the median per stage over the utterances (the session's
`first_frame_stages_ms`: audio wait, features, queue, engine, composite, show; encode and send over
the WebSocket); dropped frames (late faces, shown as the idle frame) as a share of speech frames;
stalled frames (the client's audio not there yet), held frames and rebases (the sessions' stats); how
late frames come after their due time, p95 (over a network: arrival minus pts, relative to the
session's earliest frame, so encoding and transport count); the mean engine batch and the engine
time (in-process: p50 over the scheduler's recent batches; over a network: the mean over the run,
from the server's /metrics). Before the served transports run, what one viewer costs the host per
frame is measured in this process (`bench.viewer_cost`: copy, JPEG, I420, VP8/H.264, Opus).
Targets: MuseTalk at 25 fps and 720p on an H100/H200, >= 32 sessions with < 1% of speech frames
dropped and first speaking frame p95 <= 150 ms after the first audio chunk; `warp` at 720p25 on a
2-core CPU, >= 6 sessions over WebSocket and >= 4 over WebRTC with < 1% dropped."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lipstream.bench import FRAME_SIZES
from lipstream.bench.report import device_name, format_table, write_results
from lipstream.engines import ENGINE_NAMES
from lipstream.errors import ApiKeyError, LipstreamError

if TYPE_CHECKING:
    from lipstream.client import LipstreamClient

DEFAULT_CLIENTS = [1, 4, 16, 32]
TRANSPORTS = ("websocket", "webrtc", "inprocess")
ENGINES = (*ENGINE_NAMES, "musetalk-random")
STAGES = ("audio_wait", "features", "queue", "engine", "composite", "show", "encode", "send")
LAG_PROBE_S = 0.005  # the loop-lag sampler's sleep
CYCLE_FRAMES = 8
STAT_KEYS = ("speech_frames", "dropped_frames", "stalled_frames", "held_frames", "rebases")
SERVER_READY_TIMEOUT_S = 300.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--transport", choices=TRANSPORTS, nargs="+", default=["websocket"],
                        help="websocket: clients of a real server over REST + WebSocket (default); webrtc: "
                             "clients of the same server over WebRTC; inprocess: sessions on a scheduler in "
                             "this process (no network); several: each in turn, one server for both network ones")
    parser.add_argument("--frames", choices=("patches", "jpeg"), default="patches",
                        help="websocket: patch frames (the avatar's images once, then faces; default) or whole "
                             "JPEG frames")
    parser.add_argument("--encode", choices=("none", "patches", "jpeg"), default="none",
                        help="inprocess: encode each frame as a WebSocket viewer would, on a thread pool "
                             "(default none)")
    parser.add_argument("--no-viewer-cost", dest="viewer_cost", action="store_false",
                        help="skip measuring what a viewer costs per frame before the served transports")
    parser.add_argument("--url", default=None, help="websocket: a running server, e.g. http://host:2160 "
                                                    "(default: start `lipstream serve` on a free local port)")
    parser.add_argument("--key", default=None, help="websocket: the API key for --url")
    parser.add_argument("--avatar", default=None, help="websocket: the avatar to show with --url "
                                                       "(default: the key's first)")
    parser.add_argument("--clients", type=int, nargs="+", default=DEFAULT_CLIENTS,
                        help=f"numbers of simultaneous clients, one run each (default {' '.join(map(str, DEFAULT_CLIENTS))})")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each run (default 20)")
    parser.add_argument("--engine", choices=ENGINES, default="auto",
                        help="auto: musetalk when its weights are installed, else warp; musetalk-random: "
                             "full-size MuseTalk with random weights (speed only, no download; inprocess "
                             "only); not with --url")
    parser.add_argument("--tiny", action="store_true",
                        help="musetalk-random: tiny networks of the same architecture (a dry run of every path)")
    parser.add_argument("--models", default=None, help="MuseTalk weights folder (default LIPSTREAM_MODELS or ./models)")
    parser.add_argument("--device", default=None, help="MuseTalk's device (default cuda if available)")
    parser.add_argument("--compile", default=None, choices=["default", "reduce-overhead", "max-autotune"],
                        help="torch.compile mode for MuseTalk (batches padded to powers of two, compiled at start)")
    parser.add_argument("--size", choices=sorted(FRAME_SIZES), default="720p",
                        help="frame size of the bench avatar (default 720p; not with --url)")
    parser.add_argument("--fps", type=int, default=25)
    parser.add_argument("--chunk-ms", type=float, default=20.0, help="audio chunk length (default 20)")
    parser.add_argument("--utterance-s", type=float, default=3.0, help="length of each utterance (default 3)")
    parser.add_argument("--gap-s", type=float, default=1.0, help="quiet between utterances (default 1)")
    parser.add_argument("--max-batch", type=int, default=16,
                        help="scheduler batch bound (default 16; not with --url)")
    parser.add_argument("--max-wait-ms", type=float, default=4.0,
                        help="scheduler batch fill wait (default 4; not with --url)")
    parser.add_argument("--out-dir", default=None, help="where to write the JSON (default bench/results)")


def bench_avatar(size: str):
    """An 8-frame avatar of the astronaut scene at `size`, the face box moving 2 px a frame. Each frame
    shows its face in its face box, so the avatar can be stored and loaded again (crops are remade
    from the frames then)."""
    from lipstream.synthetic import moving_avatar

    frame_hw, face_box = FRAME_SIZES[size]
    return moving_avatar(frame_hw, face_box, CYCLE_FRAMES, name="bench", faces_in_frames=True)


def load_bench_engine(args: argparse.Namespace):
    """(engine, one line saying which and why); its scheduler sets the device's backend flags and
    warms it up (`Scheduler.warm_start`), as the server's does."""
    import torch

    if args.engine != "musetalk-random":
        from lipstream.engines.select import load_engine

        return load_engine(args.engine, args.models, args.device, compile_mode=args.compile)
    from lipstream.bench.engine import random_musetalk
    from lipstream.engines.musetalk import MuseTalkEngine

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    engine = MuseTalkEngine(random_musetalk(device, dtype, tiny=args.tiny), compile_mode=args.compile)
    size = "tiny networks (a dry run)" if args.tiny else "random weights"
    return engine, f"engine musetalk with {size} on {device} (compile: {args.compile or 'none'})"


# ---- shared by both transports -------------------------------------------------------------------

def _quantiles(values: list[float]) -> list[float | None]:
    if not values:
        return [None, None, None]
    return [float(v) for v in np.percentile(values, [50, 95, 99])]


def speech_clips(args: argparse.Namespace) -> list[np.ndarray]:
    """Four speech-like utterances, int16 [utterance_s * 16000]; client i speaks number i % 4."""
    from lipstream.synthetic import speech

    return [np.round(speech(args.utterance_s, seed=s) * 32767).astype(np.int16) for s in range(4)]


async def _speak(send: Callable[[np.ndarray | None], Awaitable[None]], speech: np.ndarray,
                 args: argparse.Namespace, stop_at: float, rng: random.Random, starts: deque[float]) -> None:
    """Utterances at real-time pace until `stop_at` (time.monotonic): send(chunk) for each chunk and
    send(None) to end each one, `gap_s` between them; each one's first-chunk time goes to `starts`."""
    chunk = round(16000 * args.chunk_ms / 1000)
    await asyncio.sleep(rng.uniform(0, 1))
    while time.monotonic() < stop_at:
        began = time.monotonic()
        starts.append(began)
        for i, at in enumerate(range(0, speech.shape[0], chunk)):
            await asyncio.sleep(max(0.0, began + i * chunk / 16000 - time.monotonic()))
            await send(speech[at:at + chunk])
        await send(None)
        await asyncio.sleep(max(0.0, began + speech.shape[0] / 16000 + args.gap_s - time.monotonic()))


@dataclass
class _Tally:
    """What one client saw. Times: time.monotonic() seconds; latencies: ms."""

    frames: int = 0
    first_at: float | None = None
    last_at: float | None = None
    starts: deque[float] = field(default_factory=deque)  # first-chunk times of utterances not shown yet
    chunk_to_frame: list[float] = field(default_factory=list)
    ready_to_frame: list[float] = field(default_factory=list)
    stages: list[dict] = field(default_factory=list)  # each utterance's first_frame_stages_ms
    late: list[float] = field(default_factory=list)

    def frame(self, now: float, speech_started: bool) -> bool:
        """Count a frame received at `now`; True when it starts an utterance (its latency is kept)."""
        self.frames += 1
        self.first_at = self.first_at or now
        self.last_at = now
        if speech_started and self.starts:
            self.chunk_to_frame.append(1000 * (now - self.starts.popleft()))
            return True
        return False

    def result(self, stats: dict) -> dict:
        """This client's figures; `stats`: its session's stats at the end."""
        fps = (self.frames - 1) / (self.last_at - self.first_at) if self.frames > 1 else 0.0
        return {"fps": fps, "chunk_to_frame": self.chunk_to_frame, "ready_to_frame": self.ready_to_frame,
                "stages": self.stages, "late": self.late, **{key: stats[key] for key in STAT_KEYS}}

    def utterance_stats(self, stats: dict) -> None:
        """Keep an utterance's first-frame figures from its session's stats (taken after its first frame)."""
        if stats.get("first_frame_ms") is not None:
            self.ready_to_frame.append(stats["first_frame_ms"])
        if stats.get("first_frame_stages_ms"):
            self.stages.append(stats["first_frame_stages_ms"])


def _row(transport: str, n: int, results: list[dict], engine: dict) -> dict:
    """The figures of one run of n clients over `transport`; `engine`: the batch and engine-time figures
    (and anything else to add to the row)."""
    speech_frames = sum(r["speech_frames"] for r in results)
    dropped = sum(r["dropped_frames"] for r in results)
    late = [v for r in results for v in r["late"]]
    stages = [s for r in results for s in r["stages"]]
    return {
        "transport": transport,
        "clients": n,
        "fps_min": min(r["fps"] for r in results),
        "fps_mean": float(np.mean([r["fps"] for r in results])),
        "utterances": sum(len(r["chunk_to_frame"]) for r in results),
        **dict(zip(("chunk_to_frame_ms_p50", "chunk_to_frame_ms_p95", "chunk_to_frame_ms_p99"),
                   _quantiles([v for r in results for v in r["chunk_to_frame"]]))),
        **dict(zip(("ready_to_frame_ms_p50", "ready_to_frame_ms_p95", "ready_to_frame_ms_p99"),
                   _quantiles([v for r in results for v in r["ready_to_frame"]]))),
        "first_frame_stages_ms_p50": {stage: float(np.median([s[stage] for s in stages if stage in s]))
                                      for stage in STAGES if any(stage in s for s in stages)},
        "speech_frames": speech_frames,
        "dropped_frames": dropped,
        "dropped_share": dropped / speech_frames if speech_frames else 0.0,
        **{key: sum(r[key] for r in results) for key in ("stalled_frames", "held_frames", "rebases")},
        "late_ms_p95": float(np.percentile(late, 95)) if late else None,
        **engine,
    }


def run(args: argparse.Namespace) -> int:
    transports = list(dict.fromkeys(args.transport))
    served = [t for t in transports if t != "inprocess"]
    if args.url and not served:
        raise LipstreamError("--url is for --transport websocket or webrtc")
    _need_key(args)  # now, before any run (server_for checks it too, later)
    if served and not args.url and args.engine == "musetalk-random":
        raise LipstreamError("--engine musetalk-random runs in-process only: use --transport inprocess")
    speech = speech_clips(args)
    costs = None
    if served and args.viewer_cost:  # first, while nothing else runs in this process
        from lipstream.bench.viewer_cost import viewer_costs

        print(f"what a viewer costs per frame at {args.size} ...", flush=True)
        costs = viewer_costs(args.size)
    rows, settings, device = [], {}, "cpu"
    if "inprocess" in transports:
        rows, settings, device = _run_inprocess(args, speech)
    if served:
        served_rows, served_settings, device = _run_served(args, speech, served)
        rows += served_rows
        settings.update(served_settings)
    _print(rows, costs)
    common = {key: getattr(args, key) for key in ("transport", "clients", "seconds", "size", "fps", "chunk_ms",
                                                  "utterance_s", "gap_s", "max_batch", "max_wait_ms", "frames",
                                                  "encode")}
    common["transport"] = transports[0] if len(transports) == 1 else transports
    settings = {**common, **settings, "cpu": device_name("cpu"), "viewer_cost": costs}
    path = write_results("serve", device, settings, rows, Path(args.out_dir) if args.out_dir else None)
    print(f"results written to {path}")
    return 0


def _print(rows: list[dict], costs: dict | None) -> None:
    print(format_table(
        ["Transport", "Clients", "fps min", "fps mean", "chunk->frame ms p50/p95/p99", "ready->frame ms p50/p95/p99",
         "dropped", "stalled", "late ms p95", "batch", "engine ms"],
        [[r["transport"], r["clients"], r["fps_min"], r["fps_mean"],
          "/".join(_ms(r[f"chunk_to_frame_ms_{q}"]) for q in ("p50", "p95", "p99")),
          "/".join(_ms(r[f"ready_to_frame_ms_{q}"]) for q in ("p50", "p95", "p99")),
          f"{r['dropped_frames']} ({r['dropped_share']:.1%})", r["stalled_frames"], r["late_ms_p95"],
          r["batch_mean"], r.get("engine_ms_p50", r.get("engine_ms_mean"))] for r in rows]))
    print("\nwhere the first speaking frame's time goes (ms, median over the utterances):")
    print(format_table(["Transport", "Clients", *STAGES],
                       [[r["transport"], r["clients"], *[_ms(r["first_frame_stages_ms_p50"].get(s)) for s in STAGES]]
                        for r in rows]))
    inprocess = [r for r in rows if r["transport"] == "inprocess"]
    if inprocess:
        print("\nin-process: the event loop's lag while the device works, and the viewers' encoding:")
        print(format_table(["Clients", "loop lag ms p50/p99/max", "encode", "encode ms p50", "frames encoded/s"],
                           [[r["clients"], "/".join(_ms(r[f"loop_lag_ms_{q}"], 1) for q in ("p50", "p99", "max")),
                             r["encode"], r["encode_ms_p50"], r["encoded_per_s"]] for r in inprocess]))
    if costs is not None:
        print(f"\nwhat one viewer costs the host per frame at {costs['size']} (CPU ms; this process):")
        print(format_table(["step", "ms"], [[name, ms] for name, ms in costs["steps_ms"].items()]))
        print(format_table(["per speaking frame and viewer", "ms"],
                           [[name, ms] for name, ms in costs["per_viewer_ms"].items()]))


def _ms(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


# ---- in-process ----------------------------------------------------------------------------------

async def _inprocess_client(session, speech: np.ndarray, args: argparse.Namespace, stop_at: float,
                            rng: random.Random, encode: Callable[[object], Awaitable[float]] | None) -> dict:
    """Feed utterances at real-time pace and read frames until `stop_at` (time.monotonic); with
    `encode`, each frame is encoded as a viewer's would be (its CPU ms are kept)."""
    tally = _Tally()
    encoded: list[float] = []

    async def send(chunk: np.ndarray | None) -> None:
        if chunk is None:
            session.end_speech()
        else:
            session.push_audio(chunk)

    producer = asyncio.create_task(_speak(send, speech, args, stop_at, rng, tally.starts))
    async for frame in session.frames():
        now = time.monotonic()
        tally.late.append(1000 * (now - session.clock.due(frame.index)))
        if tally.frame(now, "speech_started" in frame.events):
            tally.utterance_stats(session.stats())
        if encode is not None:
            encoded.append(await encode(frame))
        if now >= stop_at:
            break
    producer.cancel()
    stats = session.stats()
    await session.aclose()
    return {**tally.result(stats), "encoded": encoded}


async def _loop_lag(stop_at: float, lags: list[float]) -> None:
    """How late the loop wakes from a LAG_PROBE_S sleep, in ms, until `stop_at`."""
    while time.monotonic() < stop_at:
        began = time.monotonic()
        await asyncio.sleep(LAG_PROBE_S)
        lags.append(1000 * (time.monotonic() - began - LAG_PROBE_S))


def _viewer_encoder(kind: str, pool) -> Callable[[object], Awaitable[float]] | None:
    """A viewer's encoding of a frame on `pool` ("patches": the patch's JPEG, "jpeg": the whole frame's,
    the idle images' made once), returning its CPU ms; None for "none"."""
    if kind == "none":
        return None
    from lipstream.media.encoding import frame_jpeg, patch_jpeg

    def encode(frame) -> float:
        began = time.thread_time()
        if kind == "jpeg":
            frame_jpeg(frame, 80)
        elif frame.patch is not None:
            patch_jpeg(frame.patch, 80)
        return 1000 * (time.thread_time() - began)

    async def run(frame) -> float:
        return await pool.run(encode, frame)

    return run


async def _inprocess_clients(n: int, engine, avatar, material, compositor, speech: list[np.ndarray],
                             args: argparse.Namespace) -> dict:
    from lipstream.media.encoding import EncodingPool
    from lipstream.stream.scheduler import Scheduler
    from lipstream.stream.session import Session

    scheduler = Scheduler(engine, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms)
    await scheduler.warm_start()  # on its worker: CUDA graphs are per thread
    pool = EncodingPool()
    stop_at = time.monotonic() + args.seconds
    rng = random.Random(n)
    sessions = [Session(avatar, engine, scheduler, fps=args.fps, compositor=compositor, material=material)
                for _ in range(n)]
    lags: list[float] = []
    lag = asyncio.create_task(_loop_lag(stop_at, lags))
    encode = _viewer_encoder(args.encode, pool)
    results = await asyncio.gather(*[_inprocess_client(s, speech[i % len(speech)], args, stop_at, rng, encode)
                                     for i, s in enumerate(sessions)])
    await lag
    sched = scheduler.stats()
    await scheduler.aclose()
    pool.shutdown(wait=True)
    encoded = [ms for r in results for ms in r["encoded"]]
    lag_p50, _, lag_p99 = _quantiles(lags)
    return _row("inprocess", n, results, {
        "batch_mean": sched["batch_mean"], "engine_ms_p50": sched["engine_ms_p50"],
        "loop_lag_ms_p50": lag_p50, "loop_lag_ms_p99": lag_p99, "loop_lag_ms_max": max(lags) if lags else None,
        "encode": args.encode,
        "encode_ms_p50": float(np.median(encoded)) if encoded else None,
        "encoded_per_s": len(encoded) / args.seconds if encoded else None})


def _run_inprocess(args: argparse.Namespace, speech: list[np.ndarray]) -> tuple[list[dict], dict, str]:
    """(rows, settings, device)."""
    from lipstream.stream.compositor import Compositor, output_size

    engine, why = load_bench_engine(args)
    print(why, flush=True)
    avatar = bench_avatar(args.size)
    material = engine.material(avatar)
    compositor = Compositor(avatar, engine.device, size=output_size(avatar.frame_size, 0))
    rows = []
    for n in args.clients:
        print(f"in-process, {n} client(s), {args.seconds:g} s ...", flush=True)
        rows.append(asyncio.run(_inprocess_clients(n, engine, avatar, material, compositor, speech, args)))
    settings = {"engine": engine.name, "engine_choice": why, "engine_device": str(engine.device)}
    return rows, settings, engine.device


# ---- through a server, over REST and WebSocket (lipstream.client) or WebRTC ----------------------

def _run_served(args: argparse.Namespace, speech: list[np.ndarray], transports: list[str]
                ) -> tuple[list[dict], dict, str]:
    """(rows, settings, device) from the server at --url, or from one started here."""
    # all N clients are served, however late that makes them: this benchmark measures that (admission: bench overload)
    with server_for(args, admission_control=False) as (url, key, _):
        ready, avatars = asyncio.run(_server_facts(url, key))
        avatar = pick_avatar(avatars, args.avatar)
        print(f"{ready['reason']}; avatar {avatar['name']} ({avatar['width']}x{avatar['height']}); server "
              f"{url if args.url else 'started here'}", flush=True)
        if "webrtc" in transports:
            from lipstream.bench.webrtc_viewer import count_frames

            count_frames()
        rows = []
        for transport in transports:
            for n in args.clients:
                print(f"{transport}, {n} client(s), {args.seconds:g} s ...", flush=True)
                rows.append(asyncio.run(_served_clients(transport, n, url, key, avatar["name"], speech, args)))
    settings = server_settings(args, avatar, ready)
    if args.url:  # the server's own settings apply
        settings.update(size=None, max_batch=None, max_wait_ms=None)
    return rows, settings, result_device(ready["device"])


async def _server_facts(url: str, key: str) -> tuple[dict, list[dict]]:
    """The server's /ready answer (once it is ready) and the key's avatars."""
    from lipstream.client import LipstreamClient

    async with LipstreamClient(url, key, timeout_s=30) as client:
        return await client.wait_ready(SERVER_READY_TIMEOUT_S), await client.avatars()


def pick_avatar(avatars: list[dict], wanted: str | None) -> dict:
    """The avatar named `wanted` among a key's `avatars` (its /api/avatars entries), or the first when
    `wanted` is None; LipstreamError naming the key's avatars when there is none."""
    avatar = next((a for a in avatars if wanted in (None, a["name"])), None)
    if avatar is None:
        raise LipstreamError(f"no avatar {wanted or ''!r} for this key; it has: "
                             f"{', '.join(a['name'] for a in avatars) or 'none'}")
    return avatar


def server_settings(args: argparse.Namespace, avatar: dict, ready: dict) -> dict:
    """The results' settings that describe the server measured: which (--url, or one started here),
    the avatar shown (its /api/avatars entry) and its engine (the server's /ready answer)."""
    return {"server": args.url or "lipstream serve, started by the benchmark", "avatar": avatar["name"],
            "frame_size": [avatar["width"], avatar["height"]], "engine": ready["engine"],
            "engine_choice": ready["reason"], "engine_device": ready["device"]}


def result_device(server_device: str) -> str:
    """The device to name in the results: the server's, when it is this machine's (a CUDA device this
    process cannot see is a remote server's: then the CPU the clients ran on)."""
    import torch

    return server_device if torch.cuda.is_available() or not server_device.startswith("cuda") else "cpu"


def _need_key(args: argparse.Namespace) -> None:
    """LipstreamError when --url comes without --key."""
    if args.url and not args.key:
        raise LipstreamError("--url needs --key: the API key the server printed (or one of its api_keys)")


@contextlib.contextmanager
def server_for(args: argparse.Namespace, **settings: object) -> Iterator[tuple[str, str, int | None]]:
    """The server to measure: (url, key, None) of --url/--key (LipstreamError when --key is missing),
    or `lipstream serve` started here with more `settings` (`spawned_server`): (url, key, its process id)."""
    _need_key(args)
    if args.url:
        yield args.url.rstrip("/"), args.key, None
        return
    started: dict = {}
    with spawned_server(args, on_ready=lambda process: started.update(pid=process.pid), **settings) as (url, key):
        yield url, key, started["pid"]


@contextlib.contextmanager
def spawned_server(args: argparse.Namespace, on_ready: Callable[[subprocess.Popen], None] | None = None,
                   **settings: object) -> Iterator[tuple[str, str]]:
    """`lipstream serve` in a subprocess on a free localhost port, over a temporary avatars root that
    holds the bench avatar (as `bench`), with one API key (also its metrics key); stopped with SIGTERM.
    settings: more server settings (e.g. admission_control=False). on_ready(process): called once
    the server is ready. Yields (url, key)."""
    from lipstream.avatar.store import save_avatar

    with tempfile.TemporaryDirectory(prefix="lipstream-bench-") as folder:
        save_avatar(bench_avatar(args.size), root=Path(folder) / "avatars")
        flags = {"avatars_root": Path(folder) / "avatars", "engine": args.engine, "models_root": args.models,
                 "device": args.device, "fps": args.fps, "max_batch": args.max_batch,
                 "max_wait_ms": args.max_wait_ms, "max_sessions_per_key": max(args.clients),
                 "compile_mode": args.compile, **settings}
        with served(flags, Path(folder) / "server.log", on_ready) as (url, key):
            yield url, key


@contextlib.contextmanager
def served(flags: dict, log_path: Path, on_ready: Callable[[subprocess.Popen], None] | None = None
           ) -> Iterator[tuple[str, str]]:
    """`lipstream serve` with these settings ({name: value}; None values are left out) in a subprocess
    on a free localhost port with one new API key (also its metrics key), its output in `log_path`;
    waits until it is ready (then calls on_ready(process)) and stops it with SIGTERM at the end.
    Yields (url, key); LipstreamError with the end of its log if it exits or is not ready within
    SERVER_READY_TIMEOUT_S."""
    from lipstream.config import flag_name

    key, port = secrets.token_urlsafe(16), free_port()
    flags = {**flags, "host": "127.0.0.1", "port": port, "api_keys": f"{key}=", "metrics_key": key}
    command = [sys.executable, "-m", "lipstream.cli", "serve",  # --flag=value: a key may start with "-"
               *[f"{flag_name(name)}={value}" for name, value in flags.items() if value is not None]]
    with log_path.open("wb") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(_until_ready(server, url, key))
    except BaseException as exc:
        stop_process(server, signal.SIGTERM)
        if not isinstance(exc, LipstreamError):
            raise
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
        raise LipstreamError(f"the server (lipstream serve) did not get ready ({exc}); its log ends:\n{tail}") from exc
    try:
        if on_ready is not None:
            on_ready(server)
        yield url, key
    finally:
        stop_process(server, signal.SIGTERM)


async def _until_ready(server: subprocess.Popen, url: str, key: str) -> None:
    """Wait for the server to be ready, or to exit (LipstreamError)."""
    from lipstream.client import LipstreamClient

    async with LipstreamClient(url, key, timeout_s=5) as client:
        waiting = asyncio.create_task(client.wait_ready(SERVER_READY_TIMEOUT_S))
        while not waiting.done():
            if server.poll() is not None:
                waiting.cancel()
                raise LipstreamError(f"it exited with status {server.returncode}")
            await asyncio.wait([waiting], timeout=0.2)
        waiting.result()


def stop_process(process: subprocess.Popen, sig: int, timeout_s: float = 30.0) -> None:
    """Send `sig` to `process` and wait for it to exit; kill it if it has not within `timeout_s`."""
    process.send_signal(sig)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def free_port() -> int:
    """A TCP port on localhost that is free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def _served_clients(transport: str, n: int, url: str, key: str, avatar: str, speech: list[np.ndarray],
                          args: argparse.Namespace) -> dict:
    from lipstream.client import LipstreamClient

    one = _websocket_client if transport == "websocket" else _webrtc_client
    async with LipstreamClient(url, key, timeout_s=30) as client:
        before = await _engine_totals(client)
        stop_at = time.monotonic() + args.seconds
        rng = random.Random(n)
        results = await asyncio.gather(*[one(client, avatar, speech[i % len(speech)], args, stop_at, rng)
                                         for i in range(n)])
        return _row(transport, n, results, _engine_means(before, await _engine_totals(client)))


async def _watch(session, frames: AsyncIterator, speech: np.ndarray, args: argparse.Namespace, stop_at: float,
                 rng: random.Random) -> dict:
    """Speak to a served session at real-time pace and read its frames (index, pts, events) until
    `stop_at`; its figures, with its stats after each utterance's first frame."""
    tally, offsets, utterances = _Tally(), [], []

    async def send(chunk: np.ndarray | None) -> None:
        await (session.end_speech() if chunk is None else session.push_audio(chunk))

    producer = asyncio.create_task(_speak(send, speech, args, stop_at, rng, tally.starts))
    try:
        async for frame in frames:
            now = time.monotonic()
            for error in getattr(frame, "errors", ()):
                print(f"the server answered a client message: {error}", file=sys.stderr)
            offsets.append(now - frame.pts)
            if tally.frame(now, "speech_started" in frame.events):
                utterances.append(asyncio.create_task(session.stats()))
            if now >= stop_at:
                break
    finally:
        producer.cancel()
    stats = await session.stats()
    await session.aclose()
    for utterance in await asyncio.gather(*utterances):
        tally.utterance_stats(utterance)
    tally.late = [1000 * (offset - min(offsets)) for offset in offsets]  # empty without frames
    return tally.result(stats)


async def _websocket_client(client: LipstreamClient, avatar: str, speech: np.ndarray, args: argparse.Namespace,
                            stop_at: float, rng: random.Random) -> dict:
    """One session over REST + WebSocket (its frames not decoded)."""
    session = await client.open_session(avatar, fps=args.fps, frames=args.frames)
    return await _watch(session, session.frames(color=None), speech, args, stop_at, rng)


async def _webrtc_client(client: LipstreamClient, avatar: str, speech: np.ndarray, args: argparse.Namespace,
                         stop_at: float, rng: random.Random) -> dict:
    """One session over WebRTC (its frames counted, not decoded)."""
    from lipstream.bench.webrtc_viewer import WebRtcViewer

    viewer = await WebRtcViewer.open(client, avatar, args.fps)
    return await _watch(viewer, viewer.frames(), speech, args, stop_at, rng)


async def _engine_totals(client: LipstreamClient) -> dict[str, float]:
    """The server's engine batch and engine time histograms' sums and counts, from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    totals = {}
    try:
        text = await client.metrics()
    except ApiKeyError:  # a server whose metrics key is not this key: no engine figures
        return {}
    for family in text_string_to_metric_families(text):
        if family.name not in ("lipstream_batch_frames", "lipstream_stage_seconds"):
            continue
        for sample in family.samples:
            if sample.name.endswith(("_sum", "_count")) and sample.labels.get("stage", "engine") == "engine":
                totals[sample.name] = sample.value
    return totals


def _engine_means(before: dict[str, float], after: dict[str, float]) -> dict:
    """batch_mean and engine_ms_mean over the calls between two `_engine_totals`."""
    def mean(name: str) -> float | None:
        count = after.get(f"{name}_count", 0) - before.get(f"{name}_count", 0)
        return (after[f"{name}_sum"] - before.get(f"{name}_sum", 0)) / count if count else None

    engine_s = mean("lipstream_stage_seconds")
    return {"batch_mean": mean("lipstream_batch_frames"),
            "engine_ms_mean": None if engine_s is None else 1000 * engine_s}
