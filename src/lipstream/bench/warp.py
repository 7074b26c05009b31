"""`lipstream bench warp`: the `warp` engine in real time on one CPU thread.

Per video frame, as a live session runs it: the mouth state of the frame's 40 ms of audio (the
streaming features), `generate` (the mouth warp of the 256x256 crop), and the composite into the
full frame (resize to the face box, unsharp, blend; `imgproc.composite` on NumPy). The audio is
`synthetic.speech`: harmonic syllables with pauses, so the mouth moves in most frames (a mouth at
rest costs almost nothing). The face and frame are the astronaut scene of
`bench postprocess` (same frame sizes and face boxes); the face's landmarks come from MediaPipe's
face mesh. Target: >= 25 frames/s at 720p on one thread."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from lipstream.bench import FRAME_SIZES
from lipstream.bench.report import device_name, format_table, write_results

TARGET_FPS = 25.0
FPS = 25


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", nargs="+", choices=sorted(FRAME_SIZES), default=["720p"],
                        help="frame sizes (default 720p)")
    parser.add_argument("--frames", type=int, default=500,
                        help="video frames to time per size, 25 a second (default 500)")
    parser.add_argument("--threads", type=int, default=1, help="torch and OpenCV threads (default 1)")
    parser.add_argument("--out-dir", default=None, help="where to write the JSON (default bench/results)")


def _run_size(name: str, frames: int, audio: np.ndarray) -> dict:
    import torch

    from lipstream import imgproc
    from lipstream.avatar.landmarks import FaceMesh
    from lipstream.engines.base import take
    from lipstream.engines.warp import WarpEngine, avatar_teeth
    from lipstream.synthetic import make_scene

    frame_hw, face_box = FRAME_SIZES[name]
    scene = make_scene(frame_hw, face_box)
    with FaceMesh() as mesh:
        landmarks = mesh.detect(scene.face)
    if landmarks is None:
        raise RuntimeError("the face mesh finds no face in the benchmark scene")
    engine = WarpEngine()
    teeth = avatar_teeth(scene.face[None], landmarks[None])
    material = {"crops": torch.from_numpy(scene.face[None]), "landmarks": torch.from_numpy(landmarks[None]),
                "teeth": torch.from_numpy(teeth[None])}
    stream = engine.feature_stream(FPS)
    chunk = 16000 // FPS
    out = scene.frame.copy()
    seconds = np.zeros(3)
    moving = 0
    for k in range(frames):
        t0 = time.perf_counter()
        states = stream.push(audio[k * chunk:(k + 1) * chunk])  # one frame late: the look-ahead
        t1 = time.perf_counter()
        faces = engine.generate(take(material, [0] * len(states)), states)  # one avatar frame
        t2 = time.perf_counter()
        for face in faces.numpy():
            out[:] = scene.frame  # the avatar's next frame
            imgproc.composite(out, face, scene.face_box, scene.mask, scene.crop_box, out=out)
        t3 = time.perf_counter()
        seconds += (t1 - t0, t2 - t1, t3 - t2)
        moving += int((states != 0).any(1).sum())
    ms = seconds * 1000 / frames
    return {"size": name, "frames": frames, "features_ms": ms[0], "generate_ms": ms[1], "composite_ms": ms[2],
            "total_ms": ms.sum(), "frames_per_s": 1000 / ms.sum(), "moving_fraction": moving / frames}


def run(args: argparse.Namespace) -> int:
    import cv2
    import torch

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    from lipstream.synthetic import speech

    audio = speech(args.frames / FPS + 1)
    rows = []
    for name in args.sizes:
        print(f"timing {name} ...", flush=True)
        rows.append(_run_size(name, args.frames, audio))
    print(format_table(["Size", "features (ms)", "generate (ms)", "composite (ms)", "total (ms)", "frames/s",
                        "mouth moving"],
                       [[r["size"], r["features_ms"], r["generate_ms"], r["composite_ms"], r["total_ms"],
                         r["frames_per_s"], f"{r['moving_fraction']:.0%}"] for r in rows]))
    for r in rows:
        verdict = "met" if r["frames_per_s"] >= TARGET_FPS else "MISSED"
        print(f"{r['size']}: {r['frames_per_s']:.0f} frames/s on {args.threads} thread(s) vs target "
              f">= {TARGET_FPS:.0f}: {verdict}")
    settings = {"frames": args.frames, "fps": FPS, "threads": args.threads,
                "opencv_threads": cv2.getNumThreads(), "sizes": args.sizes, "opencv": cv2.__version__,
                "numpy": np.__version__, "cpu": device_name("cpu")}
    path = write_results("warp", "cpu", settings, rows, Path(args.out_dir) if args.out_dir else None)
    print(f"results written to {path}")
    return 0
