"""An MP4 output: H.264 (libx264, yuv420p) video and AAC audio, muxed with PyAV.

Frame k has presentation time k/fps exactly, so the file holds exactly the frames written. yuv420p
needs even sizes: an odd height or width gets one more row/column, a copy of the last one. The audio
is written whole, at its own rate and with its own channels (AAC adds at most one frame of padding
at the end, which players and decoders trim with the encoder delay the muxer records), interleaved
with the video as frames arrive."""

from __future__ import annotations

import os
from fractions import Fraction

import av
import cv2
import numpy as np

from lipstream.audio.load import as_float_mono
from lipstream.media.base import VideoOutput

# FFmpeg's AAC encoder at 16 kHz mono: 96 kb/s keeps ~35-40 dB SNR from the first frame on; at 64 kb/s the
# first frame (64 ms) of a clip is badly distorted. So 96 kb/s a channel (192 kb/s for stereo), within
# AAC's limit of 6144 bits a channel per 1024-sample frame (6 bits a sample: 96 kb/s at 16 kHz).
AAC_BIT_RATE_PER_CHANNEL = 96_000


def aac_bit_rate(sample_rate: int, channels: int) -> int:
    """The AAC bit rate for audio of `channels` at `sample_rate`: 96 kb/s a channel, or AAC's most."""
    return channels * min(AAC_BIT_RATE_PER_CHANNEL, 6 * sample_rate)


class Mp4Output(VideoOutput):
    """crf/preset: libx264 quality (18 is MuseTalk's "visually lossless"; lower is better) and speed.
    "veryfast" keeps up with the engine on a few CPU cores at 720p; slower presets only shrink the file."""

    def __init__(self, *args, crf: int = 18, preset: str = "veryfast", **kwargs):
        super().__init__(*args, **kwargs)
        h, w = self.frame_size
        self._pad = (h % 2, w % 2)  # rows, columns added at the bottom/right
        self._container = av.open(os.fspath(self.temp_path), mode="w", format="mp4",
                                  options={"movflags": "+faststart"})
        try:
            video = self._container.add_stream("libx264", rate=self.fps)
            video.width, video.height = w + self._pad[1], h + self._pad[0]
            video.pix_fmt = "yuv420p"
            video.time_base = Fraction(1) / self.fps
            video.options = {"crf": str(crf), "preset": preset}
            self._video = video
            self._audio_stream = None
            if self.audio is not None:
                channels = self.audio.shape[0]
                audio = self._container.add_stream("aac", rate=self.sample_rate)
                audio.layout = av.AudioLayout(f"{channels}c").name  # the default layout of that many channels
                audio.bit_rate = aac_bit_rate(self.sample_rate, channels)
                self._audio_stream = audio
                self._samples = np.stack([as_float_mono(channel) for channel in self.audio])  # float32 [-1, 1]
            self._audio_pos = 0
        except BaseException:
            self._container.close()
            raise

    def _write(self, frames: np.ndarray) -> None:
        rows, cols = self._pad
        for k, frame in enumerate(frames, start=self.frames_written):
            if rows or cols:
                frame = cv2.copyMakeBorder(frame, 0, rows, 0, cols, cv2.BORDER_REPLICATE)
            picture = av.VideoFrame.from_ndarray(frame, format="bgr24")
            picture.pts = k
            self._container.mux(self._video.encode(picture))
            # keep the audio level with the video so the file interleaves (players read it front to back)
            self._encode_audio(int((k + 1) * self.sample_rate / self.fps), final=False)

    def _encode_audio(self, until: int, final: bool) -> None:
        """Encode the audio up to sample `until` (whole AAC frames only unless `final`)."""
        if self._audio_stream is None:
            return
        size = self._audio_stream.frame_size or 1024
        end = min(until, self._samples.shape[1])
        while self._audio_pos < end and (final or self._audio_pos + size <= end):
            chunk = np.ascontiguousarray(self._samples[:, self._audio_pos:self._audio_pos + size])
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=self._audio_stream.layout.name)
            frame.sample_rate = self.sample_rate
            frame.pts = self._audio_pos
            self._container.mux(self._audio_stream.encode(frame))
            self._audio_pos += chunk.shape[1]

    def _finish(self) -> None:
        self._container.mux(self._video.encode(None))
        if self._audio_stream is not None:
            self._encode_audio(self._samples.shape[1], final=True)
            self._container.mux(self._audio_stream.encode(None))
        self._container.close()

    def _release(self) -> None:
        self._container.close()

