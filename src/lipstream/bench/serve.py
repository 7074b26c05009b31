"""`lipstream bench serve`: N simulated clients speaking to live sessions at real-time pace, in-process.

Each client is a `Session` on one shared `Scheduler` (one per device, as the server runs them), fed
synthetic speech as 16 kHz PCM16 chunks at real-time pace (utterances of `--utterance-s`, each ended
with end_speech(), `--gap-s` of quiet between them; clients start at random offsets in the first
second) and read through `Session.frames()`, as a transport would, without encoding: the HTTP,
WebSocket and WebRTC layers are measured by the server's own benchmark.

Per N: delivered frames/s per session (min and mean), first-frame latency per utterance as
  - chunk -> frame: from the utterance's first audio chunk to its first speaking frame (includes the
    engine's audio look-ahead: a frame needs some audio after it before its features exist), and
  - ready -> frame: from the chunk that made the first frame's features computable (the session's
    `first_frame_ms`) to that frame: the system's own latency (scheduling, engine, compositing, tick),
p50/p95/p99 of each; dropped frames (late faces, shown as the idle frame) as a share of speech frames;
stalled frames (the client's audio not there yet); how late frames left after their due time (p95);
mean engine batch and engine time. Targets (issue 6): with MuseTalk at 25 fps and 720p on an H100/H200,
>= 16 sessions without dropped frames and p95 ready -> frame <= 60 ms; `warp` on a 2-core CPU, >= 2
sessions at 25 fps."""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections import deque
from pathlib import Path

import numpy as np

from lipstream.bench.postprocess import FRAME_SIZES
from lipstream.bench.report import device_name, format_table, write_results

DEFAULT_CLIENTS = [1, 4, 16, 32]
ENGINES = ("auto", "warp", "musetalk", "musetalk-random")
CYCLE_FRAMES = 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clients", type=int, nargs="+", default=DEFAULT_CLIENTS,
                        help=f"numbers of simultaneous clients, one run each (default {' '.join(map(str, DEFAULT_CLIENTS))})")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each run (default 20)")
    parser.add_argument("--engine", choices=ENGINES, default="auto",
                        help="auto: musetalk when its weights are installed, else warp; musetalk-random: "
                             "full-size MuseTalk with random weights (speed only, no download)")
    parser.add_argument("--models", default=None, help="MuseTalk weights folder (default LIPSTREAM_MODELS or ./models)")
    parser.add_argument("--device", default=None, help="MuseTalk's device (default cuda if available)")
    parser.add_argument("--size", choices=sorted(FRAME_SIZES), default="720p", help="frame size (default 720p)")
    parser.add_argument("--fps", type=int, default=25)
    parser.add_argument("--chunk-ms", type=float, default=20.0, help="audio chunk length (default 20)")
    parser.add_argument("--utterance-s", type=float, default=3.0, help="length of each utterance (default 3)")
    parser.add_argument("--gap-s", type=float, default=1.0, help="quiet between utterances (default 1)")
    parser.add_argument("--max-batch", type=int, default=16, help="scheduler batch bound (default 16)")
    parser.add_argument("--max-wait-ms", type=float, default=4.0, help="scheduler batch fill wait (default 4)")
    parser.add_argument("--out-dir", default=None, help="where to write the JSON (default bench/results)")


def bench_avatar(size: str):
    """An 8-frame avatar of the astronaut scene at `size`, the face box moving 2 px a frame."""
    from lipstream.avatar.model import Avatar
    from lipstream.bench.scene import astronaut_bgr, make_scene

    frame_hw, (x1, y1, x2, y2) = FRAME_SIZES[size]
    photo = astronaut_bgr()
    scenes = [make_scene(frame_hw, (x1 + 2 * i, y1, x2 + 2 * i, y2), seed=i, photo=photo) for i in range(CYCLE_FRAMES)]
    return Avatar("bench", "", None, frames=np.stack([s.frame for s in scenes]),
                  face_boxes=np.int32([s.face_box for s in scenes]), crop_boxes=np.int32([s.crop_box for s in scenes]),
                  masks=[s.mask for s in scenes], crops=np.stack([s.face for s in scenes]))


def load_bench_engine(args: argparse.Namespace):
    """(engine, one line saying which and why)."""
    import torch

    if args.engine != "musetalk-random":
        from lipstream.engines.select import load_engine

        return load_engine(args.engine, args.models, args.device)
    from lipstream.bench.engine import random_musetalk
    from lipstream.engines.musetalk import MuseTalkEngine

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    return MuseTalkEngine(random_musetalk(device, dtype)), f"engine musetalk with random weights on {device}"


def _quantiles(values: list[float]) -> list[float | None]:
    if not values:
        return [None, None, None]
    return [float(v) for v in np.percentile(values, [50, 95, 99])]


async def _client(session, speech: np.ndarray, args: argparse.Namespace, stop_at: float, rng: random.Random) -> dict:
    """Feed utterances at real-time pace and read frames until `stop_at` (time.monotonic)."""
    chunk = round(16000 * args.chunk_ms / 1000)
    starts: deque[float] = deque()  # first-chunk times of utterances not shown yet
    chunk_to_frame, ready_to_frame, late = [], [], []

    async def produce() -> None:
        await asyncio.sleep(rng.uniform(0, 1))
        while time.monotonic() < stop_at:
            began = time.monotonic()
            starts.append(began)
            for i, at in enumerate(range(0, speech.shape[0], chunk)):
                await asyncio.sleep(max(0.0, began + i * chunk / 16000 - time.monotonic()))
                session.push_audio(speech[at:at + chunk])
            session.end_speech()
            await asyncio.sleep(max(0.0, began + speech.shape[0] / 16000 + args.gap_s - time.monotonic()))

    producer = asyncio.create_task(produce())
    frames, first_at = 0, None
    async for frame in session.frames():
        now = time.monotonic()
        first_at = first_at or now
        frames += 1
        late.append(1000 * (now - session.clock.due(frame.index)))
        if "speech_started" in frame.events and starts:
            chunk_to_frame.append(1000 * (now - starts.popleft()))
            ready_to_frame.append(session.stats()["first_frame_ms"])
        if now >= stop_at:
            break
    producer.cancel()
    stats = session.stats()
    await session.aclose()
    return {"fps": (frames - 1) / (now - first_at) if frames > 1 else 0.0, "chunk_to_frame": chunk_to_frame,
            "ready_to_frame": ready_to_frame, "late": late, **{k: stats[k] for k in (
                "speech_frames", "dropped_frames", "stalled_frames", "held_frames", "rebases")}}


async def _run_clients(n: int, engine, avatar, material, compositor, speech: list[np.ndarray],
                       args: argparse.Namespace) -> dict:
    from lipstream.stream.scheduler import Scheduler
    from lipstream.stream.session import Session

    scheduler = Scheduler(engine, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms)
    scheduler.start()
    stop_at = time.monotonic() + args.seconds
    rng = random.Random(n)
    sessions = [Session(avatar, engine, scheduler, fps=args.fps, compositor=compositor, material=material)
                for _ in range(n)]
    results = await asyncio.gather(*[_client(s, speech[i % len(speech)], args, stop_at, rng)
                                     for i, s in enumerate(sessions)])
    sched = scheduler.stats()
    await scheduler.aclose()
    speech_frames = sum(r["speech_frames"] for r in results)
    dropped = sum(r["dropped_frames"] for r in results)
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
        "stalled_frames": sum(r["stalled_frames"] for r in results),
        "held_frames": sum(r["held_frames"] for r in results),
        "rebases": sum(r["rebases"] for r in results),
        "late_ms_p95": float(np.percentile([v for r in results for v in r["late"]], 95)),
        "batch_mean": sched["batch_mean"],
        "engine_ms_p50": sched["engine_ms_p50"],
    }


def run(args: argparse.Namespace) -> int:
    from lipstream.bench.warp import synthetic_speech
    from lipstream.stream.compositor import Compositor

    engine, why = load_bench_engine(args)
    print(why, flush=True)
    avatar = bench_avatar(args.size)
    material = engine.material(avatar)
    compositor = Compositor(avatar, engine.device)
    speech = [np.round(synthetic_speech(args.utterance_s, seed=s) * 32767).astype(np.int16) for s in range(4)]
    rows = []
    for n in args.clients:
        print(f"{n} client(s), {args.seconds:g} s ...", flush=True)
        rows.append(asyncio.run(_run_clients(n, engine, avatar, material, compositor, speech, args)))
    print(format_table(
        ["Clients", "fps min", "fps mean", "chunk->frame ms p50/p95/p99", "ready->frame ms p50/p95/p99",
         "dropped", "stalled", "late ms p95", "batch", "engine ms"],
        [[r["clients"], r["fps_min"], r["fps_mean"],
          "/".join(_ms(r[f"chunk_to_frame_ms_{q}"]) for q in ("p50", "p95", "p99")),
          "/".join(_ms(r[f"ready_to_frame_ms_{q}"]) for q in ("p50", "p95", "p99")),
          f"{r['dropped_frames']} ({r['dropped_share']:.1%})", r["stalled_frames"], r["late_ms_p95"],
          r["batch_mean"], r["engine_ms_p50"]] for r in rows]))
    settings = {key: getattr(args, key) for key in ("clients", "seconds", "size", "fps", "chunk_ms", "utterance_s",
                                                    "gap_s", "max_batch", "max_wait_ms")}
    settings.update(engine=engine.name, engine_choice=why, engine_device=str(engine.device),
                    cpu=device_name("cpu"))
    path = write_results("serve", engine.device, settings, rows, Path(args.out_dir) if args.out_dir else None)
    print(f"results written to {path}")
    return 0


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"
