"""Avatars: preparation from real faces (astronaut, Grace Hopper) with MediaPipe, MuseTalk's on-disk
layout both ways, import of MuseTalk folders, names, errors and atomic writes."""

from __future__ import annotations

import glob
import json
import os
import pickle
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import av
import cv2
import numpy as np
import pytest
import torch

from lipstream.avatar import prepare as prepare_module
from lipstream.avatar import store as store_module
from lipstream.avatar.folder import read_folder
from lipstream.avatar.geometry import crop_box_for, crop_face, face_box, nearest_detected
from lipstream.avatar.landmarks import IBUG_68, LIPS_INNER, LIPS_OUTER, NOSE_TIP
from lipstream.avatar.layout import AVATARS_ENV, avatar_dir, avatars_root, clean_name, tenant_dir
from lipstream.avatar.masks import (
    PARSE_SIZE,
    blend_mask,
    face_region,
    feather_kernel_size,
    restrict_and_feather,
)
from lipstream.avatar.prepare import STAGES, prepare_avatar
from lipstream.avatar.source import FaceSource, open_source
from lipstream.avatar.store import AvatarCache, delete_avatar, import_avatar, list_avatars, load_avatar
from lipstream.cli import main
from lipstream.errors import (
    AvatarCorruptError,
    AvatarExistsError,
    AvatarNameError,
    AvatarNotFoundError,
    AvatarSourceNotFoundError,
    AvatarSourceTooLongError,
    AvatarSourceUnreadableError,
    MissingWeightsError,
    NoFaceError,
)
from lipstream.synthetic import write_face_video
from musetalk_tiny import write_tiny_musetalk

BLANK = (20, 21)  # frames of the test video without a face
VIDEO_HW = (480, 640)


@pytest.fixture(scope="module")
def grace_hopper_path() -> Path:
    from matplotlib import cbook

    return Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


@pytest.fixture(scope="module")
def video_path(tmp_path_factory, astronaut_bgr) -> Path:
    """2 s at 25 fps, 640x480, the astronaut swaying by +-6 px; frames 20 and 21 are blank grey."""
    return write_face_video(tmp_path_factory.mktemp("video") / "face.mp4", astronaut_bgr, VIDEO_HW,
                            seconds=2.0, blank=BLANK)


@pytest.fixture(scope="module")
def video_avatar(tmp_path_factory, video_path):
    root = tmp_path_factory.mktemp("avatars")
    return prepare_avatar("anna", video=video_path, root=root, latents=False, progress=False), root


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in tenant_dir(None, root).iterdir()) if tenant_dir(None, root).exists() else []


# --- names and layout ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, clean", [(" anna\r\n", "anna"), ("\tBob-2_x.v1 ", "Bob-2_x.v1"), ("a", "a")])
def test_names_are_stripped(raw, clean):
    assert clean_name(raw) == clean


@pytest.mark.parametrize("bad", ["", "  \r", ".", "..", ".hidden", "a/b", "../x", "a\\b", "a b", "név", "x" * 129,
                                 "/etc", "a\x00b"])
def test_bad_names_are_refused(bad):
    with pytest.raises(AvatarNameError, match="not allowed"):
        clean_name(bad)


def test_folder_rule(tmp_path, monkeypatch):
    assert avatar_dir("anna", None, tmp_path) == tmp_path / "v15" / "avatars" / "anna"  # MuseTalk's own layout
    assert avatar_dir("anna", " acme\r", tmp_path) == tmp_path / "acme" / "v15" / "avatars" / "anna"
    with pytest.raises(AvatarNameError, match="tenant key"):
        avatar_dir("anna", "../other", tmp_path)
    monkeypatch.setenv(AVATARS_ENV, str(tmp_path / "env-root"))
    assert avatars_root() == tmp_path / "env-root"
    monkeypatch.delenv(AVATARS_ENV)
    assert avatars_root() == Path("results")


def test_a_link_out_of_the_root_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    base = tenant_dir(None, tmp_path / "root")
    base.mkdir(parents=True)
    (base / "evil").symlink_to(outside)
    with pytest.raises(AvatarNameError, match="link out of"):
        avatar_dir("evil", None, tmp_path / "root")


# --- geometry --------------------------------------------------------------------------------------------------

def _ibug_landmarks(jaw_x=(50.7, 150.2), nose_y=100.9, chin_y=160.4) -> np.ndarray:
    points = np.full((478, 2), 100.0, np.float32)
    points[IBUG_68[0]] = (jaw_x[0], 90)
    points[IBUG_68[16]] = (jaw_x[1], 90)
    points[IBUG_68[29]] = (100, nose_y)
    points[IBUG_68[8]] = (100, chin_y)
    return points


def test_face_box_follows_musetalk_v15():
    # truncated to int like DWPose's int32 cast: nose 100, chin 160 -> top 100 - 60 = 40, bottom 160 + 10
    assert face_box(_ibug_landmarks(), (480, 640)) == (50, 40, 150, 170)
    assert face_box(_ibug_landmarks(), (165, 640)) == (50, 40, 150, 165)  # +10 px clamped to the frame
    assert face_box(_ibug_landmarks(nose_y=40, chin_y=120), (480, 640))[1] == 0  # top clamped at 0
    assert face_box(_ibug_landmarks(jaw_x=(-20, 80)), (480, 60)) == (0, 40, 60, 170)  # sides kept in the frame
    assert face_box(_ibug_landmarks(), (480, 40)) is None  # nothing of it inside the frame


def test_crop_box_feather_and_nearest_frame_rules():
    assert crop_box_for((100, 120, 300, 350)) == (28, 63, 372, 407)  # spec 2.7's example
    assert [feather_kernel_size(w) for w in (200, 330, 400)] == [21, 33, 41]
    assert nearest_detected([False, True, False, False, True, False]).tolist() == [1, 1, 1, 4, 4, 4]
    assert nearest_detected([True, False, True]).tolist() == [0, 0, 2]  # a tie goes to the earlier frame
    with pytest.raises(ValueError):
        nearest_detected([False, False])


def test_blend_mask_geometry_on_a_real_face(astronaut_bgr):
    from lipstream.avatar.landmarks import FaceMesh

    with FaceMesh() as mesh:
        points = mesh.detect(astronaut_bgr)
    box = face_box(points, astronaut_bgr.shape[:2])
    crop = crop_box_for(box)
    mask = blend_mask(points, box, crop)
    xs, ys, xe, ye = crop
    s, k = (xe - xs) // 2, feather_kernel_size(xe - xs)
    assert mask.shape == (ye - ys, xe - xs) and mask.dtype == np.uint8

    def at(index):
        x, y = points[index]
        return int(mask[int(y) - ys, int(x) - xs])

    assert all(at(i) == 255 for i in LIPS_INNER) and all(at(i) > 240 for i in LIPS_OUTER)  # mouth and lips in
    assert points[NOSE_TIP][1] > (box[1] + box[3]) // 2 and at(NOSE_TIP) < 128  # the nose, though low, out
    assert not mask[:s - k // 2].any()                         # nothing in the upper half but blur spill
    assert not mask[:, :box[0] - xs - k // 2].any() and not mask[:, box[2] - xs + k // 2 + 1:].any()
    # only the rows that reach the lower half are computed, and that is exact
    full = restrict_and_feather(face_region(points, crop).astype(np.uint8) * 255, box, crop)
    assert np.array_equal(mask, full)
    assert face_region(points, crop).shape == (PARSE_SIZE, PARSE_SIZE)


# --- preparation -----------------------------------------------------------------------------------------------

def test_prepare_from_a_photo(tmp_path, grace_hopper_path):
    avatar = prepare_avatar("grace", image=grace_hopper_path, root=tmp_path, models_root=tmp_path / "no-models",
                            progress=False)
    photo = cv2.imread(str(grace_hopper_path))
    assert len(avatar) == 2 and avatar.path == avatar_dir("grace", None, tmp_path)
    assert np.array_equal(avatar.frames[0], photo) and np.array_equal(avatar.frames[1], photo)
    box = tuple(avatar.face_boxes[0])
    lips = avatar.landmarks[0][list(LIPS_OUTER)]
    assert box[0] < lips[:, 0].min() and lips[:, 0].max() < box[2] and box[1] < lips[:, 1].min() < box[3]
    assert tuple(avatar.crop_boxes[0]) == crop_box_for(box)
    assert np.array_equal(avatar.crops[0], crop_face(photo, box))
    assert avatar.masks[0].shape == (avatar.crop_boxes[0][3] - avatar.crop_boxes[0][1],) * 2
    assert avatar.latents is None and not (avatar.path / "latents.pt").exists()  # no weights, no latents
    assert avatar.meta["source"]["kind"] == "image" and avatar.meta["faceless_frames"] == []


def test_prepare_from_a_video_keeps_indices_and_fills_faceless_frames(video_avatar):
    avatar, _ = video_avatar
    n = 50
    assert len(avatar) == 2 * n and avatar.frame_size == VIDEO_HW and avatar.fps == 25.0
    for i in range(n):  # the cycle: forward, then reversed
        assert np.array_equal(avatar.frames[2 * n - 1 - i], avatar.frames[i])
    assert avatar.frames[20].std() < 3  # the blank frame stays at its index
    assert avatar.meta["faceless_frames"] == [20, 21, 78, 79]
    for blank, nearest in ((20, 19), (21, 22)):
        assert np.array_equal(avatar.face_boxes[blank], avatar.face_boxes[nearest])
        assert np.array_equal(avatar.landmarks[blank], avatar.landmarks[nearest])
        assert np.array_equal(avatar.masks[blank], avatar.masks[nearest])
        assert np.array_equal(avatar.crops[blank], crop_face(avatar.frames[blank], tuple(avatar.face_boxes[blank])))
    # the box follows the head: the sway is +6 px at frame 12, -6 px at frame 37
    centre = (avatar.face_boxes[:, 0] + avatar.face_boxes[:, 2]) / 2
    assert 8 <= centre[12] - centre[37] <= 16


def test_stored_files_and_manifest(video_avatar):
    avatar, _ = video_avatar
    manifest = json.loads((avatar.path / "lipstream.json").read_text())
    assert manifest["cycle_frames"] == 100 and manifest["frame_size"] == list(VIDEO_HW)
    assert manifest["source"]["frames"] == 50 and manifest["fps"] == 25.0
    assert len([f for f in manifest["files"] if f.startswith("full_imgs/")]) == 100
    mirrored = avatar.path / "full_imgs" / "00000099.png"
    assert mirrored.read_bytes() == (avatar.path / "full_imgs" / "00000000.png").read_bytes()
    names = {p.name for p in avatar.path.iterdir()}
    assert names == {"full_imgs", "mask", "coords.pkl", "mask_coords.pkl", "avator_info.json", "landmarks.npy",
                     "lipstream.json"}
    assert json.loads((avatar.path / "avator_info.json").read_text()) == {
        "avatar_id": "anna", "video_path": manifest["source"]["path"], "bbox_shift": 0, "version": "v15"}


def _musetalk_load(folder: Path) -> dict:
    """What MuseTalk's realtime script does to load an avatar (spec 2.2)."""
    def images(sub):
        paths = glob.glob(os.path.join(folder, sub, "*.[jpJP][pnPN]*[gG]"))
        return [cv2.imread(p) for p in sorted(paths, key=lambda x: int(os.path.splitext(os.path.basename(x))[0]))]

    with open(folder / "coords.pkl", "rb") as f:
        coords = pickle.load(f)
    with open(folder / "mask_coords.pkl", "rb") as f:
        mask_coords = pickle.load(f)
    latents = torch.load(folder / "latents.pt") if (folder / "latents.pt").exists() else None
    return {"frames": images("full_imgs"), "masks": images("mask"), "coords": coords, "mask_coords": mask_coords,
            "latents": latents}


def test_musetalk_reads_our_layout(video_avatar):
    avatar, _ = video_avatar
    mt = _musetalk_load(avatar.path)
    assert len(mt["frames"]) == len(mt["masks"]) == len(mt["coords"]) == len(mt["mask_coords"]) == 100
    assert all(type(c) is tuple and all(type(v) is int for v in c) for c in mt["coords"])
    assert (0.0, 0.0, 0.0, 0.0) not in mt["coords"]  # no placeholders: MuseTalk's paste-back never sees one
    for i in (0, 20, 57):
        assert np.array_equal(mt["frames"][i], avatar.frames[i])
        x1, y1, x2, y2 = mt["coords"][i]
        xs, ys, xe, ye = mt["mask_coords"][i]
        assert mt["masks"][i].shape == (ye - ys, xe - xs, 3)  # MuseTalk reads masks as 3 equal channels
        assert np.array_equal(mt["masks"][i][:, :, 0], avatar.masks[i])
        assert xs <= x1 < x2 <= xe and ys <= y1 < y2 <= ye


def test_round_trip(video_avatar):
    avatar, root = video_avatar
    for ref in ("anna", " anna\r", avatar.path, str(avatar.path)):
        loaded = load_avatar(ref, root=root, verify=ref == "anna")
        assert loaded.name == "anna" and loaded.path == avatar.path
        for field in ("frames", "face_boxes", "crop_boxes", "crops", "landmarks"):
            assert np.array_equal(getattr(loaded, field), getattr(avatar, field)), field
        assert all(np.array_equal(a, b) for a, b in zip(loaded.masks, avatar.masks, strict=True))
        assert loaded.fps == avatar.fps and loaded.meta["faceless_frames"] == avatar.meta["faceless_frames"]
    assert [s.name for s in list_avatars(root=root)] == ["anna"]
    assert list_avatars("acme", root) == []


def test_display_rotation_is_applied(tmp_path, astronaut_bgr):
    upright = astronaut_bgr[:, :400].copy()
    path = tmp_path / "phone.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.height, stream.width = 400, 512  # stored on its side, displayed turned 90 degrees back
        stream.pix_fmt = "yuv420p"
        stream.set_display_rotation(90)
        container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(np.rot90(upright, -1)),
                                                               format="bgr24")))
        container.mux(stream.encode())
    (frame,) = open_source(video=path).frames()
    assert frame.shape == upright.shape and np.abs(frame.astype(int) - upright).mean() < 8


# --- latents ---------------------------------------------------------------------------------------------------

def test_latents_with_musetalk_weights(tmp_path, grace_hopper_path):
    from lipstream.models.latents import avatar_latents
    from lipstream.models.vae import load_vae

    models = tmp_path / "models"
    write_tiny_musetalk(models)
    reports = []
    avatar = prepare_avatar("grace", image=grace_hopper_path, root=tmp_path, models_root=models, device="cpu",
                            progress=lambda *report: reports.append(report))
    assert avatar.latents.shape == (2, 8, 32, 32) and avatar.latents.dtype == torch.float16
    # the progress goes through every stage, in order, each to its end
    assert list(dict.fromkeys(stage for stage, _, _ in reports)) == list(STAGES)
    for stage in STAGES:
        done, total = [(d, t) for s, d, t in reports if s == stage][-1]
        assert total and done == total, (stage, done, total)
    vae = load_vae(models / "sd-vae", torch.device("cpu"), torch.float32)
    expected = avatar_latents(vae, avatar.crops[:1], generator=torch.Generator().manual_seed(0)).half()
    assert torch.equal(avatar.latents[0], expected[0]) and torch.equal(avatar.latents[1], expected[0])
    stored = torch.load(avatar.path / "latents.pt")  # MuseTalk's format: a list of [1, 8, 32, 32]
    assert isinstance(stored, list) and len(stored) == 2 and stored[0].shape == (1, 8, 32, 32)
    assert torch.equal(load_avatar("grace", root=tmp_path).latents, avatar.latents)
    calls = []  # a server's jobs use its engine's VAE, on its device worker: the same latents

    def device_call(fn, *args):
        calls.append(threading.get_ident())
        with ThreadPoolExecutor(1) as worker:
            return worker.submit(fn, *args).result()

    again = prepare_avatar("again", image=grace_hopper_path, root=tmp_path, vae=vae, device_call=device_call,
                           progress=False)
    assert calls and torch.equal(again.latents, avatar.latents)
    with pytest.raises(MissingWeightsError):
        prepare_avatar("x", image=grace_hopper_path, root=tmp_path, latents=True, models_root=tmp_path / "none")


# --- import of MuseTalk folders --------------------------------------------------------------------------------

def _numpy1_pickle(obj: object) -> bytes:
    """pickle.dumps(obj, protocol=4) as Python 3.10 with numpy 1.x writes it (MuseTalk's pins): NumPy
    scalars are rebuilt through numpy.core.multiarray (numpy 2 says numpy._core)."""
    data = pickle.dumps(obj, protocol=4)
    old, new = b"\x16numpy._core.multiarray", b"\x15numpy.core.multiarray"  # length-prefixed names
    count = data.count(old)
    assert count and data[2] == pickle.FRAME[0]
    frame = int.from_bytes(data[3:11], "little") - count
    return data[:3] + frame.to_bytes(8, "little") + data[11:].replace(old, new)


def _musetalk_folder(folder: Path, photo: np.ndarray) -> list[np.ndarray]:
    """A MuseTalk v1.5 avatar folder as its realtime script leaves it: 6 source frames (the photo
    moved), source frame 2 without a face (placeholder box, junk mask), each file written separately,
    boxes as NumPy ints pickled by numpy 1.x, masks as 3-channel PNGs, 5 latents (one per face frame:
    latent j is filled with the source index of the j-th face frame)."""
    sources = [np.roll(photo, 4 * k, axis=1) for k in range(6)]
    sources[2] = np.full_like(photo, 90)
    cycle = list(range(6)) + list(range(5, -1, -1))
    boxes = [None if k == 2 else (np.int32(180 + 4 * k), np.int32(60), np.int32(270 + 4 * k), np.int32(190))
             for k in range(6)]
    (folder / "full_imgs").mkdir(parents=True)
    (folder / "mask").mkdir()
    coords, mask_coords = [], []
    for i, k in enumerate(cycle):
        cv2.imwrite(str(folder / "full_imgs" / f"{i:08d}.png"), sources[k])
        if boxes[k] is None:
            coords.append((0.0, 0.0, 0.0, 0.0))
            mask_coords.append([0, 0, 1, 1])
            cv2.imwrite(str(folder / "mask" / f"{i:08d}.png"), np.zeros((1, 1), np.uint8))
            continue
        coords.append(boxes[k])
        xs, ys, xe, ye = crop_box_for(tuple(int(v) for v in boxes[k]))
        mask_coords.append([xs, ys, xe, ye])
        mask = np.full((ye - ys, xe - xs), 40 * k, np.uint8)
        cv2.imwrite(str(folder / "mask" / f"{i:08d}.png"), cv2.merge([mask] * 3))
    (folder / "coords.pkl").write_bytes(_numpy1_pickle(coords))
    (folder / "mask_coords.pkl").write_bytes(pickle.dumps(mask_coords))
    latents = [torch.full((1, 8, 32, 32), float(k), dtype=torch.float16) for k in range(6) if boxes[k] is not None]
    torch.save(latents + latents[::-1], folder / "latents.pt")
    (folder / "avator_info.json").write_text(json.dumps({"avatar_id": "anna", "video_path": "x.mp4",
                                                         "bbox_shift": 5, "version": "v15"}))
    return [sources[k] for k in cycle]


def test_import_musetalk_folder(tmp_path, astronaut_bgr):
    folder = tmp_path / "results" / "v15" / "avatars" / "anna \r"  # a name that came from Windows
    frames = _musetalk_folder(folder, astronaut_bgr)
    root = tmp_path / "store"
    avatar = import_avatar(folder, root=root, progress=False)
    assert avatar.name == "anna" and avatar.path == avatar_dir("anna", None, root)
    assert len(avatar) == 12 and all(np.array_equal(a, b) for a, b in zip(avatar.frames, frames, strict=True))
    source_of = [0, 1, 2, 3, 4, 5, 5, 4, 3, 2, 1, 0]
    # the faceless frames (cycle 2 and 9) take the nearest face frame's box (cycle 1, resp. 8: source 1, 3)
    owner_source = [0, 1, 1, 3, 4, 5, 5, 4, 3, 3, 1, 0]
    for i, k in enumerate(owner_source):
        assert tuple(avatar.face_boxes[i]) == (180 + 4 * k, 60, 270 + 4 * k, 190)
        assert tuple(avatar.crop_boxes[i]) == crop_box_for(tuple(avatar.face_boxes[i]))
        assert avatar.masks[i].ndim == 2 and (avatar.masks[i] == 40 * k).all()  # grayscale, its own frame's
        assert (avatar.latents[i] == k).all(), i  # each frame its own face's latent: no drift
        assert np.array_equal(avatar.crops[i], crop_face(frames[i], tuple(avatar.face_boxes[i])))
    assert source_of[2] == 2 and avatar.meta["faceless_frames"] == [2, 9]
    assert avatar.landmarks is not None and avatar.landmarks.shape == (12, 478, 2)
    # stored in our layout: MuseTalk's scripts now see real boxes and one latent per frame
    mt = _musetalk_load(avatar.path)
    assert (0.0, 0.0, 0.0, 0.0) not in mt["coords"] and len(mt["latents"]) == 12
    reloaded = load_avatar("anna", root=root, verify=True)
    assert torch.equal(reloaded.latents, avatar.latents) and np.array_equal(reloaded.face_boxes, avatar.face_boxes)
    # the MuseTalk folder also loads as it is, by path
    assert np.array_equal(load_avatar(folder).face_boxes, avatar.face_boxes)
    with pytest.raises(AvatarExistsError):
        import_avatar(folder, root=root, progress=False)
    assert main(["avatars", "import", str(folder), "--name", "anna2", "--root", str(root), "--no-landmarks"]) == 0
    assert load_avatar("anna2", root=root).landmarks is None


def test_broken_musetalk_folders(tmp_path, astronaut_bgr):
    folder = tmp_path / "mt"
    _musetalk_folder(folder, astronaut_bgr)
    latents = torch.load(folder / "latents.pt")
    torch.save(latents[:-1], folder / "latents.pt")
    with pytest.raises(AvatarCorruptError, match="9 latents but 10 cycle frames"):
        read_folder(folder, "mt", "")
    evil = b"cos\nsystem\n(S'touch " + str(tmp_path / "pwned").encode() + b"'\ntR."
    (folder / "coords.pkl").write_bytes(evil)
    with pytest.raises(AvatarCorruptError, match="coords.pkl"):
        read_folder(folder, "mt", "")
    assert not (tmp_path / "pwned").exists()  # the pickle ran no code
    (folder / "coords.pkl").unlink()
    with pytest.raises(AvatarCorruptError, match="not a MuseTalk v1.5 avatar folder: coords.pkl missing"):
        read_folder(folder, "mt", "")


# --- errors and atomic writes ----------------------------------------------------------------------------------

def test_input_errors_name_the_file(tmp_path, video_path):
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((300, 300, 3), 120, np.uint8))
    with pytest.raises(NoFaceError, match=re.escape(str(blank))):
        prepare_avatar("x", image=blank, root=tmp_path, latents=False, progress=False)
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(AvatarSourceUnreadableError, match=re.escape(str(garbage))):
        prepare_avatar("x", video=garbage, root=tmp_path, latents=False, progress=False)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(blank.read_bytes()[:200])
    with pytest.raises(AvatarSourceUnreadableError, match=re.escape(str(truncated))):
        prepare_avatar("x", image=truncated, root=tmp_path, latents=False, progress=False)
    with pytest.raises(AvatarSourceNotFoundError, match="missing.mp4"):
        prepare_avatar("x", video=tmp_path / "missing.mp4", root=tmp_path, latents=False, progress=False)
    with pytest.raises(AvatarSourceTooLongError, match="longer than 1 s"):
        prepare_avatar("x", video=video_path, max_seconds=1, root=tmp_path, latents=False, progress=False)
    # a container that does not say how long it is: refused while decoding
    unknown_length = FaceSource(video_path, "video", None, 25.0, max_seconds=1.0, label=str(video_path))
    with pytest.raises(AvatarSourceTooLongError):
        list(unknown_length.frames())
    assert _leftovers(tmp_path) == []


def test_a_failed_prepare_leaves_nothing_and_keeps_the_old_avatar(tmp_path, grace_hopper_path, monkeypatch):
    first = prepare_avatar("grace", image=grace_hopper_path, root=tmp_path, latents=False, progress=False)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, "blend_mask", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_avatar("other", image=grace_hopper_path, root=tmp_path, latents=False, progress=False)
    with pytest.raises(KeyboardInterrupt):
        prepare_avatar("grace", image=grace_hopper_path, root=tmp_path, overwrite=True, latents=False,
                       progress=False)
    assert _leftovers(tmp_path) == ["grace"]
    assert load_avatar("grace", root=tmp_path, verify=True).meta["created"] == first.meta["created"]
    monkeypatch.undo()
    with pytest.raises(AvatarExistsError, match="--force"):
        prepare_avatar("grace", image=grace_hopper_path, root=tmp_path, latents=False, progress=False)


def test_corrupt_stored_files_are_named(tmp_path, grace_hopper_path):
    avatar = prepare_avatar("grace", image=grace_hopper_path, root=tmp_path, latents=False, progress=False)
    mask = avatar.path / "mask" / "00000001.png"
    mask.unlink()  # its hard link to frame 0's mask stays intact
    mask.write_bytes(b"not a png")
    with pytest.raises(AvatarCorruptError, match="mask/00000001.png"):
        load_avatar("grace", root=tmp_path)
    cv2.imwrite(str(mask), avatar.masks[1] // 2)  # decodes fine, but is not what was written
    load_avatar("grace", root=tmp_path)
    with pytest.raises(AvatarCorruptError, match="has changed since it was written"):
        load_avatar("grace", root=tmp_path, verify=True)
    with pytest.raises(AvatarNotFoundError, match="nobody"):
        load_avatar("nobody", root=tmp_path)
    with pytest.raises(AvatarNotFoundError):
        delete_avatar("nobody", root=tmp_path)


def test_cache_shares_until_replaced(tmp_path, grace_hopper_path):
    prepare_avatar("grace", image=grace_hopper_path, root=tmp_path, latents=False, progress=False)
    cache = AvatarCache(tmp_path)
    first = cache.get("grace")
    assert cache.get(" grace\r") is first
    prepare_avatar("grace", image=grace_hopper_path, root=tmp_path, overwrite=True, latents=False, progress=False)
    assert cache.get("grace") is not first
    delete_avatar("grace", root=tmp_path)
    with pytest.raises(AvatarNotFoundError):
        cache.get("grace")


def test_cache_never_waits_for_another_avatars_load(tmp_path, monkeypatch):
    """While one avatar loads (slowly: a fake loader held on an Event), getting another avatar from the
    cache and evicting either return at once; the slow load still hands its avatar to its caller."""
    for name in ("fast", "slow"):
        avatar_dir(name, "", tmp_path).mkdir(parents=True)
    loads: list[str] = []
    slow_started, release = threading.Event(), threading.Event()

    def fake_load(name, *, tenant=None, root=None, verify=False):
        loads.append(name)
        if name == "slow":
            slow_started.set()
            assert release.wait(30), "the slow load was never released"
        return SimpleNamespace(name=name, load=len(loads), nbytes=0)

    monkeypatch.setattr(store_module, "load_avatar", fake_load)
    cache = AvatarCache(tmp_path)
    fast = cache.get("fast")
    with ThreadPoolExecutor(2) as pool:
        try:
            slow = pool.submit(cache.get, "slow")
            assert slow_started.wait(10)
            began = time.monotonic()
            assert pool.submit(cache.get, "fast").result(timeout=5) is fast, "a cached avatar, without loading"
            pool.submit(cache.evict, "slow").result(timeout=5)
            pool.submit(cache.evict, "fast").result(timeout=5)
            assert time.monotonic() - began < 2
            assert not slow.done(), "the slow load is still going"
        finally:
            release.set()
        slow_avatar = slow.result(timeout=10)
    assert slow_avatar.name == "slow"
    assert cache.get("slow") is not slow_avatar, "evicted during its load: the next get loads it again"
    assert cache.get("fast") is not fast
    again = cache.get("slow")
    assert cache.get("slow") is again
    assert loads == ["fast", "slow", "slow", "fast"]


def test_cli(tmp_path, grace_hopper_path, capsys):
    root = ["--root", str(tmp_path)]
    assert main(["avatars", "prepare", "grace", "--image", str(grace_hopper_path), "--no-latents", *root]) == 0
    assert "prepared avatar 'grace'" in capsys.readouterr().out
    assert main(["avatars", "prepare", "g2", "--image", str(grace_hopper_path), "--tenant", "acme",
                 "--no-latents", *root]) == 0
    assert (tmp_path / "acme" / "v15" / "avatars" / "g2" / "lipstream.json").is_file()
    capsys.readouterr()
    assert main(["avatars", "list", *root]) == 0
    assert capsys.readouterr().out.startswith("grace\t2 frames\t512x600")
    assert main(["avatars", "show", "grace", "--verify", *root]) == 0
    out = capsys.readouterr().out
    assert "checksums:   ok" in out and "per cycle frame" in out
    assert main(["avatars", "delete", "grace", *root]) == 0
    capsys.readouterr()
    for argv in (["avatars", "show", "grace"], ["avatars", "prepare", "a/b", "--image", str(grace_hopper_path)],
                 ["avatars", "prepare", "x", "--video", str(tmp_path / "none.mp4")]):
        assert main([*argv, *root]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1
    with pytest.raises(SystemExit) as exc:
        main(["avatars", "prepare", "x", "--image", "a.png", "--video", "b.mp4"])
    assert exc.value.code == 2


def test_stale_build_folders_of_killed_runs_are_swept(tmp_path):
    """A killed write leaves `.tmp-*`/`.old-*`/`.del-*` folders: old builds are removed; an old copy is
    removed when its avatar exists, and put back when it is the only copy (killed between the two
    renames of an overwrite); deletions in progress are finished whatever their age; young builds
    (that may still be running) and avatars are kept."""
    from lipstream.avatar.store import STALE_BUILD_S, sweep_stale_builds

    made = {}
    for tenant in ("", "acme"):
        base = tenant_dir(tenant, tmp_path)
        for name in (".tmp-anna-1234abcd", ".old-anna-5678abcd", ".tmp-bob-00000000", "anna",
                     ".old-carl-9abcdef0", ".old-carl-0fedcba9", ".del-dora-11112222", ".old-eve-33334444"):
            (base / name).mkdir(parents=True)
            (base / name / "f.png").write_bytes(name.encode())
            made[tenant, name] = base / name
        old = time.time() - STALE_BUILD_S - 60
        for name in (".tmp-anna-1234abcd", ".old-anna-5678abcd", "anna", ".old-carl-9abcdef0"):
            os.utime(base / name, (old, old))
        older = old - 60  # carl's other old copy: the older of the two
        os.utime(base / ".old-carl-0fedcba9", (older, older))
    done = sweep_stale_builds(["", "acme", "nobody"], tmp_path)
    for tenant in ("", "acme"):
        base = tenant_dir(tenant, tmp_path)
        mine = {(what, path.name) for what, path in done if path.parent == base}
        assert mine == {("removed", ".tmp-anna-1234abcd"), ("removed", ".old-anna-5678abcd"),
                        ("restored", "carl"), ("removed", ".old-carl-0fedcba9"), ("removed", ".del-dora-11112222")}
        assert (base / "carl" / "f.png").read_bytes() == b".old-carl-9abcdef0", "the newest old copy is back"
        for kept in (".tmp-bob-00000000", "anna", ".old-eve-33334444"):
            assert made[tenant, kept].is_dir(), kept
        assert not (base / "dora").exists()


def _small_avatar(root: Path, name: str, tenant: str = "", size: tuple[int, int] = (96, 128)) -> Path:
    from lipstream.avatar.store import save_avatar
    from lipstream.synthetic import make_scene, scene_avatar

    scene = make_scene(size, (40, 20, 88, 76))
    return save_avatar(scene_avatar([scene], name), tenant=tenant, root=root)


def test_cache_unloads_the_least_recently_used_avatars_over_its_budget(tmp_path):
    for name in ("a", "b", "c"):
        _small_avatar(tmp_path, name)
    one = load_avatar("a", root=tmp_path).nbytes
    cache = AvatarCache(tmp_path, max_bytes=2 * one)
    first_a = cache.get("a")
    cache.get("b")
    assert cache.trim() == [] and cache.nbytes == 2 * one
    cache.get("a")  # a is used again: b is now the least recently used
    cache.get("c")
    assert cache.trim() == [("", "b")] and cache.loaded == [("", "a"), ("", "c")]
    assert cache.get("a") is first_a, "kept, not loaded again"
    cache.get("b")
    assert cache.trim(keep={("", "c")}) == [("", "a")], "an avatar in use is never unloaded"
    assert cache.nbytes == 2 * one
    unbounded = AvatarCache(tmp_path)
    for name in ("a", "b", "c"):
        unbounded.get(name)
    assert unbounded.trim() == [] and len(unbounded.loaded) == 3


def test_cache_makes_what_is_derived_from_an_avatar_once(tmp_path):
    """Two first requests at once: one loads the avatar and makes its derived value, the other waits
    for it; a value is made again only for a new tag or a replaced avatar, and goes with the avatar."""
    _small_avatar(tmp_path, "a")
    cache = AvatarCache(tmp_path)
    made = []

    def make(avatar):
        made.append(avatar)
        time.sleep(0.2)  # long enough for the other request to arrive meanwhile
        return object()

    with ThreadPoolExecutor(2) as pool:
        results = [(avatar, values["warp"]) for avatar, values in
                   pool.map(lambda _: cache.get_derived("a", "", {"warp": make}), range(2))]
    assert len(made) == 1 and results[0][1] is results[1][1] and results[0][0] is results[1][0]
    assert cache.get_derived("a", "", {"warp": make})[1]["warp"] is results[0][1]
    both = cache.get_derived("a", "", {"warp": make, "musetalk": make})[1]
    assert both["warp"] is results[0][1] and both["musetalk"] is not results[0][1] and len(made) == 2
    cache.evict("a")
    assert cache.get_derived("a", "", {"warp": make})[1]["warp"] is not results[0][1] and len(made) == 3
