"""WebRTC end to end on loopback: an aiortc client peer offers to a live server (uvicorn, warp
engine), receives the session's video and audio tracks, talks over the data channel, and hangs up."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch
from aiortc import RTCPeerConnection, RTCSessionDescription

from lipstream.avatar.model import Avatar
from lipstream.engines.warp import WarpEngine
from lipstream.media.encoding import EncodingPool
from lipstream.server.app import create_app
from lipstream.server.registry import OpenSession
from lipstream.server.webrtc import SessionFeed
from lipstream.stream.clock import MediaClock
from lipstream.stream.scheduler import Scheduler
from lipstream.stream.session import Session
from lipstream.synthetic import speech
from server_helpers import LiveServer, narrow_avatar, pcm16, server_settings, store_avatar, warp_server

KEY = {"Authorization": "Bearer k-default"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("avatars")
    store_avatar(root, "narrow", avatar=narrow_avatar())
    with warp_server(root, output_height=128) as server:
        yield server


async def connect(server: LiveServer, sid: str) -> tuple[RTCPeerConnection, dict, list, asyncio.Queue]:
    """An aiortc peer with recvonly video+audio and a "control" data channel, connected to session sid.
    Returns (pc, {kind: track}, the channel's messages, the open channel in a queue)."""
    pc = RTCPeerConnection()
    pc.addTransceiver("video", direction="recvonly")
    pc.addTransceiver("audio", direction="recvonly")
    channel = pc.createDataChannel("control")
    messages: list = []
    opened: asyncio.Queue = asyncio.Queue()
    channel.on("message", messages.append)
    channel.on("open", lambda: opened.put_nowait(channel))
    tracks: dict = {}
    pc.on("track", lambda track: tracks.__setitem__(track.kind, track))
    await pc.setLocalDescription(await pc.createOffer())
    async with httpx.AsyncClient(base_url=server.url, headers=KEY) as http:
        reply = await http.post(f"/api/sessions/{sid}/offer", json={"sdp": pc.localDescription.sdp, "type": "offer"})
    assert reply.status_code == 200, reply.text
    await pc.setRemoteDescription(RTCSessionDescription(**reply.json()))
    return pc, tracks, messages, opened


def new_session(server: LiveServer) -> str:
    reply = httpx.post(f"{server.url}/api/sessions", json={"avatar": "astronaut"}, headers=KEY)
    assert reply.status_code == 201, reply.text
    return reply.json()["id"]


def test_video_audio_and_events_over_webrtc(server):
    sid = new_session(server)

    async def call() -> dict:
        pc, tracks, messages, opened = await connect(server, sid)
        channel = await asyncio.wait_for(opened.get(), 15)
        assert set(tracks) == {"video", "audio"}
        channel.send("[" * 4000)  # nested too deeply for json.loads: an error event, the call goes on
        first = await asyncio.wait_for(tracks["video"].recv(), 15)
        began = time.monotonic()
        pcm = pcm16(speech(1.0))
        for start in range(0, len(pcm), 640):
            channel.send(pcm[start:start + 640])
        channel.send(json.dumps({"type": "end"}))
        channel.send("not json")
        audio = []

        async def listen() -> None:
            while True:
                audio.append(await tracks["audio"].recv())

        listening = asyncio.ensure_future(listen())
        video = [first]
        while time.monotonic() - began < 2.5:
            video.append(await asyncio.wait_for(tracks["video"].recv(), 5))
        seconds = time.monotonic() - began
        listening.cancel()
        await pc.close()
        return {"video": video, "seconds": seconds, "audio_s": sum(f.samples for f in audio) / audio[0].sample_rate,
                "loud": sum(int(np.abs(f.to_ndarray()).max() > 2000) for f in audio),
                "messages": [json.loads(m) for m in messages]}

    got = asyncio.run(call())
    frames = got["video"]
    assert (frames[0].width, frames[0].height) == (128, 128)
    fps = (len(frames) - 1) / got["seconds"]
    assert 15 <= fps <= 32, f"{fps:.1f} frames/s received"
    pts = [f.pts for f in frames]
    assert all(b > a for a, b in itertools.pairwise(pts)), "video timestamps increase"
    assert np.median(np.diff(pts)) == pytest.approx(90000 / 25, rel=0.01), "40 ms apart on the 90 kHz clock"
    assert got["audio_s"] == pytest.approx(got["seconds"], abs=0.6), "audio flows at the rate of the video"
    assert got["loud"] > 10, "the speech is heard"
    types = [m["type"] for m in got["messages"]]
    assert types[:3] == ["error", "speech_started", "speech_ended"] or \
        ["speech_started", "speech_ended"] == [t for t in types if t != "error"]
    assert "error" in types
    assert any("nested too deeply" in m.get("message", "") for m in got["messages"])
    deadline = time.monotonic() + 10
    while httpx.get(f"{server.url}/api/sessions/{sid}/stats", headers=KEY).status_code != 404:
        assert time.monotonic() < deadline, "hanging up did not close the session"
        time.sleep(0.1)


def test_the_video_track_goes_on_at_the_new_size_when_the_avatar_changes(server):
    """A data channel message switches to an avatar of another size: the same track goes on (its
    timestamps too), at the new size, after the "avatar_changed" event that says so."""
    sid = new_session(server)

    async def call() -> tuple[list, list]:
        pc, tracks, messages, opened = await connect(server, sid)
        channel = await asyncio.wait_for(opened.get(), 15)
        video = [await asyncio.wait_for(tracks["video"].recv(), 15)]
        channel.send(json.dumps({"type": "avatar", "avatar": "narrow"}))
        began = time.monotonic()
        while (video[-1].width, video[-1].height) != (100, 128) and time.monotonic() - began < 10:
            video.append(await asyncio.wait_for(tracks["video"].recv(), 5))
        for _ in range(5):
            video.append(await asyncio.wait_for(tracks["video"].recv(), 5))
        await pc.close()
        return video, [json.loads(m) for m in messages]

    video, messages = asyncio.run(call())
    sizes = [(f.width, f.height) for f in video]
    assert sizes[0] == (128, 128) and sizes[-6:] == [(100, 128)] * 6, sizes
    assert all(b.pts > a.pts for a, b in itertools.pairwise(video)), "one clock before and after"
    changed = [m for m in messages if m["type"] == "avatar_changed"]
    assert [(m["avatar"], m["width"], m["height"]) for m in changed] == [("narrow", 100, 128)]


def test_bad_offers_are_refused_and_the_session_stays_usable(server):
    sid = new_session(server)
    url = f"{server.url}/api/sessions/{sid}/offer"
    bad = httpx.post(url, json={"sdp": "v=0 nonsense", "type": "offer"}, headers=KEY)
    assert bad.status_code == 400 and "cannot answer this WebRTC offer" in bad.json()["detail"]
    assert httpx.post(url, json={"sdp": "x", "type": "answer"}, headers=KEY).status_code == 422
    assert httpx.post(url, json={"sdp": "x", "type": "offer"}, headers={"X-API-Key": "k-other"}).status_code == 404

    async def call() -> tuple:
        pc, tracks, _, opened = await connect(server, sid)
        await asyncio.wait_for(opened.get(), 15)
        frame = await asyncio.wait_for(tracks["video"].recv(), 15)
        async with httpx.AsyncClient(headers=KEY) as http:
            second = await http.post(url, json={"sdp": pc.localDescription.sdp, "type": "offer"})
        await pc.close()
        return frame, second

    frame, second = asyncio.run(call())
    assert frame.width == 128
    assert second.status_code == 409, "one viewer per session"


def test_the_video_codec_setting_picks_the_codec(tmp_path):
    with warp_server(tmp_path, video_codec="h264", output_height=64) as h264_server:
        sid = new_session(h264_server)

        async def call():
            pc, tracks, _, opened = await connect(h264_server, sid)
            await asyncio.wait_for(opened.get(), 15)
            frame = await asyncio.wait_for(tracks["video"].recv(), 15)
            sdp = pc.remoteDescription.sdp
            await pc.close()
            return frame, sdp

        frame, sdp = asyncio.run(call())
    video_section = sdp.split("m=video")[1].split("m=")[0]
    assert "H264/90000" in video_section and "VP8" not in video_section
    assert (frame.width, frame.height) == (64, 64)


def test_audio_and_video_timestamps_share_one_clock():
    """The WebRTC stamping over 5 simulated minutes (a fake clock, a 16x16 avatar): after every frame,
    the audio sent ends exactly where the next video frame starts. At 3 fps a frame has 16000/3 =
    5333.33 samples, the case where rounding could drift; the stamps are integer functions of the
    frame index, so nothing accumulates (the session's own clock is tested over hours in its tests)."""
    fps = 3
    avatar = Avatar("tiny", "", None, frames=np.zeros((1, 16, 16, 3), np.uint8), face_boxes=np.int32([[4, 4, 12, 12]]),
                    crop_boxes=np.int32([[2, 2, 14, 14]]), masks=[np.zeros((12, 12), np.uint8)],
                    crops=np.zeros((1, 256, 256, 3), np.uint8), landmarks=np.zeros((1, 478, 2), np.float32))

    async def simulate() -> list[tuple[int, int, int]]:
        now = [0.0]
        clock = MediaClock(fps, now=lambda: now[0])
        scheduler = Scheduler(WarpEngine())
        scheduler.start()
        session = Session(avatar, scheduler.engine, scheduler, fps=fps, clock=clock)
        encoding = EncodingPool(1)
        feed = SessionFeed(OpenSession(session, "k", "", "tiny", "warp", fps, (16, 16), 0),
                           SimpleNamespace(encoding=encoding, settings=SimpleNamespace(
                               max_message_bytes=1 << 17, max_messages_per_s=200, max_input_bytes_per_s=1 << 20)))
        checks = []
        for k in range(fps * 300):
            now[0] = clock.due(k)
            await feed.handle(session.next_frame())
            video, audio = feed.video.queue._queue[-1], feed.audio.queue._queue[-1]
            checks.append((k, video.pts, audio.pts + audio.samples + feed._pending.shape[0]))
        await session.aclose()
        await scheduler.aclose()
        encoding.shutdown(wait=True)
        return checks

    for k, video_pts, audio_end in asyncio.run(simulate()):
        assert video_pts == round(k / fps * 90000), f"frame {k}: video pts {video_pts}"
        assert audio_end == (k + 1) * 16000 // fps, f"frame {k}: the audio ends at sample {audio_end}"


def test_a_peer_that_never_connects_frees_its_session(tmp_path):
    """A peer whose ICE can never succeed (it went away right after its offer, which, like many browser
    offers, lacks a=end-of-candidates: ICE alone would wait for more candidates for ever) does not hold
    the session: it is closed and freed once the connect timeout passes. A peer that connects keeps it."""
    store_avatar(tmp_path)
    timeout = 3.0
    app = create_app(server_settings(tmp_path, output_height=64, webrtc_connect_timeout_s=timeout),
                     engine=WarpEngine())
    with LiveServer(app) as live:
        registry = app.state.sessions
        before = len(registry.for_tenant(""))
        lost, kept = new_session(live), new_session(live)
        assert len(registry.for_tenant("")) == before + 2

        async def offer_and_vanish() -> httpx.Response:
            pc = RTCPeerConnection()
            pc.addTransceiver("video", direction="recvonly")
            pc.addTransceiver("audio", direction="recvonly")
            pc.createDataChannel("control")
            await pc.setLocalDescription(await pc.createOffer())
            sdp = pc.localDescription.sdp.replace("a=end-of-candidates\r\n", "")
            await pc.close()  # its candidates now point at closed ports
            async with httpx.AsyncClient(base_url=live.url, headers=KEY) as http:
                return await http.post(f"/api/sessions/{lost}/offer", json={"sdp": sdp, "type": "offer"})

        reply = asyncio.run(offer_and_vanish())
        answered = time.monotonic()
        assert reply.status_code == 200, reply.text

        async def connect_and_stay() -> tuple[int, int]:
            pc, tracks, _, opened = await connect(live, kept)
            await asyncio.wait_for(opened.get(), 15)
            await asyncio.wait_for(tracks["video"].recv(), 15)
            while time.monotonic() - answered < timeout + 1.5:  # past the lost peer's deadline
                await asyncio.wait_for(tracks["video"].recv(), 5)
            async with httpx.AsyncClient(base_url=live.url, headers=KEY) as http:
                statuses = [(await http.get(f"/api/sessions/{sid}/stats")).status_code for sid in (lost, kept)]
            await pc.close()
            return statuses

        assert asyncio.run(connect_and_stay()) == [404, 200], "the lost peer's session closed, the connected one not"
        assert time.monotonic() - answered < timeout + 5
        deadline = time.monotonic() + 10
        while len(registry.for_tenant("")) != before:
            assert time.monotonic() < deadline, "hanging up did not close the kept session"
            time.sleep(0.1)


def test_video_frames_are_the_cached_image_with_the_patch_converted_alone():
    """What the video track gets for a speaking frame equals converting the whole frame to I420; an idle
    frame is its image's cached planes."""
    from lipstream.media.encoding import idle_images, to_i420, video_frame
    from lipstream.stream.compositor import Compositor
    from lipstream.stream.session import OutputFrame
    from stream_helpers import small_avatar

    avatar, material = small_avatar()
    compositor = Compositor(avatar)
    engine = WarpEngine()
    faces = engine.generate({k: v[:2] for k, v in material.items()}, torch.tensor([[0.8, 0.3, 0.1], [0.5, 0.0, 0.6]]))
    patches = compositor.patches([0, 1], faces)
    for cycle, patch in ((0, compositor.patch(0, patches[0])), (1, compositor.patch(1, patches[1])), (2, None)):
        frame = OutputFrame(7, 0.28, compositor.frame(cycle), np.zeros(640, np.int16), True, [], cycle, "a", 640,
                            compositor, patch)
        video = video_frame(frame)
        assert video.format.name == "yuv420p" and video.pts == round(0.28 * 90000)
        assert np.array_equal(video.to_ndarray(), to_i420(frame.image))
    assert idle_images(compositor) is idle_images(compositor)


def test_the_senders_encode_with_the_real_time_settings():
    """aiortc's senders get VP8 at cpu-used 16 (no denoiser) and H.264 at preset ultrafast, one thread
    each; audio codecs stay aiortc's."""
    import av
    from aiortc import rtcrtpsender
    from aiortc.codecs.opus import OpusEncoder
    from aiortc.rtcrtpparameters import RTCRtpCodecParameters

    from lipstream.server import webrtc_codecs

    assert rtcrtpsender.get_encoder is webrtc_codecs.realtime_encoder
    frame = av.VideoFrame.from_ndarray(np.random.default_rng(0).integers(0, 255, (96, 128, 3), np.uint8), format="bgr24")
    frame = frame.reformat(format="yuv420p")
    frame.pts, frame.time_base = 0, webrtc_codecs.fractions.Fraction(1, 90000)
    for mime, cls, option in (("video/VP8", webrtc_codecs.RealtimeVp8Encoder, ("cpu-used", "16")),
                              ("video/H264", webrtc_codecs.RealtimeH264Encoder, ("preset", "ultrafast"))):
        encoder = rtcrtpsender.get_encoder(RTCRtpCodecParameters(mimeType=mime, clockRate=90000, payloadType=96))
        assert isinstance(encoder, cls)
        codec = encoder.new_codec(frame)
        assert codec.options[option[0]] == option[1] and codec.thread_count == 1
        payloads, _ = encoder.encode(frame, force_keyframe=True)
        assert payloads and encoder.codec.width == 128
    opus = RTCRtpCodecParameters(mimeType="audio/opus", clockRate=48000, payloadType=111, channels=2)
    assert isinstance(rtcrtpsender.get_encoder(opus), OpusEncoder)
