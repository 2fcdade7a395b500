#!/usr/bin/env bash
# Run the main job on the embedded default (SQLite file in var/): Redis, migrations, demo
# actions, then beat + a worker + Flower (on 127.0.0.1:5555) under honcho. Ctrl-C stops all.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${VENV:-.venv}/bin
export PATH="$PWD/$BIN:$PATH"
mkdir -p var
# The demo keeps its SQLite database in var/ (var/gathering.db), not in the user's data dir.
export GATHERING_HOME=${GATHERING_HOME:-$PWD/var}

scripts/ensure-services.sh --redis-only
REDIS_PORT=${REDIS_PORT:-6379}
export GATHERING_REDIS_URL=${GATHERING_REDIS_URL:-redis://127.0.0.1:$REDIS_PORT/0}
if ! redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; then
  echo "starting Redis on 127.0.0.1:$REDIS_PORT (data in var/)"
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$PWD/var" --daemonize yes \
    --pidfile "$PWD/var/redis.pid" --logfile "$PWD/var/redis.log" --save "" --appendonly no
  for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
fi

# The demo pipeline calls a sink on 127.0.0.1: open loopback for the demo only.
export GATHERING_HTTP_ALLOW_NETWORKS=${GATHERING_HTTP_ALLOW_NETWORKS:-127.0.0.1/32}
export DEMO_HOOK_KEY=${DEMO_HOOK_KEY:-demo-signing-key-not-for-production}
export GATHERING_SECRET_ENV_ALLOW=${GATHERING_SECRET_ENV_ALLOW:-DEMO_HOOK_*}
gathering-tasks db upgrade
gathering-tasks demo seed
echo "Flower: http://127.0.0.1:${FLOWER_PORT:-5555}   (Ctrl-C stops everything)"
exec honcho start -f Procfile worker beat flower sink
