"""What one viewer costs the host per frame, by transport (part of `lipstream bench serve`).

A node's viewers are bounded by the host's cores as much as by the engine (H100/H200 have no video
encoder). This measures each step a transport takes for one frame, in CPU milliseconds of this process (all
its threads: a codec may run threads of its own; a busy machine inflates CPU time less than wall
time; run it with nothing else running in the process), on speaking
frames of the bench avatar at the bench size, made by the warp engine and the compositor as a
session makes them: the whole frame made from its image and patch (`copy`), JPEG of the whole frame
and of the patch, I420 of the whole frame (BGR -> YUV, as before) and from the cached image with the
patch converted alone (as now), VP8 and H.264 with aiortc's settings and with the real-time ones
(`server.webrtc_codecs`), and Opus for a frame's 40 ms of audio. Then the sum per transport: what
a speaking frame costs a viewer of WebSocket whole JPEG frames, of WebSocket patch frames, and of
WebRTC (idle frames cost the patch transports nothing to encode: their images are cached)."""

from __future__ import annotations

import fractions
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from lipstream.stream.session import OutputFrame

FRAMES = 40  # speaking frames timed per step (after 5 untimed)
QUALITY = 80  # the server's default jpeg_quality


def _cpu_ms(step: Callable[[int], object], frames: int) -> float:
    """Mean process-CPU ms of step(i) over `frames` calls (after 5 untimed ones)."""
    for i in range(5):
        step(i)
    began = time.process_time()
    for i in range(frames):
        step(i)
    return 1000 * (time.process_time() - began) / frames


def speaking_frames(size: str, count: int) -> list[OutputFrame]:
    """`count` speaking frames of the bench avatar at `size` (warp faces on synthetic speech), as a
    session hands them to a transport: `OutputFrame`s with their patches."""
    from lipstream.bench.serve import bench_avatar
    from lipstream.engines.base import take
    from lipstream.engines.warp import WarpEngine
    from lipstream.stream.compositor import Compositor, output_size
    from lipstream.stream.session import OutputFrame
    from lipstream.synthetic import speech

    avatar = bench_avatar(size)
    engine = WarpEngine()
    material = engine.material(avatar)
    states = engine.features(speech(count / 25 + 1, seed=1), 25)
    states = states[states[:, 0].abs().argsort(descending=True)[:count]]  # the most open mouths
    compositor = Compositor(avatar, size=output_size(avatar.frame_size, 0))
    cycles = [i % len(avatar) for i in range(count)]
    faces = engine.generate(take(material, cycles), states)
    patches = compositor.patches(cycles, faces)
    silence = np.zeros(640, np.int16)
    return [OutputFrame(i, i / 25, compositor.frame(c), silence, True, [], c, avatar.name, 640, compositor,
                        compositor.patch(c, patches[i])) for i, c in enumerate(cycles)]


def viewer_costs(size: str, frames: int = FRAMES) -> dict:
    """{step: CPU ms per frame} and {transport: CPU ms per speaking frame per viewer}."""
    import av
    import cv2
    from aiortc.codecs.h264 import H264Encoder
    from aiortc.codecs.opus import OpusEncoder
    from aiortc.codecs.vpx import Vp8Encoder

    from lipstream.media.encoding import encode_jpeg, patch_jpeg, video_frame
    from lipstream.server.webrtc_codecs import RealtimeH264Encoder, RealtimeVp8Encoder

    made = speaking_frames(size, frames + 5)
    whole = [f.image for f in made]
    i420 = [video_frame(f) for f in made]

    def encoder(cls) -> Callable[[int], object]:
        codec = cls()
        codec.target_bitrate = 1_000_000

        def step(i: int) -> object:
            return codec.encode(i420[i], force_keyframe=i == 0)
        return step

    opus = OpusEncoder()
    audio = av.AudioFrame.from_ndarray(np.zeros((1, 320), np.int16), format="s16", layout="mono")
    audio.sample_rate, audio.time_base = 16000, fractions.Fraction(1, 16000)

    def opus_step(i: int) -> None:
        for half in range(2):  # a 25 fps frame carries two 20 ms packets
            audio.pts = (2 * i + half) * 320
            opus.encode(audio)

    steps = {
        "copy (whole frame from image + patch)": lambda i: made[i].patch.paste(made[i].base),
        "JPEG whole frame": lambda i: encode_jpeg(whole[i], QUALITY),
        "JPEG patch": lambda i: patch_jpeg(made[i].patch, QUALITY),
        "I420 whole frame (BGR -> YUV)": lambda i: av.VideoFrame.from_ndarray(
            cv2.cvtColor(whole[i], cv2.COLOR_BGR2YUV_I420), format="yuv420p"),
        "I420 from the cached image + patch": lambda i: video_frame(made[i]),
        "VP8, aiortc's settings": encoder(Vp8Encoder),
        "VP8, real-time settings": encoder(RealtimeVp8Encoder),
        "H.264, aiortc's settings": encoder(H264Encoder),
        "H.264, real-time settings": encoder(RealtimeH264Encoder),
        "Opus, 40 ms of audio": opus_step,
    }
    ms = {name: _cpu_ms(step, frames) for name, step in steps.items()}
    per_viewer = {
        "websocket, whole JPEG frames": ms["JPEG whole frame"] + ms["copy (whole frame from image + patch)"],
        "websocket, patch frames": ms["JPEG patch"],
        "webrtc (VP8)": ms["I420 from the cached image + patch"] + ms["VP8, real-time settings"]
        + ms["Opus, 40 ms of audio"],
        "webrtc (H.264)": ms["I420 from the cached image + patch"] + ms["H.264, real-time settings"]
        + ms["Opus, 40 ms of audio"],
        "webrtc (VP8) before: BGR -> YUV, aiortc's settings": ms["I420 whole frame (BGR -> YUV)"]
        + ms["VP8, aiortc's settings"] + ms["Opus, 40 ms of audio"],
    }
    return {"size": size, "frames": frames, "steps_ms": ms, "per_viewer_ms": per_viewer}
