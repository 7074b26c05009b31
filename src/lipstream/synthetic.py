"""Synthetic test material, the same for the demo, the benchmarks and the tests; nothing is downloaded.

Pictures come from scikit-image's astronaut photo (Eileen Collins, NASA; public domain):
- `make_scene`: a frame, a "generated" 256x256 face and MuseTalk v1.5-style boxes and blend mask (the
  post-processing's input); `scene_avatar` / `moving_avatar`: an in-memory Avatar made of such scenes;
- `face_video_frames` / `write_face_video`: short face videos with a small head motion and faceless
  frames (avatar preparation's input).
Sound is speech-like, float32 16 kHz mono:
- `speech`: syllables of harmonic vowels under moving formants, fricative bursts and pauses;
- `vowel`: one steady vowel-like tone (a given loudness and formants)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from lipstream.audio.load import SAMPLE_RATE
from lipstream.avatar.geometry import crop_box_for
from lipstream.avatar.masks import feather
from lipstream.avatar.model import Avatar
from lipstream.imgproc.boxes import Box


def soft_mask_for(face_box: Box, crop_box: Box) -> np.ndarray:
    """uint8 [ch,cw]: the lower half of the face box, feathered with a Gaussian about 10% of the crop wide."""
    x1, _, x2, y2 = face_box
    xs, ys, xe, ye = crop_box
    mask = np.zeros((ye - ys, xe - xs), np.uint8)
    mask[(ye - ys) // 2:y2 - ys, x1 - xs:x2 - xs] = 255
    return feather(mask)


@dataclass
class Scene:
    frame: np.ndarray   # uint8 [H,W,3] BGR
    face: np.ndarray    # uint8 [256,256,3] BGR, what the model would produce
    face_box: Box
    crop_box: Box
    mask: np.ndarray    # uint8 [ch,cw]


def astronaut_bgr() -> np.ndarray:
    """scikit-image's astronaut photo, uint8 [512, 512, 3] BGR."""
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[:, :, ::-1])


def make_scene(frame_hw: tuple[int, int] = (720, 1280), face_box: Box = (500, 150, 760, 470), seed: int = 0,
               photo: np.ndarray | None = None) -> Scene:
    """A frame of `frame_hw` (height, width) and a face to blend at `face_box`; `seed` varies the face."""
    photo = astronaut_bgr() if photo is None else photo
    rng = np.random.default_rng(seed)
    frame = cv2.resize(photo, frame_hw[::-1], interpolation=cv2.INTER_AREA)
    face = cv2.resize(photo[30:190, 150:310], (256, 256), interpolation=cv2.INTER_CUBIC)
    face = np.clip(face.astype(np.int16) + rng.integers(-20, 21, 3), 0, 255).astype(np.uint8)
    crop_box = crop_box_for(face_box)
    return Scene(frame, face, face_box, crop_box, soft_mask_for(face_box, crop_box))


def scene_avatar(scenes: Sequence[Scene], name: str = "test", *, faces_in_frames: bool = False) -> Avatar:
    """An avatar whose cycle frame i is `scenes[i]` (its frame, face box, crop box and mask; its face as
    the crop). faces_in_frames: paint each face into its frame's face box first, so that the crops a
    stored copy recomputes from the frames show the same face."""
    if faces_in_frames:
        for scene in scenes:
            x1, y1, x2, y2 = scene.face_box
            scene.frame[y1:y2, x1:x2] = cv2.resize(scene.face, (x2 - x1, y2 - y1), interpolation=cv2.INTER_AREA)
    return Avatar(name, "", None, frames=np.stack([s.frame for s in scenes]),
                  face_boxes=np.int32([s.face_box for s in scenes]),
                  crop_boxes=np.int32([s.crop_box for s in scenes]),
                  masks=[s.mask for s in scenes], crops=np.stack([s.face for s in scenes]))


def moving_avatar(frame_hw: tuple[int, int], face_box: Box, frames: int, *, step_px: int = 2, name: str = "test",
                  faces_in_frames: bool = False, photo: np.ndarray | None = None) -> Avatar:
    """A `frames`-frame `scene_avatar` of the astronaut scene, its face box moving `step_px` to the right
    each frame (scene i has seed i)."""
    photo = astronaut_bgr() if photo is None else photo
    x1, y1, x2, y2 = face_box
    scenes = [make_scene(frame_hw, (x1 + step_px * i, y1, x2 + step_px * i, y2), seed=i, photo=photo)
              for i in range(frames)]
    return scene_avatar(scenes, name, faces_in_frames=faces_in_frames)


def face_video_frames(photo: np.ndarray, frame_hw: tuple[int, int], count: int, sway_px: int = 6,
                      blank: Sequence[int] = ()) -> Iterator[np.ndarray]:
    """`count` uint8 [H, W, 3] BGR frames: `photo` scaled to the frame height, centred on grey, swaying
    left and right by up to `sway_px` (a small head motion, one period every 2 s at 25 fps). The
    frames listed in `blank` are plain grey (no face)."""
    h, w = frame_hw
    face = cv2.resize(photo, (h * photo.shape[1] // photo.shape[0], h), interpolation=cv2.INTER_AREA)
    grey = np.full((h, w, 3), 128, np.uint8)
    for i in range(count):
        frame = grey.copy()
        if i not in blank:
            x = (w - face.shape[1]) // 2 + round(sway_px * np.sin(2 * np.pi * i / 50))
            frame[:, max(x, 0):x + face.shape[1]] = face[:, max(-x, 0):w - x]
        yield frame


def write_face_video(path: str | os.PathLike, photo: np.ndarray, frame_hw: tuple[int, int] = (720, 1280),
                     seconds: float = 2.0, fps: int = 25, **kwargs) -> Path:
    """An H.264 MP4 (yuv420p, crf 18) of `face_video_frames(photo, frame_hw, seconds * fps, **kwargs)`."""
    import av

    path = Path(path)
    with av.open(os.fspath(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frame_hw
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast"}
        for frame in face_video_frames(photo, frame_hw, round(seconds * fps), **kwargs):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="bgr24")))
        container.mux(stream.encode())
    return path


def vowel(seconds: float, level_db: float, f0: float = 140.0, formants: tuple[float, ...] = (700.0, 1200.0),
          sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """A steady vowel-like tone: float32 [seconds*rate], harmonics of `f0` shaped by resonances at
    `formants` (Hz), scaled to `level_db` RMS dBFS. The default formants are an open "a"."""
    t = np.arange(round(seconds * sample_rate)) / sample_rate
    harmonics = np.arange(1, int(4000 / f0) + 1) * f0
    gain = sum(np.exp(-0.5 * ((harmonics - f) / 120.0) ** 2) for f in formants) + 0.02
    tone = (gain[:, None] * np.sin(2 * np.pi * harmonics[:, None] * t)).sum(0)
    return (tone * 10 ** (level_db / 20) / np.sqrt(np.mean(tone**2))).astype(np.float32)


def speech(seconds: float, seed: int = 0, *, level_db: float = -20.0, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """A speech-like signal, float32 [seconds*rate], `level_db` RMS dBFS over the whole clip.

    Voiced syllables (harmonics of a gliding f0, shaped by two moving formants, 120-300 ms each,
    raised-cosine envelopes), unvoiced noise bursts at some onsets, and pauses (none, 20 ms or
    250 ms between syllables); the quietest stretches are a faint noise floor (about -54 dBFS below
    the speech's level, so silence detectors see them as silence)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sample_rate)
    t = np.arange(n) / sample_rate
    f0 = 130 + 25 * np.sin(2 * np.pi * 0.7 * t) + 15 * np.sin(2 * np.pi * 2.3 * t + 1.0)
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    formant1 = 500 + 250 * np.sin(2 * np.pi * 3.1 * t)
    formant2 = 1500 + 600 * np.sin(2 * np.pi * 1.9 * t + 0.5)
    voiced = np.zeros(n)
    for h in range(1, 30):
        freq = h * f0
        gain = np.exp(-((freq - formant1) / 180) ** 2) + 0.6 * np.exp(-((freq - formant2) / 300) ** 2) + 0.02
        voiced += gain * np.sin(h * phase) / np.sqrt(h)
    envelope = np.zeros(n)
    noise = np.zeros(n)
    pos = int(0.1 * sample_rate)
    while pos < n:
        length = int(rng.uniform(0.12, 0.30) * sample_rate)
        end = min(n, pos + length)
        envelope[pos:end] = np.sin(np.pi * np.arange(end - pos) / length) ** 2
        if rng.random() < 0.4:  # a fricative-like burst at the onset
            burst = min(end - pos, int(0.05 * sample_rate))
            noise[pos:pos + burst] = np.diff(rng.standard_normal(burst + 1)) * np.hanning(burst)
        pos = end + int(rng.choice([0.0, 0.02, 0.25], p=[0.5, 0.35, 0.15]) * sample_rate)
    signal = voiced * envelope + 0.3 * noise + 0.002 * rng.standard_normal(n)
    return (signal * (10 ** (level_db / 20) / np.sqrt(np.mean(signal ** 2)))).astype(np.float32)
