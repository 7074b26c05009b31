"""`lipstream serve [--host 0.0.0.0] [--port 2160] [...]`: run the server (every setting has a flag).

It loads the engine first and says which runs and why, then prints the URL of the web page; with
no API keys configured the URL carries the key made for this run."""

from __future__ import annotations

import argparse

from lipstream.config import Settings, add_settings_arguments, settings_from_args

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
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info",
                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    return 0
