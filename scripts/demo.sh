#!/usr/bin/env bash
# The main job, on built-in defaults: a local elastic training run of gpt-tiny on the CPU
# with a coordinator and three workers; partway one worker is killed with kill -9 (a spot pod
# vanishing without notice), later a new worker joins (new capacity). At the end it prints
# the steps, the final validation loss and every membership change with its recovery time
# and the steps lost. Run scripts/setup.sh first (the README's first command does both).
#   scripts/demo.sh [BUILD_DIR]
# Logs and the coordinator's state stay in runs/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir=${1:-build}
scripts/prepare_default_data.sh "$build_dir" >/dev/null
exec python3 scripts/demo.py --build-dir "$build_dir"
