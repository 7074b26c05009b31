"""The real-time server: REST, WebSocket and WebRTC transports and the web page (`lipstream serve`).

`app.create_app(settings)` builds the FastAPI app; `serve.run_server(settings)` runs it with uvicorn."""
