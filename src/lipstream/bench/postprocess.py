"""`lipstream bench postprocess`: the per-frame resize -> unsharp -> blend, MuseTalk-original style
against lipstream on NumPy, on torch CPU tensors and (when present) on CUDA, in one run.

Timings are medians in ms per frame. CPU paths take one frame at a time, writing a new frame (as
the original does) and, for the NumPy pipeline, also in place; a single NumPy frame copies its
unchanged pixels on a second core while the face is processed. The NumPy and torch paths also run a
batch of 16 frames (each with its own, slightly moved face box, as a real avatar's boxes are) and
report the time per frame. On CUDA, "frame on GPU" keeps frames, faces and masks resident and
composites in place; "with copies" adds the host->device upload of the frames and the download of
the results (pinned memory). The compositor rows are what a live session runs: the face patches
only (`stream.compositor`: OpenCV on the CPU; on CUDA the patch-sized parts of the frames resident,
one computation per batch), and on CUDA with their asynchronous copy to pinned host memory. GPU times
come from CUDA events."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lipstream.bench import FRAME_SIZES
from lipstream.bench.report import device_name, format_table, interleaved_median_ms, median_ms, write_results

if TYPE_CHECKING:
    import torch

    from lipstream.synthetic import Scene

BATCH = 16
TARGET_CPU_SPEEDUP = 20.0
TARGET_GPU_MS_PER_FRAME = 0.1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reps", type=int, default=30, help="timed repetitions per measurement (default 30)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for OpenCV and torch (default: all)")
    parser.add_argument("--sizes", nargs="+", choices=sorted(FRAME_SIZES), default=list(FRAME_SIZES))
    parser.add_argument("--no-cuda", action="store_true", help="skip the CUDA measurements even if a GPU is present")
    parser.add_argument("--out-dir", default=None, help="where to write the JSON (default bench/results)")


def _batch(frame_hw: tuple[int, int], face_box: tuple[int, int, int, int], photo: np.ndarray) -> list[Scene]:
    """BATCH scenes whose face boxes wander by a few pixels, as detected boxes do frame to frame."""
    from lipstream.synthetic import make_scene

    rng = np.random.default_rng(7)
    scenes = []
    for i in range(BATCH):
        dx, dy, dw, dh = (int(v) for v in rng.integers(-6, 7, 4))
        x1, y1, x2, y2 = face_box
        scenes.append(make_scene(frame_hw, (x1 + dx, y1 + dy, x2 + dx + dw, y2 + dy + dh), seed=i, photo=photo))
    return scenes


def _cpu_rows(name: str, s: Scene, reps: int) -> list[dict]:
    """original vs lipstream NumPy vs lipstream torch-CPU, one frame at a time."""
    import torch

    from lipstream import imgproc
    from lipstream.bench import original

    resized = original.resize(s.face, s.face_box)
    sharp = original.unsharp(resized)
    h, w = resized.shape[:2]
    out = np.empty_like(s.frame)
    t_frame, t_face, t_resized = (torch.from_numpy(a) for a in (s.frame, s.face, resized))
    t_out, t_mask = torch.empty_like(t_frame), torch.from_numpy(s.mask)
    t_sharp = torch.from_numpy(sharp)
    # per operation: the original, then lipstream's variants as (operation, impl, fn)
    ops = [
        (lambda: original.resize(s.face, s.face_box), [
            ("resize", "numpy", lambda: imgproc.resize(s.face, (h, w))),
            ("resize", "torch-cpu", lambda: imgproc.resize(t_face, (h, w)))]),
        (lambda: original.unsharp(resized), [
            ("unsharp", "numpy", lambda: imgproc.unsharp_mask(resized)),
            ("unsharp", "torch-cpu", lambda: imgproc.unsharp_mask(t_resized))]),
        (lambda: original.blend(s.frame, sharp, s.face_box, s.mask, s.crop_box), [
            ("blend", "numpy", lambda: imgproc.blend(s.frame, sharp, s.face_box, s.mask, s.crop_box, out=out)),
            ("blend", "torch-cpu",
             lambda: imgproc.blend(t_frame, t_sharp, s.face_box, t_mask, s.crop_box, out=t_out))]),
        (lambda: original.postprocess(s.frame, s.face, s.face_box, s.mask, s.crop_box), [
            ("pipeline", "numpy", lambda: imgproc.composite(s.frame, s.face, s.face_box, s.mask, s.crop_box, out=out)),
            # a caller that owns its frame (a decoded video frame, a buffer it fills anyway) composites in place
            ("pipeline, in place", "numpy",
             lambda: imgproc.composite(out, s.face, s.face_box, s.mask, s.crop_box, out=out)),
            ("pipeline", "torch-cpu",
             lambda: imgproc.composite(t_frame, t_face, s.face_box, t_mask, s.crop_box, out=t_out)),
            # the floor of any pipeline that writes a new frame: the copy alone (memory-bound)
            ("frame copy alone", "numpy", lambda: np.copyto(out, s.frame))]),
    ]
    rows = []
    for orig_fn, variants in ops:
        base, *times = interleaved_median_ms([orig_fn] + [fn for _, _, fn in variants], reps)
        rows += [{"size": name, "operation": op, "impl": impl, "batch": 1, "original_ms": base, "lipstream_ms": ms,
                  "speedup": base / ms} for (op, impl, _), ms in zip(variants, times)]
    return rows


def _numpy_batch_row(name: str, scenes: list[Scene], reps: int) -> dict:
    """The whole pipeline for a NumPy batch (frames composited in parallel, one thread per core), ms per frame,
    against the original on one frame timed in turn with it."""
    from lipstream import imgproc
    from lipstream.bench import original

    frames = np.stack([s.frame for s in scenes])
    faces = np.stack([s.face for s in scenes])
    work = np.empty_like(frames)
    args = ([s.face_box for s in scenes], [s.mask for s in scenes], [s.crop_box for s in scenes])
    s = scenes[0]
    base_ms, ms = interleaved_median_ms([lambda: original.postprocess(s.frame, s.face, s.face_box, s.mask, s.crop_box),
                                         lambda: imgproc.composite(frames, faces, *args, out=work)], reps)
    ms /= len(scenes)
    return {"size": name, "operation": "pipeline, a batch over all cores", "impl": "numpy", "batch": len(scenes),
            "original_ms": base_ms, "lipstream_ms": ms, "speedup": base_ms / ms}


def _torch_batch_rows(name: str, scenes: list[Scene], base_ms: float, device: torch.device, reps: int) -> list[dict]:
    """The whole pipeline for a batch of BATCH frames on `device`, ms per frame."""
    import torch

    from lipstream import imgproc

    frames_host = torch.from_numpy(np.stack([s.frame for s in scenes]))
    faces = torch.from_numpy(np.stack([s.face for s in scenes])).to(device)
    masks = [torch.from_numpy(s.mask).to(device) for s in scenes]
    face_boxes = [s.face_box for s in scenes]
    crop_boxes = [s.crop_box for s in scenes]
    frames = frames_host.to(device)
    work = frames.clone()

    def resident():
        imgproc.composite(frames, faces, face_boxes, masks, crop_boxes, out=work)

    variants = [("frame on device", resident)]
    if device.type == "cuda":
        pinned_in, pinned_out = frames_host.pin_memory(), torch.empty_like(frames_host).pin_memory()

        def with_copies():
            work.copy_(pinned_in, non_blocking=True)
            imgproc.composite(work, faces, face_boxes, masks, crop_boxes, out=work)
            pinned_out.copy_(work, non_blocking=True)

        variants.append(("with host<->device copies", with_copies))
    impl = "cuda" if device.type == "cuda" else "torch-cpu"
    rows = []
    for label, fn in variants:
        ms = median_ms(fn, reps, device=device) / len(scenes)
        rows.append({"size": name, "operation": f"pipeline, {label}", "impl": impl, "batch": len(scenes),
                     "original_ms": base_ms, "lipstream_ms": ms, "speedup": base_ms / ms})
    return rows


def _compositor_rows(name: str, scenes: list[Scene], base_ms: float, device: torch.device, reps: int) -> list[dict]:
    """The compositor's patches for a batch on `device`, ms per frame (on CUDA also with the copy to the host)."""
    import torch

    from lipstream.stream.compositor import Compositor
    from lipstream.stream.device import to_host
    from lipstream.synthetic import scene_avatar

    compositor = Compositor(scene_avatar(scenes, "bench"), device)
    faces = torch.from_numpy(np.stack([s.face for s in scenes])).to(device)
    indices = list(range(len(scenes)))
    variants = [("compositor patches", lambda: compositor.patches(indices, faces))]
    if device.type == "cuda":
        variants.append(("compositor patches + copy to the host", lambda: to_host(compositor.patches(indices, faces))))
    impl = {"cuda": "cuda"}.get(device.type, "numpy")
    rows = []
    for label, fn in variants:
        ms = median_ms(fn, reps, device=device) / len(scenes)
        rows.append({"size": name, "operation": label, "impl": impl, "batch": len(scenes), "original_ms": base_ms,
                     "lipstream_ms": ms, "speedup": base_ms / ms})
    return rows


def run(args: argparse.Namespace) -> int:
    import cv2
    import torch

    from lipstream.synthetic import astronaut_bgr, make_scene

    if args.threads:
        torch.set_num_threads(args.threads)
        cv2.setNumThreads(args.threads)
    photo = astronaut_bgr()
    use_cuda = torch.cuda.is_available() and not args.no_cuda
    rows: list[dict] = []
    for name in args.sizes:
        frame_hw, face_box = FRAME_SIZES[name]
        print(f"timing {name} ...", flush=True)
        rows += _cpu_rows(name, make_scene(frame_hw, face_box, photo=photo), args.reps)
        base = next(r["original_ms"] for r in rows if r["size"] == name and r["operation"] == "pipeline")
        scenes = _batch(frame_hw, face_box, photo)
        rows.append(_numpy_batch_row(name, scenes, max(3, args.reps // 5)))
        rows += _torch_batch_rows(name, scenes, base, torch.device("cpu"), max(3, args.reps // 5))
        rows += _compositor_rows(name, scenes, base, torch.device("cpu"), max(3, args.reps // 5))
        if use_cuda:
            rows += _torch_batch_rows(name, scenes, base, torch.device("cuda"), args.reps)
            rows += _torch_batch_rows(name, scenes[:1], base, torch.device("cuda"), args.reps)
            rows += _compositor_rows(name, scenes, base, torch.device("cuda"), args.reps)
            rows += _compositor_rows(name, scenes[:1], base, torch.device("cuda"), args.reps)

    table = [[f"{r['size']} {r['operation']} [{r['impl']}, batch {r['batch']}]", r["original_ms"], r["lipstream_ms"],
              f"{r['speedup']:.1f}x"] for r in rows]
    print(format_table(["Operation", "original (ms/frame)", "lipstream (ms/frame)", "speedup"], table))

    verdicts = []
    for r in rows:
        if r["operation"].startswith("pipeline") and r["impl"] == "numpy":
            ok = r["speedup"] >= TARGET_CPU_SPEEDUP
            verdicts.append(f"{r['size']} CPU {r['operation']}, batch {r['batch']}: {r['speedup']:.2f}x vs target "
                            f">= {TARGET_CPU_SPEEDUP:.0f}x: "
                            f"{'met' if ok else 'MISSED'}")
        if r["impl"] == "cuda" and r["batch"] == BATCH and r["operation"] in ("pipeline, frame on device",
                                                                              "compositor patches"):
            ok = r["lipstream_ms"] <= TARGET_GPU_MS_PER_FRAME
            verdicts.append(f"{r['size']} GPU batch {BATCH} {r['lipstream_ms']:.3f} ms/frame vs target "
                            f"<= {TARGET_GPU_MS_PER_FRAME} ms: {'met' if ok else 'MISSED'}")
    if not use_cuda:
        verdicts.append("no CUDA device: the GPU rows (d) were not measured")
    print("\n".join(verdicts))

    device = torch.device("cuda" if use_cuda else "cpu")
    settings = {"reps": args.reps, "threads": torch.get_num_threads(), "opencv_threads": cv2.getNumThreads(),
                "sizes": args.sizes, "batch": BATCH, "cuda": use_cuda, "cpu": device_name("cpu"),
                "opencv": cv2.__version__, "numpy": np.__version__}
    path = write_results("postprocess", device, settings, rows, Path(args.out_dir) if args.out_dir else None)
    print(f"results written to {path}")
    return 0
