"""What an avatar is prepared from: a video's frames (decoded with PyAV) or a photo (one frame).

Like MuseTalk, every decoded frame is kept: no fps conversion and no resizing. The video's display
rotation (phones) is applied, as OpenCV's reader does for MuseTalk. Frames: uint8 [H, W, 3] BGR."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import cv2
import numpy as np

from lipstream.errors import AvatarSourceNotFoundError, AvatarSourceTooLongError, AvatarSourceUnreadableError


@dataclass(frozen=True)
class FaceSource:
    """path; kind "video" or "image"; frame_count: the container's estimate (None if unknown);
    fps: the video's average frame rate (None for a photo or if unknown); label: how messages and
    the avatar's manifest name it (the path, or e.g. an uploaded file's own name)."""

    path: Path
    kind: str
    frame_count: int | None
    fps: float | None
    max_seconds: float | None
    label: str

    def frames(self) -> Iterator[np.ndarray]:
        """The frames in order, uint8 [H, W, 3] BGR, all of the first frame's size.
        Raises AvatarSourceUnreadableError / AvatarSourceTooLongError while decoding."""
        if self.kind == "image":
            yield read_image(self.path, self.label)
            return
        try:
            yield from self._video_frames()
        except av.error.FFmpegError as exc:
            raise _unreadable(self.label, exc) from None

    def _video_frames(self) -> Iterator[np.ndarray]:
        count, start, size = 0, None, None
        with av.open(os.fspath(self.path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                t = frame.time if frame.time is not None else count / (self.fps or 25.0)
                start = t if start is None else start
                if self.max_seconds is not None and t - start >= self.max_seconds:
                    raise _too_long(self.label, self.max_seconds)
                size = size or (frame.height, frame.width)
                image = frame.to_ndarray(format="bgr24", height=size[0], width=size[1])
                if frame.rotation:
                    image = np.ascontiguousarray(np.rot90(image, k=round(frame.rotation / 90) % 4))
                count += 1
                yield image
        if count == 0:
            raise AvatarSourceUnreadableError(f"video {self.label} has no decodable frames; give another video")


def _unreadable(label: str, exc: Exception) -> AvatarSourceUnreadableError:
    reason = getattr(exc, "strerror", None) or exc
    return AvatarSourceUnreadableError(f"cannot read video {label}: {reason}; give a valid video file (MP4, MOV, "
                                       "WebM, ...) or use --image for a photo")


def _too_long(label: str, max_seconds: float) -> AvatarSourceTooLongError:
    return AvatarSourceTooLongError(f"video {label} is longer than {max_seconds:g} s; trim it (a few seconds of "
                                    "natural idle motion is enough) or raise --max-seconds")


def _existing_file(path: str | os.PathLike, what: str, label: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise AvatarSourceNotFoundError(f"{what} {label} does not exist; check the path")
    if path.stat().st_size == 0:
        raise AvatarSourceUnreadableError(f"{what} {label} is empty (0 bytes)")
    return path


def read_image(path: str | os.PathLike, label: str | None = None) -> np.ndarray:
    """A photo as uint8 [H, W, 3] BGR (EXIF orientation applied; gray or alpha images converted).
    label: how messages name it (default: the path)."""
    label = str(path) if label is None else label
    path = _existing_file(path, "image", label)
    image = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise AvatarSourceUnreadableError(f"cannot read image {label}: not an image OpenCV decodes (PNG, JPEG, "
                                          "WebP, BMP, TIFF); use --video for a video")
    return image


def open_source(video: str | os.PathLike | None = None, image: str | os.PathLike | None = None,
                max_seconds: float | None = None, label: str | None = None) -> FaceSource:
    """Check the input (exactly one of `video`, `image`) and read what its header says. A video whose
    header already gives a duration over `max_seconds` is refused here, before any decoding.
    label: how messages and the manifest name the input (default: its path)."""
    if (video is None) == (image is None):
        raise ValueError("give exactly one of video= or image=")
    label = str(video if image is None else image) if label is None else label
    if image is not None:
        path = _existing_file(image, "image", label)
        read_image(path, label)
        return FaceSource(path, "image", 1, None, None, label)
    path = _existing_file(video, "video", label)
    try:
        with av.open(os.fspath(path)) as container:
            if not container.streams.video:
                raise AvatarSourceUnreadableError(f"{label} has no video stream; give a video with a face in it")
            stream = container.streams.video[0]
            fps = float(stream.average_rate) if stream.average_rate else None
            if stream.duration is not None:
                duration = float(stream.duration * stream.time_base)
            else:
                duration = container.duration / av.time_base if container.duration else None
            estimate = stream.frames or (round(duration * fps) if duration and fps else None)
    except av.error.FFmpegError as exc:
        raise _unreadable(label, exc) from None
    if max_seconds is not None and duration is not None and duration > max_seconds + 1e-3:
        raise _too_long(label, max_seconds)
    return FaceSource(path, "video", estimate, fps, max_seconds, label)
