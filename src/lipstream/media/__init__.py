"""Media out: rendered frames and audio to an MP4 file or a folder of PNG frames + WAV; live frames
as JPEG or WebRTC video frames (`media.encoding`).

`open_output(path, fps, frame_size, audio)` picks the writer from the path (see `media.output`)."""

from lipstream.media.base import VideoOutput
from lipstream.media.encoding import encode_jpeg
from lipstream.media.output import OutputThread, open_output, output_kind

__all__ = ["OutputThread", "VideoOutput", "encode_jpeg", "open_output", "output_kind"]
