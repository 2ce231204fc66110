#!/usr/bin/env bash
# Packs the GPU test binaries and the GPU training benchmark of a CUDA build into one
# self-contained folder that runs on a bare GPU machine (CUDA driver and toolkit present,
# none of Debian's gRPC, protobuf, Abseil, gloo or OpenBLAS):
#   tests/gpu/package.sh OUTDIR [BUILD_DIR]        (BUILD_DIR default: build-cuda)
# OUTDIR gets bin/ (tests/gpu_*, spotrain-gpu-train, and spotrain-worker,
# spotrain-coordinator and spotrain when built, for tests/gpu/worker_test.py; with
# SPOTRAIN_PACKAGE_BASELINE, an earlier spotrain-gpu-train as spotrain-gpu-train-baseline),
# lib/ (every shared library they load except the C library, the dynamic loader and the CUDA
# driver/runtime/cuBLAS/NCCL libraries, which the GPU machine has), run.sh (a copy of
# tests/gpu/run.sh) and MANIFEST. Then, on the GPU machine:
#   SPOTRAIN_PREBUILT=OUTDIR OUTDIR/run.sh RESULTS_DIR
# Build first, e.g.:
#   cmake -S . -B build-cuda -G Ninja -DSPOTRAIN_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90
#   ninja -C build-cuda gpu_ops_test gpu_cuda_model_test \
#     gpu_nccl_communicator_test gpu_device_test gpu_fixed_point_cuda_test spotrain-gpu-train spotrain-worker \
#     spotrain-coordinator spotrain
set -euo pipefail
cd "$(dirname "$0")/../.."

out=${1:?usage: tests/gpu/package.sh OUTDIR [BUILD_DIR]}
build=${2:-build-cuda}
limit_mib=${SPOTRAIN_PACKAGE_LIMIT_MIB:-60}

binaries=()
for f in "$build"/tests/gpu_*; do
  [[ -f $f && -x $f ]] && binaries+=("$f")
done
for b in spotrain-gpu-train spotrain-worker spotrain-coordinator spotrain; do
  [[ -x $build/bin/$b ]] && binaries+=("$build/bin/$b")
done
# SPOTRAIN_PACKAGE_BASELINE=<spotrain-gpu-train of an earlier commit> (tests/gpu/build_baseline.sh)
# goes in as bin/spotrain-gpu-train-baseline, for run.sh's side-by-side benchmark.
baseline=${SPOTRAIN_PACKAGE_BASELINE:-}
if [[ -n $baseline && ! -x $baseline ]]; then
  echo "package: SPOTRAIN_PACKAGE_BASELINE=$baseline is not an executable" >&2
  exit 1
fi
if ((${#binaries[@]} == 0)); then
  echo "package: no GPU binaries in $build (build tests/gpu_* and spotrain-gpu-train first)" >&2
  exit 1
fi

rm -rf "$out"
mkdir -p "$out/bin" "$out/lib"
# Provided by the GPU machine (driver, CUDA runtime and cuBLAS of the toolkit) or by any
# glibc system; everything else is copied.
skip='^(linux-vdso|ld-linux|libc\.so|libm\.so|libdl\.so|librt\.so|libpthread\.so|libutil\.so|libresolv\.so|libcuda\.so|libcudart\.so|libcublas\.so|libcublasLt\.so|libnccl\.so|libnvidia-)'
declare -A copied=()
missing=()
[[ -n $baseline ]] && binaries+=("$baseline")
for bin in "${binaries[@]}"; do
  if [[ $bin == "$baseline" ]]; then
    cp "$bin" "$out/bin/spotrain-gpu-train-baseline"
  else
    cp "$bin" "$out/bin/"
  fi
  while read -r name arrow path _; do
    [[ $arrow == "=>" ]] || continue
    base=$(basename "$name")
    [[ $base =~ $skip ]] && continue
    if [[ $path == "not" || ! -f $path ]]; then
      missing+=("$base (needed by $(basename "$bin"))")
      continue
    fi
    if [[ -z ${copied[$base]:-} ]]; then
      cp -L "$path" "$out/lib/$base"
      copied[$base]=$path
    fi
  done < <(ldd "$bin")
done
if ((${#missing[@]})); then
  echo "package: unresolved libraries: ${missing[*]}" >&2
  exit 1
fi
strip --strip-unneeded "$out"/lib/*.so* "$out"/bin/* 2>/dev/null || true
cp tests/gpu/run.sh "$out/run.sh"
# The worker test (run.sh phase 1b) and the harness it imports, at their repository paths.
mkdir -p "$out/tests/gpu" "$out/tests/integration"
cp tests/gpu/worker_test.py tests/gpu/side_by_side.py "$out/tests/gpu/"
cp tests/integration/harness.py "$out/tests/integration/"
chmod +x "$out/run.sh"
{
  echo "spotrain GPU package"
  echo "source: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (+ local changes)')"
  echo "built on: $(. /etc/os-release && echo "$PRETTY_NAME"), $(uname -m)"
  echo "cuda: $(/usr/local/cuda/bin/nvcc --version 2>/dev/null | tail -1)"
  echo "cuda architectures: $(grep -E '^CMAKE_CUDA_ARCHITECTURES' "$build/CMakeCache.txt" | cut -d= -f2)"
  if [[ -n $baseline ]]; then
    echo "baseline source: $(cat "$baseline.source" 2>/dev/null || echo "unknown ($baseline)")"
  fi
  echo "binaries:"
  for bin in "$out"/bin/*; do echo "  bin/$(basename "$bin")"; done
  echo "libraries (from the build machine):"
  for base in $(printf '%s\n' "${!copied[@]}" | sort); do echo "  lib/$base <- ${copied[$base]}"; done
  glibc=$(for f in "$out"/bin/* "$out"/lib/*; do objdump -T "$f" 2>/dev/null; done |
    grep -oE 'GLIBC_[0-9.]+' | sort -uV | tail -1)
  echo "needed from the GPU machine: glibc >= ${glibc#GLIBC_}, libcuda.so.1 (driver), libcudart.so.13, libcublas.so.13,"
  echo "  libcublasLt.so.13 (CUDA 13 toolkit or the nvidia-cublas / nvidia-cuda-runtime wheels),"
  echo "  libnccl.so.2 >= 2.28 for gpu_nccl_communicator_test (toolkit or the nvidia-nccl wheel)"
} >"$out/MANIFEST"

size_kib=$(du -sk "$out" | cut -f1)
echo "package: $out: ${#binaries[@]} binaries, ${#copied[@]} libraries, $((size_kib / 1024)) MiB"
if ((size_kib > limit_mib * 1024)); then
  echo "package: $out is larger than ${limit_mib} MiB" >&2
  exit 1
fi
