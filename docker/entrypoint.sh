#!/usr/bin/env bash
# Container entry point: fetch MuseTalk's weights on first start unless present, then serve.
# Arguments are passed to `lipstream serve`. LIPSTREAM_DOWNLOAD_MODELS=0 skips the download.
# Without weights (download failed or skipped) the server runs the `warp` engine, unless
# LIPSTREAM_ENGINE=musetalk asks for MuseTalk explicitly: then it is an error.
set -euo pipefail
export LIPSTREAM_MODELS="${LIPSTREAM_MODELS:-/workspace/models}"
LIPSTREAM_BIN="${LIPSTREAM_BIN:-lipstream}"

if ! "$LIPSTREAM_BIN" models check >/dev/null 2>&1; then
  if [ "${LIPSTREAM_DOWNLOAD_MODELS:-1}" = 1 ]; then
    echo "lipstream: MuseTalk weights not in $LIPSTREAM_MODELS; downloading them (first start)"
    "$LIPSTREAM_BIN" models download || echo "lipstream: could not download the MuseTalk weights (see above)"
  fi
  if ! "$LIPSTREAM_BIN" models check >/dev/null 2>&1; then
    if [ "${LIPSTREAM_ENGINE:-auto}" = musetalk ]; then
      echo "lipstream: LIPSTREAM_ENGINE=musetalk needs the weights in $LIPSTREAM_MODELS; stopping" >&2
      exit 1
    fi
    echo "lipstream: no MuseTalk weights; serving with the warp engine"
  fi
fi
# exec: the server is PID 1's direct child and receives SIGTERM itself (it closes sessions cleanly).
exec "$LIPSTREAM_BIN" serve "$@"
