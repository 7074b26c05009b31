"""The avatar store: load, list, save, import and delete avatars under the avatars root.

Layout and names: see `lipstream.avatar.layout`; files: see `lipstream.avatar.folder`.
Every write builds the whole folder under a hidden temporary name beside it (`.tmp-<name>-<random>`)
and renames it into place at the end, so a failed or interrupted run leaves no half-made avatar;
an existing avatar is replaced only when asked (`overwrite=True`), and then in one rename.

Memory of a loaded avatar, per cycle frame (a video of N frames has a cycle of 2N):
H*W*3 bytes of frame (2.8 MB at 720p, 6.2 MB at 1080p), the mask (2s x 2s bytes, s ~ 0.75x the face
box's larger side), the 256x256x3 crop (196 kB), the landmarks (3.8 kB) and the latents (16 kB in fp16).
`Avatar.nbytes` gives the total."""

from __future__ import annotations

import datetime as _dt
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Collection, Hashable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import cv2

from lipstream import __version__
from lipstream.avatar.folder import FolderWriter, read_folder, read_manifest, write_material
from lipstream.avatar.layout import FULL_IMGS, LATENTS, avatar_dir, clean_name, clean_tenant, tenant_dir
from lipstream.avatar.model import Avatar
from lipstream.errors import AvatarError, AvatarExistsError, AvatarNotFoundError, excerpt

log = logging.getLogger(__name__)

AvatarRef = str | os.PathLike


def musetalk_info(name: str, source: str) -> dict:
    """avator_info.json as MuseTalk writes it (v1.5 ignores bbox_shift: 0)."""
    return {"avatar_id": name, "video_path": source, "bbox_shift": 0, "version": "v15"}


def base_manifest(name: str, tenant: str, fps: float, source: dict, faceless_frames: list[int]) -> dict:
    """The manifest fields every writer sets (write_material adds counts and checksums).
    faceless_frames: the cycle frames that carry their nearest face frame's box (no face of their own)."""
    return {"lipstream": __version__, "name": name, "tenant": tenant,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), "fps": float(fps), "source": source,
            "faceless_frames": [int(i) for i in faceless_frames]}


def _refuse_existing(dest: Path) -> None:
    raise AvatarExistsError(f"avatar {dest.name!r} exists already ({dest}); choose another name, "
                            "or replace it with --force (overwrite=True)")


@contextmanager
def staged_folder(dest: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty hidden folder beside `dest` to build an avatar in. On a normal exit it becomes
    `dest` (replacing an existing one only when `overwrite`); on any exception, including Ctrl-C, it
    is deleted and `dest` is left as it was."""
    if dest.exists() and not overwrite:
        _refuse_existing(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    build = dest.parent / f".tmp-{dest.name}-{uuid.uuid4().hex[:8]}"
    build.mkdir()
    try:
        yield build
        if dest.exists():
            if not overwrite:
                _refuse_existing(dest)
            old = dest.parent / f".old-{dest.name}-{uuid.uuid4().hex[:8]}"
            os.rename(dest, old)
            os.rename(build, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.rename(build, dest)
            except OSError:  # made meanwhile by another writer (a folder cannot replace a non-empty one)
                _refuse_existing(dest)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise


STALE_BUILD_S = 3600.0  # a build folder untouched this long belongs to a process that was killed
_LEFTOVER = re.compile(r"^\.(tmp|old|del)-(.+)-[0-9a-f]{8}$")


def sweep_stale_builds(tenants: Iterable[str | None], root: str | os.PathLike | None = None,
                       older_than_s: float = STALE_BUILD_S) -> list[tuple[str, Path]]:
    """Clean up the hidden folders that killed writers left in the tenants' avatar folders:

    - `.tmp-<name>-*`, a build that never finished: deleted;
    - `.old-<name>-*`, the previous copy during an overwrite: deleted when `<name>` exists, else it is
      the only copy (the writer died between its two renames) and is renamed back to `<name>`;
    - `.del-<name>-*`, an avatar being deleted: deleted.

    `.tmp-` and `.old-` folders modified less than `older_than_s` ago may belong to a writer still at
    work and are left alone (an old copy keeps the mtime of the avatar it was: a writer holds it only
    between two renames, and a restore that races one makes that writer fail, not lose the avatar).
    Returns (what, folder) for each folder handled, what being "removed" or "restored"."""
    now = time.time()
    done: list[tuple[str, Path]] = []
    for tenant in tenants:
        base = tenant_dir(tenant, root)
        found = []
        for folder in base.iterdir() if base.is_dir() else []:
            match = _LEFTOVER.match(folder.name)
            if match is None or folder.is_symlink() or not folder.is_dir():
                continue
            try:
                changed = folder.stat().st_mtime
            except OSError:  # removed meanwhile
                continue
            found.append((changed, folder, match.group(1), match.group(2)))
        # newest first: of several old copies of one name, the newest is the one to restore
        for changed, folder, kind, name in sorted(found, reverse=True):
            if kind != "del" and now - changed <= older_than_s:
                continue
            dest = base / name
            if kind == "old" and not dest.exists():
                try:
                    os.rename(folder, dest)
                    done.append(("restored", dest))
                    continue
                except OSError:  # made meanwhile by a writer: then this copy is stale
                    pass
            shutil.rmtree(folder, ignore_errors=True)
            done.append(("removed", folder))
    return done


def _resolve(ref: AvatarRef, tenant: str | None, root: str | os.PathLike | None) -> tuple[Path, str, str]:
    """(folder, name, tenant) of a name, or of a path (a PathLike, or a str holding a path separator)."""
    if isinstance(ref, os.PathLike) or os.sep in ref or (os.altsep and os.altsep in ref):
        folder = Path(ref)
        return folder, folder.name.strip(), ""
    tenant = clean_tenant(tenant)
    return avatar_dir(ref, tenant, root), clean_name(ref), tenant


def load_avatar(ref: AvatarRef, *, tenant: str | None = None, root: str | os.PathLike | None = None,
                verify: bool = False) -> Avatar:
    """An avatar by name (under the root, for `tenant`), or by path (a PathLike, or a str with a
    path separator: ours or a MuseTalk `results/v15/avatars/<id>` folder as it is).

    verify: compare every file with the manifest's sha256 first (reads the whole folder twice).
    Raises AvatarNameError, AvatarNotFoundError, AvatarCorruptError."""
    folder, name, tenant = _resolve(ref, tenant, root)
    if not folder.is_dir():
        where = f"tenant {tenant!r}" if tenant else "the default tenant"
        raise AvatarNotFoundError(f"no avatar {excerpt(str(ref).strip())} for {where} ({folder}); "
                                  "see `lipstream avatars list`, or prepare it with `lipstream avatars prepare`")
    return read_folder(folder, name, tenant, verify=verify)


def save_avatar(avatar: Avatar, *, name: str | None = None, tenant: str | None = None,
                root: str | os.PathLike | None = None, overwrite: bool = False, source: dict | None = None) -> Path:
    """Write an in-memory avatar to the store (atomically) and return its folder. `name`/`tenant`
    default to the avatar's; `source` describes where it came from, for the manifest. The avatar's
    name, tenant, path and meta are updated. Crops are not stored: loading recomputes them from the
    frames and face boxes (`geometry.crop_face`), as preparation made them."""
    name = clean_name(name or avatar.name)
    tenant = clean_tenant(avatar.tenant if tenant is None else tenant)
    dest = avatar_dir(name, tenant, root)
    source = source or avatar.meta.get("source") or {"kind": "memory"}
    with staged_folder(dest, overwrite) as build, FolderWriter(build) as writer:
        manifest = base_manifest(name, tenant, avatar.fps, source, avatar.meta.get("faceless_frames", []))
        avatar.meta = write_material(writer, avatar, musetalk_info(name, str(source.get("path", ""))), manifest)
    avatar.name, avatar.tenant, avatar.path = name, tenant, dest
    return dest


def import_avatar(musetalk_dir: str | os.PathLike, name: str | None = None, *, tenant: str | None = None,
                  root: str | os.PathLike | None = None, fps: float = 25.0, overwrite: bool = False,
                  landmarks: bool = True, progress: bool = True) -> Avatar:
    """Copy a MuseTalk avatar folder (`results/v15/avatars/<id>`) into the store, fixing what MuseTalk
    leaves broken (placeholder boxes, latents out of step, 3-channel masks; see `folder`).

    name: default the folder's name (whitespace/CR stripped). landmarks: find the face-mesh points of
    every frame (MuseTalk has none; the warp engine needs them). Returns the stored Avatar."""
    from lipstream.avatar.detect import detect_landmarks

    source = Path(musetalk_dir)
    name = clean_name(name if name is not None else source.name)
    if not source.is_dir():
        raise AvatarNotFoundError(f"{source} is not a folder; give a MuseTalk avatar folder "
                                  "such as results/v15/avatars/<avatar_id>")
    if avatar_dir(name, tenant, root).exists() and not overwrite:
        _refuse_existing(avatar_dir(name, tenant, root))
    avatar = read_folder(source, name, clean_tenant(tenant))
    avatar.fps = float(fps)
    if landmarks and avatar.landmarks is None:
        avatar.landmarks = detect_landmarks(avatar.frames, progress=progress, label=name)
        if avatar.landmarks is None:
            log.warning("no face landmarks found in %s; the avatar is imported without them", source)
    save_avatar(avatar, tenant=tenant, root=root, overwrite=overwrite, source={"kind": "musetalk", "path": str(source)})
    return avatar


def delete_avatar(name: str, *, tenant: str | None = None, root: str | os.PathLike | None = None) -> Path:
    """Delete an avatar's folder (renamed away first, so it disappears at once). Returns the old path."""
    folder = avatar_dir(name, tenant, root)
    if not folder.is_dir():
        raise AvatarNotFoundError(f"no avatar {excerpt(name.strip())} to delete ({folder})")
    trash = folder.parent / f".del-{folder.name}-{uuid.uuid4().hex[:8]}"
    os.rename(folder, trash)
    shutil.rmtree(trash)
    return folder


@dataclass(frozen=True)
class AvatarSummary:
    """What `list` and `show` print, read without loading the frames."""

    name: str
    tenant: str
    path: Path
    cycle_frames: int
    frame_size: tuple[int, int] | None  # (height, width)
    fps: float
    latents: bool
    landmarks: bool
    source: str
    created: str | None
    disk_bytes: int


def _disk_bytes(folder: Path) -> int:
    seen, total = set(), 0
    for path in folder.rglob("*"):
        if not path.is_file():
            continue
        st = path.stat()
        if (st.st_dev, st.st_ino) not in seen:  # hard links count once
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


def summarize(folder: Path, name: str, tenant: str) -> AvatarSummary:
    """Summary of one avatar folder, from its manifest (or file counts for a MuseTalk folder)."""
    manifest = read_manifest(folder)
    if manifest is not None:
        source = manifest.get("source", {})
        return AvatarSummary(name, tenant, folder, int(manifest["cycle_frames"]), tuple(manifest["frame_size"]),
                             float(manifest["fps"]), bool(manifest["latents"]), bool(manifest["landmarks"]),
                             f"{source.get('kind', '?')}: {source.get('path', '')}", manifest.get("created"),
                             _disk_bytes(folder))
    frames = sorted((folder / FULL_IMGS).glob("*.png"))
    first = cv2.imread(os.fspath(frames[0])) if frames else None
    return AvatarSummary(name, tenant, folder, len(frames), None if first is None else first.shape[:2], 25.0,
                         (folder / LATENTS).is_file(), False, "musetalk folder (not imported)", None,
                         _disk_bytes(folder))


def list_avatars(tenant: str | None = None, root: str | os.PathLike | None = None) -> list[AvatarSummary]:
    """The tenant's avatars, by name (folders whose names are not valid avatar names are skipped)."""
    tenant = clean_tenant(tenant)
    base = tenant_dir(tenant, root)
    out = []
    for folder in sorted(base.iterdir()) if base.is_dir() else []:
        if not folder.is_dir() or folder.name.startswith("."):
            continue
        try:
            out.append(summarize(folder, clean_name(folder.name), tenant))
        except (AvatarError, OSError, ValueError, KeyError, TypeError) as exc:  # one bad folder hides no other
            log.warning("skipping %s: %s", folder, exc)
    return out


@dataclass(eq=False)
class _CacheSlot:
    """One avatar of an `AvatarCache`: its lock (held while it loads, or while something is derived
    from it) and, once loaded, the avatar with the stamp (inode, mtime) of the folder it came from,
    its size and what was derived from it (by tag)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    stamp: tuple[int, int] | None = None
    avatar: Avatar | None = None
    nbytes: int = 0
    derived: dict[Hashable, Any] = field(default_factory=dict)


T = TypeVar("T")
CacheKey = tuple[str, str]  # (tenant, name)


class AvatarCache:
    """Loaded avatars shared by every session, each loaded on first use, with what is derived from it
    (say, an engine's material): `get` hands out the same object until its folder is replaced
    (prepare --force) or deleted, or it is unloaded. Thread-safe. Each avatar has its own lock: one
    avatar loads (and each derived value is made) once however many ask for it at the same time, while
    other avatars load (or are got, or evicted) meanwhile; the cache's own lock is only held to find a slot.

    max_bytes: the memory budget (`Avatar.nbytes` of the loaded avatars; None: no limit): `trim` unloads
    the least recently used avatars above it."""

    def __init__(self, root: str | os.PathLike | None = None, max_bytes: int | None = None):
        self.root = root
        self.max_bytes = max_bytes
        self._lock = threading.Lock()  # guards _slots (never held during a load)
        self._slots: OrderedDict[CacheKey, _CacheSlot] = OrderedDict()  # least recently used first

    def get(self, name: str, tenant: str | None = None) -> Avatar:
        """The avatar, loaded if it is not (AvatarNotFoundError, AvatarNameError, AvatarCorruptError)."""
        return self._get(name, tenant, None)[0]

    def get_derived(self, name: str, tenant: str | None, makes: dict[Hashable, Callable[[Avatar], Any]]
                    ) -> tuple[Avatar, dict[Hashable, Any]]:
        """(avatar, {tag: make(avatar)}), all from the same loaded avatar: each `make` runs once per
        loaded avatar and tag (under the avatar's lock, so two first requests do not both make it); its
        result is kept with the avatar and unloaded with it."""
        return self._get(name, tenant, makes)

    def _get(self, name: str, tenant: str | None, makes: dict[Hashable, Callable[[Avatar], Any]] | None):
        tenant = clean_tenant(tenant)
        folder = avatar_dir(name, tenant, self.root)
        key = (tenant, clean_name(name))
        while True:
            with self._lock:
                slot = self._slots.get(key)
                if slot is None:
                    slot = self._slots[key] = _CacheSlot()
                self._slots.move_to_end(key)
            with slot.lock:
                with self._lock:
                    if self._slots.get(key) is not slot:  # evicted (or failed) while we waited: start again
                        continue
                try:
                    st = folder.stat()
                except OSError:
                    self._drop(key, slot)
                    return load_avatar(name, tenant=tenant, root=self.root), None  # raises AvatarNotFoundError
                stamp = (st.st_ino, st.st_mtime_ns)
                if slot.avatar is None or slot.stamp != stamp:
                    try:
                        avatar = load_avatar(name, tenant=tenant, root=self.root)
                    except BaseException:
                        if slot.avatar is None:  # keep no empty slot (e.g. for names that do not exist)
                            self._drop(key, slot)
                        raise
                    slot.stamp, slot.avatar, slot.nbytes, slot.derived = stamp, avatar, avatar.nbytes, {}
                if makes is None:
                    return slot.avatar, None
                for tag, make in makes.items():
                    if tag not in slot.derived:
                        slot.derived[tag] = make(slot.avatar)
                return slot.avatar, {tag: slot.derived[tag] for tag in makes}

    def evict(self, name: str, tenant: str | None = None) -> None:
        """Forget the avatar: the next `get` loads it again. Never waits for a load in progress (that
        load still hands its avatar to whoever asked for it, but the cache does not keep it)."""
        with self._lock:
            self._slots.pop((clean_tenant(tenant), clean_name(name)), None)

    def trim(self, keep: Collection[CacheKey] = ()) -> list[CacheKey]:
        """Unload the least recently used avatars while the loaded ones take more than `max_bytes`,
        except those in `keep` ((tenant, name): e.g. the avatars open sessions show, which would stay in
        memory anyway) and those loading now. Returns the keys unloaded."""
        dropped: list[CacheKey] = []
        if self.max_bytes is None:
            return dropped
        with self._lock:
            total = sum(slot.nbytes for slot in self._slots.values())
            for key, slot in list(self._slots.items()):
                if total <= self.max_bytes:
                    break
                if key in keep or not slot.lock.acquire(blocking=False):
                    continue
                try:
                    del self._slots[key]
                finally:
                    slot.lock.release()
                total -= slot.nbytes
                dropped.append(key)
        return dropped

    @property
    def loaded(self) -> list[CacheKey]:
        """(tenant, name) of the loaded avatars, least recently used first."""
        with self._lock:
            return [key for key, slot in self._slots.items() if slot.avatar is not None]

    @property
    def nbytes(self) -> int:
        """Memory of the loaded avatars (their `Avatar.nbytes`)."""
        with self._lock:
            return sum(slot.nbytes for slot in self._slots.values())

    def _drop(self, key: CacheKey, slot: _CacheSlot) -> None:
        with self._lock:
            if self._slots.get(key) is slot:
                del self._slots[key]
