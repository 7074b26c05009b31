"""docker/nginx.conf, the recipe for several servers behind one address without Ray, run by Debian's
nginx in front of two live servers named a and b (max_sessions 1 each): new sessions go to a server
that has room, and every request of a session (REST, the WebSocket) reaches the server that holds it."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from lipstream.bench.serve import free_port
from lipstream.client import LipstreamClient
from lipstream.engines.warp import WarpEngine
from lipstream.errors import OverloadedError
from lipstream.server.app import create_app
from server_helpers import LiveServer, server_settings, store_avatar

RECIPE = Path(__file__).resolve().parents[1] / "docker" / "nginx.conf"
NGINX = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")

pytestmark = [pytest.mark.anyio,
              pytest.mark.skipif(NGINX is None, reason="needs Debian's nginx (apt-get install nginx; CI installs it)")]


@pytest.fixture(scope="module")
def proxied(tmp_path_factory):
    """The URL of nginx running the recipe, its listen port and upstream addresses set to this test's."""
    root = tmp_path_factory.mktemp("avatars")
    store_avatar(root)
    servers = [LiveServer(create_app(server_settings(root, instance=name, max_sessions=1, output_height=64),
                                     engine=WarpEngine())) for name in ("a", "b")]
    work = tmp_path_factory.mktemp("nginx")
    port = free_port()
    recipe = RECIPE.read_text().replace("listen 2160;", f"listen 127.0.0.1:{port};")
    for address, server in zip(("10.0.0.1:2160", "10.0.0.2:2160"), servers, strict=True):
        recipe = recipe.replace(address, f"127.0.0.1:{server.port}")
    (work / "lipstream.conf").write_text(recipe)
    (work / "nginx.conf").write_text(
        f"daemon off; pid {work}/nginx.pid; error_log {work}/error.log;\nevents {{}}\n"
        f"http {{ access_log off; client_body_temp_path {work}/body; proxy_temp_path {work}/proxy;\n"
        f"  include {work}/lipstream.conf; }}\n")
    with servers[0], servers[1]:
        nginx = subprocess.Popen([NGINX, "-p", str(work), "-c", str(work / "nginx.conf")], stderr=subprocess.PIPE)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 10
            while True:
                try:
                    if httpx.get(f"{url}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert nginx.poll() is None, nginx.stderr.read().decode()
                assert time.monotonic() < deadline, "nginx did not start"
                time.sleep(0.1)
            yield url
        finally:
            nginx.terminate()
            nginx.wait(10)


async def test_sessions_go_where_there_is_room_and_their_requests_to_their_server(proxied):
    async with LipstreamClient(proxied, "k-default") as client:
        sessions = [await client.open_session("astronaut") for _ in range(2)]  # through the WebSocket
        assert sorted(s.info["instance"] for s in sessions) == ["a", "b"], "a full server's 503 went to the next"
        with pytest.raises(OverloadedError) as refused:
            await client.create_session("astronaut")
        assert refused.value.retry_after_s > 0
        for session in sessions:
            assert session.hello["session"] == session.id
            for _ in range(5):  # REST, each time on its own server (the other answers 404)
                assert (await client.session_stats(session.id))["id"] == session.id
            frame = await anext(session.frames())
            assert frame.image.shape == (64, 64, 3)
            await session.aclose()
