#!/usr/bin/python3
"""Recovery and scale-up benchmarks of elastic training on the CPU (issue: elastic).

  /usr/bin/python3 bench/recovery.py [--trials 5] [--skip-torch]

1. Recovery: 3 workers train gpt-tiny (checkpoint every 10 steps); one is killed with -9 in
   the middle of the run; we time the kill to the next step completed by the survivors, with
   its breakdown from the coordinator's events.jsonl (detect, plan, rebuild, sync, redo) and
   the steps lost. The same with torchrun (TorchElastic 1.13, c10d rendezvous, 3 single-process
   nodes, same model, checkpoint every 10 steps): kill -9 one node, time to the next completed
   step of the restarted workers, and steps rolled back.
2. Scale-up: 2 workers, a third starts; time from its Join to its first completed step.
   Throughput: 1 worker, a second joins; the run's tokens/s before and after (on a machine
   with a free core for the second worker, it should nearly double).
Prints tables and writes bench/out/recovery.json. The overhead of one worker under a
coordinator against the standalone worker is bench/overhead.py.
"""
import argparse
import datetime
import glob
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
os.environ.setdefault("SPOTRAIN_BUILD_DIR", os.path.join(ROOT, "build"))
import harness  # noqa: E402

DATA = os.path.join(ROOT, "data", "pystdlib")


def parse_time(s):
    return datetime.datetime.strptime(s, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=datetime.timezone.utc).timestamp()


def config(workdir, steps=200, **extra):
    c = {
        "model": "gpt-tiny",
        "data": {"train": f"{DATA}/train_*.bin", "val": f"{DATA}/val_*.bin"},
        "seq_len": 128, "global_batch": 8, "micro_batch": 2, "steps": steps,
        "eval_every": 0, "eval_batches": 1,
        "checkpoint": {"dir": os.path.join(workdir, "ckpt"), "every_steps": 10, "keep": 2},
        "heartbeat_ms": 200, "heartbeat_timeout_ms": 2000, "join_settle_ms": 200,
        "op_timeout_ms": 5000,
    }
    c.update(extra)
    return c


def wait_event(cluster, predicate, timeout):
    def find():
        for e in cluster.events():
            if predicate(e) and isinstance(e.get("recovery", {}).get("first_step_ms"), (int, float)):
                return e
        return None
    return harness.wait_until(find, timeout, "a recovery event with its timeline", 0.05)


def spotrain_recovery_trial(i):
    work = tempfile.mkdtemp(prefix="bench-recovery-")
    cluster = harness.Cluster(f"recovery{i}", config(work), workdir=work)
    try:
        cluster.start_coordinator()
        for _ in range(3):
            cluster.start_worker()
        cluster.wait_status(lambda s: s["world_size"] == 3 and s["step"] >= 15, 300, "3 workers")
        t_kill = time.time()
        cluster.workers["w3"].signal(signal.SIGKILL)
        e = wait_event(cluster, lambda e: e.get("cause") == "lost", 120)
        r = e["recovery"]
        detect = (parse_time(e["time"]) - t_kill) * 1000
        out = {
            "total_ms": detect + r["first_step_ms"], "detect_ms": detect,
            "plan_ms": r["plan_sent_ms"],
            "rebuild_ms": r["group_rebuilt_ms"] - r["plan_sent_ms"],
            "sync_ms": r["state_synced_ms"] - r["group_rebuilt_ms"],
            "redo_ms": r["first_step_ms"] - r["state_synced_ms"],
            "lost_steps": e.get("lost_steps", 0), "state_source": e.get("state_source"),
        }
        return out
    finally:
        cluster.close()


def spotrain_scaleup_trial(i):
    work = tempfile.mkdtemp(prefix="bench-scaleup-")
    cluster = harness.Cluster(f"scaleup{i}", config(work), workdir=work)
    try:
        cluster.start_coordinator()
        cluster.start_worker()
        cluster.start_worker()
        cluster.wait_status(lambda s: s["world_size"] == 2 and s["step"] >= 10, 300, "2 workers")
        t_start = time.time()
        cluster.start_worker("joiner")
        e = wait_event(cluster, lambda e: e.get("cause") == "joined" and e.get("epoch", 0) > 1,
                       120)
        r = e["recovery"]
        join_time = parse_time(e["time"])
        return {"join_to_first_step_ms": r["first_step_ms"],
                "process_start_to_first_step_ms": (join_time - t_start) * 1000 + r["first_step_ms"],
                "settle_ms": r.get("prepare_sent_ms"), "lost_steps": e.get("lost_steps", 0)}
    finally:
        cluster.close()


def spotrain_throughput_trial(i):
    """1 worker, then a second joins: run tokens/s before and after (issue: tokens/s rises)."""
    work = tempfile.mkdtemp(prefix="bench-throughput-")
    c = config(work, steps=120)
    c.pop("checkpoint")
    cluster = harness.Cluster(f"throughput{i}", c, workdir=work)
    try:
        cluster.start_coordinator()
        cluster.start_worker()
        cluster.wait_status(lambda s: s["world_size"] == 1 and s["step"] >= 25, 300, "1 worker")
        cluster.start_worker("joiner")
        e = wait_event(cluster, lambda e: e.get("cause") == "joined" and e.get("epoch", 0) > 1,
                       120)
        join_step = e["start_step"]
        cluster.wait_done(600)
        times = harness.step_times_ms(cluster.workers["w1"].output())
        before = statistics.median(ms for step, ms in times if 5 < step <= join_step)
        after = statistics.median(ms for step, ms in times if step > join_step + 3)
        tokens = c["global_batch"] * c["seq_len"]
        return {"join_step": join_step, "tokens_per_s_1": tokens / before * 1000,
                "tokens_per_s_2": tokens / after * 1000, "rise": before / after}
    finally:
        cluster.close()


def median_ms(output, skip=5):
    ms = [float(m) for m in re.findall(r"\| ([0-9.]+) ms/step", output)]
    return statistics.median(ms[skip:])


def torch_recovery_trial(i):
    work = tempfile.mkdtemp(prefix="bench-torchrun-")
    port = harness.free_port()
    ckpt = os.path.join(work, "ckpt.pt")
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    procs, logs = [], []
    try:
        for node in range(3):
            log = os.path.join(work, f"node{node}.log")
            logs.append(log)
            procs.append(subprocess.Popen(
                ["/usr/bin/python3", "-m", "torch.distributed.run", "--nnodes", "2:3",
                 "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint",
                 f"127.0.0.1:{port}", "--rdzv_id", f"bench{i}", "--max_restarts", "10",
                 "--monitor_interval", "1", "--redirects", "1", "--tee", "1",
                 os.path.join(ROOT, "bench", "torch_elastic.py"), "--ckpt", ckpt,
                 "--steps", "200", "--every", "10"],
                stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env,
                start_new_session=True, cwd=work))
            if node == 0:
                time.sleep(1.0)  # let node 0 host the c10d store (not a wait for an event)

        def steps():
            out = []
            for log in logs[:2]:
                for line in open(log, errors="replace"):
                    m = re.search(r"(\{\"step\".*\})", line)
                    if m:
                        out.append(json.loads(m.group(1)))
            return out

        harness.wait_until(lambda: any(s["step"] >= 15 and s["world"] == 3 for s in steps()), 300,
                           "torchrun to reach step 15 with 3 nodes")
        before = steps()
        old_pids = {s["pid"] for s in before}
        last_before = max(s["step"] for s in before)
        t_kill = time.time()
        os.killpg(procs[2].pid, signal.SIGKILL)
        after = harness.wait_until(
            lambda: [s for s in steps() if s["pid"] not in old_pids and s["time"] > t_kill], 600,
            "torchrun's restarted workers to complete a step")
        first = min(after, key=lambda s: s["time"])
        return {"total_ms": (first["time"] - t_kill) * 1000,
                "rolled_back_steps": last_before - (first["step"] - 1),
                "world_after": first["world"]}
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--torch-trials", type=int, default=3)
    parser.add_argument("--skip-torch", action="store_true")
    args = parser.parse_args()
    if not os.path.exists(os.path.join(DATA, "stats.json")):
        sys.exit("run scripts/prepare_default_data.sh first")
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "cores": os.cpu_count()}
    rec = []
    for i in range(args.trials):
        rec.append(spotrain_recovery_trial(i))
        print(f"  spotrain trial {i + 1}: {rec[-1]['total_ms']:.0f} ms, lost {rec[-1]['lost_steps']}",
              file=sys.stderr, flush=True)
    result["spotrain_recovery"] = rec
    torch = []
    if not args.skip_torch:
        for i in range(args.torch_trials):
            torch.append(torch_recovery_trial(i))
            print(f"  torchrun trial {i + 1}: {torch[-1]['total_ms']:.0f} ms, rolled back "
                  f"{torch[-1]['rolled_back_steps']}", file=sys.stderr, flush=True)
    result["torchrun_recovery"] = torch
    scale = [spotrain_scaleup_trial(i) for i in range(args.trials)]
    result["scaleup"] = scale
    rise = [spotrain_throughput_trial(i) for i in range(args.trials)]
    result["throughput_rise"] = rise

    med = lambda xs, k: statistics.median(x[k] for x in xs)
    print(f"\nRecovery from kill -9 of 1 of 3 workers (gpt-tiny, CPU, {os.cpu_count()} cores, "
          f"{result['date']}), medians of {len(rec)} trials")
    print(f"{'':<10} {'total ms':>9} {'detect':>7} {'plan':>6} {'rebuild':>8} {'sync':>6} "
          f"{'redo':>6} {'lost steps':>11}")
    print(f"{'spotrain':<10} {med(rec, 'total_ms'):>9.0f} {med(rec, 'detect_ms'):>7.0f} "
          f"{med(rec, 'plan_ms'):>6.0f} {med(rec, 'rebuild_ms'):>8.0f} {med(rec, 'sync_ms'):>6.0f} "
          f"{med(rec, 'redo_ms'):>6.0f} {max(r['lost_steps'] for r in rec):>11}")
    if torch:
        print(f"{'torchrun':<10} {med(torch, 'total_ms'):>9.0f} {'':>7} {'':>6} {'':>8} {'':>6} "
              f"{'':>6} {max(t['rolled_back_steps'] for t in torch):>11}")
        print(f"speed-up: {med(torch, 'total_ms') / med(rec, 'total_ms'):.0f}x")
    print(f"\nScale-up 2 -> 3 workers: Join to first completed step, median "
          f"{med(scale, 'join_to_first_step_ms'):.0f} ms (process start to first step "
          f"{med(scale, 'process_start_to_first_step_ms'):.0f} ms; includes join_settle_ms 200)")
    print(f"Throughput 1 -> 2 workers (a second worker joins a running one): median "
          f"{med(rise, 'tokens_per_s_1'):.0f} -> {med(rise, 'tokens_per_s_2'):.0f} tokens/s, "
          f"x{med(rise, 'rise'):.2f} (run tokens/s from the first worker's ms/step; "
          f"{os.cpu_count()} cores)")
    os.makedirs(os.path.join(ROOT, "bench", "out"), exist_ok=True)
    with open(os.path.join(ROOT, "bench", "out", "recovery.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
