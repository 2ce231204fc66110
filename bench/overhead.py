#!/usr/bin/python3
"""Overhead of elastic training (issue: elastic): one worker under a coordinator against the
standalone worker (`spotrain-worker --config`, no coordinator, no Gloo), same config.

  /usr/bin/python3 bench/overhead.py [--trials 7] [--steps 60]

Each trial runs the standalone worker and the same config as a one-worker elastic run
(coordinator, heartbeats, in-band control round, Gloo group of one) back to back, so both
see the same machine load; the order alternates between trials so that neither side always
runs first (warm page cache, CPU frequency). Reports the median ms/step of each (after 5 warm-up steps), the
ratio of the pooled medians, and the median and range of the per-trial ratios. Target: ratio
<= 1.02. Writes bench/out/overhead.json. Run it on a quiet machine: a concurrent build moves
single trials by 10% either way.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import recovery  # noqa: E402  (its config and harness setup)
from recovery import harness, median_ms  # noqa: E402


def overhead_trial(steps, standalone_first):
    """(standalone ms/step, one worker under a coordinator ms/step), same config."""
    work = tempfile.mkdtemp(prefix="bench-overhead-")
    c = recovery.config(work, steps=steps)
    c.pop("checkpoint")
    # Not in `work`: closing the cluster removes its workdir.
    path = os.path.join(tempfile.mkdtemp(prefix="bench-overhead-config-"), "run.json")
    with open(path, "w") as f:
        json.dump(c, f)

    def standalone():
        run = subprocess.run([os.path.join(harness.BIN, "spotrain-worker"), "--config", path],
                             capture_output=True, text=True)
        if run.returncode != 0:
            sys.exit(f"standalone worker exited {run.returncode}:\n{run.stderr[-2000:]}")
        return median_ms(run.stdout)

    def elastic():
        cluster = harness.Cluster("overhead", c, workdir=work)
        try:
            cluster.start_coordinator()
            cluster.start_worker()
            cluster.wait_done(600)
            return median_ms(cluster.workers["w1"].output())
        finally:
            cluster.close()

    if standalone_first:
        s = standalone()
        return s, elastic()
    e = elastic()
    return standalone(), e


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=7)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    if not os.path.exists(os.path.join(recovery.DATA, "stats.json")):
        sys.exit("run scripts/prepare_default_data.sh first")
    load = os.getloadavg()[0]
    pairs = []
    for i in range(args.trials):
        standalone, elastic = overhead_trial(args.steps, standalone_first=(i % 2 == 0))
        pairs.append((standalone, elastic))
        print(f"  trial {i + 1}: standalone {standalone:.1f} ms/step, under a coordinator "
              f"{elastic:.1f} ms/step, ratio {elastic / standalone:.3f}", file=sys.stderr,
              flush=True)
    standalone = statistics.median(p[0] for p in pairs)
    elastic = statistics.median(p[1] for p in pairs)
    ratios = [p[1] / p[0] for p in pairs]
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "cores": os.cpu_count(),
              "load_at_start": load, "standalone_ms": standalone, "elastic_ms": elastic,
              "ratio": elastic / standalone, "ratio_median": statistics.median(ratios),
              "ratio_min": min(ratios), "ratio_max": max(ratios), "pairs": pairs}
    print(f"\nOverhead of one worker under a coordinator against standalone (gpt-tiny, CPU, "
          f"{os.cpu_count()} cores, {result['date']}, load {load:.2f} at start), "
          f"{len(pairs)} trials")
    print(f"standalone {standalone:.1f} ms/step, under a coordinator {elastic:.1f} ms/step: "
          f"ratio of medians {result['ratio']:.3f}; per-trial ratios median "
          f"{result['ratio_median']:.3f} (range {result['ratio_min']:.3f}-{result['ratio_max']:.3f}); "
          f"target <= 1.02")
    os.makedirs(os.path.join(recovery.ROOT, "bench", "out"), exist_ok=True)
    with open(os.path.join(recovery.ROOT, "bench", "out", "overhead.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
