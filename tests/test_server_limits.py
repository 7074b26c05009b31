"""The server as uvicorn runs it (`uvicorn_config`): half-sent request heads and stalled bodies time
out, WebSocket messages are bounded, API keys never reach a log line, and a starting server removes
the upload folders of servers that are gone."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import tempfile
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from websockets.exceptions import ConnectionClosedError
from websockets.sync.client import connect

from lipstream.engines.warp import WarpEngine
from lipstream.server.app import create_app
from lipstream.server.logs import install_key_redaction, redact_keys
from server_helpers import LiveServer, server_settings

KEY = {"X-API-Key": "k-default"}


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes `sock` within `seconds` (it reads b"" then)."""
    sock.settimeout(seconds)
    try:
        return sock.recv(4096) == b""
    except TimeoutError:
        return False
    finally:
        sock.close()


def test_half_sent_heads_and_stalled_bodies_time_out(root):
    app = create_app(server_settings(root, header_timeout_s=0.5, body_timeout_s=0.5), engine=WarpEngine())
    with LiveServer(app) as server:
        address = ("127.0.0.1", server.port)
        silent = socket.create_connection(address)
        partial = socket.create_connection(address)
        partial.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        kept = socket.create_connection(address)
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        response = b""
        while not response.endswith(b'{"status":"ok"}'):
            response += kept.recv(4096)
        kept.sendall(b"GET /health HTTP/1.1\r\n")  # the next request's head, never finished
        for sock in (silent, partial, kept):
            assert closed_within(sock, 3), "a half-sent request head holds its socket"
        whole = httpx.get(f"{server.url}/health")  # a normal request is unaffected
        assert whole.status_code == 200

        stalled = socket.create_connection(address)
        stalled.sendall(b"POST /api/sessions HTTP/1.1\r\nHost: x\r\nX-API-Key: k-default\r\n"
                        b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"avatar\"")
        stalled.settimeout(5)
        reply = b""
        while chunk := stalled.recv(4096):  # until the server closes it
            reply += chunk
        stalled.close()
        assert b"408" in reply.split(b"\r\n")[0] and b"body_timeout_s" in reply


def test_websocket_messages_over_the_bound_close_the_connection(root):
    app = create_app(server_settings(root, max_message_bytes=4096), engine=WarpEngine())
    with LiveServer(app) as server:
        sid = httpx.post(f"{server.url}/api/sessions", json={"avatar": "astronaut"}, headers=KEY).json()["id"]
        with connect(f"ws://127.0.0.1:{server.port}/api/sessions/{sid}/ws?key=k-default", max_size=None) as ws:
            assert json.loads(ws.recv())["type"] == "hello"
            ws.send(b"\0\0" * 1000)  # within the bound: audio
            ws.send(b"\0" * 100_000)
            with pytest.raises(ConnectionClosedError) as closed:
                while True:
                    ws.recv(timeout=10)
        assert closed.value.rcvd.code == 1009


def test_api_keys_never_reach_a_log_line(root, capfd, caplog):
    install_key_redaction()
    logging.getLogger("lipstream.test").warning("GET %s from %s", "/x?a=1&key=s3cret-key_1&b=2", "key=other")
    assert caplog.records[-1].getMessage() == "GET /x?a=1&key=***&b=2 from key=***"
    assert redact_keys("ws://h/api/sessions/1/ws?key=abc") == "ws://h/api/sessions/1/ws?key=***"
    assert redact_keys("monkey=1 hotkey=2") == "monkey=1 hotkey=2"

    app = create_app(server_settings(root), engine=WarpEngine())
    with LiveServer(app, log_level="info") as server:
        assert httpx.get(f"{server.url}/api/avatars?key=k-default").status_code == 200
        assert httpx.get(f"{server.url}/api/nothing?key=k-other").status_code == 404
        sid = httpx.post(f"{server.url}/api/sessions?key=k-default", json={"avatar": "astronaut"}).json()["id"]
        with connect(f"ws://127.0.0.1:{server.port}/api/sessions/{sid}/ws?key=k-default") as ws:
            ws.recv()
    out = capfd.readouterr()
    logged = out.out + out.err
    assert "/api/avatars?key=***" in logged, logged[-2000:]
    assert "k-default" not in logged and "k-other" not in logged


def test_a_starting_server_removes_the_uploads_of_servers_that_are_gone(root, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.Popen(["true"])
    gone.wait()
    left = tmp_path / f"lipstream-uploads-{gone.pid}-abc"
    left.mkdir()
    (left / "upload.mp4").write_bytes(b"x")
    app = create_app(server_settings(root), engine=WarpEngine())
    with TestClient(app) as client:
        deadline = time.monotonic() + 30
        while client.get("/ready", headers=KEY).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert not left.exists()
        mine = list(tmp_path.glob(f"lipstream-uploads-{os.getpid()}-*"))
        assert len(mine) == 1
    assert not mine[0].exists(), "a server removes its own uploads folder when it stops"
