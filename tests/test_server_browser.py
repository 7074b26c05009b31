"""End to end in a browser: `lipstream serve` (warp engine) started on a free port, its web page
driven by headless Chromium (Debian's, through Playwright) with a fake microphone playing a WAV of
speech. What is asserted is what a user sees: the status line, the figures, the log, the error
banner, the picture and its size. Over WebRTC, and over the WebSocket where the browser has no
WebRTC; making an avatar from the page; switching avatars while connected; a refused microphone; a
full server. Then SIGTERM: the server closes its sessions and exits cleanly."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

from lipstream.client import LipstreamClient
from lipstream.synthetic import astronaut_bgr, speech
from server_helpers import SR, free_port, narrow_avatar, store_avatar, wav_bytes

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")]
MAX_SESSIONS = 3
BROWSER_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--use-fake-device-for-media-stream",
                "--autoplay-policy=no-user-gesture-required", "--disable-background-networking",
                "--disable-features=WebRtcHideLocalIpsWithMdns"]


@pytest.fixture(scope="module")
def microphone_wav(tmp_path_factory) -> Path:
    """2 s of speech, then 1.5 s of silence (the fake microphone loops it)."""
    audio = np.concatenate([speech(2.0, level_db=-14), np.zeros(int(1.5 * SR), np.float32)])
    path = tmp_path_factory.mktemp("mic") / "speech.wav"
    path.write_bytes(wav_bytes(audio))
    return path


async def wait_ready(url: str, key: str) -> None:
    async with LipstreamClient(url, key) as client:
        await client.wait_ready(60)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`lipstream serve` in a subprocess, once /ready says it is; yields (page URL with its key, the process,
    its output lines)."""
    root = tmp_path_factory.mktemp("avatars")
    store_avatar(root)
    store_avatar(root, "narrow", avatar=narrow_avatar())
    port = free_port()
    env = {**os.environ, "LIPSTREAM_AVATARS": str(root), "LIPSTREAM_ENGINE": "warp",
           "LIPSTREAM_OUTPUT_HEIGHT": "256", "LIPSTREAM_API_KEYS": "",
           "LIPSTREAM_MAX_SESSIONS_PER_KEY": str(MAX_SESSIONS),
           "LIPSTREAM_ADMISSION_CONTROL": "false"}  # tests open sessions whatever the load of the machine
    process = subprocess.Popen([str(Path(sys.executable).parent / "lipstream"), "serve", "--host", "127.0.0.1",
                                "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    lines = []
    url = None
    deadline = time.monotonic() + 90
    try:
        while url is None or not any("Application startup complete" in line for line in lines):
            line = process.stdout.readline()
            assert line and time.monotonic() < deadline, "the server did not start:\n" + "".join(lines)
            lines.append(line)
            url = url or (re.search(r"open (http://\S+\?key=\S+)", line) or [None, None])[1]
        # serving starts before the engine has warmed up; until then new sessions are refused (503)
        asyncio.run(wait_ready(f"http://127.0.0.1:{port}", url.split("?key=")[1]))
        yield url, process, lines
    finally:
        if process.poll() is None:
            process.kill()


@pytest.fixture(scope="module")
def playwright():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(playwright, microphone_wav):
    """Chromium whose microphone prompt is accepted, with the WAV as the microphone."""
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
        *BROWSER_ARGS, "--use-fake-ui-for-media-stream", f"--use-file-for-fake-audio-capture={microphone_wav}"])
    yield browser
    browser.close()


class Page:
    """A page of the lipstream UI with what went wrong underneath it: console errors and HTTP replies >= 400."""

    def __init__(self, browser, url: str, *, without_webrtc: bool = False, routes: dict | None = None):
        """routes: {URL pattern: handler} the browser answers from before the page loads."""
        self.context = browser.new_context()
        self.page = self.context.new_page()
        if without_webrtc:
            self.page.add_init_script("delete window.RTCPeerConnection")
        for pattern, handler in (routes or {}).items():
            self.page.route(pattern, handler)
        self.console_errors: list[str] = []
        self.failed: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.console_errors.append(m.text))
        self.page.on("pageerror", lambda e: self.console_errors.append(str(e)))
        self.page.on("response", lambda r: r.status >= 400 and self.failed.append(f"{r.status} {r.url}"))
        self.page.goto(url)

    def text(self, selector: str) -> str:
        return self.page.inner_text(selector)

    def wait_text(self, selector: str, pattern: str, timeout: float = 20000) -> str:
        """Wait until the element's text matches `pattern` (a regular expression); return the text."""
        self.page.wait_for_function("([s, p]) => new RegExp(p).test(document.querySelector(s).innerText)",
                                    arg=[selector, pattern], timeout=timeout)
        return self.text(selector)

    def state(self) -> dict:
        return self.page.evaluate("window.lipstream")

    def close(self) -> None:
        self.context.close()


def shown_size(page: Page) -> list[int]:
    return page.page.evaluate("(() => { const v = document.querySelector('#video'), c = document.querySelector('#canvas');"
                              " return v.hidden ? [c.width, c.height] : [v.videoWidth, v.videoHeight]; })()")


@pytest.mark.parametrize("without_webrtc, transport", [(False, "WebRTC"), (True, "WebSocket")])
def test_connect_talk_switch_and_disconnect(server, browser, without_webrtc, transport):
    url, _, _ = server
    page = Page(browser, url, without_webrtc=without_webrtc)
    try:
        page.wait_text("#status", "^Choose an avatar, then press Connect.$")
        assert page.page.eval_on_selector_all("#avatar option", "os => os.map(o => o.textContent)") == \
            ["astronaut (512×512)", "narrow (400×512)"]
        assert page.text("h2:has(.number) >> nth=0").endswith("Choose a face")
        page.page.click("#connect")
        page.wait_text("#status", "^Connected. Start the microphone, or play an audio file.$")
        assert page.text("#stat-transport") == transport
        assert page.text("#stat-avatar") == "astronaut (256×256)"
        page.wait_text("#stat-fps", r"^\d+ frames a second$")
        assert shown_size(page) == [256, 256], "the picture at the streamed size"
        page.page.click("#mic")
        page.wait_text("#stat-mic", "^on: (listening|hearing you)$")
        page.page.wait_for_function("window.lipstream.events.some(e => e.type === 'speech_ended')", timeout=20000)
        latency = page.text("#stat-latency")
        assert re.fullmatch(r"\d+ ms \(median \d+ ms of 1\)", latency), latency
        median_ms = int(re.search(r"median (\d+)", latency)[1])
        assert 0 < median_ms < 3000 and median_ms == round(page.state()["latenciesMs"][0])
        log = page.text("#events")
        assert re.search(r"The avatar started speaking, \d+ ms after your first sound.", log), log
        assert "The avatar finished speaking." in log
        # another avatar, of another size, without reconnecting
        page.page.select_option("#avatar", "narrow")
        page.wait_text("#stat-avatar", r"^narrow \(200×256\)$")
        page.page.wait_for_function("(() => { const v = document.querySelector('#video'), "
                                    "c = document.querySelector('#canvas'); "
                                    "return (v.hidden ? c.width : v.videoWidth) === 200; })()", timeout=20000)
        assert shown_size(page) == [200, 256]
        assert "Now showing narrow." in page.text("#events") and page.state()["connected"]
        page.page.click("#disconnect")
        page.wait_text("#status", "^Disconnected. Press Connect to start again.$")
        assert page.text("#stat-latency") == "not measured yet", "the figures start afresh"
        assert (page.text("#stat-fps"), page.text("#stat-transport")) == ("no picture", "none")
        assert page.page.is_enabled("#connect") and not page.page.is_enabled("#mic")
        assert page.page.is_hidden("#error")
        time.sleep(0.5)  # anything the disconnect might still log
        assert not page.console_errors and not page.failed, (page.console_errors, page.failed)
    finally:
        page.close()


def test_making_an_avatar_from_the_page_with_its_progress(server, browser, tmp_path):
    url, _, _ = server
    photo, blank = tmp_path / "me.png", tmp_path / "wall.png"
    cv2.imwrite(str(photo), np.ascontiguousarray(astronaut_bgr()[40:472, 60:452]))
    cv2.imwrite(str(blank), np.full((64, 64, 3), 128, np.uint8))
    page = Page(browser, url)
    try:
        page.wait_text("#status", "press Connect")
        page.page.evaluate("""window.seenMaking = [];
            new MutationObserver(() => window.seenMaking.push(document.querySelector('#create-text').innerText))
              .observe(document.querySelector('#create-text'), {childList: true, characterData: true, subtree: true})""")
        page.page.click("#create summary")
        page.page.fill("#new-name", "fresh")
        page.page.set_input_files("#new-file", str(photo))
        page.page.click("#create-avatar")
        page.wait_text("#create-text", "^The avatar fresh is ready.$", timeout=60000)
        assert page.page.eval_on_selector("#create-bar", "b => b.value") == 1
        seen = page.page.evaluate("window.seenMaking")
        assert any(re.fullmatch(r"Uploading… \d+%", t) for t in seen), seen
        assert page.page.eval_on_selector("#avatar", "s => s.value") == "fresh"
        assert "Made the avatar fresh." in page.text("#events")
        # a photo without a face: the reason, in words
        page.page.fill("#new-name", "wall")
        page.page.set_input_files("#new-file", str(blank))
        page.page.click("#create-avatar")
        error = page.wait_text("#error-text", "could not be made", timeout=60000)
        assert error.startswith("The avatar wall could not be made: no face found in the photo wall.png"), error
        assert page.text("#create-text") == "The avatar was not made."
        assert not page.console_errors and not page.failed, (page.console_errors, page.failed)
    finally:
        page.close()


def test_a_refused_microphone_is_explained(server, playwright, microphone_wav):
    url, _, _ = server
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
        *BROWSER_ARGS, "--deny-permission-prompts", f"--use-file-for-fake-audio-capture={microphone_wav}"])
    try:
        page = Page(browser, url, without_webrtc=True)
        page.wait_text("#status", "press Connect")
        page.page.click("#connect")
        page.wait_text("#status", "^Connected")
        page.page.click("#mic")
        error = page.wait_text("#error-text", "microphone")
        assert error.startswith("The browser did not let this page use the microphone."), error
        assert page.text("#stat-mic") == "off" and page.text("#mic") == "Start the microphone"
        page.page.click("#disconnect")
        page.wait_text("#status", "^Disconnected")
    finally:
        browser.close()


def loading_then(replies: int, body: dict):
    """A handler of /ready: `replies` times the server's 503 with `body`, then the server's own answer."""
    left = [replies]

    def handle(route):
        if left[0]:
            left[0] -= 1
            route.fulfill(status=503, content_type="application/json", body=json.dumps({"ready": False, **body}))
        else:
            route.continue_()

    return handle


def test_a_page_opened_while_the_server_starts_waits_for_it(server, browser):
    """The server serves its page while it still loads its engine (/ready answers 503 "loading"): the
    page says so, keeps Connect off and goes on by itself once the server is ready. This server is ready
    already: the browser gives the page the loading replies, as the server words them, first."""
    url, _, _ = server
    page = Page(browser, url, routes={"**/ready": loading_then(2, {"loading": "engine"})})
    try:
        page.wait_text("#status", "^The server is starting: it is loading its engine")
        assert not page.page.is_enabled("#connect")
        page.wait_text("#status", "^Choose an avatar, then press Connect.$")
        assert page.page.is_enabled("#connect") and "The server is ready." in page.text("#events")
    finally:
        page.close()
    page = Page(browser, url, routes={"**/ready": loading_then(1, {"error": "RuntimeError: CUDA out of memory"})})
    try:
        error = page.wait_text("#error-text", "engine")
        assert error == "The server cannot be used: the server could not load its engine: RuntimeError: CUDA out " \
                        "of memory", error
    finally:
        page.close()


def test_a_full_server_says_why(server, browser):
    """Every session of the key taken (the server answers 429): the page says so, with the server's words.
    A 503 (a server out of capacity, with Retry-After) is shown with its message and when to retry; this
    server does not refuse sessions for capacity (its machine's load is not the test's), so that reply,
    as `OverloadedError` gives it, is given to the page by the browser."""
    url, _, _ = server
    base, key = url.split("/?key=")
    headers = {"X-API-Key": key}
    taken = []
    for _ in range(MAX_SESSIONS - len(httpx.get(f"{base}/api/sessions", headers=headers).json()["sessions"])):
        taken.append(httpx.post(f"{base}/api/sessions", json={"avatar": "astronaut"}, headers=headers).json()["id"])
    page = Page(browser, url)
    try:
        page.wait_text("#status", "press Connect")
        page.page.click("#connect")
        error = page.wait_text("#error-text", "Could not connect")
        assert error.startswith(f"Could not connect: too many at once: this API key has {MAX_SESSIONS} open "
                                "sessions"), error
        assert page.text("#status") == "Not connected." and page.page.is_enabled("#connect")
        page.page.route("**/api/sessions", lambda route: route.fulfill(
            status=503, headers={"Retry-After": "7"}, content_type="application/json",
            body=json.dumps({"detail": "every GPU is busy with other sessions", "error": "OverloadedError"})))
        page.page.click("#connect")
        error = page.wait_text("#error-text", "GPU")
        assert error == ("Could not connect: the server cannot take this now: every GPU is busy with other "
                         "sessions. Try again in 7 s."), error
    finally:
        page.close()
        for sid in taken:
            httpx.delete(f"{base}/api/sessions/{sid}", headers=headers)


def test_sigterm_closes_the_sessions_and_exits_cleanly(server):
    url, process, lines = server
    key = url.split("key=")[1]
    base = url.split("/?")[0]
    reply = httpx.post(f"{base}/api/sessions", json={"avatar": "astronaut"}, headers={"X-API-Key": key})
    assert reply.status_code == 201
    open_sessions = len(httpx.get(f"{base}/api/sessions", headers={"X-API-Key": key}).json()["sessions"])
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=30)
    assert process.returncode in (0, -signal.SIGTERM), out  # uvicorn re-raises the signal it handled
    assert f"shutting down: closed {open_sessions} sessions" in out and "Application shutdown complete" in out
    assert any("engine warp" in line for line in lines) and any("made one for this run" in line for line in lines)
    everything = "".join(lines) + out
    assert "W0000" not in everything and "XNNPACK" not in everything, "MediaPipe's noise stays out of the log"
