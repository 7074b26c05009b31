"""The WebSocket transport with the warp engine: the wire format, speech in and lip-synced frames with
their audio and events out, bad messages answered (not fatal), one viewer per session, and a client
that goes away closing its session."""

from __future__ import annotations

import json
import time

import cv2
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from lipstream.engines.warp import WarpEngine
from lipstream.server import wire
from lipstream.server.app import create_app
from lipstream.server.viewer import InputLimits
from lipstream.synthetic import speech
from musetalk_tiny import write_tiny_musetalk
from server_helpers import narrow_avatar, pcm16, server_settings, store_avatar

FPS = 25


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("avatars")
    store_avatar(root)
    store_avatar(root, "narrow", avatar=narrow_avatar())
    store_avatar(root, "elsewhere", tenant="other")
    app = create_app(server_settings(root, jpeg_quality=90), engine=WarpEngine())
    with TestClient(app) as client:
        deadline = time.monotonic() + 30
        while client.get("/ready?key=k-default").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        yield client


def session(client, **body) -> str:
    reply = client.post("/api/sessions?key=k-default", json={"avatar": "astronaut", **body})
    assert reply.status_code == 201, reply.text
    return reply.json()["id"]


def receive(ws) -> str | wire.WireFrame:
    message = ws.receive()
    assert message["type"] == "websocket.send", message
    return message["text"] if message.get("text") is not None else wire.unpack_frame(message["bytes"])


def test_wire_frame_round_trip():
    audio = np.arange(-320, 320, dtype=np.int16)
    data = wire.pack_frame(7, 0.28, True, audio, b"\xff\xd8jpeg")
    assert len(data) == wire.HEADER.size + 2 * 640 + 6 and data[:4] == b"LSF1"
    frame = wire.unpack_frame(data)
    assert (frame.index, frame.pts, frame.speaking, frame.jpeg) == (7, 0.28, True, b"\xff\xd8jpeg")
    assert np.array_equal(frame.audio, audio)
    with pytest.raises(ValueError):
        wire.unpack_frame(data[:-1])


def test_speech_in_frames_audio_and_events_out(client):
    sid = session(client, output_height=256)
    pcm = pcm16(speech(1.2))
    with client.websocket_connect(f"/api/sessions/{sid}/ws?key=k-default") as ws:
        hello = json.loads(receive(ws))
        assert hello == {"type": "hello", "session": sid, "avatar": "astronaut", "fps": FPS, "width": 256,
                         "height": 256, "sample_rate": 16000, "format": "LSF1"}
        for start in range(0, len(pcm), 640):  # 20 ms chunks
            ws.send_bytes(pcm[start:start + 640])
        ws.send_text(json.dumps({"type": "end"}))
        frames, events = [], []
        while not (events and events[-1]["type"] == "speech_ended" and frames[-1].index == events[-1]["index"]):
            message = receive(ws)
            if isinstance(message, str):
                events.append(json.loads(message))
            else:
                frames.append(message)
            assert len(frames) < 200, "no speech_ended within 8 s"
    assert [e["type"] for e in events] == ["speech_started", "speech_ended"]
    assert [f.index for f in frames] == list(range(frames[0].index, frames[0].index + len(frames)))
    assert all(f.pts == pytest.approx(f.index / FPS) for f in frames)
    assert all(f.audio.shape == (640,) for f in frames)
    started, ended = (next(i for i, f in enumerate(frames) if f.index == e["index"]) for e in events)
    assert all(f.speaking for f in frames[started:ended]) and not any(f.speaking for f in frames[ended:])
    assert not any(f.speaking for f in frames[:started])
    spoken = np.concatenate([f.audio for f in frames[started:ended]])
    pushed = np.frombuffer(pcm, "<i2")
    assert np.array_equal(spoken[:pushed.size], pushed), "the frames carry exactly the audio pushed"
    assert not spoken[pushed.size:].any()
    images = [cv2.imdecode(np.frombuffer(f.jpeg, np.uint8), cv2.IMREAD_COLOR) for f in frames]
    assert all(image.shape == (256, 256, 3) for image in images)
    idle, talking = images[0], images[started:ended]
    changed = [int((np.abs(image.astype(int) - idle.astype(int)) > 24).sum()) for image in talking]
    assert sum(c > 100 for c in changed) > len(talking) / 3, "the mouth moves while speaking"


def test_bad_messages_get_errors_and_the_stream_goes_on(client):
    sid = session(client)
    with client.websocket_connect(f"/api/sessions/{sid}/ws", headers={"X-API-Key": "k-default"}) as ws:
        receive(ws)  # hello
        ws.send_text("not json")
        ws.send_text(json.dumps({"type": "dance"}))
        ws.send_bytes(b"\x01\x02\x03")
        ws.send_text(json.dumps({"type": "ping", "t": 12.5}))
        texts, frames = [], 0
        while len(texts) < 4:
            message = receive(ws)
            if isinstance(message, str):
                texts.append(json.loads(message))
            else:
                frames += 1
        assert [t["type"] for t in texts] == ["error", "error", "error", "pong"]
        assert texts[0]["code"] == texts[1]["code"] == texts[2]["code"] == "BadRequestError"
        assert "JSON" in texts[0]["message"] and "dance" in texts[1]["message"] and "PCM16" in texts[2]["message"]
        assert texts[3]["t"] == 12.5
        assert all(isinstance(receive(ws), wire.WireFrame) for _ in range(3)), "frames keep coming"


def test_nested_and_oversized_messages_get_errors_and_the_connection_stays(client):
    """Deeply nested JSON (which json.loads cannot parse without running out of stack), control text
    beyond its bound and a binary message over max_message_bytes are each answered with an error
    event; the connection and its stream go on."""
    sid = session(client)
    with client.websocket_connect(f"/api/sessions/{sid}/ws", headers={"X-API-Key": "k-default"}) as ws:
        receive(ws)  # hello
        ws.send_text("[" * 4000)
        ws.send_text("[" * 100_000)
        ws.send_bytes(b"\0\0" * 70_000)  # 140 kB > 128 KiB
        ws.send_text(json.dumps({"type": "ping", "t": 1}))
        texts = []
        while len(texts) < 4:
            message = receive(ws)
            if isinstance(message, str):
                texts.append(json.loads(message))
        assert [t.get("code") for t in texts] == ["BadRequestError", "BadRequestError", "MessageTooLargeError", None]
        assert "nested too deeply" in texts[0]["message"] and "4096 characters" in texts[1]["message"]
        assert "max_message_bytes" in texts[2]["message"] and texts[3] == {"type": "pong", "t": 1}
        assert all(isinstance(receive(ws), wire.WireFrame) for _ in range(3)), "frames keep coming"
    assert client.get(f"/api/sessions/{sid}/stats?key=k-default").status_code == 404, "closed by the client only"


def test_a_flooding_client_is_read_at_its_rate(tmp_path):
    """max_messages_per_s=50: 150 tiny messages sent at once take the server about (150 - 50) / 50 s to
    read (the first second's worth is a burst), so the ping behind them is answered no sooner."""
    store_avatar(tmp_path)
    app = create_app(server_settings(tmp_path, max_messages_per_s=50), engine=WarpEngine())
    with TestClient(app) as client:
        while client.get("/ready?key=k-default").status_code != 200:
            time.sleep(0.05)
        sid = session(client)
        with client.websocket_connect(f"/api/sessions/{sid}/ws", headers={"X-API-Key": "k-default"}) as ws:
            receive(ws)  # hello
            began = time.monotonic()
            for _ in range(150):
                ws.send_bytes(b"\0\0")
            ws.send_text(json.dumps({"type": "ping", "t": 0}))
            while not isinstance(message := receive(ws), str) or json.loads(message)["type"] != "pong":
                pass
            assert time.monotonic() - began >= 1.8


def test_input_limits_count_messages_and_bytes():
    now = [0.0]
    limits = InputLimits(1000, messages_per_s=10, bytes_per_s=100, now=lambda: now[0])
    assert [limits.wait_s(1) for _ in range(10)] == [0.0] * 10, "a second's worth at once"
    assert limits.wait_s(1) == pytest.approx(0.1)
    now[0] = 1.1
    assert limits.wait_s(100) == 0.0 and limits.wait_s(50) == pytest.approx(0.5), "bytes count too"
    assert not limits.allow(1), "in debt: the data channel drops"
    now[0] = 3.0
    assert limits.allow(60) and not limits.allow(60) and limits.allow(40)


def test_interrupt_over_the_websocket(client):
    sid = session(client)
    with client.websocket_connect(f"/api/sessions/{sid}/ws?key=k-default") as ws:
        receive(ws)
        ws.send_bytes(pcm16(speech(3.0)))
        message = None
        while not (isinstance(message, wire.WireFrame) and message.speaking):
            message = receive(ws)
        ws.send_text(json.dumps({"type": "interrupt"}))
        events = []
        while not isinstance(message := receive(ws), wire.WireFrame) or "interrupted" not in events:
            if isinstance(message, str):
                events.append(json.loads(message)["type"])
        assert events == ["interrupted", "speech_ended"]
        assert not message.speaking and not message.audio.any(), "the frame after the interrupt is idle"
        stats = client.get(f"/api/sessions/{sid}/stats?key=k-default").json()["stats"]
        assert stats["audio_queued_s"] == 0 and stats["interrupts"] == 1


@pytest.mark.parametrize("url, code", [
    ("/api/sessions/{sid}/ws", 4401),
    ("/api/sessions/{sid}/ws?key=wrong", 4403),
    ("/api/sessions/nope/ws?key=k-default", 4404),
    ("/api/sessions/{sid}/ws?key=k-other", 4404),
])
def test_refused_connections_close_with_a_code_and_reason(client, url, code):
    sid = session(client)
    with client.websocket_connect(url.format(sid=sid)) as ws:
        message = ws.receive()
    assert message["type"] == "websocket.close" and message["code"] == code and message["reason"]


def test_one_viewer_per_session_and_a_vanished_client_frees_its_session(client):
    sid = session(client)
    with client.websocket_connect(f"/api/sessions/{sid}/ws?key=k-default") as ws:
        receive(ws)
        with client.websocket_connect(f"/api/sessions/{sid}/ws?key=k-default") as second:
            message = second.receive()
        assert message["code"] == 4409 and "viewer" in message["reason"]
        assert client.get(f"/api/sessions/{sid}/stats?key=k-default").json()["viewer"] == "websocket"
    deadline = time.monotonic() + 5
    while client.get(f"/api/sessions/{sid}/stats?key=k-default").status_code != 404:
        assert time.monotonic() < deadline, "the session outlived its viewer"
        time.sleep(0.05)


def test_deleting_the_session_closes_its_websocket(client):
    sid = session(client)
    with client.websocket_connect(f"/api/sessions/{sid}/ws?key=k-default") as ws:
        receive(ws)
        assert client.delete(f"/api/sessions/{sid}?key=k-default").status_code == 204
        while True:
            message = ws.receive()
            if message["type"] == "websocket.close":
                break
        assert message["code"] == 1000


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])])
def test_a_musetalk_server_speaks_over_the_websocket(tmp_path, device):
    """Settings name the engine (tiny random MuseTalk weights): loaded at start, sessions speak; on CUDA
    the compositor's frames are GPU tensors the transport copies to the host."""
    write_tiny_musetalk(tmp_path / "models")
    store_avatar(tmp_path / "avatars")
    settings = server_settings(tmp_path / "avatars", engine="musetalk", models_root=str(tmp_path / "models"),
                               device=device, output_height=128)
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 60
        while (ready := client.get("/ready?key=k-default")).status_code != 200:
            assert time.monotonic() < deadline and "error" not in ready.json(), ready.json()
            time.sleep(0.1)
        assert ready.json()["engine"] == "musetalk" and ready.json()["device"].startswith(device)
        sid = session(client)
        with client.websocket_connect(f"/api/sessions/{sid}/ws?key=k-default") as ws:
            receive(ws)
            ws.send_bytes(pcm16(speech(1.0)))
            ws.send_text(json.dumps({"type": "end"}))
            events, frames = [], []
            while "speech_ended" not in events:
                message = receive(ws)
                if isinstance(message, str):
                    events.append(json.loads(message)["type"])
                else:
                    frames.append(message)
                assert len(frames) < 500, "no speech_ended within 20 s"
        assert events == ["speech_started", "speech_ended"]
        speaking = [f for f in frames if f.speaking]
        assert len(speaking) >= 20
        image = cv2.imdecode(np.frombuffer(speaking[0].jpeg, np.uint8), cv2.IMREAD_COLOR)
        assert image.shape == (128, 128, 3)


def receive_any(ws) -> str | wire.WireFrame | wire.PatchFrame | tuple[int, bytes]:
    """The next message of a `frames=patches` connection: text, a patch frame, or (number, JPEG) of an image."""
    message = ws.receive()
    assert message["type"] == "websocket.send", message
    if message.get("text") is not None:
        return message["text"]
    data = message["bytes"]
    return wire.unpack_image(data) if data[:4] == wire.IMAGE_MAGIC else wire.unpack_patch_frame(data)


def decode(jpeg: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)


def test_patch_frames_send_each_image_once_and_only_the_face_per_speaking_frame(client):
    """frames=patches: each image of the avatar comes once, before the first frame that shows it; an idle
    frame is its image; a speaking frame draws its patch (16-aligned, its outer 8 px left out) over it,
    the mouth moving, the patch meeting its image without a seam; far fewer bytes than whole JPEGs."""
    sid = session(client, output_height=256)
    with client.websocket_connect(f"/api/sessions/{sid}/ws?key=k-default&frames=patches") as ws:
        assert json.loads(receive_any(ws))["format"] == "LSP1"
        ws.send_bytes(pcm16(speech(1.0)))
        ws.send_text(json.dumps({"type": "end"}))
        images, frames, events, shown = {}, [], [], []
        while "speech_ended" not in events:
            message = receive_any(ws)
            if isinstance(message, str):
                events.append(json.loads(message)["type"])
            elif isinstance(message, tuple):
                assert message[0] not in images, "an image is sent once"
                images[message[0]] = decode(message[1])
            else:
                assert message.image in images, "a frame's image comes before it"
                frames.append(message)
                frame = images[message.image].copy()
                if message.draw[2]:
                    x, y, (dx, dy, dw, dh) = *message.at, message.draw
                    patch = decode(message.patch)
                    assert x % 16 == 0 and y % 16 == 0 and dx >= x and dy >= y
                    part = patch[dy - y:dy - y + dh, dx - x:dx - x + dw]
                    assert part.shape == (dh, dw, 3)
                    ring = np.ones((dh, dw), bool)
                    ring[2:-2, 2:-2] = False  # the drawn part's edge: unchanged pixels, as the image has them
                    seam = np.abs(part.astype(int) - frame[dy:dy + dh, dx:dx + dw].astype(int))[ring]
                    assert seam.mean() < 3
                    frame[dy:dy + dh, dx:dx + dw] = part
                shown.append(frame)
            assert len(frames) < 300, "no speech_ended within 12 s"
    assert all(image.shape == (256, 256, 3) for image in images.values())
    speaking = [i for i, f in enumerate(frames) if f.speaking]
    assert all(not f.draw[2] and f.patch == b"" for f in frames if not f.speaking)
    assert sum(frames[i].draw[2] > 0 for i in speaking) > len(speaking) / 2
    idle = shown[0]
    changed = [int((np.abs(shown[i].astype(int) - idle.astype(int)) > 24).sum()) for i in speaking]
    assert sum(c > 100 for c in changed) > len(speaking) / 3, "the mouth moves while speaking"
    whole = np.mean([len(cv2.imencode(".jpg", shown[i], [cv2.IMWRITE_JPEG_QUALITY, 90])[1]) for i in speaking])
    assert np.mean([len(frames[i].patch) for i in speaking]) < whole / 3


def test_an_unknown_frame_format_is_refused(client):
    sid = session(client)
    with client.websocket_connect(f"/api/sessions/{sid}/ws?key=k-default&frames=png") as ws:
        message = ws.receive()
    assert message["type"] == "websocket.close" and message["code"] == 4400 and "patches" in message["reason"]


def test_wire_patch_messages_round_trip():
    audio = np.arange(-320, 320, dtype=np.int16)
    data = wire.pack_patch_frame(9, 0.36, True, audio, 3, (32, 48), (40, 56, 100, 80), b"\xff\xd8patch")
    assert len(data) == wire.PATCH_HEADER.size + 2 * 640 + 7 and data[:4] == b"LSP1"
    frame = wire.unpack_patch_frame(data)
    assert (frame.index, frame.pts, frame.speaking, frame.image, frame.at, frame.draw, frame.patch) == \
        (9, 0.36, True, 3, (32, 48), (40, 56, 100, 80), b"\xff\xd8patch")
    assert np.array_equal(frame.audio, audio)
    assert wire.unpack_image(wire.pack_image(5, b"jpeg")) == (5, b"jpeg")
    for bad in (data[:-1], wire.pack_image(5, b"jpeg")):
        with pytest.raises(ValueError):
            wire.unpack_patch_frame(bad)
    assert wire.draw_rect(0, 32, 64, 48, (256, 320), 8) == (0, 40, 56, 32)  # the frame's left edge: no margin
    assert wire.draw_rect(256, 208, 64, 48, (256, 320), 8) == (264, 216, 56, 40)  # right and bottom edges


def test_the_avatar_changes_at_the_next_frame_over_rest_or_a_message_without_dropping_the_connection(client):
    """Over REST or the WebSocket's own message: an "avatar_changed" event with the new streamed size, then
    frames of that size, the frame indices going on. An unknown or another tenant's avatar is refused
    (404, or an error message) and the session goes on as it was."""
    sid = session(client, output_height=256)
    with client.websocket_connect(f"/api/sessions/{sid}/ws?key=k-default") as ws:
        assert json.loads(receive(ws))["width"] == 256
        first = receive(ws)
        changed = client.post(f"/api/sessions/{sid}/avatar?key=k-default", json={"avatar": "narrow"})
        assert changed.status_code == 200, changed.text
        assert (changed.json()["avatar"], changed.json()["width"], changed.json()["height"]) == ("narrow", 200, 256)
        for wrong, key in (("nobody", "k-default"), ("elsewhere", "k-default"), ("narrow", "k-other")):
            assert client.post(f"/api/sessions/{sid}/avatar?key={key}", json={"avatar": wrong}).status_code == 404
        last = first
        while not isinstance(message := receive(ws), str):
            last = message
        event = json.loads(message)
        assert (event["type"], event["avatar"], event["width"], event["height"]) == ("avatar_changed", "narrow",
                                                                                   200, 256)
        frame = receive(ws)
        assert frame.index == event["index"] == last.index + 1 > first.index
        assert cv2.imdecode(np.frombuffer(frame.jpeg, np.uint8), cv2.IMREAD_COLOR).shape == (256, 200, 3)
        ws.send_text(json.dumps({"type": "avatar", "avatar": "nobody"}))
        ws.send_text(json.dumps({"type": "avatar", "avatar": "astronaut"}))
        texts = []
        while len(texts) < 2:
            if isinstance(message := receive(ws), str):
                texts.append(json.loads(message))
        assert texts[0]["type"] == "error" and texts[0]["code"] == "AvatarNotFoundError"
        assert (texts[1]["type"], texts[1]["avatar"], texts[1]["width"]) == ("avatar_changed", "astronaut", 256)
        frame = receive(ws)
        assert cv2.imdecode(np.frombuffer(frame.jpeg, np.uint8), cv2.IMREAD_COLOR).shape == (256, 256, 3)
    stats = client.get(f"/api/sessions/{sid}/stats?key=k-default")
    assert stats.status_code == 404, "the session closed with its viewer, as always"

