"""The `lipstream` command. Each sub-command group lives in its own module and registers itself
through an `add_parser(subparsers)` function that sets `func` on its parser.

Those modules are cheap to import: torch, MediaPipe, the server and the like are imported by the
`func` that needs them, so `--help`, `--version` and argument errors answer at once."""

from __future__ import annotations

import argparse
import sys

from lipstream import __version__, demo, logs
from lipstream.avatar import cli as avatars_cli
from lipstream.bench import cli as bench_cli
from lipstream.cluster import cli as cluster_cli
from lipstream.errors import LipstreamError
from lipstream.models import cli as models_cli
from lipstream.server import serve as serve_cli
from lipstream.stream import render_cli

COMMAND_GROUPS = [avatars_cli, bench_cli, cluster_cli, models_cli, render_cli, serve_cli, demo]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lipstream", description="Real-time lip-sync server and tools.")
    parser.add_argument("--version", action="version", version=f"lipstream {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log debug messages, and the warnings of the libraries underneath (MediaPipe, "
                             "TensorFlow Lite, torch, ...), which are hidden otherwise")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for group in COMMAND_GROUPS:
        group.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one sub-command. A user error (any LipstreamError) is one line on stderr and exit status 1;
    Ctrl-C is exit status 130 (commands write through temporary names, so nothing is left half-made)."""
    args = build_parser().parse_args(argv)
    native_filter = logs.configure(args.verbose)
    try:
        return int(args.func(args) or 0)
    except LipstreamError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    finally:
        if native_filter is not None:
            native_filter.close()


if __name__ == "__main__":
    sys.exit(main())
