"""Scheduler: frames of many sessions in one bounded engine batch, earliest deadline first, results to
the right futures; withdrawal; engine failures; a consumer that stops reading stalls nobody."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from lipstream.engines.base import take
from lipstream.stream.compositor import Compositor
from lipstream.stream.scheduler import Scheduler
from stream_helpers import (
    CountingWarp,
    FakeNow,
    GatedWarp,
    make_session,
    small_avatar,
    speech,
    step,
    until,
    voiced_speech,
)

pytestmark = pytest.mark.anyio


def mouth_states(n: int, seed: int) -> torch.Tensor:
    """n distinct warp conditioning rows [n, 3] (open, wide, round)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, generator=g) * 0.8 + 0.1


class FailingOnceWarp(CountingWarp):
    def __init__(self):
        super().__init__()
        self.failed = False

    def generate(self, material, conditioning):
        if not self.failed:
            self.failed = True
            raise RuntimeError("device lost")
        return super().generate(material, conditioning)


async def test_frames_of_several_sessions_share_one_generate_call_and_come_back_to_their_owner():
    engine = CountingWarp()
    scheduler = Scheduler(engine, max_batch=16, max_wait_ms=50)
    scheduler.start()
    _, material = small_avatar()
    states = {owner: mouth_states(4, seed) for seed, owner in enumerate("abc")}
    futures = {(owner, j): scheduler.submit(owner, take(material, [j]), states[owner][j:j + 1], deadline=1e9 + j)
               for owner in "abc" for j in range(4)}
    faces = dict(zip(futures, await asyncio.gather(*futures.values())))
    assert [call.shape[0] for call in engine.calls] == [12], "one engine call for the 12 frames of 3 sessions"
    for (owner, j), face in faces.items():
        assert face.dtype == torch.uint8 and face.shape == (256, 256, 3)
        alone = engine.generate(take(material, [j]), states[owner][j:j + 1])[0]
        assert torch.equal(face, alone), f"frame {j} of session {owner} got another frame's face"
    assert scheduler.stats()["batches"] == 1 and scheduler.stats()["frames"] == 12
    await scheduler.aclose()


async def test_batches_are_bounded_and_earliest_deadline_first():
    engine = CountingWarp()
    scheduler = Scheduler(engine, max_batch=4, now=FakeNow(0.0))  # no deadline has passed: none is shed
    scheduler.start()
    _, material = small_avatar()
    states = mouth_states(10, seed=7)
    deadlines = np.random.default_rng(0).permutation(10).astype(float)
    futures = [scheduler.submit(f"s{i}", take(material, [0]), states[i:i + 1], deadline=deadlines[i])
               for i in range(10)]
    await asyncio.gather(*futures)
    assert [call.shape[0] for call in engine.calls] == [4, 4, 2]
    served = torch.cat(engine.calls)
    assert torch.equal(served, states[np.argsort(deadlines)]), "frames must be served by deadline"
    await scheduler.aclose()


async def test_cancel_withdraws_an_owners_waiting_frames():
    engine = CountingWarp()
    scheduler = Scheduler(engine, max_batch=16, max_wait_ms=20)
    scheduler.start()
    _, material = small_avatar()
    gone = [scheduler.submit("gone", take(material, [0]), mouth_states(1, i), 1.0) for i in range(3)]
    kept = [scheduler.submit("kept", take(material, [1]), mouth_states(1, 9 + i), 2.0) for i in range(2)]
    assert scheduler.cancel("gone") == 3 and scheduler.queue_depth == 2
    await asyncio.gather(*kept)
    assert all(f.cancelled() for f in gone)
    assert [call.shape[0] for call in engine.calls] == [2]
    await scheduler.aclose()


async def test_composited_results_and_engine_failures():
    engine = FailingOnceWarp()
    scheduler = Scheduler(engine, max_batch=8)
    scheduler.start()
    avatar, material = small_avatar()
    compositor = Compositor(avatar)
    failing = scheduler.submit("s", take(material, [2]), mouth_states(1, 0), 1.0, cycle=2, compositor=compositor)
    with pytest.raises(RuntimeError, match="device lost"):
        await failing
    state = mouth_states(1, 1)
    frame = await scheduler.submit("s", take(material, [2]), state, 2.0, cycle=2, compositor=compositor)
    face = engine.generate(take(material, [2]), state)
    assert isinstance(frame, np.ndarray) and frame.shape == (144, 256, 3)
    assert np.array_equal(frame, compositor.compose([2], face)[0])
    assert scheduler.stats()["errors"] == 1 and scheduler.stats()["batches"] == 1
    await scheduler.aclose()
    with pytest.raises(RuntimeError, match="start"):
        scheduler.submit("s", take(material, [2]), state, 3.0)


async def test_a_session_that_stops_reading_stalls_no_other_session():
    """Three sessions are fed 8 s of speech each and never read a frame; another one speaks and
    reads. Its frames all come with faces, and the idle readers hold no more than their window."""
    now = FakeNow()
    scheduler = Scheduler(CountingWarp(), max_batch=8, now=now)
    scheduler.start()
    stuck = [make_session(scheduler.engine, scheduler, now, ahead_s=0.2) for _ in range(3)]
    for i, session in enumerate(stuck):
        session.push_audio(speech(8.0, seed=i))
        session.end_speech()
    reader = make_session(scheduler.engine, scheduler, now)
    reader.push_audio(speech(1.0, seed=9))
    reader.end_speech()
    await until(lambda: all(s.stats()["frames_featured"] == 200 for s in stuck))
    frames = [await step(reader, now) for _ in range(35)]
    assert sum(f.speaking for f in frames) == 25 and reader.stats()["dropped_frames"] == 0
    for session in stuck:
        await session.settle()
        futures = [f for utt in session._utterances for f in utt.futures.values()]
        assert len(futures) <= 5, "a session that is not read holds at most ahead_s of frames"
    assert scheduler.queue_depth == 0
    for session in [*stuck, reader]:
        await session.aclose()
    await scheduler.aclose()


async def test_frames_that_wait_while_the_engine_is_busy_go_in_one_batch():
    """Three sessions speak at once; the engine is held on its first call. Everything submitted
    meanwhile, from all three sessions, goes into the next call."""
    engine = GatedWarp()
    now = FakeNow()
    scheduler = Scheduler(engine, max_batch=32, max_wait_ms=0, now=now)  # the first frame goes at once
    scheduler.start()
    sessions = [make_session(engine, scheduler, now) for _ in range(3)]
    for i, session in enumerate(sessions):
        session.push_audio(voiced_speech(0.4, seed=20 + i))
        session.end_speech()
    await until(lambda: all(s.stats()["frames_featured"] == 10 for s in sessions) and scheduler.queue_depth > 0)
    engine.permits.release(100)
    for session in sessions:
        await session.settle()
    sizes = [call.shape[0] for call in engine.calls]
    assert len(sizes) == 2 and sum(sizes) == 30 and sizes[1] > 10, f"batches {sizes}: sessions not batched"
    for session in sessions:
        frames = [session.next_frame() for _ in range(12)]
        assert sum(f.speaking for f in frames) == 10 and session.stats()["dropped_frames"] == 0
        await session.aclose()
    await scheduler.aclose()
