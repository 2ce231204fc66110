#!/usr/bin/env bash
# The GPU checks of spotrain on one GPU, in one go (meant for a lent H100: well under 8
# minutes with 16 cores):
#   1. the gpu-labelled tests (kernels/cuda vs the CPU reference, the CUDA model vs the CPU
#      model, determinism, the one-rank NCCL communicator), each binary under a time limit;
#   1b. the worker on the GPU as real processes (tests/gpu/worker_test.py: deterministic
#      repeatability and GPU vs CPU loss, kill -9 and restore from a checkpoint under a
#      coordinator, a CPU worker refused, bf16), when spotrain-worker is there too;
#   2. GPT-2 124M training throughput on one GPU, fp32 / tf32 / bf16, uniformly random tokens
#      (no dataset): ms/step, tokens/s, MFU by llm.c's 6N + 6LCT FLOPs per token against the
#      GPU's dense peak for that arithmetic (H100 SXM: fp32 67, tf32 495, bf16 989 TFLOP/s);
#   2b. (when the package holds bin/spotrain-gpu-train-baseline) the same benchmark with an
#      earlier build and this one, alternately, so that a change's gain is a ratio measured
#      in one run (baseline.md);
#   3. (SPOTRAIN_GPU_BF16_DIAG=1; about a minute; off by default since run 2 explained it) a
#      diagnosis of bf16 training, which diverged on the first H100 run
#      (docs/gpu-results.md: the benchmark's set-up, not bf16): bf16 vs fp32 gradients on
#      the benchmark's shape along the fp32 trajectory (spotrain-gpu-train --compare-bf16),
#      then short bf16 and fp32 training runs at smaller shapes and in deterministic mode, to
#      tell a shape effect (B, T) from a many-steps effect and from cuBLAS atomics;
#   4. (SPOTRAIN_GPU_SANITIZE=1) the kernel tests under compute-sanitizer memcheck;
#   5. (SPOTRAIN_GPU_PROFILE=1; about 30 s) where one bf16 step's time goes, kernel by kernel
#      (bench/gpu/profile_kernels.sh under Nsight Compute: kernels.md; with a baseline, its
#      step too: kernels-baseline.md);
# then prints a summary table last. Full logs go to DIR (env.txt, tests.log, bench.log,
# bench.json, summary.md, and baseline.md with baseline/, bf16_diag.log, sanitize.log,
# kernels.md, build.log when those phases run).
#
#   tests/gpu/run.sh DIR
# Binaries come from, in order:
#   SPOTRAIN_PREBUILT=<dir>  a folder made by tests/gpu/package.sh (bin/, lib/), or a CUDA
#                            build directory (tests/gpu_*, bin/spotrain-gpu-train);
#   otherwise it configures and builds SPOTRAIN_GPU_BUILD_DIR (default build-gpu) with CUDA
#   for sm_90 here, which needs the Debian build dependencies (scripts/setup.sh).
# Other knobs: SPOTRAIN_BENCH_BATCH (16), SPOTRAIN_BENCH_STEPS (20),
# SPOTRAIN_BENCH_PRECISIONS (fp32,tf32,bf16), SPOTRAIN_TEST_TIMEOUT (240 s per binary),
# SPOTRAIN_BENCH_TIMEOUT (300 s).
set -uo pipefail

out=${1:?usage: tests/gpu/run.sh DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
script_dir=$(cd "$(dirname "$0")" && pwd)
start=$(date +%s)
log() { echo "[run.sh +$(($(date +%s) - start))s] $*"; }

# ---- where the binaries come from ---------------------------------------------------------
tests=()
bench=""
bin_root=""  # a folder whose bin/ holds spotrain-worker, spotrain-coordinator and spotrain
if [[ -n ${SPOTRAIN_PREBUILT:-} ]]; then
  pre=$(cd "$SPOTRAIN_PREBUILT" && pwd) || { echo "no folder $SPOTRAIN_PREBUILT" >&2; exit 1; }
  if [[ -d $pre/lib ]]; then  # a package
    for f in "$pre"/bin/gpu_*; do [[ -x $f ]] && tests+=("$f"); done
    [[ -x $pre/bin/spotrain-gpu-train ]] && bench=$pre/bin/spotrain-gpu-train
    [[ -x $pre/bin/spotrain-worker ]] && bin_root=$pre
    export LD_LIBRARY_PATH="$pre/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  else  # a build directory
    for f in "$pre"/tests/gpu_*; do [[ -f $f && -x $f ]] && tests+=("$f"); done
    [[ -x $pre/bin/spotrain-gpu-train ]] && bench=$pre/bin/spotrain-gpu-train
    [[ -x $pre/bin/spotrain-worker ]] && bin_root=$pre
  fi
else
  repo=$(cd "$script_dir/../.." && pwd)
  build=${SPOTRAIN_GPU_BUILD_DIR:-$repo/build-gpu}
  [[ -x /usr/local/cuda/bin/nvcc ]] && export PATH=/usr/local/cuda/bin:$PATH
  log "configuring and building $build (CUDA, sm_90)"
  if ! cmake -S "$repo" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DSPOTRAIN_CUDA=ON \
      -DCMAKE_CUDA_ARCHITECTURES=90 >"$out/build.log" 2>&1 ||
     ! ninja -C "$build" gpu_ops_test gpu_cuda_model_test \
      gpu_nccl_communicator_test gpu_device_test gpu_fixed_point_cuda_test spotrain-gpu-train spotrain-worker \
      spotrain-coordinator spotrain >>"$out/build.log" 2>&1; then
    tail -30 "$out/build.log"
    echo "build failed (log: $out/build.log). On a machine without Debian's gRPC/protobuf/Abseil," >&2
    echo "build elsewhere, run tests/gpu/package.sh and pass SPOTRAIN_PREBUILT." >&2
    exit 1
  fi
  for f in "$build"/tests/gpu_*; do [[ -f $f && -x $f ]] && tests+=("$f"); done
  bench=$build/bin/spotrain-gpu-train
  bin_root=$build
fi
if ((${#tests[@]} == 0)) || [[ -z $bench ]]; then
  echo "no GPU test binaries or no spotrain-gpu-train found" >&2
  exit 1
fi

# Kernels before the model that uses them; any other test binaries after.
ordered=()
for want in gpu_ops_test gpu_cuda_model_test gpu_nccl_communicator_test; do
  for t in "${tests[@]}"; do [[ $(basename "$t") == "$want" ]] && ordered+=("$t"); done
done
for t in "${tests[@]}"; do
  case " ${ordered[*]} " in *" $t "*) ;; *) ordered+=("$t") ;; esac
done
tests=("${ordered[@]}")

# ---- CUDA runtime and cuBLAS from this machine ----------------------------------------------
# The first folder holding `name` among the toolkit, the loader cache and the NVIDIA wheels
# of this machine's Python.
find_lib_dir() {
  local name=$1 d
  for d in /usr/local/cuda/lib64 /usr/local/cuda/lib /usr/local/cuda/targets/x86_64-linux/lib \
           /usr/lib/x86_64-linux-gnu; do
    [[ -e $d/$name ]] && { echo "$d"; return; }
  done
  d=$(ldconfig -p 2>/dev/null | awk -v n="$name" '$1 == n {print $NF; exit}')
  [[ -n $d ]] && { dirname "$d"; return; }
  local py
  for py in python3 /opt/torch/.venv/bin/python3; do
    d=$("$py" - "$name" 2>/dev/null <<'EOF'
import glob, os, sys
try:
    import nvidia
except ImportError:
    sys.exit(0)
for root in nvidia.__path__:
    for hit in glob.glob(os.path.join(root, "*", "lib", sys.argv[1])):
        print(os.path.dirname(hit)); sys.exit(0)
EOF
    )
    [[ -n $d ]] && { echo "$d"; return; }
  done
}
for lib in libcudart.so.13 libcublas.so.13 libcublasLt.so.13; do
  if ! ldconfig -p 2>/dev/null | grep -q "^\s*$lib "; then
    d=$(find_lib_dir "$lib")
    if [[ -z $d ]]; then
      echo "cannot find $lib on this machine (CUDA 13 toolkit or nvidia wheels needed)" >&2
      exit 1
    fi
    case ":${LD_LIBRARY_PATH:-}:" in *":$d:"*) ;; *) export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$d" ;; esac
  fi
done

# NCCL (for gpu_nccl_communicator_test only): the toolkit's, the loader's or the nvidia-nccl
# wheel's libnccl.so.2. Without it that one test is not run (and the summary says so).
declare -a summary_rows=()
if ! ldconfig -p 2>/dev/null | grep -q "^\s*libnccl.so.2 "; then
  d=$(find_lib_dir libnccl.so.2)
  if [[ -n $d ]]; then
    case ":${LD_LIBRARY_PATH:-}:" in *":$d:"*) ;; *) export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$d" ;; esac
  else
    kept=()
    for t in "${tests[@]}"; do [[ $(basename "$t") == gpu_nccl_communicator_test ]] || kept+=("$t"); done
    if ((${#kept[@]} != ${#tests[@]})); then
      echo "warning: no libnccl.so.2 on this machine: gpu_nccl_communicator_test not run" >&2
      summary_rows+=("| test gpu_nccl_communicator_test | NOT RUN (no libnccl.so.2 found) | | |")
    fi
    tests=("${kept[@]}")
  fi
fi

{
  echo "date: $(date -u +%FT%TZ)"
  echo "host: $(uname -a)"
  [[ -r /etc/os-release ]] && (. /etc/os-release && echo "os: $PRETTY_NAME")
  echo "cpus: $(nproc)"
  echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
  [[ -n ${SPOTRAIN_PREBUILT:-} && -f $SPOTRAIN_PREBUILT/MANIFEST ]] && cat "$SPOTRAIN_PREBUILT/MANIFEST"
  echo "--- nvidia-smi"
  nvidia-smi 2>&1 || echo "nvidia-smi failed"
  echo "--- nvcc"
  (nvcc --version || /usr/local/cuda/bin/nvcc --version) 2>&1 | tail -2
  echo "--- ldd $(basename "$bench")"
  ldd "$bench" 2>&1
} >"$out/env.txt"
log "environment in $out/env.txt; GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)"

# ---- 1. tests -------------------------------------------------------------------------------
test_timeout=${SPOTRAIN_TEST_TIMEOUT:-240}
: >"$out/tests.log"
tests_failed=0
for t in "${tests[@]}"; do
  name=$(basename "$t")
  log "test $name"
  t0=$(date +%s)
  timeout --kill-after=10 "$test_timeout" "$t" --gtest_color=no >>"$out/tests.log" 2>&1 </dev/null
  rc=$?
  secs=$(($(date +%s) - t0))
  # Counts from this binary's part of the log (the last summary lines gtest printed).
  block=$(tac "$out/tests.log" | awk '/^Running main\(\)/{print; exit} {print}' | tac)
  # Per-test result lines end with the time, e.g. "[  FAILED  ] Suite.Test (12 ms)".
  passed=$(grep -cE '^\[       OK \] .* \([0-9]+ ms\)$' <<<"$block")
  failed=$(grep -cE '^\[  FAILED  \] .* \([0-9]+ ms\)$' <<<"$block")
  skipped=$(grep -cE '^\[  SKIPPED \] .* \([0-9]+ ms\)$' <<<"$block")
  status=ok
  if ((rc == 124 || rc == 137)); then status="TIMEOUT after ${test_timeout}s"; fi
  if ((rc != 0)); then tests_failed=1; [[ $status == ok ]] && status="FAILED (exit $rc)"; fi
  if [[ $status == ok ]] && ((skipped > 0)); then status="ok, but $skipped SKIPPED (no usable GPU? see tests.log)"; fi
  summary_rows+=("| test $name | $status | $passed passed, $failed failed, $skipped skipped | ${secs}s |")
done

# ---- 1b. the worker on the GPU ----------------------------------------------------------------
worker_test=""
for f in "$script_dir/tests/gpu/worker_test.py" "$script_dir/worker_test.py"; do
  [[ -f $f ]] && { worker_test=$f; break; }
done
if [[ -n $bin_root && -n $worker_test ]]; then
  log "test worker_test.py (the worker on the GPU under a coordinator)"
  t0=$(date +%s)
  echo "=== worker_test.py" >>"$out/tests.log"
  SPOTRAIN_BUILD_DIR=$bin_root PYTHONUNBUFFERED=1 timeout --kill-after=10 \
    "${SPOTRAIN_WORKER_TEST_TIMEOUT:-300}" python3 "$worker_test" >>"$out/tests.log" 2>&1 </dev/null
  rc=$?
  secs=$(($(date +%s) - t0))
  counts=$(tail -1 "$out/tests.log")
  status=ok
  ((rc == 77)) && status="SKIPPED (no usable GPU for the worker)"
  if ((rc != 0 && rc != 77)); then tests_failed=1; status="FAILED (exit $rc)"; fi
  summary_rows+=("| test worker_test.py | $status | $counts | ${secs}s |")
  grep -E '^(PASS|FAIL) |^  (val loss|bf16 loss)' "$out/tests.log" || true
else
  summary_rows+=("| test worker_test.py | NOT RUN (no spotrain-worker or worker_test.py) | | |")
fi

# ---- 2. benchmark ---------------------------------------------------------------------------
bench_timeout=${SPOTRAIN_BENCH_TIMEOUT:-300}
log "benchmark gpt2-124m (batch ${SPOTRAIN_BENCH_BATCH:-16} x 1024, ${SPOTRAIN_BENCH_PRECISIONS:-fp32,tf32,bf16})"
timeout --kill-after=10 "$bench_timeout" "$bench" --model gpt2-124m \
  --batch "${SPOTRAIN_BENCH_BATCH:-16}" --seq 1024 --steps "${SPOTRAIN_BENCH_STEPS:-20}" \
  --warmup 3 --precision "${SPOTRAIN_BENCH_PRECISIONS:-fp32,tf32,bf16}" \
  --json "$out/bench.json" >"$out/bench.log" 2>&1 </dev/null
bench_rc=$?
tail -n +1 "$out/bench.log" | grep -E '^(device|model|peaks|fp32|tf32|bf16) ' || true

# ---- 2b. side by side with an earlier build -----------------------------------------------
# With a baseline spotrain-gpu-train (bin/spotrain-gpu-train-baseline of a package made with
# SPOTRAIN_PACKAGE_BASELINE, see tests/gpu/build_baseline.sh; or SPOTRAIN_BENCH_BASELINE=<binary>)
# the benchmark runs again, alternately with the baseline and with this build,
# SPOTRAIN_BASELINE_ROUNDS times (2) in SPOTRAIN_BASELINE_PRECISIONS (bf16,fp32). The ratio
# of the two is what the commits between them gained, measured on one GPU within a minute
# rather than against a number from another day (baseline.md, logs in baseline/).
baseline_bin=${SPOTRAIN_BENCH_BASELINE:-}
if [[ -z $baseline_bin && -n ${pre:-} && -x ${pre}/bin/spotrain-gpu-train-baseline ]]; then
  baseline_bin=$pre/bin/spotrain-gpu-train-baseline
fi
baseline_rc=0
if [[ -n $baseline_bin ]]; then
  baseline_source=$(cat "$baseline_bin.source" 2>/dev/null)
  if [[ -z $baseline_source && -n ${pre:-} && -f $pre/MANIFEST ]]; then
    baseline_source=$(sed -n 's/^baseline source: //p' "$pre/MANIFEST" | head -1)
  fi
  baseline_source=${baseline_source:-unknown}
  rounds=${SPOTRAIN_BASELINE_ROUNDS:-2}
  precisions=${SPOTRAIN_BASELINE_PRECISIONS:-bf16,fp32}
  log "side by side: baseline ($baseline_source) and this build, $rounds rounds of $precisions"
  mkdir -p "$out/baseline"
  for ((round = 1; round <= rounds; ++round)); do
    for which in baseline current; do
      bin=$bench
      [[ $which == baseline ]] && bin=$baseline_bin
      timeout --kill-after=10 "$bench_timeout" "$bin" --model gpt2-124m \
        --batch "${SPOTRAIN_BENCH_BATCH:-16}" --seq 1024 --steps "${SPOTRAIN_BENCH_STEPS:-20}" \
        --warmup 3 --precision "$precisions" --json "$out/baseline/$which-$round.json" \
        >"$out/baseline/$which-$round.log" 2>&1 </dev/null || baseline_rc=1
    done
  done
  side_by_side=""
  for f in "$script_dir/tests/gpu/side_by_side.py" "$script_dir/side_by_side.py"; do
    [[ -f $f ]] && { side_by_side=$f; break; }
  done
  if command -v python3 >/dev/null && [[ -n $side_by_side ]]; then
    python3 "$side_by_side" "$out/baseline" "$rounds" "$baseline_source" \
      >"$out/baseline.md" || baseline_rc=1
  else
    echo "no python3 or no side_by_side.py: see $out/baseline/*.log" >"$out/baseline.md"
  fi
  summary_rows+=("| side by side with the baseline (baseline.md) | $([[ $baseline_rc == 0 ]] && echo ok || echo "SOME RUNS FAILED (baseline/*.log)") | $rounds rounds | |")
fi

# ---- 3. bf16 diagnosis -----------------------------------------------------------------------
diag_rc=0
if [[ ${SPOTRAIN_GPU_BF16_DIAG:-0} == 1 ]]; then
  diag_timeout=${SPOTRAIN_DIAG_TIMEOUT:-120}
  : >"$out/bf16_diag.log"
  diag() {  # diag ARGS...: one spotrain-gpu-train run, appended to bf16_diag.log
    echo "=== spotrain-gpu-train $*" >>"$out/bf16_diag.log"
    timeout --kill-after=10 "$diag_timeout" "$bench" --model gpt2-124m "$@" \
      >>"$out/bf16_diag.log" 2>&1 </dev/null
    local rc=$?
    ((rc != 0)) && { echo "=== exit $rc" >>"$out/bf16_diag.log"; diag_rc=1; }
    return 0
  }
  log "bf16 diagnosis (gradients bf16 vs fp32 at 16 x 1024, short runs at other shapes)"
  diag --batch 16 --seq 1024 --compare-bf16 5
  diag --batch 16 --seq 1024 --compare-bf16 2 --deterministic
  diag --batch 16 --seq 1024 --steps 20 --warmup 0 --precision bf16 --deterministic
  diag --batch 1 --seq 1024 --steps 20 --warmup 0 --precision fp32,bf16
  diag --batch 16 --seq 64 --steps 20 --warmup 0 --precision fp32,bf16
  diag --batch 1 --seq 64 --steps 20 --warmup 0 --precision fp32,bf16
  grep -E '^(===|compare-bf16 done|step [0-9]+:|(fp32|bf16) +(ok|FAILED|losses)|.*<-- off)' "$out/bf16_diag.log" || true
fi

# ---- 4. optional: compute-sanitizer ---------------------------------------------------------
if [[ ${SPOTRAIN_GPU_SANITIZE:-0} == 1 ]]; then
  sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  ops_test=""
  for t in "${tests[@]}"; do [[ $(basename "$t") == gpu_ops_test ]] && ops_test=$t; done
  if [[ -x $sanitizer && -n $ops_test ]]; then
    log "compute-sanitizer memcheck on gpu_ops_test"
    timeout --kill-after=10 "${SPOTRAIN_SANITIZE_TIMEOUT:-180}" "$sanitizer" --tool memcheck \
      --error-exitcode 99 "$ops_test" --gtest_color=no >"$out/sanitize.log" 2>&1 </dev/null
    src=$?
    summary_rows+=("| compute-sanitizer memcheck gpu_ops_test | $([[ $src == 0 ]] && echo ok || echo "FAILED (exit $src)") | $(grep -cE '^=========.*(Invalid|Error)' "$out/sanitize.log") error lines | |")
    ((src != 0)) && tests_failed=1
  else
    summary_rows+=("| compute-sanitizer | not run (no compute-sanitizer or gpu_ops_test) | | |")
  fi
fi

# ---- 5. optional: kernel profile -------------------------------------------------------------
profile_rc=0
if [[ ${SPOTRAIN_GPU_PROFILE:-0} == 1 ]]; then
  profiler=""
  for c in "$script_dir/../../bench/gpu/profile_kernels.sh" "$PWD/bench/gpu/profile_kernels.sh"; do
    [[ -f $c ]] && { profiler=$c; break; }
  done
  if [[ -n $profiler ]]; then
    log "kernel profile of one bf16 step (Nsight Compute)"
    profile_dir=$(mktemp -d)
    timeout --kill-after=10 "${SPOTRAIN_PROFILE_TIMEOUT:-240}" bash "$profiler" "$profile_dir" \
      "$bench" </dev/null || profile_rc=$?
    [[ -f $profile_dir/kernels.md ]] && cp "$profile_dir/kernels.md" "$out/kernels.md"
    summary_rows+=("| kernel profile (kernels.md) | $([[ $profile_rc == 0 ]] && echo ok || echo "FAILED (exit $profile_rc)") | | |")
    if [[ -n $baseline_bin ]]; then  # the baseline's kernels, for a table per kernel
      log "kernel profile of one bf16 step of the baseline"
      base_rc=0
      timeout --kill-after=10 "${SPOTRAIN_PROFILE_TIMEOUT:-240}" bash "$profiler" \
        "$profile_dir/baseline" "$baseline_bin" </dev/null || base_rc=$?
      [[ -f $profile_dir/baseline/kernels.md ]] &&
        cp "$profile_dir/baseline/kernels.md" "$out/kernels-baseline.md"
      summary_rows+=("| kernel profile of the baseline (kernels-baseline.md) | $([[ $base_rc == 0 ]] && echo ok || echo "FAILED (exit $base_rc)") | | |")
    fi
  else
    summary_rows+=("| kernel profile | not run (bench/gpu/profile_kernels.sh not found) | | |")
  fi
fi

# ---- summary, last ---------------------------------------------------------------------------
{
  echo "## spotrain GPU checks, $(date -u +%FT%TZ)"
  echo
  echo "GPU: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)"
  echo
  echo "| check | result | counts | time |"
  echo "|---|---|---|---|"
  printf '%s\n' "${summary_rows[@]}"
  echo "| benchmark | $([[ $bench_rc == 0 ]] && echo ok || echo "FAILED (exit $bench_rc)") | see below | |"
  echo
  echo "Benchmark: GPT-2 124M, one GPU, uniformly random tokens (no dataset), AdamW, grad clip;"
  echo "MFU = (6N + 6LCT) x tokens/s / peak; peaks: fp32 = non-tensor fp32, tf32 = dense TF32,"
  echo "bf16 = dense bf16 tensor (H100 SXM: 67 / 495 / 989 TFLOP/s)."
  echo
  if ((bench_rc != 0)) && ! grep -q '^| precision' "$out/bench.log"; then
    echo "benchmark output (last lines):"
    tail -5 "$out/bench.log"
  fi
  sed -n '/^| precision/,$p' "$out/bench.log"
  if [[ -s $out/baseline.md ]]; then
    echo
    cat "$out/baseline.md"
  fi
  if [[ -s $out/bf16_diag.log ]]; then
    echo
    echo "bf16 diagnosis (bf16_diag.log$([[ $diag_rc == 0 ]] || echo ", SOME RUNS FAILED")):"
    echo
    echo '```'
    grep -E '^(===|compare-bf16 done|step [0-9]+:|(fp32|bf16) +(ok|FAILED|losses)|.*<-- off)' "$out/bf16_diag.log" |
      sed -E 's/ \(median [^)]*\)//'
    echo '```'
  fi
  if [[ -s $out/kernels.md ]]; then
    echo
    head -22 "$out/kernels.md"
  fi
} >"$out/summary.md"
log "done; logs in $out"
echo
cat "$out/summary.md"
((tests_failed == 0 && bench_rc == 0))
