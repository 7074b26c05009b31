"""The cluster's directory: a small named Ray actor where every replica reports itself each second
(its name, node, process, readiness, free capacity and sessions), so that any replica can answer for
all of them (/ready, /metrics), and through which `lipstream cluster` tells the replicas it is stopping
(a draining replica then stops waiting for its sessions).

A replica not heard from for `STALE_S` is left out (it died; Ray Serve starts another, which reports
under its own name)."""

from __future__ import annotations

import time

import ray

NAME = "lipstream-directory"
NAMESPACE = "lipstream"
STALE_S = 3.0


@ray.remote(num_cpus=0, max_restarts=-1)
class Directory:
    def __init__(self):
        self._replicas: dict[str, tuple[float, dict]] = {}
        self._stopping = False

    def report(self, name: str, info: dict) -> bool:
        """Replica `name` is alive and `info` is its state; returns whether the cluster is stopping."""
        self._replicas[name] = (time.monotonic(), info)
        return self._stopping

    def leave(self, name: str) -> None:
        self._replicas.pop(name, None)

    def replicas(self) -> dict[str, dict]:
        """{name: info} of the replicas heard from in the last STALE_S seconds."""
        now = time.monotonic()
        for name in [n for n, (at, _) in self._replicas.items() if now - at > STALE_S]:
            del self._replicas[name]
        return {name: info for name, (_, info) in self._replicas.items()}

    def stop(self) -> None:
        """The cluster is stopping: draining replicas close their sessions now."""
        self._stopping = True


def directory() -> ray.actor.ActorHandle:
    """The cluster's directory, started if it does not run (detached: it outlives the command)."""
    return Directory.options(name=NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True).remote()
