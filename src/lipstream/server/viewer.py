"""What the two transports share: applying a client's messages to its session (within the
connection's input limits), and sizing frames.

Both the WebSocket and the WebRTC data channel carry the same client messages (see `wire`)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import cv2
import numpy as np
import torch

from lipstream.config import Settings
from lipstream.errors import LipstreamError, MessageTooLargeError
from lipstream.server import wire
from lipstream.server.registry import OpenSession


class _Bucket:
    """A token bucket: `rate` tokens a second, holding at most one second's worth."""

    def __init__(self, rate: float, now: float):
        self.rate = rate
        self.tokens = rate
        self.at = now

    def refill(self, now: float) -> None:
        self.tokens = min(self.rate, self.tokens + (now - self.at) * self.rate)
        self.at = now


class InputLimits:
    """One connection's input limits: messages of at most `max_bytes`, at most `messages_per_s`
    messages and `bytes_per_s` bytes a second, in bursts of up to one second's worth. `now`: the clock."""

    def __init__(self, max_bytes: int, messages_per_s: float, bytes_per_s: float,
                 now: Callable[[], float] = time.monotonic):
        self.max_bytes = max_bytes
        self.now = now
        self._messages = _Bucket(messages_per_s, now())
        self._bytes = _Bucket(bytes_per_s, now())

    @classmethod
    def of(cls, settings: Settings) -> InputLimits:
        """The limits the settings give every connection."""
        return cls(settings.max_message_bytes, settings.max_messages_per_s, settings.max_input_bytes_per_s)

    def wait_s(self, size: int) -> float:
        """Count a message of `size` bytes; returns how long to wait before reading the next one to stay
        within the rates (0 within them). A reader that waits it out slows the sender (TCP backpressure)."""
        now = self.now()
        debt = 0.0
        for bucket, amount in ((self._messages, 1), (self._bytes, size)):
            bucket.refill(now)
            bucket.tokens -= amount
            debt = max(debt, -bucket.tokens / bucket.rate)
        return debt

    def allow(self, size: int) -> bool:
        """Count a message of `size` bytes if it is within the rates now; False (nothing counted) if
        not. For transports that cannot slow their sender down (the data channel): it drops the message."""
        now = self.now()
        for bucket in (self._messages, self._bytes):
            bucket.refill(now)
        if self._messages.tokens < 1 or self._bytes.tokens < size:
            return False
        self._messages.tokens -= 1
        self._bytes.tokens -= size
        return True


def apply_client_message(entry: OpenSession, data: bytes | str, max_bytes: int) -> str | None:
    """Apply one client message (binary audio or JSON control) to the session. Returns the text to
    send back, if any: a pong, or an error message (a bad message never ends the connection; one over
    `max_bytes` is not used)."""
    try:
        size = len(data) if isinstance(data, bytes) else len(data.encode())
        if size > max_bytes:
            raise MessageTooLargeError(f"a message has at most {max_bytes} bytes (setting max_message_bytes); "
                                       f"got {size}: send audio in smaller chunks")
        if isinstance(data, bytes):
            samples = wire.pcm16_samples(data)
            if samples.size:
                entry.session.push_audio(samples)
            return None
        message = wire.parse_control(data)
        if message["type"] == "end":
            entry.session.end_speech()
        elif message["type"] == "interrupt":
            entry.session.interrupt()
        else:
            return json.dumps({"type": "pong", "t": message.get("t")})
    except LipstreamError as exc:
        return wire.error_message(type(exc).__name__, str(exc))
    return None


def output_size(frame_size: tuple[int, int], height: int) -> tuple[int, int]:
    """(height, width) of the streamed frames for frames of `frame_size` (height, width): scaled to
    `height` (0: unscaled), width keeping the aspect ratio; both even, as video encoders need."""
    h, w = frame_size
    if height <= 0 or height == h:
        return h - h % 2, w - w % 2
    return height - height % 2, max(2, round(w * height / h / 2) * 2)


def output_tensor(image: torch.Tensor, height: int) -> torch.Tensor:
    """`output_image` for a uint8 [H, W, 3] tensor that stays on its device (area-averaged when
    shrinking, bilinear when enlarging, as OpenCV; values may differ from it by a level or two)."""
    h, w = image.shape[:2]
    th, tw = output_size((h, w), height)
    if (th, tw) == (h, w):
        return image
    if height <= 0 or height == h:
        return image[:th, :tw]
    chw = image.permute(2, 0, 1)[None].float()
    scaled = torch.nn.functional.interpolate(chw, size=(th, tw), mode="area" if th < h else "bilinear")
    return scaled[0].round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0)


def output_image(image: np.ndarray | torch.Tensor, height: int) -> np.ndarray:
    """A frame, uint8 [H, W, 3] BGR (NumPy, or a tensor on any device), as a NumPy array at
    `output_size` (an odd last row or column is dropped when not scaling)."""
    if isinstance(image, torch.Tensor):
        image = image.cpu().numpy()
    h, w = image.shape[:2]
    th, tw = output_size((h, w), height)
    if (th, tw) == (h, w):
        return image
    if height <= 0 or height == h:
        return np.ascontiguousarray(image[:th, :tw])
    return cv2.resize(image, (tw, th), interpolation=cv2.INTER_AREA if th < h else cv2.INTER_LINEAR)
