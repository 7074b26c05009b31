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
"${PIP[@]}" -e ".[dev]"
"$VENV/bin/python" -c "import lipstream, torch, cv2; print('lipstream', lipstream.__version__, '| torch', torch.__version__, '| cuda', torch.cuda.is_available())"
