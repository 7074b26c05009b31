"""Exceptions a user can cause. One class per cause; each message names the input and the fix.

The server maps `LipstreamError` subclasses to 4xx replies."""

from __future__ import annotations


class LipstreamError(Exception):
    """Base class of every error a user of lipstream can cause."""


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
