#!/usr/bin/env bash
# Coordinator load bench: for each N, starts a fresh spotrain-coordinator (1 Hz heartbeats,
# heartbeat_timeout_ms 5000) and runs spotrain-coordinator-load against it: coordinator CPU
# (% of one core) and RSS while N Sessions heartbeat, then one silent death (detection time and
# time until the new Plan reached every survivor). Prints one table; never run by ctest.
#
#   BUILD=build bench/coordinator_load.sh            # N = 100 1000 5000
#   NS="100 500" STEADY=10 bench/coordinator_load.sh
set -euo pipefail
BUILD=${BUILD:-build}
NS=${NS:-"100 1000 5000"}
STEADY=${STEADY:-20}
COORDINATOR=$BUILD/bin/spotrain-coordinator
LOAD=$BUILD/bin/spotrain-coordinator-load
for bin in "$COORDINATOR" "$LOAD"; do
  [[ -x $bin ]] || { echo "missing $bin (build the targets spotrain-coordinator and" \
    "spotrain-coordinator-load; bench/ must be added to the top-level CMakeLists.txt)" >&2; exit 2; }
done
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
work=$(mktemp -d)
cpid=""
cleanup() { [[ -n $cpid ]] && kill "$cpid" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
export SPOTRAIN_TOKEN="bench-token-$$"
cat > "$work/run.json" <<JSON
{"model": "gpt-tiny", "data": {"train": "d/train_*.bin", "val": "d/val_*.bin"},
 "steps": 1000000, "global_batch": 8, "micro_batch": 2, "max_workers": 10000,
 "heartbeat_ms": 1000, "heartbeat_timeout_ms": 5000, "join_settle_ms": 1000}
JSON
echo "# $(date -u +%Y-%m-%dT%H:%M:%SZ) $(nproc) cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "# heartbeat 1 Hz, heartbeat_timeout_ms 5000, steady window ${STEADY}s"
header=--header
for n in $NS; do
  rm -rf "$work/state"
  : > "$work/coordinator-$n.log"
  "$COORDINATOR" --config "$work/run.json" --state-dir "$work/state" --host 127.0.0.1 --port 0 \
    > "$work/coordinator-$n.log" 2>&1 &
  cpid=$!
  port=""
  for _ in $(seq 1 200); do
    port=$(sed -n 's/.*listening on 127.0.0.1:\([0-9]*\).*/\1/p' "$work/coordinator-$n.log" || true)
    [[ -n $port ]] && break
    sleep 0.05
  done
  [[ -n $port ]] || { echo "coordinator did not start:"; cat "$work/coordinator-$n.log"; exit 1; }
  row=$("$LOAD" --coordinator "127.0.0.1:$port" --workers "$n" --coordinator-pid "$cpid" \
    --steady-s "$STEADY" $header)
  header=""
  kill "$cpid"; wait "$cpid" || true; cpid=""
  # The coordinator's own view of the recovery: detection -> Plan sent to every survivor.
  sent=$({ grep '"cause":"lost"' "$work/state/events.jsonl" || true; } | head -1 |
         sed -n 's/.*"plan_sent_ms":\([0-9.]*\).*/\1/p')
  echo "$row" | sed "\$s/\$/$(printf " %13s" "${sent:--}")/"
done
