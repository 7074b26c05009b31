"""`lipstream bench pipecat`: how soon the avatar answers in a Pipecat pipeline (needs `lipstream[pipecat]`).

Per utterance: the time from the TTS's first audio frame entering `LipstreamVideoService` (it starts
processing the first TTSAudioRawFrame after a TTSStartedFrame) to the first speaking image leaving it (the
OutputImageRawFrame that carries "speech_started"), both read from the pipeline's clock by an observer.
The TTS is simulated: `--utterances` utterances of speech-like audio of `--utterance-s`, in TTSAudioRawFrame
chunks of `--chunk-ms` arriving `--tts-speed` times faster than real time (1: a TTS that only just keeps
up), `--gap-s` of quiet after each has played; one utterance first to warm up, not counted. Also per
utterance: the session's own ready -> frame latency (from the audio that made its first frame computable
to that frame, `first_frame_ms` of the session's stats).

Transports: `inprocess` (the engine in the bench's process, as `LipstreamVideoService(avatar=...)`) and
`remote` (a `lipstream serve` subprocess on a free localhost port, through lipstream.client); the avatar is
the bench avatar (the astronaut scene at `--size`, 8 frames). Target (issue 12): in-process p50 <= 120 ms
with warp on a 2-core CPU."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from lipstream.bench.postprocess import FRAME_SIZES
from lipstream.bench.report import device_name, format_table, write_results
from lipstream.bench.serve import ENGINES, bench_avatar, served
from lipstream.errors import LipstreamError

TRANSPORTS = ("inprocess", "remote")
START_TIMEOUT_S = 300.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--transport", choices=(*TRANSPORTS, "both"), default="both",
                        help="inprocess: the engine in this process; remote: a `lipstream serve` started here, "
                             "over loopback; both (default)")
    parser.add_argument("--utterances", type=int, default=20, help="utterances measured per transport (default 20)")
    parser.add_argument("--utterance-s", type=float, default=1.5, help="length of each utterance (default 1.5)")
    parser.add_argument("--gap-s", type=float, default=1.0, help="quiet after each utterance has played (default 1)")
    parser.add_argument("--chunk-ms", type=int, default=40, help="TTS audio frame length (default 40)")
    parser.add_argument("--tts-speed", type=float, default=1.0,
                        help="how many times faster than real time the TTS delivers (default 1)")
    parser.add_argument("--rate", type=int, default=24000, help="the TTS's sample rate (default 24000)")
    parser.add_argument("--engine", choices=[e for e in ENGINES if e != "musetalk-random"], default="auto",
                        help="auto: musetalk when its weights are installed, else warp")
    parser.add_argument("--models", default=None, help="MuseTalk weights folder (default LIPSTREAM_MODELS or ./models)")
    parser.add_argument("--device", default=None, help="MuseTalk's device (default cuda if available)")
    parser.add_argument("--size", choices=sorted(FRAME_SIZES), default="720p", help="bench avatar size (default 720p)")
    parser.add_argument("--fps", type=int, default=25)
    parser.add_argument("--out-dir", default=None, help="where to write the JSON (default bench/results)")


def run(args: argparse.Namespace) -> int:
    try:
        import pipecat  # noqa: F401
    except ImportError as exc:
        raise LipstreamError("`lipstream bench pipecat` needs Pipecat: pip install 'lipstream[pipecat]'") from exc
    if args.utterances < 1 or args.chunk_ms < 1 or args.tts_speed <= 0:
        raise LipstreamError("--utterances and --chunk-ms must be >= 1 and --tts-speed > 0")
    from loguru import logger

    logger.disable("pipecat")  # its per-frame debug lines would be most of the output
    logging.getLogger("httpx").setLevel(logging.WARNING)  # and so would a line per request
    transports = TRANSPORTS if args.transport == "both" else (args.transport,)
    flags = {"engine": args.engine, "models_root": args.models, "device": args.device, "fps": args.fps}
    rows = []
    with tempfile.TemporaryDirectory(prefix="lipstream-bench-") as folder:
        from lipstream.avatar.store import save_avatar

        root = Path(folder) / "avatars"
        save_avatar(bench_avatar(args.size), root=root)
        flags["avatars_root"] = root
        for transport in transports:
            print(f"{transport}: {args.utterances} utterances of {args.utterance_s:g} s ...", flush=True)
            with contextlib.ExitStack() as stack:
                remote = stack.enter_context(served(flags, Path(folder) / "server.log")) \
                    if transport == "remote" else None
                rows.append(asyncio.run(_measure(transport, flags, remote, args)))
    print(format_table(
        ["Transport", "engine", "utterances", "first image ms p50", "p95", "max", "ready->frame ms p50"],
        [[r["transport"], r["engine"], r["utterances"], r["first_image_ms_p50"], r["first_image_ms_p95"],
          r["first_image_ms_max"], r["ready_to_frame_ms_p50"]] for r in rows]))
    settings = {key: getattr(args, key) for key in ("transport", "utterances", "utterance_s", "gap_s", "chunk_ms",
                                                    "tts_speed", "rate", "engine", "size", "fps")}
    settings["cpu"] = device_name("cpu")
    device = next((r["device"] for r in rows if r["transport"] == "inprocess"), rows[0]["device"])
    path = write_results("pipecat", device if device.startswith("cuda") else "cpu", settings, rows,
                         Path(args.out_dir) if args.out_dir else None)
    print(f"results written to {path}")
    return 0


async def _measure(transport: str, flags: dict, remote: tuple[str, str] | None, args: argparse.Namespace) -> dict:
    """One transport's row: a pipeline of the service alone, fed utterances, watched by an observer."""
    import soxr
    from pipecat.frames.frames import (
        EndFrame,
        OutputImageRawFrame,
        TTSAudioRawFrame,
        TTSStartedFrame,
        TTSStoppedFrame,
    )
    from pipecat.observers.base_observer import BaseObserver, FrameProcessed, FramePushed
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.worker import PipelineWorker
    from pipecat.workers.runner import WorkerRunner

    from lipstream.client import LipstreamClient
    from lipstream.config import load_settings
    from lipstream.integrations.local import LocalSessions
    from lipstream.integrations.pipecat import LipstreamVideoService
    from lipstream.synthetic import speech

    if remote is None:
        service = LipstreamVideoService(avatar="bench", host=LocalSessions(load_settings(flags)))
    else:
        service = LipstreamVideoService(avatar="bench", url=remote[0], api_key=remote[1])

    class FirstImages(BaseObserver):
        """Pipeline-clock ns of each utterance's first audio in and first speaking image out."""

        def __init__(self):
            super().__init__()
            self.armed = False
            self.audio_in: list[int] = []
            self.image_out: list[int] = []

        async def on_process_frame(self, data: FrameProcessed) -> None:
            if data.processor is service and isinstance(data.frame, TTSStartedFrame):
                self.armed = True
            elif data.processor is service and isinstance(data.frame, TTSAudioRawFrame) and self.armed:
                self.armed = False
                self.audio_in.append(data.timestamp)

        async def on_push_frame(self, data: FramePushed) -> None:
            if data.source is service and isinstance(data.frame, OutputImageRawFrame) \
                    and "speech_started" in data.frame.metadata["lipstream"]["events"]:
                self.image_out.append(data.timestamp)

    observer = FirstImages()
    worker = PipelineWorker(Pipeline([service]), observers=[observer], cancel_on_idle_timeout=False)
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    running = asyncio.create_task(runner.run())
    step = args.rate * args.chunk_ms // 1000
    voice = soxr.resample(speech(args.utterance_s, seed=7), 16000, args.rate)  # at the TTS's rate
    pcm = np.round(np.clip(voice, -1, 1) * 32767).astype(np.int16)
    ready_to_frame, engine, device = [], None, None
    try:
        async with asyncio.timeout(START_TIMEOUT_S):
            while service.session is None:
                if running.done():
                    raise LipstreamError("the pipeline ended before the session opened (see the errors above)")
                await asyncio.sleep(0.05)
        session = service.session
        for n in range(args.utterances + 1):  # the first one warms up
            await worker.queue_frame(TTSStartedFrame())
            began = time.monotonic()
            for i, at in enumerate(range(0, pcm.size, step)):
                await asyncio.sleep(max(0.0, began + i * args.chunk_ms / 1000 / args.tts_speed - time.monotonic()))
                await worker.queue_frame(TTSAudioRawFrame(pcm[at:at + step].tobytes(), args.rate, 1))
            await worker.queue_frame(TTSStoppedFrame())
            await asyncio.sleep(max(0.0, began + args.utterance_s + args.gap_s - time.monotonic()))
            if service.session is None:
                raise LipstreamError("the lipstream session ended during the benchmark (see the errors above)")
            stats = await session.stats()
            if n > 0 and stats["first_frame_ms"] is not None:
                ready_to_frame.append(stats["first_frame_ms"])
        engine = session.engine
        if remote is None:
            device = str(session.session.engine.device)
        else:
            async with LipstreamClient(*remote) as client:
                device = (await client.ready())["device"]
    finally:
        await worker.queue_frame(EndFrame())
        await running
    pairs = list(zip(observer.audio_in, observer.image_out))[1:]
    if len(observer.image_out) != len(observer.audio_in) or len(pairs) < args.utterances:
        raise LipstreamError(f"{len(observer.image_out)} of {len(observer.audio_in)} utterances showed a speaking "
                             "image; the benchmark needs every one")
    latency = sorted((out - began) / 1e6 for began, out in pairs)
    return {"transport": transport, "engine": engine, "device": device, "utterances": len(latency),
            "first_image_ms_p50": float(np.percentile(latency, 50)),
            "first_image_ms_p95": float(np.percentile(latency, 95)), "first_image_ms_max": latency[-1],
            "first_image_ms_mean": float(np.mean(latency)), "first_image_ms": latency,
            "ready_to_frame_ms_p50": float(np.median(ready_to_frame)) if ready_to_frame else None}
