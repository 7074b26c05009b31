"""Errors a user can cause, as HTTP replies: each `LipstreamError` becomes a 4xx (or 503 while the
server is not ready, 501/502 when it cannot join a LiveKit room) with its own message, as
`{"detail": message, "error": class name}`. What a client reads never shows the server's paths
(`public_text`)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from http import HTTPStatus
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lipstream import errors

# The first matching class decides; anything else a user caused is a 400.
STATUS = (
    (errors.AvatarNotFoundError, 404),
    (errors.SessionNotFoundError, 404),
    (errors.SessionClosedError, 404),
    (errors.JobNotFoundError, 404),
    (errors.AvatarExistsError, 409),
    (errors.SessionBusyError, 409),
    (errors.UploadTooLargeError, 413),
    (errors.AudioTooLongError, 413),
    (errors.AvatarSourceTooLongError, 413),
    (errors.MessageTooLargeError, 413),
    (errors.SessionLimitError, 429),
    (errors.QueueFullError, 429),
    (errors.JobLimitError, 429),
    (errors.WeightsError, 503),
    (errors.NotReadyError, 503),
    (errors.OverloadedError, 503),
    (errors.LiveKitUnavailableError, 501),
    (errors.LiveKitJoinError, 502),
)


# A file system path in a message: absolute, home- or dot-relative, of two parts or more (an API route
# such as /api/sessions/{id} is not one).
_PATH = re.compile(r"(?<![\w.:/<>~-])(?:~|\.{1,2})?/(?!api/)[\w.@+~-]+(?:/[\w.@+~-]*)+")


def hide_paths(text: str, folders: Mapping[str, str | os.PathLike]) -> str:
    """`text` without file system paths: the server's own `folders` ({"avatars": root, ...}) become
    `<avatars>` (what lies inside them stays readable), any other path its last part."""
    spellings = {}
    for label, folder in folders.items():
        for spelling in {str(Path(folder)), str(Path(folder).absolute()), str(Path(folder).resolve())}:
            if spelling not in (".", "/"):
                spellings[spelling] = label
    for spelling in sorted(spellings, key=len, reverse=True):
        after = "(?![\\w.-])" if "/" in spelling else "(?=/)"
        text = re.sub(r"(?<![\w./-])" + re.escape(spelling) + after, f"<{spellings[spelling]}>", text)
    return _PATH.sub(lambda m: Path(m.group()).name or m.group(), text)


def public_text(text: str, state) -> str:
    """`hide_paths` with the server's folders (the app's `state`): avatars, models and uploads."""
    return hide_paths(text, state.jobs.folders)


def status_for(exc: errors.LipstreamError) -> int:
    return next((status for cls, status in STATUS if isinstance(exc, cls)), 400)


def install(app: FastAPI) -> None:
    """Every error reply has the same shape: {"detail": text, "error": name}."""
    @app.exception_handler(errors.LipstreamError)
    async def lipstream_error(request: Request, exc: errors.LipstreamError) -> JSONResponse:
        retry = getattr(exc, "retry_after_s", None)
        return JSONResponse({"detail": public_text(str(exc), request.app.state), "error": type(exc).__name__},
                            status_code=status_for(exc),
                            headers=None if retry is None else {"Retry-After": str(retry)})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": str(exc.detail), "error": _status_name(exc.status_code)},
                            status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return JSONResponse({"detail": f"invalid request: {problems}", "error": "RequestValidationError"},
                            status_code=422)


def _status_name(status: int) -> str:
    """"Unauthorized", "NotFound", ... for an HTTP status."""
    try:
        return HTTPStatus(status).phrase.replace(" ", "").replace("-", "")
    except ValueError:
        return "HTTPError"
