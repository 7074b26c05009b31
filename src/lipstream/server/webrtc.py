"""The WebRTC transport (aiortc): `POST /api/sessions/{id}/offer` takes the browser's SDP offer and
answers it. The session's frames go out as one video and one audio track, both stamped from the
frame's own clock (video pts = frame pts; audio pts = the count of samples sent, which is the same
clock since frame k carries exactly the samples from floor(k*16000/fps) on), so they stay in sync
however long the call lasts. A data channel the client opens carries the same messages as the
WebSocket (audio and control in, JSON events and errors out); no frames go over it.

Video frames reach the encoder as I420 made from the avatar's cached images with the face patch
converted alone (`media.encoding.video_frame`), and the encoders are set for real time on a server
(`webrtc_codecs`). The connection is the session's viewer: when it fails or closes, the session
closes. Frames are made and sent once it is connected; a peer not connected `webrtc_connect_timeout_s` after its answer (no
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

from lipstream.audio.load import SAMPLE_RATE
from lipstream.config import Settings
from lipstream.errors import BadRequestError, InputRateError, SessionNotFoundError
from lipstream.media.encoding import EncodingPool, video_frame
from lipstream.metrics import SERVER_FRAMES_SENT
from lipstream.server import webrtc_codecs, wire
from lipstream.server.auth import CallerDep
from lipstream.server.registry import OpenSession, SessionRegistry
from lipstream.server.viewer import ClientMessages, InputLimits, frame_events, message_size
from lipstream.stream.session import OutputFrame

log = logging.getLogger(__name__)
webrtc_codecs.install()

router = APIRouter()

AUDIO_TIME_BASE = fractions.Fraction(1, SAMPLE_RATE)
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
    20 ms pieces) to the audio track and its events to the data channel (once the client opened one),
    which also brings the client's messages. state: the app's state (its encoding pool converts the
    frames)."""

    def __init__(self, entry: OpenSession, state):
        self.entry = entry
        self.encoding: EncodingPool = state.encoding
        self.messages = ClientMessages(state, entry, self._reply)
        self.limits = InputLimits.of(state.settings)
        self._refused_at: float | None = None  # when a message over the input rate was last reported
        self.video = FrameTrack("video", max(2, round(QUEUE_S * entry.fps)))
        self.audio = FrameTrack("audio", round(QUEUE_S * SAMPLE_RATE / AUDIO_CHUNK))
        self.channel: RTCDataChannel | None = None
        self._pending = np.zeros(0, np.int16)  # audio not yet sent: less than one chunk
        self._samples_sent: int | None = None  # pts of the next audio sample, on the 16 kHz clock
        self._frames_sent = SERVER_FRAMES_SENT.labels("webrtc")

    def _send(self, text: str) -> None:
        if self.channel is not None and self.channel.readyState == "open":
            self.channel.send(text)

    async def _reply(self, text: str) -> None:
        self._send(text)

    def _push_audio(self, samples: np.ndarray) -> None:
        pending = np.concatenate([self._pending, samples])
        whole = pending.shape[0] - pending.shape[0] % AUDIO_CHUNK
        for start in range(0, whole, AUDIO_CHUNK):
            chunk = av.AudioFrame.from_ndarray(pending[None, start:start + AUDIO_CHUNK], format="s16", layout="mono")
            chunk.sample_rate, chunk.pts, chunk.time_base = SAMPLE_RATE, self._samples_sent, AUDIO_TIME_BASE
            self._samples_sent += AUDIO_CHUNK
            self.audio.offer(chunk)
        self._pending = pending[whole:]

    async def handle(self, frame: OutputFrame) -> None:
        """One frame of the session: its events, its image (made on the encoding pool), its audio."""
        for event in frame_events(self.entry, frame):
            self._send(event)
        began = time.perf_counter()
        height, width = frame.compositor.frame_size
        self.video.offer(await self.encoding.encode(height * width, video_frame, frame))
        if "speech_started" in frame.events:  # the track's encoder and the network take it from here
            self.entry.session.record_delivery(frame.index, time.perf_counter() - began, 0.0)
        if self._samples_sent is None:  # the audio clock starts where the video's does
            self._samples_sent = round(frame.pts * SAMPLE_RATE)
        self._push_audio(frame.audio)
        self._frames_sent.inc()

    async def run(self) -> None:
        try:
            async for frame in self.entry.session.frames():
                await self.handle(frame)
        finally:
            self.video.offer(None)
            self.audio.offer(None)

    async def on_message(self, data: bytes | str) -> None:
        """A data-channel message (run as a task of its own, in arrival order). One over the input
        rates is dropped (a data channel cannot be read more slowly), which an error event says at most
        once a second."""
        if not self.limits.allow(message_size(data)):
            now = time.monotonic()
            if self._refused_at is None or now - self._refused_at >= 1.0:
                self._refused_at = now
                self._send(wire.error_message(InputRateError.__name__, "messages are coming faster than this connection "
                                              "may send them (settings max_messages_per_s, max_input_bytes_per_s); "
                                              "some were dropped: send audio no faster than it plays"))
            return
        await self.messages.handle(data)


class Offer(BaseModel):
    sdp: str
    type: Literal["offer"]


class PeerViewer:
    """A session's WebRTC viewer: its peer connection, the feed of its tracks and data channel, and
    the watchdog that closes the session when the peer never connects. The session closes when the
    peer fails or closes, and closing the session closes the peer (`entry.on_close`)."""

    def __init__(self, entry: OpenSession, registry: SessionRegistry, state):
        self.entry = entry
        self.registry = registry
        self.settings: Settings = state.settings
        self.feed = SessionFeed(entry, state)
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[RTCIceServer(urls=url)
                                                                 for url in self.settings.ice_servers]))
        self._connected = asyncio.Event()
        self._feed_task: asyncio.Task | None = None
        self._watchdog: asyncio.Task | None = None

    async def answer(self, offer: Offer) -> RTCSessionDescription:
        """The answer to `offer`: the session's video and audio, sent only. Raises BadRequestError
        (the peer connection closed) for an offer it cannot answer."""
        try:
            video = self.pc.addTransceiver(self.feed.video, direction="sendonly")
            if self.settings.video_codec != "auto":
                mime = f"video/{self.settings.video_codec.upper()}"
                video.setCodecPreferences([c for c in RTCRtpSender.getCapabilities("video").codecs
                                           if c.mimeType == mime])
            self.pc.addTransceiver(self.feed.audio, direction="sendonly")
            await self.pc.setRemoteDescription(RTCSessionDescription(offer.sdp, offer.type))
            await self.pc.setLocalDescription(await self.pc.createAnswer())
        except Exception as exc:  # malformed SDP, no common codec, ...: the client can fix and retry
            await self.pc.close()
            raise BadRequestError(f"cannot answer this WebRTC offer: {exc or type(exc).__name__}") from exc
        return self.pc.localDescription

    def start(self) -> None:
        """Follow the peer: its data channel, its connection state, and the connect timeout."""
        self.pc.on("datachannel", self._on_datachannel)
        self.pc.on("connectionstatechange", self._on_state)
        self._watchdog = asyncio.create_task(self._watch_connect())
        self.entry.on_close.append(self.close)

    def _on_datachannel(self, channel: RTCDataChannel) -> None:
        self.feed.channel = channel
        channel.on("message", self.feed.on_message)

    async def _on_state(self) -> None:
        state = self.pc.connectionState
        if state == "connected":
            self._connected.set()
            if self._feed_task is None and not self.entry.closed.is_set():  # frames only for a peer that gets them
                self._feed_task = asyncio.create_task(self.feed.run())
                self._feed_task.add_done_callback(self._log_failure)
        elif state in ("failed", "closed"):
            log.info("session %s: WebRTC %s; closing the session", self.entry.id, state)
            await self.registry.close(self.entry)

    async def _watch_connect(self) -> None:
        timeout = self.settings.webrtc_connect_timeout_s
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except TimeoutError:
            log.info("session %s: the WebRTC peer is still %s %g s after its answer; closing the session",
                     self.entry.id, self.pc.connectionState, timeout)
            await self.registry.close(self.entry)

    async def close(self) -> None:
        """Stop the feed and close the peer connection (run once, when the session closes)."""
        self.feed.messages.close()
        if self._watchdog is not None:
            self._watchdog.cancel()  # when it is the watchdog that closes the session, only its wait ends
        if self._feed_task is not None:
            self._feed_task.cancel()
            await asyncio.gather(self._feed_task, return_exceptions=True)
        await self.pc.close()

    def _log_failure(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("session %s: WebRTC feed failed", self.entry.id, exc_info=task.exception())


@router.post("/api/sessions/{session_id}/offer")
async def offer(session_id: str, body: Offer, request: Request, caller: CallerDep) -> dict:
    """Answer a WebRTC offer: the session's video and audio, sent only (the offer's media sections
    should be recvonly; add a data channel for audio in, control and events)."""
    state = request.app.state
    registry: SessionRegistry = state.sessions
    entry = registry.get(session_id, caller.tenant)
    registry.attach(entry, "webrtc")
    viewer = PeerViewer(entry, registry, state)
    try:
        answer = await viewer.answer(body)
    except BadRequestError:
        registry.detach(entry)
        raise
    if entry.closed.is_set():  # closed while the answer was made
        await viewer.pc.close()
        raise SessionNotFoundError(f"session {entry.id} was closed")
    viewer.start()
    return {"sdp": answer.sdp, "type": answer.type}
