"""`lipstream bench cluster`: one `lipstream serve`, then one-replica clusters on a local Ray with the
frames through Serve's proxy and straight from the replica; every path's figures in the table and the
JSON, and what the cluster adds."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("ray.serve", reason="the cluster needs the `cluster` extra (Ray Serve)")

from lipstream.cli import main


@pytest.mark.slow
def test_the_cluster_bench_measures_every_path(tmp_path, capsys):
    assert main(["bench", "cluster", "--output-height", "360", "--sessions", "1", "--seconds", "2", "--setups", "2",
                 "--pings", "5", "--out-dir", str(tmp_path)]) == 0
    assert "| path | create ms |" in capsys.readouterr().out
    [path] = tmp_path.glob("cluster-*.json")
    doc = json.loads(path.read_text())
    assert doc["settings"]["frames"] == "patches" and doc["settings"]["output_height"] == 360
    rows = {row["path"]: row for row in doc["rows"]}
    measured = ["lipstream serve", "lipstream cluster, 1 replica, frames proxy",
                "lipstream cluster, 1 replica, frames direct"]
    assert set(measured) <= set(rows)
    for name in measured:
        row = rows[name]
        assert 0 < row["setup_ms"] < 10_000 and 0 < row["ping_ms"] < 1000, row
        assert 20 <= row["fps_per_session"] <= 30 and row["frame_kib"] > 0 and row["server_cpu_ms_per_frame"] > 0
    assert rows["lipstream cluster, 1 replica, frames proxy"]["proxy_cpu_ms_per_frame"] > 0
    assert {"added by the cluster, frames proxy", "added by the cluster, frames direct"} <= set(rows)
