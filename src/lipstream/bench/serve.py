"""`lipstream bench serve`: N simulated clients speaking to live sessions at real-time pace.

Each client streams synthetic speech as 16 kHz PCM16 chunks of `--chunk-ms` at real-time pace:
utterances of `--utterance-s`, each ended explicitly, `--gap-s` of quiet between them; clients start at
random offsets in the first second. Two transports:

- `websocket` (default): through a real server. With `--url` and `--key`, one already running (avatar
  `--avatar`, default the key's first); otherwise `lipstream serve` is started as a subprocess on a
  free localhost port (engine `--engine`) over a temporary avatars root holding the bench avatar (the
  astronaut scene at `--size`, 8 frames), and stopped with SIGTERM at the end. Each client is a
  `lipstream.client` session: it sends the audio over the session's WebSocket, ends each utterance,
  and reads the frames (JPEG at the avatar's size, not decoded) and events. The clients run in this
  process, on the machine of a server they start.
- `inprocess`: each client is a `Session` on one shared `Scheduler` (one per device, as the server
  runs them), read through `Session.frames()` as a transport would, without encoding or network.

Per N: delivered frames/s per session (frames received / wall time; min and mean); first-frame
latency per utterance, p50/p95/p99, as
  - chunk -> frame: from sending the utterance's first audio chunk to receiving its first speaking
    frame (includes the engine's audio look-ahead: a frame needs some audio after it before its
    features exist), and
  - ready -> frame: from the chunk that made the first frame's features computable to that frame
    being sent (the session's `first_frame_ms`; over WebSocket read from its stats): the server's own
    latency (scheduling, engine, compositing, tick);
dropped frames (late faces, shown as the idle frame) as a share of speech frames; stalled frames (the
client's audio not there yet), held frames and rebases (the sessions' stats); how late frames come
after their due time, p95 (over WebSocket: arrival minus pts, relative to the session's earliest
frame, so encoding and transport count); the mean engine batch and the engine time (in-process: p50
over the scheduler's recent batches; over WebSocket: the mean over the run, from the server's
/metrics). Targets (issue 6): with MuseTalk at 25 fps and 720p on an H100/H200, >= 16 sessions
without dropped frames and p95 ready -> frame <= 60 ms; `warp` on a 2-core CPU, >= 2 sessions at
25 fps."""

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
from collections.abc import Awaitable, Callable, Iterator
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
ENGINES = (*ENGINE_NAMES, "musetalk-random")
CYCLE_FRAMES = 8
STAT_KEYS = ("speech_frames", "dropped_frames", "stalled_frames", "held_frames", "rebases")
SERVER_READY_TIMEOUT_S = 300.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--transport", choices=("websocket", "inprocess"), default="websocket",
                        help="websocket: clients of a real server over REST + WebSocket (default); "
                             "inprocess: sessions on a scheduler in this process (no encoding, no network)")
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
    """(engine, one line saying which and why)."""
    import torch

    if args.engine != "musetalk-random":
        from lipstream.engines.select import load_engine

        engine, reason = load_engine(args.engine, args.models, args.device, compile_mode=args.compile)
        engine.warmup(args.max_batch)
        return engine, reason
    from lipstream.bench.engine import random_musetalk
    from lipstream.engines.musetalk import MuseTalkEngine

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    engine = MuseTalkEngine(random_musetalk(device, dtype), compile_mode=args.compile)
    engine.warmup(args.max_batch)
    return engine, f"engine musetalk with random weights on {device} (compile: {args.compile or 'none'})"


# ---- shared by both transports -------------------------------------------------------------------

def _quantiles(values: list[float]) -> list[float | None]:
    if not values:
        return [None, None, None]
    return [float(v) for v in np.percentile(values, [50, 95, 99])]


def _speech(args: argparse.Namespace) -> list[np.ndarray]:
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
                "late": self.late, **{key: stats[key] for key in STAT_KEYS}}


def _row(n: int, results: list[dict], engine: dict) -> dict:
    """The figures of one run of n clients; `engine`: the batch and engine-time figures."""
    speech_frames = sum(r["speech_frames"] for r in results)
    dropped = sum(r["dropped_frames"] for r in results)
    late = [v for r in results for v in r["late"]]
    return {
        "clients": n,
        "fps_min": min(r["fps"] for r in results),
        "fps_mean": float(np.mean([r["fps"] for r in results])),
        "utterances": sum(len(r["chunk_to_frame"]) for r in results),
        **dict(zip(("chunk_to_frame_ms_p50", "chunk_to_frame_ms_p95", "chunk_to_frame_ms_p99"),
                   _quantiles([v for r in results for v in r["chunk_to_frame"]]))),
        **dict(zip(("ready_to_frame_ms_p50", "ready_to_frame_ms_p95", "ready_to_frame_ms_p99"),
                   _quantiles([v for r in results for v in r["ready_to_frame"]]))),
        "speech_frames": speech_frames,
        "dropped_frames": dropped,
        "dropped_share": dropped / speech_frames if speech_frames else 0.0,
        **{key: sum(r[key] for r in results) for key in ("stalled_frames", "held_frames", "rebases")},
        "late_ms_p95": float(np.percentile(late, 95)) if late else None,
        **engine,
    }


def run(args: argparse.Namespace) -> int:
    if args.transport == "inprocess" and args.url:
        raise LipstreamError("--url is for --transport websocket")
    if args.url and not args.key:
        raise LipstreamError("--url needs --key: the API key the server printed (or one of its api_keys)")
    if args.transport == "websocket" and not args.url and args.engine == "musetalk-random":
        raise LipstreamError("--engine musetalk-random runs in-process only: add --transport inprocess")
    speech = _speech(args)
    measure = _run_inprocess if args.transport == "inprocess" else _run_websocket
    rows, settings, device = measure(args, speech)
    print(format_table(
        ["Clients", "fps min", "fps mean", "chunk->frame ms p50/p95/p99", "ready->frame ms p50/p95/p99",
         "dropped", "stalled", "late ms p95", "batch", "engine ms"],
        [[r["clients"], r["fps_min"], r["fps_mean"],
          "/".join(_ms(r[f"chunk_to_frame_ms_{q}"]) for q in ("p50", "p95", "p99")),
          "/".join(_ms(r[f"ready_to_frame_ms_{q}"]) for q in ("p50", "p95", "p99")),
          f"{r['dropped_frames']} ({r['dropped_share']:.1%})", r["stalled_frames"], r["late_ms_p95"],
          r["batch_mean"], r.get("engine_ms_p50", r.get("engine_ms_mean"))] for r in rows]))
    common = {key: getattr(args, key) for key in ("transport", "clients", "seconds", "size", "fps", "chunk_ms",
                                                  "utterance_s", "gap_s", "max_batch", "max_wait_ms")}
    settings = {**common, **settings, "cpu": device_name("cpu")}
    path = write_results("serve", device, settings, rows, Path(args.out_dir) if args.out_dir else None)
    print(f"results written to {path}")
    return 0


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


# ---- in-process ----------------------------------------------------------------------------------

async def _inprocess_client(session, speech: np.ndarray, args: argparse.Namespace, stop_at: float,
                            rng: random.Random) -> dict:
    """Feed utterances at real-time pace and read frames until `stop_at` (time.monotonic)."""
    tally = _Tally()

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
            tally.ready_to_frame.append(session.stats()["first_frame_ms"])
        if now >= stop_at:
            break
    producer.cancel()
    stats = session.stats()
    await session.aclose()
    return tally.result(stats)


async def _inprocess_clients(n: int, engine, avatar, material, compositor, speech: list[np.ndarray],
                             args: argparse.Namespace) -> dict:
    from lipstream.stream.scheduler import FEATURE_WORKERS, Scheduler
    from lipstream.stream.session import Session

    scheduler = Scheduler(engine, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                          feature_workers=FEATURE_WORKERS)
    scheduler.start()
    stop_at = time.monotonic() + args.seconds
    rng = random.Random(n)
    sessions = [Session(avatar, engine, scheduler, fps=args.fps, compositor=compositor, material=material)
                for _ in range(n)]
    results = await asyncio.gather(*[_inprocess_client(s, speech[i % len(speech)], args, stop_at, rng)
                                     for i, s in enumerate(sessions)])
    sched = scheduler.stats()
    await scheduler.aclose()
    return _row(n, results, {"batch_mean": sched["batch_mean"], "engine_ms_p50": sched["engine_ms_p50"]})


def _run_inprocess(args: argparse.Namespace, speech: list[np.ndarray]) -> tuple[list[dict], dict, str]:
    """(rows, settings, device)."""
    from lipstream.stream.compositor import Compositor

    engine, why = load_bench_engine(args)
    print(why, flush=True)
    avatar = bench_avatar(args.size)
    material = engine.material(avatar)
    compositor = Compositor(avatar, engine.device)
    rows = []
    for n in args.clients:
        print(f"{n} client(s), {args.seconds:g} s ...", flush=True)
        rows.append(asyncio.run(_inprocess_clients(n, engine, avatar, material, compositor, speech, args)))
    settings = {"engine": engine.name, "engine_choice": why, "engine_device": str(engine.device)}
    return rows, settings, engine.device


# ---- through a server, over REST and WebSocket (lipstream.client) -------------------------------

def _run_websocket(args: argparse.Namespace, speech: list[np.ndarray]) -> tuple[list[dict], dict, str]:
    """(rows, settings, device) from the server at --url, or from one started here."""
    import torch

    with contextlib.ExitStack() as stack:
        # all N clients are served, however late that makes them: this benchmark measures that (admission: bench overload)
        url, key = (args.url.rstrip("/"), args.key) if args.url else \
            stack.enter_context(spawned_server(args, admission_control=False))
        ready, avatars = asyncio.run(_server_facts(url, key))
        avatar = next((a for a in avatars if args.avatar in (None, a["name"])), None)
        if avatar is None:
            raise LipstreamError(f"no avatar {args.avatar or ''!r} for this key; it has: "
                                 f"{', '.join(a['name'] for a in avatars) or 'none'}")
        print(f"{ready['reason']}; avatar {avatar['name']} ({avatar['width']}x{avatar['height']}); server "
              f"{url if args.url else 'started here'}", flush=True)
        rows = []
        for n in args.clients:
            print(f"{n} client(s), {args.seconds:g} s ...", flush=True)
            rows.append(asyncio.run(_websocket_clients(n, url, key, avatar["name"], speech, args)))
    settings = {"server": args.url or "lipstream serve, started by the benchmark", "avatar": avatar["name"],
                "frame_size": [avatar["width"], avatar["height"]], "engine": ready["engine"],
                "engine_choice": ready["reason"], "engine_device": ready["device"]}
    if args.url:  # the server's own settings apply
        settings.update(size=None, max_batch=None, max_wait_ms=None)
    local = torch.cuda.is_available() or not ready["device"].startswith("cuda")
    return rows, settings, ready["device"] if local else "cpu"


async def _server_facts(url: str, key: str) -> tuple[dict, list[dict]]:
    """The server's /ready answer (once it is ready) and the key's avatars."""
    from lipstream.client import LipstreamClient

    async with LipstreamClient(url, key, timeout_s=30) as client:
        return await client.wait_ready(SERVER_READY_TIMEOUT_S), await client.avatars()


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


async def _websocket_clients(n: int, url: str, key: str, avatar: str, speech: list[np.ndarray],
                             args: argparse.Namespace) -> dict:
    from lipstream.client import LipstreamClient

    async with LipstreamClient(url, key, timeout_s=30) as client:
        before = await _engine_totals(client)
        stop_at = time.monotonic() + args.seconds
        rng = random.Random(n)
        results = await asyncio.gather(*[_websocket_client(client, avatar, speech[i % len(speech)], args, stop_at, rng)
                                         for i in range(n)])
        return _row(n, results, _engine_means(before, await _engine_totals(client)))


async def _websocket_client(client: LipstreamClient, avatar: str, speech: np.ndarray, args: argparse.Namespace,
                            stop_at: float, rng: random.Random) -> dict:
    """One session over REST + WebSocket: speak at real-time pace and read frames until `stop_at`."""
    session = await client.open_session(avatar, fps=args.fps)
    tally, offsets, first_frame_stats = _Tally(), [], []

    async def send(chunk: np.ndarray | None) -> None:
        await (session.end_speech() if chunk is None else session.push_audio(chunk))

    producer = asyncio.create_task(_speak(send, speech, args, stop_at, rng, tally.starts))
    try:
        async for frame in session.frames(color=None):  # the JPEGs are not decoded
            now = time.monotonic()
            for error in frame.errors:
                print(f"the server answered a client message: {error}", file=sys.stderr)
            offsets.append(now - frame.pts)
            if tally.frame(now, "speech_started" in frame.events):
                first_frame_stats.append(asyncio.create_task(session.stats()))
            if now >= stop_at:
                break
    finally:
        producer.cancel()
    stats = await session.stats()
    await session.aclose()
    first_frame_ms = [stats["first_frame_ms"] for stats in await asyncio.gather(*first_frame_stats)]
    tally.ready_to_frame = [ms for ms in first_frame_ms if ms is not None]
    tally.late = [1000 * (offset - min(offsets)) for offset in offsets]  # empty without frames
    return tally.result(stats)


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
