"""The server's avatar library: avatars load on first use, what an engine derives from one is made
once however many sessions ask at the same time, a deleted avatar leaves nothing behind in memory,
and unused avatars are unloaded over the memory budget."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref

import pytest

from lipstream.engines.warp import WarpEngine
from lipstream.errors import AvatarNotFoundError
from lipstream.server.avatars import AvatarLibrary
from server_helpers import store_avatar


class SlowWarp(WarpEngine):
    """The warp engine, counting its material calls, each taking at least `delay_s` (time for another
    request to arrive while one is being made)."""

    def __init__(self, delay_s: float = 0.3):
        super().__init__()
        self.delay_s = delay_s
        self.calls = 0
        self.started = threading.Event()

    def material(self, avatar):
        self.calls += 1
        self.started.set()
        time.sleep(self.delay_s)
        return super().material(avatar)


@pytest.fixture
def root(tmp_path):
    store_avatar(tmp_path, "astronaut")
    store_avatar(tmp_path, "second")
    return tmp_path


def test_two_first_requests_for_an_avatar_make_its_material_once(root):
    engine = SlowWarp()
    library = AvatarLibrary(root)

    async def both():
        return await asyncio.gather(library.get("astronaut", "", engine), library.get("astronaut", "", engine))

    first, second = asyncio.run(both())
    assert engine.calls == 1
    assert all(a is b for a, b in zip(first, second)), "the same avatar, compositor and material"
    assert library.loaded == 1


def test_deleting_an_avatar_while_it_loads_keeps_nothing_of_it(root):
    """delete() during a first get(): the get still answers its caller, but once that caller lets go
    nothing of the deleted avatar stays in memory (no entry written back after the delete)."""
    engine = SlowWarp()
    library = AvatarLibrary(root)

    async def race() -> weakref.ref:
        getting = asyncio.create_task(library.get("astronaut", "", engine))
        while not engine.started.is_set():
            await asyncio.sleep(0.01)
        await library.delete("astronaut", "")
        avatar, _, _ = await getting
        return weakref.ref(avatar)

    avatar = asyncio.run(race())
    gc.collect()
    assert avatar() is None, "the deleted avatar is still referenced"
    assert library.loaded == 0
    with pytest.raises(AvatarNotFoundError):
        asyncio.run(library.get("astronaut", "", engine))


def test_avatars_not_shown_are_unloaded_over_the_budget(root):
    shown: set[tuple[str, str]] = set()
    library = AvatarLibrary(root, max_bytes=0, in_use=lambda: shown)
    engine = WarpEngine()

    async def get(name):
        return await library.get(name, "", engine)

    asyncio.run(get("astronaut"))
    assert library.loaded == 0, "over the budget and not shown: unloaded at once"
    shown.add(("", "astronaut"))
    asyncio.run(get("astronaut"))
    asyncio.run(get("second"))
    assert library.loaded == 1 and library.nbytes > 0, "the shown avatar stays, the other goes"
