"""Avatar preparation as background jobs: an uploaded video or photo becomes an avatar while the
server keeps streaming; `GET /api/jobs/{id}` reports status and progress.

Jobs run one at a time on one worker thread, at a low CPU priority (nice 10, which the threads a
preparation starts inherit), pausing between frames while live sessions are behind, so that streaming
keeps its frame rate. Tenants take turns: the next job is the oldest of the tenant served least
recently, and a tenant may have `max_per_tenant` jobs queued or running. At shutdown a running job
gets a grace period to finish; then it stops at its next frame and what it built is removed (avatars
are written whole or not at all); queued jobs are marked failed.

Uploads wait in a temporary folder named after the server's process id; a server that starts removes
those of processes that no longer run (`sweep_upload_folders`)."""

from __future__ import annotations

import itertools
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lipstream.avatar.layout import avatar_dir, clean_name
from lipstream.avatar.prepare import STAGES, prepare_avatar
from lipstream.config import scoped_id
from lipstream.errors import (
    AvatarExistsError,
    JobCancelledError,
    JobLimitError,
    JobNotFoundError,
    LipstreamError,
    excerpt,
    shorten,
)
from lipstream.server.http_errors import hide_paths

log = logging.getLogger(__name__)

KEEP_FINISHED_S = 3600.0  # finished jobs stay visible this long
STAGE_SHARE = {"frames": 0.6, "faces": 0.1, "latents": 0.2, "saving": 0.1}  # of a job's progress (no latents: skipped)
PREPARE_NICE = 10  # CPU priority of preparation threads (0: normal, 19: lowest)
PAUSE_STEP_S = 0.05  # a preparation checks this often whether live sessions caught up
MAX_PAUSE_S = 2.0  # ... and goes on after this long anyway (one frame per MAX_PAUSE_S at worst)
CANCEL_WAIT_S = 60.0  # at shutdown, the longest wait for a stopped preparation to reach its next frame
UPLOADS_PREFIX = "lipstream-uploads-"
_UPLOADS = re.compile(rf"^{UPLOADS_PREFIX}(\d+)-")
STALE_UPLOADS_S = 3600.0  # an uploads folder not named after a process is removed when this old


@dataclass
class Job:
    """status: "queued", "running", "done" or "failed". progress: 0..1 (frames read, then latents).
    error: the reason of a failed job, written for the user."""

    id: str
    tenant: str
    avatar: str
    kind: str
    status: str = "queued"
    progress: float = 0.0
    stage: str = ""
    error: str | None = None
    created: float = field(default_factory=time.time)
    finished: float | None = None

    def public(self) -> dict:
        return {"id": self.id, "avatar": self.avatar, "kind": self.kind, "status": self.status,
                "progress": round(self.progress, 3), "stage": self.stage, "error": self.error,
                "created": self.created, "finished": self.finished}


@dataclass
class _Queued:
    job: Job
    source: Path
    source_name: str
    fps: float
    overwrite: bool


def sweep_upload_folders(temp_dir: str | os.PathLike | None = None) -> list[Path]:
    """Remove the upload folders (`lipstream-uploads-<pid>-*` in the temporary folder) of server
    processes that no longer run, and unnamed ones older than an hour. Returns those removed."""
    base = Path(temp_dir or tempfile.gettempdir())
    removed = []
    for folder in base.glob(f"{UPLOADS_PREFIX}*"):
        if not folder.is_dir() or folder.is_symlink():
            continue
        match = _UPLOADS.match(folder.name)
        if match is not None:
            if _process_runs(int(match.group(1))):
                continue
        elif time.time() - folder.stat().st_mtime < STALE_UPLOADS_S:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def _process_runs(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def lower_thread_priority(nice: int = PREPARE_NICE) -> None:
    """Give the calling thread (Linux: a thread has its own nice value) and the threads it starts
    from now on a lower CPU priority. A no-op where that is not possible."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (AttributeError, OSError):  # not Linux, or not allowed
        pass


class AvatarJobs:
    """root/models_root/device: where avatars go, where the VAE is (for MuseTalk latents), and where
    it runs. max_per_tenant: jobs a tenant may have queued or running. behind(): whether live sessions
    are behind now (a running job pauses between frames while they are). instance: the server's name
    (setting instance), which starts every job id. shared_vae(): the VAE of the server's running
    MuseTalk engine and how to run work on its device worker, (vae, device_call), or None: then a job
    that makes latents loads the VAE itself. A new avatar is usable at once: the server loads avatars
    on first use, and reloads one whose folder was replaced."""

    def __init__(self, root: Path, models_root: Path, device: str | None, *, max_per_tenant: int = 4,
                 behind: Callable[[], bool] = lambda: False, instance: str = "",
                 shared_vae: Callable[[], tuple[Any, Callable[..., Any]] | None] = lambda: None):
        self.root = root
        self.models_root = models_root
        self.device = device
        self.max_per_tenant = max_per_tenant
        self._behind = behind
        self.instance = instance
        self._shared_vae = shared_vae
        self._jobs: dict[str, Job] = {}
        self._queues: dict[str, deque[_Queued]] = {}  # tenant -> its queued jobs, oldest first
        self._served: dict[str, int] = {}  # tenant -> when it last had a job started (a count)
        self._starts = itertools.count()
        self._running: _Queued | None = None
        self._pending: set[tuple[str, str]] = set()  # (tenant, name) of queued and running jobs
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stopping = False
        self._cancel = threading.Event()  # the running job stops at its next frame
        self.uploads = Path(tempfile.mkdtemp(prefix=f"{UPLOADS_PREFIX}{os.getpid()}-"))  # where uploads wait
        self.folders = {"avatars": root, "models": models_root, "uploads": self.uploads}  # named in messages
        self._worker: threading.Thread | None = None
        self.worker_native_id: int | None = None  # of the worker thread, once it runs

    def upload_path(self, filename: str) -> Path:
        """A fresh path to save an upload to (keeps the file's suffix: the decoder looks at it)."""
        return self.uploads / f"{uuid.uuid4().hex}{Path(filename).suffix.lower()[:10]}"

    def check_name(self, tenant: str, name: str, *, overwrite: bool) -> str:
        """The cleaned name, if a job may make avatar `name` now. Raises AvatarNameError, AvatarExistsError
        when it exists (without overwrite) or a job for it is queued or running, and JobLimitError when
        the tenant has as many jobs as it may."""
        with self._lock:
            return self._check(tenant, name, overwrite)

    def _check(self, tenant: str, name: str, overwrite: bool) -> str:
        name = clean_name(name)
        if (tenant, name) in self._pending:
            raise AvatarExistsError(f"avatar {name!r} is being prepared already; poll its job, then retry")
        if not overwrite and avatar_dir(name, tenant, self.root).exists():
            raise AvatarExistsError(f"avatar {name!r} exists already; choose another name, or send "
                                    "overwrite=true to replace it")
        count = sum(1 for pending_tenant, _ in self._pending if pending_tenant == tenant)
        if count >= self.max_per_tenant:
            raise JobLimitError(f"you have {count} avatar jobs queued or running, the most you may have (setting "
                                "max_jobs_per_tenant); wait for one to finish (GET /api/jobs/{id})")
        return name

    def submit(self, tenant: str, name: str, source: Path, kind: str, *, fps: float, overwrite: bool,
               source_name: str = "upload") -> Job:
        """Queue preparing avatar `name` from the file `source` (a "video" or a "photo"); the file is
        deleted when the job ends. source_name: the file's own name, as the avatar's manifest and the
        job's errors give it (shortened). Raises what `check_name` raises, at once."""
        with self._lock:
            if self._stopping:
                raise JobCancelledError("the server is shutting down; upload the file again once it is back")
            name = self._check(tenant, name, overwrite)
            job = Job(scoped_id(self.instance, uuid.uuid4().hex[:16]), tenant, name, kind)
            self._prune()
            self._jobs[job.id] = job
            self._pending.add((tenant, name))
            self._queues.setdefault(tenant, deque()).append(_Queued(job, source, shorten(Path(source_name).name, 100), fps, overwrite))
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="lipstream-prepare", daemon=True)
                self._worker.start()
            self._wake.notify()
        return job

    def get(self, job_id: str, tenant: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None or job.tenant != tenant:
            raise JobNotFoundError(f"no avatar job {excerpt(job_id)} (finished jobs are kept {KEEP_FINISHED_S:.0f} s)")
        return job

    def counts(self, tenant: str) -> dict[str, int]:
        """The tenant's jobs by status (queued, running, done, failed) among those kept."""
        with self._lock:
            jobs = [job for job in self._jobs.values() if job.tenant == tenant]
        return {status: sum(job.status == status for job in jobs) for status in ("queued", "running", "done", "failed")}

    def _prune(self) -> None:
        now = time.time()
        for job_id in [j.id for j in self._jobs.values() if j.finished and now - j.finished > KEEP_FINISHED_S]:
            del self._jobs[job_id]

    def _next(self) -> _Queued:
        """The next job (with the lock held and a job queued): the oldest of the tenant served least
        recently."""
        tenant = min(self._queues, key=lambda t: (self._served.get(t, -1), self._queues[t][0].job.created))
        queue = self._queues[tenant]
        item = queue.popleft()
        if not queue:
            del self._queues[tenant]
        self._served[tenant] = next(self._starts)
        return item

    def _work(self) -> None:
        """The worker thread: runs jobs until shutdown."""
        lower_thread_priority()
        self.worker_native_id = threading.get_native_id()
        while True:
            with self._lock:
                while not self._stopping and not self._queues:
                    self._wake.wait()
                if self._stopping:
                    return
                item = self._running = self._next()
            try:
                self._run(item)
            finally:
                with self._lock:
                    self._running = None

    def _run(self, item: _Queued) -> None:
        job = item.job
        job.status = "running"

        def progress(stage: str, done: int, total: int | None) -> None:
            job.stage = stage
            before = sum(STAGE_SHARE[s] for s in STAGES[:STAGES.index(stage)])
            job.progress = min(1.0, before + STAGE_SHARE[stage] * (done / total if total else 0.0))
            self._between_frames()

        try:
            media = {"video": item.source} if job.kind == "video" else {"image": item.source}
            vae, device_call = self._shared_vae() or (None, None)
            prepare_avatar(job.avatar, **media, tenant=job.tenant, root=self.root, fps=item.fps,
                           overwrite=item.overwrite, models_root=self.models_root, device=self.device,
                           progress=progress, source_name=item.source_name, vae=vae, device_call=device_call)
            job.status, job.progress = "done", 1.0
        except LipstreamError as exc:
            job.status, job.error = "failed", hide_paths(str(exc), self.folders)
        except Exception:  # the server goes on; the log has the details
            log.exception("preparing avatar %r failed", job.avatar)
            job.status, job.error = "failed", ("internal error while preparing the avatar (the server's log "
                                               "says more); try again, or another video or photo")
        finally:
            self._finish(item)

    def _between_frames(self) -> None:
        """Called by a running preparation after each frame: stop if the server stops, and wait (a
        while at most) while live sessions are behind."""
        waited = 0.0
        while True:
            if self._cancel.is_set():
                raise JobCancelledError("the server shut down before this avatar was prepared (what was built "
                                        "is removed); upload the file again")
            if waited >= MAX_PAUSE_S or not self._behind():
                return
            time.sleep(PAUSE_STEP_S)
            waited += PAUSE_STEP_S

    def _finish(self, item: _Queued) -> None:
        item.job.finished = time.time()
        item.source.unlink(missing_ok=True)
        with self._lock:
            self._pending.discard((item.job.tenant, item.job.avatar))

    def shutdown(self, grace_s: float = 0.0) -> None:
        """Stop (blocking): queued jobs are marked failed; a running one has `grace_s` to finish, then
        stops at its next frame, what it built removed. Then the uploads folder is removed."""
        with self._lock:
            self._stopping = True
            queued = [item for queue in self._queues.values() for item in queue]
            self._queues.clear()
            self._wake.notify_all()
            running = self._running
        for item in queued:
            item.job.status = "failed"
            item.job.error = "the server shut down before this job started; upload the file again"
            self._finish(item)
            log.warning("avatar job %s (%r, tenant %r) dropped: the server is shutting down", item.job.id,
                        item.job.avatar, item.job.tenant)
        worker = self._worker
        if worker is not None and running is not None:
            log.info("waiting up to %g s for the preparation of avatar %r to finish", grace_s, running.job.avatar)
            worker.join(grace_s)
            self._cancel.set()
            worker.join(CANCEL_WAIT_S)
        shutil.rmtree(self.uploads, ignore_errors=True)
