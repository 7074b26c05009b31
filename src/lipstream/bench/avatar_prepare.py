"""`lipstream bench avatar-prepare`: wall time of `prepare_avatar` on a synthetic face video, without
latents (decode, landmarks, boxes, masks, crops, PNG writing, manifest).

The video: scikit-image's astronaut scaled to the frame height, centred on grey, swaying by +-6 px,
H.264, 25 fps (`synthetic.write_face_video`). The target is a preparation faster than the video
plays (real-time factor < 1). On a shared machine compare the CPU seconds (all threads of the
process) as well as the wall time."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from lipstream.bench.report import format_table, write_results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=10.0, help="video length (default 10)")
    parser.add_argument("--height", type=int, default=720, help="frame height (default 720)")
    parser.add_argument("--width", type=int, default=1280, help="frame width (default 1280)")
    parser.add_argument("--reps", type=int, default=2, help="preparations timed (default 2)")
    parser.add_argument("--out-dir", default=None, help="where to write the JSON (default bench/results)")


def run(args: argparse.Namespace) -> int:
    from lipstream.avatar.prepare import prepare_avatar
    from lipstream.synthetic import astronaut_bgr, write_face_video

    fps = 25
    rows = []
    with tempfile.TemporaryDirectory(prefix="lipstream-bench-") as tmp:
        video = write_face_video(Path(tmp) / "face.mp4", astronaut_bgr(), (args.height, args.width),
                                 seconds=args.seconds, fps=fps)
        for rep in range(args.reps):
            t0, c0 = time.perf_counter(), time.process_time()
            avatar = prepare_avatar(f"bench{rep}", video=video, root=Path(tmp) / "avatars", latents=False,
                                    max_seconds=None, progress=False)
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
            frames = len(avatar) // 2
            rows.append({"rep": rep, "frames": frames, "seconds": seconds, "cpu_seconds": cpu,
                         "frames_per_s": frames / seconds, "realtime_factor": seconds / args.seconds})
            del avatar
    print(format_table(["rep", "frames", "prepare s", "CPU s (all threads)", "frames/s", "x video length"],
                       [[r["rep"], r["frames"], r["seconds"], r["cpu_seconds"], r["frames_per_s"],
                         r["realtime_factor"]] for r in rows]))
    settings = {"seconds": args.seconds, "frame_size": [args.height, args.width], "fps": fps, "latents": False}
    out = Path(args.out_dir) if args.out_dir else None
    print(f"wrote {write_results('avatar-prepare', 'cpu', settings, rows, out)}")
    return 0
