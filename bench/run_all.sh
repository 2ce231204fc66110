#!/usr/bin/env bash
# Runs every benchmark of the project on this machine and regenerates docs/benchmarks.md
# (tables, the machine, the date, plots). One command from a clean checkout: it runs
# scripts/setup.sh first (Debian packages when missing, then an incremental build), writes the
# demo corpus (scripts/prepare_default_data.sh) and installs Debian's python3-torch for the
# PyTorch and torchrun comparisons. Takes about 27 minutes on a 2-core machine; run it on a quiet machine.
#   bench/run_all.sh [BUILD_DIR]
# Each benchmark's output lands in bench/out/<name>.txt (and .json where it writes one).
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
export SPOTRAIN_BUILD_DIR=$PWD/$build
export OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1
mkdir -p bench/out
scripts/setup.sh "$build"
scripts/prepare_default_data.sh "$build" >/dev/null
if ! /usr/bin/python3 -c "import torch" 2>/dev/null; then
  echo "run_all: installing python3-torch for the PyTorch comparisons"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-torch >/dev/null
fi
run() {  # name command...
  local name=$1; shift
  echo "== $name: $*"
  "$@" 2>&1 | tee "bench/out/$name.txt"
}
run training_curve "$build/bin/spotrain-worker"
run cpu_throughput /usr/bin/python3 bench/cpu_throughput.py --rounds 3
run recovery /usr/bin/python3 bench/recovery.py --trials 5 --torch-trials 3
run overhead /usr/bin/python3 bench/overhead.py
run restore /usr/bin/python3 bench/restore.py
run deterministic_cost python3 bench/deterministic_cost.py
run checkpoint "$build/tests/worker_checkpoint_test" --gtest_also_run_disabled_tests \
  --gtest_filter='CheckpointBench.*'
BUILD=$build run coordinator_load bench/coordinator_load.sh
run trace_validation python3 bench/trace_validation.py
run plan "$build/bin/spotrain" plan --trace examples/traces/aws-p3-spot-32.csv --gpus 8 \
  --hours 192 --spot_price 0.918 --on_demand_price 3.06 --checkpoint_cost_s 10 \
  --restore_cost_s 30 --trials 200
python3 bench/report.py
echo "run_all: docs/benchmarks.md regenerated"
