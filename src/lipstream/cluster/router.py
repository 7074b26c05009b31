"""Ray Serve's request router for lipstream replicas: placement by free capacity, and session affinity.

It reads the routing key the proxy middleware put in Serve's session header (`affinity`):
- a request of a session or job goes to the replica whose name (its Serve replica id) the key is; when
  that replica is gone, to any replica, which answers 404 (the session ended with its replica);
- a request that makes a session or a job goes to the ready, not draining replica with the most free
  sessions, as each replica last reported them (`LipstreamReplica.record_routing_stats`, every
  `STATS_PERIOD_S`, stamped with the wall time), less the sessions this router placed on it that the
  report cannot count yet; a replica that has not reported yet (just started) comes next; when every
  replica is full one of them answers 503 with Retry-After;
- anything else goes to any replica (Serve's own choice among them by queue length)."""

from __future__ import annotations

import time
from collections import defaultdict

from ray.serve.experimental.consistent_hash_router import ConsistentHashRouter
from ray.serve.request_router import PendingRequest, ReplicaID, RunningReplica

from lipstream.cluster.affinity import PLACE

STATS_PERIOD_S = 1.0
IN_FLIGHT_S = 0.5  # a session made this long before a replica's report may not be in it yet
PLACED_KEPT_S = 60.0  # placements done longer ago than any report in flight are forgotten

Placements = dict[ReplicaID, dict[str, float | None]]  # replica -> {request id: when it completed, None: not yet}


def placement_order(replicas: list[RunningReplica], placed: Placements) -> list[RunningReplica]:
    """`replicas` best first for a new session: those ready, not draining and with room first, then those
    that have not reported yet (just started: they may have room), then the full ones (they answer 503),
    then those not ready or draining. Within each, by free sessions (less the sessions placed on it that
    its report may not count yet: still being made, or made less than IN_FLIGHT_S before it), then by
    fewest such sessions (reports lag: spread the ties), then by free frames/s."""
    def rank(replica: RunningReplica) -> tuple:
        stats = replica.routing_stats or {}
        since = stats.get("at", 0.0) - IN_FLIGHT_S
        pending = sum(1 for done in placed.get(replica.replica_id, {}).values() if done is None or done > since)
        free = stats.get("free_sessions", 0) - pending
        if not stats:
            tier = 1
        elif not stats.get("ready") or stats.get("draining"):
            tier = 3
        else:
            tier = 0 if free > 0 else 2
        return (tier, -free, pending, -stats.get("free_fps", 0.0))

    return sorted(replicas, key=rank)


class SessionRouter(ConsistentHashRouter):
    """See the module's doc. Configured with `RequestRouterConfig(request_router_class=SessionRouter)`.

    It is Serve's ConsistentHashRouter with its choice of replicas replaced: what it keeps is that
    router's loop, made for affinity: the task that took a request routes that request until it is
    routed (the base loop may leave it to another task, which can orphan it under a burst of requests)."""

    def initialize_state(self, **kwargs) -> None:
        super().initialize_state(**kwargs)
        self._placed: Placements = defaultdict(dict)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        key = pending_request.metadata.session_id if pending_request is not None else ""
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # no busy loop while a replica is saturated
        if key == PLACE:
            return [[replica] for replica in placement_order(candidate_replicas, self._placed)]
        if key:
            owner = [replica for replica in candidate_replicas if replica.replica_id.unique_id == key]
            if owner:
                return [owner]
        return [candidate_replicas]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        if pending_request.metadata.session_id == PLACE:
            now = time.time()
            placed = self._placed[replica_id]
            for request_id in [r for r, done in placed.items() if done is not None and now - done > PLACED_KEPT_S]:
                del placed[request_id]
            placed[pending_request.metadata.internal_request_id] = None

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        placed = self._placed.get(replica_id)
        if placed is not None and internal_request_id in placed:
            placed[internal_request_id] = time.time()
