#!/usr/bin/env bash
# Copies the deployable binaries of a build (spotrain-coordinator, spotrain-worker, spotrain)
# and the shared libraries they load into one folder for a machine or image that has only
# glibc, libstdc++ and the CUDA runtime:
#   deploy/bundle.sh OUTDIR [BUILD_DIR]        (BUILD_DIR default: build)
# OUTDIR gets bin/ and lib/; run the binaries with LD_LIBRARY_PATH=OUTDIR/lib (the container
# image sets it). Left out, because the target provides them: the C library and its loader,
# libstdc++ and libgcc_s, the CUDA driver (libcuda, libnvidia-*) and the CUDA toolkit's
# runtime libraries (libcudart, libcublas, libcublasLt, libnccl: the nvidia/cuda runtime
# images have them). Fails if a library cannot be resolved on this machine.
set -euo pipefail
out=${1:?usage: deploy/bundle.sh OUTDIR [BUILD_DIR]}
build=${2:-build}
binaries=(spotrain-coordinator spotrain-worker spotrain)
skip='^(linux-vdso|ld-linux|libc\.so|libm\.so|libdl\.so|librt\.so|libpthread\.so|libutil\.so|libresolv\.so|libstdc\+\+\.so|libgcc_s\.so|libcuda\.so|libnvidia-|libcudart\.so|libcublas\.so|libcublasLt\.so|libnccl\.so)'

for b in "${binaries[@]}"; do
  [[ -x $build/bin/$b ]] || { echo "bundle: $build/bin/$b is missing (build it first)" >&2; exit 1; }
done
mkdir -p "$out/bin" "$out/lib"
declare -A copied=()
missing=()
for b in "${binaries[@]}"; do
  cp "$build/bin/$b" "$out/bin/$b"
  while read -r name arrow path _; do
    [[ $arrow == "=>" ]] || continue
    base=$(basename "$name")
    [[ $base =~ $skip ]] && continue
    if [[ $path == not || ! -f $path ]]; then
      missing+=("$base (needed by $b)")
      continue
    fi
    if [[ -z ${copied[$base]:-} ]]; then
      cp -L "$path" "$out/lib/$base"
      copied[$base]=$path
    fi
  done < <(ldd "$build/bin/$b")
done
if ((${#missing[@]})); then
  echo "bundle: unresolved libraries: ${missing[*]}" >&2
  exit 1
fi
echo "bundle: $out: ${#binaries[@]} binaries, ${#copied[@]} libraries, $(du -sh "$out" | cut -f1)"
