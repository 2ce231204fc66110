#!/usr/bin/env python3
"""The elastic demo driven by the integration harness (see scripts/demo.sh)."""
import argparse
import json
import os
import re
import shutil
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--build-dir", default="build")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--kill-at", type=int, default=100)
    parser.add_argument("--join-at", type=int, default=180)
    args = parser.parse_args()
    os.environ["SPOTRAIN_BUILD_DIR"] = os.path.abspath(os.path.join(ROOT, args.build_dir))
    import harness

    workdir = os.path.join(ROOT, "runs", "demo")
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    data = os.path.join(ROOT, "data", "pystdlib")
    config = {
        "model": "gpt-tiny",
        "data": {"train": f"{data}/train_*.bin", "val": f"{data}/val_*.bin"},
        "seq_len": 128, "global_batch": 8, "micro_batch": 2, "steps": args.steps,
        "optimizer": {"lr": 0.003, "warmup_steps": 20},
        "eval_every": 50, "min_workers": 1, "max_workers": 8,
        "heartbeat_ms": 200, "heartbeat_timeout_ms": 2000,
        "join_settle_ms": 500, "op_timeout_ms": 5000,
    }
    cluster = harness.Cluster("demo", config, workdir=workdir, keep=True)
    ok = False
    try:
        print(f"demo: coordinator on {cluster.address}, logs in {workdir}", flush=True)
        cluster.start_coordinator()
        for _ in range(3):
            cluster.start_worker()
        cluster.wait_status(lambda s: s["world_size"] == 3, 120, "3 workers training")
        print("demo: 3 workers training gpt-tiny on the Python standard library", flush=True)
        cluster.wait_step(args.kill_at, 600)
        victim = cluster.workers["w2"]
        victim.signal(signal.SIGKILL)
        print(f"demo: step {cluster.status()['step']}: kill -9 w2 (pid {victim.pid})",
              flush=True)
        cluster.wait_status(lambda s: s["world_size"] == 2, 120, "the survivors to regroup")
        cluster.wait_step(args.join_at, 600)
        cluster.start_worker("w4")
        print(f"demo: step {cluster.status()['step']}: new worker w4 starts", flush=True)
        cluster.wait_status(lambda s: s["world_size"] == 3, 120, "w4 to join")
        cluster.wait_done(timeout=1200)
        ok = True
    finally:
        cluster.close(failed=not ok)

    summary = {}
    for name in ("w1", "w3", "w4"):
        out = cluster.workers[name].output()
        m = re.findall(r"done \| steps (\d+) \| final val loss ([0-9.]+) \| state_digest (\w+)",
                       out)
        if m:
            summary[name] = m[-1]
    print()
    print(f"steps: {args.steps}")
    if summary:
        steps, val, digest = next(iter(summary.values()))
        same = len({v[2] for v in summary.values()}) == 1
        print(f"final val loss: {val}   (unigram entropy of the corpus: "
              f"{json.load(open(os.path.join(data, 'stats.json')))['unigram_entropy_nats']:.4f})")
        print(f"state digest: {digest[:16]}... on {', '.join(summary)}"
              f" ({'identical' if same else 'DIFFERENT'} on every worker)")
    print()
    print(f"{'epoch':>5}  {'cause':<7} {'workers':<12} {'start':>5}  {'state from':<22}"
          f"{'recovery ms':>12} {'lost steps':>11}")
    for e in cluster.events():
        recovery = e.get("recovery", {})
        ms = recovery.get("first_step_ms")
        world = f"{len(e.get('members_before', []))} -> {len(e.get('members_after', []))}"
        print(f"{e.get('epoch', ''):>5}  {e.get('cause', ''):<7} {world:<12} "
              f"{e.get('start_step', ''):>5}  {str(e.get('state_source', '')):<22}"
              f"{(f'{ms:.0f}' if isinstance(ms, (int, float)) else '-'):>12} "
              f"{e.get('lost_steps', 0):>11}")
    print("\nrecovery ms: from the detection of the change to the first step completed in the "
          "new epoch (events.jsonl has the full timeline)")


if __name__ == "__main__":
    main()
