"""The compositor: an avatar's frames with faces pasted in, on the CPU (and CUDA when present)."""

from __future__ import annotations

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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_compositor_matches_cpu(scene_avatar):
    avatar, scenes = scene_avatar
    faces = torch.from_numpy(np.stack([s.face for s in scenes]))
    cpu = Compositor(avatar).compose([0, 1, 2], faces)
    gpu = Compositor(avatar, "cuda").compose([0, 1, 2], faces.cuda())
    assert gpu.device.type == "cuda"
    diff = np.abs(gpu.cpu().numpy().astype(int) - cpu.astype(int))
    assert diff.max() <= 7 and (diff > 1).mean() < 0.005


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
