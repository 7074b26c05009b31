"""`lipstream bench overload`: offer a server `--factor` times the sessions it says it can hold, and
see that it holds the ones it admits and refuses the rest at creation.

The server is `lipstream serve` started here with admission control on (or `--url`/`--key`). Its
capacity is what it reports before the first session (GET /api/capacity: free sessions at 720p and its
default frame rate; the bench avatar is 720p unless `--size` says otherwise). Sessions are then asked
for one every `--stagger-s` seconds, as clients arrive, until `--factor` times that number were asked
for; each admitted one speaks at real-time pace over its WebSocket (the clients of `bench soak`) until
`--seconds` after the last was asked for. A refusal must be a 503 with Retry-After at creation.

Figures: offered, admitted and refused sessions; the admitted sessions' dropped frames (speech
frames shown without their face) as a share of their speech frames, their stalled frames and frames/s.
Target (issue 13), warp on a 2-core CPU at 720p: offered twice its capacity, the admitted sessions
drop < 1% of speech frames and the rest are refused at creation."""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import time
from pathlib import Path

from lipstream.bench.report import device_name, format_table, write_results
from lipstream.bench.serve import pick_avatar, result_device, server_for, server_settings, speech_clips
from lipstream.bench.soak import add_client_arguments, frame_figures, speak_and_watch
from lipstream.errors import LipstreamError, OverloadedError

MAX_OFFERED = 256


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_client_arguments(parser)
    parser.add_argument("--factor", type=float, default=2.0, help="sessions offered, as a multiple of the "
                                                                  "server's capacity (default 2)")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the admitted sessions speak after "
                                                                    "the last was asked for (default 60)")
    parser.add_argument("--stagger-s", type=float, default=1.0, help="seconds between two session requests "
                                                                     "(default 1)")


def run(args: argparse.Namespace) -> int:
    args.clients = [MAX_OFFERED]  # what spawned_server sizes its per-key session limit by
    with server_for(args) as (url, key, _):
        row, settings = asyncio.run(_overload(args, url, key))
    print(format_table(
        ["Capacity (sessions)", "Offered", "Admitted", "Refused (503)", "dropped", "stalled", "fps min", "fps mean"],
        [[row["capacity_sessions"], row["offered"], row["admitted"], row["refused"],
          f"{row['dropped_frames']} ({row['dropped_share']:.2%})", row["stalled_frames"], row["fps_min"],
          row["fps_mean"]]]))
    settings.update({key: getattr(args, key) for key in ("factor", "seconds", "stagger_s", "size", "fps", "chunk_ms",
                                                         "utterance_s", "gap_s", "max_batch", "max_wait_ms")},
                    cpu=device_name("cpu"))
    path = write_results("overload", result_device(settings["engine_device"]), settings, [row],
                         Path(args.out_dir) if args.out_dir else None)
    print(f"results written to {path}")
    return 0


async def _overload(args: argparse.Namespace, url: str, key: str) -> tuple[dict, dict]:
    from lipstream.client import LipstreamClient

    speech = speech_clips(args)
    async with LipstreamClient(url, key, timeout_s=60) as client:
        ready = await client.wait_ready(60)
        capacity = await client.capacity()
        if not capacity["admission_control"]:
            raise LipstreamError("this server does not refuse sessions (setting admission_control is off)")
        avatar = pick_avatar(await client.avatars(), args.avatar)
        offered = min(MAX_OFFERED, max(2, math.ceil(args.factor * capacity["free_sessions"])))
        print(f"{ready['reason']}; avatar {avatar['name']} ({avatar['width']}x{avatar['height']}); the server "
              f"holds {capacity['free_sessions']} sessions by its own count: offering {offered}", flush=True)
        rng = random.Random(0)
        stop_at = time.monotonic() + (offered - 1) * args.stagger_s + args.seconds
        clients, refusals = [], []
        for i in range(offered):
            try:
                session = await client.create_session(avatar["name"], fps=args.fps)
            except OverloadedError as exc:  # a 503 with Retry-After
                refusals.append(f"{exc} (retry after {exc.retry_after_s} s)")
                print(f"session {i + 1}/{offered}: refused", flush=True)
            else:
                clients.append(asyncio.create_task(
                    speak_and_watch(client, session, speech[i % len(speech)], args, stop_at, rng)))
                print(f"session {i + 1}/{offered}: admitted", flush=True)
            if i + 1 < offered:
                await asyncio.sleep(args.stagger_s)
        admitted_capacity = await client.capacity()
        print(f"after the offers: load {admitted_capacity['load']} of {admitted_capacity['budget']}; "
              f"per frame (ms) {admitted_capacity['frame_ms']}", flush=True)
        await asyncio.sleep(max(0.0, stop_at - time.monotonic() - 1))
        final_capacity = await client.capacity()
        results = await asyncio.gather(*clients)
    figures, fps = frame_figures(results)
    row = {"capacity_sessions": capacity["free_sessions"], "capacity": capacity,
           "capacity_after_offers": admitted_capacity, "capacity_at_end": final_capacity, "offered": offered,
           "admitted": len(clients), "refused": len(refusals), "refusal": refusals[0] if refusals else None,
           **figures, "fps_min": min(fps, default=None), "fps_mean": sum(fps) / len(fps) if fps else None}
    return row, server_settings(args, avatar, ready)
