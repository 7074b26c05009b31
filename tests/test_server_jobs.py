"""Avatar preparation jobs: per-tenant caps, tenants taking turns, a low CPU priority and pauses while
live sessions are behind, and shutdown (a running job finishes within the grace period or is stopped
with nothing left behind; queued jobs fail); upload folders of servers that are gone are removed."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import cv2
import pytest

from lipstream.avatar.layout import tenant_dir
from lipstream.errors import JobLimitError
from lipstream.server.jobs import MAX_PAUSE_S, PREPARE_NICE, AvatarJobs, sweep_upload_folders
from lipstream.synthetic import write_face_video


@pytest.fixture(scope="module")
def photo(tmp_path_factory, astronaut_bgr) -> Path:
    path = tmp_path_factory.mktemp("media") / "astronaut.png"
    cv2.imwrite(str(path), astronaut_bgr)
    return path


@pytest.fixture(scope="module")
def video(tmp_path_factory, astronaut_bgr) -> Path:
    """4 s of the astronaut swaying, 240x320: 100 frames, a few seconds to prepare."""
    return write_face_video(tmp_path_factory.mktemp("media") / "astronaut.mp4", astronaut_bgr, (240, 320), seconds=4)


def submit(jobs: AvatarJobs, tenant: str, name: str, source: Path, kind: str = "photo"):
    upload = jobs.upload_path(source.name)
    shutil.copyfile(source, upload)
    return jobs.submit(tenant, name, upload, kind, fps=25, overwrite=False)


def wait_until(predicate, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_tenants_take_turns_within_their_caps_at_a_low_priority(tmp_path, photo):
    jobs = AvatarJobs(tmp_path, tmp_path / "no-models", "cpu", max_per_tenant=3)
    try:
        a = [submit(jobs, "a", f"a{i}", photo) for i in range(3)]
        with pytest.raises(JobLimitError, match="max_jobs_per_tenant"):
            submit(jobs, "a", "a3", photo)
        b = submit(jobs, "b", "b0", photo)  # another tenant has its own cap
        wait_until(lambda: all(job.status in ("done", "failed") for job in [*a, b]))
        assert all(job.status == "done" for job in [*a, b]), [job.error for job in [*a, b]]
        order = [job.avatar for job in sorted([*a, b], key=lambda job: job.finished)]
        assert order == ["a0", "b0", "a1", "a2"], "b's job does not wait for all of a's"
        assert os.getpriority(os.PRIO_PROCESS, jobs.worker_native_id) == PREPARE_NICE
        assert jobs.counts("a") == {"queued": 0, "running": 0, "done": 3, "failed": 0}
        submit(jobs, "a", "a3", photo)  # room again
    finally:
        jobs.shutdown(grace_s=60)


def test_a_preparation_pauses_while_live_sessions_are_behind(tmp_path, photo):
    behind = threading.Event()
    behind.set()
    jobs = AvatarJobs(tmp_path, tmp_path / "no-models", "cpu", behind=behind.is_set)
    try:
        began = time.monotonic()
        job = submit(jobs, "", "paused", photo)
        wait_until(lambda: job.status == "done")
        assert time.monotonic() - began >= MAX_PAUSE_S, "its one frame waited for the sessions (at most 2 s)"
    finally:
        jobs.shutdown()


def test_shutdown_stops_a_running_preparation_and_fails_the_queued_ones(tmp_path, video, photo):
    jobs = AvatarJobs(tmp_path, tmp_path / "no-models", "cpu")
    running = submit(jobs, "", "long", video, "video")
    queued = submit(jobs, "other", "next", photo)
    wait_until(lambda: running.progress > 0.05)
    uploads = jobs.upload_path("x").parent
    jobs.shutdown(grace_s=0.2)
    assert running.status == "failed" and "shut down" in running.error
    assert queued.status == "failed" and "upload the file again" in queued.error
    for tenant in ("", "other"):
        base = tenant_dir(tenant, tmp_path)
        assert not base.exists() or not any(base.iterdir()), "nothing half-built is left"
    assert not uploads.exists()


def test_shutdown_lets_a_running_preparation_finish_within_the_grace_period(tmp_path, photo):
    jobs = AvatarJobs(tmp_path, tmp_path / "no-models", "cpu")
    job = submit(jobs, "", "quick", photo)
    wait_until(lambda: job.status != "queued")
    jobs.shutdown(grace_s=60)
    assert job.status == "done"
    assert (tenant_dir("", tmp_path) / "quick" / "lipstream.json").is_file()


def test_upload_folders_of_servers_that_are_gone_are_removed(tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = tmp_path / f"lipstream-uploads-{gone.pid}-abc"
    alive = tmp_path / f"lipstream-uploads-{os.getpid()}-def"
    unnamed_old, unnamed_new = tmp_path / "lipstream-uploads-x1y2", tmp_path / "lipstream-uploads-z3w4"
    for folder in (dead, alive, unnamed_old, unnamed_new):
        folder.mkdir()
        (folder / "upload.mp4").write_bytes(b"x")
    old = time.time() - 2 * 3600
    os.utime(unnamed_old, (old, old))
    assert sorted(sweep_upload_folders(tmp_path)) == sorted([dead, unnamed_old])
    assert alive.is_dir() and unnamed_new.is_dir()


@pytest.mark.slow
def test_sigterm_stops_a_running_preparation_and_removes_what_it_built(tmp_path, astronaut_bgr, photo):
    """`lipstream serve` gets SIGTERM while it prepares an avatar from a video, with a photo job
    queued behind it: after the grace period the preparation stops, its build folder is removed, the
    queued job is reported failed in the log, and the server exits."""
    import signal
    import sys

    import httpx

    from lipstream.bench.serve import free_port

    video = write_face_video(tmp_path / "long.mp4", astronaut_bgr, (240, 320), seconds=16)  # 400 frames
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "lipstream.cli", "serve", "--host", "127.0.0.1", "--port",
                               str(port), "--avatars-root", str(tmp_path / "avatars"), "--api-keys", "k=",
                               "--engine", "warp",
                               "--shutdown-grace-s", "0.3"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    try:
        wait_until(lambda: _ready(url), timeout_s=120)
        with httpx.Client(base_url=url, headers={"X-API-Key": "k"}, timeout=30) as http:
            running = http.post("/api/avatars", data={"name": "long"},
                                files={"file": ("long.mp4", video.read_bytes(), "video/mp4")}).json()["job"]
            http.post("/api/avatars", data={"name": "next"}, files={"file": ("p.png", photo.read_bytes(), "image/png")})
            wait_until(lambda: http.get(f"/api/jobs/{running['id']}").json()["progress"] > 0.05)
        server.send_signal(signal.SIGTERM)
        out, _ = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
    assert server.returncode in (0, -signal.SIGTERM), out
    assert "waiting up to 0.3 s for the preparation of avatar 'long'" in out
    assert "dropped: the server is shutting down" in out and "Application shutdown complete" in out
    base = tenant_dir("", tmp_path / "avatars")
    assert not base.exists() or not any(base.iterdir()), f"left behind: {list(base.iterdir())}"


def _ready(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/ready", headers={"X-API-Key": "k"}, timeout=5).status_code == 200
    except httpx.TransportError:
        return False
