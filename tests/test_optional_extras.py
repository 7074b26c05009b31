"""The integrations stay optional: no module of lipstream but the integrations' own imports Pipecat or
LiveKit (the server's LiveKit endpoint included: it imports LiveKit only when it joins a room), and none
but the cluster's Ray modules imports Ray (the `lipstream cluster` command included: it imports Ray only
when it runs)."""

from __future__ import annotations

import subprocess
import sys

INTEGRATIONS = ("lipstream.integrations.pipecat", "lipstream.integrations.livekit")
RAY_MODULES = tuple(f"lipstream.cluster.{name}" for name in ("autoscale", "directory", "launch", "replica", "router"))

SCRIPT = f"""
import importlib, pkgutil, sys
import lipstream

def walk(package):
    for found in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        if found.name not in {INTEGRATIONS + RAY_MODULES!r}:
            module = importlib.import_module(found.name)
            yield found.name
            if found.ispkg:
                yield from walk(module)

names = list(walk(lipstream))
assert {{"lipstream.client", "lipstream.integrations.local", "lipstream.cli",
         "lipstream.server.livekit_rooms", "lipstream.cluster.cli", "lipstream.cluster.proxy"}} <= set(names)
print(len(names), sorted({{m.split(".")[0] for m in sys.modules}} & {{"pipecat", "livekit", "ray"}}))
"""


def test_the_core_never_imports_pipecat_livekit_or_ray():
    done = subprocess.run([sys.executable, "-c", SCRIPT], check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    count, imported = done.stdout.split(maxsplit=1)
    assert int(count) > 80 and imported.strip() == "[]", f"imported {imported.strip()} with the core"
