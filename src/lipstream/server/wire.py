"""The message format of the WebSocket (and of the WebRTC data channel): what goes over the wire.

Client -> server
  binary: PCM16 little-endian, 16 kHz, mono audio (any whole number of samples per message)
  text:   JSON control: {"type": "end"} (end of the utterance), {"type": "interrupt"},
          {"type": "ping", "t": <any>} (answered by {"type": "pong", "t": <same>}),
          {"type": "avatar", "avatar": <name>} (show another of the tenant's avatars from the next frame)

Server -> client
  text:   JSON: {"type": "hello", ...} once, {"type": "speech_started" | "speech_ended" |
          "interrupted", "index": i, "pts": s} just before frame i ({"type": "avatar_changed", "index",
          "pts", "avatar", "width", "height"} before the first frame of another avatar),
          {"type": "error", "code", "message"}
  binary: one message per video frame (WebSocket only), little-endian:

    offset  size  type     field
    0       4     bytes    magic b"LSF1"
    4       4     uint32   frame index (0, 1, 2, ... since the session started)
    8       8     float64  pts: seconds since the session started (index / fps)
    16      4     uint32   flags: bit 0 = speaking
    20      4     uint32   n: audio samples that play with this frame
    24      4     uint32   m: JPEG bytes
    28      2n    int16    the audio, 16 kHz mono
    28+2n   m     bytes    the frame, JPEG (baseline, 4:2:0)
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import numpy as np

from lipstream.errors import BadRequestError, excerpt

MAGIC = b"LSF1"
HEADER = struct.Struct("<4sIdIII")  # 28 bytes: the audio that follows starts 2-byte aligned
SPEAKING = 1
CONTROL_TYPES = ("end", "interrupt", "ping", "avatar")
MAX_CONTROL_CHARS = 4096  # control messages are a few dozen characters; a ping's "t" may be any small value


@dataclass(frozen=True)
class WireFrame:
    """One decoded binary frame message. audio: int16 [n] 16 kHz mono; jpeg: the image bytes."""

    index: int
    pts: float
    speaking: bool
    audio: np.ndarray
    jpeg: bytes


def pack_frame(index: int, pts: float, speaking: bool, audio: np.ndarray, jpeg: bytes) -> bytes:
    """A binary frame message. audio: int16 [n] 16 kHz mono."""
    if audio.dtype != np.int16 or audio.ndim != 1:
        raise ValueError(f"audio must be int16 [n], got {audio.dtype} {audio.shape}")
    header = HEADER.pack(MAGIC, index, pts, SPEAKING if speaking else 0, audio.shape[0], len(jpeg))
    return b"".join((header, audio.astype("<i2", copy=False).tobytes(), jpeg))


def unpack_frame(data: bytes) -> WireFrame:
    """The inverse of `pack_frame`; ValueError for anything else."""
    if len(data) < HEADER.size:
        raise ValueError(f"a frame message has at least {HEADER.size} bytes, got {len(data)}")
    magic, index, pts, flags, n, m = HEADER.unpack_from(data)
    if magic != MAGIC or len(data) != HEADER.size + 2 * n + m:
        raise ValueError("not a frame message (bad magic or length)")
    audio = np.frombuffer(data, dtype="<i2", count=n, offset=HEADER.size).astype(np.int16)
    return WireFrame(index, pts, bool(flags & SPEAKING), audio, data[HEADER.size + 2 * n:])


def event_message(event: str, index: int, pts: float, **details) -> str:
    """An event before frame `index` (`details`: more fields, e.g. the new avatar's)."""
    return json.dumps({"type": event, "index": index, "pts": round(pts, 6), **details})


def error_message(code: str, message: str) -> str:
    return json.dumps({"type": "error", "code": code, "message": message})


def parse_control(text: str) -> dict:
    """A client's JSON control message -> the dict; BadRequestError when it is not one (also for a
    text longer than MAX_CONTROL_CHARS, or nested too deeply to parse)."""
    if len(text) > MAX_CONTROL_CHARS:
        raise BadRequestError(f"a control message has at most {MAX_CONTROL_CHARS} characters; got {len(text)}")
    try:
        message = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadRequestError(f"control messages are JSON objects like {{\"type\": \"end\"}}; got invalid "
                              f"JSON ({exc.msg})") from exc
    except RecursionError as exc:
        raise BadRequestError("this control message is nested too deeply to read; send a flat JSON object "
                              "like {\"type\": \"end\"}") from exc
    if not isinstance(message, dict) or message.get("type") not in CONTROL_TYPES:
        raise BadRequestError(f"unknown control message {excerpt(text)}: send {{\"type\": ...}} with one of "
                              f"{', '.join(CONTROL_TYPES)}")
    if message["type"] == "avatar" and not isinstance(message.get("avatar"), str):
        raise BadRequestError('an avatar message names the avatar: {"type": "avatar", "avatar": "<name>"}')
    return message


def pcm16_samples(data: bytes) -> np.ndarray:
    """A binary audio message -> int16 [n]; BadRequestError for an odd byte count."""
    if len(data) % 2:
        raise BadRequestError(f"audio messages are PCM16 (2 bytes a sample); got {len(data)} bytes")
    return np.frombuffer(data, dtype="<i2").astype(np.int16)
