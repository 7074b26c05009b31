"""Ray Serve's autoscaling policy for lipstream replicas: replicas by sessions.

Each replica reports (`LipstreamReplica.record_autoscaling_stats`) its open sessions and its room: the
sessions it could hold now (open + free, from its measured capacity or its setting max_sessions). The
policy asks for as many replicas as the open sessions need, plus room for `headroom` more sessions, at
the room a replica has (the median of the replicas' reports, or `sessions_per_replica` when given).
Serve bounds it by min/max replicas, waits upscale/downscale delays, and Ray's autoscaler adds nodes when
the new replicas' GPUs are not there. A replica Serve then stops drains first (see `replica`)."""

from __future__ import annotations

import math
import statistics
from typing import Any

from ray.serve.config import AutoscalingContext


def replicas_needed(sessions: float, room_per_replica: float, headroom: float) -> int:
    """Replicas that hold `sessions` with room for `headroom` more, at `room_per_replica` each (at least 1)."""
    return max(1, math.ceil((sessions + headroom) / max(room_per_replica, 1.0)))


class SessionsPolicy:
    """Serve's policy (`AutoscalingPolicy(policy_function=SessionsPolicy, policy_kwargs=...)`): called
    with Serve's AutoscalingContext, it returns (replicas wanted, its state). headroom: free sessions to
    keep; sessions_per_replica: a replica's room, instead of what the replicas report."""

    def __init__(self, headroom: float = 1.0, sessions_per_replica: float | None = None):
        self.headroom = headroom
        self.sessions_per_replica = sessions_per_replica

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        metrics = ctx.aggregated_metrics or {}
        sessions, room = metrics.get("sessions") or {}, metrics.get("room") or {}
        if not sessions:  # no reports yet (replicas starting): keep what was asked
            return ctx.target_num_replicas, {}
        per_replica = self.sessions_per_replica or statistics.median(room.values() or [1.0])
        return replicas_needed(sum(sessions.values()), per_replica, self.headroom), {}
