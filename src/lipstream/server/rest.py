"""The REST API: avatars (list, upload -> background job, delete), sessions (create, list, close,
audio, interrupt, stats) and the server's own state (health, readiness, capacity, the tenant's stats,
metrics, client config). Every route but /health needs an API key (see `auth`); /metrics needs the
metrics key."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, File, Form, Query, Request, Response, UploadFile
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field, field_validator

from lipstream.audio.load import SAMPLE_RATE, decode_pcm16, load_audio
from lipstream.config import Settings, check_output_height, scoped_id
from lipstream.engines import ENGINE_NAMES
from lipstream.errors import (
    AudioTooLongError,
    BadRequestError,
    NotReadyError,
    OutputTooLargeError,
    OverloadedError,
)
from lipstream.server.auth import Caller, CallerDep, require_metrics_key
from lipstream.server.registry import OpenSession
from lipstream.stream.capacity import RETRY_AFTER_S, Demand
from lipstream.stream.session import Session

router = APIRouter()

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
PCM_TYPES = {"audio/l16", "audio/pcm"}
GENERIC_TYPES = {"", "application/octet-stream"}  # raw PCM, unless the body starts like an audio file


def _state(request: Request):
    return request.app.state


def _require_ready(request: Request) -> None:
    state = _state(request)
    if state.startup_error is not None:
        raise NotReadyError(f"the server could not load its engine ({state.startup_error}); fix it and "
                            "restart the server (the log says more)")
    if not state.ready.is_set():
        raise NotReadyError("the server is still loading its engine and avatars; retry in a few seconds "
                            "(GET /ready says when it is done)")


# ---- the server ----------------------------------------------------------------------------------

@router.get("/health")
async def health() -> dict:
    """Alive (no key needed)."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request, caller: CallerDep) -> JSONResponse:
    """200 once the engine is loaded and timed, else 503 with what is missing (or while it drains); with
    the server's name (setting instance), the free capacity (frames/s and sessions at 720p and the default
    frame rate) and how many avatars are in memory."""
    state = _state(request)
    if state.startup_error is not None:
        return JSONResponse({"ready": False, "error": state.startup_error}, status_code=503)
    if not state.ready.is_set():
        return JSONResponse({"ready": False, "loading": "engine"}, status_code=503)
    if state.draining:
        return JSONResponse({"ready": False, "draining": True, "sessions": len(state.sessions)}, status_code=503)
    slot = state.engines.default
    capacity = state.capacity.report()
    return JSONResponse({"ready": True, "instance": state.settings.instance or None, "engine": slot.engine.name,
                         "reason": slot.reason,
                         "device": str(slot.engine.device), "avatars_loaded": state.avatars.loaded,
                         "capacity": {key: capacity[key] for key in ("free_fps", "free_sessions", "sessions")}})


@router.get("/api/capacity")
async def capacity(request: Request, caller: CallerDep) -> dict:
    """The server's capacity and load (see `lipstream.stream.capacity.Capacity.report`)."""
    _require_ready(request)
    state = _state(request)
    return {"admission_control": state.settings.admission_control, **state.capacity.report()}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus text format; needs the metrics key (setting metrics_key)."""
    require_metrics_key(request)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


@router.get("/api/stats")
async def tenant_stats(request: Request, caller: CallerDep) -> dict:
    """The caller's tenant's own figures: its open sessions (with viewers), their frames, and its avatar jobs."""
    return {"tenant": caller.tenant, **tenant_figures(_state(request), caller.tenant)}


TENANT_COUNTS = ("sessions", "viewers", "frames_sent", "speech_frames", "dropped_frames", "stalled_frames",
                 "utterances")


def tenant_figures(state, tenant: str) -> dict:
    """The server's (the app's `state`) figures of `tenant`: TENANT_COUNTS, and "jobs" by status."""
    entries = state.sessions.for_tenant(tenant)
    stats = [entry.session.stats() for entry in entries]
    totals = {key: sum(s[key] for s in stats) for key in TENANT_COUNTS[2:]}
    return {"sessions": len(entries), "viewers": sum(entry.viewer is not None for entry in entries), **totals,
            "jobs": state.jobs.counts(tenant)}


@router.get("/api/config")
async def client_config(request: Request, caller: CallerDep) -> dict:
    """What a client needs to connect: ICE servers, defaults, the caller's tenant."""
    settings = _state(request).settings
    return {"ice_servers": settings.ice_servers, "fps": settings.fps, "sample_rate": SAMPLE_RATE,
            "tenant": caller.tenant, "max_upload_bytes": settings.max_upload_bytes,
            "max_audio_seconds": settings.max_audio_seconds}


# ---- avatars ---------------------------------------------------------------------------------------

@router.get("/api/avatars")
async def list_avatars(request: Request, caller: CallerDep) -> dict:
    return {"avatars": await asyncio.to_thread(_state(request).avatars.list, caller.tenant)}


@router.post("/api/avatars", status_code=202)
async def create_avatar(request: Request, caller: CallerDep, file: Annotated[UploadFile, File()],
                        name: Annotated[str, Form()], fps: Annotated[float, Form(gt=0, le=60)] = 25.0,
                        kind: Annotated[Literal["auto", "video", "photo"], Form()] = "auto",
                        overwrite: Annotated[bool, Form()] = False) -> dict:
    """Prepare an avatar from an uploaded video or photo in the background; poll the returned job."""
    jobs = _state(request).jobs
    jobs.check_name(caller.tenant, name, overwrite=overwrite)  # before storing a large upload
    filename = file.filename or "upload"
    if kind == "auto":
        is_photo = (file.content_type or "").startswith("image/") or Path(filename).suffix.lower() in PHOTO_SUFFIXES
        kind = "photo" if is_photo else "video"
    path = jobs.upload_path(filename)
    await asyncio.to_thread(_save_upload, file, path)
    try:
        job = jobs.submit(caller.tenant, name, path, kind, fps=fps, overwrite=overwrite, source_name=filename)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return {"job": job.public(), "url": f"/api/jobs/{job.id}"}


def _save_upload(file: UploadFile, path: Path) -> None:
    with path.open("wb") as out:
        shutil.copyfileobj(file.file, out, 1 << 20)


@router.delete("/api/avatars/{name}", status_code=204)
async def delete_avatar(name: str, request: Request, caller: CallerDep) -> None:
    await _state(request).avatars.delete(name, caller.tenant)


@router.get("/api/jobs/{job_id}")
async def get_job(job_id: str, request: Request, caller: CallerDep) -> dict:
    return _state(request).jobs.get(job_id, caller.tenant).public()


# ---- sessions --------------------------------------------------------------------------------------

class SessionRequest(BaseModel):
    avatar: str = Field(description="name of one of the tenant's avatars")
    fps: int | None = Field(None, ge=1, le=50, description="frame rate (default: setting fps)")
    engine: Literal[ENGINE_NAMES] = Field("auto", description='"auto": the server\'s engine')
    output_height: int | None = Field(None, ge=0, le=4320, description="streamed frame height (default: "
                                                                       "setting output_height; 0: the avatar's)")

    @field_validator("output_height")
    @classmethod
    def _usable_height(cls, value: int | None) -> int | None:
        return None if value is None else check_output_height(value)


def describe_session(entry: OpenSession) -> dict:
    """A session as the API gives it. "ws" and "offer": where its viewer connects, paths on the server's
    address, or absolute URLs on the server's own (setting public_url)."""
    base = entry.public_url  # "" or http(s)://host:port (its setting's check took any trailing /)
    ws_base = base.replace("http", "ws", 1)
    return {"id": entry.id, "avatar": entry.avatar, "engine": entry.engine, "fps": entry.fps,
            "width": entry.size[1], "height": entry.size[0], "sample_rate": SAMPLE_RATE, "viewer": entry.viewer,
            "instance": entry.instance or None,
            "ws": f"{ws_base}/api/sessions/{entry.id}/ws", "offer": f"{base}/api/sessions/{entry.id}/offer"}


@router.post("/api/sessions", status_code=201)
async def create_session(body: SessionRequest, request: Request, caller: CallerDep) -> dict:
    """Open a session showing `avatar`; connect a viewer (WebSocket or WebRTC offer) to it next. 503 with
    Retry-After when the server has no capacity left for it (setting admission_control)."""
    return describe_session(await open_session(body, request, caller))


async def open_session(body: SessionRequest, request: Request, caller: Caller) -> OpenSession:
    """A new session of the server (registered, no viewer yet), as `body` asks: every way of making a
    session goes through here, so that each is counted, limited and admitted alike (OverloadedError
    when the server has no capacity left for it)."""
    _require_ready(request)
    state = _state(request)
    settings = state.settings
    if state.draining:
        raise OverloadedError("this server is draining: it takes no new sessions and stops once its open ones "
                              "end; open the session on another server", RETRY_AFTER_S)
    state.sessions.check_room(caller.key)
    slot = await state.engines.get(body.engine)
    fps = body.fps or settings.fps
    avatar = await state.avatars.avatar(body.avatar, caller.tenant)
    height = _output_height(body.output_height, settings, avatar.frame_size[0])
    avatar, compositor, material = await state.avatars.get(body.avatar, caller.tenant, slot.engine, slot.scheduler,
                                                           height)
    size = compositor.frame_size
    demand = Demand(slot.engine.name, fps, size[0] * size[1], size[0] * size[1])
    ticket = state.capacity.admit(demand, enforce=settings.admission_control)
    try:
        session = Session(avatar, slot.engine, slot.scheduler, fps=fps, compositor=compositor, material=material,
                          max_queue_s=settings.max_queued_audio_s, auto_end_ms=settings.auto_end_ms or None,
                          session_id=scoped_id(settings.instance, uuid.uuid4().hex))
        entry = OpenSession(session, caller.key, caller.tenant, avatar.name, slot.engine.name, fps, size, height,
                            instance=settings.instance, public_url=settings.public_url)

        async def release() -> None:
            state.capacity.release(ticket)

        entry.on_close.append(release)
        try:
            state.sessions.add(entry)
        except BaseException:
            session.close()
            raise
    except BaseException:
        state.capacity.release(ticket)
        raise
    return entry


def _output_height(requested: int | None, settings: Settings, frame_height: int) -> int:
    """The height to stream at (0: the avatar's own). A request above the avatar's frames is refused
    unless upscaling is allowed; the setting's default only ever scales down."""
    if requested is None:
        wanted = settings.output_height
        return wanted if wanted < frame_height or settings.allow_upscaling else 0
    if requested > frame_height and not settings.allow_upscaling:
        raise OutputTooLargeError(f"output_height {requested} is larger than the avatar's own {frame_height} px "
                                  "frames; ask for at most that (0: the avatar's own size), or allow it with the "
                                  "setting allow_upscaling")
    return requested


@router.get("/api/sessions")
async def list_sessions(request: Request, caller: CallerDep) -> dict:
    return {"sessions": [describe_session(e) for e in _state(request).sessions.for_tenant(caller.tenant)]}


@router.delete("/api/sessions/{session_id}", status_code=204)
async def close_session(session_id: str, request: Request, caller: CallerDep) -> None:
    sessions = _state(request).sessions
    await sessions.close(sessions.get(session_id, caller.tenant))


@router.post("/api/sessions/{session_id}/audio")
async def push_audio(session_id: str, request: Request, caller: CallerDep,
                     end: Annotated[bool, Query(description="this audio ends the utterance")] = False,
                     sample_rate: Annotated[int, Query(ge=8000, le=192000, description="rate of a raw PCM body")]
                     = SAMPLE_RATE) -> dict:
    """Speech for the session: a raw PCM16 LE mono body (Content-Type application/octet-stream or
    audio/L16; `sample_rate`, default 16000), an audio file as the body (audio/wav, audio/mpeg, ...),
    or a multipart form with the file in field `file`. `end=true` marks the end of the utterance
    (an empty body with it only ends it)."""
    state = _state(request)
    entry = state.sessions.get(session_id, caller.tenant)
    settings = state.settings
    samples = await _read_audio(request, sample_rate, settings.max_audio_seconds)
    if samples.size:  # a file longer than the queue bound (up to max_audio_seconds) fits an empty queue
        entry.session.push_audio(samples, max_queue_s=max(settings.max_queued_audio_s, samples.size / SAMPLE_RATE))
    if end:
        entry.session.end_speech()
    return {"samples": int(samples.size), "seconds": samples.size / SAMPLE_RATE, "ended": end}


async def _read_audio(request: Request, sample_rate: int, max_seconds: float) -> np.ndarray:
    """The request's audio: float32 [n] (a file) or int16 [n] (16 kHz raw PCM), mono 16 kHz."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        form = await request.form()
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise BadRequestError("the multipart form needs the audio file in a field named `file`")
        data, name = await upload.read(), upload.filename
    else:
        data, name = await request.body(), None
    if not data:
        return np.zeros(0, np.int16)
    # raw PCM when the type says so; with no type or a generic one, unless the bytes are an audio file
    if content_type in PCM_TYPES or (content_type in GENERIC_TYPES and not is_audio_file(data)):
        if len(data) % 2:
            raise BadRequestError(f"a PCM16 body has 2 bytes a sample; got {len(data)} bytes")
        seconds = len(data) / 2 / sample_rate
        if seconds > max_seconds:
            raise AudioTooLongError(f"{seconds:.1f} s of audio in one request; at most {max_seconds:g} s "
                                    "(setting max_audio_seconds): send it in parts")
        if sample_rate == SAMPLE_RATE:
            return np.frombuffer(data, "<i2").astype(np.int16)
        return await asyncio.to_thread(decode_pcm16, data, sample_rate)
    return await asyncio.to_thread(load_audio, data, max_seconds=max_seconds, name=name)


def is_audio_file(data: bytes) -> bool:
    """Whether bytes start like an audio file (WAV, MP3, Ogg, FLAC, MP4/M4A, WebM) rather than raw PCM.
    An MP3 without an ID3 tag is recognised by a valid MPEG audio frame header."""
    head = data[:12]
    if head[:4] in (b"RIFF", b"OggS", b"fLaC", b"\x1aE\xdf\xa3") or head[:3] == b"ID3" or head[4:8] == b"ftyp":
        return True
    if len(head) < 3 or head[0] != 0xFF or head[1] & 0xE0 != 0xE0:
        return False
    version, layer, bitrate, rate = (head[1] >> 3) & 3, (head[1] >> 1) & 3, head[2] >> 4, (head[2] >> 2) & 3
    return version != 1 and layer != 0 and bitrate not in (0, 15) and rate != 3


@router.post("/api/sessions/{session_id}/interrupt")
async def interrupt(session_id: str, request: Request, caller: CallerDep) -> dict:
    """Drop the queued speech now; the avatar goes idle within two frames."""
    _state(request).sessions.get(session_id, caller.tenant).session.interrupt()
    return {"interrupted": True}


@router.get("/api/sessions/{session_id}/stats")
async def session_stats(session_id: str, request: Request, caller: CallerDep) -> dict:
    entry = _state(request).sessions.get(session_id, caller.tenant)
    return {**describe_session(entry), "stats": entry.session.stats()}
