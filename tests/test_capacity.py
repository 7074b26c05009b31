"""Admission control: the capacity model (costs measured per stage, sessions counted as speaking,
refusal past the target share of each resource), the scheduler shedding frames that cannot be ready
in time, and the server refusing a session it cannot hold with 503 and Retry-After."""

from __future__ import annotations

import asyncio
import time

import pytest
from fastapi.testclient import TestClient

from lipstream.engines.warp import WarpEngine
from lipstream.errors import OverloadedError
from lipstream.metrics import FRAMES
from lipstream.server.app import create_app
from lipstream.stream.capacity import OVERHEAD_PRIOR_S, Capacity, Demand, Timing, calibrate
from lipstream.stream.scheduler import Scheduler
from server_helpers import server_settings
from stream_helpers import CountingWarp, FakeNow, small_avatar, worker_held

PX_720P = 1280 * 720


def warp_capacity(cores: float = 2.0, target: float = 0.75) -> Capacity:
    """A CPU server whose warp engine takes 4 ms a frame alone and 2 ms a frame in batches of 16; 720p
    compositing 2 ms, encoding 3 ms, features 1 ms a frame, plus the 2 ms overhead prior: 12 ms a
    frame alone, 10 ms in full batches (all on the host)."""
    capacity = Capacity(target=target, max_batch=16, cores=cores)
    capacity.add_engine("warp", on_host=True, composite_on_host=True)
    capacity.observe_engine("warp", 1, Timing(wall=0.005, cpu=0.004))  # host stages are charged their CPU time
    capacity.observe_engine("warp", 16, Timing(wall=0.040, cpu=0.032))
    capacity.observe_composite("warp", 4, PX_720P, Timing(wall=0.009, cpu=0.008))
    capacity.observe_encode(PX_720P, Timing(wall=0.004, cpu=0.003))
    capacity.observe_features("warp", 0, Timing(0.002, 0.002))  # a pass that gave no frame yet: counts with the next
    capacity.observe_features("warp", 3, Timing(0.001, 0.001))
    return capacity


def test_sessions_are_admitted_up_to_the_target_share_of_the_cores():
    capacity = warp_capacity()
    session = Demand("warp", 25, PX_720P, PX_720P)
    report = capacity.report()
    assert report["frame_ms"] == pytest.approx({"engine": 2.0, "features": 1.0, "composite": 2.0, "encode": 3.0,
                                                "overhead": 1000 * OVERHEAD_PRIOR_S})
    # budget 2 x 0.75 = 1.5 cores; n sessions cost n x 25 x (8 + engine(n)) ms, engine(b) = (2.13 + 1.87 b) / b
    # (the line through 4 ms at 1 and 32 ms at 16): 5 sessions 1.29 cores, 6 sessions 1.53
    assert report["free_sessions"] == 5
    tickets = []
    while True:
        try:
            tickets.append(capacity.admit(session))
        except OverloadedError as exc:
            refusal = exc
            break
    assert len(tickets) == report["free_sessions"]
    assert refusal.retry_after_s > 0 and "capacity_target" in str(refusal) and "CPU cores" in str(refusal)
    assert capacity.report()["free_sessions"] == 0 and capacity.report()["load"]["cpu"] <= 1.5
    capacity.release(tickets.pop())
    assert capacity.report()["free_sessions"] == 1
    capacity.admit(session)
    more = capacity.admit(session, enforce=False)  # counted, not refused (admission_control off)
    assert capacity.report()["sessions"] == len(tickets) + 2
    capacity.release(more)
    capacity.release(more)  # idempotent


def test_the_engine_time_per_frame_follows_the_batch_size():
    capacity = warp_capacity()
    one = capacity.report()["load"]
    capacity.admit(Demand("warp", 25, PX_720P, PX_720P))
    alone = capacity.report()["load"]["engine:warp"]
    assert alone == pytest.approx(25 * 0.004, rel=1e-6), "one session: batches of one, 4 ms a frame"
    for _ in range(15):
        capacity.admit(Demand("warp", 25, PX_720P, PX_720P), enforce=False)
    full = capacity.report()["load"]["engine:warp"]
    assert full == pytest.approx(16 * 25 * 0.002, rel=1e-6), "16 sessions fill batches of 16: 2 ms a frame"
    assert one["cpu"] == 0.0


def test_a_larger_output_costs_more_and_a_lone_session_gets_the_whole_machine():
    capacity = warp_capacity(cores=2.0)
    small = Demand("warp", 25, PX_720P, 640 * 360)
    huge = Demand("warp", 25, PX_720P, 7680 * 4320)  # 36x the encoding of 720p: about 2.7 cores
    with pytest.raises(OverloadedError):
        capacity.admit(huge)
    capacity.admit(small)
    five_k = Demand("warp", 25, PX_720P, 5120 * 2880)  # 1.42 cores alone, 1.61 with the small one
    with pytest.raises(OverloadedError):
        capacity.admit(five_k)
    warp_capacity(cores=2.0).admit(five_k)
    busy = warp_capacity(cores=2.0)
    busy._others.append(2.0)  # other processes keep both cores busy: no budget left for sessions
    assert busy.report()["free_sessions"] == 0
    busy.admit(small)  # but a server without sessions takes one that fits its machine
    with pytest.raises(OverloadedError, match="busy with other work"):
        busy.admit(small)


def test_sampling_measures_the_cpu_no_stage_accounts_for():
    """Three one-second samples (shortened) in which 20 frames are shown while this thread burns 0.1 s
    of CPU that no stage reports: about 5 ms a frame, the median of the samples."""
    capacity = warp_capacity()
    capacity.sample()
    for _ in range(3):
        FRAMES.labels("idle").inc(20)
        began = time.process_time()
        while time.process_time() - began < 0.1:
            pass
        capacity.sample()
    assert capacity.report()["frame_ms"]["overhead"] > 2 * 1000 * OVERHEAD_PRIOR_S


def test_calibration_times_every_stage_of_an_engine():
    """`calibrate` (what a server runs as an engine starts) measures the features, the engine,
    compositing and encoding of a 720p frame: after it, each has a cost and free capacity is known."""
    capacity = Capacity(target=0.75, max_batch=4, fps=25)
    encoded = []
    calibrate(capacity, WarpEngine(), encode=lambda frame: encoded.append(frame.shape), max_batch=4)
    report = capacity.report()
    assert encoded and set(encoded) == {(720, 1280, 3)}
    assert all(report["frame_ms"][stage] > 0 for stage in ("engine", "features", "composite", "encode"))
    assert report["free_sessions"] is not None and report["free_fps"] > 0


@pytest.mark.anyio
async def test_frames_that_cannot_be_ready_in_time_are_shed_before_the_engine():
    now = FakeNow()
    engine = CountingWarp()
    capacity = Capacity(cores=2)
    capacity.add_engine(engine.name, on_host=True, composite_on_host=True)
    scheduler = Scheduler(engine, max_batch=16, max_wait_ms=0, capacity=capacity, now=now)
    scheduler.start()
    _, material = small_avatar()

    def cond(value: float):
        import torch

        return torch.full((3,), value)

    first = await scheduler.submit("a", material, 0, cond(0.5), deadline=now.t + 1)  # a batch: a service time
    assert first is not None
    with worker_held(scheduler):
        late = [scheduler.submit("a", material, 0, cond(0.1 * i), deadline=now.t - 0.01) for i in range(3)]
        on_time = scheduler.submit("b", material, 0, cond(0.9), deadline=now.t + 1)
    results = await asyncio.gather(*late, on_time)
    assert results[:3] == [None, None, None] and results[3] is not None
    assert [call[:, 0].tolist() for call in engine.calls] == [[0.5], [pytest.approx(0.9)]], "shed frames cost nothing"
    assert scheduler.stats()["shed"] == 3 and capacity.shed == 3 and capacity.behind()
    await scheduler.aclose()


def test_a_session_the_server_cannot_hold_is_refused_with_503_and_retry_after(root):
    """capacity_target 0.01: 2% of a core, less than any session of the 512x512 avatar at 25 fps needs."""
    headers = {"X-API-Key": "k-default"}
    for admission, expected in ((True, 503), (False, 201)):
        app = create_app(server_settings(root, admission_control=admission, capacity_target=0.01),
                         engine=WarpEngine())
        with TestClient(app) as client:
            while client.get("/ready", headers=headers).status_code != 200:
                time.sleep(0.05)
            assert client.get("/ready", headers=headers).json()["capacity"]["free_sessions"] == 0
            reply = client.post("/api/sessions", json={"avatar": "astronaut"}, headers=headers)
            assert reply.status_code == expected, reply.text
            capacity = client.get("/api/capacity", headers=headers).json()
            assert capacity["admission_control"] is admission
            if expected == 503:
                assert reply.json()["error"] == "OverloadedError" and "at capacity" in reply.json()["detail"]
                assert int(reply.headers["Retry-After"]) > 0
                assert capacity["sessions"] == 0
            else:
                assert capacity["sessions"] == 1 and capacity["load"]["cpu"] > capacity["budget"]["cpu"]
                client.delete(f"/api/sessions/{reply.json()['id']}", headers=headers)
                assert client.get("/api/capacity", headers=headers).json()["sessions"] == 0, "released"


def test_no_session_is_admitted_while_the_open_ones_miss_frames():
    now = [0.0]
    capacity = warp_capacity()
    capacity.now = lambda: now[0]
    session = Demand("warp", 25, PX_720P, PX_720P)
    capacity.admit(session)
    capacity.observe_shed(1)  # a frame of an open session could not be ready in time
    with pytest.raises(OverloadedError, match="missing frames"):
        capacity.admit(session)
    now[0] = 10.0  # none since
    capacity.admit(session)
