#!/usr/bin/env bash
# Writes the default demo corpus (the Python standard library sources, tokenized byte by
# byte) into data/pystdlib unless it is already there.
#   scripts/prepare_default_data.sh [BUILD_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir=${1:-build}
out=data/pystdlib
if [ -f "$out/stats.json" ]; then exit 0; fi
shopt -s nullglob
sources=(/usr/lib/python3*/*.py)
if ((${#sources[@]} == 0)); then
  echo "prepare: no /usr/lib/python3*/*.py found; install python3 (apt-get install python3)" >&2
  exit 1
fi
"$build_dir/bin/spotrain" prepare-data --output "$out" '/usr/lib/python3*/*.py'
