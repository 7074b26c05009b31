"""The thread pool of per-frame work: JPEG encoding of WebSocket frames and the conversion of WebRTC
frames. It is the server's own (one per app, its threads made on first use, sized by the CPU count),
so a burst of frames never queues behind, nor holds up, what else runs on asyncio's default executor
(avatar loads, uploads, audio decoding)."""

from __future__ import annotations

import asyncio
import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from lipstream.metrics import STAGE_SECONDS
from lipstream.stream.capacity import Capacity, timed

T = TypeVar("T")


def default_workers() -> int:
    """One thread per CPU core, at least 2 and at most 8 (encoding releases the GIL; more threads than
    cores only queue in the OS instead)."""
    return max(2, min(8, os.cpu_count() or 2))


class EncodingPool:
    """`await pool.run(fn, *args)` runs fn(*args) on the pool's threads; `await pool.encode(pixels, fn,
    *args)` too, timed as the "encode" stage of a frame of `pixels` pixels (reported to `capacity`).
    `shutdown()` (at app shutdown) stops them; running it afterwards raises RuntimeError."""

    def __init__(self, workers: int | None = None, capacity: Capacity | None = None):
        self.workers = workers or default_workers()
        self.capacity = capacity
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._shut = False

    def executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._shut:
                raise RuntimeError("the encoding pool is shut down (the server is stopping)")
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="lipstream-encode")
            return self._executor

    async def run(self, fn: Callable[..., T], /, *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor(), functools.partial(fn, *args))

    async def encode(self, pixels: int, fn: Callable[..., T], /, *args: Any) -> T:
        return await self.run(self._timed, pixels, fn, *args)

    def _timed(self, pixels: int, fn: Callable[..., T], *args: Any) -> T:
        result, timing = timed(fn, *args)
        STAGE_SECONDS.labels("encode").observe(timing.wall)
        if self.capacity is not None:
            self.capacity.observe_encode(pixels, timing)
        return result

    def shutdown(self, wait: bool = False) -> None:
        """Stop the threads: work not started is cancelled; with `wait`, what runs is waited for."""
        with self._lock:
            executor, self._executor, self._shut = self._executor, None, True
        if executor is not None:
            executor.shutdown(wait=wait, cancel_futures=True)
