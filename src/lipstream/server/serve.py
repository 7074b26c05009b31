"""`lipstream serve [--host 0.0.0.0] [--port 2160] [...]`: run the server (every setting has a flag).

It loads the engine first and says which runs and why, then prints the URL of the web page; with
no API keys configured the URL carries the key made for this run."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from lipstream.config import Settings, add_settings_arguments, settings_from_args

if TYPE_CHECKING:
    import uvicorn
    from fastapi import FastAPI

GRACEFUL_SHUTDOWN_S = 10


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser("serve", help="run the real-time server (web page, REST, WebSocket, WebRTC)",
                                  description="Run the lipstream server. Settings come from the flags, then "
                                              "LIPSTREAM_* env vars, then --config, then the defaults.")
    add_settings_arguments(serve)
    serve.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return run_server(settings_from_args(args))


def page_url(settings: Settings, key: str | None) -> str:
    """The web page's URL as a local browser reaches it (all-interfaces hosts become localhost)."""
    host = "localhost" if settings.host in ("0.0.0.0", "::", "") else settings.host
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{settings.port}/" + (f"?key={key}" if key else "")


def run_server(settings: Settings) -> int:
    """Load the engine, then serve until SIGTERM/SIGINT (sessions are closed cleanly). Raises
    LipstreamError when the engine cannot load (e.g. engine musetalk without its weights)."""
    import uvicorn

    from lipstream.server.app import create_app
    from lipstream.server.engines import load_engine_for

    engine, reason = load_engine_for(settings, settings.engine)
    print(f"lipstream: {reason}", flush=True)
    app = create_app(settings, engine=engine, engine_reason=reason)
    keys = app.state.keys
    if keys.generated:
        print("lipstream: no API keys configured (setting api_keys); made one for this run", flush=True)
    print(f"lipstream: open {page_url(settings, keys.generated)}", flush=True)
    uvicorn.Server(uvicorn_config(app, settings)).run()
    return 0


def uvicorn_config(app: FastAPI, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """How uvicorn serves the app: the settings' address, a deadline for request heads
    (header_timeout_s), WebSocket messages of at most max_message_bytes, and no per-message deflate
    (frames are JPEG, which deflate cannot shrink: it would only spend the event loop's time).
    `overrides`: other uvicorn.Config arguments (tests: port, log_level)."""
    import uvicorn

    from lipstream.server.timeouts import http_protocol

    options = {"host": settings.host, "port": settings.port, "log_level": "info",
               "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_S, "http": http_protocol(settings.header_timeout_s),
               "ws_max_size": settings.max_message_bytes, "ws_per_message_deflate": False, **overrides}
    return uvicorn.Config(app, **options)
