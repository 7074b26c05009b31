"""The integrations stay optional: no module of lipstream but the integrations' own imports Pipecat."""

from __future__ import annotations

import subprocess
import sys

INTEGRATIONS = ("lipstream.integrations.pipecat",)

SCRIPT = f"""
import importlib, pkgutil, sys
import lipstream
names = [m.name for m in pkgutil.walk_packages(lipstream.__path__, "lipstream.") if m.name not in {INTEGRATIONS!r}]
for name in names:
    importlib.import_module(name)
assert "lipstream.client" in names and "lipstream.integrations.local" in names and "lipstream.cli" in names
print(len(names), sorted({{m.split(".")[0] for m in sys.modules}} & {{"pipecat", "livekit", "ray"}}))
"""


def test_the_core_never_imports_pipecat():
    done = subprocess.run([sys.executable, "-c", SCRIPT], check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    count, imported = done.stdout.split(maxsplit=1)
    assert int(count) > 80 and imported.strip() == "[]", f"imported {imported.strip()} with the core"
