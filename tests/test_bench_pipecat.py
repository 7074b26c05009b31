"""`lipstream bench pipecat`: the service in-process and through a `lipstream serve` it starts, its
first-image latencies in the table and the JSON."""

from __future__ import annotations

import json

import pytest

from lipstream.cli import main


@pytest.mark.slow
def test_the_pipecat_bench_measures_both_transports(tmp_path, capsys):
    assert main(["bench", "pipecat", "--utterances", "2", "--utterance-s", "0.6", "--gap-s", "0.3", "--engine",
                 "warp", "--out-dir", str(tmp_path)]) == 0
    assert "| Transport | engine | utterances | first image ms p50 |" in capsys.readouterr().out
    [path] = tmp_path.glob("pipecat-*.json")
    doc = json.loads(path.read_text())
    assert doc["settings"]["utterances"] == 2 and doc["settings"]["rate"] == 24000
    assert [row["transport"] for row in doc["rows"]] == ["inprocess", "remote"]
    for row in doc["rows"]:
        assert row["engine"] == "warp" and row["utterances"] == 2 and len(row["first_image_ms"]) == 2
        assert 0 < row["first_image_ms_p50"] <= row["first_image_ms_p95"] <= row["first_image_ms_max"] < 2000
        assert row["ready_to_frame_ms_p50"] >= 0
