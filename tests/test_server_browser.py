"""End to end in a browser: `lipstream serve` (warp engine) started on a free port, its web page
driven by headless Chromium (Debian's, through Playwright) with a fake microphone playing a WAV of
speech-like bursts. Over WebRTC, and over the WebSocket where the browser has no WebRTC: video
appears, frames advance, speech events arrive. Then SIGTERM: the server closes its sessions and exits cleanly."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lipstream.synthetic import speech
from server_helpers import SR, free_port, store_avatar, wav_bytes

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")]


@pytest.fixture(scope="module")
def microphone_wav(tmp_path_factory) -> Path:
    """2 s of speech-like sound, then 1.5 s of silence (the fake microphone loops it)."""
    audio = np.concatenate([speech(2.0, level_db=-14), np.zeros(int(1.5 * SR), np.float32)])
    path = tmp_path_factory.mktemp("mic") / "speech.wav"
    path.write_bytes(wav_bytes(audio))
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`lipstream serve` in a subprocess; yields (page URL with its key, the process)."""
    root = tmp_path_factory.mktemp("avatars")
    store_avatar(root)
    port = free_port()
    env = {**os.environ, "LIPSTREAM_AVATARS": str(root), "LIPSTREAM_ENGINE": "warp",
           "LIPSTREAM_OUTPUT_HEIGHT": "256", "LIPSTREAM_API_KEYS": ""}
    process = subprocess.Popen([str(Path(sys.executable).parent / "lipstream"), "serve", "--host", "127.0.0.1",
                                "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    lines = []
    url = None
    deadline = time.monotonic() + 90
    while url is None or not any("Application startup complete" in line for line in lines):
        line = process.stdout.readline()
        assert line and time.monotonic() < deadline, "the server did not start:\n" + "".join(lines)
        lines.append(line)
        url = url or (re.search(r"open (http://\S+\?key=\S+)", line) or [None, None])[1]
    yield url, process, lines
    if process.poll() is None:
        process.kill()


def run_page(url: str, microphone_wav: Path, without_webrtc: bool) -> dict:
    """Open the page (transport "auto"), connect, start the microphone, wait for a whole utterance.
    without_webrtc: hide RTCPeerConnection, as in a browser without WebRTC: the page falls back."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--headless", "--disable-gpu", "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={microphone_wav}",
            "--autoplay-policy=no-user-gesture-required", "--disable-background-networking",
            "--disable-features=WebRtcHideLocalIpsWithMdns"])
        try:
            page = browser.new_page()
            if without_webrtc:
                page.add_init_script("delete window.RTCPeerConnection")
            console: list[str] = []
            page.on("console", lambda message: console.append(message.text))
            page.goto(url)
            page.wait_for_function("document.querySelectorAll('#avatar option').length > 0", timeout=15000)
            page.click("#connect")
            page.wait_for_function("window.lipstream.connected", timeout=20000)
            shown_at_connect = page.evaluate("window.lipstream.framesShown")
            page.click("#mic")
            page.wait_for_function("window.lipstream.events.some(e => e.type === 'speech_ended')", timeout=20000)
            state = page.evaluate("window.lipstream")
            state["shown_at_connect"] = shown_at_connect
            selector = "#canvas" if without_webrtc else "#video"
            state["size"] = page.evaluate(f"[document.querySelector('{selector}').videoWidth ?? "
                                          f"document.querySelector('{selector}').width, "
                                          f"document.querySelector('{selector}').videoHeight ?? "
                                          f"document.querySelector('{selector}').height]")
            state["latency_text"] = page.inner_text("#stat-latency")
            state["console"] = console
            page.click("#disconnect")
            return state
        finally:
            browser.close()


@pytest.mark.parametrize("without_webrtc, transport", [(False, "webrtc"), (True, "websocket")])
def test_the_page_shows_the_avatar_speaking(server, microphone_wav, without_webrtc, transport):
    url, _, _ = server
    state = run_page(url, microphone_wav, without_webrtc)
    assert state["transport"] == transport, state
    assert state["size"] == [256, 256], "video appears at the streamed size"
    assert state["framesShown"] >= state["shown_at_connect"] + 25, "frames advance"
    types = [e["type"] for e in state["events"]]
    assert types[:2] == ["speech_started", "speech_ended"], types
    assert state["latenciesMs"] and 0 < state["latenciesMs"][0] < 3000, state["latenciesMs"]
    assert state["latency_text"].endswith("ms)")
    assert not state["errors"], state["errors"]


def test_sigterm_closes_the_sessions_and_exits_cleanly(server):
    url, process, lines = server
    key = url.split("key=")[1]
    import httpx

    base = url.split("/?")[0]
    reply = httpx.post(f"{base}/api/sessions", json={"avatar": "astronaut"}, headers={"X-API-Key": key})
    assert reply.status_code == 201
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=30)
    assert process.returncode in (0, -signal.SIGTERM), out  # uvicorn re-raises the signal it handled
    assert "shutting down: closed 1 sessions" in out and "Application shutdown complete" in out
    assert any("engine warp" in line for line in lines) and any("made one for this run" in line for line in lines)
