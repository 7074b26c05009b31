"""Media out: rendered frames and audio to an MP4 file or a folder of PNG frames + WAV; live frames
as JPEG or WebRTC video frames (`media.encoding`).

`open_output(path, fps, frame_size, audio)` picks the writer from the path (see `media.output`).
The names below load their module on first use, so that live encoding (`media.encoding`) imports
without the writers' PyAV and soundfile."""

import importlib

_EXPORTS = {"VideoOutput": "base", "encode_jpeg": "encoding", "OutputThread": "output", "open_output": "output",
            "output_kind": "output"}

__all__ = ["OutputThread", "VideoOutput", "encode_jpeg", "open_output", "output_kind"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
