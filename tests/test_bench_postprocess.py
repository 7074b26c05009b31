"""`lipstream bench postprocess` on the CPU: every operation timed against the original in one run,
the verdicts printed, and the JSON written; and the interleaved timing it relies on."""

from __future__ import annotations

import json

from lipstream.bench.report import interleaved_median_ms
from lipstream.cli import main


def test_interleaved_median_ms_takes_turns():
    calls: list[str] = []
    medians = interleaved_median_ms([lambda: calls.append("a"), lambda: calls.append("b")], reps=5, warmup=1,
                                    block=2)
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 2 + ["a", "b"]
    assert len(medians) == 2 and all(m >= 0 for m in medians)


def test_postprocess_bench_writes_every_row(tmp_path, capsys):
    assert main(["bench", "postprocess", "--reps", "2", "--sizes", "720p", "--no-cuda",
                 "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| Operation | original (ms/frame) | lipstream (ms/frame) | speedup |" in out
    assert "720p CPU pipeline, in place, batch 1:" in out and "no CUDA device" in out
    [path] = tmp_path.glob("postprocess-*.json")
    doc = json.loads(path.read_text())
    assert doc["settings"]["sizes"] == ["720p"] and doc["settings"]["cuda"] is False
    got = {(r["operation"], r["impl"], r["batch"]) for r in doc["rows"]}
    assert got == {(op, impl, 1) for op in ("resize", "unsharp", "blend", "pipeline") for impl in ("numpy", "torch-cpu")} | {
        ("pipeline, in place", "numpy", 1), ("frame copy alone", "numpy", 1),
        ("pipeline, a batch over all cores", "numpy", 16),
        ("pipeline, frame on device", "torch-cpu", 16), ("compositor patches", "numpy", 16)}
    for row in doc["rows"]:
        assert row["original_ms"] > 0 and row["lipstream_ms"] > 0
        assert abs(row["speedup"] - row["original_ms"] / row["lipstream_ms"]) < 1e-9
