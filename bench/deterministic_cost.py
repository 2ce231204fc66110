#!/usr/bin/env python3
"""What deterministic mode costs: step time with `"deterministic": true` (int64 fixed-point
gradient sums) against the default mode (fp32 sums), in the same elastic run.

For each model, a coordinator and N workers (tests/integration/harness.py) train the same
config twice, once per mode, the modes alternating over --repeats rounds so that a change in
the machine's load hits both. The step time is the median of the workers' `ms/step` progress
lines after --warmup steps, over all workers and rounds. Prints one table row per model with
the ratio deterministic / default of those pooled medians, and the median (and range) of the
per-round ratios, which pair runs made close in time (target <= 1.15).

  bench/deterministic_cost.py [--models gpt-tiny,gpt-small] [--workers 3] [--repeats 2]
                              [--shapes 64x6x1,128x8x2]

Environment: SPOTRAIN_BUILD_DIR (default build/). Never run by ctest.
"""
import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests",
                                "integration"))
from harness import Cluster, small_config, step_times_ms, write_corpus  # noqa: E402

DEFAULT_STEPS = {"gpt-tiny": 60, "gpt-small": 40, "gpt2-124m": 12}


def run_once(data, model, deterministic, args):
    steps = args.steps or DEFAULT_STEPS.get(model, 30)
    config = small_config(data, model=model, deterministic=deterministic, steps=steps,
                          seq_len=args.seq_len, global_batch=args.global_batch,
                          micro_batch=args.micro_batch,
                          heartbeat_timeout_ms=10000, op_timeout_ms=60000)
    cluster = Cluster(f"detcost-{model}", config)
    ok = False
    try:
        cluster.start_coordinator()
        for _ in range(args.workers):
            cluster.start_worker()
        start = time.monotonic()
        cluster.wait_done(timeout=args.timeout)
        wall = time.monotonic() - start
        samples = []
        for proc in cluster.workers.values():
            samples += [ms for step, ms in step_times_ms(proc.output()) if step > args.warmup]
        if not samples:
            raise RuntimeError(f"{model}: no progress lines after step {args.warmup}")
        ok = True
        return samples, wall
    finally:
        cluster.close(failed=not ok)


def measure_shape(data, args):
    """Both modes for every model at one shape; prints the progress and a table."""
    load = os.getloadavg()
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {platform.node()}, {os.cpu_count()} CPUs, "
          f"load average {load[0]:.2f} at start; {args.workers} workers, seq_len {args.seq_len}, "
          f"global_batch {args.global_batch}, micro_batch {args.micro_batch}, "
          f"warm-up {args.warmup} steps, "
          f"{args.repeats} round(s)", flush=True)
    rows = []
    for model in args.models.split(","):
        samples = {True: [], False: []}
        walls = {True: [], False: []}
        paired = []  # per round: deterministic median / default median (same load, roughly)
        for r in range(args.repeats):
            order = (False, True) if r % 2 == 0 else (True, False)
            medians = {}
            for deterministic in order:
                s, wall = run_once(data, model, deterministic, args)
                samples[deterministic] += s
                walls[deterministic].append(wall)
                medians[deterministic] = statistics.median(s)
                print(f"  {model} round {r + 1} {'deterministic' if deterministic else 'default'}"
                      f": median {statistics.median(s):.1f} ms/step ({len(s)} samples), "
                      f"run {wall:.1f} s", flush=True)
            paired.append(medians[True] / medians[False])
        base = statistics.median(samples[False])
        det = statistics.median(samples[True])
        rows.append((model, base, det, det / base, statistics.median(paired), min(paired),
                     max(paired), statistics.median(walls[False]),
                     statistics.median(walls[True])))
    print()
    print("| model | default ms/step | deterministic ms/step | ratio (pooled medians) | "
          "ratio per round: median (min-max) | run s default / det |")
    print("| --- | --- | --- | --- | --- | --- |")
    for model, base, det, ratio, pr, lo, hi, wb, wd in rows:
        mark = "" if pr <= 1.15 else " (over 1.15)"
        print(f"| {model} | {base:.1f} | {det:.1f} | {ratio:.3f} | {pr:.3f}{mark} "
              f"({lo:.2f}-{hi:.2f}) | {wb:.1f} / {wd:.1f} |")
    load = os.getloadavg()
    print(f"# load average {load[0]:.2f} at the end (other work on the machine counts)")


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="gpt-tiny,gpt-small")
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2, help="rounds (each runs both modes)")
    p.add_argument("--steps", type=int, default=0,
                   help="steps per run (default: 60 for gpt-tiny, 40 for gpt-small)")
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the median")
    p.add_argument("--shapes", default="64x6x1,128x8x2",
                   help="comma-separated SEQ_LENxGLOBAL_BATCHxMICRO_BATCH, each measured in "
                   "turn; default: the worst case (64 tokens per micro-batch: the fixed-point "
                   "conversion is paid once per micro-batch, so more tokens dilute it) and the "
                   "demo's shape (examples/tiny.json)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per run")
    args = p.parse_args(argv[1:])

    work = tempfile.mkdtemp(prefix="spotrain-detcost-")
    data = write_corpus(os.path.join(work, "data"), tokens=200000)
    for shape in args.shapes.split(","):
        try:
            args.seq_len, args.global_batch, args.micro_batch = (int(x) for x in shape.split("x"))
        except ValueError:
            p.error(f"--shapes: '{shape}' is not SEQ_LENxGLOBAL_BATCHxMICRO_BATCH (e.g. 64x6x1)")
        measure_shape(data, args)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
