#!/usr/bin/env bash
# Container entry point: check the workspace, keep one API key in it, fetch MuseTalk's weights on
# first start unless present, then serve. Arguments are passed to `lipstream serve`.
# - LIPSTREAM_WORKSPACE (default /workspace) must be writable by the container's user: a bind-mounted
#   folder of yours works when the container runs as its owner (docker run --user "$(id -u):$(id -g)").
# - With LIPSTREAM_API_KEYS unset, one key for the default tenant is made on the first start and kept
#   in $LIPSTREAM_WORKSPACE/api_key (mode 600), so it survives restarts; set LIPSTREAM_API_KEYS to
#   choose keys yourself (empty: a new key every start).
# - LIPSTREAM_DOWNLOAD_MODELS=0 skips the download. Without weights (download failed or skipped) the
#   server runs the `warp` engine, unless LIPSTREAM_ENGINE=musetalk asks for MuseTalk: then it stops.
set -euo pipefail
WORKSPACE="${LIPSTREAM_WORKSPACE:-/workspace}"
export LIPSTREAM_MODELS="${LIPSTREAM_MODELS:-$WORKSPACE/models}"
export LIPSTREAM_AVATARS="${LIPSTREAM_AVATARS:-$WORKSPACE/results}"
LIPSTREAM_BIN="${LIPSTREAM_BIN:-lipstream}"

if ! mkdir -p "$LIPSTREAM_MODELS" "$LIPSTREAM_AVATARS" 2>/dev/null || [ ! -w "$WORKSPACE" ]; then
  owner=$(stat -c %u "$WORKSPACE" 2>/dev/null || echo "?")
  echo "lipstream: cannot write to $WORKSPACE (owned by uid $owner; this container runs as uid $(id -u))." \
       "For a folder of yours mounted there, run the container as its owner: docker run --user" \
       "\"\$(id -u):\$(id -g)\" -v \"\$PWD/workspace:/workspace\" ...; or give it to uid $(id -u)." >&2
  exit 1
fi

if [ -z "${LIPSTREAM_API_KEYS+set}" ]; then
  KEY_FILE="$WORKSPACE/api_key"
  if [ ! -s "$KEY_FILE" ]; then
    (umask 077 && head -c 24 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n' > "$KEY_FILE")
    echo "lipstream: made an API key; it is kept in $KEY_FILE"
  fi
  KEY=$(cat "$KEY_FILE")
  export LIPSTREAM_API_KEYS="$KEY="
  echo "lipstream: API key from $KEY_FILE; the page: http://localhost:${LIPSTREAM_PORT:-2160}/?key=$KEY"
fi

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
