#!/usr/bin/env python3
"""Checkpoint and restart scenarios on localhost (issue: sharded checkpoints).

Every scenario runs in deterministic mode, so whatever is lost and redone, the final state
digest must equal that of the uninterrupted standalone run of the same config.

  checkpoint_test.py [scenario...]
"""
import glob
import os
import signal
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (Cluster, TestFailure, check, run_cluster, run_scenarios,
                     small_config, standalone_digest, wait_until, write_corpus)

WORK = tempfile.mkdtemp(prefix="spotrain-ckpt-")
DATA = write_corpus(os.path.join(WORK, "data"))
EVERY = 10


def config_for(name, steps=60):
    return small_config(DATA, deterministic=True, steps=steps,
                        checkpoint={"dir": os.path.join(WORK, name, "ckpt"),
                                    "every_steps": EVERY, "keep": 3})


def reference(config):
    plain = dict(config)
    plain.pop("checkpoint")
    return standalone_digest(plain, WORK)


def committed(config):
    root = config["checkpoint"]["dir"]
    return sorted(int(os.path.basename(os.path.dirname(p))[5:])
                  for p in glob.glob(f"{root}/step-*/manifest.json"))


def check_digests(cluster, config, names):
    want = reference(config)
    digests = cluster.digests()
    for name in names:
        check(digests.get(name) == want,
              f"{name}: digest {digests.get(name, 'none')[:16]} != reference {want[:16]}")


def kill_all_workers(c):
    for proc in c.workers.values():
        proc.signal(signal.SIGKILL)
    for proc in c.workers.values():
        proc.wait(60)


def scenario_full_wipe():
    config = config_for("full_wipe")

    def body(c):
        for _ in range(3):
            c.start_worker()
        wait_until(lambda: any(s >= 20 for s in committed(config)), 180,
                   "checkpoint 20 to be committed")
        status = c.status()
        kill_all_workers(c)
        c.wait_status(lambda s: s["world_size"] == 0 or s["state"] in ("paused", "waiting"),
                      60, "the coordinator to notice the wipe")
        last = max(committed(config))
        c.start_worker("n1")
        c.start_worker("n2")
        c.wait_done(300)
        check_digests(c, config, ["n1", "n2"])
        restored = [e for e in c.events() if "checkpoint" in str(e.get("state_source", "")).lower()]
        check(restored, f"no restore from a checkpoint in events: {c.events()}")
        lost = restored[-1].get("lost_steps", 0)
        check(lost <= EVERY, f"lost {lost} steps after a full wipe (at most {EVERY})")
        check(last >= 20, f"last committed {last}")
    run_cluster("full_wipe", config, body)


def scenario_corrupt_newest():
    config = config_for("corrupt_newest")

    def body(c):
        for _ in range(2):
            c.start_worker()
        wait_until(lambda: len([s for s in committed(config) if s >= 20]) >= 1, 180,
                   "two checkpoints to be committed")
        kill_all_workers(c)
        steps = committed(config)
        newest = steps[-1]
        shard = sorted(glob.glob(f"{config['checkpoint']['dir']}/step-{newest:08d}/shard-*"))[0]
        with open(shard, "r+b") as f:
            f.seek(200)
            byte = f.read(1)
            f.seek(200)
            f.write(bytes([byte[0] ^ 0xFF]))
        c.start_worker("n1")
        c.start_worker("n2")
        c.start_worker("n3")
        c.wait_done(300)
        check_digests(c, config, ["n1", "n2", "n3"])
        log = c.workers["n1"].output()
        check(os.path.basename(shard) in log and "skipped" in log,
              f"the worker did not say which file failed:\n{c.workers['n1'].tail()}")
    run_cluster("corrupt_newest", config, body)


def scenario_coordinator_restart_live():
    config = config_for("coord_restart", steps=80)

    def body(c):
        for _ in range(3):
            c.start_worker()
        c.wait_step(15, 180)
        c.coordinator.signal(signal.SIGKILL)
        c.coordinator.wait(30)
        before = max(int(l.split("step ")[1].split("/")[0])
                     for l in c.workers["w1"].output().splitlines() if l.startswith("step "))
        c.start_coordinator()
        # The workers keep training through the outage and re-join.
        c.wait_status(lambda s: s["world_size"] == 3, 120, "the workers to re-join")
        c.wait_done(300)
        check_digests(c, config, ["w1", "w2", "w3"])
        check(sum(e.get("lost_steps", 0) for e in c.events()) <= 1,
              f"steps rolled back after a coordinator restart: {c.events()}")
    run_cluster("coordinator_restart_live", config, body)


def scenario_coordinator_restart_empty():
    config = config_for("coord_restart_empty")

    def body(c):
        for _ in range(2):
            c.start_worker()
        wait_until(lambda: any(s >= 20 for s in committed(config)), 180, "checkpoint 20")
        kill_all_workers(c)
        c.coordinator.signal(signal.SIGKILL)
        c.coordinator.wait(30)
        c.start_coordinator()
        c.start_worker("n1")
        c.wait_done(300)
        check_digests(c, config, ["n1"])
    run_cluster("coordinator_restart_empty", config, body)


def scenario_unwritable_dir():
    """A checkpoint dir that cannot be created stops the run from starting, naming the path:
    the coordinator refuses to start, and so does a worker given such a config."""
    import subprocess
    from harness import BIN
    config = config_for("unwritable")
    parent = os.path.join(WORK, "unwritable")
    os.makedirs(parent, exist_ok=True)
    blocker = config["checkpoint"]["dir"]
    with open(blocker, "w") as f:  # a file where the directory should be
        f.write("not a directory")
    cluster = Cluster("unwritable", config)
    try:
        out = subprocess.run([os.path.join(BIN, "spotrain-coordinator"), "--config",
                              cluster.config_path, "--port", str(cluster.port), "--state-dir",
                              cluster.state_dir], capture_output=True, text=True, timeout=60,
                             env=cluster.env)
        check(out.returncode != 0, "the coordinator started with an unusable checkpoint dir")
        check(blocker in out.stderr + out.stdout,
              f"the coordinator's error does not name the path:\n{out.stderr[-2000:]}")
    finally:
        cluster.close()


SCENARIOS = {
    "full_wipe": scenario_full_wipe,
    "corrupt_newest": scenario_corrupt_newest,
    "coordinator_restart_live": scenario_coordinator_restart_live,
    "coordinator_restart_empty": scenario_coordinator_restart_empty,
    "unwritable_dir": scenario_unwritable_dir,
}

if __name__ == "__main__":
    sys.exit(run_scenarios(SCENARIOS, sys.argv))
