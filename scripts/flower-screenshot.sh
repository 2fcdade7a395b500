#!/usr/bin/env bash
# Take docs/images/flower-tasks.png: the demo stack (beat, a worker, Flower and the demo sink,
# as `make demo` runs them from the Procfile) on loopback, with its own Redis and a throwaway
# GATHERING_HOME, until Flower lists succeeded and failed demo tasks; then a headless Chromium
# screenshot of Flower's tasks page. Everything it started is stopped on exit, even on failure.
#
#   scripts/flower-screenshot.sh [OUTPUT.png]      (needs chromium and redis-server)
#
# Flower listens on 127.0.0.1 without basic auth, as in the demo; its JSON API, read here to
# know when to take the picture, is opened for loopback with FLOWER_UNAUTHENTICATED_API.
# No credential is made or printed.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=$(realpath -m "${VENV:-.venv}")/bin
export PATH="$BIN:$PATH"
# This checkout's code, also when the venv's package was installed from another one.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
OUTPUT=$(realpath -m "${1:-docs/images/flower-tasks.png}")
DEADLINE_S=${DEADLINE_S:-300}
WINDOW=${WINDOW:-1600,900}

CHROMIUM=$(command -v chromium || command -v chromium-browser || true)
[[ -n $CHROMIUM ]] || { echo "chromium is missing: apt-get install chromium" >&2; exit 1; }
command -v redis-server >/dev/null || { echo "redis-server is missing" >&2; exit 1; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/flower-screenshot.XXXXXX")
STACK_PID=""
REDIS_PID=""

# Every process below $1, found by parent pid.
descendants() {
  local child
  for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do
    echo "$child"
    descendants "$child"
  done
}

stop() {
  local code=$? pid tree=()
  trap - EXIT INT TERM
  for pid in $STACK_PID $REDIS_PID; do
    tree+=("$pid")
    mapfile -t -O "${#tree[@]}" tree < <(descendants "$pid")
  done
  # honcho passes SIGTERM on to beat, the worker, Flower and the sink, and waits for them.
  for pid in "${tree[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  local until=$((SECONDS + 20))
  for pid in "${tree[@]}"; do
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < until)); do sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  if ((code != 0)); then
    echo "failed; the last lines of the stack's log:" >&2
    tail -n 30 "$WORK/stack.log" >&2 2>/dev/null || true
  fi
  rm -rf "$WORK"
  exit "$code"
}
trap stop EXIT
trap 'exit 130' INT TERM

free_port() {
  python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Poll until "$@" succeeds, or fail with the message in $WAITING once DEADLINE_S has passed.
wait_for() {
  local until=$((SECONDS + DEADLINE_S))
  until "$@"; do
    if ((SECONDS >= until)); then
      echo "gave up after ${DEADLINE_S}s: $WAITING" >&2
      return 1
    fi
    sleep 1
  done
}

REDIS_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$WORK" --save "" \
  --appendonly no >"$WORK/redis.log" 2>&1 &
REDIS_PID=$!
WAITING="Redis on 127.0.0.1:$REDIS_PORT" wait_for redis-cli -p "$REDIS_PORT" ping >/dev/null

FLOWER_PORT=$(free_port)
export GATHERING_HOME=$WORK/home
export GATHERING_REDIS_URL=redis://127.0.0.1:$REDIS_PORT/0
GATHERING_DEMO_SINK_PORT=$(free_port)
export GATHERING_DEMO_SINK_PORT
export FLOWER_ADDRESS=127.0.0.1 FLOWER_PORT FLOWER_UNAUTHENTICATED_API=true
unset FLOWER_BASIC_AUTH FLOWER_AUTH
# What scripts/demo.sh sets: the demo pipeline calls its sink on loopback and signs a webhook.
export GATHERING_HTTP_ALLOW_NETWORKS=127.0.0.1/32
export DEMO_HOOK_KEY=demo-signing-key-not-for-production
export GATHERING_SECRET_ENV_ALLOW='DEMO_HOOK_*'
mkdir -p "$GATHERING_HOME"
gathering-tasks db upgrade >/dev/null
gathering-tasks demo seed >/dev/null

honcho start -f Procfile worker beat flower sink >"$WORK/stack.log" 2>&1 &
STACK_PID=$!
FLOWER=http://127.0.0.1:$FLOWER_PORT
echo "demo stack started; waiting for Flower ($FLOWER) to list succeeded and failed demo tasks"

# Flower's API lists a SUCCESS of demo-hello-every-5s and a FAILURE of demo-fail-every-30s.
demo_states_seen() {
  curl -fsS --max-time 5 "$FLOWER/api/tasks" 2>/dev/null | python -c '
import json, sys
try:
    tasks = json.load(sys.stdin).values()
except ValueError:  # Flower is not answering yet
    sys.exit(1)
seen = {(str(t.get("name")), t.get("state")) for t in tasks}
want = {("run_task demo-hello-every-5s", "SUCCESS"), ("run_task demo-fail-every-30s", "FAILURE")}
sys.exit(0 if want <= seen else 1)
'
}
WAITING="Flower listing a succeeded and a failed demo task" wait_for demo_states_seen

mkdir -p "$(dirname "$OUTPUT")"
rm -f "$OUTPUT"
# The tasks table is filled by the page's own requests: virtual time lets them finish.
"$CHROMIUM" --headless --no-sandbox --disable-gpu --hide-scrollbars --no-first-run \
  --user-data-dir="$WORK/chromium" --window-size="$WINDOW" --virtual-time-budget=15000 \
  --screenshot="$OUTPUT" "$FLOWER/tasks" >"$WORK/chromium.log" 2>&1 || {
  tail -n 20 "$WORK/chromium.log" >&2
  exit 1
}
[[ -s $OUTPUT ]] || { echo "chromium wrote no screenshot" >&2; exit 1; }
echo "wrote $OUTPUT"
