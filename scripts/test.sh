#!/usr/bin/env bash
# Sets everything up and runs the whole test suite (what CI runs, through .ci/run).
#   scripts/test.sh [ctest args...]
# Builds into build/ with the CUDA code compiled for one architecture (sm_90) when nvcc is
# present, to save time: the CUDA sources are compiled either way, and the tests labelled
# `gpu` report SKIPPED on a machine without a usable GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
export SPOTRAIN_CUDA_ARCHITECTURES=${SPOTRAIN_CUDA_ARCHITECTURES:-90}
scripts/setup.sh build
cd build
ctest --output-on-failure --timeout 600 -j "$(nproc)" "$@"
