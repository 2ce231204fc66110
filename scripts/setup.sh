#!/usr/bin/env bash
# Installs what spotrain needs from Debian 12 packages (when missing) and builds it.
#   scripts/setup.sh [BUILD_DIR]        default BUILD_DIR: build
# Environment:
#   SPOTRAIN_CUDA=AUTO|ON|OFF           build the CUDA kernels and NCCL (default AUTO: when nvcc exists)
#   SPOTRAIN_CUDA_ARCHITECTURES=LIST    CUDA architectures (default: CMake's 80;86;89;90)
#   SPOTRAIN_BUILD_TYPE=Release|Debug   (default Release)
#   SPOTRAIN_JOBS=N                     parallel compile jobs (default: number of cores)
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir=${1:-build}

packages=(
  build-essential cmake ninja-build pkg-config git python3
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libabsl-dev libgtest-dev libgmock-dev libbenchmark-dev libgloo-dev libopenblas-dev
  prometheus-cpp-dev libssl-dev libxxhash-dev iproute2 procps curl shellcheck gnuplot-nox
)
# Offline Kubernetes manifest validation (tests integration.deploy.*) needs kubectl (with
# kustomize >= v4) and Node.js with npm. Where the machine has none, take Debian's Node.js;
# kubectl comes from the machine's own apt sources when they have it (Debian's
# kubernetes-client is too old: its kustomize cannot render the overlays).
if ! command -v npm >/dev/null; then packages+=(nodejs npm); fi
optional=()
if ! command -v kubectl >/dev/null; then optional+=(kubectl); fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
sudo_cmd=()
if [ "$(id -u)" != 0 ]; then sudo_cmd=(sudo); fi
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
fi
for p in "${optional[@]}"; do
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "$p" >/dev/null 2>&1 ||
    echo "setup: $p is not available from this machine's apt sources; the deploy tests will say so"
done

if [ -x /usr/local/cuda/bin/nvcc ] && ! command -v nvcc >/dev/null; then
  export PATH=/usr/local/cuda/bin:$PATH
fi

cmake_args=(-S . -B "$build_dir" -G Ninja
  -DCMAKE_BUILD_TYPE="${SPOTRAIN_BUILD_TYPE:-Release}"
  -DSPOTRAIN_CUDA="${SPOTRAIN_CUDA:-AUTO}")
if [ -n "${SPOTRAIN_CUDA_ARCHITECTURES:-}" ]; then
  cmake_args+=(-DCMAKE_CUDA_ARCHITECTURES="$SPOTRAIN_CUDA_ARCHITECTURES")
fi
cmake "${cmake_args[@]}" >"$build_dir.cmake.log" 2>&1 || {
  cat "$build_dir.cmake.log"; echo "setup: cmake configure failed (log above)"; exit 1; }
grep -E "spotrain: CUDA" "$build_dir.cmake.log" || true
ninja -C "$build_dir" -j "${SPOTRAIN_JOBS:-$(nproc)}"
# deploy/validate: the offline Kubernetes schema validator (kubernetes-models, pinned by the lock file).
if command -v npm >/dev/null; then
  npm ci --prefix deploy/validate --no-audit --no-fund >/dev/null
fi
echo "setup: built $(ls "$build_dir"/bin | tr '\n' ' ')in $build_dir/bin"
