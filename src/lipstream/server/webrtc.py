"""The WebRTC transport (aiortc): `POST /api/sessions/{id}/offer` takes the browser's SDP offer and
answers it. The session's frames go out as one video and one audio track, both stamped from the
frame's own clock (video pts = frame pts; audio pts = the count of samples sent, which is the same
clock since frame k carries exactly the samples from floor(k*16000/fps) on), so they stay in sync
however long the call lasts. A data channel the client opens carries the same messages as the
WebSocket (audio and control in, JSON events and errors out); no frames go over it.

The connection is the session's viewer: when it fails or closes, the session closes. Frames are made
and sent once it is connected; a peer not connected `webrtc_connect_timeout_s` after its answer (no
route between the peers, a tab closed while connecting: ICE alone may never give up, as browsers'
offers often lack a=end-of-candidates) closes the session too."""

from __future__ import annotations

import asyncio
import fractions
import logging
import time
from typing import Literal

import av
import numpy as np
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCDataChannel,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError
from fastapi import APIRouter, Request
from pydantic import BaseModel

from lipstream.errors import BadRequestError, InputRateError, SessionNotFoundError
from lipstream.metrics import SERVER_FRAMES_SENT
from lipstream.server import wire
from lipstream.server.auth import CallerDep
from lipstream.server.encoding import EncodingPool
from lipstream.server.registry import OpenSession, SessionRegistry
from lipstream.server.viewer import InputLimits, apply_client_message, output_image
from lipstream.stream.session import OutputFrame

log = logging.getLogger(__name__)

router = APIRouter()

VIDEO_TIME_BASE = fractions.Fraction(1, 90000)
AUDIO_RATE = 16000
AUDIO_TIME_BASE = fractions.Fraction(1, AUDIO_RATE)
AUDIO_CHUNK = 320  # 20 ms: aiortc packs one audio frame into one RTP packet of one Opus frame
QUEUE_S = 1.0  # how far a track may lag behind before its oldest frames are dropped


class FrameTrack(MediaStreamTrack):
    """A track fed by `SessionFeed`: `recv()` returns its next frame; None in the queue ends it.
    It holds at most `capacity` frames; when the consumer lags, the oldest are dropped (a live
    stream does not wait)."""

    def __init__(self, kind: str, capacity: int):
        super().__init__()
        self.kind = kind
        self.queue: asyncio.Queue[av.VideoFrame | av.AudioFrame | None] = asyncio.Queue(capacity)

    def offer(self, frame: av.VideoFrame | av.AudioFrame | None) -> None:
        if self.queue.full():
            self.queue.get_nowait()
        self.queue.put_nowait(frame)

    async def recv(self) -> av.VideoFrame | av.AudioFrame:
        frame = await self.queue.get()
        if frame is None:
            self.stop()
            raise MediaStreamError
        return frame


class SessionFeed:
    """Reads the session's frames in real time and hands each image to the video track, its audio (in
    20 ms pieces) to the audio track and its events to the data channel (once the client opened one).
    encoding: the pool that converts the frames."""

    def __init__(self, entry: OpenSession, encoding: EncodingPool, limits: InputLimits):
        self.entry = entry
        self.encoding = encoding
        self.limits = limits
        self._refused_at: float | None = None  # when a message over the input rate was last reported
        self.video = FrameTrack("video", max(2, round(QUEUE_S * entry.fps)))
        self.audio = FrameTrack("audio", round(QUEUE_S * AUDIO_RATE / AUDIO_CHUNK))
        self.channel: RTCDataChannel | None = None
        self._pending = np.zeros(0, np.int16)  # audio not yet sent: less than one chunk
        self._samples_sent: int | None = None  # pts of the next audio sample, on the 16 kHz clock
        self._frames_sent = SERVER_FRAMES_SENT.labels("webrtc")

    def _send(self, text: str) -> None:
        if self.channel is not None and self.channel.readyState == "open":
            self.channel.send(text)

    def _push_audio(self, samples: np.ndarray) -> None:
        pending = np.concatenate([self._pending, samples])
        whole = pending.shape[0] - pending.shape[0] % AUDIO_CHUNK
        for start in range(0, whole, AUDIO_CHUNK):
            chunk = av.AudioFrame.from_ndarray(pending[None, start:start + AUDIO_CHUNK], format="s16", layout="mono")
            chunk.sample_rate, chunk.pts, chunk.time_base = AUDIO_RATE, self._samples_sent, AUDIO_TIME_BASE
            self._samples_sent += AUDIO_CHUNK
            self.audio.offer(chunk)
        self._pending = pending[whole:]

    def _video_frame(self, frame: OutputFrame) -> av.VideoFrame:
        video = av.VideoFrame.from_ndarray(output_image(frame.image, self.entry.output_height), format="bgr24")
        video.pts, video.time_base = round(frame.pts * 90000), VIDEO_TIME_BASE
        return video

    async def handle(self, frame: OutputFrame) -> None:
        """One frame of the session: its events, its image (copied and converted on the encoding
        pool), its audio."""
        for event in frame.events:
            self._send(wire.event_message(event, frame.index, frame.pts))
        self.video.offer(await self.encoding.encode(self.entry.size[0] * self.entry.size[1], self._video_frame, frame))
        if self._samples_sent is None:  # the audio clock starts where the video's does
            self._samples_sent = round(frame.pts * AUDIO_RATE)
        self._push_audio(frame.audio)
        self._frames_sent.inc()

    async def run(self) -> None:
        try:
            async for frame in self.entry.session.frames():
                await self.handle(frame)
        finally:
            self.video.offer(None)
            self.audio.offer(None)

    def on_message(self, data: bytes | str) -> None:
        """A data-channel message. One over the input rates is dropped (a data channel cannot be read
        more slowly), which an error event says at most once a second."""
        if not self.limits.allow(len(data) if isinstance(data, bytes) else len(data.encode())):
            now = time.monotonic()
            if self._refused_at is None or now - self._refused_at >= 1.0:
                self._refused_at = now
                self._send(wire.error_message(InputRateError.__name__, "messages are coming faster than this connection "
                                              "may send them (settings max_messages_per_s, max_input_bytes_per_s); "
                                              "some were dropped: send audio no faster than it plays"))
            return
        reply = apply_client_message(self.entry, data, self.limits.max_bytes)
        if reply is not None:
            self._send(reply)


def _log_failure(entry: OpenSession):
    def done(task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("session %s: WebRTC feed failed", entry.id, exc_info=task.exception())
    return done


class Offer(BaseModel):
    sdp: str
    type: Literal["offer"]


def _peer_connection(ice_servers: list[str]) -> RTCPeerConnection:
    return RTCPeerConnection(RTCConfiguration(iceServers=[RTCIceServer(urls=url) for url in ice_servers]))


@router.post("/api/sessions/{session_id}/offer")
async def offer(session_id: str, body: Offer, request: Request, caller: CallerDep) -> dict:
    """Answer a WebRTC offer: the session's video and audio, sent only (the offer's media sections
    should be recvonly; add a data channel for audio in, control and events)."""
    state = request.app.state
    registry: SessionRegistry = state.sessions
    entry = registry.get(session_id, caller.tenant)
    registry.attach(entry, "webrtc")
    feed = SessionFeed(entry, state.encoding, InputLimits.of(state.settings))
    pc = _peer_connection(state.settings.ice_servers)
    try:
        video = pc.addTransceiver(feed.video, direction="sendonly")
        if state.settings.video_codec != "auto":
            mime = f"video/{state.settings.video_codec.upper()}"
            video.setCodecPreferences([c for c in RTCRtpSender.getCapabilities("video").codecs if c.mimeType == mime])
        pc.addTransceiver(feed.audio, direction="sendonly")
        await pc.setRemoteDescription(RTCSessionDescription(body.sdp, body.type))
        answer = await pc.createAnswer()
        await pc.setLocalDescription(answer)
    except Exception as exc:  # malformed SDP, no common codec, ...: the client can fix and retry
        await pc.close()
        registry.detach(entry)
        raise BadRequestError(f"cannot answer this WebRTC offer: {exc or type(exc).__name__}") from exc
    if entry.closed.is_set():  # closed while the answer was made
        await pc.close()
        raise SessionNotFoundError(f"session {entry.id} was closed")

    @pc.on("datachannel")
    def on_datachannel(channel: RTCDataChannel) -> None:
        feed.channel = channel
        channel.on("message", feed.on_message)

    connected = asyncio.Event()
    feed_task: asyncio.Task | None = None

    @pc.on("connectionstatechange")
    async def on_state() -> None:
        nonlocal feed_task
        if pc.connectionState == "connected":
            connected.set()
            if feed_task is None and not entry.closed.is_set():  # frames only for a peer that gets them
                feed_task = asyncio.create_task(feed.run())
                feed_task.add_done_callback(_log_failure(entry))
        elif pc.connectionState in ("failed", "closed"):
            log.info("session %s: WebRTC %s; closing the session", entry.id, pc.connectionState)
            await registry.close(entry)

    timeout = state.settings.webrtc_connect_timeout_s

    async def watch_connect() -> None:
        try:
            await asyncio.wait_for(connected.wait(), timeout)
        except TimeoutError:
            log.info("session %s: the WebRTC peer is still %s %g s after its answer; closing the session",
                     entry.id, pc.connectionState, timeout)
            await registry.close(entry)

    watchdog = asyncio.create_task(watch_connect())  # referenced by close_peer, so kept until the session closes

    async def close_peer() -> None:
        watchdog.cancel()  # when it is the watchdog that closes the session, only its wait for the close ends
        if feed_task is not None:
            feed_task.cancel()
            await asyncio.gather(feed_task, return_exceptions=True)
        await pc.close()

    entry.on_close.append(close_peer)
    return {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type}
