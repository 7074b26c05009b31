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
    worker_held,
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
    with worker_held(scheduler):
        futures = {(owner, j): scheduler.submit(owner, material, j, states[owner][j], deadline=1e9 + j)
                   for owner in "abc" for j in range(4)}
    results = dict(zip(futures, await asyncio.gather(*futures.values())))
    assert [call.shape[0] for call in engine.calls] == [12], "one engine call for the 12 frames of 3 sessions"
    for (owner, j), result in results.items():
        face = result.image
        assert isinstance(face, np.ndarray) and face.dtype == np.uint8 and face.shape == (256, 256, 3)
        alone = engine.generate(take(material, [j]), states[owner][j:j + 1])[0]
        assert np.array_equal(face, alone.numpy()), f"frame {j} of session {owner} got another frame's face"
        assert result.queued_s >= 0 and result.engine_s > 0 and result.composite_s >= 0
    assert scheduler.stats()["batches"] == 1 and scheduler.stats()["frames"] == 12
    await scheduler.aclose()


async def test_batches_are_bounded_and_earliest_deadline_first():
    engine = CountingWarp()
    scheduler = Scheduler(engine, max_batch=4, now=FakeNow(0.0))  # no deadline has passed: none is shed
    scheduler.start()
    _, material = small_avatar()
    states = mouth_states(10, seed=7)
    deadlines = np.random.default_rng(0).permutation(10).astype(float)
    with worker_held(scheduler):
        futures = [scheduler.submit(f"s{i}", material, 0, states[i], deadline=deadlines[i]) for i in range(10)]
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
    with worker_held(scheduler):
        gone = [scheduler.submit("gone", material, 0, mouth_states(1, i)[0], 1.0) for i in range(3)]
        kept = [scheduler.submit("kept", material, 1, mouth_states(1, 9 + i)[0], 2.0) for i in range(2)]
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
    failing = scheduler.submit("s", material, 2, mouth_states(1, 0)[0], 1.0, compositor=compositor)
    with pytest.raises(RuntimeError, match="device lost"):
        await failing
    state = mouth_states(1, 1)
    result = await scheduler.submit("s", material, 2, state[0], 2.0, compositor=compositor)
    face = engine.generate(take(material, [2]), state)
    patch = result.image
    assert isinstance(patch.pixels, np.ndarray) and (patch.x, patch.y) == compositor.origins[2]
    assert patch.pixels.shape == (*compositor.patch_size, 3)
    assert np.array_equal(patch.paste(compositor.frame(2)), compositor.compose([2], face)[0])
    assert scheduler.stats()["errors"] == 1 and scheduler.stats()["batches"] == 1
    await scheduler.aclose()
    with pytest.raises(RuntimeError, match="start"):
        scheduler.submit("s", material, 2, state[0], 3.0)


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
    """The engine is held on its first call (one frame); everything three sessions submit meanwhile
    goes into the next call."""
    engine = GatedWarp()
    scheduler = Scheduler(engine, max_batch=32, max_wait_ms=0, now=FakeNow(0.0))  # the first frame goes at once
    scheduler.start()
    _, material = small_avatar()
    first = scheduler.submit("a", material, 0, mouth_states(1, 0)[0], 1.0)
    await until(engine.entered.is_set)
    others = [scheduler.submit(owner, material, j, mouth_states(1, 10 * k + j)[0], 2.0 + j)
              for k, owner in enumerate("abc") for j in range(3)]
    engine.permits.release(100)
    await asyncio.gather(first, *others)
    assert [call.shape[0] for call in engine.calls] == [1, 9], "the waiting frames of all sessions in one call"
    await scheduler.aclose()


def test_a_batch_takes_its_rows_of_several_avatars_materials_in_order():
    """`gather`: one index per avatar's material, the rows in the batch's order."""
    from lipstream.engines.base import concat, gather

    _, material = small_avatar()
    other = {key: value.flip(0) for key, value in material.items()}
    rows = [(material, 2), (other, 0), (material, 0), (other, 3)]
    batch = gather(rows, torch.device("cpu"))
    expected = concat([take(m, [i]) for m, i in rows])
    assert all(torch.equal(batch[key], expected[key]) for key in material)
