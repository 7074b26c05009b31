"""One avatar folder on disk: MuseTalk v1.5's files plus lipstream's extras (names in `layout`).

Writing: `FolderWriter` encodes PNGs on a small thread pool, hard-links the reversed half of the
cycle to the forward half (same pixels, no second copy on disk; a copy where links fail) and
records every file's sha256 for the manifest. Frames are PNG without zlib compression: lossless and
readable by any PNG reader, ~4x faster to write and to read than OpenCV's default zlib level 1
and 2-4x larger per file; with the linked half, a folder takes 1-2x the space of MuseTalk's own.

Reading (`read_folder`) takes MuseTalk's own folders as they are (spec 2.2, 2.5):
- masks are read as grayscale (MuseTalk's loader gets 3 equal channels);
- a placeholder face box (MuseTalk's `(0.0, 0.0, 0.0, 0.0)` for a frame without a face, or any
  empty box) takes the nearest real box's frame's box, crop box and mask; the frame keeps its index;
- latents.pt holds one latent per cycle frame WITH a face box, in cycle order (MuseTalk skips the
  others, and then pairs frame i with latent i mod len, which drifts): the j-th cycle frame with a
  real box gets the j-th latent, a frame without one its nearest real frame's latent;
- the pickles are read with an unpickler that builds only numbers, lists and tuples (no code runs)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import zipfile
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Self

import cv2
import numpy as np
import torch

from lipstream.avatar.geometry import crop_face, nearest_detected
from lipstream.avatar.layout import (
    COORDS,
    FULL_IMGS,
    INFO,
    LANDMARKS,
    LATENTS,
    MANIFEST,
    MASK_COORDS,
    MASK_DIR,
    frame_file,
)
from lipstream.avatar.model import Avatar
from lipstream.errors import AvatarCorruptError

MANIFEST_FORMAT = "lipstream-avatar"
MANIFEST_VERSION = 1
PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 0, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE]
PICKLE_PROTOCOL = 4  # MuseTalk runs on Python 3.10
THREADS = min(4, os.cpu_count() or 1)  # for PNG encoding/decoding and per-frame OpenCV work


class FolderWriter:
    """Writes files into `folder` (an empty build folder) and records {relative path: sha256}.

    `image` and `data` queue work on the thread pool; `link` waits for `finish`. Use as a context
    manager: leaving it stops the pool (pending writes are cancelled on an error)."""

    def __init__(self, folder: Path, threads: int = THREADS):
        self.folder = folder
        self.files: dict[str, str] = {}
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="avatar-write")
        self._pending: list[Future] = []
        self._links: list[tuple[str, str]] = []
        for sub in (FULL_IMGS, MASK_DIR):
            (folder / sub).mkdir(exist_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self._pool.shutdown(wait=True, cancel_futures=exc_type is not None)

    def _store(self, rel: str, payload: bytes) -> None:
        (self.folder / rel).write_bytes(payload)
        self.files[rel] = hashlib.sha256(payload).hexdigest()

    def data(self, rel: str, payload: bytes) -> None:
        self._pending.append(self._pool.submit(self._store, rel, payload))

    def image(self, rel: str, image: np.ndarray) -> None:
        """uint8 [H, W, 3] BGR or [H, W] grayscale -> PNG at `rel`."""
        def encode() -> None:
            ok, png = cv2.imencode(".png", image, PNG_PARAMS)
            if not ok:
                raise OSError(f"OpenCV could not encode {rel} ({image.dtype} {image.shape})")
            self._store(rel, png.tobytes())

        self._pending.append(self._pool.submit(encode))

    def link(self, src: str, dst: str) -> None:
        """`dst` gets `src`'s content (a hard link) once everything queued is written."""
        self._links.append((src, dst))

    def cycle_images(self, folder: str, images: Sequence[np.ndarray], written: int = 0) -> None:
        """Write `images` as `folder`/%08d.png, skipping the first `written` (queued already); an image
        equal to its mirror partner (index L-1-i, already written) becomes a link to it."""
        count = len(images)
        for i in range(written, count):
            j = count - 1 - i
            if j < i and images[i].shape == images[j].shape and np.array_equal(images[i], images[j]):
                self.link(f"{folder}/{frame_file(j)}", f"{folder}/{frame_file(i)}")
            else:
                self.image(f"{folder}/{frame_file(i)}", images[i])

    def finish(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Wait for every queued write (re-raising the first failure), then make the links.
        progress(done, total) is called as the queued writes complete."""
        for done, future in enumerate(self._pending, start=1):
            future.result()
            if progress is not None:
                progress(done, len(self._pending))
        self._pending.clear()
        for src, dst in self._links:
            try:
                os.link(self.folder / src, self.folder / dst)
            except OSError:
                shutil.copyfile(self.folder / src, self.folder / dst)
            self.files[dst] = self.files[src]
        self._links.clear()


def write_material(writer: FolderWriter, avatar: Avatar, info: dict, manifest: dict, written_frames: int = 0,
                   progress: Callable[[int, int], None] | None = None) -> dict:
    """Queue every file of `avatar` but the first `written_frames` frames, write them all, and return
    the manifest (`manifest` plus counts and the files' sha256), which is written last.
    progress(done, total): the files written so far, as `FolderWriter.finish` reports them."""
    n = len(avatar)
    writer.cycle_images(FULL_IMGS, avatar.frames, written=written_frames)
    writer.cycle_images(MASK_DIR, avatar.masks)
    writer.data(COORDS, pickle.dumps([tuple(int(v) for v in b) for b in avatar.face_boxes], PICKLE_PROTOCOL))
    writer.data(MASK_COORDS, pickle.dumps([[int(v) for v in b] for b in avatar.crop_boxes], PICKLE_PROTOCOL))
    if avatar.latents is not None:
        latents = avatar.latents.detach().to("cpu", torch.float16)
        buffer = io.BytesIO()
        torch.save([latents[i:i + 1] for i in range(n)], buffer)  # views of one storage: stored once
        writer.data(LATENTS, buffer.getvalue())
    if avatar.landmarks is not None:
        buffer = io.BytesIO()
        np.save(buffer, avatar.landmarks.astype(np.float32), allow_pickle=False)
        writer.data(LANDMARKS, buffer.getvalue())
    writer.data(INFO, json.dumps(info).encode())
    writer.finish(progress)
    manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, **manifest, "cycle_frames": n,
                "frame_size": list(avatar.frame_size), "latents": avatar.latents is not None,
                "landmarks": avatar.landmarks is not None, "files": dict(sorted(writer.files.items()))}
    (writer.folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


# What a pickled list of NumPy numbers may reference (numpy 1.x pickles name numpy.core, 2.x numpy._core).
_PICKLE_ALLOWED = frozenset({(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray")
                             for n in ("scalar", "_reconstruct")} | {("numpy", "dtype"), ("numpy", "ndarray")})


class _NumbersUnpickler(pickle.Unpickler):
    """Builds lists/tuples of Python or NumPy numbers only (MuseTalk's boxes may be NumPy scalars)."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a box list")
        return super().find_class(module, name)


def _boxes(path: Path) -> list[tuple[int, int, int, int] | None]:
    """A pickled list of (x1, y1, x2, y2) -> ints per box, None for an empty box (a placeholder)."""
    try:
        with open(path, "rb") as fh:
            raw = _NumbersUnpickler(fh).load()
        boxes = [tuple(int(v) for v in np.asarray(b, dtype=np.float64).reshape(4)) for b in raw]
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as exc:
        raise AvatarCorruptError(f"cannot read {path}: {exc}; it must be a pickled list of "
                                 "(x1, y1, x2, y2) boxes") from None
    return [b if b[2] > b[0] and b[3] > b[1] else None for b in boxes]


def _crops(frames: Sequence[np.ndarray], face_boxes: np.ndarray) -> list[np.ndarray]:
    """The 256x256 face crop of every frame; a frame shared by two cycle positions (a hard link,
    decoded once) with the same box is cropped once."""
    done: dict[tuple[int, tuple[int, ...]], np.ndarray] = {}
    out = []
    for frame, box in zip(frames, face_boxes, strict=True):
        key = (id(frame), tuple(int(v) for v in box))
        if key not in done:
            done[key] = crop_face(frame, key[1])
        out.append(done[key])
    return out


def _read_images(paths: Sequence[Path], flags: int) -> list[np.ndarray]:
    """Decode PNGs on threads; files that are one file on disk (hard links) are decoded once and
    shared. Raises AvatarCorruptError naming the first unreadable file."""
    first: dict[tuple[int, int], int] = {}
    owner = []
    for i, path in enumerate(paths):
        try:
            st = path.stat()
        except OSError:
            raise AvatarCorruptError(f"{path} is missing; the avatar folder is incomplete") from None
        owner.append(first.setdefault((st.st_dev, st.st_ino), i))
    unique = sorted(set(owner))
    with ThreadPoolExecutor(THREADS) as pool:
        decoded = dict(zip(unique, pool.map(lambda i: cv2.imread(os.fspath(paths[i]), flags), unique), strict=True))
    for i in unique:
        if decoded[i] is None:
            raise AvatarCorruptError(f"cannot decode {paths[i]} (corrupt or not an image); "
                                     "prepare or import the avatar again")
    return [decoded[i] for i in owner]


def _numbered_pngs(folder: Path) -> list[Path]:
    files = [p for p in folder.glob("*.png") if p.stem.isdigit()]
    return sorted(files, key=lambda p: int(p.stem))


def read_manifest(folder: Path) -> dict | None:
    """The folder's lipstream.json, or None for a MuseTalk folder without one."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise AvatarCorruptError(f"cannot read {path}: {exc}") from None
    if manifest.get("format") != MANIFEST_FORMAT or int(manifest.get("version", 0)) > MANIFEST_VERSION:
        raise AvatarCorruptError(f"{path} is not a lipstream avatar manifest this version reads "
                                 f"(format {manifest.get('format')!r}, version {manifest.get('version')!r})")
    return manifest


def verify_files(folder: Path, manifest: dict) -> None:
    """Compare every file's sha256 with the manifest; raise AvatarCorruptError naming the first that differs."""
    for rel, expected in manifest.get("files", {}).items():
        path = folder / rel
        try:
            actual = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError:
            raise AvatarCorruptError(f"{path} is missing; prepare or import the avatar again") from None
        if actual != expected:
            raise AvatarCorruptError(f"{path} has changed since it was written (sha256 {actual[:12]}..., "
                                     f"expected {expected[:12]}...); prepare or import the avatar again")


def _latents(path: Path, owner: np.ndarray, has_face: list[bool]) -> torch.Tensor:
    """latents.pt -> [L, 8, 32, 32] per cycle frame (see the module doc for the mapping)."""
    try:
        items = torch.load(path, map_location="cpu", weights_only=True)
        stacked = torch.cat([torch.as_tensor(t).reshape(1, 8, 32, 32) for t in items])
    except (OSError, RuntimeError, EOFError, ValueError, TypeError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        raise AvatarCorruptError(f"cannot read {path}: {exc}; it must be a torch.save'd list of "
                                 "[1, 8, 32, 32] tensors") from None
    with_face = np.flatnonzero(has_face)
    if len(stacked) != len(with_face):
        raise AvatarCorruptError(f"{path} holds {len(stacked)} latents but {len(with_face)} cycle frames have "
                                 "a face box; the folder is inconsistent, prepare the avatar again")
    rank = np.zeros(len(has_face), np.int64)
    rank[with_face] = np.arange(len(with_face))
    return stacked[torch.from_numpy(rank[owner])]


def read_folder(folder: Path, name: str, tenant: str, *, verify: bool = False) -> Avatar:
    """An avatar folder (ours or MuseTalk's) -> Avatar (see the module doc for MuseTalk's quirks).
    Raises AvatarCorruptError for a missing, unreadable or inconsistent file."""
    missing = [rel for rel in (FULL_IMGS, MASK_DIR, COORDS, MASK_COORDS) if not (folder / rel).exists()]
    if missing:
        raise AvatarCorruptError(f"{folder} is not a MuseTalk v1.5 avatar folder: {', '.join(missing)} missing")
    manifest = read_manifest(folder)
    if verify and manifest is not None:
        verify_files(folder, manifest)
    boxes = _boxes(folder / COORDS)
    crop_boxes = _boxes(folder / MASK_COORDS)
    frame_paths = _numbered_pngs(folder / FULL_IMGS)
    if not (len(frame_paths) == len(boxes) == len(crop_boxes)) or not boxes:
        raise AvatarCorruptError(f"{folder} is inconsistent: {len(frame_paths)} frames in {FULL_IMGS}/, "
                                 f"{len(boxes)} boxes in {COORDS}, {len(crop_boxes)} in {MASK_COORDS}")
    has_face = [b is not None for b in boxes]
    if not any(has_face):
        raise AvatarCorruptError(f"{folder / COORDS} has no face box (every frame is a placeholder)")
    owner = nearest_detected(has_face)
    for i in np.flatnonzero(has_face):
        if crop_boxes[i] is None:
            raise AvatarCorruptError(f"{folder / MASK_COORDS} has an empty crop box for frame {i}")

    frames = _read_images(frame_paths, cv2.IMREAD_COLOR)
    if len({f.shape for f in frames}) != 1:
        raise AvatarCorruptError(f"the frames in {folder / FULL_IMGS} differ in size")
    with_face = np.flatnonzero(has_face)
    masks = dict(zip(with_face, _read_images([folder / MASK_DIR / frame_file(i) for i in with_face],
                                             cv2.IMREAD_GRAYSCALE), strict=True))
    for i, mask in masks.items():
        xs, ys, xe, ye = crop_boxes[i]
        if mask.shape != (ye - ys, xe - xs):
            raise AvatarCorruptError(f"{folder / MASK_DIR / frame_file(i)} is {mask.shape[1]}x{mask.shape[0]}, "
                                     f"its crop box {crop_boxes[i]} is {xe - xs}x{ye - ys}")

    face_boxes = np.int32([boxes[k] for k in owner])
    crops = np.stack(_crops(frames, face_boxes))
    landmarks = None
    if (folder / LANDMARKS).is_file():
        try:
            landmarks = np.load(folder / LANDMARKS, allow_pickle=False).astype(np.float32)
        except (OSError, ValueError) as exc:
            raise AvatarCorruptError(f"cannot read {folder / LANDMARKS}: {exc}") from None
    latents = _latents(folder / LATENTS, owner, has_face) if (folder / LATENTS).is_file() else None
    if manifest is None:
        manifest = {"source": {"kind": "musetalk", "path": str(folder)}, "info": _info(folder),
                    "faceless_frames": np.flatnonzero(~np.asarray(has_face)).tolist()}
    try:
        return Avatar(name, tenant, folder, frames=np.stack(frames), face_boxes=face_boxes,
                      crop_boxes=np.int32([crop_boxes[k] for k in owner]), masks=[masks[k] for k in owner],
                      crops=crops, landmarks=landmarks, latents=latents, fps=float(manifest.get("fps", 25.0)),
                      meta=manifest)
    except ValueError as exc:  # shapes that do not agree (e.g. landmarks for another cycle length)
        raise AvatarCorruptError(f"{folder} is inconsistent: {exc}") from None


def _info(folder: Path) -> dict:
    try:
        return json.loads((folder / INFO).read_text())
    except (OSError, ValueError):
        return {}
