"""Shared by the session and scheduler tests: a small avatar with the warp engine, a fake clock, speech."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from functools import lru_cache

import numpy as np

from lipstream.avatar.model import Avatar
from lipstream.engines.base import Material
from lipstream.engines.warp import WarpEngine
from lipstream.stream.clock import MediaClock
from lipstream.stream.compositor import Compositor
from lipstream.stream.scheduler import Scheduler
from lipstream.stream.session import OutputFrame, Session
from lipstream.synthetic import moving_avatar
from lipstream.synthetic import speech as speech_like

CYCLE = 5


@lru_cache(maxsize=1)
def small_avatar() -> tuple[Avatar, Material]:
    """A 5-frame 144x256 avatar from the astronaut photo (the face moves 2 px a frame) and its warp
    material (face-mesh landmarks of its crops, computed once per test process)."""
    avatar = moving_avatar((144, 256), (90, 20, 170, 120), CYCLE)
    return avatar, WarpEngine().material(avatar)


class CountingWarp(WarpEngine):
    """The warp engine, recording the conditioning of every generate call (one tensor per call)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def generate(self, material, conditioning):
        self.calls.append(conditioning.clone())
        return super().generate(material, conditioning)


class GatedWarp(CountingWarp):
    """The warp engine, but each generate call first takes a permit from `permits` (released by the
    test), so a test decides when faces are late."""

    def __init__(self):
        super().__init__()
        self.permits = threading.Semaphore(0)
        self.entered = threading.Event()  # a generate call is waiting for (or has had) its permit

    def generate(self, material, conditioning):
        self.entered.set()
        if not self.permits.acquire(timeout=20):
            raise TimeoutError("the test never released the engine")
        return super().generate(material, conditioning)


class FakeNow:
    """A settable clock for MediaClock(now=...)."""

    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def speech(seconds: float, seed: int = 0) -> np.ndarray:
    """Speech-like int16 [n] at 16 kHz, RMS about -20 dBFS (a new array each call)."""
    return _speech(seconds, seed).copy()


def voiced_speech(seconds: float, seed: int = 0) -> np.ndarray:
    """`speech` over a steady 150 Hz hum at -33 dBFS, so that no frame is below the -45 dBFS gate."""
    audio = speech(seconds, seed).astype(np.int32)
    audio += np.round(1000 * np.sin(2 * np.pi * 150 * np.arange(audio.shape[0]) / 16000)).astype(np.int32)
    return np.clip(audio, -32768, 32767).astype(np.int16)


@lru_cache(maxsize=64)
def _speech(seconds: float, seed: int) -> np.ndarray:
    return np.round(speech_like(seconds, seed=seed) * 32767).astype(np.int16)


def make_session(engine, scheduler: Scheduler, now: FakeNow | None = None, **kwargs) -> Session:
    """A session of the small avatar on a CPU compositor; with a fake clock when `now` is given."""
    avatar, material = small_avatar()
    clock = MediaClock(25, now=now) if now is not None else None
    kwargs.setdefault("material", material)  # the warp engine's, unless given
    return Session(avatar, engine, scheduler, compositor=Compositor(avatar), clock=clock, **kwargs)


async def step(session: Session, now: FakeNow) -> OutputFrame:
    """Wait for the session's pending work, move the fake clock to the next frame's due time, take it."""
    await session.settle()
    now.t = session.clock.due(session.stats()["frames_sent"])
    return session.next_frame()


async def until(condition, timeout: float = 20.0) -> None:
    """Poll `condition()` on the event loop until it holds (a TimeoutError otherwise)."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.002)


@contextlib.contextmanager
def worker_held(scheduler: Scheduler) -> Iterator[None]:
    """Keep the scheduler's worker busy (on a task) while the block runs, so that everything the block
    submits is waiting when the worker looks again, as a burst of sessions' work would be."""
    entered, release = threading.Event(), threading.Event()
    scheduler.call(lambda: (entered.set(), release.wait(20)))
    if not entered.wait(20):
        raise TimeoutError("the worker never took the holding task")
    try:
        yield
    finally:
        release.set()
