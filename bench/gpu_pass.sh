#!/usr/bin/env bash
# The GPU pass: every GPU figure lipstream reports, measured on one CUDA machine from a checkout, each
# benchmark writing its JSON to bench/results/ with the device's name (and, with OUT set, copying
# it and the pass's log there).
#
#   QUICK=1 bench/gpu_pass.sh     # the quick pass, one command, <= 7 minutes on an H100/H200
#   PART=1 bench/gpu_pass.sh      # the full pass in four commands of <= 9 minutes each: PART=1 .. 4
#   DRYRUN=1 bench/gpu_pass.sh    # the quick pass here, on the CPU: tiny networks, few repetitions, all
#                                 # the tests of the GPU test files, and the packages a bare GPU host lacks
#                                 # made unimportable (bench/dryrun): every command and import path checked
#
# What the host needs: its own python3 with torch (CUDA), transformers, numpy, OpenCV, scikit-image,
# safetensors, huggingface-hub, prometheus-client, pytest; no network. lipstream runs from the source
# (src/ on PYTHONPATH), and the few packages such a host lacks travel as wheels in .whl/ (about 9 MB:
# diffusers, pydantic and theirs), made beforehand on a machine with pip by `bench/gpu_wheels.sh`,
# i.e.
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl diffusers==0.42.1 importlib-metadata==10.2.0 pydantic==2.14.4 pydantic-core==2.50.5 \
#     annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
# They are installed into a temporary folder (never into the host's environment). The pass imports
# nothing of the server (no FastAPI, aiortc, PyAV) and no MediaPipe; the tests it runs are the
# `gpu`-marked ones of the modules that need no server stack.
#
# Steps of the quick pass (estimated on an H200: ~30 s of start-up and tests, ~3 min engine with
# one CUDA-graph compile, ~1 min serving, ~30 s post-processing):
#   1. GPU tests: CUDA compositing == CPU, fp16 engine == fp32 CPU, the device worker on CUDA
#   2. engine: full-size MuseTalk (random weights) fp16, eager at batch 1 8 16 32, CUDA graphs at the fastest
#   3. serving in-process at 720p 25 fps: 1 and 32 sessions, eager, each frame's patch JPEG encoded
#      as a WebSocket viewer's: drops, first-frame latency by stage, event-loop lag, encoding under load
#   4. post-processing at 720p: the compositor's patches, CUDA batch 1 and 16 (target <= 0.1 ms/frame)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null && [ "${DRYRUN:-0}" != 1 ]; then
  site=$(mktemp -d)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:$site"
fi
L=("$PY" -m lipstream.cli)
T0=$(date +%s)
step() { echo; echo "== $* ($(( $(date +%s) - T0 )) s)"; }
GPU_TESTS=(tests/test_compositor.py tests/test_engine_musetalk.py tests/test_imgproc.py tests/test_models.py
           tests/test_device_worker.py)

if [ "${DRYRUN:-0}" = 1 ]; then
  export PYTHONPATH="bench/dryrun:$PYTHONPATH" LIPSTREAM_BENCH_RESULTS=${LIPSTREAM_BENCH_RESULTS:-$(mktemp -d)}
  DEV=(--device cpu); TINY=(--tiny); ENGINE=(--dtypes fp32 --variants eager --batches 1 2 --at-best eager+channels_last
       --reps 2 --warmup 1); CLIENTS=(1 4); SECS=3; PP=(--reps 3 --no-cuda); TESTS=()  # every test of those files
  echo "dry run on the CPU: tiny networks; results go to $LIPSTREAM_BENCH_RESULTS"
else
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this pass needs a GPU')"
  DEV=(); TINY=(); ENGINE=(--dtypes fp16 --variants eager --batches 1 8 16 32 --at-best cudagraphs --reps 20 --warmup 3)
  CLIENTS=(1 32); SECS=10; PP=(--reps 30); TESTS=(-m "gpu and not slow")
fi
RESULTS=${LIPSTREAM_BENCH_RESULTS:-bench/results}
BEFORE=$(mktemp)
ls -1 "$RESULTS" > "$BEFORE" 2>/dev/null || true

quick() {
  step "GPU tests (no server stack)"
  "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}" "${GPU_TESTS[@]}"
  step "engine: MuseTalk UNet + VAE, random full-size weights, eager at each batch, CUDA graphs at the fastest"
  "${L[@]}" bench engine "${DEV[@]}" "${TINY[@]}" "${ENGINE[@]}"
  step "serving in-process, 720p 25 fps, MuseTalk (random weights), each frame's patch JPEG encoded"
  "${L[@]}" bench serve --transport inprocess --engine musetalk-random "${DEV[@]}" "${TINY[@]}" \
    --clients "${CLIENTS[@]}" --seconds "$SECS" --encode patches
  step "post-processing at 720p: the compositor's patches and the whole-frame pipeline, batch 1 and 16"
  "${L[@]}" bench postprocess --sizes 720p "${PP[@]}"
}

if [ "${DRYRUN:-0}" = 1 ] || [ "${QUICK:-0}" = 1 ]; then
  quick
elif [ -n "${PART:-}" ]; then
  case "$PART" in
  1)
    step "GPU tests, the slow ones too (CUDA graphs of the tiny networks)"
    "$PY" -m pytest -q -p no:cacheprovider -m gpu "${GPU_TESTS[@]}"
    step "engine: fp16 and bf16, eager and channels_last, batch 1-32 (no compilation)"
    "${L[@]}" bench engine --dtypes fp16 bf16 --variants eager eager+channels_last --batches 1 4 8 16 32 ;;
  2)
    step "engine: fp16 torch.compile and CUDA graphs at batch 8, 16 and 32 (one compile each)"
    "${L[@]}" bench engine --dtypes fp16 --variants compile cudagraphs --batches 8 16 32 ;;
  3)
    step "serving in-process with CUDA graphs (buckets 1-16 captured on the worker at start): 1, 16, 32 sessions"
    "${L[@]}" bench serve --transport inprocess --engine musetalk-random --compile reduce-overhead \
      --clients 1 16 32 --seconds 15 --encode patches ;;
  4)
    step "serving in-process, eager: 1, 4, 16, 32, 48 sessions, viewers' patch JPEGs, then whole JPEGs at 32"
    "${L[@]}" bench serve --transport inprocess --engine musetalk-random --clients 1 4 16 32 48 --seconds 15 \
      --encode patches
    "${L[@]}" bench serve --transport inprocess --engine musetalk-random --clients 32 --seconds 15 --encode jpeg
    step "post-processing at 720p and 1080p"
    "${L[@]}" bench postprocess --reps 100
    if "${L[@]}" models check >/dev/null 2>&1; then
      step "streaming vs offline features and faces with the real weights"
      "${L[@]}" bench audio-streaming --device cuda --dtype float16 --faces 16 --placements segment
    fi ;;
  *) echo "PART is 1, 2, 3 or 4" >&2; exit 2 ;;
  esac
else
  echo "say which: QUICK=1, PART=1..4 or DRYRUN=1 (see the header of $0)" >&2; exit 2
fi

step "done"
new=$(comm -13 "$BEFORE" <(ls -1 "$RESULTS" 2>/dev/null) || true)
echo "${new:-no new results in $RESULTS}"
if [ -n "${OUT:-}" ] && [ -n "$new" ]; then
  for f in $new; do cp "$RESULTS/$f" "$OUT/"; done
fi
