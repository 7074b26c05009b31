"""lipstream.imgproc against OpenCV and PIL (the MuseTalk originals), on both implementations."""

from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from prometheus_client import REGISTRY

from lipstream import imgproc
from lipstream.bench import original
from lipstream.imgproc import torch_ops

RNG = np.random.default_rng(1234)


def max_diff(a, b) -> int:
    return int(np.abs(np.asarray(a).astype(np.int32) - np.asarray(b).astype(np.int32)).max())


def as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


@pytest.fixture(scope="module")
def photo(astronaut_bgr) -> np.ndarray:
    return astronaut_bgr[40:296, 140:396].copy()  # 256x256 with the face


@pytest.fixture(scope="module")
def noise() -> np.ndarray:
    return RNG.integers(0, 256, (97, 131, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------------ resize
@pytest.mark.parametrize("size", [(360, 300), (200, 240), (256, 256), (31, 517)])
def test_resize_matches_opencv(photo, noise, size):
    for img in (photo, noise):
        ref = cv2.resize(img, size[::-1], interpolation=cv2.INTER_LINEAR)
        assert np.array_equal(imgproc.resize(img, size), ref)
        out = imgproc.resize(torch.from_numpy(img), size)
        assert out.dtype == torch.uint8 and tuple(out.shape) == (*size, 3)
        assert max_diff(out, ref) <= 1
        assert (as_numpy(out) != ref).mean() < 0.002  # OpenCV's fixed point, but for a few border values


def test_resize_float_matches_interpolate_half_pixel_no_antialias(photo):
    """Pins align_corners=False and antialias=False, downscale included (720p face boxes are < 256)."""
    x = torch.from_numpy(photo).float()
    for size in [(360, 300), (120, 90)]:
        ours = imgproc.resize(x, size)
        ref = F.interpolate(x.permute(2, 0, 1)[None], size, mode="bilinear", align_corners=False,
                            antialias=False)[0].permute(1, 2, 0)
        torch.testing.assert_close(ours, ref, atol=0.01, rtol=0)  # float32 rounding, not semantics
        wrong = F.interpolate(x.permute(2, 0, 1)[None], size, mode="bilinear", align_corners=True)[0].permute(1, 2, 0)
        assert (ours - wrong).abs().max() > 1


def test_resize_nearest_matches_opencv(noise):
    ref = cv2.resize(noise, (200, 40), interpolation=cv2.INTER_NEAREST)
    assert np.array_equal(imgproc.resize(noise, (40, 200), mode="nearest"), ref)
    assert np.array_equal(as_numpy(imgproc.resize(torch.from_numpy(noise), (40, 200), mode="nearest")), ref)


def test_resize_layouts_and_dtypes(photo):
    ref = cv2.resize(photo, (300, 360))
    hwc = torch.from_numpy(photo)
    bhwc = torch.stack([hwc, hwc.flip(0)])
    bchw = bhwc.permute(0, 3, 1, 2).contiguous()
    out = imgproc.resize(bhwc, (360, 300))
    assert tuple(out.shape) == (2, 360, 300, 3)
    assert max_diff(out[0], ref) <= 1
    out_chw = imgproc.resize(bchw, (360, 300), layout="BCHW")
    assert tuple(out_chw.shape) == (2, 3, 360, 300)
    assert torch.equal(out_chw.permute(0, 2, 3, 1), out)
    for dtype in (torch.float16, torch.float32, torch.float64):
        res = imgproc.resize(bhwc.to(dtype), (360, 300))
        assert res.dtype == dtype
        assert (res.float() - out.float()).abs().max() <= 1.0
    batch = np.stack([photo, photo[::-1]])
    out_np = imgproc.resize(batch, (360, 300))
    assert out_np.shape == (2, 360, 300, 3) and np.array_equal(out_np[0], ref)
    gray = photo[:, :, :1].copy()
    assert imgproc.resize(gray, (100, 80)).shape == (100, 80, 1)


# ------------------------------------------------------------------------------------------------ blur
@pytest.mark.parametrize("sigma", [0.5, 1.0, 1.5, 2.0, 3.0])
def test_gaussian_blur_bit_exact_with_opencv(photo, noise, sigma):
    for img in (photo, noise):
        ref = cv2.GaussianBlur(img, (0, 0), sigma)
        assert np.array_equal(imgproc.gaussian_blur(img, sigma), ref)
        assert np.array_equal(as_numpy(imgproc.gaussian_blur(torch.from_numpy(img), sigma)), ref)


@pytest.mark.parametrize("ksize", [3, 5, 7, 9, 11, 33])
def test_gaussian_blur_explicit_ksize_with_sigma_zero(noise, ksize):
    ref = cv2.GaussianBlur(noise, (ksize, ksize), 0)
    assert np.array_equal(imgproc.gaussian_blur(noise, 0, ksize=ksize), ref)
    assert np.array_equal(as_numpy(imgproc.gaussian_blur(torch.from_numpy(noise), 0, ksize=ksize)), ref)


def test_gaussian_blur_default_kernel_sizes(noise):
    """OpenCV picks 7 taps at sigma 1 for uint8 and 9 for float."""
    assert np.array_equal(imgproc.gaussian_blur(noise, 1.0), cv2.GaussianBlur(noise, (7, 7), 1.0))
    assert not np.array_equal(imgproc.gaussian_blur(noise, 1.0), cv2.GaussianBlur(noise, (5, 5), 1.0))
    f = noise.astype(np.float32)
    ref = cv2.GaussianBlur(f, (9, 9), 1.0, borderType=cv2.BORDER_REFLECT_101)
    out = as_numpy(imgproc.gaussian_blur(torch.from_numpy(f), 1.0))
    np.testing.assert_allclose(out, ref, atol=1e-3)


def test_gaussian_blur_border_is_reflect101(noise):
    out = as_numpy(imgproc.gaussian_blur(torch.from_numpy(noise), 2.0))
    replicate = cv2.GaussianBlur(noise, (0, 0), 2.0, borderType=cv2.BORDER_REPLICATE)
    assert np.array_equal(out, cv2.GaussianBlur(noise, (0, 0), 2.0))
    assert max_diff(out[:3], replicate[:3]) > 0


def test_gaussian_blur_tiny_image_larger_than_kernel_radius():
    img = RNG.integers(0, 256, (2, 3, 3), dtype=np.uint8)
    assert np.array_equal(as_numpy(imgproc.gaussian_blur(torch.from_numpy(img), 0, ksize=9)),
                          cv2.GaussianBlur(img, (9, 9), 0))


# ------------------------------------------------------------------------------------------------ unsharp
@pytest.mark.parametrize("threshold", [5.0, 5.5, 0.0])
def test_unsharp_bit_exact_with_original(photo, noise, threshold):
    for img in (photo, noise):
        ref = original.unsharp(img, threshold=threshold)
        assert np.array_equal(imgproc.unsharp_mask(img, threshold=threshold), ref)
        assert np.array_equal(as_numpy(imgproc.unsharp_mask(torch.from_numpy(img), threshold=threshold)), ref)


def test_unsharp_threshold_keeps_low_contrast_pixels():
    flat = np.full((20, 20, 3), 100, np.uint8)
    flat[10, 10] = 103  # |img - blur| < 5 everywhere: nothing changes
    assert np.array_equal(imgproc.unsharp_mask(flat), flat)
    flat[10, 10] = 160  # a strong spike is sharpened and saturates
    out = imgproc.unsharp_mask(flat, amount=5.0)
    assert out[10, 10, 0] == 255
    assert np.array_equal(as_numpy(imgproc.unsharp_mask(torch.from_numpy(flat), amount=5.0)), out)


def test_unsharp_float_follows_formula(photo):
    x = torch.from_numpy(photo).float()
    blur = imgproc.gaussian_blur(x, 1.0)
    expected = torch.where((x - blur).abs() < 5.0, x, x * 2.2 - blur * 1.2)
    out = imgproc.unsharp_mask(x)
    torch.testing.assert_close(out, expected)
    assert out.max() > 255 or out.min() < 0  # float results are not saturated


# ------------------------------------------------------------------------------------------------ blend
def _resized(scene):
    return original.resize(scene.face, scene.face_box)


def test_blend_bit_exact_with_pil(make_scene):
    scene = make_scene()
    face = _resized(scene)
    ref = original.blend(scene.frame, face, scene.face_box, scene.mask, scene.crop_box)
    out = imgproc.blend(scene.frame, face, scene.face_box, scene.mask, scene.crop_box)
    assert np.array_equal(out, ref)
    assert not np.array_equal(out, scene.frame)
    out_t = imgproc.blend(torch.from_numpy(scene.frame), torch.from_numpy(face), scene.face_box,
                          torch.from_numpy(scene.mask), scene.crop_box)
    assert np.array_equal(as_numpy(out_t), ref)


def test_blend_touches_only_the_face_box(make_scene):
    scene = make_scene()
    out = imgproc.blend(scene.frame, _resized(scene), scene.face_box, scene.mask, scene.crop_box)
    x1, y1, x2, y2 = scene.face_box
    changed = np.argwhere((out != scene.frame).any(-1))
    assert changed[:, 0].min() >= y1 and changed[:, 0].max() < y2
    assert changed[:, 1].min() >= x1 and changed[:, 1].max() < x2


@pytest.mark.parametrize("face_box", [
    (0, 0, 200, 240),          # at the top-left corner: crop box starts at negative coordinates
    (1080, 480, 1280, 720),    # at the bottom-right corner: crop box past the frame
    (-40, 300, 160, 560),      # face box partly outside the frame on the left
    (1150, -60, 1350, 200),    # partly outside on the right and the top
])
def test_blend_boxes_at_and_beyond_frame_edges(make_scene, face_box):
    scene = make_scene(face_box=face_box)
    face = _resized(scene)
    ref = original.blend(scene.frame, face, scene.face_box, scene.mask, scene.crop_box)
    assert np.array_equal(imgproc.blend(scene.frame, face, face_box, scene.mask, scene.crop_box), ref)
    out_t = imgproc.blend(torch.from_numpy(scene.frame), torch.from_numpy(face), face_box, scene.mask, scene.crop_box)
    assert np.array_equal(as_numpy(out_t), ref)


def test_blend_in_place_and_float(make_scene):
    scene = make_scene()
    face = _resized(scene)
    ref = original.blend(scene.frame, face, scene.face_box, scene.mask, scene.crop_box)
    frame = scene.frame.copy()
    returned = imgproc.blend(frame, face, scene.face_box, scene.mask, scene.crop_box, out=frame)
    assert returned is frame and np.array_equal(frame, ref)
    frame_f = torch.from_numpy(scene.frame).float()
    out_f = imgproc.blend(frame_f, torch.from_numpy(face).float(), scene.face_box, scene.mask, scene.crop_box)
    assert out_f.dtype == torch.float32
    assert (out_f - torch.from_numpy(np.ascontiguousarray(ref)).float()).abs().max() <= 0.5 + 1e-4  # unrounded PIL


def test_blend_batch_with_different_boxes_bchw(make_scene):
    scenes = [make_scene(face_box=(500, 150, 760, 470)), make_scene(face_box=(520, 160, 780, 480), seed=1)]
    faces = [_resized(s) for s in scenes]
    frames = torch.from_numpy(np.stack([s.frame for s in scenes])).permute(0, 3, 1, 2).contiguous()
    # same face size, different positions
    boxes = [s.face_box for s in scenes]
    out = imgproc.blend(frames, torch.from_numpy(np.stack(faces)).permute(0, 3, 1, 2), boxes,
                        [s.mask for s in scenes], [s.crop_box for s in scenes], layout="BCHW")
    assert tuple(out.shape) == tuple(frames.shape)
    for i, s in enumerate(scenes):
        ref = original.blend(s.frame, faces[i], s.face_box, s.mask, s.crop_box)
        assert np.array_equal(as_numpy(out[i].permute(1, 2, 0)), ref)


def test_blend_pixels_equals_pils_integer_rounding_for_every_input():
    """All 256^3 (face, frame, mask) triples: the OpenCV integer blend equals PIL's
    DIV255(face*m + frame*(255-m)), written into a view of a larger frame."""
    from lipstream.imgproc.cv_ops import blend_pixels

    face, frame, m = (v.astype(np.uint8).reshape(4096, 4096) for v in np.meshgrid(
        np.arange(256), np.arange(256), np.arange(256), indexing="ij"))
    t = face.astype(np.uint32) * m + frame.astype(np.uint32) * (255 - m.astype(np.uint32)) + 128
    expected = ((t + (t >> 8)) >> 8).astype(np.uint8)
    big = np.zeros((4100, 4100, 1), np.uint8)
    view = big[2:4098, 3:4099]
    view[..., 0] = frame
    blend_pixels(face[..., None], view, m, view)
    assert np.array_equal(view[..., 0], expected)
    assert not big[:2].any() and not big[:, :3].any(), "only the view is written"


# ------------------------------------------------------------------------------------------------ composite
def test_composite_numpy_bit_exact_with_original_1080p(make_scene):
    scene = make_scene(frame_hw=(1080, 1920), face_box=(760, 220, 1060, 580))
    ref = original.postprocess(scene.frame, scene.face, scene.face_box, scene.mask, scene.crop_box)
    out = imgproc.composite(scene.frame, scene.face, scene.face_box, scene.mask, scene.crop_box)
    assert np.array_equal(out, ref)


@pytest.mark.parametrize("band", [(0, 0, 0, 260), (200, 201, 0, 260), (0, 360, 0, 260), (350, 360, 0, 260),
                                  (5, 120, 0, 260), (5, 120, 0, 10), (100, 300, 250, 260), (0, 360, 130, 131),
                                  (40, 41, 2, 3)])
def test_numpy_bit_exact_when_the_mask_reaches_only_part_of_the_face_box(make_scene, band):
    """The NumPy path sharpens and blends only the rows and columns the mask reaches: any band must
    still give the original's result (including bands at the face box's edges, and none)."""
    scene = make_scene(frame_hw=(720, 1280), face_box=(500, 150, 760, 510))
    rng = np.random.default_rng(band[0])
    mask = np.zeros_like(scene.mask)
    top, left = 150 - scene.crop_box[1], 500 - scene.crop_box[0]
    rows, cols = slice(top + band[0], top + band[1]), slice(left + band[2], left + band[3])
    mask[rows, cols] = rng.integers(1, 256, mask[rows, cols].shape)
    ref = original.postprocess(scene.frame, scene.face, scene.face_box, mask, scene.crop_box)
    out = imgproc.composite(scene.frame, scene.face, scene.face_box, mask, scene.crop_box)
    assert np.array_equal(out, ref)
    if band[0] == band[1]:
        assert np.array_equal(out, scene.frame)
    face = cv2.resize(scene.face, (260, 360))
    blended = imgproc.blend(scene.frame, face, scene.face_box, mask, scene.crop_box)
    assert np.array_equal(blended, original.blend(scene.frame, face, scene.face_box, mask, scene.crop_box))


def test_composite_torch_within_contract_of_original(make_scene):
    """Resize is within 1 LSB of OpenCV; the unsharp gain (2.2) and threshold flips can amplify that.
    Contract: at most 7 LSB, on at most 0.5% of the face box's values; nothing outside it."""
    for face_box, frame_hw in [((760, 220, 1060, 580), (1080, 1920)), ((560, 200, 700, 380), (720, 1280))]:
        scene = make_scene(frame_hw=frame_hw, face_box=face_box)
        ref = original.postprocess(scene.frame, scene.face, scene.face_box, scene.mask, scene.crop_box)
        out = as_numpy(imgproc.composite(torch.from_numpy(scene.frame), torch.from_numpy(scene.face), scene.face_box,
                                         scene.mask, scene.crop_box))
        x1, y1, x2, y2 = face_box
        assert max_diff(out, ref) <= 7
        assert (out[y1:y2, x1:x2] != ref[y1:y2, x1:x2]).mean() <= 0.005
        assert np.array_equal(out[:y1], ref[:y1]) and np.array_equal(out[y2:], ref[y2:])


def test_composite_without_sharpen_is_musetalks_own_composition(make_scene):
    scene = make_scene()
    ref = original.musetalk_composition(scene.frame, scene.face, scene.face_box, scene.mask, scene.crop_box)
    assert np.array_equal(imgproc.composite(scene.frame, scene.face, scene.face_box, scene.mask, scene.crop_box,
                                            sharpen=False), ref)


def test_composite_batch_with_different_boxes_per_frame(make_scene):
    # different sizes and positions, at the frame's edges, and one wholly outside the frame
    boxes = [(500, 150, 760, 470), (0, 0, 180, 230), (1100, 520, 1280, 720), (600, 300, 611, 317),
             (1300, 100, 1420, 240)]
    scenes = [make_scene(face_box=b, seed=i) for i, b in enumerate(boxes)]
    frames = np.stack([s.frame for s in scenes])
    faces = np.stack([s.face for s in scenes])
    masks = [s.mask for s in scenes]
    crops = [s.crop_box for s in scenes]
    out_np = imgproc.composite(frames, faces, boxes, masks, crops)
    out_t = as_numpy(imgproc.composite(torch.from_numpy(frames), torch.from_numpy(faces), boxes, masks, crops))
    for i, s in enumerate(scenes):
        ref = original.postprocess(s.frame, s.face, s.face_box, s.mask, s.crop_box)
        assert np.array_equal(out_np[i], ref)
        assert max_diff(out_t[i], ref) <= 7
        # batching changes nothing: each frame equals its own single-frame call
        single = imgproc.composite(torch.from_numpy(s.frame), torch.from_numpy(s.face), s.face_box, s.mask, s.crop_box)
        assert np.array_equal(out_t[i], as_numpy(single))
    assert np.array_equal(out_np[4], frames[4]) and np.array_equal(out_t[4], frames[4])
    in_place = torch.from_numpy(frames.copy())
    assert imgproc.composite(in_place, torch.from_numpy(faces), boxes, masks, crops, out=in_place) is in_place
    assert np.array_equal(as_numpy(in_place), out_t)


def test_composite_out_buffer_and_bchw(make_scene):
    scene = make_scene()
    frames = torch.from_numpy(scene.frame).permute(2, 0, 1)[None].contiguous()
    faces = torch.from_numpy(scene.face).permute(2, 0, 1)[None].float()  # the model hands over float faces
    before = frames.clone()
    out = imgproc.composite(frames, faces, [scene.face_box], [scene.mask], [scene.crop_box], layout="BCHW",
                            out=frames)
    assert out is frames and not torch.equal(frames, before)
    ref = original.postprocess(scene.frame, scene.face, scene.face_box, scene.mask, scene.crop_box)
    assert max_diff(as_numpy(frames[0].permute(1, 2, 0)), ref) <= 7


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("box", [(10, 10, 10, 50), (10, 50, 40, 20), (0.0, 0.0, 0.0, 0.0), (1, 2, 3), (1.5, 2, 3, 4)])
def test_bad_face_boxes_raise_value_error(make_scene, box):
    scene = make_scene()
    with pytest.raises(ValueError, match="face_box"):
        imgproc.composite(scene.frame, scene.face, box, scene.mask, scene.crop_box)


def test_placeholder_box_message_names_the_cause(make_scene):
    scene = make_scene()
    with pytest.raises(ValueError, match="without a face"):
        imgproc.composite(scene.frame, scene.face, (0.0, 0.0, 0.0, 0.0), scene.mask, scene.crop_box)


def test_inverted_crop_box_raises(make_scene):
    scene = make_scene()
    with pytest.raises(ValueError, match="crop_box"):
        imgproc.blend(scene.frame, _resized(scene), scene.face_box, scene.mask, (100, 100, 50, 200))


def test_mismatched_shapes_raise(make_scene):
    scene = make_scene()
    face = _resized(scene)
    with pytest.raises(ValueError, match="resize it to the box first"):
        imgproc.blend(scene.frame, scene.face, scene.face_box, scene.mask, scene.crop_box)
    with pytest.raises(ValueError, match="crop box"):
        imgproc.blend(scene.frame, face, scene.face_box, scene.mask[1:], scene.crop_box)
    with pytest.raises(ValueError, match="IMREAD_GRAYSCALE"):
        imgproc.blend(scene.frame, face, scene.face_box, np.dstack([scene.mask] * 3), scene.crop_box)
    with pytest.raises(ValueError, match="2 masks for 1 frames"):
        imgproc.composite(scene.frame[None], scene.face[None], [scene.face_box], [scene.mask] * 2, [scene.crop_box])


def test_bad_images_raise():
    with pytest.raises(TypeError, match="uint8"):
        imgproc.resize(np.zeros((4, 4, 3), np.float32), (2, 2))
    with pytest.raises(ValueError, match="layout"):
        imgproc.resize(np.zeros((1, 3, 4, 4), np.uint8), (2, 2), layout="BCHW")
    with pytest.raises(ValueError, match="dimensions"):
        imgproc.resize(torch.zeros(3, 4, 4), (2, 2), layout="BCHW")
    with pytest.raises(ValueError, match="size"):
        imgproc.resize(np.zeros((4, 4, 3), np.uint8), (0, 2))
    with pytest.raises(ValueError, match="mode"):
        imgproc.resize(np.zeros((4, 4, 3), np.uint8), (2, 2), mode="bicubic")
    with pytest.raises(ValueError, match="ksize"):
        imgproc.gaussian_blur(np.zeros((4, 4, 3), np.uint8), 1.0, ksize=4)
    with pytest.raises(ValueError, match="sigma"):
        imgproc.gaussian_blur(np.zeros((4, 4, 3), np.uint8), 0.0)
    with pytest.raises(TypeError, match="same kind"):
        imgproc.blend(np.zeros((8, 8, 3), np.uint8), torch.zeros(2, 2, 3), (0, 0, 2, 2), np.zeros((2, 2), np.uint8),
                      (0, 0, 2, 2))


# ------------------------------------------------------------------------------------------------ fallback
def _fallback_count(op: str) -> float:
    return REGISTRY.get_sample_value("lipstream_imgproc_device_fallbacks_total", {"op": op}) or 0.0


def test_device_failure_falls_back_to_cpu_logs_once_and_counts(make_scene, monkeypatch, caplog):
    scene = make_scene()
    real = torch_ops.composite_patches
    calls = {"n": 0}

    def failing_first_time(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] % 2 == 1:  # every device attempt fails; the CPU retry succeeds
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch_ops, "composite_patches", failing_first_time)
    before = _fallback_count("composite")
    frames = torch.from_numpy(scene.frame)
    args = (torch.from_numpy(scene.face), scene.face_box, scene.mask, scene.crop_box)
    with caplog.at_level(logging.WARNING, logger="lipstream.imgproc.api"):
        out1 = imgproc.composite(frames, *args)
        out2 = imgproc.composite(frames, *args)
    monkeypatch.setattr(torch_ops, "composite_patches", real)
    expected = imgproc.composite(frames, *args)
    assert torch.equal(out1, expected) and torch.equal(out2, expected)
    assert _fallback_count("composite") == before + 2
    assert len([r for r in caplog.records if "running it on the CPU" in r.message]) <= 1
    assert calls["n"] == 4


def test_non_device_errors_are_not_swallowed(make_scene, monkeypatch):
    scene = make_scene()

    def broken(*args, **kwargs):
        raise RuntimeError("shape mismatch in a bug of ours")

    monkeypatch.setattr(torch_ops, "composite_patches", broken)
    with pytest.raises(RuntimeError, match="bug of ours"):
        imgproc.composite(torch.from_numpy(scene.frame), torch.from_numpy(scene.face), scene.face_box, scene.mask,
                          scene.crop_box)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(make_scene):
    scene = make_scene(frame_hw=(1080, 1920), face_box=(760, 220, 1060, 580))
    args = (scene.face_box, scene.mask, scene.crop_box)
    cpu = imgproc.composite(torch.from_numpy(scene.frame), torch.from_numpy(scene.face), *args)
    gpu = imgproc.composite(torch.from_numpy(scene.frame).cuda(), torch.from_numpy(scene.face).cuda(), *args)
    assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu)


def test_numpy_batch_runs_in_parallel_and_equals_single_frames(make_scene):
    """A NumPy batch is composited frame by frame on a thread pool: a new output, a given one, or in place."""
    scenes = [make_scene((360, 640), face_box=(250 + 5 * i, 80, 380 + 5 * i, 240), seed=i) for i in range(5)]
    frames = np.stack([s.frame for s in scenes])
    faces = np.stack([s.face for s in scenes])
    args = ([s.face_box for s in scenes], [s.mask for s in scenes], [s.crop_box for s in scenes])
    expected = np.stack([imgproc.composite(s.frame, s.face, s.face_box, s.mask, s.crop_box) for s in scenes])
    assert np.array_equal(imgproc.composite(frames, faces, *args), expected)
    assert np.array_equal(frames, np.stack([s.frame for s in scenes])), "the input frames stay untouched"
    out = np.zeros_like(frames)
    assert imgproc.composite(frames, faces, *args, out=out) is out and np.array_equal(out, expected)
    assert imgproc.composite(frames, faces, *args, out=frames) is frames and np.array_equal(frames, expected)
