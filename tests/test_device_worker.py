"""The device worker's parts (stream.device): lanes, fences, host copies; and, on a GPU, the scheduler's
worker on its own CUDA streams handing back host arrays equal to the CPU's."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
import torch

from lipstream.engines.musetalk import MuseTalkEngine
from lipstream.stream.compositor import Compositor
from lipstream.stream.device import Fence, Lane, to_device, to_host
from lipstream.stream.scheduler import Scheduler
from lipstream.synthetic import moving_avatar
from musetalk_tiny import write_tiny_musetalk

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_a_lane_runs_its_calls_in_order_on_its_own_thread():
    lane = Lane(torch.device("cpu"), "test-lane")
    seen = []
    futures = [lane.submit(lambda i=i: seen.append((i, threading.current_thread().name)) or i) for i in range(5)]
    assert [f.result(5) for f in futures] == list(range(5))
    assert seen == [(i, "test-lane") for i in range(5)] and lane.stream is None
    failing = lane.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failing.result(5)
    lane.close()
    lane.thread.join(5)
    assert not lane.thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        lane.submit(lambda: None).result(5)


def test_on_the_cpu_fences_pass_and_copies_are_the_tensors_themselves():
    fence = Fence(torch.device("cpu"), timing=True).record()
    fence.wait()
    fence.synchronize()
    assert fence.done() and fence.seconds_until(Fence(torch.device("cpu")).record()) is None
    tensor = torch.arange(6)
    assert to_host(tensor) is tensor
    assert torch.equal(to_device(np.arange(6), torch.device("cpu"), torch.float32), tensor.float())


@pytest.fixture(scope="module")
def avatar():
    """A 5-frame 144x256 avatar (no landmarks: nothing here needs the face mesh)."""
    return moving_avatar((144, 256), (90, 20, 170, 120), 5)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("musetalk")
    write_tiny_musetalk(root)
    return root


async def _patches(engine: MuseTalkEngine, compositor: Compositor, material, frames: list[int], audio: np.ndarray):
    """Feature passes and frames through a started scheduler of `engine`: the frames' face patches."""
    scheduler = Scheduler(engine, max_batch=8)
    scheduler.start()
    try:
        await scheduler.run(engine.warmup, 8)
        stream = engine.feature_stream()
        rows = await scheduler.features("s", stream, audio, 0.0) + await scheduler.features("s", stream, None, 0.0)
        results = await asyncio.gather(*[scheduler.submit("s", material, f, rows[i], 1e9 + i, compositor=compositor) for i, f in enumerate(frames)])
        streams = await scheduler.run(lambda: torch.cuda.current_stream() if engine.device.type == "cuda" else None)
        lane = await scheduler.post(lambda: torch.cuda.current_stream() if engine.device.type == "cuda" else None)
        return [r.image for r in results], streams, lane
    finally:
        await scheduler.aclose()


@pytest.mark.anyio
async def test_the_worker_hands_back_host_patches_of_the_engines_faces(tiny_root, avatar):
    """Feature passes and frames through the worker (the tiny MuseTalk on the CPU): each frame comes
    back as a patch in host memory, at its compositor's origin, with a face in it."""
    engine = MuseTalkEngine.load(tiny_root, device="cpu")
    compositor = Compositor(avatar)
    audio = np.random.default_rng(0).standard_normal(12800).astype(np.float32) * 0.1
    patches, _, _ = await _patches(engine, compositor, engine.material(avatar), [0, 1, 2], audio)
    assert all(isinstance(p.pixels, np.ndarray) and (p.x, p.y) == compositor.origins[i] for i, p in enumerate(patches))
    assert all(not np.array_equal(p.paste(compositor.frame(i)), compositor.frame(i)) for i, p in enumerate(patches))


@pytest.mark.gpu
@cuda
@pytest.mark.anyio
async def test_the_cuda_worker_runs_on_its_own_streams_and_hands_back_what_the_cpu_gives(tiny_root, avatar):
    audio = np.random.default_rng(0).standard_normal(12800).astype(np.float32) * 0.1
    frames = [0, 1, 2, 3, 4, 0]
    out = {}
    for device in ("cpu", "cuda"):
        engine = MuseTalkEngine.load(tiny_root, device=device)
        compositor = Compositor(avatar, engine.device)
        out[device] = await _patches(engine, compositor, engine.material(avatar), frames, audio)
    (cpu, _, _), (gpu, worker_stream, post_stream) = out["cpu"], out["cuda"]
    default = torch.cuda.default_stream()
    assert worker_stream != default and post_stream != default and worker_stream != post_stream
    assert post_stream.priority < worker_stream.priority, "compositing's stream goes first"
    for a, b in zip(cpu, gpu):
        assert isinstance(b.pixels, np.ndarray) and (a.x, a.y) == (b.x, b.y)
        assert np.abs(a.pixels.astype(int) - b.pixels.astype(int)).mean() < 2, "fp16 on the GPU, fp32 on the CPU"


@pytest.mark.gpu
@cuda
def test_host_copies_are_pinned_and_complete_after_their_fence():
    lane = Lane(torch.device("cuda"), "copy-lane", priority=-1)

    def copy():
        data = torch.randn(64, 256, 256, 3, device="cuda")
        host = to_host(data)
        Fence(torch.device("cuda")).record().synchronize()
        return data.cpu(), host, torch.cuda.current_stream()

    expected, host, stream = lane.submit(copy).result(60)
    lane.close()
    assert host.is_pinned() and torch.equal(host, expected) and stream == lane.stream


@pytest.mark.gpu
@pytest.mark.slow
@cuda
@pytest.mark.anyio
async def test_cuda_graphs_are_captured_by_the_worker_and_replayed_for_live_batches(tiny_root, avatar):
    """reduce-overhead: warm-up on the worker thread compiles and captures each bucket; live batches
    on the same thread replay them and give the eager engine's faces."""
    audio = np.random.default_rng(1).standard_normal(12800).astype(np.float32) * 0.1
    eager = MuseTalkEngine.load(tiny_root, device="cuda")
    graphs = MuseTalkEngine(eager.models, compile_mode="reduce-overhead")
    material = eager.material(avatar)
    compositor = Compositor(avatar, eager.device)
    want, _, _ = await _patches(eager, compositor, material, [0, 1, 2], audio)
    got, _, _ = await _patches(graphs, compositor, material, [0, 1, 2], audio)
    for a, b in zip(want, got):
        assert np.abs(a.pixels.astype(int) - b.pixels.astype(int)).max() <= 2
