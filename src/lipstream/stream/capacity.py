"""How many sessions a server can hold: its capacity, its sessions' load, and admission.

Two kinds of resource bound a server, each a share of time per second:

- `cpu`: the host's cores available to this process (its CPU affinity and cgroup quota). Every stage
  that runs on the host shares them: a CPU engine and its audio features, CPU compositing, JPEG
  encoding, and the per-frame work of the event loop and transports; and other processes take some.
- `engine:<name>`: each engine's device time. Its batches run one at a time on one worker thread, and
  on a GPU its compositing and audio features share that device.

What a frame costs of each is measured, not assumed: `calibrate` times every stage on a synthetic
720p avatar when an engine starts (the engine at batch 1 and at `max_batch`, compositing, encoding,
live audio features), and the running server keeps the figures current (moving averages) from the
stages' own timings (`observe_*` with a `Timing`, fed by the scheduler and the encoding pool). A
stage on the host is charged the CPU time of the thread that ran it (which, unlike its wall time,
does not grow when the cores are contended); a stage on a GPU its wall time. `sample()`, called
every second, adds what no stage accounts for: the process's CPU time per frame beyond its stages'
(the event loop, packing and sending frames, the helper threads of multi-threaded stages), and the
cores other processes keep busy.

A session is counted as if it always spoke (its worst case): fps x (engine + features + compositing
+ encoding + per-frame overhead) of `cpu` for the host stages, fps x its device stages of its engine,
the engine's cost per frame taken at the batch size that as many sessions fill (up to `max_batch`).
`admit` refuses (OverloadedError) a session that would take any resource past `target` of it (for
`cpu`: past `target` of the cores, counting what other processes take), so that the admitted sessions
keep their deadlines, and any session while the open ones are missing frames (a frame shed or shown
without its face in the last seconds: the model's figures are then too low, whatever they say); a
server without sessions admits one that fits `target` of its machine however busy other processes
keep it. `report()` gives the free capacity in units a cluster can compare: frames per second and
sessions at a reference size (720p at the default frame rate).

Thread-safe: stages report from their worker threads."""

from __future__ import annotations

import functools
import logging
import math
import os
import statistics
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from prometheus_client import REGISTRY

from lipstream.engines.base import Engine, take
from lipstream.errors import OverloadedError

log = logging.getLogger(__name__)
T = TypeVar("T")

REFERENCE_FRAME = (720, 1280)  # (height, width) free sessions are counted at
OVERHEAD_PRIOR_S = 0.002  # per-frame host work no stage accounts for, until measured (1-2 ms at 720p on a 2-core Xeon)
OVERHEAD_SAMPLES = 30  # per-second samples its estimate is the median of
OTHERS_SAMPLES = 30  # per-second samples of other processes' use; its estimate is their 80th percentile
ALPHA = 0.1  # weight of a new measurement in the moving averages
RETRY_AFTER_S = 10  # sessions last minutes: a refused client should not retry at once
BEHIND_HOLD_S = 2.0  # how long after a shed or dropped frame the live sessions count as behind


@dataclass(frozen=True)
class Timing:
    """How long one stage call took: wall seconds, and CPU seconds of the thread that made it."""

    wall: float
    cpu: float


def timed(fn: Callable[..., T], *args) -> tuple[T, Timing]:
    """fn(*args) and how long it took."""
    wall, cpu = time.perf_counter(), time.thread_time()
    result = fn(*args)
    return result, Timing(time.perf_counter() - wall, time.thread_time() - cpu)


@dataclass(frozen=True)
class Demand:
    """What one session asks of the server. engine: its engine's name. fps: its frame rate.
    frame_pixels: H*W of its avatar's frames (compositing); output_pixels: of the streamed frames (encoding)."""

    engine: str
    fps: int
    frame_pixels: int
    output_pixels: int


class _Average:
    """An exponential moving average (None until the first value)."""

    def __init__(self, value: float | None = None):
        self.value = value

    def add(self, x: float) -> None:
        self.value = x if self.value is None else self.value + ALPHA * (x - self.value)


@dataclass
class _EngineCosts:
    """An engine's measured costs. on_host: the engine and its features run on the host CPU;
    composite_on_host: its compositor does."""

    on_host: bool
    composite_on_host: bool
    calls: dict[int, _Average] = field(default_factory=dict)  # batch size -> seconds of one generate call
    features: _Average = field(default_factory=_Average)  # seconds per frame of live features
    composite: _Average = field(default_factory=_Average)  # seconds per frame per pixel
    features_pending_s: float = 0.0  # time of the passes that gave no frame yet

    def per_frame(self, batch: int) -> float:
        """Engine seconds per frame in batches of `batch`: a straight line a + c*b through the
        measured batch sizes (one size: proportional)."""
        sizes = sorted(b for b, average in self.calls.items() if average.value is not None)
        if not sizes:
            return 0.0
        if len(sizes) == 1:
            return self.calls[sizes[0]].value / sizes[0]
        b = np.array(sizes, float)
        t = np.array([self.calls[s].value for s in sizes])
        slope, intercept = np.polyfit(b, t, 1)
        slope = max(slope, 0.0)
        intercept = max(intercept, 0.0)
        return (intercept + slope * batch) / batch

    def host_s(self, demand: Demand, engine_s: float) -> float:
        """Host seconds per frame of the engine's own stages (not encoding or overhead)."""
        seconds = (engine_s + (self.features.value or 0.0)) if self.on_host else 0.0
        if self.composite_on_host:
            seconds += (self.composite.value or 0.0) * demand.frame_pixels
        return seconds

    def device_s(self, demand: Demand, engine_s: float) -> float:
        """Device seconds per frame: the engine, and on a GPU its features and compositing."""
        seconds = engine_s + (0.0 if self.on_host else self.features.value or 0.0)
        if not self.composite_on_host:
            seconds += (self.composite.value or 0.0) * demand.frame_pixels
        return seconds


def host_cores() -> float:
    """The cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota if any."""
    try:
        cores = float(len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        cores = float(os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, int(quota) / int(period))
    except (OSError, ValueError):
        pass
    return cores


def _busy_seconds() -> float | None:
    """CPU seconds spent busy (everything but idle and I/O wait) since boot on the cores this process
    may use, by every process; None where /proc/stat is not there."""
    try:
        allowed = os.sched_getaffinity(0)
        ticks = os.sysconf("SC_CLK_TCK")
        busy = 0
        for line in Path("/proc/stat").read_text().splitlines():
            name, *values = line.split()
            if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in allowed:
                continue
            numbers = [int(v) for v in values[:8]]
            busy += sum(numbers) - numbers[3] - numbers[4]  # idle, iowait
        return busy / ticks
    except (OSError, ValueError, AttributeError):
        return None


def _frames_shown() -> float:
    """Frames all sessions of this process have shown (the Prometheus counter of session frames)."""
    return sum(REGISTRY.get_sample_value("lipstream_frames_total", {"kind": kind}) or 0.0
               for kind in ("speech", "idle"))


def _frames_late() -> float:
    """Speech frames all sessions of this process showed without their face."""
    return REGISTRY.get_sample_value("lipstream_dropped_frames_total") or 0.0


class Capacity:
    """target: the share of each resource admitted sessions may use (0..1]. max_batch: the schedulers'
    batch bound. fps / output_height: the session free capacity is counted in: 720p frames at `fps`,
    streamed at `output_height` (0: 720), on the first engine added. cores: the host's cores (default
    `host_cores()`). max_sessions: a hard cap on the sessions admitted at once, whatever they measure
    (None: none). now: the clock."""

    def __init__(self, *, target: float = 0.75, max_batch: int = 16, fps: int = 25, output_height: int = 0,
                 cores: float | None = None, max_sessions: int | None = None,
                 now: Callable[[], float] = time.monotonic):
        if not 0 < target <= 1:
            raise ValueError(f"target must be in (0, 1], got {target}")
        self.target = target
        self.max_batch = max_batch
        self.max_sessions = max_sessions
        self.cores = cores if cores is not None else host_cores()
        height = output_height or REFERENCE_FRAME[0]
        self._reference_shape = (fps, height * round(REFERENCE_FRAME[1] * height / REFERENCE_FRAME[0] / 2) * 2)
        self.reference: Demand | None = None
        self.now = now
        self._lock = threading.Lock()
        self._engines: dict[str, _EngineCosts] = {}
        self._encode = _Average()  # seconds per output pixel
        self._residuals: deque[float] = deque(maxlen=OVERHEAD_SAMPLES)  # host s per frame no stage accounts for
        self._others: deque[float] = deque(maxlen=OTHERS_SAMPLES)  # cores other processes kept busy, per second
        self._host_stage_s = 0.0  # host stage seconds since the last sample
        self._sessions: dict[str, Demand] = {}
        self._behind_until = -math.inf
        self._last: tuple[float, float, float, float | None, float] | None = None  # now, cpu, frames, busy, late
        self.shed = 0

    # ---- what the stages report --------------------------------------------------------------

    def add_engine(self, name: str, *, on_host: bool, composite_on_host: bool) -> None:
        """Register an engine (its stages' placement) before its costs are reported."""
        with self._lock:
            self._engines.setdefault(name, _EngineCosts(on_host, composite_on_host))
            if self.reference is None:
                fps, output_pixels = self._reference_shape
                self.reference = Demand(name, fps, REFERENCE_FRAME[0] * REFERENCE_FRAME[1], output_pixels)

    def observe_engine(self, engine: str, frames: int, timing: Timing) -> None:
        """One generate call of `frames` frames took `timing`."""
        with self._lock:
            costs = self._engines[engine]
            costs.calls.setdefault(frames, _Average()).add(timing.cpu if costs.on_host else timing.wall)
            if costs.on_host:
                self._host_stage_s += timing.cpu

    def observe_features(self, engine: str, frames: int, timing: Timing) -> None:
        """One live feature pass gave `frames` frames (maybe 0) in `timing`."""
        with self._lock:
            costs = self._engines[engine]
            costs.features_pending_s += timing.cpu if costs.on_host else timing.wall
            if frames:
                costs.features.add(costs.features_pending_s / frames)
                costs.features_pending_s = 0.0
            if costs.on_host:
                self._host_stage_s += timing.cpu

    def observe_composite(self, engine: str, frames: int, pixels: int, timing: Timing) -> None:
        """Compositing `frames` frames of `pixels` pixels each took `timing`."""
        with self._lock:
            costs = self._engines[engine]
            costs.composite.add((timing.cpu if costs.composite_on_host else timing.wall) / frames / pixels)
            if costs.composite_on_host:
                self._host_stage_s += timing.cpu

    def observe_encode(self, pixels: int, timing: Timing) -> None:
        """Encoding one streamed frame of `pixels` pixels took `timing` (on the host)."""
        with self._lock:
            self._encode.add(timing.cpu / pixels)
            self._host_stage_s += timing.cpu

    def observe_shed(self, frames: int) -> None:
        """The scheduler dropped `frames` frames that could not be ready in time."""
        with self._lock:
            self.shed += frames
            self._behind_until = self.now() + BEHIND_HOLD_S

    def sample(self) -> None:
        """Measure what the stages do not time (call it about once a second, from one thread): the
        process's CPU per frame beyond its stages' time, and the cores other processes keep busy."""
        now, cpu, frames, busy, late = self.now(), time.process_time(), _frames_shown(), _busy_seconds(), _frames_late()
        with self._lock:
            last, self._last = self._last, (now, cpu, frames, busy, late)
            stage_s, self._host_stage_s = self._host_stage_s, 0.0
            if last is None or now <= last[0]:
                return
            dt, used, shown = now - last[0], cpu - last[1], frames - last[2]
            if late > last[4]:
                self._behind_until = now + BEHIND_HOLD_S
            if shown >= 5:
                self._residuals.append(max(0.0, (used - stage_s) / shown))
            if busy is not None and last[3] is not None:
                self._others.append(max(0.0, (busy - last[3] - used) / dt))

    # ---- what the server asks ----------------------------------------------------------------

    def admit(self, demand: Demand, *, enforce: bool = True) -> str:
        """Count a new session's demand; returns the ticket to `release` it with. Raises
        OverloadedError when it does not fit (with `enforce`; without, it is only counted), and when
        `max_sessions` are open (always)."""
        with self._lock:
            if demand.engine not in self._engines:
                raise ValueError(f"engine {demand.engine!r} was not added")
            if self.max_sessions is not None and len(self._sessions) >= self.max_sessions:
                raise OverloadedError(f"this server is at capacity: it holds {len(self._sessions)} sessions, the most "
                                      "it may (setting max_sessions); try again in a while, or another server",
                                      RETRY_AFTER_S)
            if enforce:
                self._check(demand)
            ticket = uuid.uuid4().hex
            self._sessions[ticket] = demand
            return ticket

    def release(self, ticket: str) -> None:
        """The session of `ticket` closed (idempotent)."""
        with self._lock:
            self._sessions.pop(ticket, None)

    def behind(self) -> bool:
        """Whether live sessions are behind: a frame was shed or shown late in the last seconds.
        Background work (avatar preparation) pauses while they are."""
        with self._lock:
            return self.now() < self._behind_until

    @property
    def others(self) -> float:
        """Cores other processes keep busy: the 80th percentile of the last seconds (they come and go;
        a session admitted now must keep its frame rate when they come back)."""
        if not self._others:
            return 0.0
        ranked = sorted(self._others)
        return ranked[min(len(ranked) - 1, int(0.8 * len(ranked)))]

    @property
    def overhead_s(self) -> float:
        """Host seconds per frame that no stage accounts for: the median of the last samples (one-off
        work, like loading an avatar, does not move it), OVERHEAD_PRIOR_S before there are a few."""
        if len(self._residuals) < 3:
            return OVERHEAD_PRIOR_S
        return statistics.median(self._residuals)

    def report(self) -> dict:
        """The capacity as the server reports it (GET /api/capacity): the free frames per second and
        sessions at the reference size and rate, the load and budget of each resource, the per-frame
        costs in ms, the cores, and the sessions counted."""
        with self._lock:
            ref = self.reference
            if ref is None:
                return {"sessions": len(self._sessions), "free_sessions": None, "free_fps": None}
            sessions = list(self._sessions.values())
            load, budget = self._load(sessions), self._budget()
            more = self._load([*sessions, ref])  # what one more frame per second costs of each resource:
            per_frame = {r: (more[r] - load.get(r, 0.0)) / ref.fps for r in more}
            free_fps = min((max(0.0, budget[r] - load.get(r, 0.0)) / cost for r, cost in per_frame.items() if cost > 0),
                           default=math.inf)
            costs = self._engines[ref.engine]
            engine_s = costs.per_frame(self.max_batch)
            return {
                "sessions": len(self._sessions),
                "free_sessions": self._free_sessions(ref),
                "free_fps": None if math.isinf(free_fps) else round(free_fps, 1),
                "reference": {"engine": ref.engine, "fps": ref.fps, "width": REFERENCE_FRAME[1],
                              "height": REFERENCE_FRAME[0]},
                "target": self.target,
                "cores": round(self.cores, 2),
                "other_processes_cores": round(self.others, 2),
                "load": {r: round(v, 3) for r, v in load.items()},
                "budget": {r: round(v, 3) for r, v in budget.items()},
                "frame_ms": {
                    "engine": 1000 * engine_s,
                    "features": 1000 * (costs.features.value or 0.0),
                    "composite": 1000 * (costs.composite.value or 0.0) * ref.frame_pixels,
                    "encode": 1000 * (self._encode.value or 0.0) * ref.output_pixels,
                    "overhead": 1000 * self.overhead_s,
                },
                "behind": self.now() < self._behind_until,
                "shed_frames": self.shed,
            }

    # ---- the model ---------------------------------------------------------------------------

    def _budget(self, *, whole_machine: bool = False) -> dict[str, float]:
        """What sessions may use: `target` of the machine's cores less what other processes take, `target`
        of each engine's time. whole_machine: as if no other process ran."""
        others = 0.0 if whole_machine else self.others
        return {"cpu": max(0.0, self.cores * self.target - others),
                **{f"engine:{name}": self.target for name in self._engines}}

    def _load(self, sessions: list[Demand]) -> dict[str, float]:
        """Seconds per second each resource spends on `sessions`, all of them speaking."""
        load = {"cpu": 0.0}
        per_engine: dict[str, int] = {}
        for demand in sessions:
            per_engine[demand.engine] = per_engine.get(demand.engine, 0) + 1
        for demand in sessions:
            costs = self._engines[demand.engine]
            engine_s = costs.per_frame(min(self.max_batch, per_engine[demand.engine]))
            host = costs.host_s(demand, engine_s) + (self._encode.value or 0.0) * demand.output_pixels \
                + self.overhead_s
            load["cpu"] += demand.fps * host
            device = f"engine:{demand.engine}"
            load[device] = load.get(device, 0.0) + demand.fps * costs.device_s(demand, engine_s)
        return load

    def _fits(self, sessions: list[Demand], budget: dict[str, float]) -> bool:
        return all(value <= budget[resource] + 1e-12 for resource, value in self._load(sessions).items())

    def _check(self, demand: Demand) -> None:
        sessions = [*self._sessions.values(), demand]
        if self._sessions and self.now() < self._behind_until:
            raise OverloadedError(f"this server is at capacity: its {len(self._sessions)} sessions are missing "
                                  "frames now (faces not ready in time); try again in a while, or another server",
                                  RETRY_AFTER_S)
        if self._fits(sessions, self._budget()):
            return
        if not self._sessions and self._fits(sessions, self._budget(whole_machine=True)):
            return  # nothing to protect: a lone session gets the machine, however busy other processes keep it
        load, budget = self._load(sessions), self._budget()
        resource = max(load, key=lambda r: load[r] / budget[r] if budget[r] else math.inf)
        what = (f"{load[resource]:.2f} CPU cores, more than the {budget[resource]:.2f} it gives them ({self.cores:g} "
                f"cores, {self.others:.1f} busy with other work, capacity_target {self.target:g})"
                if resource == "cpu" else
                f"{load[resource]:.0%} of engine {resource.split(':', 1)[1]}'s time, more than its "
                f"{budget[resource]:.0%} (capacity_target)")
        raise OverloadedError(f"this server is at capacity: with another session at {demand.fps} fps its "
                              f"{len(sessions)} sessions would need {what}; try again in a while, or another "
                              "server", RETRY_AFTER_S)

    def _free_sessions(self, ref: Demand) -> int:
        budget = self._budget()
        sessions = list(self._sessions.values())
        most = 1000 if self.max_sessions is None else max(0, self.max_sessions - len(sessions))
        free = 0
        while free < most and self._fits([*sessions, *[ref] * (free + 1)], budget):
            free += 1
        return free


# ---- calibration -----------------------------------------------------------------------------------

_materials: dict[tuple, dict] = {}  # (engine type, device, dtype) -> material of the calibration avatar
_materials_lock = threading.Lock()


@functools.cache
def _calibration_avatar():
    """The benchmarks' 720p avatar: 8 frames of the astronaut scene (built once per process)."""
    from lipstream.bench.serve import bench_avatar

    return bench_avatar("720p")


def calibrate(capacity: Capacity, engine: Engine, *, encode: Callable[[np.ndarray], object],
              max_batch: int, fps: int = 25) -> None:
    """Time each stage of `engine` once on a synthetic 720p avatar and report the figures to
    `capacity`: live features of half a second of speech, generate at batch 1 and at `max_batch` (the
    second size only when a frame takes under 50 ms, so a slow engine calibrates in seconds),
    compositing a batch of 4 into patches and `encode(frame)` of one whole frame (uint8 [720, 1280, 3]
    BGR). Run it where the engine's work runs (the scheduler runs it on its worker)."""
    from lipstream.stream.compositor import Compositor
    from lipstream.synthetic import speech as synthetic_speech

    avatar = _calibration_avatar()
    key = (type(engine), str(engine.device), engine.dtype)
    with _materials_lock:
        if key not in _materials:
            _materials[key] = engine.material(avatar)
        material = _materials[key]
    capacity.add_engine(engine.name, on_host=engine.device.type == "cpu", composite_on_host=engine.device.type == "cpu")
    pixels = avatar.frame_size[0] * avatar.frame_size[1]

    stream = engine.feature_stream(fps)
    speech = synthetic_speech(0.5, seed=0)
    chunk = 320
    rows = []
    for start in range(0, speech.shape[0], chunk):
        (out,), timing = timed(synchronized, engine.feature_passes, [(stream, speech[start:start + chunk])])
        capacity.observe_features(engine.name, int(out.shape[0]), timing)
        rows.append(out)
    rows.append(engine.feature_passes([(stream, None)])[0])
    conditioning = torch.cat([r for r in rows if r.shape[0]])

    def generate(batch: int) -> tuple[torch.Tensor, Timing]:
        index = [i % len(avatar) for i in range(batch)]
        cond = conditioning[[i % conditioning.shape[0] for i in range(batch)]]
        faces, timing = timed(synchronized, engine.generate, take(material, index), cond)
        capacity.observe_engine(engine.name, batch, timing)
        return faces, timing

    faces, timing = generate(1)
    generate(1)
    if max_batch > 1 and timing.wall < 0.05:
        faces, _ = generate(max_batch)
    compositor = Compositor(avatar, engine.device)
    batch = min(4, faces.shape[0])
    for _ in range(2):
        _, timing = timed(synchronized, compositor.patches, list(range(batch)), faces[:batch])
        capacity.observe_composite(engine.name, batch, pixels, timing)
    frame = compositor.compose([0], faces[:1])[0]
    for _ in range(2):
        capacity.observe_encode(pixels, timed(encode, frame)[1])


def synchronized(fn: Callable[..., T], *args) -> T:
    """fn(*args), waiting for the CUDA work it launched (so that timing it times the work)."""
    result = fn(*args)
    device = torch.device("cpu")
    for value in result if isinstance(result, list) else [result]:
        if isinstance(value, torch.Tensor) and value.device.type == "cuda":
            device = value.device
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    return result
