"""Start lipstream on Ray: Ray (a local one, or join one), Serve's HTTP proxies with lipstream's
middleware on the server's port, the cluster's directory, and the replicas (`LipstreamReplica`), each an
ordinary lipstream server, routed by `SessionRouter` and scaled by `SessionsPolicy`."""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass

import httpx
import ray
from ray import serve
from ray.serve.config import AutoscalingConfig, AutoscalingPolicy, RequestRouterConfig

from lipstream.cluster import proxy
from lipstream.cluster.directory import directory
from lipstream.cluster.replica import APP_NAME, DEPLOYMENT, LipstreamReplica
from lipstream.cluster.router import STATS_PERIOD_S
from lipstream.config import Settings
from lipstream.errors import ClusterSetupError
from lipstream.server.serve import page_url

DRAIN_MARGIN_S = 30.0  # Serve's hard stop comes this long after a replica's drain timeout
READY_POLL_S = 0.5


@dataclass(frozen=True)
class ClusterOptions:
    """replicas: how many (None: one per GPU, or 1 without GPUs); with min_replicas/max_replicas,
    autoscaling between them (starting at `replicas`, or min_replicas). gpus_per_replica: None: 1 where
    the Ray cluster has GPUs, else 0 (CPU replicas of the warp engine). address: a Ray cluster to join
    (None: start a local Ray). proxy_location: "EveryNode" or "HeadOnly" (Serve's HTTP proxies).
    sessions_per_replica: the autoscaler's room per replica (None: what the replicas measure); headroom:
    the free sessions it keeps; it scales up `upscale_delay_s` and down `downscale_delay_s` after the
    need changed, from the sessions averaged over the last `look_back_s`.
    frames: "proxy": WebSocket frames go through Serve's proxy (one port); "direct": from the replica's
    own port, named in the session reply. num_cpus: CPUs of a local Ray (None: all)."""

    replicas: int | None = None
    gpus_per_replica: float | None = None
    cpus_per_replica: float = 1.0
    address: str | None = None
    min_replicas: int | None = None
    max_replicas: int | None = None
    drain_timeout_s: float = 86400.0
    proxy_location: str = "EveryNode"
    sessions_per_replica: float | None = None
    headroom: float = 1.0
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 120.0
    look_back_s: float = 30.0
    frames: str = "proxy"
    ready_timeout_s: float = 600.0
    num_cpus: float | None = None


@dataclass(frozen=True)
class RunningCluster:
    url: str  # where clients connect (the server's host and port)
    key: str | None  # the API key made for this run (None: the settings name keys)
    replicas: int  # how many were started
    gpus_per_replica: float
    local: bool  # this process started Ray
    settings: Settings  # the replicas' (with the key made for this run, the engine chosen)
    options: ClusterOptions


def start(settings: Settings, options: ClusterOptions) -> RunningCluster:
    """Start the cluster and wait until its replicas are ready. Raises ClusterSetupError (and leaves
    nothing running)."""
    local = options.address is None
    if local:  # the proxies of a Ray started here inherit this process's environment
        os.environ[proxy.CALLBACK_ENV] = proxy.CALLBACK
    ray.init(address=options.address, num_cpus=options.num_cpus if local else None, include_dashboard=False,
             logging_level="WARNING", log_to_driver=False)
    try:
        return _deploy(settings, options, local)
    except BaseException:
        _shut_down(local)
        raise


def _deploy(settings: Settings, options: ClusterOptions, local: bool) -> RunningCluster:
    gpus = ray.cluster_resources().get("GPU", 0.0)
    gpus_per_replica = options.gpus_per_replica if options.gpus_per_replica is not None else (1.0 if gpus else 0.0)
    if not gpus_per_replica and settings.engine == "auto":
        settings = settings.model_copy(update={"engine": "warp", "device": "cpu"})
    key = None
    if not settings.api_keys:  # one key for every replica
        key = secrets.token_urlsafe(24)
        settings = settings.model_copy(update={"api_keys": {key: ""}})
    replicas = options.replicas or max(1, int(gpus // gpus_per_replica) if gpus_per_replica else 1)
    bounds = _bounds(options, replicas)
    if bounds is not None:
        replicas = min(max(replicas, bounds[0]), bounds[1])
    serve.start(http_options={"host": settings.host, "port": settings.port}, proxy_location=options.proxy_location)
    directory()
    try:
        serve.run(_deployment(settings, options, gpus_per_replica, replicas, bounds), name=APP_NAME, route_prefix="/")
    except RuntimeError as exc:  # Serve's "Deploying application ... failed": a replica could not start
        raise ClusterSetupError(f"the replicas could not start ({exc}); the replicas' logs in Ray's session "
                                "folder (logs/serve) say why, e.g. an engine that cannot load") from exc
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    _wait_ready(f"http://{host}:{settings.port}", key or next(iter(settings.api_keys)), replicas,
                options.ready_timeout_s)
    return RunningCluster(page_url(settings, None).rstrip("/"), key, replicas, gpus_per_replica, local, settings,
                          options)



def _bounds(options: ClusterOptions, replicas: int) -> tuple[int, int] | None:
    """(min, max) replicas of autoscaling: min_replicas or 1, max_replicas or `replicas` (at least the
    min); None without autoscaling (neither min_replicas nor max_replicas set)."""
    if options.min_replicas is None and options.max_replicas is None:
        return None
    low = options.min_replicas or 1
    return low, max(options.max_replicas or replicas, low)


def _deployment(settings: Settings, options: ClusterOptions, gpus_per_replica: float, replicas: int,
                bounds: tuple[int, int] | None):
    """The replicas' Serve deployment: `replicas` of them, or with `bounds` (`_bounds`), autoscaled
    between them starting at `replicas`."""
    scaling: dict = {"num_replicas": replicas}
    if bounds is not None:
        low, high = bounds
        kwargs = {"sessions_per_replica": options.sessions_per_replica, "headroom": options.headroom}
        scaling = {"num_replicas": "auto", "autoscaling_config": AutoscalingConfig(
            min_replicas=low, max_replicas=high, initial_replicas=replicas, look_back_period_s=options.look_back_s,
            metrics_interval_s=min(10.0, options.look_back_s / 2),
            upscale_delay_s=options.upscale_delay_s, downscale_delay_s=options.downscale_delay_s,
            policy=AutoscalingPolicy(policy_function="lipstream.cluster.autoscale:SessionsPolicy",
                                     policy_kwargs={k: v for k, v in kwargs.items() if v is not None}))}
    return serve.deployment(
        LipstreamReplica, name=DEPLOYMENT,
        ray_actor_options={"num_gpus": gpus_per_replica, "num_cpus": options.cpus_per_replica},
        max_ongoing_requests=100_000,  # a session's WebSocket is one request for its whole life
        graceful_shutdown_timeout_s=options.drain_timeout_s + DRAIN_MARGIN_S, graceful_shutdown_wait_loop_s=1.0,
        request_router_config=RequestRouterConfig(request_router_class="lipstream.cluster.router:SessionRouter",
                                                  request_routing_stats_period_s=STATS_PERIOD_S),
        **scaling,
    ).bind(settings.model_dump(mode="json"), options.drain_timeout_s, options.frames == "direct")


def _wait_ready(url: str, key: str, replicas: int, timeout_s: float) -> None:
    """Wait until /ready lists `replicas` ready replicas, and the request router has had their next
    reports (placement reads those: a replica it last saw loading gets no session); ClusterSetupError
    when the proxy's replies lack the middleware's mark, or they are not ready in time."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            reply = httpx.get(f"{url}/ready", headers={"X-API-Key": key}, timeout=10)
        except httpx.TransportError as exc:
            last = f"{type(exc).__name__}: {exc}"
        else:
            if reply.status_code != 404 and proxy.MARK_HEADER.decode() not in reply.headers:
                raise ClusterSetupError(
                    f"Ray Serve's HTTP proxy at {url} runs without lipstream's middleware, so sessions cannot "
                    f"be routed to their replicas: start Ray (`ray start`) on every node with "
                    f"{proxy.CALLBACK_ENV}={proxy.CALLBACK} in its environment")
            if reply.status_code == 200 and sum(r["ready"] for r in reply.json()["replicas"]) >= replicas:
                time.sleep(2 * STATS_PERIOD_S)
                return
            last = f"HTTP {reply.status_code}: {reply.text[:200]}"
        time.sleep(READY_POLL_S)
    raise ClusterSetupError(f"no lipstream replica was ready within {timeout_s:g} s (last answer of /ready: {last}); "
                            "`ray status` shows whether the replicas' GPUs/CPUs are there")


def stop(cluster: RunningCluster) -> None:
    """Stop the replicas (draining ones close their sessions now) and Serve; a local Ray too."""
    _shut_down(cluster.local)


def _shut_down(local: bool) -> None:
    try:
        ray.get(directory().stop.remote(), timeout=10)
        serve.shutdown()
    finally:
        if local:
            ray.shutdown()
