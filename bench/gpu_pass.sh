#!/usr/bin/env bash
# The GPU performance pass: every GPU figure lipstream reports, measured in one go on a CUDA machine
# (after ./install.sh), each benchmark writing its JSON to bench/results/ with the device's name.
#   bench/gpu_pass.sh            # all of it (about 20-30 minutes on an H100)
#   QUICK=1 bench/gpu_pass.sh    # fewer repetitions, for a first look
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
L=("$PY" -m lipstream.cli)
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this pass needs a GPU')"
REPS=200; CLIENTS=(1 4 16 32); SECONDS_PER_RUN=20
if [ "${QUICK:-0}" = 1 ]; then REPS=30; CLIENTS=(1 16); SECONDS_PER_RUN=8; fi

echo "== GPU tests (CUDA paths against their CPU references)"
"$PY" -m pytest -q -m gpu
echo "== post-processing: original vs lipstream NumPy / torch CPU / CUDA batch 1 and 16 (target <= 0.1 ms/frame)"
"${L[@]}" bench postprocess --reps "$REPS"
echo "== MuseTalk UNet + VAE, random full-size weights: batch 1-32, fp16/bf16, eager/channels_last/compile/CUDA graphs"
"${L[@]}" bench engine
echo "== sessions on one GPU, 720p, 25 fps: in-process with full-size MuseTalk (random weights), then through the server (musetalk if its weights are installed, else warp)"
"${L[@]}" bench serve --engine musetalk-random --transport inprocess --clients "${CLIENTS[@]}" --seconds "$SECONDS_PER_RUN"
"${L[@]}" bench serve --engine musetalk-random --compile reduce-overhead --transport inprocess --clients "${CLIENTS[@]}" --seconds "$SECONDS_PER_RUN"
"${L[@]}" bench serve --engine auto --transport websocket --clients "${CLIENTS[@]}" --seconds "$SECONDS_PER_RUN"
if "${L[@]}" models check >/dev/null 2>&1; then
  echo "== streaming vs offline features and faces with the real weights"
  "${L[@]}" bench audio-streaming --device cuda --dtype float16 --faces 16 --placements segment
else
  echo "== skipped: audio-streaming with real weights (run \`lipstream models download\` first)"
fi
ls -1 bench/results/
