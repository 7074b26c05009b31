"""The server's engines: loaded once, each with the one scheduler (its device's worker) that batches
all its sessions.

The default engine (setting `engine`) loads at start; a session may ask for another by name, which
then loads on first use and stays. As an engine starts, its scheduler's worker warms it up (every
batch size compiled, CUDA graphs captured, cuDNN's convolutions chosen, on the thread that will run
them) and times each stage once (`calibrate`); the server is ready only after that. Its scheduler
keeps the timings current, for the server's capacity."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from lipstream.config import Settings
from lipstream.engines.base import Engine
from lipstream.engines.select import load_engine
from lipstream.stream.capacity import Capacity, calibrate
from lipstream.stream.scheduler import Scheduler

log = logging.getLogger(__name__)


def load_engine_for(settings: Settings, name: str) -> tuple[Engine, str]:
    """`load_engine(name)` on the settings' models root, device, dtype and compile mode: (engine, why it
    runs). Its scheduler sets the device's backend flags and warms it up (`Scheduler.warm_start`)."""
    device = None if settings.device == "auto" else settings.device
    dtype = None if settings.dtype == "auto" else getattr(torch, settings.dtype)
    compile_mode = None if settings.compile_mode == "none" else settings.compile_mode
    return load_engine(name, settings.models_root, device, dtype, compile_mode)


@dataclass
class EngineSlot:
    """An engine, why it runs (one line), and its scheduler."""

    engine: Engine
    reason: str
    scheduler: Scheduler


class EngineHub:
    """engine: an engine loaded already, the default instead of loading the one the settings name;
    reason: why it runs. capacity: where the engines' stage timings go; encode_probe(frame uint8
    [H, W, 3] BGR): the work of encoding one streamed frame, timed when an engine is calibrated."""

    def __init__(self, settings: Settings, engine: Engine | None = None, reason: str | None = None, *,
                 capacity: Capacity, encode_probe: Callable[[np.ndarray], object]):
        self.settings = settings
        self.capacity = capacity
        self._encode_probe = encode_probe
        self._given = engine
        self._given_reason = reason
        self._slots: dict[str, EngineSlot] = {}
        self._lock = asyncio.Lock()
        self.default: EngineSlot | None = None

    async def _start(self, engine: Engine, reason: str) -> EngineSlot:
        scheduler = Scheduler(engine, max_batch=self.settings.max_batch, max_wait_ms=self.settings.max_wait_ms,
                              capacity=self.capacity)
        await scheduler.warm_start()
        try:
            await scheduler.run(functools.partial(calibrate, self.capacity, engine, encode=self._encode_probe,
                                                  max_batch=self.settings.max_batch, fps=self.settings.fps))
        except Exception:  # a server without figures still serves: it learns its costs as it runs
            log.exception("timing engine %s's stages failed; its capacity is learnt from the sessions", engine.name)
            on_host = engine.device.type == "cpu"
            self.capacity.add_engine(engine.name, on_host=on_host, composite_on_host=on_host)
        slot = EngineSlot(engine, reason, scheduler)
        self._slots[engine.name] = slot
        return slot

    async def start(self) -> EngineSlot:
        """Load (unless given), time and start the default engine."""
        if self._given is not None:
            self.default = await self._start(self._given, self._given_reason or f"engine {self._given.name}: given")
        else:
            engine, reason = await asyncio.to_thread(load_engine_for, self.settings, self.settings.engine)
            log.info("%s", reason)
            self.default = await self._start(engine, reason)
        return self.default

    async def get(self, name: str = "auto") -> EngineSlot:
        """The engine `name` ("auto": the default), loading it on first use. Raises what `load_engine`
        raises (MissingWeightsError for musetalk without its weights)."""
        if self.default is None:
            raise RuntimeError("the engines are not started")
        if name == "auto" or name == self.default.engine.name:
            return self.default
        async with self._lock:
            if name not in self._slots:
                engine, reason = await asyncio.to_thread(load_engine_for, self.settings, name)
                log.info("%s", reason)
                await self._start(engine, reason)
            return self._slots[name]

    def shared_vae(self) -> tuple[object, Callable[..., object]] | None:
        """The running MuseTalk engine's VAE and a way to run work on its device worker (blocking, from
        any thread): (vae, device_call), or None when no MuseTalk engine runs. Avatar jobs use it
        rather than load a second VAE."""
        slot = self._slots.get("musetalk")
        if slot is None or not slot.scheduler.running:
            return None
        return slot.engine.models.vae, lambda fn, *args: slot.scheduler.call(fn, *args).result()

    async def aclose(self) -> None:
        for slot in self._slots.values():
            await slot.scheduler.aclose()
        self._slots.clear()
