#!/usr/bin/python3
"""Overhead of elastic training (issue: elastic): one worker under a coordinator against the
standalone worker (`spotrain-worker --config`, no coordinator, no Gloo), same config.

  /usr/bin/python3 bench/overhead.py [--trials 7] [--steps 60]

Each trial runs the standalone worker, then the same config as a one-worker elastic run
(coordinator, heartbeats, in-band control round, Gloo group of one), back to back, so both
see the same machine load. Reports the median ms/step of each (after 5 warm-up steps), the
ratio of the pooled medians, and the median and range of the per-trial ratios. Target: ratio
<= 1.02. Writes bench/out/overhead.json. Run it on a quiet machine: a concurrent build moves
single trials by 10% either way.
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import recovery  # noqa: E402  (its config, harness setup and trial helpers)


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
        standalone, elastic = recovery.overhead_trial(steps=args.steps)
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
