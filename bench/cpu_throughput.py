#!/usr/bin/python3
"""CPU training throughput, one thread: spotrain's standalone worker against PyTorch training
the same architecture with AdamW, side by side in one run (issue: foundation).

For each preset the two programs run alternately (ROUNDS times each), so that both see the
same machine load; each run trains STEPS steps of batch 8 on one thread, and we take the
median ms/step after the first WARMUP steps. Peak RSS comes from wait4() of each process.

  OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 /usr/bin/python3 bench/cpu_throughput.py [--rounds 3]

Needs Debian's python3-torch (1.13) and libopenblas (see REFERENCE.md: without OpenBLAS torch
uses the slow reference BLAS). Prints a table and writes bench/out/cpu_throughput.json.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.environ.get("SPOTRAIN_BUILD_DIR", os.path.join(ROOT, "build"))
PRESETS = {"gpt-tiny": 128, "gpt-small": 256}  # name -> context (seq_len)


def run_measured(args, env):
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    # Read all output, then reap with wait4 to get this child's own peak RSS.
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"{args[0]} failed ({proc.returncode}):\n{stderr.decode()[-3000:]}")
    return stdout.decode(), usage.ru_maxrss / 1024.0


def spotrain_run(preset, seq_len, steps, warmup, data, env):
    config = {
        "model": preset,
        "data": {"train": f"{data}/train_*.bin", "val": f"{data}/val_*.bin"},
        "seq_len": seq_len, "global_batch": 8, "micro_batch": 8, "steps": steps,
        "eval_every": 0, "eval_batches": 1, "threads": 1,
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(config, f)
    out, rss = run_measured([os.path.join(BUILD, "bin", "spotrain-worker"), "--config", f.name],
                            env)
    os.unlink(f.name)
    ms = [float(m) for m in re.findall(r"\| ([0-9.]+) ms/step", out)][warmup:]
    return statistics.median(ms), rss


def torch_run(preset, steps, warmup, env):
    out, rss = run_measured(["/usr/bin/python3", os.path.join(ROOT, "bench", "torch_gpt.py"),
                             preset, "--steps", str(steps - warmup), "--warmup", str(warmup)],
                            env)
    return json.loads(out.strip().splitlines()[-1])["ms_per_step"], rss


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--data", default=os.path.join(ROOT, "data", "pystdlib"))
    args = parser.parse_args()
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    if not os.path.exists(os.path.join(args.data, "stats.json")):
        sys.exit(f"no corpus in {args.data}: run scripts/prepare_default_data.sh first")
    results = []
    for preset, seq_len in PRESETS.items():
        ours, theirs, ours_rss, theirs_rss = [], [], 0, 0
        for r in range(args.rounds):
            ms, rss = spotrain_run(preset, seq_len, args.steps, args.warmup, args.data, env)
            ours.append(ms)
            ours_rss = max(ours_rss, rss)
            ms, rss = torch_run(preset, args.steps, args.warmup, env)
            theirs.append(ms)
            theirs_rss = max(theirs_rss, rss)
            print(f"  {preset} round {r + 1}: spotrain {ours[-1]:.1f} ms/step, "
                  f"pytorch {theirs[-1]:.1f} ms/step", file=sys.stderr, flush=True)
        tokens = 8 * seq_len
        o, t = statistics.median(ours), statistics.median(theirs)
        results.append({
            "preset": preset, "batch": 8, "seq_len": seq_len,
            "spotrain_ms_per_step": o, "pytorch_ms_per_step": t,
            "spotrain_tokens_per_s": tokens / (o / 1000), "pytorch_tokens_per_s": tokens / (t / 1000),
            "ratio": t / o, "spotrain_peak_rss_mib": ours_rss, "pytorch_peak_rss_mib": theirs_rss,
        })
    print(f"\nCPU training throughput, 1 thread, batch 8, median of {args.rounds} interleaved runs "
          f"x {args.steps - args.warmup} steps ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores)")
    print(f"{'preset':<10} {'spotrain tok/s':>15} {'pytorch tok/s':>14} {'ratio':>6} "
          f"{'spotrain RSS MiB':>17} {'pytorch RSS MiB':>16}")
    for r in results:
        print(f"{r['preset']:<10} {r['spotrain_tokens_per_s']:>15.0f} {r['pytorch_tokens_per_s']:>14.0f} "
              f"{r['ratio']:>6.2f} {r['spotrain_peak_rss_mib']:>17.0f} {r['pytorch_peak_rss_mib']:>16.0f}")
    os.makedirs(os.path.join(ROOT, "bench", "out"), exist_ok=True)
    with open(os.path.join(ROOT, "bench", "out", "cpu_throughput.json"), "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d"), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
