"""Session: idle cycle, speech in sync with its audio, silence, interrupt, late faces, bounds, teardown."""

from __future__ import annotations

import asyncio
import gc
import itertools
import threading
import tracemalloc
import weakref

import numpy as np
import pytest

from lipstream.audio.buffer import PcmBuffer
from lipstream.engines.warp import WarpEngine
from lipstream.errors import LipstreamError, QueueFullError, SessionClosedError
from lipstream.metrics import ACTIVE_SESSIONS
from lipstream.stream.clock import MediaClock
from lipstream.stream.compositor import Compositor
from lipstream.stream.pcm import to_pcm16
from lipstream.stream.scheduler import Scheduler
from lipstream.synthetic import moving_avatar
from stream_helpers import (
    CYCLE,
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


@pytest.fixture
def now() -> FakeNow:
    return FakeNow()


@pytest.fixture
async def scheduler(now):
    """A scheduler whose deadlines are on the `now` clock, the one sessions with a fake clock use."""
    sched = Scheduler(CountingWarp(), max_batch=8, now=now)
    sched.start()
    yield sched
    await sched.aclose()


def outside_face_box(image: np.ndarray, cycle: int) -> np.ndarray:
    x1, y1, x2, y2 = small_avatar()[0].face_boxes[cycle]
    out = image.astype(np.int16)
    out[y1:y2, x1:x2] = -1
    return out


def assert_cycle_continues(frames, held: int = 0) -> None:
    """Each frame shows the next cycle frame, except `held` frames that repeat the one before."""
    steps = [(b.cycle - a.cycle) % CYCLE for a, b in itertools.pairwise(frames)]
    assert set(steps) <= {0, 1} and steps.count(0) == held, f"the cycle jumps: {[f.cycle for f in frames]}"


# ---- the clock ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fps", [25, 24, 30])
def test_clock_carries_exactly_the_audio_of_the_elapsed_time(fps):
    clock = MediaClock(fps, now=FakeNow(0.0))
    k = np.arange(3600 * fps + 1)
    starts = k * 16000 // fps
    assert starts[-1] == 3600 * 16000
    assert sum(clock.audio_samples(int(i)) for i in range(3600 * fps)) == 3600 * 16000
    assert np.abs(k / fps - starts / 16000).max() < 1 / 16000
    assert clock.audio_start(7) == 7 * 16000 // fps and clock.pts(7) == 7 / fps


def test_clock_due_frame_at_and_rebase():
    now = FakeNow(10.0)
    clock = MediaClock(25, now=now)
    assert clock.due(0) == 10.0 and clock.due(25) == pytest.approx(11.0)
    assert clock.frame_at(10.0) == 0 and clock.frame_at(10.001) == 1 and clock.frame_at(10.04) == 1
    now.t = 20.0
    clock.rebase(50)
    assert clock.due(50) == 20.0 and clock.pts(50) == 2.0


def test_pcm_buffer_reads_by_absolute_position_and_releases():
    buffer = PcmBuffer()
    data = np.arange(-30000, 30000, 3, dtype=np.int16)
    for piece in np.array_split(data, 37):
        buffer.append(piece)
    assert buffer.end == data.size and np.array_equal(buffer.read(0, data.size), data)
    buffer.release(15000)
    assert np.array_equal(buffer.read(15000, 15010), data[15000:15010])
    assert np.array_equal(buffer.read(data.size - 2, data.size + 3), [*data[-2:], 0, 0, 0])
    with pytest.raises(ValueError, match="released"):
        buffer.read(14999, 15001)
    floats = PcmBuffer(np.float32)  # the feature streams hold float samples
    floats.append(np.float32([0.25, -0.5]))
    assert floats.read(1, 3).tolist() == [-0.5, 0.0]
    assert np.array_equal(to_pcm16(np.float32([0.5, -1.0, 1.0])), [16384, -32768, 32767])
    with pytest.raises(ValueError, match="int16 or float32"):
        to_pcm16(np.zeros((2, 3), np.int16))


async def test_one_hour_of_frames_carries_one_hour_of_audio_in_sync(scheduler, now):
    """A simulated hour at 25 fps (fake clock), with speech at three points: the audio sent is exactly
    3600 s of samples, each frame's pts equals the position of its audio, and the speech comes out
    intact inside the speaking frames."""
    session = make_session(scheduler.engine, scheduler, now)
    utterances = {25 * 60 * m: speech(0.32, seed=m) for m in (1, 20, 59)}
    sent = 0
    speaking_audio: list[np.ndarray] = []
    for k in range(3600 * 25):
        if k in utterances:
            session.push_audio(utterances[k])
            session.end_speech()
        if k - 1 in utterances or session.speaking:
            await session.settle()
        now.t = session.clock.due(k)
        frame = session.next_frame()
        assert frame.index == k and frame.audio.dtype == np.int16
        assert abs(frame.pts - sent / 16000) < 1 / 25
        sent += frame.audio.shape[0]
        if frame.speaking:
            speaking_audio.append(frame.audio)
    assert sent == 3600 * 16000
    pushed = np.concatenate(list(utterances.values()))
    heard = np.concatenate(speaking_audio)
    assert heard.shape[0] == pushed.shape[0]  # 0.32 s is a whole number of frames
    assert np.array_equal(heard, pushed)
    assert session.stats()["utterances"] == 3 and session.stats()["dropped_frames"] == 0
    await session.aclose()


# ---- idle and speech ---------------------------------------------------------------------------

async def test_idle_cycle_plays_the_avatar_frames_untouched(scheduler, now):
    session = make_session(scheduler.engine, scheduler, now)
    avatar = session.avatar
    frames = [await step(session, now) for _ in range(12)]
    for k, frame in enumerate(frames):
        assert frame.index == k and frame.pts == pytest.approx(k / 25)
        assert frame.cycle == k % CYCLE and np.array_equal(frame.image, avatar.frames[k % CYCLE])
        assert frame.image.dtype == np.uint8 and frame.image.shape == (144, 256, 3)
        assert not frame.speaking and frame.events == []
        assert frame.audio.shape == (640,) and not frame.audio.any()
    with pytest.raises(ValueError, match="read-only"):
        frames[0].image[:] = 0  # a view of the avatar's frame: nobody may paint over the avatar
    await session.aclose()


async def test_speech_shows_in_the_face_box_in_sync_with_its_audio(scheduler, now):
    session = make_session(scheduler.engine, scheduler, now)
    audio = speech(1.0)
    frames = [await step(session, now) for _ in range(3)]
    session.push_audio(audio[:7000])
    session.push_audio(audio[7000:].astype(np.float32) / 32768)  # float32 input is converted exactly
    session.end_speech()
    frames += [await step(session, now) for _ in range(40)]
    speaking = [f for f in frames if f.speaking]
    assert len(speaking) == 25
    first = frames.index(speaking[0])
    assert frames[first].events == ["speech_started"]
    assert all(f.speaking for f in frames[first:first + 25]), "an utterance plays without gaps"
    assert frames[first + 25].events == ["speech_ended"] and not frames[first + 25].speaking
    assert np.array_equal(np.concatenate([f.audio for f in speaking]), audio)
    assert not any(f.audio.any() for f in frames if not f.speaking)
    avatar = session.avatar
    changed = 0
    for frame in speaking:
        assert np.array_equal(outside_face_box(frame.image, frame.cycle),
                              outside_face_box(avatar.frames[frame.cycle], frame.cycle))
        changed += not np.array_equal(frame.image, avatar.frames[frame.cycle])
    assert changed >= 15, "most speech frames show a generated face"
    assert_cycle_continues(frames)
    stats = session.stats()
    assert stats["dropped_frames"] == 0 and stats["utterances"] == 1
    assert stats["first_frame_ms"] is not None and not stats["speaking"]
    await session.aclose()


async def test_switching_the_avatar_mid_speech_keeps_the_clock_and_the_speech(scheduler, now):
    """The next frame shows the new avatar (another size, another cycle length): frame indices, pts and
    the utterance's audio go on untouched, its faces are now made for the new avatar."""
    session = make_session(scheduler.engine, scheduler, now)
    other = moving_avatar((160, 288), (100, 24, 180, 124), 3, name="other")
    audio = voiced_speech(1.0, seed=4)
    frames = [await step(session, now) for _ in range(3)]
    session.push_audio(audio)
    session.end_speech()
    frames += [await step(session, now) for _ in range(10)]
    assert frames[-1].speaking, "the switch comes in the middle of the utterance"
    session.switch_avatar(other, Compositor(other), WarpEngine().material(other))
    frames += [await step(session, now) for _ in range(30)]
    assert [f.index for f in frames] == list(range(43)) and frames[13].events == ["avatar_changed"]
    assert all(f.avatar == "test" and f.image.shape == (144, 256, 3) for f in frames[:13])
    assert all(f.avatar == "other" and f.image.shape == (160, 288, 3) and f.cycle < 3 for f in frames[13:])
    speaking = [f for f in frames if f.speaking]
    assert len(speaking) == 25 and np.array_equal(np.concatenate([f.audio for f in speaking]), audio)
    for frame in frames[13:]:
        own = np.array_equal(frame.image, other.frames[frame.cycle])
        assert own != frame.speaking, "speech shows generated faces, idle frames the new avatar's own"
    stats = session.stats()
    assert stats["avatar"] == "other" and stats["avatar_changes"] == 1 and stats["dropped_frames"] == 0
    await session.aclose()


async def test_silence_inside_speech_shows_the_avatar_frame_while_the_audio_plays(scheduler, now):
    session = make_session(scheduler.engine, scheduler, now, hangover_frames=2)  # (default: the engine's)
    loud = voiced_speech(0.4, seed=3)
    audio = np.concatenate([loud, np.zeros(16000, np.int16), loud])  # 10 + 25 + 10 frames
    session.push_audio(audio)
    session.end_speech()
    frames = [await step(session, now) for _ in range(60)]
    speaking = [f for f in frames if f.speaking]
    assert len(speaking) == 45 and np.array_equal(np.concatenate([f.audio for f in speaking]), audio)
    avatar = session.avatar
    is_idle = [np.array_equal(f.image, avatar.frames[f.cycle]) for f in speaking]
    assert all(is_idle[13:35]), "silence after the 2-frame hangover shows the avatar's own mouth"
    assert sum(is_idle[:10]) <= 2 and sum(is_idle[35:]) <= 2, "loud frames show generated faces"
    assert_cycle_continues(frames)
    await session.aclose()


async def test_interrupt_is_idle_at_the_next_frame_and_drops_everything(scheduler, now):
    session = make_session(scheduler.engine, scheduler, now)
    session.push_audio(speech(3.0))
    frames = [await step(session, now) for _ in range(10)]
    assert frames[-1].speaking
    session.interrupt()
    after = [await step(session, now) for _ in range(3)]
    assert after[0].events == ["interrupted", "speech_ended"]
    for frame in after:
        assert not frame.speaking and not frame.audio.any()
        assert np.array_equal(frame.image, session.avatar.frames[frame.cycle])
    assert_cycle_continues(frames + after)
    stats = session.stats()
    assert stats["utterances_queued"] == 0 and stats["audio_queued_s"] == 0 and stats["frames_in_flight"] == 0
    assert scheduler.queue_depth == 0
    # an interrupt in the middle of a feature pass: the pass's late result is thrown away
    session.push_audio(speech(1.0, seed=5))
    session.interrupt()
    after = [await step(session, now) for _ in range(5)]
    assert after[0].events == ["interrupted"] and not any(f.speaking for f in after)
    # and the session speaks again afterwards
    session.push_audio(speech(0.4, seed=6))
    session.end_speech()
    again = [await step(session, now) for _ in range(20)]
    assert sum(f.speaking for f in again) == 10
    await session.aclose()


async def test_an_utterance_left_open_ends_by_itself_after_auto_end_ms_without_audio(scheduler, now):
    """The client never calls end_speech(): a pause shorter than auto_end_ms keeps the utterance going;
    once its speech has run out and no audio has come for auto_end_ms it ends as end_speech() would
    (flushed: all its audio plays) and the next audio starts a new one. auto_end_ms=None: it stays open."""
    session = make_session(scheduler.engine, scheduler, now)  # auto_end_ms=600
    first, more = voiced_speech(0.4, seed=7), voiced_speech(0.4, seed=8)
    session.push_audio(first)
    frames = [await step(session, now) for _ in range(13)]
    assert session.speaking and session.stats()["stalled_frames"] > 0, "the client is behind"
    last_audio_at = now.t
    session.push_audio(more)  # 0.48 s after the first audio: the same utterance
    frames += [await step(session, now) for _ in range(40)]
    events = [(e, f) for f in frames for e in f.events]
    assert [e for e, _ in events] == ["speech_started", "speech_ended"]
    ended_at = session.clock.due(events[1][1].index)
    assert 0.6 <= ended_at - last_audio_at <= 0.6 + 0.3, "it ends soon after 600 ms without audio"
    heard = [f.audio for f in frames if f.speaking and f.audio.any()]  # stalled frames carry silence
    assert np.array_equal(np.concatenate(heard), np.concatenate([first, more]))
    stats = session.stats()
    assert stats["utterances"] == 1 and stats["auto_ended"] == 1 and not stats["speaking"]
    session.push_audio(speech(0.2, seed=9))
    again = [await step(session, now) for _ in range(30)]
    assert [e for f in again for e in f.events] == ["speech_started", "speech_ended"]
    assert session.stats()["utterances"] == 2 and session.stats()["auto_ended"] == 2
    await session.aclose()

    session = make_session(scheduler.engine, scheduler, now, auto_end_ms=None)
    session.push_audio(first)
    frames = [await step(session, now) for _ in range(40)]
    assert frames[-1].speaking and session.stats()["auto_ended"] == 0
    session.end_speech()
    frames += [await step(session, now) for _ in range(5)]
    assert any("speech_ended" in f.events for f in frames[-5:]) and not frames[-1].speaking
    await session.aclose()


async def test_a_late_face_shows_the_idle_frame_and_its_audio_plays_on_time():
    engine = GatedWarp()
    now = FakeNow()
    # the scheduler's clock stands still: it never finds a face too late to compute (here the faces
    # are late because the test holds the engine; shedding is tested with the scheduler)
    scheduler = Scheduler(engine, max_batch=1, now=FakeNow(now.t))
    scheduler.start()
    session = make_session(engine, scheduler, now)
    audio = voiced_speech(1.0, seed=2)
    session.push_audio(audio)
    session.end_speech()
    frames = [await step_without_faces(session, now) for _ in range(3)]
    assert not any(f.speaking for f in frames), "speech waits for its first face"
    engine.permits.release()  # frame 0's face
    await until(lambda: scheduler.stats()["batches"] == 1 and scheduler.stats()["composing"] == 0)
    frames += [await step_without_faces(session, now) for _ in range(6)]
    speaking = [f for f in frames if f.speaking]
    assert len(speaking) == 6 and speaking[0].events == ["speech_started"]
    assert not np.array_equal(speaking[0].image, session.avatar.frames[speaking[0].cycle])
    for frame in speaking[1:]:  # their faces are late: the avatar's frame, with the audio on time
        assert np.array_equal(frame.image, session.avatar.frames[frame.cycle])
    assert np.array_equal(np.concatenate([f.audio for f in speaking]), audio[:6 * 640])
    assert session.stats()["dropped_frames"] == 5
    engine.permits.release(100)
    frames += [await step(session, now) for _ in range(25)]
    assert sum(f.speaking for f in frames) == 25 and session.stats()["dropped_frames"] == 5
    assert_cycle_continues(frames, held=session.stats()["held_frames"])
    await session.aclose()
    await scheduler.aclose()


async def step_without_faces(session, now):
    """The next frame once the features are in, without waiting for faces."""
    await until(lambda: session._feeder_idle.is_set())
    now.t = session.clock.due(session.stats()["frames_sent"])
    return session.next_frame()


async def test_frames_are_paced_by_the_real_clock_and_never_early(scheduler):
    session = make_session(scheduler.engine, scheduler)
    session.push_audio(speech(0.2))
    session.end_speech()
    got = []
    async for frame in session.frames():
        got.append((frame, session.clock.now()))
        if len(got) == 12:
            break
    assert [f.index for f, _ in got] == list(range(12))
    assert all(t >= session.clock.due(f.index) for f, t in got)
    await session.aclose()


async def test_a_consumer_that_fell_behind_resumes_in_real_time(scheduler):
    session = make_session(scheduler.engine, scheduler, max_lag_s=0.1)
    frames = session.frames()
    for _ in range(3):
        await anext(frames)
    await asyncio.sleep(0.3)  # the viewer stalls for 7 frames
    resumed = await anext(frames)
    began = session.clock.now()
    for _ in range(3):
        await anext(frames)
    assert resumed.index == 3 and session.stats()["rebases"] == 1
    assert session.clock.now() - began >= 2.5 / 25, "no burst to catch up after a stall"
    await frames.aclose()
    await session.aclose()


# ---- bounds and teardown -----------------------------------------------------------------------

async def test_queued_speech_is_bounded(scheduler, now):
    session = make_session(scheduler.engine, scheduler, now, max_queue_s=1.0)
    session.push_audio(speech(0.8))
    with pytest.raises(QueueFullError, match="max|may hold") as error:
        session.push_audio(speech(0.3))
    assert isinstance(error.value, LipstreamError)
    assert session.stats()["audio_queued_s"] == pytest.approx(0.8)
    for _ in range(10):
        await step(session, now)
    session.push_audio(speech(0.3))  # playing made room
    await session.aclose()


async def test_closed_session_refuses_work_and_close_is_idempotent(scheduler):
    session = make_session(scheduler.engine, scheduler)
    session.close()
    session.close()
    for call in (session.next_frame, session.end_speech, session.interrupt, lambda: session.push_audio(speech(0.1))):
        with pytest.raises(SessionClosedError):
            call()
    await session.aclose()


def other_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if not t.name.startswith("lipstream-"))


async def test_opening_and_closing_100_sessions_leaves_nothing_behind(scheduler, now):
    audio = {seed: speech(0.12, seed=seed) for seed in range(100)}

    async def one_session(seed: int) -> weakref.ref:
        """Sessions that speak, are closed mid-utterance, with work in flight, or after an interrupt."""
        session = make_session(scheduler.engine, scheduler, now)
        session.push_audio(audio[seed])
        if seed % 4 in (0, 2):
            session.end_speech()
        if seed % 4 == 3:
            session.interrupt()
        for _ in range(6 if seed % 4 == 0 else 1 if seed % 4 != 2 else 0):
            await step(session, now)
        await session.aclose()
        return weakref.ref(session)

    tracemalloc.start()
    try:
        for seed in range(12):  # warm up worker threads, caches and the scheduler's recent-batch window
            await one_session(seed)
        gc.collect()
        threads, tasks = other_threads(), len(asyncio.all_tasks())
        sessions = ACTIVE_SESSIONS._value.get()
        before = tracemalloc.get_traced_memory()[0]
        refs = [await one_session(seed) for seed in range(100)]
        await asyncio.sleep(0.05)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert not [ref for ref in refs if ref() is not None], "closed sessions must be freed"
    assert other_threads() == threads and len(asyncio.all_tasks()) == tasks
    # (imgproc's pool, one thread per core for a whole process, is not the scheduler's)
    workers = [t for t in threading.enumerate()
               if t.name.startswith("lipstream-") and not t.name.startswith("lipstream-imgproc")]
    assert len(workers) <= 4, "the scheduler's threads: 1 engine, 1 features, 2 compose, whatever the sessions"
    assert ACTIVE_SESSIONS._value.get() == sessions
    stats = scheduler.stats()
    assert stats["queue_depth"] == 0 and stats["composing"] == 0 and not scheduler._heap
    assert grown < 256 * 1024, f"memory grew by {grown} bytes over 100 sessions"


async def test_the_first_frame_says_where_its_time_went(scheduler, now):
    """An utterance's first frame: how long it waited for audio, its features, its batch's queue, the
    engine, compositing and the frame clock; a transport adds its encoding and sending."""
    session = make_session(scheduler.engine, scheduler, now)
    session.push_audio(voiced_speech(0.04, seed=3))
    now.t += 0.1  # frame 0 needs more audio: it comes 100 ms later
    session.push_audio(voiced_speech(0.6, seed=4))
    session.end_speech()
    frames = [await step(session, now) for _ in range(8)]
    first = next(f for f in frames if "speech_started" in f.events)
    stages = session.stats()["first_frame_stages_ms"]
    assert set(stages) == {"audio_wait", "features", "queue", "engine", "composite", "show"}
    assert stages["audio_wait"] == pytest.approx(100) and stages["engine"] > 0 and stages["composite"] > 0
    session.record_delivery(first.index + 1, 0.5, 0.5)  # not the first frame: not kept
    session.record_delivery(first.index, 0.003, 0.001)
    assert session.stats()["first_frame_stages_ms"]["encode"] == pytest.approx(3)
    assert "encode" not in stages, "stats hand out a copy"
    await session.aclose()


async def test_an_utterance_starts_late_enough_for_its_stream_to_keep_pace(scheduler, now):
    """A stream that emits frames in groups asks for a lead (`start_lead_s`): the utterance's first
    frame is planned that much later, the idle cycle playing on meanwhile, and no frame is dropped."""
    session = make_session(scheduler.engine, scheduler, now)
    session._stream.start_lead_s = lambda received: 0.2  # five frames at 25 fps
    session.push_audio(voiced_speech(0.6, seed=5))
    session.end_speech()
    frames = [await step(session, now) for _ in range(12)]
    first = next(i for i, f in enumerate(frames) if "speech_started" in f.events)
    assert first >= 5 and not any(f.speaking for f in frames[:first])
    assert session.stats()["dropped_frames"] == session.stats()["held_frames"] == 0
    await session.aclose()
