"""`lipstream bench ...`: the benchmarks. Each module exposes `add_arguments(parser)` and `run(args)`."""

from __future__ import annotations

import argparse
import importlib

# sub-command -> (module under lipstream.bench, help). Modules keep heavy imports inside run().
BENCHMARKS = {
    "postprocess": ("postprocess", "per-frame resize + unsharp + blend: MuseTalk-original style vs lipstream"),
    "audio-streaming": ("audio_streaming", "streaming vs offline whisper features: difference by context and look-ahead"),
    "engine": ("engine", "MuseTalk UNet + VAE decode (random full-size weights): frames/s, latency, memory"),
}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser("bench", help="run a benchmark; prints a table and writes JSON to bench/results/")
    sub = bench.add_subparsers(dest="benchmark", required=True)
    for command, (module_name, help_text) in BENCHMARKS.items():
        module = importlib.import_module(f"lipstream.bench.{module_name}")
        parser = sub.add_parser(command, help=help_text)
        module.add_arguments(parser)
        parser.set_defaults(func=module.run)
