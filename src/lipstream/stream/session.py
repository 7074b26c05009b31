"""A live session: one viewer's avatar, speaking the audio pushed to it, frame by frame on one clock.

    push_audio(chunk) ... end_speech()        an utterance (int16/float32 16 kHz mono)
      -> Scheduler.features (the device worker)        per-frame conditioning; energy gate (here)
      -> Scheduler.submit (frames within `ahead_s` of the clock, deadline = the frame's due time)
      -> engine batch + compositing (the device worker)  -> the frame's face patch, on the host
    next_frame() / frames()                    OutputFrame k: image, the audio it carries, events

The session runs on the event loop and never touches a tensor: feature rows and the avatar's
material are handed to the scheduler as they are, and what comes back is host memory.

Behaviour:
- With no speech queued the avatar's idle cycle plays, untouched; the cycle position only moves on.
- An utterance starts at the first frame at which its frame 0 has its features and its face, and its
  audio starts on that same frame, so sound and mouth stay in step. The face is generated for the
  cycle frame where the idle cycle is expected to be when it is ready (from the scheduler's recent
  latency): if it is ready early, the start waits until the cycle gets there (nothing is shown
  early); if it is late, the idle cycle holds on that frame until it comes (`held_frames`).
- Speech frames continue the cycle; after the utterance the idle cycle continues from there: the
  cycle never jumps.
- Frames whose audio is quieter than `silence_dbfs` (plus `hangover_frames`) show the idle frame
  (the avatar's own closed mouth) while their audio plays.
- A face not ready when its frame is due: the idle frame is shown, its audio plays on time, and the
  frame counts as dropped. A frame whose audio has not arrived yet (the utterance is still open and
  the client is behind): the frame is held, showing the current cycle frame with silence (`stalled`);
  audio and video are held together.
- An utterance the client leaves open (no end_speech()) ends by itself once its speech has run out
  (its next frame waits for audio) and no audio has come for `auto_end_ms`: as end_speech() would.
- `interrupt()` drops queued audio, features and frames; the next frame is idle.
- `switch_avatar()` shows another avatar from the next frame on, without a break: the clock, the frame
  index, the queued speech and the cycle position (modulo the new cycle's length) carry on; faces
  already made for the old avatar are made again for the new one. Its frames may have another size.

Frame k carries the 16 kHz samples [floor(k*16000/fps), floor((k+1)*16000/fps)) of the output
(MediaClock), so audio and video cannot drift apart however long the session runs."""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np

from lipstream.audio import gate
from lipstream.audio.features import check_fps
from lipstream.audio.load import SAMPLE_RATE
from lipstream.avatar.model import Avatar
from lipstream.engines.base import Engine, Material
from lipstream.errors import QueueFullError, SessionClosedError
from lipstream.metrics import ACTIVE_SESSIONS, DROPPED_FRAMES, FIRST_FRAME_SECONDS, FRAMES, STALLED_FRAMES
from lipstream.stream.clock import MediaClock
from lipstream.stream.compositor import Compositor, FacePatch
from lipstream.stream.pcm import to_pcm16
from lipstream.stream.scheduler import FrameResult, Scheduler
from lipstream.stream.utterance import Utterance

log = logging.getLogger(__name__)

EVENTS = ("speech_started", "speech_ended", "interrupted", "avatar_changed")
_FRAMES_BY_KIND = {True: FRAMES.labels("speech"), False: FRAMES.labels("idle")}


@dataclass
class OutputFrame:
    """One frame of a session's output.

    index: frame number since the session started. pts: index / fps, seconds.
    base: the avatar's own frame at this cycle position, uint8 [H, W, 3] BGR, a read-only view (at the
      compositor's size: the streamed size). patch: where this frame differs from `base` (its face),
      or None (idle, silent and late frames show `base` itself). image: the whole frame, uint8
      [H, W, 3] BGR: `base`, or a copy of it with the patch pasted, made on first use (a transport
      that sends patches never makes it); read-only in spirit: do not write to it.
    audio: int16 [n] mono 16 kHz, the samples that play during this frame (n = 16000/fps, give or
      take one): speech, or zeros when idle or stalled.
    speaking: an utterance is playing (also through its silent stretches).
    events: from EVENTS, what happens at this frame: "speech_started" (first frame of an utterance),
      "speech_ended" (first frame after one; also after an interrupted one), "interrupted" (first
      frame after interrupt()), "avatar_changed" (first frame of the avatar switch_avatar() gave).
    cycle: the avatar cycle frame the image is built on (0 <= cycle < len(avatar)).
    avatar: the name of the avatar shown. compositor: the one that made it (its size, its images).
    speech_samples: how many of `audio`'s first samples are the utterance's own audio; the rest is
      silence the session adds (idle and stalled frames, and the end of an utterance's last frame)."""

    index: int
    pts: float
    base: np.ndarray
    audio: np.ndarray
    speaking: bool
    events: list[str]
    cycle: int
    avatar: str
    speech_samples: int
    compositor: Compositor
    patch: FacePatch | None = field(default=None)

    @functools.cached_property
    def image(self) -> np.ndarray:
        return self.base if self.patch is None else self.patch.paste(self.base)


class Session:
    """One viewer of `avatar`, spoken by `engine` through the device's `scheduler` (started).

    fps: output frame rate (int). compositor: a Compositor for `avatar` (share one between the
    sessions of an avatar; made here on the engine's device when None; its `height` is the size of
    the frames). clock: a MediaClock at `fps` (tests inject one with a fake `now`). max_queue_s: most
    unplayed speech held; more raises QueueFullError. material: `engine.material(avatar)` (share it;
    the server makes it on the device worker; computed here, on the calling thread, when None).
    silence_dbfs / hangover_frames: the energy gate (`audio.gate`; hangover None: the engine's
    `silence_hangover_ms`). ahead_s: how far ahead of the clock frames are
    handed to the scheduler. max_lag_s: a consumer of `frames()` further behind than this resumes in
    real time instead of catching up. auto_end_ms: an open utterance whose speech has run out ends by
    itself after this long without audio (None: only end_speech() ends it). session_id: its id (default:
    a random hex UUID).

    Call everything from the event loop the scheduler runs on."""

    def __init__(self, avatar: Avatar, engine: Engine, scheduler: Scheduler, *, fps: int = 25,
                 compositor: Compositor | None = None, clock: MediaClock | None = None, max_queue_s: float = 30.0,
                 material: Material | None = None, silence_dbfs: float = gate.DEFAULT_SILENCE_DBFS,
                 hangover_frames: int | None = None,
                 ahead_s: float = 0.5, max_lag_s: float = 0.5, auto_end_ms: float | None = 600.0,
                 session_id: str | None = None):
        self.fps = check_fps(fps)
        self.clock = clock or MediaClock(fps)
        if self.clock.fps != fps:
            raise ValueError(f"the clock runs at {self.clock.fps} fps, the session at {fps}")
        self.compositor = compositor or Compositor(avatar, engine.device)
        if self.compositor.avatar is not avatar:
            raise ValueError("the compositor was made for another avatar")
        if max_queue_s <= 0 or ahead_s <= 0 or max_lag_s <= 0:
            raise ValueError("max_queue_s, ahead_s and max_lag_s must be > 0")
        if auto_end_ms is not None and auto_end_ms <= 0:
            raise ValueError("auto_end_ms must be > 0 (or None: never)")
        self.id = session_id or uuid.uuid4().hex
        self.avatar = avatar
        self._cycle_length = len(avatar)
        self.engine = engine
        self.scheduler = scheduler
        self.max_queue_s = max_queue_s
        self.max_lag_s = max_lag_s
        self._auto_end_s = None if auto_end_ms is None else auto_end_ms / 1000
        self._material = material if material is not None else engine.material(avatar)
        self._silence_dbfs = silence_dbfs
        self._hangover = gate.hangover_frames(engine.silence_hangover_ms, fps) if hangover_frames is None \
            else hangover_frames
        self._ahead = max(1, round(ahead_s * fps))
        self._stream = engine.feature_stream(fps)
        self._stream_owner: Utterance | None = None
        self._utterances: deque[Utterance] = deque()
        self._k = 0  # next frame index
        self._cycle = 0  # cycle position of the next frame (unbounded; mod len(avatar) to index)
        self._events: list[str] = []
        self._feeder: asyncio.Task | None = None
        self._work = asyncio.Event()
        self._feeder_idle = asyncio.Event()
        self._feeder_idle.set()
        self._closed = False
        self._counts = dict.fromkeys(("frames_sent", "speech_frames", "dropped_frames", "stalled_frames",
                                      "held_frames", "rebases", "utterances", "interrupts", "auto_ended",
                                      "avatar_changes"), 0)
        self._first_frame_ms: float | None = None
        self._first_audio_to_frame_ms: float | None = None
        self._first_stages: dict[str, float] | None = None
        self._first_index: int | None = None  # frame index of the last utterance's first frame
        ACTIVE_SESSIONS.inc()

    # ---- input ----------------------------------------------------------------------------------

    def push_audio(self, samples: np.ndarray, *, max_queue_s: float | None = None) -> None:
        """Append speech to the current utterance (a new one after end_speech()): int16 [n] or float32
        [n] in [-1, 1], mono 16 kHz. Raises QueueFullError (nothing is added) when the unplayed speech
        would exceed `max_queue_s` (default: the session's; a whole file may be allowed more),
        SessionClosedError after close(), ValueError for other arrays."""
        self._check_open()
        pcm = to_pcm16(samples)
        if pcm.shape[0] == 0:
            return
        limit_s = self.max_queue_s if max_queue_s is None else max_queue_s
        queued = sum(utt.queued_samples for utt in self._utterances)
        if queued + pcm.shape[0] > limit_s * SAMPLE_RATE:
            raise QueueFullError(
                f"session {self.id} holds {queued / SAMPLE_RATE:.1f} s of unplayed speech and may hold "
                f"{limit_s:g} s; send audio no faster than it plays, or interrupt() first")
        if not self._utterances or self._utterances[-1].ended:
            self._utterances.append(Utterance(self.fps, self._silence_dbfs, self._hangover))
        self._utterances[-1].append(pcm, self.clock.now())
        self._wake_feeder()

    def end_speech(self) -> None:
        """The current utterance is complete: its last frames are computed (the feature stream is
        flushed) and the next push_audio() starts a new utterance. No-op without an open utterance."""
        self._check_open()
        if self._utterances and not self._utterances[-1].ended:
            self._utterances[-1].ended = True
            self._utterances[-1].ended_at = self.clock.now()
            self._wake_feeder()

    def interrupt(self) -> None:
        """Drop all queued audio, features and pending frames; the next frame is idle and carries the
        event "interrupted" (and "speech_ended" if an utterance was showing)."""
        self._check_open()
        showing = bool(self._utterances) and self._utterances[0].started
        self._drop_speech()
        self._events.append("interrupted")
        if showing:
            self._events.append("speech_ended")
        self._counts["interrupts"] += 1

    def switch_avatar(self, avatar: Avatar, compositor: Compositor, material: Material) -> None:
        """Show `avatar` from the next frame on (that frame carries the event "avatar_changed").
        compositor: a Compositor for it on the engine's device; material: `engine.material(avatar)` of
        this session's engine (share both, as for a new session). Nothing else restarts (see the
        module doc); speech frames due within `ahead_s` may show the idle frame if their new faces are
        not ready in time (counted as dropped)."""
        self._check_open()
        if compositor.avatar is not avatar:
            raise ValueError("the compositor was made for another avatar")
        self.avatar, self.compositor, self._material = avatar, compositor, material
        self._cycle_length = len(avatar)
        self.scheduler.cancel(self.id)
        for utt in self._utterances:
            utt.withdraw_frames()
            utt.submitted = utt.next_j  # their conditioning is kept until shown: submitted again below
        self._events.append("avatar_changed")
        self._counts["avatar_changes"] += 1
        self._submit_ready()

    # ---- output ---------------------------------------------------------------------------------

    async def frames(self) -> AsyncIterator[OutputFrame]:
        """Frames in real time: frame k is yielded when the clock says it is due. Runs until close()."""
        while not self._closed:
            k = self._k
            if self.clock.now() - self.clock.due(k) > self.max_lag_s:
                self.clock.rebase(k)
                self._counts["rebases"] += 1
            await self.clock.wait(k)
            if self._closed:
                return
            yield self.next_frame()

    def next_frame(self) -> OutputFrame:
        """The next frame, built from what is ready now (it never waits: a late face is a dropped
        frame). `frames()` calls it on time; tests that step a fake clock call it directly."""
        self._check_open()
        self._auto_end()
        k = self._k
        events, self._events = self._events, []
        head = self._utterances[0] if self._utterances else None
        if head is not None and not head.started and self._can_start(head):
            self._start(head, events)
        if head is not None and head.started:
            cycle, patch, audio, speech = self._speech_frame(head, k)
            speaking = True
            if head.finished():
                self._utterances.popleft()
                self._events.append("speech_ended")
        else:
            cycle = self._cycle
            if head is not None and head.c0 == cycle:  # its first face is late: hold the cycle for it
                self._counts["held_frames"] += 1
            else:
                self._cycle += 1
            patch = None
            audio = np.zeros(self.clock.audio_samples(k), np.int16)
            speaking, speech = False, 0
        self._k += 1
        self._counts["frames_sent"] += 1
        self._counts["speech_frames"] += speaking
        _FRAMES_BY_KIND[speaking].inc()
        self._submit_ready()
        return OutputFrame(k, self.clock.pts(k), self.compositor.frame(cycle), audio, speaking, events,
                           cycle % self._cycle_length, self.avatar.name, speech, self.compositor, patch)

    @property
    def speaking(self) -> bool:
        """An utterance is showing."""
        return bool(self._utterances) and self._utterances[0].started

    async def settle(self) -> None:
        """Wait until all audio pushed so far has its features and every frame handed to the scheduler
        has its result (tests and benchmarks stepping a fake clock use it; the real-time path never
        waits). Frames further ahead than `ahead_s` are handed over only as next_frame() advances."""
        while not self._closed:
            if not self._feeder_idle.is_set():
                await self._feeder_idle.wait()
                continue
            pending = [f for utt in self._utterances for f in utt.futures.values() if not f.done()]
            if not pending:
                return
            await asyncio.wait(pending)

    def stats(self) -> dict:
        """frames_sent, speech_frames, dropped_frames (late faces, or shed by the scheduler), stalled_frames
        (audio not there yet), held_frames (idle cycle held for a late first face), rebases (frames()
        resumed after falling behind), utterances (started), interrupts, auto_ended (utterances ended
        by `auto_end_ms`), avatar_changes; avatar (the one shown);
        speaking; queue depths: utterances_queued, audio_queued_s, frames_featured (features waiting
        to be shown), frames_in_flight (at the scheduler); first_frame_ms (last utterance: from the
        audio that made its frame 0 computable to that frame being shown), first_audio_to_frame_ms
        (from its first audio) and first_frame_stages_ms, where that time went: audio_wait (first
        audio -> the audio that completed frame 0's features), features (-> its features back),
        queue (-> its engine batch started), engine, composite (-> its face on the host), show (->
        shown: delivery and the frame clock), then encode and send (added by the transport that
        sent it, `record_delivery`)."""
        return {
            "id": self.id,
            "avatar": self.avatar.name,
            **self._counts,
            "speaking": self.speaking,
            "closed": self._closed,
            "utterances_queued": len(self._utterances),
            "audio_queued_s": sum(utt.queued_samples for utt in self._utterances) / SAMPLE_RATE,
            "frames_featured": sum(utt.featured - utt.next_j for utt in self._utterances),
            "frames_in_flight": sum(not f.done() for utt in self._utterances for f in utt.futures.values()),
            "first_frame_ms": self._first_frame_ms,
            "first_audio_to_frame_ms": self._first_audio_to_frame_ms,
            "first_frame_stages_ms": None if self._first_stages is None else dict(self._first_stages),
        }

    def record_delivery(self, index: int, encode_s: float, send_s: float) -> None:
        """A transport's part in frame `index`: encoding it took `encode_s`, sending it `send_s`; kept in
        `first_frame_stages_ms` when it is the last utterance's first frame."""
        if index == self._first_index and self._first_stages is not None:
            self._first_stages.update(encode=1000 * encode_s, send=1000 * send_s)

    # ---- teardown -------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop: withdraw pending frames, cancel the feature task, drop queued speech (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._drop_speech()
        if self._feeder is not None:
            self._feeder.cancel()
        self._work.set()
        self._feeder_idle.set()
        ACTIVE_SESSIONS.dec()

    async def aclose(self) -> None:
        """close(), then wait for the feature task to end."""
        self.close()
        if self._feeder is not None:
            try:
                await self._feeder
            except asyncio.CancelledError:
                pass
            self._feeder = None

    # ---- internals ------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise SessionClosedError(f"session {self.id} is closed; open a new session")

    def _drop_speech(self) -> None:
        for utt in self._utterances:
            utt.cancel()
        self._utterances.clear()
        self.scheduler.cancel(self.id)

    def _auto_end(self) -> None:
        """end_speech() for an open utterance whose speech has run out (every frame with features shown,
        or none has any yet) when no audio has come for `auto_end_ms`."""
        utt = self._utterances[-1] if self._utterances else None
        if self._auto_end_s is None or utt is None or utt.ended:
            return
        ran_out = utt.next_j >= utt.featured and (utt.started or utt.featured == 0)
        if not ran_out or self.clock.now() - utt.last_push_at < self._auto_end_s:
            return
        self.end_speech()
        self._counts["auto_ended"] += 1

    def _can_start(self, utt: Utterance) -> bool:
        """Frame 0 has its features and its face (or is silent), and the cycle reached its frame."""
        if utt.featured == 0:
            return utt.flushed  # less than one frame of audio: it plays over idle frames
        if utt.submitted == 0 or utt.c0 != self._cycle:  # the cycle only moves up to c0 (never past)
            return False
        return not utt.voiced[0] or utt.futures[0].done()

    def _start(self, utt: Utterance, events: list[str]) -> None:
        if utt.c0 is None:
            utt.c0 = self._cycle
        utt.started = True
        events.append("speech_started")
        self._counts["utterances"] += 1
        now = self.clock.now()
        ready_at = utt.frame0_input_at if utt.frame0_input_at is not None else utt.ended_at
        if ready_at is not None:
            self._first_frame_ms = 1000 * (now - ready_at)
            FIRST_FRAME_SECONDS.observe(now - ready_at)
        self._first_audio_to_frame_ms = 1000 * (now - utt.first_push_at)
        self._first_index = self._k
        self._first_stages = _first_frame_stages(utt, now, _result(utt.futures.get(0)))

    def _speech_frame(self, utt: Utterance, k: int) -> tuple[int, FacePatch | None, np.ndarray, int]:
        """Frame k inside a showing utterance: (cycle position, its face patch or None, audio, how many
        of the audio's first samples are the utterance's)."""
        cycle = self._cycle
        j = utt.next_j
        patch = None
        if j < utt.featured:
            if utt.voiced.pop(j):
                future = utt.futures.pop(j, None)
                result = _result(future)  # None as well when the scheduler shed it (it could not be ready in time)
                if result is not None:
                    patch = result.image
                elif future is not None:
                    future.cancel()
                if patch is None:
                    self._counts["dropped_frames"] += 1
                    DROPPED_FRAMES.inc()
            utt.conditioning.pop(j, None)
            utt.submitted = max(utt.submitted, j + 1)
            utt.next_j += 1
        elif not utt.flushed:  # the client is behind: hold audio and video together
            self._counts["stalled_frames"] += 1
            STALLED_FRAMES.inc()
            return cycle, None, np.zeros(self.clock.audio_samples(k), np.int16), 0
        self._cycle += 1
        n = self.clock.audio_samples(k)
        speech = min(n, utt.queued_samples)
        return cycle, patch, utt.take_audio(n), speech

    def _submit_ready(self) -> None:
        """Hand the frames due within `ahead_s` to the scheduler, in display order. An utterance not
        showing yet gets its cycle position here: where the cycle will be when its first face is
        expected to be ready."""
        if self._closed:
            return
        horizon = self._k + self._ahead
        base, cycle_base = self._k, self._cycle  # display index and cycle position of the next frame
        for utt in self._utterances:
            if utt.started:
                first = base - utt.next_j  # display index of frame 0
            else:
                if utt.featured == 0:
                    return
                if utt.c0 is None:  # when frame 0 can be ready, and the frames after it keep pace
                    lead = self.scheduler.expected_latency_s() + self._stream.start_lead_s(utt.pcm.end)
                    expected = self.clock.frame_at(self.clock.now() + lead)
                    utt.c0 = cycle_base + max(0, expected - base)
                first = base + max(0, utt.c0 - cycle_base)
            for j in range(utt.submitted, utt.featured):
                if first + j >= horizon:
                    return
                conditioning = utt.conditioning[j]  # kept until shown (an avatar switch submits it again)
                if utt.voiced[j]:
                    cycle = (utt.c0 + j) % self._cycle_length
                    utt.futures[j] = self.scheduler.submit(self.id, self._material, cycle, conditioning,
                                                           self.clock.due(first + j), compositor=self.compositor)
                utt.submitted = j + 1
            if not utt.flushed:
                return
            frames = self._frames_left(utt, first + utt.next_j)
            base, cycle_base = first + utt.next_j + frames, utt.c0 + utt.next_j + frames

    def _frames_left(self, utt: Utterance, k: int) -> int:
        """Frames a flushed utterance still shows from display index k on: its featured frames, and
        as many more as its remaining audio needs (frame k carries clock.audio_samples(k) of it)."""
        end = self.clock.audio_start(k) + utt.queued_samples
        return max(utt.featured - utt.next_j, -(-end * self.fps // SAMPLE_RATE) - k)

    def _wake_feeder(self) -> None:
        if self._feeder is None:
            self._feeder = asyncio.get_running_loop().create_task(self._feed(), name=f"lipstream-session-{self.id}")
        self._feeder_idle.clear()
        self._work.set()

    def _next_feature_job(self) -> tuple[Utterance, np.ndarray | None] | None:
        """The oldest feature work: (utterance, new audio) or (utterance, None) for its flush."""
        for utt in self._utterances:
            if utt.flushed:
                continue
            if utt.fed < utt.pcm.end:
                chunk = utt.pcm.read(utt.fed, utt.pcm.end)
                utt.fed = utt.pcm.end
                return utt, chunk
            if utt.ended and not utt.flush_sent:
                utt.flush_sent = True
                return utt, None
            return None  # open, or its flush is running: later utterances wait
        return None

    async def _feed(self) -> None:
        """The session's feature task: audio -> features, in order, one pass at a time (on the
        scheduler's worker, batched with the other sessions' passes)."""
        while not self._closed:
            job = self._next_feature_job()
            if job is None:
                self._feeder_idle.set()
                self._work.clear()
                await self._work.wait()
                continue
            utt, chunk = job
            if self._stream_owner is not utt:
                self._stream.reset()
                self._stream_owner = utt
            input_at = utt.last_push_at if chunk is not None else utt.ended_at
            try:
                rows = await self.scheduler.features(self.id, self._stream, chunk, self._feature_deadline(utt))
            except asyncio.CancelledError:
                if self._closed or utt.cancelled:
                    continue
                raise
            except Exception:
                if utt.cancelled:
                    continue
                log.exception("session %s: the feature stream failed; the utterance plays without a face", self.id)
                utt.flushed = True
                continue
            if utt.cancelled:
                continue
            utt.add_features(rows, input_at, self.clock.now())
            if chunk is None:
                utt.flushed = True
            self._submit_ready()

    def _feature_deadline(self, utt: Utterance) -> float:
        """When a pass of `utt` is due: at once before it shows (its first frame waits for it), else when
        its next frame without features must go to the engine."""
        if not utt.started or not self._utterances or self._utterances[0] is not utt:
            return self.clock.now()
        return self.clock.due(self._k + utt.featured - utt.next_j) - self.scheduler.expected_latency_s()


def _result(future: asyncio.Future | None) -> FrameResult | None:
    """A frame's result once the scheduler made it; None while pending, when withdrawn, failed or shed."""
    if future is None or not future.done() or future.cancelled() or future.exception() is not None:
        return None
    return future.result()


def _first_frame_stages(utt: Utterance, shown_at: float, result: FrameResult | None) -> dict[str, float]:
    """Where an utterance's first frame spent its time (see `Session.stats`), in ms."""
    stages: dict[str, float] = {}
    if utt.frame0_input_at is not None:
        stages["audio_wait"] = 1000 * (utt.frame0_input_at - utt.first_push_at)
    if utt.frame0_featured_at is not None and utt.frame0_input_at is not None:
        stages["features"] = 1000 * (utt.frame0_featured_at - utt.frame0_input_at)
    rest = 1000 * (shown_at - (utt.frame0_featured_at or shown_at))
    if result is not None:
        stages.update(queue=1000 * result.queued_s, engine=1000 * result.engine_s,
                      composite=1000 * result.composite_s)
        rest -= 1000 * (result.queued_s + result.engine_s + result.composite_s)
    stages["show"] = max(0.0, rest)
    return stages
