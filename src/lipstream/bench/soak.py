"""`lipstream bench soak`: N sessions speaking for T minutes through a real server; does it stay in
sync and does nothing grow?

Each client opens a session over REST, connects its WebSocket and speaks synthetic speech at real-time
pace (utterances of `--utterance-s`, each ended, `--gap-s` apart: the client code of `bench serve`),
reading every frame. The server is `lipstream serve` started here, without admission control (or
`--url`/`--key`), through `lipstream.client`, and every
`--sample-s` seconds the benchmark records its resident memory, threads and open file descriptors
(from /proc: Linux) and the sessions' frame counters.

Figures:
- A/V offset at the end, in frames: the audio samples received minus those the frames received own
  (frame k owns floor(k*16000/fps) on), over 16000/fps; 0 when sound and video share one clock.
- speech onset offset, in frames: where each utterance's first sample arrives in the audio stream,
  relative to the start of the frame that the server marks as its first (speech_started); 0 when the
  mouth starts with the sound.
- dropped frames (speech frames shown without their face) as a share of speech frames, stalled
  frames, frames missing from the sequence, frames/s per session;
- RSS (MB), threads and fds over time, and their change from the end of `--warmup-min` to the end.
Targets (issue 13): 2 sessions for 30 minutes on a 2-core CPU: the offsets stay 0 and nothing grows
after warm-up."""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lipstream.bench.postprocess import FRAME_SIZES
from lipstream.bench.report import device_name, format_table, write_results
from lipstream.bench.serve import (
    _speak,
    pick_avatar,
    result_device,
    server_for,
    server_settings,
    speech_clips,
)
from lipstream.errors import LipstreamError

if TYPE_CHECKING:
    from lipstream.client import LipstreamClient

SAMPLE_RATE = 16000
ONSET_SAMPLES = 320  # an utterance is found in the audio stream by 20 ms of it
WINDOW_S = 4.0  # received audio kept to find utterance starts in


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_client_arguments(parser)
    parser.add_argument("--sessions", type=int, default=2, help="simultaneous speaking sessions (default 2)")
    parser.add_argument("--minutes", type=float, default=30.0, help="length of the run (default 30)")
    parser.add_argument("--sample-s", type=float, default=10.0, help="seconds between samples of the "
                                                                     "server process (default 10)")
    parser.add_argument("--warmup-min", type=float, default=2.0, help="growth is counted from this long "
                                                                      "after the start (default 2)")


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    """What `bench soak` and `bench overload` share: the server and the speech."""
    parser.add_argument("--url", default=None, help="a running server, e.g. http://host:2160 (default: start "
                                                    "`lipstream serve` on a free local port)")
    parser.add_argument("--key", default=None, help="the API key for --url")
    parser.add_argument("--avatar", default=None, help="the avatar to show with --url (default: the key's first)")
    parser.add_argument("--engine", choices=("auto", "warp", "musetalk"), default="auto",
                        help="engine of the started server (auto: musetalk when its weights are installed)")
    parser.add_argument("--models", default=None, help="MuseTalk weights folder (default LIPSTREAM_MODELS or ./models)")
    parser.add_argument("--device", default=None, help="the started server's device")
    parser.add_argument("--compile", default=None, choices=["default", "reduce-overhead", "max-autotune"],
                        help="torch.compile mode of the started server's MuseTalk")
    parser.add_argument("--size", choices=sorted(FRAME_SIZES), default="720p", help="bench avatar frame size")
    parser.add_argument("--fps", type=int, default=25)
    parser.add_argument("--chunk-ms", type=float, default=20.0, help="audio chunk length (default 20)")
    parser.add_argument("--utterance-s", type=float, default=3.0, help="length of each utterance (default 3)")
    parser.add_argument("--gap-s", type=float, default=1.0, help="quiet between utterances (default 1)")
    parser.add_argument("--max-batch", type=int, default=16, help="the started server's batch bound")
    parser.add_argument("--max-wait-ms", type=float, default=4.0, help="the started server's batch fill wait")
    parser.add_argument("--out-dir", default=None, help="where to write the JSON (default bench/results)")


# ---- one speaking client ----------------------------------------------------------------------------

@dataclass
class Watch:
    """What one client saw of its session. Times: time.monotonic()."""

    fps: int
    frames: int = 0
    samples: int = 0  # audio samples received
    missing: int = 0  # frame indices skipped
    first_at: float | None = None
    last_at: float | None = None
    onsets: list[float] = field(default_factory=list)  # speech onset offsets, frames
    _window: deque = field(default_factory=deque)  # (first sample position, int16 [n]) of recent frames
    _started: deque = field(default_factory=deque)  # frame indices of speech_started not measured yet

    def frame(self, index: int, audio: np.ndarray, now: float) -> None:
        self.missing += max(0, index - self.frames)
        self.frames = index + 1
        self.first_at = self.first_at or now
        self.last_at = now
        self._window.append((self.samples, audio))
        self.samples += audio.shape[0]
        while self._window and self.samples - self._window[0][0] > WINDOW_S * SAMPLE_RATE:
            self._window.popleft()

    def measure_onsets(self, head: np.ndarray, head_at: int = 0) -> None:
        """Find the utterances started a second ago or more by their samples `head` (int16 [m]), which
        come `head_at` samples after an utterance's first."""
        while self._started and self.frames - self._started[0] > self.fps:
            index = self._started.popleft()
            start = index * SAMPLE_RATE // self.fps + head_at
            if not self._window or self._window[0][0] > start:
                continue  # fell out of the window (a stall): not measured
            base = self._window[0][0]
            audio = np.concatenate([a for _, a in self._window])
            found = _find(audio, head)
            if found.size:
                nearest = base + found[np.argmin(np.abs(base + found - start))]
                self.onsets.append((nearest - start) * self.fps / SAMPLE_RATE)

    def av_offset_frames(self) -> float:
        """Audio received beyond what the frames received own, in frames (0: one clock)."""
        return (self.samples - self.frames * SAMPLE_RATE // self.fps) * self.fps / SAMPLE_RATE


def _find(audio: np.ndarray, head: np.ndarray) -> np.ndarray:
    """Start positions of `head` in `audio` (int16 arrays; `head` should start with loud samples, so
    that few positions match its first two)."""
    m = head.shape[0]
    if audio.shape[0] < m:
        return np.zeros(0, np.int64)
    last = audio.shape[0] - m + 1
    candidates = np.flatnonzero((audio[:last] == head[0]) & (audio[1:last + 1] == head[1]))
    return np.array([i for i in candidates if np.array_equal(audio[i:i + m], head)], np.int64)


def onset_marker(speech: np.ndarray) -> tuple[np.ndarray, int]:
    """(samples an utterance of `speech` is found by, where they start in it): its first loud stretch."""
    at = int(np.argmax(np.abs(speech.astype(np.int32)) > 2000))
    return speech[at:at + ONSET_SAMPLES], at


async def speak_and_watch(client: LipstreamClient, session: dict, speech: np.ndarray, args: argparse.Namespace,
                          stop_at: float, rng: random.Random) -> tuple[Watch, dict]:
    """Speak `speech` (int16 [n]) over the session's WebSocket at real-time pace until `stop_at`,
    reading every frame. Returns (what was seen, the session's stats at the end: {} if it closed)."""
    watch = Watch(args.fps)
    head, head_at = onset_marker(speech)
    remote = await client.connect(session)

    async def send(chunk: np.ndarray | None) -> None:
        await (remote.end_speech() if chunk is None else remote.push_audio(chunk))

    producer = asyncio.create_task(_speak(send, speech, args, stop_at, rng, deque()))
    final: asyncio.Task | None = None  # the session's stats at stop_at, asked for while still reading
    try:
        async for frame in remote.frames(color=None):
            now = time.monotonic()
            if final is None and now >= stop_at:
                final = asyncio.create_task(remote.stats())
            if final is not None and final.done():
                break
            if "speech_started" in frame.events:
                watch._started.append(frame.index)
            if final is None:
                watch.frame(frame.index, frame.audio, now)
                watch.measure_onsets(head, head_at)
    finally:
        producer.cancel()
    try:
        stats = await (final if final is not None else remote.stats())
    except LipstreamError:
        stats = {}
    await remote.aclose()
    return watch, stats


# ---- the server process ------------------------------------------------------------------------------

def process_sample(pid: int) -> dict:
    """Resident memory (MB), threads and open file descriptors of process `pid` (Linux /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {"rss_mb": int(fields["VmRSS"].split()[0]) / 1024, "threads": int(fields["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def _growth(series: list[dict], key: str, since_s: float) -> dict:
    """Change of `key` from the first sample at or after `since_s` to the last, and its slope per
    minute over those samples (least squares)."""
    after = [s for s in series if s["t"] >= since_s and s.get(key) is not None]
    if len(after) < 2:
        return {"from": None, "to": None, "change": None, "per_min": None}
    t = np.array([s["t"] for s in after]) / 60
    v = np.array([s[key] for s in after], float)
    return {"from": v[0], "to": v[-1], "change": float(v[-1] - v[0]), "per_min": float(np.polyfit(t, v, 1)[0])}


# ---- the run --------------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    if args.url is None and not Path("/proc/self/status").exists():
        raise LipstreamError("bench soak samples the server process from /proc: run it on Linux")
    args.clients = [args.sessions]  # what spawned_server sizes its per-key session limit by
    # its N sessions are what it measures: the server does not refuse them (admission: bench overload)
    with server_for(args, admission_control=False) as (url, key, pid):
        result = asyncio.run(_soak(args, url, key, pid))
    summary = result["summary"]
    print(format_table(
        ["Sessions", "Minutes", "A/V offset (frames)", "onset offset (frames)", "dropped", "stalled", "missing",
         "fps min", "RSS MB", "threads", "fds"],
        [[args.sessions, args.minutes, summary["av_offset_frames_max"], summary["onset_offset_frames_max"],
          f"{summary['dropped_frames']} ({summary['dropped_share']:.2%})", summary["stalled_frames"],
          summary["missing_frames"], summary["fps_min"],
          *(_change(summary["growth"][key]) for key in ("rss_mb", "threads", "fds"))]]))
    settings = {key: getattr(args, key) for key in ("sessions", "minutes", "sample_s", "warmup_min", "size", "fps",
                                                    "chunk_ms", "utterance_s", "gap_s", "max_batch", "max_wait_ms")}
    settings.update(result["settings"], cpu=device_name("cpu"))
    path = write_results("soak", result_device(result["device"]), settings, [{**summary, "series": result["series"]}],
                         Path(args.out_dir) if args.out_dir else None)
    print(f"results written to {path}")
    return 0


def _change(growth: dict) -> str:
    if growth["from"] is None:
        return "-"
    return f"{growth['from']:.0f} -> {growth['to']:.0f}"


async def _soak(args: argparse.Namespace, url: str, key: str, pid: int | None) -> dict:
    from lipstream.client import LipstreamClient

    speech = speech_clips(args)
    async with LipstreamClient(url, key, timeout_s=30) as client:
        ready = await client.wait_ready(30)
        avatar = pick_avatar(await client.avatars(), args.avatar)
        print(f"{ready['reason']}; avatar {avatar['name']} ({avatar['width']}x{avatar['height']}); "
              f"{args.sessions} sessions for {args.minutes:g} min", flush=True)
        sessions = [await client.create_session(avatar["name"], fps=args.fps) for _ in range(args.sessions)]
        began = time.monotonic()
        stop_at = began + 60 * args.minutes
        rng = random.Random(0)
        clients = [asyncio.create_task(speak_and_watch(client, session, speech[i % len(speech)], args, stop_at, rng))
                   for i, session in enumerate(sessions)]
        series = await _sample_until(client, pid, sessions, began, stop_at, args.sample_s)
        results = await asyncio.gather(*clients)
    return {"summary": _summary(results, series, args), "series": series, "device": ready["device"],
            "settings": server_settings(args, avatar, ready)}


async def _sample_until(client: LipstreamClient, pid: int | None, sessions: list[dict], began: float, stop_at: float,
                        every_s: float) -> list[dict]:
    """Samples of the server process and the sessions' counters every `every_s` until `stop_at`."""
    series = []
    while True:
        sample = {"t": round(time.monotonic() - began, 1), **(process_sample(pid) if pid else {})}
        totals = dict.fromkeys(("frames_sent", "speech_frames", "dropped_frames", "stalled_frames"), 0)
        for session in sessions:
            try:
                stats = await client.session_stats(session["id"])
            except LipstreamError:  # closed
                continue
            for name in totals:
                totals[name] += stats[name]
        series.append({**sample, **totals})
        print(" ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in series[-1].items()),
              flush=True)
        if time.monotonic() + every_s > stop_at:
            break
        await asyncio.sleep(every_s)
    return series


def frame_figures(results: list[tuple[Watch, dict]]) -> tuple[dict, list[float]]:
    """The frame figures of `speak_and_watch` results: ({speech_frames, dropped_frames, dropped_share,
    stalled_frames} summed over the sessions' stats, the frames/s of each session that saw 2 frames or more)."""
    stats = [s for _, s in results]
    speech_frames = sum(s.get("speech_frames", 0) for s in stats)
    dropped = sum(s.get("dropped_frames", 0) for s in stats)
    fps = [(w.frames - 1) / (w.last_at - w.first_at) for w, _ in results if w.frames > 1 and w.last_at > w.first_at]
    return {"speech_frames": speech_frames, "dropped_frames": dropped,
            "dropped_share": dropped / speech_frames if speech_frames else 0.0,
            "stalled_frames": sum(s.get("stalled_frames", 0) for s in stats)}, fps


def _summary(results: list[tuple[Watch, dict]], series: list[dict], args: argparse.Namespace) -> dict:
    watches = [watch for watch, _ in results]
    figures, fps = frame_figures(results)
    onsets = [o for watch in watches for o in watch.onsets]
    warmup_s = 60 * args.warmup_min
    return {
        "av_offset_frames": [w.av_offset_frames() for w in watches],
        "av_offset_frames_max": max((abs(w.av_offset_frames()) for w in watches), default=None),
        "onsets_measured": len(onsets),
        "onset_offset_frames_max": max((abs(o) for o in onsets), default=None),
        "onset_offset_frames_last": [w.onsets[-1] if w.onsets else None for w in watches],
        "frames": sum(w.frames for w in watches),
        "missing_frames": sum(w.missing for w in watches),
        **figures,
        "rebases": sum(s.get("rebases", 0) for _, s in results),
        "fps_min": min(fps, default=None),
        "growth": {key: _growth(series, key, warmup_s) for key in ("rss_mb", "threads", "fds")},
    }
