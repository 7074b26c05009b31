"""Public image functions: one contract, two implementations.

Inputs and outputs
  * NumPy arrays: uint8, `[H,W,C]` or `[B,H,W,C]` (channels last). Processed by OpenCV uint8 code
    (`cv_ops`), the reference semantics and the fast CPU path.
  * torch tensors: uint8 or floating, `[H,W,C]`, `[B,H,W,C]` or `[B,C,H,W]`, on any device.
    Processed on their own device (`torch_ops`), in float32. Floating images hold values on the
    0..255 scale, like uint8 ones, and are neither rounded nor clamped; uint8 ones follow OpenCV's
    and PIL's uint8 arithmetic.
  * A 4-D tensor is `[B,H,W,C]` unless `layout="BCHW"` says otherwise: the layout is an argument,
    never a guess. A 3-D input is `[H,W,C]`.
  * Every function returns the kind, layout and dtype it was given.

Device failures: when a torch call fails on its device (out of memory, driver error), it is run
again on the CPU, the first failure of each operation is logged, every one is counted in the
`lipstream_imgproc_device_fallbacks_total` metric, and the result goes back to the caller's device
(or stays on the CPU if the device cannot take it)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

import numpy as np
import torch

from lipstream.imgproc import cv_ops, torch_ops
from lipstream.imgproc.boxes import Box, as_box, box_size
from lipstream.imgproc.kernels import resolve_kernel
from lipstream.metrics import IMGPROC_DEVICE_FALLBACKS

log = logging.getLogger(__name__)

Layout = Literal["HWC", "BHWC", "BCHW"]
Image = TypeVar("Image", np.ndarray, torch.Tensor)
RESIZE_MODES = ("bilinear", "nearest")

_DEVICE_ERROR_MARKERS = ("CUDA", "cuDNN", "CUBLAS", "cuFFT", "NCCL", "device-side", "HIP", "XPU", "MPS")
_logged_fallbacks: set[str] = set()


# ---------------------------------------------------------------------------------------------------------
# layouts
# ---------------------------------------------------------------------------------------------------------
def _layout_of(img: object, layout: Layout | None, name: str = "img") -> Layout:
    """Validate kind/dtype/rank and return the layout, inferring only what is unambiguous."""
    if isinstance(img, np.ndarray):
        if img.dtype != np.uint8:
            raise TypeError(f"{name}: NumPy images must be uint8, got {img.dtype}; use a torch tensor for float images")
        allowed: tuple[str, ...] = ("HWC", "BHWC")
    elif isinstance(img, torch.Tensor):
        if img.dtype != torch.uint8 and not img.dtype.is_floating_point:
            raise TypeError(f"{name}: tensors must be uint8 or floating point, got {img.dtype}")
        allowed = ("HWC", "BHWC", "BCHW")
    else:
        raise TypeError(f"{name}: expected a NumPy array or a torch tensor, got {type(img).__name__}")
    if layout is None:
        layout = {3: "HWC", 4: "BHWC"}.get(img.ndim)
        if layout is None:
            raise ValueError(f"{name}: expected [H,W,C] or [B,H,W,C], got shape {tuple(img.shape)}")
    if layout not in allowed:
        raise ValueError(f"{name}: layout {layout!r} is not supported for {type(img).__name__}; use one of {allowed}")
    if img.ndim != len(layout):
        raise ValueError(f"{name}: layout {layout} needs {len(layout)} dimensions, got shape {tuple(img.shape)}")
    return layout


def _to_bhwc(img: Image, layout: Layout) -> Image:
    """A [B,H,W,C] view of the image."""
    if layout == "HWC":
        return img[None]
    if layout == "BCHW":
        return img.permute(0, 2, 3, 1)
    return img


def _from_bhwc(img: Image, layout: Layout) -> Image:
    if layout == "HWC":
        return img[0]
    if layout == "BCHW":
        return img.permute(0, 3, 1, 2).contiguous()
    return img


def _float(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32)


# ---------------------------------------------------------------------------------------------------------
# device fallback
# ---------------------------------------------------------------------------------------------------------
def _is_device_failure(error: BaseException) -> bool:
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(marker in str(error) for marker in _DEVICE_ERROR_MARKERS)


def _to_device(value: Any, device: torch.device | str) -> Any:
    """Move the tensors in a (possibly nested) result to `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


def _with_cpu_fallback(op: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Return `fn(*args)`; if the device fails, run it again on CPU copies and move the result back.

    `fn` must not modify its arguments, so that a failed first attempt leaves nothing half-done."""
    try:
        return fn(*args)
    except Exception as error:
        if not _is_device_failure(error):
            raise
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        IMGPROC_DEVICE_FALLBACKS.labels(op=op).inc()
        if op not in _logged_fallbacks:
            _logged_fallbacks.add(op)
            log.warning("imgproc.%s failed on %s (%s); running it on the CPU instead (logged once, counted always)",
                        op, device, str(error).splitlines()[0])
        result = fn(*_to_device(list(args), "cpu"))
    try:
        return _to_device(result, device)
    except Exception as error:  # noqa: BLE001 - the device is unusable: the CPU result is still correct
        log.warning("imgproc.%s: could not move the result back to %s (%s); returning it on the CPU", op, device, error)
        return result


def _run_torch(op: str, img: torch.Tensor, layout: Layout, compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Apply `compute` (float [B,H,W,C] -> float [B,h,w,C]) with layout/dtype handling and CPU fallback."""

    def run(x: torch.Tensor) -> torch.Tensor:
        return _from_bhwc(compute(_float(_to_bhwc(x, layout))).to(x.dtype), layout)

    return _with_cpu_fallback(op, run, img)


def _run_numpy(img: np.ndarray, layout: Layout, compute: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Apply `compute` (uint8 [H,W,C] -> uint8 [h,w,C]) to each image."""
    if layout == "HWC":
        return compute(np.ascontiguousarray(img))
    return np.stack([compute(np.ascontiguousarray(frame)) for frame in img])


# ---------------------------------------------------------------------------------------------------------
# single-image operations
# ---------------------------------------------------------------------------------------------------------
def resize(img: Image, size: tuple[int, int], *, mode: str = "bilinear", layout: Layout | None = None) -> Image:
    """Resize to `size = (height, width)` with OpenCV semantics.

    mode "bilinear" is cv2.INTER_LINEAR (half-pixel centres, no antialias; torch path within 1 LSB of
    OpenCV for uint8), "nearest" is cv2.INTER_NEAREST."""
    layout = _layout_of(img, layout)
    if mode not in RESIZE_MODES:
        raise ValueError(f"mode must be one of {RESIZE_MODES}, got {mode!r}")
    height, width = (int(v) for v in size)
    if height < 1 or width < 1:
        raise ValueError(f"size must be (height, width) with both >= 1, got {tuple(size)}")
    if isinstance(img, np.ndarray):
        return _run_numpy(img, layout, lambda x: cv_ops.resize(x, (height, width), mode))
    integer = img.dtype == torch.uint8
    return _run_torch("resize", img, layout, lambda x: torch_ops.resize(x, (height, width), mode, integer=integer))


def gaussian_blur(img: Image, sigma: float, *, ksize: int | None = None, layout: Layout | None = None) -> Image:
    """Gaussian blur with cv2.GaussianBlur semantics: BORDER_REFLECT_101, and when ksize is None the size
    OpenCV picks (7 taps at sigma 1 for uint8, 9 for float). uint8 results are OpenCV's bit for bit."""
    layout = _layout_of(img, layout)
    integer = img.dtype in (np.uint8, torch.uint8)
    ksize, sigma = resolve_kernel(sigma, ksize, integer=integer)
    if isinstance(img, np.ndarray):
        return _run_numpy(img, layout, lambda x: cv_ops.gaussian_blur(x, ksize, sigma))
    return _run_torch("gaussian_blur", img, layout, lambda x: torch_ops.gaussian_blur(x, ksize, sigma, integer=integer))


def unsharp_mask(img: Image, *, amount: float = 1.2, sigma: float = 1.0, threshold: float = 5.0,
                 layout: Layout | None = None) -> Image:
    """`img*(1+amount) - blur*amount`, except where |img - blur| < threshold, where the pixel keeps `img`.
    uint8 input saturates to uint8. The blur is `gaussian_blur(img, sigma)`."""
    layout = _layout_of(img, layout)
    integer = img.dtype in (np.uint8, torch.uint8)
    ksize, sigma = resolve_kernel(sigma, None, integer=integer)
    if isinstance(img, np.ndarray):
        return _run_numpy(img, layout, lambda x: cv_ops.unsharp_mask(x, ksize, sigma, amount, threshold))
    return _run_torch("unsharp_mask", img, layout,
                      lambda x: torch_ops.unsharp_mask(x, ksize, sigma, amount, threshold, integer=integer))


# ---------------------------------------------------------------------------------------------------------
# compositing
# ---------------------------------------------------------------------------------------------------------
def _per_frame_boxes(value: Any, count: int, what: str) -> list[Box]:
    """One box for every frame, or a sequence of `count` boxes."""
    if np.ndim(np.asarray(value, dtype=object)) == 1:
        return [as_box(value, what)] * count
    boxes = [as_box(b, f"{what}[{i}]") for i, b in enumerate(value)]
    if len(boxes) != count:
        raise ValueError(f"{what}: got {len(boxes)} boxes for {count} frames")
    return boxes


def _per_frame_masks(masks: Any, layout: Layout, count: int, crop_boxes: list[Box]) -> list[Any]:
    """Masks as a list of `count` 2-D arrays/tensors, each checked against its crop box.
    A single frame ([H,W,C]) takes one mask; a batch takes one for all or one per frame."""
    if layout == "HWC":
        items = [masks]
    elif isinstance(masks, (list, tuple)):
        items = list(masks)
    elif getattr(masks, "ndim", None) == 2:
        items = [masks] * count
    elif getattr(masks, "ndim", None) == 3:
        items = list(masks)
    else:
        raise ValueError(f"mask must be uint8 [h,w] (or one per frame), got {type(masks).__name__} "
                         f"of shape {getattr(masks, 'shape', None)}")
    if len(items) != count:
        raise ValueError(f"got {len(items)} masks for {count} frames")
    for i, (mask, crop) in enumerate(zip(items, crop_boxes)):
        if getattr(mask, "ndim", None) != 2:
            raise ValueError(f"mask[{i}] must be 2-D [h,w] grey (cv2.imread(path, cv2.IMREAD_GRAYSCALE)), "
                             f"got shape {tuple(getattr(mask, 'shape', ()))}")
        if tuple(mask.shape) != box_size(crop):
            raise ValueError(f"mask[{i}] is {tuple(mask.shape)} but its crop box {crop} is {box_size(crop)} (h, w)")
        if isinstance(mask, np.ndarray) and mask.dtype != np.uint8:
            raise TypeError(f"mask[{i}] must be uint8, got {mask.dtype}")
    return items


def _prepare_frames(frames: Image, faces: Image, layout: Layout | None, out: Image | None, *,
                    copy: bool = True) -> tuple[Layout, Image, Image]:
    """Check frames/faces/out agree; return (layout, frames as BHWC, the output to write into).
    copy=False leaves a new or distinct `out` unfilled: the caller copies the frames into it."""
    layout = _layout_of(frames, layout, "frame")
    if type(faces) is not type(frames):
        raise TypeError(f"face must be the same kind as frame ({type(frames).__name__}), got {type(faces).__name__}")
    _layout_of(faces, layout, "face")
    if layout != "HWC" and faces.shape[0] != frames.shape[0]:
        raise ValueError(f"got {faces.shape[0]} faces for {frames.shape[0]} frames")
    if out is None:
        if not copy:
            out = np.empty_like(frames) if isinstance(frames, np.ndarray) else torch.empty_like(frames)
        else:
            out = frames.copy() if isinstance(frames, np.ndarray) else frames.clone()
    else:
        if type(out) is not type(frames) or tuple(out.shape) != tuple(frames.shape) or out.dtype != frames.dtype:
            raise ValueError("out must be an array of the same kind, shape and dtype as frame")
        if out is not frames and copy:
            out[...] = frames
    return layout, _to_bhwc(frames, layout), out


def _boxes_for(layout: Layout, frames_bhwc: Image, face_boxes: Any, crop_boxes: Any) -> tuple[int, list[Box], list[Box]]:
    count = frames_bhwc.shape[0]
    if layout == "HWC":
        return count, [as_box(face_boxes, "face_box")], [as_box(crop_boxes, "crop_box")]
    return count, _per_frame_boxes(face_boxes, count, "face_box"), _per_frame_boxes(crop_boxes, count, "crop_box")


def _mask_tensor(mask: Any, device: torch.device) -> torch.Tensor:
    """A mask on `device`, as given (uint8 masks stay uint8: the blend converts only the part it uses)."""
    return torch.as_tensor(mask).to(device=device)


def blend(frame: Image, face: Image, face_box: Sequence[int], mask: Any, crop_box: Sequence[int], *,
          layout: Layout | None = None, out: Image | None = None) -> Image:
    """MuseTalk's get_image_blending, equal to PIL paste-with-mask bit for bit (uint8).

    frame: [H,W,C] or a batch; face: already at the face-box size, [fh,fw,C] (or a batch);
    face_box, crop_box: (x1, y1, x2, y2), or one per frame; the crop box may extend past the frame.
    mask: uint8 [ch,cw] sized to the crop box (or one per frame). The face is pasted at face_box inside
    the crop, and the crop is composited into the frame through the mask; only face box ∩ crop box ∩
    frame is touched. Returns a new frame, or writes into `out` (which may be `frame` itself)."""
    numpy = isinstance(frame, np.ndarray)
    layout, frames, result = _prepare_frames(frame, face, layout, out, copy=not numpy)
    count, face_boxes, crop_boxes = _boxes_for(layout, frames, face_box, crop_box)
    masks = _per_frame_masks(mask, layout, count, crop_boxes)
    faces = _to_bhwc(face, layout)
    for i, box in enumerate(face_boxes):
        if tuple(faces.shape[1:3]) != box_size(box):
            raise ValueError(f"face is {tuple(faces.shape[1:3])} (h, w) but face_box {box} is {box_size(box)}: "
                             "resize it to the box first, or use composite()")
    if numpy:
        _composite_numpy(frames, None if result is frame else _to_bhwc(result, layout), faces, face_boxes, masks,
                         crop_boxes, resize_face=False)
        return result

    integer = frame.dtype == torch.uint8

    def patches(src: torch.Tensor, src_faces: torch.Tensor) -> list[torch_ops.Patch]:
        src, src_faces = _to_bhwc(src, layout), _float(_to_bhwc(src_faces, layout))
        found = (torch_ops.blend_patch(src[b], src_faces[b], face_boxes[b], _mask_tensor(masks[b], src.device),
                                       crop_boxes[b], integer=integer) for b in range(count))
        return [(b, *p) for b, p in enumerate(found) if p is not None]

    return _apply_patches(result, layout, _with_cpu_fallback("blend", patches, frame, face))


def composite(frames: Image, faces: Image, face_boxes: Any, masks: Any, crop_boxes: Any, *, sharpen: bool = True,
              amount: float = 1.2, sigma: float = 1.0, threshold: float = 5.0, layout: Layout | None = None,
              out: Image | None = None) -> Image:
    """The per-frame post-processing of a batch: resize each face to its face box (bilinear), unsharp it
    (if `sharpen`), and blend it into its frame (see `blend`).

    frames: [B,H,W,C] (or one [H,W,C]); faces: [B,fh,fw,C], the model's faces, any size (256x256 for
    MuseTalk); face_boxes, crop_boxes: one (x1, y1, x2, y2) per frame; masks: one uint8 [ch,cw] per
    frame. On torch the resize and sharpening of the whole batch run as one computation, whatever
    the boxes. Returns new frames, or writes into `out` (which may be `frames` itself)."""
    numpy = isinstance(frames, np.ndarray)
    layout, frames_bhwc, result = _prepare_frames(frames, faces, layout, out, copy=not numpy)
    count, face_box_list, crop_box_list = _boxes_for(layout, frames_bhwc, face_boxes, crop_boxes)
    mask_list = _per_frame_masks(masks, layout, count, crop_box_list)
    integer = frames.dtype in (np.uint8, torch.uint8)
    sharpen_params = (resolve_kernel(sigma, None, integer=integer)[0], float(sigma), amount, threshold) if sharpen else None
    if numpy:
        _composite_numpy(frames_bhwc, None if result is frames else _to_bhwc(result, layout), _to_bhwc(faces, layout),
                         face_box_list, mask_list, crop_box_list, sharpen_params=sharpen_params)
        return result

    def patches(src: torch.Tensor, src_faces: torch.Tensor) -> list[torch_ops.Patch]:
        masks_on_device = [_mask_tensor(m, src.device) for m in mask_list]
        return torch_ops.composite_patches(_to_bhwc(src, layout), _float(_to_bhwc(src_faces, layout)), face_box_list,
                                           masks_on_device, crop_box_list, sharpen_params=sharpen_params,
                                           integer=integer)

    return _apply_patches(result, layout, _with_cpu_fallback("composite", patches, frames, faces))


def _composite_numpy(frames: np.ndarray, out: np.ndarray | None, faces: np.ndarray, face_boxes: list[Box],
                     masks: list[Any], crop_boxes: list[Box], **options: Any) -> None:
    """cv_ops.composite_frame for each [B,H,W,C] frame, in place (out None) or into the distinct frames
    `out`, which also receive the unchanged pixels. A batch spreads its frames over the cores; a single
    frame copies its unchanged pixels on another core while its face is processed."""

    def one(b: int, parallel_copy: bool = False) -> None:
        src = frames[b]
        cv_ops.composite_frame(src, src if out is None else out[b], np.ascontiguousarray(faces[b]), face_boxes[b],
                               masks[b], crop_boxes[b], parallel_copy=parallel_copy, **options)

    if len(frames) == 1:
        one(0, parallel_copy=cv_ops.CORES > 1)
    else:
        cv_ops.for_each_frame(one, len(frames))


def _apply_patches(result: torch.Tensor, layout: Layout, patches: list[torch_ops.Patch]) -> torch.Tensor:
    """Write computed face-box regions into the output frames (moved to the CPU if the patches could
    not go back to the device after a fallback)."""
    if patches and patches[0][2].device != result.device:
        result = result.cpu()
    target = _to_bhwc(result, layout)
    for b, slices, region in patches:
        target[b][slices].copy_(region)
    return result
