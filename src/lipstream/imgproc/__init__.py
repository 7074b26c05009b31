"""Image post-processing of generated faces: resize, Gaussian blur, unsharp mask, blend, composite.

One contract for NumPy uint8 arrays (OpenCV code, the fast CPU path) and torch tensors on any device
(batched, float32 internally, the GPU path); see `lipstream.imgproc.api` for layouts, dtypes and the
device fallback."""

from lipstream.imgproc.api import RESIZE_MODES, Layout, blend, composite, gaussian_blur, resize, unsharp_mask
from lipstream.imgproc.boxes import Box, as_box, box_size

__all__ = ["RESIZE_MODES", "Box", "Layout", "as_box", "blend", "box_size", "composite", "gaussian_blur", "resize",
           "unsharp_mask"]
