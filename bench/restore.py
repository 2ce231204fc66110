#!/usr/bin/python3
"""Restore time after a full wipe, into 1, 2 and 4 workers (issue: sharded checkpoints).

2 workers train gpt-small (checkpoint every 10 steps) until step 20 is committed; every worker
is killed with -9; then W new workers start and the run resumes from the checkpoint. Reports,
per W: the restore time each worker logs (read + verify every shard + digest check), the time
from the new workers' start to their first completed step, and the steps lost (at most
every_steps).

  /usr/bin/python3 bench/restore.py
"""
import glob
import os
import re
import signal
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
os.environ.setdefault("SPOTRAIN_BUILD_DIR", os.path.join(ROOT, "build"))
import harness  # noqa: E402

DATA = os.path.join(ROOT, "data", "pystdlib")


def trial(world):
    work = tempfile.mkdtemp(prefix="bench-restore-")
    config = {
        "model": "gpt-small",
        "data": {"train": f"{DATA}/train_*.bin", "val": f"{DATA}/val_*.bin"},
        "seq_len": 64, "global_batch": 4, "micro_batch": 1, "steps": 200, "eval_every": 0,
        "eval_batches": 1, "heartbeat_ms": 200, "heartbeat_timeout_ms": 2000,
        "join_settle_ms": 200, "op_timeout_ms": 10000,
        "checkpoint": {"dir": os.path.join(work, "ckpt"), "every_steps": 10, "keep": 2},
    }
    cluster = harness.Cluster(f"restore{world}", config, workdir=work)
    try:
        cluster.start_coordinator()
        for _ in range(2):
            cluster.start_worker()
        harness.wait_until(lambda: glob.glob(f"{work}/ckpt/step-00000020/manifest.json"), 600,
                           "checkpoint 20")
        for p in list(cluster.workers.values()):
            p.signal(signal.SIGKILL)
            p.wait(60)
        reached = cluster.status()["step"]
        t0 = time.time()
        names = [f"n{i}" for i in range(world)]
        for n in names:
            cluster.start_worker(n)

        def restored():
            out = []
            for n in names:
                m = re.findall(r"restored checkpoint step (\d+) \(written by (\d+) ranks\) in "
                               r"([0-9.]+) s, (\d+) bytes", cluster.workers[n].output())
                if not m:
                    return None
                out.append(m[-1])
            return out
        rows = harness.wait_until(restored, 600, "every new worker to restore")
        step = int(rows[0][0])
        harness.wait_until(lambda: all(re.search(rf"step {step + 1}/", cluster.workers[n].output())
                                       for n in names), 600, "the first step after the restore")
        first_step_s = time.time() - t0
        return {"world": world, "restore_s": max(float(r[2]) for r in rows),
                "bytes_per_worker": int(rows[0][3]), "first_step_s": first_step_s,
                "lost_steps": reached - step}
    finally:
        cluster.close()


def main():
    if not os.path.exists(os.path.join(DATA, "stats.json")):
        sys.exit("run scripts/prepare_default_data.sh first")
    rows = [trial(w) for w in (1, 2, 4)]
    print(f"\nRestore after a full wipe, gpt-small state (58 MB), written by 2 ranks "
          f"({time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores)")
    print(f"{'workers':>7} {'restore s':>10} {'MB read/worker':>15} {'start->first step s':>20} "
          f"{'lost steps':>11}")
    for r in rows:
        print(f"{r['world']:>7} {r['restore_s']:>10.2f} {r['bytes_per_worker'] / 1e6:>15.1f} "
              f"{r['first_step_s']:>20.2f} {r['lost_steps']:>11}")
    print("restore s: read and verify every shard, set the state, check the manifest's digest "
          "(each worker reads the whole state); lost steps: progress past the checkpoint "
          "(at most checkpoint.every_steps = 10)")


if __name__ == "__main__":
    main()
