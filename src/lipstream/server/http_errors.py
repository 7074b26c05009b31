"""Errors a user can cause, as HTTP replies: each `LipstreamError` becomes a 4xx (or 503) with its
own message, as `{"detail": message, "error": class name}`."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

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
    (errors.SessionLimitError, 429),
    (errors.QueueFullError, 429),
    (errors.WeightsError, 503),
    (errors.NotReadyError, 503),
)


def status_for(exc: errors.LipstreamError) -> int:
    return next((status for cls, status in STATUS if isinstance(exc, cls)), 400)


def install(app: FastAPI) -> None:
    @app.exception_handler(errors.LipstreamError)
    async def lipstream_error(_: Request, exc: errors.LipstreamError) -> JSONResponse:
        return JSONResponse({"detail": str(exc), "error": type(exc).__name__}, status_code=status_for(exc))
