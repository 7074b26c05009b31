"""`lipstream bench ...`: the benchmarks. Each module exposes `add_arguments(parser)` and `run(args)`."""

from __future__ import annotations

import argparse
import importlib

# sub-command -> (module under lipstream.bench, help). Modules keep heavy imports inside run().
BENCHMARKS = {
    "postprocess": ("postprocess", "per-frame resize + unsharp + blend: MuseTalk-original style vs lipstream"),
    "audio-streaming": ("audio_streaming", "streaming vs offline whisper features: difference by context and look-ahead"),
    "warp": ("warp", "the warp engine on one CPU thread: mouth features + warp + composite, frames/s at 720p"),
    "warp-faces": ("warp_faces", "the warp engine on real face photos: mouth vs speech, chin, silence, contact sheet"),
    "engine": ("engine", "MuseTalk UNet + VAE decode (random full-size weights): frames/s, latency, memory"),
    "serve": ("serve", "N clients speaking to live sessions in real time (through the server, or in-process): fps, first-frame latency, drops"),
    "avatar-prepare": ("avatar_prepare", "avatar preparation of a synthetic 10 s 720p face video, without latents"),
    "pipecat": ("pipecat_latency", "Pipecat pipeline: TTS audio in -> first speaking image out, in-process and remote"),
    "soak": ("soak", "N sessions speaking for T minutes through the server: A/V offset, drops, RSS/threads/fds over time"),
    "overload": ("overload", "sessions offered at a multiple of the server's capacity: drops of the admitted, refusals"),
    "cluster": ("cluster", "what lipstream cluster (Ray Serve) adds over one server: per frame and per session set-up"),
}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser("bench", help="run a benchmark; prints a table and writes JSON to bench/results/")
    sub = bench.add_subparsers(dest="benchmark", required=True)
    for command, (module_name, help_text) in BENCHMARKS.items():
        module = importlib.import_module(f"lipstream.bench.{module_name}")
        parser = sub.add_parser(command, help=help_text)
        module.add_arguments(parser)
        parser.set_defaults(func=module.run)
