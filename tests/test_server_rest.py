"""The REST API with the warp engine and a stored avatar: keys and tenants, sessions, audio input,
limits and errors, avatar upload jobs, and the static page."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient

from lipstream.avatar.store import list_avatars
from lipstream.cli import main
from lipstream.config import load_settings
from lipstream.engines.warp import WarpEngine
from lipstream.server.app import create_app
from lipstream.server.serve import page_url
from lipstream.synthetic import speech
from server_helpers import (
    SR,
    astronaut_avatar,
    pcm16,
    server_settings,
    start,
    store_tenant_avatars,
    wav_bytes,
)

DEFAULT = {"Authorization": "Bearer k-default"}
OTHER = {"X-API-Key": "k-other"}


@pytest.fixture(scope="module")
def avatars_root(tmp_path_factory):
    return store_tenant_avatars(tmp_path_factory.mktemp("avatars"))


@pytest.fixture
def client(avatars_root):
    app = create_app(server_settings(avatars_root, max_sessions_per_key=2, max_audio_seconds=5,
                                     max_queued_audio_s=3, max_upload_bytes=2_000_000), engine=WarpEngine())
    client = start(app)
    yield client
    client.__exit__(None, None, None)


def new_session(client, headers=DEFAULT, avatar="astronaut", **body) -> dict:
    reply = client.post("/api/sessions", json={"avatar": avatar, **body}, headers=headers)
    assert reply.status_code == 201, reply.text
    return reply.json()


def test_only_the_page_and_health_are_open(client):
    assert client.get("/health").json() == {"status": "ok"}
    page = client.get("/")
    assert page.status_code == 200 and "lipstream" in page.text and "/static/app.js" in page.text
    assert client.get("/static/app.js").status_code == 200
    for path in ["/ready", "/api/avatars", "/api/config", "/api/sessions", "/api/capacity", "/api/stats",
                 "/docs", "/redoc", "/openapi.json"]:
        reply = client.get(path)
        assert reply.status_code == 401, path
        assert "API key" in reply.json()["detail"]
    assert client.get("/api/avatars", headers={"Authorization": "Bearer nope"}).status_code == 403
    assert client.get("/api/avatars?key=k-default").status_code == 200


def test_api_docs_need_a_key_and_can_be_turned_off(client, avatars_root):
    schema = client.get("/openapi.json", headers=DEFAULT)
    assert schema.status_code == 200 and "/api/sessions" in schema.json()["paths"]
    for page in ("/docs", "/redoc"):
        reply = client.get(page, headers=OTHER)
        assert reply.status_code == 200 and "/openapi.json?key=k-other" in reply.text
    quiet = start(create_app(server_settings(avatars_root, api_docs=False), engine=WarpEngine()))
    try:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert quiet.get(path, headers=DEFAULT).status_code == 404, path
    finally:
        quiet.__exit__(None, None, None)


def test_ready_names_the_engine_and_loads_avatars_on_first_use(client):
    body = client.get("/ready", headers=DEFAULT).json()
    assert body["ready"] and body["engine"] == "warp" and body["avatars_loaded"] == 0
    assert body["capacity"]["free_sessions"] >= 1 and body["capacity"]["free_fps"] > 0
    new_session(client)
    assert client.get("/ready", headers=DEFAULT).json()["avatars_loaded"] == 1


def test_tenants_see_only_their_avatars_and_sessions(client):
    assert [a["name"] for a in client.get("/api/avatars", headers=DEFAULT).json()["avatars"]] == ["astronaut"]
    listed = client.get("/api/avatars", headers=OTHER).json()["avatars"]
    assert [(a["name"], a["width"], a["height"]) for a in listed] == [("astro-other", 512, 512)]
    assert client.post("/api/sessions", json={"avatar": "astro-other"}, headers=DEFAULT).status_code == 404
    mine = new_session(client)
    assert mine["width"] == 512 and mine["engine"] == "warp" and mine["fps"] == 25
    for method, path in [("GET", "stats"), ("POST", "interrupt"), ("POST", "audio")]:
        assert client.request(method, f"/api/sessions/{mine['id']}/{path}", headers=OTHER).status_code == 404
    assert client.delete(f"/api/sessions/{mine['id']}", headers=OTHER).status_code == 404
    assert client.get("/api/sessions", headers=OTHER).json()["sessions"] == []
    assert [s["id"] for s in client.get("/api/sessions", headers=DEFAULT).json()["sessions"]] == [mine["id"]]


def test_session_lifecycle_audio_and_stats(client):
    session = new_session(client, output_height=256)
    assert (session["width"], session["height"]) == (256, 256)
    sid = session["id"]
    audio = speech(1.0)
    reply = client.post(f"/api/sessions/{sid}/audio", content=pcm16(audio),
                        headers={**DEFAULT, "Content-Type": "application/octet-stream"})
    assert reply.json() == {"samples": SR, "seconds": 1.0, "ended": False}
    reply = client.post(f"/api/sessions/{sid}/audio?end=true", headers=DEFAULT,
                        files={"file": ("hello.wav", wav_bytes(speech(0.5)), "audio/wav")})
    assert reply.json()["samples"] == SR // 2 and reply.json()["ended"]
    stats = client.get(f"/api/sessions/{sid}/stats", headers=DEFAULT).json()
    assert stats["stats"]["audio_queued_s"] == pytest.approx(1.5)
    assert client.post(f"/api/sessions/{sid}/interrupt", headers=DEFAULT).json() == {"interrupted": True}
    assert client.get(f"/api/sessions/{sid}/stats", headers=DEFAULT).json()["stats"]["audio_queued_s"] == 0
    assert client.delete(f"/api/sessions/{sid}", headers=DEFAULT).status_code == 204
    assert client.get(f"/api/sessions/{sid}/stats", headers=DEFAULT).status_code == 404


def test_audio_at_another_rate_and_as_a_file_body(client):
    sid = new_session(client)["id"]
    reply = client.post(f"/api/sessions/{sid}/audio?sample_rate=8000", content=pcm16(speech(0.5)[::2]),
                        headers={**DEFAULT, "Content-Type": "audio/L16"})
    assert reply.json()["samples"] == 4000 * 2  # 0.5 s at 16 kHz
    reply = client.post(f"/api/sessions/{sid}/audio", content=wav_bytes(speech(0.25)),
                        headers={**DEFAULT, "Content-Type": "audio/wav"})
    assert reply.json()["samples"] == SR // 4


def test_limits_and_bad_input_get_clear_errors(client):
    first, _ = new_session(client)["id"], new_session(client)
    reply = client.post("/api/sessions", json={"avatar": "astronaut"}, headers=DEFAULT)
    assert reply.status_code == 429 and "max_sessions_per_key" in reply.json()["detail"]
    new_session(client, headers=OTHER, avatar="astro-other")  # another key has its own budget
    audio = f"/api/sessions/{first}/audio"
    raw = {**DEFAULT, "Content-Type": "application/octet-stream"}
    too_long = client.post(audio, content=b"\0\0" * SR * 6, headers=raw)
    assert too_long.status_code == 413 and "max_audio_seconds" in too_long.json()["detail"]
    odd = client.post(audio, content=b"\0\0\0", headers=raw)
    assert odd.status_code == 400 and "2 bytes a sample" in odd.json()["detail"]
    garbage = client.post(audio, content=b"not audio at all" * 10, headers={**DEFAULT, "Content-Type": "audio/wav"})
    assert garbage.status_code == 400 and garbage.json()["error"] == "AudioDecodeError"
    no_field = client.post(audio, headers=DEFAULT, files={"audio": ("a.wav", wav_bytes(speech(0.1)))})
    assert no_field.status_code == 400 and "`file`" in no_field.json()["detail"]
    for _ in range(3):  # 3 s queued is the limit
        assert client.post(audio, content=pcm16(speech(1.0)), headers=raw).status_code == 200
    full = client.post(audio, content=pcm16(speech(0.5)), headers=raw)
    assert full.status_code == 429 and full.json()["error"] == "QueueFullError"
    big = client.post(audio, content=b"\0" * 2_000_002, headers=raw)
    assert big.status_code == 413 and "max_upload_bytes" in big.json()["detail"]
    unknown = client.post("/api/sessions", json={"avatar": "nobody"}, headers=OTHER)
    assert unknown.status_code == 404 and "nobody" in unknown.json()["detail"]
    assert client.post("/api/sessions", json={"avatar": "astronaut", "fps": 0}, headers=OTHER).status_code == 422


def test_chunked_upload_over_the_cap_is_refused(client):
    def chunks():
        for _ in range(40):
            yield b"\0" * 100_000
    reply = client.post(f"/api/sessions/{new_session(client)['id']}/audio", content=chunks(),
                        headers={**DEFAULT, "Content-Type": "application/octet-stream"})
    assert reply.status_code == 413
    video = client.post("/api/avatars", headers=DEFAULT, data={"name": "big"},
                        files={"file": ("big.mp4", b"\0" * 2_100_000, "video/mp4")})
    assert video.status_code == 413 and "max_upload_bytes" in video.json()["detail"]


def test_metrics_need_the_metrics_key_and_tenants_see_only_their_own_stats(client):
    new_session(client)
    text = client.get("/metrics", headers={"Authorization": "Bearer k-metrics"}).text
    assert "lipstream_active_sessions" in text and "lipstream_server_viewers" in text
    assert "lipstream_shed_frames" in text
    assert client.get("/metrics").status_code == 401
    for key in ("k-default", "k-other"):
        refused = client.get("/metrics", headers={"X-API-Key": key})
        assert refused.status_code == 403 and "/api/stats" in refused.json()["detail"]
    mine = client.get("/api/stats", headers=DEFAULT).json()
    assert mine["tenant"] == "" and mine["sessions"] == 1 and mine["jobs"]["queued"] == 0
    theirs = client.get("/api/stats", headers=OTHER).json()
    assert theirs["tenant"] == "other" and theirs["sessions"] == 0 and theirs["frames_sent"] == 0


def test_metrics_are_off_without_a_metrics_key(avatars_root):
    client = start(create_app(server_settings(avatars_root, metrics_key=""), engine=WarpEngine()))
    try:
        reply = client.get("/metrics", headers={"Authorization": "Bearer k-default"})
        assert reply.status_code == 403 and "metrics_key" in reply.json()["detail"]
    finally:
        client.__exit__(None, None, None)


def test_output_larger_than_the_avatar_needs_the_upscaling_setting(client, avatars_root):
    refused = client.post("/api/sessions", json={"avatar": "astronaut", "output_height": 4320}, headers=DEFAULT)
    assert refused.status_code == 400 and refused.json()["error"] == "OutputTooLargeError"
    assert "allow_upscaling" in refused.json()["detail"] and "512" in refused.json()["detail"]
    assert new_session(client, output_height=512)["height"] == 512
    allowing = start(create_app(server_settings(avatars_root, allow_upscaling=True, output_height=1024),
                                engine=WarpEngine()))
    try:
        assert new_session(allowing)["height"] == 1024, "the setting's height, allowed to scale up"
        assert new_session(allowing, output_height=768)["height"] == 768
    finally:
        allowing.__exit__(None, None, None)
    scaled_down_only = start(create_app(server_settings(avatars_root, output_height=1024), engine=WarpEngine()))
    try:
        assert new_session(scaled_down_only)["height"] == 512, "the setting never scales an avatar up"
    finally:
        scaled_down_only.__exit__(None, None, None)


def test_sessions_without_a_viewer_are_closed_after_the_timeout(avatars_root):
    app = create_app(server_settings(avatars_root, detached_session_timeout_s=0.2), engine=WarpEngine())
    client = start(app)
    try:
        sid = new_session(client)["id"]
        assert client.get(f"/api/sessions/{sid}/stats", headers=DEFAULT).status_code == 200
        time.sleep(0.3)
        closed = client.portal.call(app.state.sessions.close_detached)
        assert closed == 1
        assert client.get(f"/api/sessions/{sid}/stats", headers=DEFAULT).status_code == 404
    finally:
        client.__exit__(None, None, None)


def test_avatar_upload_runs_as_a_job_and_the_avatar_becomes_usable(client):
    _, photo = cv2.imencode(".png", astronaut_avatar().frames[0])
    reply = client.post("/api/avatars", headers=OTHER, data={"name": "uploaded"},
                        files={"file": ("me.png", photo.tobytes(), "image/png")})
    assert reply.status_code == 202, reply.text
    job = reply.json()["job"]
    assert job["kind"] == "photo" and job["status"] in ("queued", "running")
    assert client.get(f"/api/jobs/{job['id']}", headers=DEFAULT).status_code == 404  # another tenant
    deadline = time.monotonic() + 60
    while job["status"] not in ("done", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
        job = client.get(f"/api/jobs/{job['id']}", headers=OTHER).json()
    assert job["status"] == "done" and job["progress"] == 1.0, job
    names = [a["name"] for a in client.get("/api/avatars", headers=OTHER).json()["avatars"]]
    assert "uploaded" in names
    # `lipstream avatars list` names the uploaded file, not where the server kept it meanwhile
    listed = list_avatars("other", client.app.state.settings.avatars_root)
    assert [a.source for a in listed if a.name == "uploaded"] == ["image: me.png"]
    new_session(client, headers=OTHER, avatar="uploaded")
    again = client.post("/api/avatars", headers=OTHER, data={"name": "uploaded"},
                        files={"file": ("me.png", photo.tobytes(), "image/png")})
    assert again.status_code == 409
    assert client.delete("/api/avatars/uploaded", headers=OTHER).status_code == 204
    assert client.delete("/api/avatars/uploaded", headers=OTHER).status_code == 404


def test_a_failed_job_says_why(client):
    reply = client.post("/api/avatars", headers=DEFAULT, data={"name": "noface"},
                        files={"file": ("flat.png", cv2.imencode(".png", np.full((64, 64, 3), 128, np.uint8))[1]
                                        .tobytes(), "image/png")})
    job = reply.json()["job"]
    deadline = time.monotonic() + 60
    while job["status"] not in ("done", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
        job = client.get(f"/api/jobs/{job['id']}", headers=DEFAULT).json()
    assert job["status"] == "failed" and "face" in job["error"]
    bad_name = client.post("/api/avatars", headers=DEFAULT, data={"name": "../x"},
                           files={"file": ("a.png", b"x", "image/png")})
    assert bad_name.status_code == 400 and "not allowed" in bad_name.json()["detail"]


def test_errors_show_no_server_path_and_only_a_short_prefix_of_bad_input(client, avatars_root, tmp_path):
    server_paths = (str(avatars_root), str(avatars_root.resolve()), str(client.app.state.jobs.uploads),
                    str(Path(tempfile.gettempdir())))
    long_name = "x" * 100_000
    replies = [
        client.post("/api/avatars", headers=DEFAULT, data={"name": long_name},
                    files={"file": ("a.png", b"x", "image/png")}),
        client.post("/api/sessions", json={"avatar": long_name}, headers=DEFAULT),
        client.get(f"/api/sessions/{'s' * 5000}/stats", headers=DEFAULT),
        client.get(f"/api/jobs/{'j' * 5000}", headers=DEFAULT),
        client.post("/api/sessions", json={"avatar": "nobody"}, headers=OTHER),  # its folder is a server path
        client.delete("/api/avatars/nobody", headers=DEFAULT),
    ]
    for reply in replies:
        detail = reply.json()["detail"]
        assert 400 <= reply.status_code < 500 and len(detail) < 400, (reply.status_code, detail[:500])
        assert not any(path in detail for path in server_paths), detail
    sid = new_session(client)["id"]
    upload = client.post(f"/api/sessions/{sid}/audio", headers=DEFAULT,
                         files={"file": ("y" * 900 + ".wav", b"not audio", "audio/wav")})
    assert upload.status_code == 400 and len(upload.json()["detail"]) < 400
    job = client.post("/api/avatars", headers=DEFAULT, data={"name": "broken"},
                      files={"file": ("z" * 900 + ".png", b"not a picture", "image/png")}).json()["job"]
    while job["status"] not in ("done", "failed"):
        time.sleep(0.1)
        job = client.get(f"/api/jobs/{job['id']}", headers=DEFAULT).json()
    assert job["status"] == "failed" and "cannot read image zzz" in job["error"] and len(job["error"]) < 400
    assert not any(path in job["error"] for path in server_paths), job["error"]


def test_serve_without_the_weights_of_the_engine_asked_for_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LIPSTREAM_CONFIG", raising=False)
    assert main(["serve", "--engine", "musetalk", "--models-root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "lipstream models download" in err


def test_page_url_reaches_a_local_browser():
    assert page_url(load_settings(environ={}), "abc") == "http://localhost:2160/?key=abc"
    assert page_url(load_settings({"host": "10.0.0.5", "port": "80"}, environ={}), None) == "http://10.0.0.5:80/"


def test_the_engine_named_in_the_settings_loads_in_the_background(avatars_root):
    client = start(create_app(server_settings(avatars_root, engine="warp", sharpen="false")))
    try:
        body = client.get("/ready", headers=DEFAULT).json()
        assert body["engine"] == "warp" and "asked for" in body["reason"]
        sid = new_session(client)["id"]  # the setting sharpen reaches the sessions' compositor
        assert client.app.state.sessions.get(sid, "").session.compositor.sharpen is False
    finally:
        client.__exit__(None, None, None)


def test_an_engine_that_cannot_load_leaves_health_up_and_ready_saying_why(avatars_root):
    with TestClient(create_app(server_settings(avatars_root, engine="musetalk"))) as client:
        deadline = time.monotonic() + 30
        while (reply := client.get("/ready", headers=DEFAULT)).json().get("error") is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert reply.status_code == 503 and "MissingWeightsError" in reply.json()["error"]
        assert client.get("/health").status_code == 200
        refused = client.post("/api/sessions", json={"avatar": "astronaut"}, headers=DEFAULT)
        assert refused.status_code == 503 and refused.json()["error"] == "NotReadyError"
        for text in (reply.text, refused.text):  # why, without the server's paths
            assert "<models>" in text and str(avatars_root) not in text, text


def test_audio_files_are_recognised_and_a_long_file_fits_an_empty_queue(client):
    """A WAV/MP3 body without a Content-Type is decoded as a file, not played as PCM; raw PCM stays
    PCM; a file longer than the queue bound (3 s here) but within max_audio_seconds (5 s) is accepted."""
    audio = f"/api/sessions/{new_session(client)['id']}/audio"
    wav = wav_bytes(speech(4.0))
    for headers in (DEFAULT, {**DEFAULT, "Content-Type": "application/octet-stream"}):
        reply = client.post(audio, content=wav, headers=headers)
        assert reply.status_code == 200, reply.text
        assert reply.json()["samples"] == 4 * SR, "decoded as a WAV file, header not played as PCM"
        client.post(f"{audio.rsplit('/', 1)[0]}/interrupt", headers=DEFAULT)
    pcm = pcm16(speech(0.5))
    assert client.post(audio, content=pcm, headers=DEFAULT).json()["samples"] == len(pcm) // 2


def test_every_error_reply_has_detail_and_error(client):
    unauthorized = client.get("/api/avatars")
    assert unauthorized.status_code == 401 and unauthorized.json()["error"] == "Unauthorized"
    bad_json = client.post("/api/sessions", content=b"{bad", headers={**DEFAULT, "Content-Type": "application/json"})
    assert bad_json.status_code == 422 and bad_json.json()["error"] == "RequestValidationError"
    assert isinstance(bad_json.json()["detail"], str)
    tiny = client.post("/api/sessions", json={"avatar": "astronaut", "output_height": 1}, headers=DEFAULT)
    assert tiny.status_code == 422 and "output_height" in tiny.json()["detail"]


def test_an_avatar_name_being_prepared_is_refused_before_the_upload_is_stored(client):
    jobs = client.app.state.jobs
    jobs._pending.add(("other", "busy"))  # a job for it is queued or running
    try:
        reply = client.post("/api/avatars", headers=OTHER, data={"name": "busy"},
                            files={"file": ("me.png", b"\x89PNG not stored", "image/png")})
        assert reply.status_code == 409 and "being prepared" in reply.json()["detail"]
        assert not any(jobs.uploads.iterdir()), "the upload was not stored"
    finally:
        jobs._pending.discard(("other", "busy"))
