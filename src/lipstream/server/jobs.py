"""Avatar preparation as background jobs: an uploaded video or photo becomes an avatar while the
server keeps streaming. Jobs run one at a time on a worker thread (preparing itself uses a few
threads for decoding, landmarks and PNG writing); `GET /api/jobs/{id}` reports status and progress."""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from lipstream.avatar.layout import avatar_dir, clean_name
from lipstream.avatar.prepare import STAGES, prepare_avatar
from lipstream.errors import AvatarExistsError, JobNotFoundError, LipstreamError, excerpt, shorten
from lipstream.server.http_errors import hide_paths

log = logging.getLogger(__name__)

KEEP_FINISHED_S = 3600.0  # finished jobs stay visible this long
STAGE_SHARE = {"frames": 0.6, "faces": 0.1, "latents": 0.2, "saving": 0.1}  # of a job's progress (no latents: skipped)


@dataclass
class Job:
    """status: "queued", "running", "done" or "failed". progress: 0..1 through every stage of the
    preparation; stage: the one running ("frames", "faces", "latents", "saving"; see `prepare.STAGES`).
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


class AvatarJobs:
    """root/models_root/device: where avatars go, where the VAE is (for MuseTalk latents), and where
    it runs. A new avatar is usable at once: the server loads avatars on first use, and reloads one
    whose folder was replaced."""

    def __init__(self, root: Path, models_root: Path, device: str | None):
        self.root = root
        self.models_root = models_root
        self.device = device
        self._jobs: dict[str, Job] = {}
        self._pending: set[tuple[str, str]] = set()  # (tenant, name) of queued and running jobs
        self._lock = threading.Lock()
        self.uploads = Path(tempfile.mkdtemp(prefix="lipstream-uploads-"))  # where uploads wait for their job
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="lipstream-prepare")

    def upload_path(self, filename: str) -> Path:
        """A fresh path to save an upload to (keeps the file's suffix: the decoder looks at it)."""
        return self.uploads / f"{uuid.uuid4().hex}{Path(filename).suffix.lower()[:10]}"

    def check_name(self, tenant: str, name: str, *, overwrite: bool) -> str:
        """The cleaned name, if a job may make avatar `name` now. Raises AvatarNameError, or
        AvatarExistsError when it exists (without overwrite) or a job for it is queued or running."""
        name = clean_name(name)
        if (tenant, name) in self._pending:
            raise AvatarExistsError(f"avatar {name!r} is being prepared already; poll its job, then retry")
        if not overwrite and avatar_dir(name, tenant, self.root).exists():
            raise AvatarExistsError(f"avatar {name!r} exists already; choose another name, or send "
                                    "overwrite=true to replace it")
        return name

    def submit(self, tenant: str, name: str, source: Path, kind: str, *, fps: float, overwrite: bool,
               source_name: str = "upload") -> Job:
        """Queue preparing avatar `name` from the file `source` (a "video" or a "photo"); the file is
        deleted when the job ends. source_name: the file's own name, as the avatar's manifest and the
        job's errors give it (shortened). Raises what `check_name` raises, at once."""
        with self._lock:
            name = self.check_name(tenant, name, overwrite=overwrite)
            job = Job(uuid.uuid4().hex[:16], tenant, name, kind)
            self._prune()
            self._jobs[job.id] = job
            self._pending.add((tenant, name))
        self._executor.submit(self._run, job, source, shorten(Path(source_name).name, 100), fps, overwrite)
        return job

    def get(self, job_id: str, tenant: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None or job.tenant != tenant:
            raise JobNotFoundError(f"no avatar job {excerpt(job_id)} (finished jobs are kept {KEEP_FINISHED_S:.0f} s)")
        return job

    def _prune(self) -> None:
        now = time.time()
        for job_id in [j.id for j in self._jobs.values() if j.finished and now - j.finished > KEEP_FINISHED_S]:
            del self._jobs[job_id]

    def _run(self, job: Job, source: Path, source_name: str, fps: float, overwrite: bool) -> None:
        job.status = "running"

        def progress(stage: str, done: int, total: int | None) -> None:
            job.stage = stage
            before = sum(STAGE_SHARE[s] for s in STAGES[:STAGES.index(stage)])
            job.progress = min(1.0, before + STAGE_SHARE[stage] * (done / total if total else 0.0))

        try:
            media = {"video": source} if job.kind == "video" else {"image": source}
            prepare_avatar(job.avatar, **media, tenant=job.tenant, root=self.root, fps=fps, overwrite=overwrite,
                           models_root=self.models_root, device=self.device, progress=progress,
                           source_name=source_name)
            job.status, job.progress = "done", 1.0
        except LipstreamError as exc:
            folders = {"avatars": self.root, "models": self.models_root, "uploads": self.uploads}
            job.status, job.error = "failed", hide_paths(str(exc), folders)
        except Exception:  # the server goes on; the log has the details
            log.exception("preparing avatar %r failed", job.avatar)
            job.status, job.error = "failed", ("internal error while preparing the avatar (the server's log "
                                               "says more); try again, or another video or photo")
        finally:
            job.finished = time.time()
            source.unlink(missing_ok=True)
            with self._lock:
                self._pending.discard((job.tenant, job.avatar))

    def shutdown(self) -> None:
        """Drop queued jobs; a running one finishes (its avatar is written whole or not at all)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        shutil.rmtree(self.uploads, ignore_errors=True)
