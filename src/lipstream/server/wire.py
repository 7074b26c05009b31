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
  binary (WebSocket only), little-endian, in one of two forms the client picks when it connects
  (`/api/sessions/{id}/ws?frames=jpeg|patches`; the hello message's "format" says which):

  frames=jpeg (the default): one message per video frame, the whole frame as a JPEG

    offset  size  type     field
    0       4     bytes    magic b"LSF1"
    4       4     uint32   frame index (0, 1, 2, ... since the session started)
    8       8     float64  pts: seconds since the session started (index / fps)
    16      4     uint32   flags: bit 0 = speaking
    20      4     uint32   n: audio samples that play with this frame
    24      4     uint32   m: JPEG bytes
    28      2n    int16    the audio, 16 kHz mono
    28+2n   m     bytes    the frame, JPEG (baseline, 4:2:0)

  frames=patches: a frame is one of the avatar's own images with, while it speaks, its face patch
  drawn over it; each image is sent once (the client keeps them) and a frame carries only its patch,
  a few KB instead of a whole JPEG. An image message comes before the first frame that shows it; the
  images belong to the avatar shown: after an "avatar_changed" event they are sent again (forget the
  old ones).

    image message                                  frame message
    offset  size  type     field                   offset  size  type     field
    0       4     bytes    magic b"LSI1"           0       4     bytes    magic b"LSP1"
    4       4     uint32   image number            4       4     uint32   frame index
    8       4     uint32   m: JPEG bytes           8       8     float64  pts
    12      m     bytes    the image, JPEG         16      4     uint32   flags: bit 0 = speaking
                                                   20      4     uint32   n: audio samples
                                                   24      4     uint32   the image number it shows
                                                   28      2     uint16   patch x: the patch JPEG's
                                                   30      2     uint16   patch y  top-left in the frame
                                                   32      2     uint16   draw x: the part of the patch
                                                   34      2     uint16   draw y  to draw, in frame
                                                   36      2     uint16   draw w  pixels (w = 0: no
                                                   38      2     uint16   draw h  patch: the image as is)
                                                   40      4     uint32   m: patch JPEG bytes
                                                   44      2n    int16    the audio
                                                   44+2n   m     bytes    the patch, JPEG

  To show a frame: draw its image, then the patch JPEG's rectangle (draw x - patch x, draw y - patch
  y, draw w, draw h) at (draw x, draw y). The patch JPEG covers a few pixels more than it changes, with
  the same 16x16 block grid as the image's JPEG, so its drawn part meets the image without a seam.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import numpy as np

from lipstream.errors import BadRequestError, excerpt

MAGIC = b"LSF1"
HEADER = struct.Struct("<4sIdIII")  # 28 bytes: the audio that follows starts 2-byte aligned
IMAGE_MAGIC = b"LSI1"
IMAGE_HEADER = struct.Struct("<4sII")  # 12 bytes
PATCH_MAGIC = b"LSP1"
PATCH_HEADER = struct.Struct("<4sIdIII6HI")  # 44 bytes
FORMATS = {"jpeg": MAGIC, "patches": PATCH_MAGIC}  # ?frames= -> the frame messages' magic
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


@dataclass(frozen=True)
class PatchFrame:
    """One decoded patch frame message: `image` is the image number it shows; `patch`: the patch JPEG
    (b"" for none) with its top-left at `at` (x, y); `draw`: (x, y, w, h), the part of it to draw."""

    index: int
    pts: float
    speaking: bool
    audio: np.ndarray
    image: int
    at: tuple[int, int]
    draw: tuple[int, int, int, int]
    patch: bytes


def pack_image(number: int, jpeg: bytes) -> bytes:
    """An image message: image `number` of the avatar shown, as a JPEG."""
    return IMAGE_HEADER.pack(IMAGE_MAGIC, number, len(jpeg)) + jpeg


def unpack_image(data: bytes) -> tuple[int, bytes]:
    """The inverse of `pack_image`: (image number, JPEG); ValueError for anything else."""
    if len(data) < IMAGE_HEADER.size:
        raise ValueError(f"an image message has at least {IMAGE_HEADER.size} bytes, got {len(data)}")
    magic, number, m = IMAGE_HEADER.unpack_from(data)
    if magic != IMAGE_MAGIC or len(data) != IMAGE_HEADER.size + m:
        raise ValueError("not an image message (bad magic or length)")
    return number, data[IMAGE_HEADER.size:]


def pack_patch_frame(index: int, pts: float, speaking: bool, audio: np.ndarray, image: int,
                     at: tuple[int, int], draw: tuple[int, int, int, int], patch: bytes) -> bytes:
    """A patch frame message (see the module doc). audio: int16 [n] 16 kHz mono."""
    if audio.dtype != np.int16 or audio.ndim != 1:
        raise ValueError(f"audio must be int16 [n], got {audio.dtype} {audio.shape}")
    header = PATCH_HEADER.pack(PATCH_MAGIC, index, pts, SPEAKING if speaking else 0, audio.shape[0], image, *at,
                               *draw, len(patch))
    return b"".join((header, audio.astype("<i2", copy=False).tobytes(), patch))


def unpack_patch_frame(data: bytes) -> PatchFrame:
    """The inverse of `pack_patch_frame`; ValueError for anything else."""
    if len(data) < PATCH_HEADER.size:
        raise ValueError(f"a patch frame message has at least {PATCH_HEADER.size} bytes, got {len(data)}")
    magic, index, pts, flags, n, image, x, y, dx, dy, dw, dh, m = PATCH_HEADER.unpack_from(data)
    if magic != PATCH_MAGIC or len(data) != PATCH_HEADER.size + 2 * n + m:
        raise ValueError("not a patch frame message (bad magic or length)")
    audio = np.frombuffer(data, dtype="<i2", count=n, offset=PATCH_HEADER.size).astype(np.int16)
    return PatchFrame(index, pts, bool(flags & SPEAKING), audio, image, (x, y), (dx, dy, dw, dh),
                      data[PATCH_HEADER.size + 2 * n:])


def draw_rect(x: int, y: int, w: int, h: int, frame_size: tuple[int, int], margin: int) -> tuple[int, int, int, int]:
    """The part of a patch at (x, y) of w x h to draw over its image: `margin` pixels less on each side
    that is not at the frame's edge (a JPEG decoder smooths colour across a picture's edge, so a
    patch's outermost pixels may differ from the image's; the margin is unchanged pixels)."""
    height, width = frame_size
    left, top = (0 if x == 0 else margin), (0 if y == 0 else margin)
    right, bottom = (0 if x + w >= width else margin), (0 if y + h >= height else margin)
    return x + left, y + top, max(0, w - left - right), max(0, h - top - bottom)


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
