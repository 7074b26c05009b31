"""The per-device scheduler: one engine serves every session on the device, batch by batch.

Sessions submit one frame at a time (`submit`): its material row, its conditioning row, the wall-clock
time by which it must be ready (its deadline) and, optionally, the compositor and cycle frame to paste
its face into. A batcher task on the event loop takes up to `max_batch` waiting frames of all
sessions, earliest deadline first, after waiting at most `max_wait_ms` (less when a deadline is near)
for the batch to fill; one worker thread runs `engine.generate` on it, off the event loop; a small
thread pool composites the faces while the next batch is generated. Each frame's future resolves to
its result. The scheduler never waits on a session: a session that stops reading holds only the
frames it submitted, and `cancel(owner)` drops them.

Feature extraction runs on the scheduler's feature threads too (`run_features`), so the number of
threads depends on the devices, not on the sessions."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import statistics
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from lipstream.engines.base import Engine, concat
from lipstream.metrics import BATCH_FRAMES, SCHEDULER_QUEUE_DEPTH, SHED_FRAMES, STAGE_SECONDS
from lipstream.stream.capacity import Capacity, synchronized, timed
from lipstream.stream.compositor import Compositor, Frames

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Work:
    deadline: float
    seq: int
    owner: str
    material: Mapping[str, torch.Tensor]
    conditioning: torch.Tensor
    cycle: int
    compositor: Compositor | None
    future: asyncio.Future
    submitted: float = field(default=0.0)

    def __lt__(self, other: _Work) -> bool:
        return (self.deadline, self.seq) < (other.deadline, other.seq)


# Feature threads a serving scheduler uses: concurrent live feature passes, which MuseTalk's
# EncoderBatcher merges into shared encoder calls.
FEATURE_WORKERS = 8


class Scheduler:
    """engine: the device's engine. max_batch: most frames in one `generate` call. max_wait_ms: how long
    the first waiting frame may wait for others to join its batch. feature_workers / compose_workers:
    threads for feature passes and for compositing. capacity: where to report each stage's timings
    (the engine must have been added to it). now: the clock deadlines are measured on.

    Frames that can no longer be ready by their deadline (it is nearer than a batch's usual service
    time) are shed when a batch is formed, before they cost engine time: their futures resolve to None.

    Use from one event loop: `start()` inside it, `await aclose()` at the end."""

    def __init__(self, engine: Engine, *, max_batch: int = 16, max_wait_ms: float = 4.0, feature_workers: int = 1,
                 compose_workers: int = 2, capacity: Capacity | None = None, now: Callable[[], float] = time.monotonic):
        if max_batch < 1 or max_wait_ms < 0 or feature_workers < 1 or compose_workers < 1:
            raise ValueError("max_batch, feature_workers and compose_workers must be >= 1 and max_wait_ms >= 0")
        self.engine = engine
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self.now = now
        self.capacity = capacity
        self._feature_workers = feature_workers
        self._compose_workers = compose_workers
        self._device_label = str(engine.device)
        self._heap: list[_Work] = []
        self._seq = itertools.count()
        self._composing: set[asyncio.Future] = set()
        self._recent: deque[tuple[int, float, float]] = deque(maxlen=128)  # (frames, engine s, service s)
        self._latencies: deque[float] = deque(maxlen=256)  # submit -> result of recent frames, s
        self._batches = 0
        self._frames = 0
        self._errors = 0
        self._shed = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._pools: dict[str, ThreadPoolExecutor] = {}
        self._closed = False

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the batcher task and the worker threads on the running event loop (idempotent)."""
        if self._closed:
            raise RuntimeError("the scheduler is closed")
        if self._task is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._pools = {
            "engine": ThreadPoolExecutor(1, thread_name_prefix="lipstream-engine"),
            "features": ThreadPoolExecutor(self._feature_workers, thread_name_prefix="lipstream-features"),
            "compose": ThreadPoolExecutor(self._compose_workers, thread_name_prefix="lipstream-compose"),
        }
        self._task = self._loop.create_task(self._run(), name=f"lipstream-scheduler-{self._device_label}")

    async def aclose(self) -> None:
        """Stop batching, cancel every waiting frame and let the worker threads end (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for work in self._heap:
            work.future.cancel()
        self._heap.clear()
        for future in list(self._composing):
            future.cancel()
        for pool in self._pools.values():
            pool.shutdown(wait=False, cancel_futures=True)
        self._pools = {}
        SCHEDULER_QUEUE_DEPTH.labels(self._device_label).set(0)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._closed

    # ---- what sessions call -------------------------------------------------------------------

    def submit(self, owner: str, material: Mapping[str, torch.Tensor], conditioning: torch.Tensor, deadline: float,
               *, cycle: int = 0, compositor: Compositor | None = None) -> asyncio.Future:
        """One frame: material {key: [1, ...]} (from `take`), conditioning [1, ...] (a row of the engine's
        features), both on the engine's device; deadline: when it must be ready, on `now`'s clock.

        Returns a future (of the running loop) resolving to the face, uint8 [256, 256, 3] BGR on the
        engine's device; with a `compositor`, to `compositor.compose([cycle], face)[0]` instead, the
        full frame uint8 [H, W, 3] BGR (np.ndarray, or a tensor on a CUDA compositor's device); or to
        None when the frame was shed (it could not have been ready by its deadline).
        Cancel the future to withdraw the frame; it fails with the engine's exception if generate fails."""
        if not self.running:
            raise RuntimeError("Scheduler.start() must be called (inside the event loop) before submit()")
        future = self._loop.create_future()
        heapq.heappush(self._heap, _Work(deadline, next(self._seq), owner, material, conditioning, cycle,
                                         compositor, future, self.now()))
        self._wake.set()
        SCHEDULER_QUEUE_DEPTH.labels(self._device_label).set(len(self._heap))
        return future

    def cancel(self, owner: str) -> int:
        """Withdraw every waiting frame of `owner` (its futures are cancelled). Returns how many.
        Frames already in a running batch finish, but their cancelled futures get no result."""
        keep, dropped = [], 0
        for work in self._heap:
            if work.owner == owner:
                work.future.cancel()
                dropped += 1
            elif not work.future.done():
                keep.append(work)
        heapq.heapify(keep)
        self._heap = keep
        SCHEDULER_QUEUE_DEPTH.labels(self._device_label).set(len(self._heap))
        return dropped

    async def run_features(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` on a feature thread; its time is recorded as the "features" stage (a tensor
        result's first dimension counts its frames)."""
        if not self.running:
            raise RuntimeError("Scheduler.start() must be called before run_features()")
        return await self._loop.run_in_executor(self._pools["features"], self._timed_features, fn, *args)

    def _timed_features(self, fn: Callable[..., Any], *args: Any) -> Any:
        result, timing = timed(fn, *args)
        STAGE_SECONDS.labels("features").observe(timing.wall)
        if self.capacity is not None and isinstance(result, torch.Tensor):
            self.capacity.observe_features(self.engine.name, int(result.shape[0]), timing)
        return result

    def expected_latency_s(self) -> float:
        """How long a frame submitted now may take until its result is ready: the 95th percentile of
        submit -> result over the last 256 frames (before any: `max_wait_ms` + 40 ms). Sessions plan
        an utterance's first frame this far ahead, so that the frames after it, whose audio arrives
        in real time behind it, have the same margin."""
        if not self._latencies:
            return self.max_wait_s + 0.04
        return _quantile(sorted(self._latencies), 0.95)

    @property
    def queue_depth(self) -> int:
        """Frames waiting for a batch (not counting withdrawn ones)."""
        return sum(not work.future.done() for work in self._heap)

    def stats(self) -> dict:
        """Counters and recent figures: batches, frames, errors, shed (frames dropped before the engine
        because they could not be ready in time), queue_depth, composing (groups being composited),
        mean/max batch size, engine and service (engine + compositing) ms p50/p95 over the last 128
        batches."""
        sizes = [n for n, _, _ in self._recent]
        engine_ms = sorted(1000 * e for _, e, _ in self._recent)
        service_ms = sorted(1000 * s for _, _, s in self._recent)
        return {
            "device": self._device_label,
            "batches": self._batches,
            "frames": self._frames,
            "errors": self._errors,
            "shed": self._shed,
            "queue_depth": self.queue_depth,
            "composing": len(self._composing),
            "batch_mean": statistics.fmean(sizes) if sizes else None,
            "batch_max": max(sizes) if sizes else None,
            "engine_ms_p50": _quantile(engine_ms, 0.5),
            "engine_ms_p95": _quantile(engine_ms, 0.95),
            "service_ms_p50": _quantile(service_ms, 0.5),
            "service_ms_p95": _quantile(service_ms, 0.95),
        }

    # ---- the batcher ----------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            await self._wait_for_work()
            delay = self._fill_delay()
            if delay > 0:
                await asyncio.sleep(delay)
            batch = self._pop_batch()
            if batch:
                await self._execute(batch)

    async def _wait_for_work(self) -> None:
        while True:
            while self._heap and self._heap[0].future.done():  # withdrawn frames
                heapq.heappop(self._heap)
            if self._heap:
                return
            SCHEDULER_QUEUE_DEPTH.labels(self._device_label).set(0)
            self._wake.clear()
            await self._wake.wait()

    def _fill_delay(self) -> float:
        """Seconds to wait for more frames: none once a batch is full; else until the oldest frame has
        waited max_wait, or until the earliest deadline minus the expected service time, if sooner."""
        live = [work for work in self._heap if not work.future.done()]
        if len(live) >= self.max_batch:
            return 0.0
        oldest = min(work.submitted for work in live)
        head = self._heap[0].deadline
        return min(oldest + self.max_wait_s, head - self.expected_latency_s()) - self.now()

    def _pop_batch(self) -> list[_Work]:
        """Up to max_batch live frames, earliest deadline first. Frames due sooner than a batch's usual
        service time (engine + compositing, the median of recent batches) cannot be ready in time:
        they are shed here, so that they cost no engine time and the frames behind them stay on time."""
        batch: list[_Work] = []
        service = sorted(s for _, _, s in self._recent)
        hopeless_before = self.now() + service[len(service) // 2] if service else -float("inf")
        shed = 0
        while self._heap and len(batch) < self.max_batch:
            work = heapq.heappop(self._heap)
            if work.future.done():
                continue
            if work.deadline < hopeless_before:
                work.future.set_result(None)
                shed += 1
            else:
                batch.append(work)
        if shed:
            self._shed += shed
            SHED_FRAMES.inc(shed)
            if self.capacity is not None:
                self.capacity.observe_shed(shed)
        SCHEDULER_QUEUE_DEPTH.labels(self._device_label).set(len(self._heap))
        return batch

    async def _execute(self, batch: list[_Work]) -> None:
        began = self.now()
        try:
            faces, engine_s = await self._loop.run_in_executor(self._pools["engine"], self._generate, batch)
        except Exception as exc:  # one failing batch must not stop the device: its frames fail, others go on
            log.exception("engine %s failed on a batch of %d frames", self.engine.name, len(batch))
            self._errors += 1
            for work in batch:
                if not work.future.done():
                    work.future.set_exception(exc)
            return
        self._batches += 1
        self._frames += len(batch)
        groups: dict[int, list[int]] = {}
        for row, work in enumerate(batch):
            if work.future.done():
                continue
            if work.compositor is None:
                work.future.set_result(faces[row])
                self._latencies.append(self.now() - work.submitted)
            else:
                groups.setdefault(id(work.compositor), []).append(row)
        if not groups:
            self._recent.append((len(batch), engine_s, self.now() - began))
            return
        pending = len(groups)
        for rows in groups.values():
            works = [batch[row] for row in rows]
            composing = self._loop.run_in_executor(
                self._pools["compose"], self._timed_composite, works[0].compositor,
                [work.cycle for work in works], faces[torch.tensor(rows, device=faces.device)])
            self._composing.add(composing)

            def deliver(done: asyncio.Future, works: list[_Work] = works) -> None:
                nonlocal pending
                self._composing.discard(done)
                pending -= 1
                if pending == 0:
                    self._recent.append((len(batch), engine_s, self.now() - began))
                if _deliver(works, done):
                    self._latencies.extend(self.now() - work.submitted for work in works)

            composing.add_done_callback(deliver)

    def _generate(self, batch: list[_Work]) -> tuple[torch.Tensor, float]:
        """On the engine thread: one generate call over the batch. Returns (faces [B, 256, 256, 3], seconds)."""
        material = concat([work.material for work in batch])
        conditioning = torch.cat([work.conditioning for work in batch])
        faces, timing = timed(synchronized, self.engine.generate, material, conditioning)
        STAGE_SECONDS.labels("engine").observe(timing.wall)
        BATCH_FRAMES.observe(len(batch))
        if self.capacity is not None:
            self.capacity.observe_engine(self.engine.name, len(batch), timing)
        return faces, timing.wall

    def _timed_composite(self, compositor: Compositor, cycles: list[int], faces: torch.Tensor) -> Frames:
        """On a compose thread: `compositor.compose(cycles, faces)`, timed as the "composite" stage."""
        frames, timing = timed(compositor.compose, cycles, faces)
        STAGE_SECONDS.labels("composite").observe(timing.wall)
        if self.capacity is not None:
            height, width = compositor.avatar.frame_size
            self.capacity.observe_composite(self.engine.name, len(cycles), height * width, timing)
        return frames


def _deliver(works: list[_Work], composed: asyncio.Future) -> bool:
    """Hand each frame of a composited group to its future (unless it was withdrawn meanwhile).
    Returns whether compositing succeeded."""
    if composed.cancelled():
        for work in works:
            work.future.cancel()
        return False
    error = composed.exception()
    if error is not None:
        log.error("compositing %d frames failed: %r", len(works), error)
    frames: Frames | None = None if error is not None else composed.result()
    for i, work in enumerate(works):
        if work.future.done():
            continue
        if error is not None:
            work.future.set_exception(error)
        else:
            work.future.set_result(frames[i])
    return error is None


def _quantile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]
