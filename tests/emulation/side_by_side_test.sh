#!/usr/bin/env bash
# tests/gpu/side_by_side.py reads what spotrain-gpu-train --json writes: two rounds of the
# emulated benchmark stand in for the baseline and the current build (one round of the
# current build failing), and the table must have a ratio for each precision and mark the
# missing round as failed.
#   side_by_side_test.sh SPOTRAIN_GPU_TRAIN SIDE_BY_SIDE_PY
set -euo pipefail
bench=${1:?usage: side_by_side_test.sh SPOTRAIN_GPU_TRAIN SIDE_BY_SIDE_PY}
table_py=${2:?usage: side_by_side_test.sh SPOTRAIN_GPU_TRAIN SIDE_BY_SIDE_PY}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
for run in baseline-1 baseline-2 current-1; do
  "$bench" --model gpt-tiny --batch 2 --seq 32 --steps 1 --warmup 0 --precision fp32,bf16 \
    --json "$dir/$run.json" >"$dir/$run.log" 2>&1 || { cat "$dir/$run.log"; exit 1; }
done
python3 "$table_py" "$dir" 2 "abc1234 the baseline" >"$dir/table.md"
cat "$dir/table.md"
grep -q '^Side by side on this GPU: baseline = abc1234 the baseline;' "$dir/table.md"
for p in fp32 bf16; do
  # | p | b1 / b2 | c1 / failed | ratio | MFU n/a (no known peak on the emulator) | n/a |
  grep -qE "^\| $p \| [0-9.]+ / [0-9.]+ \| [0-9.]+ / failed \| [0-9]+\.[0-9]{3} \| n/a \| n/a \|$" \
    "$dir/table.md" || { echo "no complete row for $p" >&2; exit 1; }
done
# No result at all on one side: exit status 1.
rm "$dir"/current-*.json
if python3 "$table_py" "$dir" 2 x >/dev/null; then
  echo "side_by_side.py passed without any current result" >&2
  exit 1
fi
echo "side_by_side_test: ok"
