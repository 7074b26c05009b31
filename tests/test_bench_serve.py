"""`lipstream bench serve --transport websocket`: `lipstream serve` started as a subprocess, one client
speaking to it over REST and WebSocket, its figures in the table and the JSON."""

from __future__ import annotations

import json

import pytest

from lipstream.cli import main


@pytest.mark.slow
def test_websocket_bench_measures_a_started_server(tmp_path, capsys):
    assert main(["bench", "serve", "--transport", "websocket", "--clients", "1", "--seconds", "4",
                 "--engine", "warp", "--utterance-s", "1.5", "--gap-s", "0.5", "--out-dir", str(tmp_path)]) == 0
    assert "| Clients | fps min |" in capsys.readouterr().out
    [path] = tmp_path.glob("serve-*.json")
    doc = json.loads(path.read_text())
    settings = doc["settings"]
    assert settings["transport"] == "websocket" and settings["engine"] == "warp"
    assert settings["avatar"] == "bench" and settings["frame_size"] == [1280, 720]
    [row] = doc["rows"]
    assert row["clients"] == 1 and 0 < row["fps_min"] <= 30
    assert row["utterances"] >= 1 and 0 < row["chunk_to_frame_ms_p50"] < 5000
    assert row["ready_to_frame_ms_p50"] is not None and row["ready_to_frame_ms_p50"] >= 0
    assert row["speech_frames"] > 0 and row["dropped_share"] <= 1
    assert row["batch_mean"] >= 1 and row["engine_ms_mean"] > 0 and row["late_ms_p95"] >= 0
