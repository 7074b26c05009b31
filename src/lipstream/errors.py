"""Exceptions a user can cause. One class per cause; each message names the input and the fix.

The server maps `LipstreamError` subclasses to 4xx replies."""

from __future__ import annotations


class LipstreamError(Exception):
    """Base class of every error a user of lipstream can cause."""


def shorten(text: object, limit: int = 60) -> str:
    """`text` cut to at most `limit` characters ("..." ends a cut one): how messages and records quote
    what a user gave (a name, an id, a file name), however long it was."""
    text = str(text)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def excerpt(text: object, limit: int = 60) -> str:
    """`shorten(text, limit)` in quotes, for a message that echoes user input."""
    return repr(shorten(text, limit))


class AudioError(LipstreamError):
    """Base class of the audio input errors."""


class AudioNotFoundError(AudioError):
    """The audio path does not exist."""


class AudioDecodeError(AudioError):
    """The input is not a readable media file (corrupt, truncated, or not audio/video at all)."""


class NoAudioStreamError(AudioError):
    """The input is a media file without an audio stream (e.g. a silent video or an image)."""


class EmptyAudioError(AudioError):
    """The input holds no audio samples (a 0-byte file or an audio stream with 0 samples)."""


class AudioTooLongError(AudioError):
    """The input is longer than the allowed maximum duration."""


class AudioTooShortError(AudioError):
    """The input is shorter than one video frame, so there is nothing to render."""


class AudioFormatError(AudioError):
    """Raw audio samples are not in the expected form (e.g. not 16-bit PCM, or a sample rate or channel
    count that cannot be), or outside what lipstream decodes (e.g. a sample rate above 384 kHz)."""


class WeightsError(LipstreamError):
    """Base class of the model-weights errors (`lipstream models ...`)."""


class MissingWeightsError(WeightsError):
    """Model files are missing under the models root."""


class DownloadError(WeightsError):
    """Model files could not be downloaded (offline, unreachable endpoint, HTTP error)."""


class ChecksumMismatchError(WeightsError):
    """A model file's sha256 differs from the published one (corrupt or truncated download)."""


class IncompatibleWeightsError(WeightsError):
    """A weights file does not fit the network built from its config (missing, unexpected or resized tensors)."""


class OutputPathError(LipstreamError):
    """A render output path cannot be used (unsupported suffix, a file where a folder is needed, a
    folder holding other files)."""


class TextToSpeechError(LipstreamError):
    """Text could not be turned into speech (espeak-ng is not installed, or it failed)."""


class AvatarError(LipstreamError):
    """Base class of the avatar errors (`lipstream avatars ...`)."""


class AvatarNameError(AvatarError):
    """An avatar name or tenant key is not allowed (characters, empty, or it would leave the avatars root)."""


class AvatarNotFoundError(AvatarError):
    """No avatar of that name (for that tenant) under the avatars root."""


class AvatarExistsError(AvatarError):
    """An avatar of that name exists already and overwriting was not asked for."""


class AvatarSourceNotFoundError(AvatarError):
    """The video or photo to prepare an avatar from does not exist."""


class AvatarSourceUnreadableError(AvatarError):
    """The video or photo cannot be decoded (corrupt, truncated, not a video/image, no video stream)."""


class AvatarSourceTooLongError(AvatarError):
    """The video is longer than the allowed maximum duration."""


class NoFaceError(AvatarError):
    """No frame of the input shows a face the landmark detector finds."""


class AvatarCorruptError(AvatarError):
    """A stored avatar folder is incomplete or damaged (missing or unreadable files, counts that do not
    match, checksum mismatch), or is not a MuseTalk avatar folder at all."""


class SettingsError(LipstreamError):
    """A setting (config file, LIPSTREAM_* env var or flag) is unknown or has a value it cannot take."""


class ServerError(LipstreamError):
    """Base class of the errors of the server's API (sessions, jobs, uploads)."""


class SessionNotFoundError(ServerError):
    """No open session of that id for the caller's tenant (closed, expired, or another tenant's)."""


class SessionLimitError(ServerError):
    """The API key has as many open sessions as it may have."""


class SessionBusyError(ServerError):
    """The session already has a viewer (one WebSocket or WebRTC connection per session)."""


class JobNotFoundError(ServerError):
    """No avatar job of that id for the caller's tenant."""


class UploadTooLargeError(ServerError):
    """A request body is larger than the server accepts."""


class BadRequestError(ServerError):
    """A request is malformed (wrong content type, missing field, bad JSON, unknown message type)."""


class NotReadyError(ServerError):
    """The server is still loading its engine and avatars."""


class ServerUnreachableError(ServerError):
    """No connection to the server could be made (refused, unknown host, no answer in time)."""


class ApiKeyError(ServerError):
    """The server refused the client's API key (none given, or not one of its keys)."""


class ServerReplyError(ServerError):
    """The server answered with an error the client has no class for (e.g. a 5xx, or not lipstream)."""
class OverloadedError(ServerError):
    """The server has no capacity left for another session (it would make the open ones late).
    retry_after_s: when to try again, for the reply's Retry-After header."""

    def __init__(self, message: str, retry_after_s: int = 10):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class OutputTooLargeError(ServerError):
    """A session asked for frames larger than its avatar's own (upscaling is off)."""


class JobLimitError(ServerError):
    """The tenant has as many avatar jobs queued or running as it may have."""


class JobCancelledError(ServerError):
    """An avatar job was stopped before it finished (the server shut down)."""


class MessageTooLargeError(ServerError):
    """A WebSocket or data-channel message is larger than the server accepts."""


class InputRateError(ServerError):
    """A data-channel client sends messages faster than its connection may (it cannot be slowed down)."""


class LiveKitTokenError(ServerError):
    """A LiveKit access token given to lipstream cannot join a room: not a JWT, no room-join grant, or expired."""


class LiveKitJoinError(ServerError):
    """lipstream could not join the LiveKit room (nothing listening at the URL, the token refused, no
    answer in time)."""


class LiveKitUnavailableError(ServerError):
    """The server cannot join LiveKit rooms: it was installed without the `livekit` extra."""


class StreamError(LipstreamError):
    """Base class of the errors of a live session (stream/session.py)."""


class QueueFullError(StreamError):
    """A session holds as much queued speech as it may (max_queue_s): audio is coming faster than it plays."""


class SessionClosedError(StreamError):
    """The session was closed; open a new one."""


class ClusterError(LipstreamError):
    """Base class of the errors of `lipstream cluster` (lipstream on Ray)."""


class ClusterUnavailableError(ClusterError):
    """`lipstream cluster` needs Ray Serve: lipstream was installed without the `cluster` extra."""


class ClusterSetupError(ClusterError):
    """The Ray cluster cannot run lipstream as it is (no proxy middleware, no replica ready in time)."""
