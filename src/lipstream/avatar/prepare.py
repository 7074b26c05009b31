"""Prepare an avatar from a video or a photo (MuseTalk v1.5's preparation, reference spec 2.3-2.7,
with MediaPipe face-mesh landmarks instead of DWPose + BiSeNet, so no weights are needed):

1. decode every frame (no fps conversion; a photo is one frame) and write it to full_imgs/ while
   finding its landmarks (tracked across a video's frames);
2. v1.5's face box per frame (`geometry.face_box`); a frame without a face takes the nearest face
   frame's box and landmarks and keeps its index; no face in any frame is an error;
3. per frame: the 256x256 Lanczos crop, the 1.5x square crop box and the blend mask (`masks`);
4. the latents [masked, reference] when the VAE is at hand (`lipstream.models.latents`);
5. the forward+reversed cycle of everything, written in MuseTalk's layout plus our extras; the
   folder is built under a temporary name and renamed into place at the end."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from lipstream.avatar import DEFAULT_MAX_SECONDS
from lipstream.avatar.folder import THREADS, FolderWriter, write_material
from lipstream.avatar.geometry import crop_box_for, crop_face, face_box, nearest_detected
from lipstream.avatar.landmarks import FaceMesh
from lipstream.avatar.layout import FULL_IMGS, avatar_dir, clean_name, clean_tenant, frame_file
from lipstream.avatar.masks import blend_mask
from lipstream.avatar.model import Avatar
from lipstream.avatar.source import FaceSource, open_source
from lipstream.avatar.store import base_manifest, musetalk_info, staged_folder
from lipstream.errors import AvatarExistsError, NoFaceError

log = logging.getLogger(__name__)

LATENT_BATCH = 16
# progress(stage, done, total), stage by stage in this order ("latents" only with the VAE); total is
# None when not known in advance (a video's frame count may be)
STAGES = ("frames", "faces", "latents", "saving")
Progress = Callable[[str, int, int | None], None]
DeviceCall = Callable[..., Any]  # device_call(fn, *args) -> fn(*args), run where the device's work runs
LATENT_SEED = 0  # the VAE samples its posterior (as MuseTalk caches it): seeded, so re-preparing is reproducible


def prepare_avatar(name: str, *, video: str | os.PathLike | None = None, image: str | os.PathLike | None = None,
                   tenant: str | None = None, root: str | os.PathLike | None = None, fps: float = 25.0,
                   max_seconds: float | None = DEFAULT_MAX_SECONDS, overwrite: bool = False,
                   latents: bool | None = None, vae=None, models_root: str | os.PathLike | None = None,
                   device: torch.device | str | None = None, progress: bool | Progress = True,
                   source_name: str | None = None, device_call: DeviceCall | None = None) -> Avatar:
    """Prepare avatar `name` from exactly one of `video` and `image`, store it and return it.

    fps: the rate the cycle plays at (the video's own rate is not used, as in MuseTalk).
    max_seconds: longer videos are refused (None: no limit).
    latents: True computes them (needs `vae` or the MuseTalk weights), False skips them, None
      computes them when `vae` is given or the weights are under `models_root`.
    vae: a loaded AutoencoderKL (e.g. `engine.models.vae`); else it is loaded from `models_root`
      onto `device` (default cuda if available).
    device_call: how to run the latents' VAE work, batch by batch: device_call(fn, *args) -> fn(*args)
      where `vae`'s device work runs (a server passes its device worker's; default: here).
    progress: True shows a progress bar per stage; a function is called as progress(stage, done, total)
      instead, through every stage of `STAGES` to the end: "frames" (decoding and landmarks; total:
      the frame count, or None when unknown), "faces" (boxes, blend masks and crops), "latents"
      (only with the VAE) and "saving" (the files written).
    source_name: how the avatar's manifest (`avatars list`) and error messages name the video or photo
      (default: its path; an upload's own file name, not where the server stored it).
    Raises AvatarNameError, AvatarExistsError, AvatarSourceNotFoundError, AvatarSourceUnreadableError,
    AvatarSourceTooLongError, NoFaceError, MissingWeightsError."""
    name, tenant = clean_name(name), clean_tenant(tenant)
    source = open_source(video=video, image=image, max_seconds=max_seconds, label=source_name)
    dest = avatar_dir(name, tenant, root)
    if dest.exists() and not overwrite:
        raise AvatarExistsError(f"avatar {name!r} exists already ({dest}); choose another name, "
                                "or replace it with --force (overwrite=True)")
    vae = _vae(latents, vae, models_root, device)
    if source.fps and abs(source.fps - fps) > 0.5:
        log.warning("%s plays at %.3g fps; the avatar cycle plays its frames at %g fps (no resampling, as "
                    "MuseTalk)", source.label, source.fps, fps)
    report = _Stages(name, progress)
    with staged_folder(dest, overwrite) as build, FolderWriter(build) as writer:
        frames, points = _read_and_detect(source, writer, report)
        avatar = _assemble(name, tenant, frames, points, source, fps, report)
        if vae is not None:
            avatar.latents = _latents(vae, avatar.crops[: len(avatar) // 2], report, device_call)
        manifest = base_manifest(name, tenant, fps, _describe(source, len(avatar) // 2),
                                 avatar.meta["faceless_frames"])
        with report.stage("saving", None, "file") as advance:
            avatar.meta = write_material(writer, avatar, musetalk_info(name, source.label), manifest,
                                         written_frames=len(avatar) // 2, progress=advance)
    avatar.path = dest
    return avatar


class _Stages:
    """Progress through `STAGES`: a tqdm bar per stage (progress=True), progress(stage, done, total)
    calls (a function), or nothing (False)."""

    def __init__(self, name: str, progress: bool | Progress):
        self.name = name
        self.progress = progress

    @contextlib.contextmanager
    def stage(self, stage: str, total: int | None, unit: str) -> Iterator[Callable[..., None]]:
        """Yields advance(done, total=None): `done` of the stage's `total` (or of a total found later)."""
        bar = tqdm(total=total, desc=f"{self.name}: {stage}", unit=unit, disable=self.progress is not True)

        def advance(done: int, now_total: int | None = None) -> None:
            if now_total is not None and bar.total != now_total:
                bar.total = now_total
            bar.update(done - bar.n)
            if callable(self.progress):
                self.progress(stage, done, bar.total)

        try:
            yield advance
        finally:
            bar.close()


def _vae(latents: bool | None, vae, models_root, device):
    """The VAE to compute latents with, or None to skip them."""
    if latents is False:
        return None
    if vae is not None:
        return vae
    from lipstream.models.layout import VAE_DIR, has_musetalk_weights, require_musetalk_weights

    if latents is None and not has_musetalk_weights(models_root):
        return None
    root = require_musetalk_weights(models_root)  # raises MissingWeightsError when latents=True
    from lipstream.models.placement import default_dtype, resolve_device
    from lipstream.models.vae import load_vae

    device = resolve_device(device)
    return load_vae(root / VAE_DIR, device, default_dtype(device))


class _CycleFrames:
    """The cycle's frames, decoded straight into one array with room for the reversed half (which
    `cycle` fills in place): no second copy of the video in memory. Sized from the container's frame
    count estimate and doubled when that is too small (unused room is never touched, so costs no RAM)."""

    def __init__(self, estimate: int | None):
        self.estimate = max(estimate or 0, 1)
        self.buffer: np.ndarray | None = None
        self.count = 0

    def append(self, frame: np.ndarray) -> np.ndarray:
        """Store frame uint8 [H, W, 3]; returns its stored copy."""
        if self.buffer is None:
            self.buffer = np.empty((2 * self.estimate, *frame.shape), np.uint8)
        elif 2 * (self.count + 1) > len(self.buffer):
            grown = np.empty((2 * len(self.buffer), *frame.shape), np.uint8)
            grown[:self.count] = self.buffer[:self.count]
            self.buffer = grown
        self.buffer[self.count] = frame
        self.count += 1
        return self.buffer[self.count - 1]

    def cycle(self) -> np.ndarray:
        """uint8 [2N, H, W, 3]: the N frames, then the same reversed."""
        n = self.count
        out = self.buffer[:2 * n]
        out[n:] = out[:n][::-1]
        return out


def _read_and_detect(source: FaceSource, writer: FolderWriter,
                     report: _Stages) -> tuple[_CycleFrames, list[np.ndarray | None]]:
    """Decode every frame, queue its PNG, find its landmarks. Returns (frames, landmarks or None each)."""
    frames, points = _CycleFrames(source.frame_count), []
    video = source.kind == "video"
    with (report.stage("frames", source.frame_count, "frame") as advance,  # till the face mesh has closed
          FaceMesh(static=not video, max_faces=1 if video else 4) as mesh):  # one tracked face: no re-detection
        for i, decoded in enumerate(source.frames()):
            frame = frames.append(decoded)
            writer.image(f"{FULL_IMGS}/{frame_file(i)}", frame)
            points.append(mesh.detect(frame))
            advance(i + 1)
        advance(frames.count, frames.count)  # the container's estimate may have been off
    return frames, points


def _assemble(name: str, tenant: str, decoded: _CycleFrames, points: list[np.ndarray | None],
              source: FaceSource, fps: float, report: _Stages) -> Avatar:
    """Boxes, crops and masks of the N source frames, laid out as the 2N-frame cycle."""
    with report.stage("faces", None, "frame") as advance:  # the stage starts with the cycle's copy
        n = decoded.count
        frames = decoded.cycle()
        boxes = [None if p is None else face_box(p, frames.shape[1:3]) for p in points]
        has_face = [b is not None for b in boxes]
        if not any(has_face):
            what = "the photo" if source.kind == "image" else f"any of the {n} frames of the video"
            raise NoFaceError(f"no face found in {what} {source.label}; use a video or photo that shows one "
                              "face, frontal, not too small")
        if not all(has_face):
            log.warning("%d of %d frames of %s show no face; they take the nearest face frame's box",
                        n - sum(has_face), n, source.label)
        owner = nearest_detected(has_face)
        with_face = sorted(set(owner.tolist()))
        advance(0, len(with_face) + n)
        with ThreadPoolExecutor(THREADS) as pool:  # OpenCV releases the GIL: masks and crops on a few threads
            masks = {}
            for k, mask in zip(with_face, pool.map(lambda k: blend_mask(points[k], boxes[k], crop_box_for(boxes[k])),
                                                   with_face), strict=True):
                masks[k] = mask
                advance(len(masks))
            crops = []
            for crop in pool.map(lambda k: crop_face(frames[k], boxes[owner[k]]), range(n)):
                crops.append(crop)
                advance(len(masks) + len(crops))
            crops = np.stack(crops)
        cycle = np.concatenate([np.arange(n), np.arange(n)[::-1]])
        cycle_owner = owner[cycle]
        face_boxes = np.int32([boxes[k] for k in cycle_owner])
        crops = crops[cycle]
        faceless = [i for i, k in enumerate(cycle) if not has_face[k]]
        return Avatar(name, tenant, None, frames=frames, face_boxes=face_boxes,
                      crop_boxes=np.int32([crop_box_for(tuple(b)) for b in face_boxes]),
                      masks=[masks[k] for k in cycle_owner], crops=crops,
                      landmarks=np.stack([points[k] for k in cycle_owner]).astype(np.float32),
                      fps=float(fps), meta={"faceless_frames": faceless})


def _latents(vae, crops: np.ndarray, report: _Stages, device_call: DeviceCall | None) -> torch.Tensor:
    """[N, 8, 32, 32] of the N source crops -> the 2N cycle, fp16 on the CPU (MuseTalk's latents.pt)."""
    generator = torch.Generator(vae.device).manual_seed(LATENT_SEED)
    run = device_call or (lambda fn, *args: fn(*args))
    out = []
    with report.stage("latents", len(crops), "frame") as advance:
        for start in range(0, len(crops), LATENT_BATCH):
            out.append(run(_latent_batch, vae, crops[start:start + LATENT_BATCH], generator))
            advance(min(start + LATENT_BATCH, len(crops)))
    latents = torch.cat(out)
    return torch.cat([latents, latents.flip(0)])


def _latent_batch(vae, crops: np.ndarray, generator: torch.Generator) -> torch.Tensor:
    """One batch of latents, fp16 on the CPU."""
    from lipstream.models.latents import avatar_latents

    return avatar_latents(vae, crops, generator=generator, batch_size=LATENT_BATCH).to("cpu", torch.float16)


def _describe(source: FaceSource, frames: int) -> dict:
    return {"kind": source.kind, "path": source.label, "frames": frames, "fps": source.fps}
