"""Offline rendering: a whole audio clip -> the avatar speaking it, in an MP4 or a folder of PNGs.

    audio --engine.features--> [F, ...] --batches--> engine.generate(take(material, cycle), cond)
          --Compositor.compose--> frames uint8 [B, H, W, 3] BGR --writer thread--> MP4 / PNG + WAV

Frame i shows cycle frame i mod len(avatar) and there are exactly floor(duration * fps) frames.
Silent frames (the energy gate of live sessions, `audio.gate`) are the avatar's own frame, pixel for
pixel, as live; only voiced frames go to the engine. Encoding runs on a writer thread, overlapping
the engine and the compositor."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lipstream.audio.features import check_fps, num_video_frames
from lipstream.audio.gate import hangover_frames, voiced_frames
from lipstream.audio.load import SAMPLE_RATE, AudioClip
from lipstream.avatar.model import Avatar
from lipstream.engines.base import Engine, take
from lipstream.errors import AudioTooShortError
from lipstream.media.output import OutputThread, open_output
from lipstream.stream.compositor import Compositor


@dataclass(frozen=True)
class RenderResult:
    """path: the finished output. frames: video frames written. seconds: wall time of the render."""

    path: Path
    frames: int
    seconds: float

    @property
    def frames_per_second(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else float("inf")


def default_batch_size(device: torch.device) -> int:
    """Frames per engine call: a GPU is efficient at 16 and up; a CPU gains nothing from large batches."""
    return 16 if device.type == "cuda" else 4


def check_render_audio(audio: np.ndarray, fps: int) -> int:
    """audio: float32 [N] 16 kHz mono. Returns the frame count floor(N/16000*fps) (>= 1).
    Raises AudioTooShortError when the clip is shorter than one video frame."""
    if audio.ndim != 1 or audio.dtype != np.float32:
        raise ValueError(f"audio must be float32 [N] mono 16 kHz, got {audio.dtype} {audio.shape}")
    frames = num_video_frames(audio.shape[0], check_fps(fps))
    if frames == 0:
        raise AudioTooShortError(
            f"the audio is {1000 * audio.shape[0] / SAMPLE_RATE:.0f} ms long, shorter than one video frame "
            f"at {fps} fps ({1000 / fps:.0f} ms); give longer audio")
    return frames


def render_frames(avatar: Avatar, engine: Engine, audio: np.ndarray, *, fps: int = 25,
                  batch_size: int = 4, compositor: Compositor | None = None) -> Iterator[np.ndarray]:
    """The video for `audio` (float32 [N] 16 kHz mono), batch by batch: uint8 [b, H, W, 3] BGR frames
    on the host (b <= batch_size), floor(N/16000*fps) in all.
    Silent frames are `compositor.idle` (the avatar's own); the voiced ones of a batch are generated.

    compositor: one for `avatar` on the engine's device (made here when None)."""
    total = check_render_audio(audio, fps)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    compositor = compositor or Compositor(avatar, engine.device)
    material = engine.material(avatar)
    conditioning = engine.features(audio, fps)
    if conditioning.shape[0] != total:
        raise RuntimeError(f"engine {engine.name} made {conditioning.shape[0]} frames of features for "
                           f"{audio.shape[0]} samples at {fps} fps, expected {total}")
    voiced = voiced_frames(audio, fps, hangover=hangover_frames(engine.silence_hangover_ms, fps))
    for start in range(0, total, batch_size):
        indices = list(range(start, min(start + batch_size, total)))
        frames = compositor.idle(indices)
        speaking = [k for k, i in enumerate(indices) if voiced[i]]
        if speaking:
            talk = [indices[k] for k in speaking]
            faces = engine.generate(take(material, [i % len(avatar) for i in talk]), conditioning[talk])
            compositor.draw(frames, speaking, talk, faces)
        yield frames


def render(avatar: Avatar, engine: Engine, audio: np.ndarray, output: str | os.PathLike, *, fps: int = 25,
           batch_size: int | None = None, progress: bool = True, soundtrack: AudioClip | None = None,
           sharpen: bool = True) -> RenderResult:
    """Render `audio` (float32 [N] 16 kHz mono) spoken by `avatar` to `output`: an .mp4 (H.264 + AAC)
    or a folder (PNG frames + audio.wav), see `lipstream.media.open_output`.

    batch_size: frames per engine call (default: `default_batch_size(engine.device)`).
    progress: a progress bar on stderr. soundtrack: the sound the output carries, the input as it was
    given (`load_clip`; its rate and channels; `audio` is then `soundtrack.mono_16k()`); default `audio`.
    sharpen: the unsharp mask on generated faces (this system's addition; off: MuseTalk's composition).
    On any error nothing is left at `output`."""
    total = check_render_audio(audio, fps)
    batch_size = default_batch_size(engine.device) if batch_size is None else batch_size
    sound, rate = (audio, SAMPLE_RATE) if soundtrack is None else (soundtrack.samples, soundtrack.rate)
    start = time.perf_counter()
    with (open_output(output, fps, avatar.frame_size, sound, rate) as out,
          OutputThread(out, depth=2) as writer,
          tqdm(total=total, unit="frame", file=sys.stderr, disable=not progress, desc="render") as bar):
        for frames in render_frames(avatar, engine, audio, fps=fps, batch_size=batch_size,
                                    compositor=Compositor(avatar, engine.device, sharpen=sharpen)):
            writer.write(frames)
            bar.update(frames.shape[0])
    return RenderResult(out.path, out.frames_written, time.perf_counter() - start)
