"""`lipstream bench soak` and `lipstream bench overload`: `lipstream serve` started as a subprocess,
clients speaking to it over REST and WebSocket, their figures in the table and the JSON (short runs)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lipstream.bench.soak import Watch, _find, onset_marker
from lipstream.cli import main


def test_a_watch_finds_utterance_onsets_and_the_av_offset():
    """Frames of 640 samples at 25 fps; an utterance whose first samples arrive 1 frame after the frame
    marked as its start shows an onset offset of 1 frame; audio and frames match: A/V offset 0."""
    rng = np.random.default_rng(0)
    speech = np.concatenate([np.zeros(100, np.int16), rng.integers(-9000, 9000, 4000).astype(np.int16)])
    stream = np.concatenate([np.zeros(640 * 10, np.int16), speech, np.zeros(640 * 40, np.int16)])
    head, head_at = onset_marker(speech)
    assert head_at >= 100 and np.abs(head[0]) > 2000
    watch = Watch(25)
    watch._started.append(9)  # the server said frame 9; the speech is in frame 10
    for index in range(stream.shape[0] // 640):
        watch.frame(index, stream[640 * index:640 * (index + 1)], float(index))
        watch.measure_onsets(head, head_at)
    assert watch.onsets == [1.0] and watch.av_offset_frames() == 0 and watch.missing == 0
    assert list(_find(stream, head)) == [6400 + head_at]


@pytest.mark.slow
def test_soak_bench_runs_sessions_and_samples_the_server(tmp_path, capsys):
    assert main(["bench", "soak", "--sessions", "1", "--minutes", "0.2", "--sample-s", "3", "--warmup-min", "0.05",
                 "--engine", "warp", "--utterance-s", "1.5", "--gap-s", "0.5", "--out-dir", str(tmp_path)]) == 0
    assert "| Sessions | Minutes | A/V offset (frames) |" in capsys.readouterr().out
    [path] = tmp_path.glob("soak-*.json")
    [row] = json.loads(path.read_text())["rows"]
    assert row["av_offset_frames"] == [0.0] and row["onsets_measured"] >= 1 and row["onset_offset_frames_max"] == 0
    assert row["missing_frames"] == 0 and row["speech_frames"] > 0
    assert len(row["series"]) >= 3 and all(s["rss_mb"] > 0 and s["threads"] > 0 and s["fds"] > 0 for s in row["series"])
    assert row["growth"]["rss_mb"]["change"] is not None


@pytest.mark.slow
def test_overload_bench_offers_more_sessions_than_the_server_holds(tmp_path, capsys):
    assert main(["bench", "overload", "--seconds", "4", "--stagger-s", "0.2", "--engine", "warp",
                 "--utterance-s", "1.5", "--gap-s", "0.5", "--out-dir", str(tmp_path)]) == 0
    assert "| Capacity (sessions) | Offered | Admitted |" in capsys.readouterr().out
    [path] = tmp_path.glob("overload-*.json")
    [row] = json.loads(path.read_text())["rows"]
    assert row["offered"] >= 2 * row["capacity_sessions"] and row["admitted"] >= 1
    assert row["refused"] >= 1 and row["admitted"] + row["refused"] == row["offered"]
    assert "at capacity" in row["refusal"] and row["speech_frames"] > 0
