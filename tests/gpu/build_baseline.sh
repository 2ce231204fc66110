#!/usr/bin/env bash
# Builds spotrain-gpu-train at an earlier commit, for the side-by-side benchmark of
# tests/gpu/run.sh (phase 2b):
#   tests/gpu/build_baseline.sh COMMIT [CUDA_BUILD_DIR]
# COMMIT is checked out in a git worktree, ${SPOTRAIN_BASELINE_ROOT:-/tmp}/spotrain-baseline-SHA,
# configured with the CUDA compiler, toolkit and architectures in CUDA_BUILD_DIR's CMake cache
# (default build-cuda) so that both builds differ only in their source, and only the
# spotrain-gpu-train target is built. The binary's path is printed last; next to it,
# spotrain-gpu-train.source names the commit. Then:
#   SPOTRAIN_PACKAGE_BASELINE=<that path> tests/gpu/package.sh OUTDIR CUDA_BUILD_DIR
# (The measured run-5 code of docs/gpu-results.md is 4ff993e.)
set -euo pipefail
cd "$(dirname "$0")/../.."

commit=${1:?usage: tests/gpu/build_baseline.sh COMMIT [CUDA_BUILD_DIR]}
build=${2:-build-cuda}
cache=$build/CMakeCache.txt
[[ -f $cache ]] || { echo "build_baseline: no $cache (configure the CUDA build first)" >&2; exit 1; }
sha=$(git rev-parse --verify "$commit^{commit}") ||
  { echo "build_baseline: $commit is not a commit of this repository" >&2; exit 1; }
tree=${SPOTRAIN_BASELINE_ROOT:-/tmp}/spotrain-baseline-${sha:0:12}

cached() {  # cached NAME: the value of NAME in the CUDA build's cache, empty if unset
  sed -n "s/^$1:[A-Z]*=//p" "$cache" | head -1
}
args=(-G Ninja -DCMAKE_BUILD_TYPE=Release -DSPOTRAIN_CUDA=ON)
for name in CMAKE_CUDA_COMPILER CMAKE_CUDA_ARCHITECTURES CUDAToolkit_ROOT CMAKE_CXX_COMPILER; do
  value=$(cached "$name")
  [[ -n $value ]] && args+=("-D$name=$value")
done

if [[ ! -d $tree ]]; then
  git worktree add --detach "$tree" "$sha" >&2
fi
[[ $(git -C "$tree" rev-parse HEAD) == "$sha" ]] ||
  { echo "build_baseline: $tree is not at $sha; remove it (git worktree remove $tree)" >&2; exit 1; }
cmake -S "$tree" -B "$tree/build-gpu" "${args[@]}" >&2
ninja -C "$tree/build-gpu" spotrain-gpu-train >&2
bin=$tree/build-gpu/bin/spotrain-gpu-train
git log -1 --format='%h %s' "$sha" >"$bin.source"
echo "$bin"
