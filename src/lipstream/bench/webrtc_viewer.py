"""A WebRTC viewer for the benchmarks: an aiortc peer that takes a session's video and audio tracks
and talks over its data channel (audio in, events out), as the page does.

The benchmark's clients share the server's machine, so they must cost it little: `count_frames()`
makes this process's aiortc receivers count frames instead of decoding them (each received video
frame becomes a 2x2 frame with its timestamp, each audio packet 20 ms of silence). Everything up to
the decoder (RTP, SRTP, jitter buffer, RTCP feedback to the sender) is aiortc's own."""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import av
import numpy as np
from aiortc import RTCPeerConnection, RTCSessionDescription, rtcrtpreceiver
from aiortc.mediastreams import MediaStreamError

from lipstream.client import LipstreamClient
from lipstream.errors import LipstreamError

VIDEO_CLOCK = 90000


class _CountingVideoDecoder:
    def decode(self, encoded_frame) -> list[av.VideoFrame]:
        frame = av.VideoFrame(2, 2, "yuv420p")
        frame.pts, frame.time_base = encoded_frame.timestamp, fractions.Fraction(1, VIDEO_CLOCK)
        return [frame]


class _SilentAudioDecoder:
    def decode(self, encoded_frame) -> list[av.AudioFrame]:
        frame = av.AudioFrame(format="s16", layout="mono", samples=960)
        frame.sample_rate, frame.pts = 48000, encoded_frame.timestamp
        frame.time_base = fractions.Fraction(1, 48000)
        return [frame]


def count_frames() -> None:
    """Make this process's aiortc receivers count frames instead of decoding them (see the module doc)."""
    def decoder(codec):
        return _CountingVideoDecoder() if codec.mimeType.lower().startswith("video/") else _SilentAudioDecoder()

    rtcrtpreceiver.get_decoder = decoder


@dataclass
class ReceivedFrame:
    """A video frame as the viewer got it: pts, seconds from the first frame received (RTP timestamps
    start anywhere), and the events that came on the data channel since the frame before (the server
    sends a frame's events just before the frame)."""

    pts: float
    events: list[str] = field(default_factory=list)


class WebRtcViewer:
    """One session seen over WebRTC. `open` makes the session and connects; `push_audio`, `end_speech`
    go over the data channel; `frames()` yields the video frames as they come; `aclose` hangs up and
    closes the session."""

    def __init__(self, client: LipstreamClient, info: dict):
        self.client = client
        self.id = info["id"]
        self.pc = RTCPeerConnection()
        self._tracks: dict[str, object] = {}
        self._events: list[str] = []  # since the last frame
        self._open = asyncio.Event()
        self._drain: asyncio.Task | None = None

    @classmethod
    async def open(cls, client: LipstreamClient, avatar: str, fps: int, timeout_s: float = 30.0) -> WebRtcViewer:
        viewer = cls(client, await client.create_session(avatar, fps=fps))
        try:
            await asyncio.wait_for(viewer._connect(), timeout_s)
        except BaseException:
            await viewer.aclose()
            raise
        return viewer

    async def _connect(self) -> None:
        pc = self.pc
        pc.addTransceiver("video", direction="recvonly")
        pc.addTransceiver("audio", direction="recvonly")
        self.channel = pc.createDataChannel("control")
        self.channel.on("open", self._open.set)
        self.channel.on("message", self._on_message)
        pc.on("track", lambda track: self._tracks.__setitem__(track.kind, track))
        await pc.setLocalDescription(await pc.createOffer())
        answer = await self.client.offer(self.id, pc.localDescription.sdp)
        await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
        await self._open.wait()
        self._drain = asyncio.create_task(self._drain_audio())

    def _on_message(self, message: str | bytes) -> None:
        if isinstance(message, str):
            event = json.loads(message)
            if "index" in event:
                self._events.append(event["type"])

    async def _drain_audio(self) -> None:
        track = self._tracks.get("audio")
        while track is not None:
            try:
                await track.recv()
            except MediaStreamError:
                return

    async def push_audio(self, pcm: np.ndarray) -> None:
        self.channel.send(pcm.astype("<i2", copy=False).tobytes())

    async def end_speech(self) -> None:
        self.channel.send(json.dumps({"type": "end"}))

    async def stats(self) -> dict:
        return await self.client.session_stats(self.id)

    async def frames(self) -> AsyncIterator[ReceivedFrame]:
        video = self._tracks["video"]
        first = None
        while True:
            try:
                frame = await video.recv()
            except MediaStreamError:
                return
            first = frame.pts if first is None else first
            events, self._events = self._events, []
            yield ReceivedFrame(((frame.pts - first) % (1 << 32)) / VIDEO_CLOCK, events)

    async def aclose(self) -> None:
        if self._drain is not None:
            self._drain.cancel()
        await self.pc.close()
        with contextlib.suppress(LipstreamError):  # closed already, or the server is gone
            await self.client.close_session(self.id)
