"""`lipstream cluster [--replicas N] [--address RAY] [...]`: the server on Ray, one replica a GPU.

Every flag of `lipstream serve`, plus the cluster's own. Cheap to import: Ray is imported by `run`."""

from __future__ import annotations

import argparse
import signal
import threading

from lipstream.config import add_settings_arguments, settings_from_args
from lipstream.errors import ClusterUnavailableError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    cluster = subparsers.add_parser(
        "cluster", help="run the server on a Ray cluster: replicas on many GPUs behind one port",
        description="Run lipstream servers as Ray Serve replicas (one per GPU, or CPU replicas of the warp engine) "
                    "behind one port: the same API, WebSocket, WebRTC signalling and web page as `lipstream serve`. "
                    "New sessions go to the replica with the most free capacity; every later request of a session "
                    "to the replica that holds it. Needs the `cluster` extra.")
    add_settings_arguments(cluster)
    group = cluster.add_argument_group("cluster")
    group.add_argument("--replicas", type=int, metavar="N", help="replicas to run (default: one per GPU of the "
                       "Ray cluster, or 1 without GPUs); with --min/--max-replicas, how many to start with")
    group.add_argument("--gpus-per-replica", type=float, metavar="NUM", help="GPUs each replica takes (default: 1 "
                       "where the Ray cluster has GPUs, else 0: CPU replicas of the warp engine)")
    group.add_argument("--cpus-per-replica", type=float, default=1.0, metavar="NUM",
                       help="CPUs each replica takes (default: 1)")
    group.add_argument("--address", metavar="RAY", help="join this Ray cluster (e.g. auto, or <head>:6379); "
                       "default: start a local Ray")
    group.add_argument("--min-replicas", type=int, metavar="N", help="autoscale on sessions per replica, down "
                       "to N replicas")
    group.add_argument("--max-replicas", type=int, metavar="N", help="autoscale on sessions per replica, up to "
                       "N replicas (Ray's autoscaler adds nodes when their GPUs are not there)")
    group.add_argument("--sessions-per-replica", type=float, metavar="NUM", help="sessions a replica holds, for "
                       "autoscaling (default: what each replica measures of its own capacity)")
    group.add_argument("--headroom", type=float, default=1.0, metavar="NUM",
                       help="free sessions autoscaling keeps ready for newcomers (default: 1)")
    group.add_argument("--upscale-delay-s", type=float, default=10.0, metavar="S",
                       help="autoscaling adds replicas once the sessions have needed them this long (default: 10)")
    group.add_argument("--downscale-delay-s", type=float, default=120.0, metavar="S",
                       help="autoscaling removes replicas once the sessions have not needed them this long "
                            "(default: 120)")
    group.add_argument("--drain-timeout-s", type=float, default=86400.0, metavar="S",
                       help="a replica being scaled down takes no new sessions and waits this long at most for "
                            "its open ones to end (default: a day)")
    group.add_argument("--frames", choices=("proxy", "direct"), default="proxy",
                       help="the path of WebSocket frames: through Ray Serve's proxy on the one port (default), or "
                            "straight from a port of the replica's node, which the session reply names (no proxy "
                            "cost per frame; the nodes' ports must be reachable; see the README)")
    group.add_argument("--proxy-location", choices=("EveryNode", "HeadOnly"), default="EveryNode",
                       help="where Ray Serve runs the HTTP proxies (default: every node)")
    cluster.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    try:
        from lipstream.cluster import launch
    except ImportError as exc:
        raise ClusterUnavailableError(f"`lipstream cluster` needs Ray Serve ({exc}): pip install "
                                      "'lipstream[cluster]'") from exc
    options = launch.ClusterOptions(
        replicas=args.replicas, gpus_per_replica=args.gpus_per_replica, cpus_per_replica=args.cpus_per_replica,
        address=args.address, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
        drain_timeout_s=args.drain_timeout_s, proxy_location=args.proxy_location,
        sessions_per_replica=args.sessions_per_replica, headroom=args.headroom,
        upscale_delay_s=args.upscale_delay_s, downscale_delay_s=args.downscale_delay_s, frames=args.frames)
    print("lipstream: starting the cluster (Ray, the proxies, the replicas' engines)...", flush=True)
    cluster = launch.start(settings, options)
    try:
        kind = f"{cluster.gpus_per_replica:g} GPU each" if cluster.gpus_per_replica else "CPU, warp engine"
        print(f"lipstream: {cluster.replicas} replica{'s' if cluster.replicas != 1 else ''} ({kind}) ready",
              flush=True)
        if cluster.key:
            print("lipstream: no API keys configured (setting api_keys); made one for this run", flush=True)
        print(f"lipstream: open {cluster.url}/" + (f"?key={cluster.key}" if cluster.key else ""), flush=True)
        stopped = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stopped.set())
        stopped.wait()
        print("lipstream: stopping the cluster", flush=True)
    finally:
        launch.stop(cluster)
    return 0
