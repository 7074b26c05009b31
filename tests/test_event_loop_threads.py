"""No tensor work on the event loop: during a run of several speaking sessions (warp, and the tiny
random MuseTalk, each on its own scheduler), every tensor operation runs on a worker thread.

A TorchDispatchMode sees every operation dispatched to an ATen kernel (indexing, copies, math,
allocation, ...), on the thread that asks for it. Modes are per thread, so one is entered on the
event loop's thread and on every thread started while the sessions run (the schedulers' workers and
lanes, executors' threads); each records which thread ran how many operations."""

from __future__ import annotations

import collections
import threading

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lipstream.engines.musetalk import MuseTalkEngine
from lipstream.stream.scheduler import Scheduler
from musetalk_tiny import write_tiny_musetalk
from stream_helpers import CountingWarp, FakeNow, make_session, small_avatar, step, voiced_speech

pytestmark = pytest.mark.anyio


class OpThreads:
    """Per thread: how many tensor operations it ran, and the first few by name."""

    def __init__(self):
        self.counts: collections.Counter[int] = collections.Counter()
        self.names: dict[int, list[str]] = collections.defaultdict(list)
        self._lock = threading.Lock()

    def mode(self) -> TorchDispatchMode:
        recorder = self

        class Record(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                ident = threading.get_ident()
                with recorder._lock:
                    recorder.counts[ident] += 1
                    if len(recorder.names[ident]) < 5:
                        recorder.names[ident].append(str(func))
                return func(*args, **(kwargs or {}))

        return Record()


@pytest.fixture
def op_threads(monkeypatch):
    """Record the thread of every tensor operation of this thread and of every thread started in the test."""
    threads = OpThreads()
    run = threading.Thread.run

    def recorded_run(thread):
        with threads.mode():
            run(thread)

    monkeypatch.setattr(threading.Thread, "run", recorded_run)
    with threads.mode():
        yield threads


@pytest.fixture(scope="module")
def musetalk(tmp_path_factory) -> MuseTalkEngine:
    root = tmp_path_factory.mktemp("musetalk")
    write_tiny_musetalk(root)
    return MuseTalkEngine.load(root, device="cpu")


async def test_no_tensor_operation_runs_on_the_event_loop_thread(op_threads, musetalk):
    loop_thread = threading.get_ident()
    avatar, _ = small_avatar()
    muse_material = musetalk.material(avatar)  # setup, made before the sessions run
    op_threads.counts.clear()
    op_threads.names.clear()

    now = FakeNow()
    warp = Scheduler(CountingWarp(), max_batch=8, now=now)
    muse = Scheduler(musetalk, max_batch=8, now=now)
    warp.start()
    muse.start()
    await muse.run(musetalk.warmup, 8)
    sessions = [make_session(warp.engine, warp, now) for _ in range(3)]
    sessions += [make_session(musetalk, muse, now, material=muse_material) for _ in range(2)]
    for i, session in enumerate(sessions):
        session.push_audio(voiced_speech(0.6, seed=40 + i))
        session.end_speech()
    frames = []
    for _ in range(22):
        for session in sessions:
            frame = await step(session, now)
            frame.image.sum()  # what a consumer does with a frame: host memory
            frames.append(frame)
    assert sum(f.speaking for f in frames) >= 5 * 12 and all(s.stats()["dropped_frames"] == 0 for s in sessions)
    assert sum(f.patch is not None for f in frames) >= 5 * 8, "faces were made and composited"
    for session in sessions:
        await session.aclose()
    await warp.aclose()
    await muse.aclose()

    workers = {ident: n for ident, n in op_threads.counts.items() if ident != loop_thread}
    assert sum(workers.values()) > 1000, f"the workers' operations were not seen: {dict(op_threads.counts)}"
    on_loop = op_threads.counts[loop_thread]
    assert on_loop == 0, f"{on_loop} tensor operations ran on the event loop, e.g. {op_threads.names[loop_thread]}"

    torch.zeros(2).add_(1)  # and one that does is seen
    assert op_threads.counts[loop_thread] >= 2
