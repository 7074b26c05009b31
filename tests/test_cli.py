"""The `lipstream` command: it answers --help, --version and argument errors without importing the
heavy libraries (checked structurally, from what gets imported), and keeps the native log noise of
MediaPipe / TensorFlow Lite / absl off stderr unless -v asks for it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import cv2

from lipstream.synthetic import astronaut_bgr

LIPSTREAM = str(Path(sys.executable).parent / "lipstream")
HEAVY = ("torch", "mediapipe", "fastapi", "uvicorn", "aiortc", "transformers", "diffusers", "cv2", "av", "ray")


def imported_modules(*argv: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run `python -X importtime -m lipstream.cli *argv`; (the result, the top-level packages it imported)."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "lipstream.cli", *argv], capture_output=True,
                          text=True, timeout=120, check=False)
    names = re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*([\w.]+)$", done.stderr, re.MULTILINE)
    return done, {name.split(".")[0] for name in names}


def test_help_version_and_argument_errors_import_no_heavy_library():
    for argv, status in ((["--help"], 0), (["--version"], 0), (["render", "x"], 2), (["bench", "--help"], 0),
                         (["bench", "postprocess", "--reps", "x"], 2), (["serve", "--help"], 0),
                         (["avatars", "prepare", "--help"], 0), (["cluster", "--help"], 0),
                         (["cluster", "--replicas", "x"], 2)):
        done, modules = imported_modules(*argv)
        assert done.returncode == status, (argv, done.stdout, done.stderr[-2000:])
        assert modules, "importtime reported the imports"
        assert not modules & set(HEAVY), (argv, sorted(modules & set(HEAVY)))
    version, _ = imported_modules("--version")
    assert version.stdout.strip() == "lipstream 0.1.0"


def test_building_the_parser_in_process_keeps_heavy_libraries_unimported():
    code = ("import sys; from lipstream.cli import build_parser; build_parser(); "
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]"


def test_native_stderr_filter_drops_only_the_noise_lines():
    code = """
import os, sys
from lipstream.logs import NativeStderrFilter
f = NativeStderrFilter()
os.write(2, b"W0000 00:00:1796.2   15561 inference_feedback_manager.cc:114] Feedback manager...\\n")
os.write(2, b"progress 10%\\rprogress 20%INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\\n")
os.write(2, b"E0000 00:00:1.0   1 x.cc:1] a real error\\n")
for piece in (b"W0000 00:00:2.0   7 ", b"y.cc:2] a noise line", b" that comes in pieces", b"\\n"):
    os.write(2, piece)
os.write(2, b"INFO: a line of our own\\n")
print("from python", file=sys.stderr)
f.close()
print("after close", file=sys.stderr)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60, check=True)
    assert done.stderr == (b"progress 10%\rprogress 20%E0000 00:00:1.0   1 x.cc:1] a real error\n"
                           b"INFO: a line of our own\nfrom python\nafter close\n")


def test_mediapipe_noise_is_hidden_unless_verbose(tmp_path):
    photo = tmp_path / "astronaut.png"
    cv2.imwrite(str(photo), astronaut_bgr())
    quiet = subprocess.run([LIPSTREAM, "avatars", "prepare", "a", "--image", str(photo), "--root", str(tmp_path)],
                           capture_output=True, text=True, timeout=120, check=False)
    assert quiet.returncode == 0, quiet.stderr
    assert "prepared avatar 'a'" in quiet.stdout
    for noise in ("W0000", "XNNPACK", "absl::InitializeLog", "GetPrototype"):
        assert noise not in quiet.stderr, quiet.stderr
    for stage in ("frames", "faces", "saving"):
        assert f"a: {stage}: 100%" in quiet.stderr, quiet.stderr  # a bar for every stage, to its end
    verbose = subprocess.run([LIPSTREAM, "-v", "avatars", "prepare", "a", "--force", "--image", str(photo),
                              "--root", str(tmp_path)], capture_output=True, text=True, timeout=120, check=False)
    assert verbose.returncode == 0 and "W0000" in verbose.stderr, verbose.stderr
