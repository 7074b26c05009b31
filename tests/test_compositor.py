"""The compositor: an avatar's frames with faces pasted in, on the CPU (and CUDA when present)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from lipstream import synthetic
from lipstream.avatar.model import Avatar
from lipstream.imgproc import composite
from lipstream.stream.compositor import Compositor


@pytest.fixture(scope="module")
def scene_avatar(make_scene) -> tuple[Avatar, list]:
    scenes = [make_scene((360, 640), face_box=(250 + 4 * i, 80, 380 + 4 * i, 240), seed=i) for i in range(3)]
    return synthetic.scene_avatar(scenes, "t"), scenes


def test_compose_equals_imgproc_composite_per_frame_and_wraps_the_cycle(scene_avatar):
    avatar, scenes = scene_avatar
    comp = Compositor(avatar)
    faces = torch.from_numpy(np.stack([scenes[2].face, scenes[0].face]))
    out = comp.compose([5, 3], faces)  # cycle frames 2 and 0
    for got, scene in zip(out, [scenes[2], scenes[0]]):
        want = composite(scene.frame, scene.face, scene.face_box, scene.mask, scene.crop_box)
        assert np.array_equal(got, want)
    assert not np.array_equal(out[0], avatar.frames[2])
    assert np.array_equal(avatar.frames[2], scenes[2].frame), "the avatar's frames must stay untouched"


@pytest.mark.parametrize("indices", [[0, 1, 2], [2, 1, 0], [1], [0, 2, 1], [1, 1], [2, 3]])
def test_compose_reads_consecutive_frames_in_place_and_others_as_copies(scene_avatar, indices):
    """Runs of cycle frames (forward, backward, one frame) are read without a gather; any order gives
    the same frames as compositing each alone, and the avatar's frames stay untouched."""
    avatar, scenes = scene_avatar
    before = avatar.frames.copy()
    cycle = [i % 3 for i in indices]
    faces = torch.from_numpy(np.stack([scenes[i].face for i in cycle]))
    out = Compositor(avatar).compose(indices, faces)
    assert out.shape == (len(indices), 360, 640, 3) and not np.shares_memory(out, avatar.frames)
    for got, i in zip(out, cycle):
        s = scenes[i]
        assert np.array_equal(got, composite(s.frame, s.face, s.face_box, s.mask, s.crop_box))
    assert np.array_equal(avatar.frames, before)


def test_idle_is_a_copy_of_the_avatar_frames(scene_avatar):
    avatar, _ = scene_avatar
    idle = Compositor(avatar).idle([1, 4])
    assert np.array_equal(idle, avatar.frames[[1, 1]])
    idle[:] = 0
    assert avatar.frames[1].any()


def test_frame_is_a_read_only_view_of_the_cycle_frame(scene_avatar):
    avatar, _ = scene_avatar
    view = Compositor(avatar).frame(4)  # cycle frame 1
    assert np.shares_memory(view, avatar.frames) and np.array_equal(view, avatar.frames[1])
    with pytest.raises(ValueError, match="read-only"):
        view[0, 0] = 0
    assert avatar.frames.flags.writeable


def test_compose_rejects_wrong_faces(scene_avatar):
    with pytest.raises(ValueError, match="faces must be uint8"):
        Compositor(scene_avatar[0]).compose([0], torch.zeros(2, 256, 256, 3, dtype=torch.uint8))


def test_patches_are_16_aligned_cover_the_changed_area_and_paste_into_the_frame(scene_avatar):
    """A patch is the only part of a composited frame that differs from the avatar's own frame: at a
    16-aligned origin, with at least 8 unchanged pixels around the change, one size for all frames."""
    avatar, scenes = scene_avatar
    comp = Compositor(avatar)
    faces = torch.from_numpy(np.stack([s.face for s in scenes]))
    patches = comp.patches([0, 1, 2], faces)
    assert patches.shape == (3, *comp.patch_size, 3) and comp.patch_size[0] % 16 == comp.patch_size[1] % 16 == 0
    for i, scene in enumerate(scenes):
        patch = comp.patch(i, patches[i])
        assert patch.x % 16 == 0 and patch.y % 16 == 0
        whole = composite(scene.frame, scene.face, scene.face_box, scene.mask, scene.crop_box)
        assert np.array_equal(patch.paste(comp.frame(i)), whole)
        changed = np.argwhere((whole != scene.frame).any(axis=2))
        (y1, x1), (y2, x2) = changed.min(0), changed.max(0)
        h, w = patch.pixels.shape[:2]
        assert patch.y + 8 <= y1 and y2 < patch.y + h - 8 and patch.x + 8 <= x1 and x2 < patch.x + w - 8


@pytest.mark.parametrize("sharpen", [True, False])
def test_the_torch_backend_gives_the_opencv_pixels(scene_avatar, sharpen):
    """The GPU's compositing (one computation for a batch of patches), run here on the CPU: the same
    pixels as OpenCV's, also for a mirrored cycle and at a scaled size."""
    avatar, scenes = scene_avatar
    faces = torch.from_numpy(np.stack([s.face for s in scenes]))
    for size in (None, (180, 320)):
        cv = Compositor(avatar, sharpen=sharpen, size=size)
        tensors = Compositor(avatar, sharpen=sharpen, size=size, backend="torch")
        got = tensors.patches([2, 0, 1, 5], torch.cat([faces[[2, 0, 1]], faces[2:]]))
        assert isinstance(got, torch.Tensor) and got.dtype == torch.uint8
        assert np.array_equal(got.numpy(), cv.patches([2, 0, 1, 5], torch.cat([faces[[2, 0, 1]], faces[2:]])))
        data = tensors.tensors()
        assert data.masks.dtype == data.under.dtype == torch.uint8, "uint8 masks and frames"
        assert data.under.shape == (3, *cv.patch_size, 3), "only the patches of the frames are resident"


def test_a_scaled_compositor_composites_at_the_streamed_size(scene_avatar):
    """Frames, boxes and masks scaled once; each face resized straight to its scaled box: close to
    compositing at full size and scaling the result, at a quarter of the pixels."""
    avatar, scenes = scene_avatar
    faces = torch.from_numpy(np.stack([s.face for s in scenes]))
    scaled = Compositor(avatar, size=(180, 320))
    assert scaled.frame_size == (180, 320) and scaled.frame(1).shape == (180, 320, 3)
    small = scaled.compose([0, 1, 2], faces)
    full = Compositor(avatar).compose([0, 1, 2], faces)
    reference = np.stack([cv2.resize(f, (320, 180), interpolation=cv2.INTER_AREA) for f in full])
    assert np.abs(small.astype(int) - reference.astype(int)).mean() < 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_compositor_matches_cpu(scene_avatar):
    """On a GPU the patches are computed there (uint8 data resident, one computation per batch) and
    come out as the CPU's."""
    avatar, scenes = scene_avatar
    faces = torch.from_numpy(np.stack([s.face for s in scenes]))
    cpu = Compositor(avatar).patches([0, 1, 2], faces)
    cuda = Compositor(avatar, "cuda")
    gpu = cuda.patches([0, 1, 2], faces.cuda())
    assert gpu.device.type == "cuda" and cuda.tensors().under.device.type == "cuda"
    diff = np.abs(gpu.cpu().numpy().astype(int) - cpu.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.001


def test_a_mirrored_cycle_keeps_only_its_first_half(scene_avatar):
    """Forward+reversed (MuseTalk's cycle): the compositor keeps half the frames and gives the same output."""
    avatar, scenes = scene_avatar
    order = [0, 1, 2, 2, 1, 0]
    cycle = Avatar("c", "", None, frames=avatar.frames[order], face_boxes=avatar.face_boxes[order],
                   crop_boxes=avatar.crop_boxes[order], masks=[avatar.masks[i] for i in order],
                   crops=avatar.crops[order])
    comp = Compositor(cycle)
    assert cycle.mirrored_slots == comp.slot == [0, 1, 2, 2, 1, 0] and len(comp.frames) == 3 and len(comp) == 6
    faces = torch.from_numpy(np.stack([scenes[i].face for i in (1, 2, 0)]))
    assert np.array_equal(comp.compose([4, 3, 11], faces), Compositor(avatar).compose([1, 2, 0], faces))
    assert np.array_equal(comp.idle([5, 6]), avatar.frames[[0, 0]])
    assert np.array_equal(comp.frame(9), avatar.frames[2])
    changed = cycle.frames.copy()
    changed[4, 0, 0] += 1  # no longer a mirror: every frame is kept
    other = Avatar("d", "", None, frames=changed, face_boxes=cycle.face_boxes, crop_boxes=cycle.crop_boxes,
                   masks=cycle.masks, crops=cycle.crops)
    assert Compositor(other).slot == list(range(6))
