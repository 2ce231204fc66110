#!/usr/bin/env bash
# Makes a link-only CUDA toolkit out of one whose runtime libraries are missing (nvcc and the
# headers present, lib/ empty: the build machine's state since 2026-11-27, see
# docs/gpu-results.md), so that the GPU binaries can still be linked there and packaged
# (tests/gpu/package.sh) for a real GPU machine:
#   tests/gpu/stub_toolkit.sh DEST [TOOLKIT]        (TOOLKIT default: /usr/local/cuda)
# DEST gets a copy of the toolkit (bin, nvvm, include) and, in DEST/lib, stub libraries with
# the real SONAMEs (libcudart.so.13, libcublas.so.13, libcublasLt.so.13, libnccl.so.2) and a
# libcudart_static.a for CMake's compiler check. Every stub function is empty: a binary
# linked against them records only the SONAMEs and the symbol names, and must run where the
# real libraries are (run.sh finds them on the GPU machine). Never run anything linked here
# on this machine, and configure with -DCMAKE_CUDA_RUNTIME_LIBRARY=Shared so that no stub is
# linked statically. Then:
#   cmake -S . -B build-cuda -G Ninja -DSPOTRAIN_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
#     -DCMAKE_CUDA_COMPILER=DEST/bin/nvcc -DCUDAToolkit_ROOT=DEST -DCMAKE_CUDA_RUNTIME_LIBRARY=Shared
set -euo pipefail

dest=${1:?usage: tests/gpu/stub_toolkit.sh DEST [TOOLKIT]}
toolkit=$(readlink -f "${2:-/usr/local/cuda}")
[[ -x $toolkit/bin/nvcc ]] || { echo "stub_toolkit: no nvcc in $toolkit/bin" >&2; exit 1; }
[[ -f $toolkit/include/cuda_runtime_api.h ]] || {
  echo "stub_toolkit: no CUDA headers in $toolkit/include" >&2
  exit 1
}
if compgen -G "$toolkit/lib/libcudart.so*" >/dev/null; then
  echo "stub_toolkit: $toolkit has its libraries; build against it directly" >&2
  exit 1
fi

rm -rf "$dest"
mkdir -p "$dest"
# nvcc finds everything relative to its own folder (bin/nvcc.profile: TOP = $(_HERE_)/..).
cp -a "$toolkit/bin" "$toolkit/nvvm" "$toolkit/include" "$dest/"
mkdir -p "$dest/lib" "$dest/targets/x86_64-linux"
ln -s lib "$dest/lib64"
ln -s ../../include "$dest/targets/x86_64-linux/include"
ln -s ../../lib "$dest/targets/x86_64-linux/lib"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# One stub library: every function name the headers declare with one of the prefixes.
stub() {  # soname regex header...
  local soname=$1 pattern=$2
  shift 2
  python3 - "$pattern" "$@" >"$work/$soname.c" <<'EOF'
import re, sys
pattern, headers = sys.argv[1], sys.argv[2:]
names = set()
for h in headers:
    text = open(h, errors="replace").read()
    names.update(re.findall(r"\b(" + pattern + r")\s*\(", text))
print("/* stub: every function returns without doing anything; never run */")
for n in sorted(names):
    print(f"void {n}(void) {{}}")
EOF
  gcc -shared -fPIC -o "$dest/lib/$soname" -Wl,-soname,"$soname" "$work/$soname.c"
  ln -sf "$soname" "$dest/lib/${soname%%.so*}.so"
  echo "stub_toolkit: $soname: $(grep -c '^void' "$work/$soname.c") functions"
}

inc=$toolkit/include
stub libcudart.so.13 '(?:__cuda[A-Za-z0-9_]+|cuda[A-Z][A-Za-z0-9_]*)' \
  "$inc/cuda_runtime_api.h" "$inc/cuda_runtime.h" "$inc"/crt/*.h \
  "$inc/cuda_profiler_api.h"
stub libcublas.so.13 'cublas(?!Lt|Xt)[A-Z][A-Za-z0-9_]*' "$inc/cublas_api.h" "$inc/cublas_v2.h"
stub libcublasLt.so.13 'cublasLt[A-Z][A-Za-z0-9_]*' "$inc/cublasLt.h"
stub libnccl.so.2 'p?nccl[A-Z][A-Za-z0-9_]*' "$inc/nccl.h"
# CMake's CUDA compiler check links a test program statically against the runtime.
gcc -c -fPIC -o "$work/cudart_static.o" "$work/libcudart.so.13.c"
ar rcs "$dest/lib/libcudart_static.a" "$work/cudart_static.o"
# nvcc adds -lcudadevrt to every link (used only by relocatable device code; none here).
ar rcs "$dest/lib/libcudadevrt.a"
echo "STUB TOOLKIT (link only): libraries are empty stubs" >"$dest/STUB-TOOLKIT"
echo "stub_toolkit: $dest ready (link only; binaries need the real libraries to run)"
