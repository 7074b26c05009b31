"""The cluster's parts that need no running Ray: routing keys from URLs, the proxy middleware (the key
header, a clear close of a WebSocket whose replica is gone), the placement order, the metrics of all
replicas as one exposition, and the autoscaling policy."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from lipstream.cluster.affinity import PLACE, routing_key

serve_config = pytest.importorskip("ray.serve.config", reason="the cluster needs the `cluster` extra (Ray Serve)")

from ray.serve._private.common import DeploymentID, ReplicaID

from lipstream.cluster.autoscale import SessionsPolicy, replicas_needed
from lipstream.cluster.metrics import merge_metrics
from lipstream.cluster.proxy import MARK_HEADER, REPLICA_LOST, SessionAffinity
from lipstream.cluster.router import placement_order

DEPLOYMENT = DeploymentID("LipstreamReplica", "lipstream")


def test_routing_keys_come_from_the_url():
    assert routing_key("POST", "/api/sessions") == PLACE
    assert routing_key("POST", "/api/livekit/sessions") == PLACE
    assert routing_key("POST", "/api/avatars") == PLACE
    assert routing_key("GET", "/api/sessions") is None  # a listing: any replica
    assert routing_key("GET", "/api/sessions/r7x2k9aa.0f3e/ws") == "r7x2k9aa"
    assert routing_key("POST", "/api/sessions/r7x2k9aa.0f3e/offer") == "r7x2k9aa"
    assert routing_key("DELETE", "/api/livekit/sessions/r7x2k9aa.0f3e") == "r7x2k9aa"
    assert routing_key("GET", "/api/jobs/b1.77aa") == "b1"
    assert routing_key("GET", "/api/sessions/0f3e9a/stats") is None  # a plain id names no replica
    assert routing_key("GET", "/ready") is None


def _echo_app():
    """HTTP: the routing header the request reached it with. WebSocket: accepted, then ended without a
    close, as Serve's proxy ends one whose replica died."""
    async def headers(request):
        return JSONResponse({"session": request.headers.getlist("x-session-id")})

    http = Starlette(routes=[Route("/api/sessions", headers, methods=["POST"]),
                             Route("/api/sessions/{sid}/stats", headers)])

    async def app(scope, receive, send):
        if scope["type"] != "websocket":
            return await http(scope, receive, send)
        await receive()
        await send({"type": "websocket.accept"})

    return app


def test_the_middleware_puts_the_routing_key_in_serve_s_header_and_drops_a_client_s():
    client = TestClient(SessionAffinity(_echo_app()))
    reply = client.post("/api/sessions", headers={"x-session-id": "forged"})
    assert reply.json() == {"session": [PLACE]} and reply.headers[MARK_HEADER.decode()] == PLACE
    reply = client.get("/api/sessions/r1.ab/stats", headers={"x-session-id": "forged"})
    assert reply.json() == {"session": ["r1"]}
    assert client.get("/api/sessions/plain/stats", headers={"x-session-id": "forged"}).json() == {"session": []}


def test_a_websocket_whose_replica_ended_without_a_close_gets_one():
    with TestClient(SessionAffinity(_echo_app())) as client, \
            client.websocket_connect("/api/sessions/r1.ab/ws") as ws, pytest.raises(WebSocketDisconnect) as closed:
        ws.receive_text()
    assert closed.value.code == REPLICA_LOST and "open a new session" in closed.value.reason


@dataclass
class Replica:
    """What placement reads of Serve's RunningReplica: its id and its last routing stats."""

    replica_id: ReplicaID
    routing_stats: dict


def replica(name: str, **stats) -> Replica:
    return Replica(ReplicaID(name, DEPLOYMENT), {"ready": True, "draining": False, "at": 100.0, **stats})


def test_placement_prefers_ready_replicas_with_the_most_free_sessions():
    """Then one that has not reported yet (just started by the autoscaler: it may have room), then a full
    one (it answers 503), then those that cannot take a session."""
    full, roomy, draining, new, loading = (replica("full", free_sessions=0, free_fps=0.0),
                                           replica("roomy", free_sessions=3, free_fps=75.0),
                                           replica("draining", free_sessions=9, draining=True),
                                           Replica(ReplicaID("new", DEPLOYMENT), {}),
                                           replica("loading", ready=False))
    order = placement_order([full, loading, draining, new, roomy], {})
    assert [r.replica_id.unique_id for r in order][:3] == ["roomy", "new", "full"]
    assert {r.replica_id.unique_id for r in order[3:]} == {"draining", "loading"}


def test_placement_counts_the_sessions_placed_that_a_replica_s_report_cannot_count_yet():
    """a's report is from t=100: a session still being made, or made after t=99.5, is not in it."""
    a, b = replica("a", free_sessions=2, free_fps=60.0), replica("b", free_sessions=2, free_fps=50.0)
    assert placement_order([a, b], {})[0] is a
    for pending in (None, 99.8, 100.2):  # being made; made just before the report, or after it
        assert placement_order([a, b], {a.replica_id: {"r1": pending}})[0] is b
    assert placement_order([a, b], {a.replica_id: {"r1": 98.0}})[0] is a, "made well before: counted already"
    full = replica("full", free_sessions=0, free_fps=90.0)  # a tie of free sessions: the one placed on least
    assert placement_order([full, b], {b.replica_id: {"r1": None, "r2": None}})[0] is full


def test_every_replica_s_metrics_in_one_exposition():
    text = ("# HELP lipstream_server_viewers connected viewers\n# TYPE lipstream_server_viewers gauge\n"
            'lipstream_server_viewers{transport="websocket"} {n}\n'
            "# HELP lipstream_frames_total frames\n# TYPE lipstream_frames_total counter\n"
            'lipstream_frames_total{kind="speech"} {m}\n')
    merged = merge_metrics({"r1": text.replace("{n}", "2").replace("{m}", "10"),
                            "r2": text.replace("{n}", "1").replace("{m}", "4")}).decode()
    assert merged.count("# TYPE lipstream_server_viewers gauge") == 1
    assert merged.count("# TYPE lipstream_frames_total counter") == 1
    assert 'lipstream_server_viewers{replica="r1",transport="websocket"} 2.0' in merged
    assert 'lipstream_frames_total{kind="speech",replica="r2"} 4.0' in merged


def context(sessions: list[float], room: list[float], target: int = 2) -> serve_config.AutoscalingContext:
    ids = [ReplicaID(f"r{i}", DEPLOYMENT) for i in range(len(sessions))]
    return serve_config.AutoscalingContext(
        deployment_id=DEPLOYMENT, deployment_name=DEPLOYMENT.name, app_name=DEPLOYMENT.app_name,
        current_num_replicas=len(ids), target_num_replicas=target, running_replicas=ids, total_num_requests=0.0,
        total_queued_requests=0.0, aggregated_metrics={"sessions": dict(zip(ids, sessions, strict=True)),
                                                       "room": dict(zip(ids, room, strict=True))},
        raw_metrics=None, capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=8, policy_state={},
        last_scale_up_time=None, last_scale_down_time=None, current_time=None, config=None)


def test_the_autoscaler_asks_for_the_replicas_the_sessions_need_with_room_for_one_more():
    assert replicas_needed(0, 4, 1) == 1 and replicas_needed(3, 4, 1) == 1 and replicas_needed(4, 4, 1) == 2
    policy = SessionsPolicy()
    assert policy(context([4.0, 4.0], [4.0, 4.0]))[0] == 3, "full: one more replica"
    assert policy(context([1.0, 0.0], [4.0, 4.0]))[0] == 1, "one session: one replica is enough"
    assert SessionsPolicy(sessions_per_replica=1)(context([1.0, 1.0], [4.0, 4.0]))[0] == 3
    assert policy(context([], [], target=2))[0] == 2, "no reports yet: keep the target"
