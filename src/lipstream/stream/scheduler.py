"""The per-device scheduler: one worker owns all of a device's tensor work.

Sessions hand it three kinds of work, each with a deadline on `now`'s clock:

- frames (`submit`): a frame's row of its avatar's material, its conditioning row and the compositor
  to paste its face into, due when the frame is shown;
- feature passes (`features`): a session's new audio for its live feature stream, due when the
  first frame it may yield is needed (at once for the start of an utterance);
- tasks (`run`, `call`): whatever else must run on the device (warm-up, stage timing, an avatar's
  material), in the background unless given a deadline.

One worker thread takes the work earliest deadline first, under this one policy: feature passes go as
one batched call (`engine.feature_passes`: one encoder call for every waiting stream); frames go as
one engine batch of up to `max_batch` frames of all sessions, formed after waiting at most
`max_wait_ms` (less when a deadline is near) for the batch to fill, without the frames that could no
longer be ready by their deadline (shed: their futures resolve to None before they cost engine time).

The worker runs `generate` on its own stream; a post-processing lane (a second thread, with a
higher-priority stream of its own on a GPU) waits for the batch's fence on the GPU, composites each
session's faces into patches (the `Compositor`), copies them into pinned host memory asynchronously
and synchronizes on the copy's fence; only then are the results handed to the event loop, as host
arrays (`FrameResult`). So generation of the next batch overlaps compositing of the last one (on a
CPU device: two threads instead of two streams), and the event loop never touches a tensor: no index,
no copy, no synchronization runs on it. At most `IN_FLIGHT` batches are generated ahead of their
post-processing. Warm-up tasks run on the worker thread itself, so CUDA graphs are captured on the
thread that replays them.

Each stage's timing goes to `capacity` (engine and features: the device time on a GPU, the thread's
CPU time on the CPU; compositing likewise), which admission control and the capacity report use.
The scheduler never waits on a session: a session that stops reading holds only the work it
submitted, and `cancel(owner)` drops it."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch

from lipstream.engines.base import Engine, FeatureStream, gather
from lipstream.metrics import BATCH_FRAMES, SCHEDULER_QUEUE_DEPTH, SHED_FRAMES, STAGE_SECONDS
from lipstream.stream.capacity import Capacity, Timing
from lipstream.stream.compositor import Compositor, FacePatch
from lipstream.stream.device import (
    HIGH_PRIORITY,
    Fence,
    Lane,
    configure_backends,
    to_device,
    to_host,
    use_stream,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

IN_FLIGHT = 2  # batches generated and not yet post-processed, at most


@dataclass(frozen=True)
class FrameResult:
    """A frame's face, ready on the host. image: the frame's `FacePatch` (with a compositor), or the
    face itself, uint8 [256, 256, 3] BGR (without). queued_s: from submit to its batch's start;
    engine_s: its batch's generate call; composite_s: its batch's post-processing (compositing and the
    copy to the host; the device's time on a GPU)."""

    image: FacePatch | np.ndarray
    queued_s: float
    engine_s: float
    composite_s: float


@dataclass(eq=False)
class _Job:
    deadline: float
    seq: int
    owner: str
    future: asyncio.Future | Future
    submitted: float

    def __lt__(self, other: _Job) -> bool:
        return (self.deadline, self.seq) < (other.deadline, other.seq)

    def live(self) -> bool:
        return not self.future.done()


@dataclass(eq=False)
class _Frame(_Job):
    material: Mapping[str, torch.Tensor] = field(default_factory=dict)
    frame: int = 0
    conditioning: torch.Tensor | None = None
    compositor: Compositor | None = None


@dataclass(eq=False)
class _Features(_Job):
    stream: FeatureStream | None = None
    samples: np.ndarray | None = None


@dataclass(eq=False)
class _Task(_Job):
    fn: Callable[..., Any] | None = None
    args: tuple = ()


class Scheduler:
    """engine: the device's engine. max_batch: most frames in one `generate` call. max_wait_ms: how
    long the first waiting frame may wait for others to join its batch. capacity: where to report
    each stage's timings (the engine must have been added to it). now: the clock deadlines are
    measured on.

    Use from one event loop: `start()` inside it, `await aclose()` at the end. `call` may be used from
    any thread."""

    def __init__(self, engine: Engine, *, max_batch: int = 16, max_wait_ms: float = 4.0,
                 capacity: Capacity | None = None, now: Callable[[], float] = time.monotonic):
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError("max_batch must be >= 1 and max_wait_ms >= 0")
        self.engine = engine
        self.device = torch.device(engine.device)
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self.now = now
        self.capacity = capacity
        self._label = str(engine.device)
        self._cond = threading.Condition()
        self._heap: list[_Job] = []
        self._seq = itertools.count()
        self._recent: deque[tuple[int, float, float]] = deque(maxlen=128)  # (frames, engine s, service s)
        self._latencies: deque[float] = deque(maxlen=256)  # submit -> result of recent frames, s
        self._expected_s = self.max_wait_s + 0.04  # p95 of the latencies (read by the worker)
        self._service_s = -math.inf  # median service time of recent batches (read by the worker)
        self._counts = dict.fromkeys(("batches", "frames", "errors", "shed", "feature_calls"), 0)
        self._posting = threading.BoundedSemaphore(IN_FLIGHT)
        self._in_post = 0
        self._timings: deque[tuple[Fence, Fence, int]] = deque()  # feature passes' GPU fences, to read later
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker: threading.Thread | None = None
        self._post: Lane | None = None
        self._stream = None
        self._closing = False
        self._closed = False

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker and its post-processing lane, delivering to the running loop (idempotent)."""
        if self._closed:
            raise RuntimeError("the scheduler is closed")
        if self._worker is not None:
            return
        self._loop = asyncio.get_running_loop()
        name = f"lipstream-{self._label.replace(':', '')}"
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._post = Lane(self.device, f"{name}-post", priority=HIGH_PRIORITY)
        self._worker = threading.Thread(target=self._work, name=f"{name}-worker", daemon=True)
        self._worker.start()

    async def warm_start(self) -> None:
        """Set the device's backend flags (`configure_backends`, with the engine's `torch_threads`),
        `start()`, then warm the engine up on the worker (`engine.warmup(max_batch)`: every batch size
        compiled and captured on the thread that will run it). If the warm-up fails, the scheduler is
        closed and the error raised."""
        configure_backends(self.device, torch_threads=self.engine.torch_threads)
        self.start()
        try:
            await self.run(self.engine.warmup, self.max_batch)
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        """Stop: waiting work is cancelled, the batch in progress finishes, the threads end (idempotent)."""
        if self._closed:
            return
        self._closed = True
        with self._cond:
            self._closing = True
            jobs, self._heap = self._heap, []
            self._cond.notify_all()
        for job in jobs:
            job.future.cancel()
        if self._worker is not None:
            await asyncio.to_thread(self._worker.join)
        if self._post is not None:
            self._post.close()
            await asyncio.to_thread(self._post.thread.join)
        SCHEDULER_QUEUE_DEPTH.labels(self._label).set(0)

    @property
    def running(self) -> bool:
        return self._worker is not None and not self._closed

    # ---- what sessions call -------------------------------------------------------------------

    def submit(self, owner: str, material: Mapping[str, torch.Tensor], frame: int, conditioning: torch.Tensor,
               deadline: float, *, compositor: Compositor | None = None) -> asyncio.Future:
        """One frame: row `frame` of `material` (an avatar's, from `engine.material`: a frame of its
        cycle), its conditioning row (a row of a feature pass's result, on the engine's device);
        deadline: when it must be ready, on `now`'s clock; compositor: where to paste the face (its
        frame `frame` of the same cycle).

        Returns a future (of the running loop) resolving to a `FrameResult`, or to None when the frame
        was shed (it could not have been ready by its deadline). Cancel it to withdraw the frame; it
        fails with the engine's (or the compositor's) exception if that fails."""
        job = _Frame(deadline, next(self._seq), owner, self._new_future(), self.now(), material, frame, conditioning,
                     compositor)
        self._push(job)
        return job.future

    def features(self, owner: str, stream: FeatureStream, samples: np.ndarray | None, deadline: float
                 ) -> asyncio.Future:
        """A feature pass: `stream.push(samples)`, or `stream.flush()` for None, batched with the other
        streams' waiting passes. Returns a future resolving to the frames' conditioning rows (a list of
        tensors on the engine's device, one per frame; hand each to `submit`)."""
        job = _Features(deadline, next(self._seq), owner, self._new_future(), self.now(), stream, samples)
        self._push(job)
        return job.future

    def call(self, fn: Callable[..., T], *args: Any, deadline: float = math.inf) -> Future[T]:
        """fn(*args) on the worker (from any thread), when no work due earlier waits; a concurrent Future."""
        if not self.running:
            raise RuntimeError("Scheduler.start() must be called first")
        job = _Task(deadline, next(self._seq), "", Future(), self.now(), fn, args)
        self._push(job)
        return job.future

    async def run(self, fn: Callable[..., T], *args: Any, deadline: float = math.inf) -> T:
        """`call` from the event loop, awaited."""
        return await asyncio.wrap_future(self.call(fn, *args, deadline=deadline))

    async def post(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) on the post-processing lane (on its stream), after what is queued there: e.g.
        `compositor.tensors` to upload an avatar's compositing data before its first frame."""
        if not self.running:
            raise RuntimeError("Scheduler.start() must be called first")
        return await asyncio.wrap_future(self._post.submit(fn, *args))

    def cancel(self, owner: str) -> int:
        """Withdraw every waiting frame of `owner` (their futures are cancelled; its feature passes go
        on: its streams' state depends on them). Returns how many. Frames already in a batch finish,
        but their cancelled futures get no result."""
        with self._cond:
            keep, dropped = [], []
            for job in self._heap:
                (dropped if isinstance(job, _Frame) and job.owner == owner else keep).append(job)
            heapq.heapify(keep)
            self._heap = keep
        for job in dropped:
            job.future.cancel()
        SCHEDULER_QUEUE_DEPTH.labels(self._label).set(len(keep))
        return len(dropped)

    def expected_latency_s(self) -> float:
        """How long a frame submitted now may take until its result is ready: the 95th percentile of
        submit -> result over the last 256 frames (before any: `max_wait_ms` + 40 ms). Sessions plan
        an utterance's first frame this far ahead, so that the frames after it, whose audio arrives
        in real time behind it, have the same margin."""
        return self._expected_s

    @property
    def queue_depth(self) -> int:
        """Frames waiting for a batch (not counting withdrawn ones)."""
        with self._cond:
            return sum(isinstance(job, _Frame) and job.live() for job in self._heap)

    def stats(self) -> dict:
        """Counters and recent figures: batches, frames, errors, shed (frames dropped before the engine
        because they could not be ready in time), feature_calls (batched feature passes), queue_depth,
        composing (batches being post-processed), mean/max batch size, engine and service (engine +
        post-processing) ms p50/p95 over the last 128 batches."""
        with self._cond:
            recent = list(self._recent)
        sizes = [n for n, _, _ in recent]
        engine_ms = sorted(1000 * e for _, e, _ in recent)
        service_ms = sorted(1000 * s for _, _, s in recent)
        return {
            "device": self._label,
            **self._counts,
            "queue_depth": self.queue_depth,
            "composing": self._in_post,
            "batch_mean": statistics.fmean(sizes) if sizes else None,
            "batch_max": max(sizes) if sizes else None,
            "engine_ms_p50": _quantile(engine_ms, 0.5),
            "engine_ms_p95": _quantile(engine_ms, 0.95),
            "service_ms_p50": _quantile(service_ms, 0.5),
            "service_ms_p95": _quantile(service_ms, 0.95),
        }

    # ---- the queue ------------------------------------------------------------------------------

    def _new_future(self) -> asyncio.Future:
        if not self.running:
            raise RuntimeError("Scheduler.start() must be called (inside the event loop) before submitting work")
        return self._loop.create_future()

    def _push(self, job: _Job) -> None:
        with self._cond:
            if self._closing:
                raise RuntimeError("the scheduler is closed")
            heapq.heappush(self._heap, job)
            depth = len(self._heap)
            self._cond.notify()
        SCHEDULER_QUEUE_DEPTH.labels(self._label).set(depth)

    def _take(self) -> tuple[type, list[_Job]] | None:
        """The next work (on the worker, blocking): (kind, jobs), or None once closing."""
        fill_until = None
        with self._cond:
            while True:
                if self._closing:
                    return None
                while self._heap and not self._heap[0].live():
                    heapq.heappop(self._heap)
                if not self._heap:
                    fill_until = None
                    self._cond.wait(0.05 if self._timings else None)
                    self._read_timings()
                    continue
                head = self._heap[0]
                if isinstance(head, _Task):
                    return _Task, [heapq.heappop(self._heap)]
                if isinstance(head, _Features):
                    return _Features, self._pop(_Features, None)
                frames = [job for job in self._heap if isinstance(job, _Frame) and job.live()]
                if len(frames) < self.max_batch:
                    if fill_until is None:
                        fill_until = time.monotonic() + max(0.0, self._fill_delay(frames))
                    left = fill_until - time.monotonic()
                    if left > 0:
                        self._cond.wait(left)
                        continue
                return _Frame, self._pop_batch()

    def _fill_delay(self, frames: list[_Frame]) -> float:
        """Seconds to wait for more frames: until the oldest frame has waited max_wait, or until the
        earliest deadline minus the expected service time, if sooner."""
        oldest = min(job.submitted for job in frames)
        return min(oldest + self.max_wait_s, self._heap[0].deadline - self._expected_s) - self.now()

    def _pop(self, kind: type, limit: int | None) -> list[_Job]:
        """The live jobs of `kind`, earliest deadline first (up to `limit`); the others stay queued."""
        taken, others = [], []
        while self._heap and (limit is None or len(taken) < limit):
            job = heapq.heappop(self._heap)
            if not job.live():
                continue
            (taken if isinstance(job, kind) else others).append(job)
        for job in others:
            heapq.heappush(self._heap, job)
        SCHEDULER_QUEUE_DEPTH.labels(self._label).set(len(self._heap))
        return taken

    def _pop_batch(self) -> list[_Frame]:
        """Up to max_batch live frames, earliest deadline first. Frames due sooner than a batch's usual
        service time (engine + post-processing, the median of recent batches) cannot be ready in time:
        they are shed here, so that they cost no engine time and the frames behind them stay on time."""
        batch: list[_Frame] = []
        hopeless_before = self.now() + self._service_s
        shed = []
        while len(batch) < self.max_batch:
            frames = self._pop(_Frame, 1)
            if not frames:
                break
            (shed if frames[0].deadline < hopeless_before else batch).append(frames[0])
        if shed:
            self._counts["shed"] += len(shed)
            SHED_FRAMES.inc(len(shed))
            if self.capacity is not None:
                self.capacity.observe_shed(len(shed))
            self._loop.call_soon_threadsafe(_resolve_all, [job.future for job in shed], [None] * len(shed))
        return batch

    # ---- the worker -----------------------------------------------------------------------------

    def _work(self) -> None:
        if self._stream is not None:
            use_stream(self._stream)
        with torch.inference_mode():
            while True:
                try:
                    work = self._take()
                except Exception:  # a bug of ours in the policy: the waiting work fails, the worker goes on
                    log.exception("the %s worker could not pick its next work", self._label)
                    with self._cond:
                        jobs, self._heap = self._heap, []
                    self._loop.call_soon_threadsafe(_fail_all, [job.future for job in jobs],
                                                    RuntimeError("the device worker failed to schedule this work"))
                    continue
                if work is None:
                    return
                kind, jobs = work
                try:
                    if kind is _Task:
                        self._task(jobs[0])
                    elif kind is _Features:
                        self._features(jobs)
                    elif jobs:
                        self._frames(jobs)
                except Exception:  # a bug of ours: the worker must go on for every other session
                    log.exception("the %s worker failed on %d %s jobs", self._label, len(jobs), kind.__name__)
                    error = RuntimeError("the device worker failed on this work")
                    self._loop.call_soon_threadsafe(_fail_all, [job.future for job in jobs], error)

    def _task(self, job: _Task) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        try:
            job.future.set_result(job.fn(*job.args))
        except BaseException as exc:  # noqa: BLE001 (handed to the caller)
            job.future.set_exception(exc)

    def _features(self, jobs: list[_Features]) -> None:
        wall, cpu = time.perf_counter(), time.thread_time()
        start = Fence(self.device, timing=True).record()
        results = self.engine.feature_passes([(job.stream, job.samples) for job in jobs])
        end = Fence(self.device, timing=True).record()
        rows = [r if isinstance(r, Exception) else list(r.unbind(0)) for r in results]
        frames = sum(len(r) for r in rows if not isinstance(r, Exception))
        self._counts["feature_calls"] += 1
        timing = Timing(time.perf_counter() - wall, time.thread_time() - cpu)
        if self.device.type == "cuda":
            self._timings.append((start, end, frames))  # the device time, read once it has passed
        else:
            self._observe_features(frames, timing)
        self._loop.call_soon_threadsafe(_resolve_all, [job.future for job in jobs], rows)

    def _observe_features(self, frames: int, timing: Timing) -> None:
        STAGE_SECONDS.labels("features").observe(timing.wall)
        if self.capacity is not None:
            self.capacity.observe_features(self.engine.name, frames, timing)

    def _read_timings(self) -> None:
        """Report the feature passes whose device time is known by now (never waits)."""
        while self._timings and self._timings[0][1].done():
            start, end, frames = self._timings.popleft()
            seconds = start.seconds_until(end)
            self._observe_features(frames, Timing(seconds, seconds))

    def _frames(self, batch: list[_Frame]) -> None:
        self._read_timings()
        began, wall, cpu = self.now(), time.perf_counter(), time.thread_time()
        start = Fence(self.device, timing=True).record()
        try:
            material = gather([(job.material, job.frame) for job in batch], self.device)
            faces = self.engine.generate(material, torch.stack([job.conditioning for job in batch]))
        except Exception as exc:  # one failing batch must not stop the device: its frames fail, others go on
            log.exception("engine %s failed on a batch of %d frames", self.engine.name, len(batch))
            self._counts["errors"] += 1
            self._loop.call_soon_threadsafe(_fail_all, [job.future for job in batch], exc)
            return
        end = Fence(self.device, timing=True).record()
        host = Timing(time.perf_counter() - wall, time.thread_time() - cpu)
        self._posting.acquire()
        self._in_post += 1
        self._post.submit(self._finish, batch, faces, start, end, began, host)

    def _finish(self, batch: list[_Frame], faces: torch.Tensor, start: Fence, end: Fence, began: float,
                host: Timing) -> None:
        """On the post lane: composite, copy to the host, and hand the results to the loop."""
        try:
            with torch.inference_mode():
                outputs, engine, composite = self._composite(batch, faces, start, end, host)
            results: list[Any] = [None] * len(batch)
            for rows, compositor, host_array in outputs:
                pixels = host_array.numpy() if isinstance(host_array, torch.Tensor) else host_array
                for i, row in enumerate(rows):
                    job = batch[row]
                    image = pixels[i] if compositor is None else compositor.patch(job.frame, pixels[i])
                    results[row] = FrameResult(image, began - job.submitted, engine.wall, composite.wall)
            self._loop.call_soon_threadsafe(self._deliver, batch, results, engine.wall, self.now() - began)
        except Exception as exc:  # a compositor's failure fails its batch's frames
            log.exception("post-processing a batch of %d frames failed", len(batch))
            self._loop.call_soon_threadsafe(_fail_all, [job.future for job in batch], exc)
        finally:
            self._in_post -= 1
            self._posting.release()

    def _composite(self, batch: list[_Frame], faces: torch.Tensor, start: Fence, end: Fence, host: Timing
                   ) -> tuple[list, Timing, Timing]:
        """The batch's faces in each compositor's patches, copied to the host: ([(rows, compositor, host
        array)], engine timing, post-processing timing), returned once the copies are complete. This
        lane's stream waits for the engine's fence on the GPU; `faces`, made on the engine's stream, is
        marked as used on this one."""
        end.wait()
        if faces.device.type == "cuda":
            faces.record_stream(torch.cuda.current_stream())
        wall, cpu = time.perf_counter(), time.thread_time()
        composite_start = Fence(self.device, timing=True).record()
        groups: dict[int, list[int]] = {}
        for row, job in enumerate(batch):
            groups.setdefault(id(job.compositor), []).append(row)
        outputs = []  # (rows, compositor, host array)
        for rows in groups.values():
            compositor = batch[rows[0]].compositor
            part = faces if len(rows) == len(batch) else \
                faces.index_select(0, to_device(torch.tensor(rows, dtype=torch.long), faces.device))
            if compositor is not None:
                part = compositor.patches([batch[r].frame for r in rows], part)
            outputs.append((rows, compositor, to_host(part) if isinstance(part, torch.Tensor) else part))
        done = Fence(self.device, timing=True).record()
        done.synchronize()
        engine_s = start.seconds_until(end)
        engine = host if engine_s is None else Timing(engine_s, engine_s)
        composite_s = composite_start.seconds_until(done)
        composite = Timing(time.perf_counter() - wall, time.thread_time() - cpu) if composite_s is None \
            else Timing(composite_s, composite_s)
        self._observe(batch, outputs, engine, composite)
        return outputs, engine, composite

    def _observe(self, batch: list[_Frame], outputs: list, engine: Timing, composite: Timing) -> None:
        STAGE_SECONDS.labels("engine").observe(engine.wall)
        STAGE_SECONDS.labels("composite").observe(composite.wall)
        BATCH_FRAMES.observe(len(batch))
        if self.capacity is None:
            return
        self.capacity.observe_engine(self.engine.name, len(batch), engine)
        composited = [(rows, compositor) for rows, compositor, _ in outputs if compositor is not None]
        pixels = sum(len(rows) * compositor.frame_size[0] * compositor.frame_size[1] for rows, compositor in composited)
        frames = sum(len(rows) for rows, _ in composited)
        if frames:
            self.capacity.observe_composite(self.engine.name, frames, pixels // frames, composite)

    def _deliver(self, batch: list[_Frame], results: list[FrameResult], engine_s: float, service_s: float) -> None:
        """On the loop: each frame's result to its future (unless it was withdrawn), and the figures."""
        now = self.now()
        for job, result in zip(batch, results):
            if not job.future.done():
                job.future.set_result(result)
                self._latencies.append(now - job.submitted)
        self._counts["batches"] += 1
        self._counts["frames"] += len(batch)
        with self._cond:
            self._recent.append((len(batch), engine_s, service_s))
            services = sorted(s for _, _, s in self._recent)
        self._service_s = services[len(services) // 2]
        if self._latencies:  # (a batch whose frames were all withdrawn brings none)
            self._expected_s = _quantile(sorted(self._latencies), 0.95)


def _resolve_all(futures: list, values: list) -> None:
    for future, value in zip(futures, values):
        if future.done():
            continue
        if isinstance(value, Exception):
            future.set_exception(value)
        else:
            future.set_result(value)


def _fail_all(futures: list, error: BaseException) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(error)


def _quantile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]
