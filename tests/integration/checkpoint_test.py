#!/usr/bin/env python3
"""Checkpoint and restart scenarios on localhost (issue: sharded checkpoints).

Every scenario runs in deterministic mode, so whatever is lost and redone, the final state
digest must equal that of the uninterrupted standalone run of the same config.

  checkpoint_test.py [scenario...]
"""
import glob
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (BIN, Cluster, TestFailure, check, free_port, run_cluster, run_scenarios,
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


def interval_decisions(c):
    return [e for e in c.events() if e.get("event") == "checkpoint_interval"]


def wait_measured_decision(c):
    """Waits for the first interval decision made from a measured checkpoint cost (the initial
    interval, 20 steps, gives the first measurement); returns the newest such decision."""
    def measured():
        return [d for d in interval_decisions(c) if d["reason"] == "measured"]
    wait_until(measured, 180, "a decision from a measured checkpoint cost")
    return measured()[-1]


def commits_logged(c):
    """Steps of every checkpoint the coordinator committed (pruned ones included)."""
    return [int(m) for m in re.findall(r"checkpoint step (\d+) committed", c.coordinator.output())]


def daly(cost, mtbl):
    """common/young_daly.cc's DalyInterval, to check a logged decision against its inputs."""
    if cost >= 2 * mtbl:
        return mtbl
    x = cost / (2 * mtbl)
    return max(0.0, math.sqrt(2 * cost * mtbl) * (1 + math.sqrt(x) / 3 + x / 9) - cost)


def check_decision(d):
    """A measured decision is what Young/Daly gives for its own logged inputs."""
    check(d["cost_s"] is not None and d["step_ms"] is not None and d["mtbl_s"] is not None,
          f"decision without its inputs: {d}")
    check(abs(d["daly_s"] - daly(d["cost_s"], d["mtbl_s"])) <= 1e-3 * max(1.0, d["daly_s"]),
          f"logged Daly interval does not follow from C and M: {d}")
    if d["bound"] == "none":
        want = round(d["interval_s"] * 1000 / d["step_ms"])
        check(abs(d["every_steps"] - max(1, want)) <= 1,
              f"every_steps {d['every_steps']} is not interval / step time ({want}): {d}")
    elif d["bound"] == "min":
        check(d["interval_s"] >= d["write_s"], f"interval below the write time: {d}")


def scenario_auto_interval():
    """every_steps "auto": the coordinator orders checkpoints periodically from a Young/Daly
    interval, logs each decision with its inputs, and a worker loss makes M, and with it the
    interval for the same cost, shrink."""
    config = small_config(DATA, deterministic=True, steps=240,
                          checkpoint={"dir": os.path.join(WORK, "auto", "ckpt"),
                                      "every_steps": "auto", "keep": 3, "mtbf_prior_s": 5})

    def body(c):
        for _ in range(3):
            c.start_worker()
        measured = wait_measured_decision(c)
        check(interval_decisions(c)[0]["reason"] == "initial" and
              interval_decisions(c)[0]["every_steps"] == 20,
              f"first decision is not the initial interval: {interval_decisions(c)}")
        check_decision(measured)
        check(measured["losses"] == 0, f"{measured}")
        status = c.status()
        check(status["checkpoint_interval_auto"] and status["checkpoint_every_steps"] >= 1,
              f"status does not show the auto interval: {status}")
        check("checkpoint interval (measured)" in c.coordinator.output(),
              "the coordinator log has no decision line")
        c.workers["w3"].signal(signal.SIGKILL)
        wait_until(lambda: [d for d in interval_decisions(c) if d["reason"] == "loss"], 120,
                   "a decision after the loss")
        decisions = interval_decisions(c)
        first_loss = next(i for i, d in enumerate(decisions) if d["reason"] == "loss")
        loss, before = decisions[first_loss], decisions[first_loss - 1]
        check(loss["losses"] == 1, f"loss decision: {loss}")
        check(loss["mtbl_s"] < before["mtbl_s"], f"M did not shrink: {before} -> {loss}")
        check_decision(loss)
        # For the same cost, the interval shrinks with M.
        check(daly(loss["cost_s"], loss["mtbl_s"]) < daly(loss["cost_s"], before["mtbl_s"]),
              f"interval did not shrink with M: {before} -> {loss}")
        c.wait_done(300)
        check_digests(c, config, ["w1", "w2"])
        periodic = [s for s in commits_logged(c) if s != config["steps"]]
        check(len(periodic) >= 2, f"checkpoints committed before the end: {commits_logged(c)}")
        print(f"decisions: {json.dumps(interval_decisions(c))}\ncommitted: {commits_logged(c)}")
        check("ordered a checkpoint" in c.coordinator.output(), "no checkpoint was ordered")
    run_cluster("auto_interval", config, body)


def metrics_text(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def fill(path):
    """Writes a file until the file system is full (down to the last byte, so that not even a
    manifest fits); returns its path."""
    filler = os.path.join(path, "filler")
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for size in (1 << 16, 1 << 12, 1):
            chunk = b"\0" * size
            try:
                while True:
                    os.write(fd, chunk)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def disk_full_run(name, root, make_full, free_space, digest_workers):
    """The disk_full scenario on checkpoint dir `root`: make_full(cluster) makes the next shard
    write fail, free_space(cluster, state) undoes it."""
    config = small_config(DATA, deterministic=True, steps=300,
                          checkpoint={"dir": root, "every_steps": EVERY, "keep": 2})
    metrics_port = free_port()
    c = Cluster(name, config)
    ok = False
    try:
        c.start_coordinator("--metrics-port", str(metrics_port))
        for _ in range(2):
            c.start_worker()
        wait_until(lambda: committed(config), 180, "a first committed checkpoint")
        state = make_full(c)
        failed = c.wait_status(lambda s: s["checkpoint_failures"] >= 1, 120,
                               "a checkpoint failure in status")
        error = failed["checkpoint_error"]
        print(f"status checkpoint_error: {error}", flush=True)
        check(root in error, f"status error does not name the path: {error!r}")
        step = int(re.search(r"checkpoint step (\d+)", error).group(1))
        check(not os.path.exists(os.path.join(root, f"step-{step:08d}", "manifest.json")),
              f"the failed checkpoint {step} has a manifest")
        newest = max(committed(config))
        check(newest < step, f"a checkpoint at or after the failed step {step} committed "
                             f"while the disk was full: {committed(config)}")
        text = wait_until(lambda: (lambda t: t if re.search(
            r"^spotrain_checkpoint_failures_total [1-9]", t, re.M) else None)(
                metrics_text(metrics_port)), 30, "the failure counter in /metrics")
        check(re.search(r'^spotrain_checkpoint_last_error\{error="[^"]*' + re.escape(root),
                        text, re.M), "/metrics has no last error naming the path")
        # The previous checkpoint is still newest and restorable: its digest checks out.
        step_dir = os.path.join(root, f"step-{newest:08d}")
        out = subprocess.run([os.path.join(BIN, "spotrain"), "digest", step_dir],
                             capture_output=True, text=True, timeout=120)
        with open(os.path.join(step_dir, "manifest.json")) as f:
            manifest = json.load(f)
        check(out.returncode == 0 and out.stdout.split()[0] == manifest["state_digest"],
              f"spotrain digest {step_dir}: {out.returncode} {out.stdout} {out.stderr}")
        # Training went on while the writes failed.
        c.wait_step(failed["step"] + 2 * EVERY, 120)
        free_space(c, state)
        wait_until(lambda: max(committed(config)) > step, 180,
                   "a checkpoint committed after space was freed")
        c.wait_done(600)
        check_digests(c, config, digest_workers(c))
        ok = True
    finally:
        c.close(failed=not ok)


def scenario_disk_full():
    """A shard write that fails mid-run leaves that checkpoint uncommitted, the previous one
    newest and restorable; training goes on; status and /metrics show the error with the
    path; freed space lets a later checkpoint commit; the run ends with the reference digest.

    As root (CI): ENOSPC on a small tmpfs that the test fills and then frees. Otherwise (or
    with SPOTRAIN_DISK_FULL=rlimit): a third worker joins with a file size limit
    (RLIMIT_FSIZE, SIGXFSZ ignored) smaller than its shard, so its writes fail with EFBIG;
    "freeing" is that worker going away."""
    root = os.path.join(WORK, "disk_full", "ckpt")
    os.makedirs(root, exist_ok=True)
    mode = os.environ.get("SPOTRAIN_DISK_FULL", "tmpfs" if os.geteuid() == 0 else "rlimit")
    if mode == "tmpfs":
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", root],
                                 capture_output=True, text=True)
        if mounted.returncode != 0:
            print(f"tmpfs not possible ({mounted.stderr.strip()}): using a file size limit")
            mode = "rlimit"
    if mode == "tmpfs":
        try:
            disk_full_run("disk_full", root, lambda c: fill(root),
                          lambda c, filler: os.remove(filler), lambda c: list(c.workers))
        finally:
            subprocess.run(["umount", "-l", root], capture_output=True)
        return

    def limited_worker(c):
        shard = sorted(glob.glob(f"{root}/step-*/shard-*-of-00002.bin"))[0]
        # Three ranks write shards of 2/3 of a two-rank shard: half of one cannot fit.
        blocks = max(1, os.path.getsize(shard) // 2 // 1024)
        from harness import Process
        proc = Process("w3", ["bash", "-c", f'trap "" XFSZ; ulimit -f {blocks}; exec '
                              f'"{os.path.join(BIN, "spotrain-worker")}" --coordinator '
                              f'{c.address} --name w3'],
                       os.path.join(c.dir, "w3.log"), c.env)
        c.workers["w3"] = proc
        return proc

    def drop_worker(c, proc):
        proc.signal(signal.SIGKILL)
        proc.wait(60)

    disk_full_run("disk_full_rlimit", root, limited_worker, drop_worker,
                  lambda c: ["w1", "w2"])


def complete_shard_steps(config, world):
    """Steps whose directory holds `world` shard files (committed or not)."""
    counts = {}
    for p in glob.glob(f"{config['checkpoint']['dir']}/step-*/shard-*-of-{world:05d}.bin"):
        step = int(os.path.basename(os.path.dirname(p))[5:])
        counts[step] = counts.get(step, 0) + 1
    return sorted(s for s, n in counts.items() if n == world)


def scenario_auto_outage():
    """every_steps "auto" through a coordinator outage: the workers go on checkpointing at the
    last interval the coordinator announced, and those checkpoints are committed after the
    restart."""
    config = small_config(DATA, deterministic=True, steps=300,
                          checkpoint={"dir": os.path.join(WORK, "auto_outage", "ckpt"),
                                      "every_steps": "auto", "keep": 50, "mtbf_prior_s": 5})

    def body(c):
        for _ in range(2):
            c.start_worker()
        wait_measured_decision(c)
        c.coordinator.signal(signal.SIGKILL)
        c.coordinator.wait(30)
        before = set(complete_shard_steps(config, 2))
        # An order sent just before the kill yields at most one: two mean the workers went on.
        written = wait_until(lambda: (lambda s: s if len(s) >= 2 else None)(
            [s for s in complete_shard_steps(config, 2) if s not in before]), 180,
            "two checkpoints written while the coordinator is down")
        c.start_coordinator()
        wait_until(lambda: all(s in committed(config) for s in written[:2]), 120,
                   f"checkpoints {written[:2]} written during the outage to be committed")
        c.wait_done(600)
        check_digests(c, config, ["w1", "w2"])
    run_cluster("auto_outage", config, body)


def scenario_outage_checkpoints():
    """Checkpoints written while the coordinator is down (kill -9) are committed once the
    workers re-join the restarted coordinator and re-send their shard reports."""
    config = config_for("outage", steps=400)
    config["checkpoint"]["keep"] = 50

    def body(c):
        for _ in range(2):
            c.start_worker()
        c.wait_step(15, 180)
        c.coordinator.signal(signal.SIGKILL)
        c.coordinator.wait(30)

        def shard_steps():
            root = config["checkpoint"]["dir"]
            steps = {}
            for p in glob.glob(f"{root}/step-*/shard-*"):
                steps.setdefault(int(os.path.basename(os.path.dirname(p))[5:]), 0)
                steps[int(os.path.basename(os.path.dirname(p))[5:])] += 1
            return sorted(s for s, n in steps.items() if n == 2)
        before = set(committed(config))
        # At least two checkpoints written during the outage.
        written = wait_until(lambda: (lambda s: s if len(s) >= 2 else None)(
            [s for s in shard_steps() if s not in before]), 180,
            "two checkpoints written while the coordinator is down")
        c.start_coordinator()
        wait_until(lambda: all(s in committed(config) for s in written[:2]), 120,
                   f"checkpoints {written[:2]} written during the outage to be committed")
        c.wait_done(600)
        check_digests(c, config, ["w1", "w2"])
    run_cluster("outage_checkpoints", config, body)


SCENARIOS = {
    "full_wipe": scenario_full_wipe,
    "corrupt_newest": scenario_corrupt_newest,
    "coordinator_restart_live": scenario_coordinator_restart_live,
    "coordinator_restart_empty": scenario_coordinator_restart_empty,
    "unwritable_dir": scenario_unwritable_dir,
    "auto_interval": scenario_auto_interval,
    "disk_full": scenario_disk_full,
    "outage_checkpoints": scenario_outage_checkpoints,
    "auto_outage": scenario_auto_outage,
}

if __name__ == "__main__":
    sys.exit(run_scenarios(SCENARIOS, sys.argv))
