"""A cluster replica: an ordinary lipstream server (`create_app`) as a Ray Serve deployment.

Each replica loads its engine (on the GPU Ray gives it, or the CPU), names itself after its Serve
replica id (setting `instance`, so its session and job ids lead back to it), and serves the whole API.
Beyond the single server it:
- reports its readiness and free capacity to Serve's router (`routing_stats`, for placement) and its
  sessions to Serve's autoscaler (`autoscaling_stats`, see `autoscale`);
- reports itself to the cluster's directory each second, and answers /ready and /metrics for every
  replica of the cluster (the directory's list; each replica's metrics fetched from it through Serve);
- drains when Serve stops it (scaling down, a new version): no new sessions, and it waits for its open
  ones to end (at most `drain_timeout_s`, or until the cluster stops) before the server shuts down;
- with `direct`, also serves the app on a port of its own node (setting public_url), which session
  replies name for the WebSocket and the WebRTC offer: the frames then skip Serve's proxy."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time

import ray
import uvicorn
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from ray import serve

from lipstream.cluster.directory import directory
from lipstream.cluster.metrics import merge_metrics
from lipstream.config import Settings
from lipstream.server.app import create_app, drain
from lipstream.server.auth import CallerDep, require_metrics_key
from lipstream.server.engines import load_engine_for
from lipstream.server.rest import TENANT_COUNTS, describe_session, tenant_figures
from lipstream.server.serve import uvicorn_config

log = logging.getLogger(__name__)

APP_NAME = "lipstream"
DEPLOYMENT = "LipstreamReplica"
REPORT_EVERY_S = 1.0
FAN_OUT_TIMEOUT_S = 5.0
UNCAPPED_FREE = 1000  # free sessions a replica without admission control or max_sessions reports


@serve.ingress()
class LipstreamReplica:
    """settings: the server's settings (`Settings.model_dump(mode="json")`; `instance` and, with
    `direct`, `public_url` are set here). drain_timeout_s: how long a stopping replica waits for its
    sessions. direct: serve the frames from a port of its own (see the module's doc)."""

    async def __init__(self, settings: dict, drain_timeout_s: float, direct: bool = False):
        self.name = serve.get_replica_context().replica_id.unique_id
        own = {"instance": self.name}
        listener = None
        if direct:  # a port of this node, bound now so that no other process takes it
            host = settings["host"] or "0.0.0.0"
            listener = socket.create_server((host, 0))
            reachable = ray.util.get_node_ip_address() if host in ("0.0.0.0", "::") else host
            own["public_url"] = f"http://{reachable}:{listener.getsockname()[1]}"
        self.settings = Settings(**{**settings, **own})
        self.drain_timeout_s = drain_timeout_s
        engine, reason = await asyncio.to_thread(load_engine_for, self.settings, self.settings.engine)
        log.info("replica %s: %s", self.name, reason)
        self.server = create_app(self.settings, engine=engine, engine_reason=reason)
        _add_cluster_routes(self.server, self)
        self._direct: uvicorn.Server | None = None
        if listener is not None:  # the same app (its lifespan is Serve's to run)
            self._direct = uvicorn.Server(uvicorn_config(self.server, self.settings, lifespan="off", log_level="warning"))
            self._direct_task = asyncio.get_running_loop().create_task(self._direct.serve(sockets=[listener]))
        self.directory = directory()
        self.stopping = False  # the cluster is stopping (the directory says so)
        self._reporter = asyncio.get_running_loop().create_task(self._report_forever())
        self.server.state.before_shutdown = self._drain

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self.server

    # ---- what the replica tells Ray Serve and the directory ---------------------------------------

    def info(self) -> dict:
        """This replica's state: name, node, process, readiness, and its capacity and sessions."""
        state = self.server.state
        ready = state.ready.is_set() and state.startup_error is None
        capacity = state.capacity.report() if ready else {}
        if ready and not self.settings.admission_control:  # the sessions it would admit: up to its cap
            capacity["free_sessions"] = max(0, self.settings.max_sessions - len(state.sessions)) \
                if self.settings.max_sessions else UNCAPPED_FREE
        slot = state.engines.default
        return {"name": self.name, "node": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
                "pid": os.getpid(), "ready": ready, "draining": state.draining, "error": state.startup_error,
                "engine": slot.engine.name if slot else None, "device": str(slot.engine.device) if slot else None,
                "sessions": len(state.sessions), "free_sessions": capacity.get("free_sessions") or 0,
                "free_fps": capacity.get("free_fps") or 0.0}

    def record_routing_stats(self) -> dict:
        """For the router (`lipstream.cluster.router`): readiness and free capacity, and when (wall time)."""
        return {**self.info(), "at": time.time()}

    def record_autoscaling_stats(self) -> dict[str, float]:
        """For the autoscaling policy (`lipstream.cluster.autoscale`)."""
        info = self.info()
        return {"sessions": float(info["sessions"]), "room": float(info["sessions"] + info["free_sessions"])}

    async def metrics_text(self) -> tuple[str, str]:
        """(this replica's name, its Prometheus metrics in the text format)."""
        return self.name, generate_latest().decode()

    async def tenant_view(self, tenant: str) -> tuple[str, dict]:
        """(this replica's name, {"sessions": the tenant's sessions as GET /api/sessions lists them,
        "figures": its figures as GET /api/stats gives them})."""
        state = self.server.state
        return self.name, {"sessions": [describe_session(e) for e in state.sessions.for_tenant(tenant)],
                           "figures": tenant_figures(state, tenant)}

    async def from_every_replica(self, method: str, *args) -> dict[str, object]:
        """{replica name: what its `method(*args)` returned} of every replica the directory lists, each
        call routed to its replica by name; one that does not answer within FAN_OUT_TIMEOUT_S is left out.
        The calls go one after the other: made while a request is handled, they share its request id,
        by which Serve's router tells its pending requests apart."""
        names = set(await self.directory.replicas.remote()) | {self.name}
        handle = serve.get_deployment_handle(DEPLOYMENT, app_name=APP_NAME)
        answers = {}
        for name in sorted(names):
            try:
                answered, value = await asyncio.wait_for(
                    getattr(handle.options(session_id=name), method).remote(*args), FAN_OUT_TIMEOUT_S)
            except (TimeoutError, ray.exceptions.RayError) as exc:
                log.warning("replica %s: %s of replica %s failed (%s)", self.name, method, name, exc)
                continue
            answers[answered] = value
        return answers

    async def _report_forever(self) -> None:
        while True:
            try:
                self.stopping = await self.directory.report.remote(self.name, self.info())
            except Exception:  # the directory restarts (it is recreated by its max_restarts): report again
                log.warning("replica %s: cannot report to the cluster's directory", self.name, exc_info=True)
            await asyncio.sleep(REPORT_EVERY_S)

    # ---- stopping ---------------------------------------------------------------------------------

    async def _drain(self) -> None:
        """Serve stops this replica (scaling down, a new version): awaited by the server's shutdown before
        it closes its sessions (Serve runs the app's lifespan shutdown first when it stops an ingress
        replica). No new sessions; wait for the open ones to end, at most drain_timeout_s, or until the
        cluster stops; then leave the directory."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.drain_timeout_s
        while not self.stopping and loop.time() < deadline:
            if not await drain(self.server, min(REPORT_EVERY_S, deadline - loop.time())):
                break
        log.info("replica %s: drained (%d sessions left); stopping", self.name, len(self.server.state.sessions))
        self._reporter.cancel()
        if self._direct is not None:
            self._direct.should_exit = True
        with contextlib.suppress(Exception):
            await self.directory.leave.remote(self.name)


def _add_cluster_routes(app: FastAPI, replica: LipstreamReplica) -> None:
    """/ready, /metrics, GET /api/sessions and /api/stats of the whole cluster, ahead of the server's own
    (the first route that matches answers)."""
    router = APIRouter()

    @router.get("/ready")
    async def cluster_ready(caller: CallerDep) -> JSONResponse:
        """200 while any replica is ready, with every replica's state and the cluster's free capacity."""
        replicas = await replica.directory.replicas.remote()
        replicas.setdefault(replica.name, replica.info())
        listed = sorted(replicas.values(), key=lambda r: r["name"])
        ready = [r for r in listed if r["ready"] and not r["draining"]]
        capacity = {key: sum(r[key] for r in ready) for key in ("free_sessions", "free_fps")}
        capacity["sessions"] = sum(r["sessions"] for r in listed)
        return JSONResponse({"ready": bool(ready), "engine": ready[0]["engine"] if ready else None,
                             "replicas": listed, "capacity": capacity}, status_code=200 if ready else 503)

    @router.get("/metrics")
    async def cluster_metrics(request: Request) -> Response:
        """Every replica's metrics, each sample labelled with its replica (needs the metrics key)."""
        require_metrics_key(request)
        texts = await replica.from_every_replica("metrics_text")
        return Response(merge_metrics(texts), media_type=CONTENT_TYPE_LATEST)

    @router.get("/api/sessions")
    async def cluster_sessions(caller: CallerDep) -> dict:
        views = await replica.from_every_replica("tenant_view", caller.tenant)
        return {"sessions": [s for name in sorted(views) for s in views[name]["sessions"]]}

    @router.get("/api/stats")
    async def cluster_tenant_stats(caller: CallerDep) -> dict:
        figures = [view["figures"] for view in (await replica.from_every_replica("tenant_view", caller.tenant)).values()]
        jobs = {status: sum(f["jobs"].get(status, 0) for f in figures) for status in {s for f in figures for s in f["jobs"]}}
        return {"tenant": caller.tenant, **{key: sum(f[key] for f in figures) for key in TENANT_COUNTS}, "jobs": jobs}

    before = len(app.router.routes)
    app.include_router(router)
    added = app.router.routes[before:]
    del app.router.routes[before:]
    app.router.routes[0:0] = added
