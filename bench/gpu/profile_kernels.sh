#!/usr/bin/env bash
# Where the time of one GPT-2 124M training step goes on the GPU: runs one step of
# spotrain-gpu-train under Nsight Compute (ncu), measuring only each kernel's duration, and
# prints the kernels grouped by name with their share of the step, largest first.
#   bench/gpu/profile_kernels.sh OUTDIR [spotrain-gpu-train] [extra spotrain-gpu-train flags]
# Defaults: the binary from SPOTRAIN_PREBUILT/bin or build-gpu/bin; bf16, batch 16 x 1024.
# ncu runs every kernel alone (serialised, caches flushed), so the sum is above the real step
# time; the shares are what matters. Takes 1-3 minutes on an H100. Writes OUTDIR/ncu.csv and
# OUTDIR/kernels.md.
set -euo pipefail
out=${1:?usage: bench/gpu/profile_kernels.sh OUTDIR [spotrain-gpu-train] [flags...]}
mkdir -p "$out"
bin=${2:-}
shift $(($# >= 2 ? 2 : $#))
if [[ -z $bin ]]; then
  for c in "${SPOTRAIN_PREBUILT:-/nonexistent}/bin/spotrain-gpu-train" build-gpu/bin/spotrain-gpu-train; do
    [[ -x $c ]] && { bin=$c; break; }
  done
fi
[[ -x $bin ]] || { echo "no spotrain-gpu-train found" >&2; exit 1; }
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
[[ -x $ncu ]] || { echo "no ncu (Nsight Compute) found" >&2; exit 1; }

flags=("$@")
((${#flags[@]})) || flags=(--precision bf16 --batch 16 --seq 1024)
"$ncu" --clock-control none --metrics gpu__time_duration.sum --csv \
  "$bin" --model gpt2-124m --steps 1 --warmup 0 "${flags[@]}" >"$out/ncu.csv" 2>"$out/ncu.err" || {
  tail -20 "$out/ncu.err" >&2
  exit 1
}

python3 - "$out/ncu.csv" "${flags[*]}" >"$out/kernels.md" <<'EOF'
import csv, re, sys
from collections import defaultdict
path, flags = sys.argv[1], sys.argv[2]
lines = [l for l in open(path, errors="replace") if l.startswith('"')]
rows = list(csv.DictReader(lines))
scale = {"nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0, "second": 1e3}
total = defaultdict(float)
count = defaultdict(int)
for r in rows:
    if r.get("Metric Name") != "gpu__time_duration.sum":
        continue
    name = r["Kernel Name"]
    name = re.sub(r"\(.*", "", name)            # drop the argument list
    name = re.sub(r"^void ", "", name)
    ms = float(r["Metric Value"].replace(",", "")) * scale.get(r["Metric Unit"], 1e-6)
    total[name] += ms
    count[name] += 1
all_ms = sum(total.values())
print(f"One training step of gpt2-124m ({flags}) under ncu: {sum(count.values())} kernel "
      f"launches, {all_ms:.1f} ms of kernel time (kernels serialised by ncu).\n")
print("| kernel | launches | ms | share |")
print("|---|---|---|---|")
for name, ms in sorted(total.items(), key=lambda kv: -kv[1])[:30]:
    print(f"| `{name[:90]}` | {count[name]} | {ms:.2f} | {100 * ms / all_ms:.1f}% |")
EOF
cat "$out/kernels.md"
