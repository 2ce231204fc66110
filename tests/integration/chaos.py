#!/usr/bin/env python3
"""Chaos runner: a coordinator and workers on localhost, a schedule of failures, one oracle.

A schedule is a list of events, each fired once the run's step (as `spotrain status --json`
reports it) reaches the event's threshold:

  kill9 W          SIGKILL worker W (a spot pod vanishing)
  sigterm W        SIGTERM worker W (an announced leave; it must exit 0)
  sigstop W        SIGSTOP worker W (a frozen pod; declared lost by heartbeat timeout)
  sigcont W        SIGCONT worker W (the frozen pod comes back: fenced, re-joins or exits)
  join             start a new worker
  full_wipe        SIGKILL every worker, wait for the coordinator to notice, optionally
                   restart the coordinator and/or flip a byte in the newest committed
                   checkpoint's shard (nothing alive can hold state then), start N new workers
  coordinator_restart   SIGKILL the coordinator, restart it from its state dir

Schedules are JSON files (`--schedule FILE`), a built-in one (`--schedule builtin:all_events`)
or generated from a seed (`--seed N`, random.Random(N)). The oracle, in deterministic mode:
the coordinator exits 0, every worker that printed a final `state_digest` printed the one of
the uninterrupted standalone run of the same config, at least one did, every final val loss
printed is within 2% of the standalone run's, and every worker that was never signalled (and
every SIGTERMed one) exited 0. With `--mode default` (`"deterministic": false`) only the val
loss check applies (the digests may differ). A failure prints the seed and the schedule and writes the schedule as JSON, so that
`chaos.py --schedule FILE` replays it.

  chaos.py --seed 7                  one generated schedule
  chaos.py --seed 1 --count 20       seeds 1..20
  chaos.py --schedule FILE           a hand-written (or saved) schedule
  chaos.py --trace examples/traces/aws-p3-spot-32.csv --trace-workers 3
                                     a spot trace's losses, wipes and returns (from_trace)
  chaos.py --soak 600                random seeds until 600 s are up
  chaos.py --seed 7 --print          show the schedule only

Prints one line per schedule and a closing line "N passed, N failed"; exit 1 on a failure.
Every wait is for an event with a generous deadline; nothing sleeps a fixed time.
"""
import argparse
import collections
import glob
import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (Cluster, TestFailure, final_val_loss, small_config, standalone_result,
                     step_times_ms, wait_until, write_corpus)

ACTIONS = ("kill9", "sigterm", "sigstop", "sigcont", "join", "full_wipe", "coordinator_restart")
EVERY = 10  # checkpoint interval of every chaos run
LOSS_TOLERANCE = 0.02  # default mode: relative val-loss difference allowed

# A hand-written schedule with every kind of event (used by ctest as
# integration.chaos.all_events). Steps are thresholds: "once status step >= at".
ALL_EVENTS = {
    "name": "all_events",
    "steps": 100,
    "initial_workers": 3,
    "events": [
        {"at": 8, "action": "kill9", "worker": "w2"},
        {"at": 14, "action": "join", "name": "w4"},
        {"at": 20, "action": "sigstop", "worker": "w1"},
        {"at": 26, "action": "sigterm", "worker": "w3"},
        {"at": 30, "action": "sigcont", "worker": "w1"},
        {"at": 36, "action": "coordinator_restart"},
        {"at": 44, "action": "full_wipe", "corrupt_newest": True, "restart": ["w5", "w6"]},
        {"at": 58, "action": "join", "name": "w7"},
        {"at": 64, "action": "kill9", "worker": "w5"},
        {"at": 70, "action": "full_wipe", "coordinator_restart": True, "restart": ["w8"]},
    ],
}
# A coordinator outage over the last steps: the workers finish the run (and write the final
# checkpoint's shards) while no coordinator hears them. It hung until the workers re-sent
# their last reports after a re-join (8e19847); ctest integration.chaos.late_coordinator_restart.
LATE_COORDINATOR_RESTART = {
    "name": "late_coordinator_restart",
    "steps": 80,
    "initial_workers": 2,
    "events": [{"at": 72, "action": "coordinator_restart"}],
}
BUILTINS = {"all_events": ALL_EVENTS, "late_coordinator_restart": LATE_COORDINATOR_RESTART}


# ----------------------------------------------------------------------------- schedules

def generate(seed, steps=None):
    """A random schedule from `seed`: always at least one kill -9, one leave (SIGTERM), one
    join, one full wipe (sometimes with a corrupted newest checkpoint and/or a coordinator
    restart while no worker is alive) and one coordinator restart, plus up to three more
    events (kill, leave, join, freeze/thaw, coordinator restart), at step thresholds that are
    multiples of 4 in [4, steps - 20]. Every kill, leave and freeze leaves at least one running
    worker (a newcomer is started first where needed); a frozen worker is thawed 6-14 steps
    later and is not counted on afterwards."""
    rng = random.Random(seed)
    steps = steps or rng.choice([80, 90, 100])
    initial = rng.randint(2, 4)
    kinds = ["kill9", "sigterm", "join", "coordinator_restart"]
    kinds += [rng.choice(["kill9", "sigterm", "join", "sigstop", "coordinator_restart"])
              for _ in range(rng.randint(0, 3))]
    rng.shuffle(kinds)
    # Thresholds: multiples of 4 in [4, steps - 20]; the full wipe comes at >= 28 so that two
    # checkpoints are committed behind it (the corrupt-newest variant needs one to fall back to).
    last = steps - 20
    wipe_at = rng.randrange(28, last + 1, 4)
    slots = sorted(rng.sample([x for x in range(4, last + 1, 4) if x != wipe_at], len(kinds)))
    plan = sorted(list(zip(slots, kinds)) + [(wipe_at, "full_wipe")])
    counter = initial
    running = [f"w{i}" for i in range(1, initial + 1)]  # can be counted on to make progress
    events = []
    pending_cont = []  # (at, name)

    def new_name():
        nonlocal counter
        counter += 1
        return f"w{counter}"

    for at, kind in plan:
        if kind == "sigstop" and pending_cont:
            kind = "kill9"  # one frozen worker per schedule
        if kind == "join" and len(running) >= 5:
            kind = "kill9"
        if kind in ("kill9", "sigterm", "sigstop") and len(running) < 2:
            # Never take the last running worker: a newcomer first, at the same threshold.
            name = new_name()
            running.append(name)
            events.append({"at": at, "action": "join", "name": name})
        event = {"at": at, "action": kind}
        if kind in ("kill9", "sigterm", "sigstop"):
            victim = rng.choice(running)
            running.remove(victim)
            event["worker"] = victim
            if kind == "sigstop":
                pending_cont.append((at + rng.randint(6, 14), victim))
        elif kind == "join":
            name = new_name()
            running.append(name)
            event["name"] = name
        elif kind == "full_wipe":
            running = [new_name() for _ in range(rng.randint(1, 3))]
            event["restart"] = list(running)
            event["corrupt_newest"] = rng.random() < 0.5
            event["coordinator_restart"] = rng.random() < 0.3
        events.append(event)
    for at, name in pending_cont:
        events.append({"at": min(at, steps - 15), "action": "sigcont", "worker": name})
    events.sort(key=lambda e: e["at"])  # stable: a thaw never comes before its freeze
    return {"name": f"seed{seed}", "seed": seed, "steps": steps, "initial_workers": initial,
            "events": events}


def trace_job_schedule(path, workers, seed, length):
    """A job holding `workers` of the instance slots of a spot trace (time_ms,live_instances,
    examples/traces/): every drop of the fleet preempts random live slots, every rise revives
    random missing ones (random.Random(seed); the slot model of `spotrain plan`). Returns
    [(x, live)] over the trace's window (from the first time the fleet reaches its peak),
    with x scaled from 0 to `length`: one point per change of the job's count, then
    (length, live at the end)."""
    points = []
    for line in open(path):
        line = line.strip()
        if not line or line.startswith("#") or line.startswith("time_ms"):
            continue
        t, v = (int(x) for x in line.split(","))
        if points and points[-1][0] == t:
            points[-1] = (t, v)  # one instant
        else:
            points.append((t, v))
    peak = max(v for _, v in points)
    window = points[next(i for i, (_, v) in enumerate(points) if v == peak):]
    t0, span = window[0][0], window[-1][0] - window[0][0]
    rng = random.Random(seed)
    alive = [True] * peak
    schedule = [(0.0, workers)]
    for t, v in window[1:]:
        now = sum(alive)
        if v < now:
            for i in rng.sample([i for i in range(peak) if alive[i]], now - v):
                alive[i] = False
        elif v > now:
            for i in rng.sample([i for i in range(peak) if not alive[i]], v - now):
                alive[i] = True
        live = sum(alive[:workers])
        if live != schedule[-1][1]:
            schedule.append(((t - t0) / span * length, live))
    schedule.append((float(length), schedule[-1][1]))
    return schedule


def from_trace(path, workers, seed, steps):
    """A chaos schedule that replays a spot trace (trace_job_schedule) over step thresholds
    4..steps-20: a drop kills the longest-running workers with -9, a rise starts new ones, a
    drop to none is a full wipe whose new workers are those of the next rise (steps do not
    advance while nobody is there, so the time at zero has no threshold)."""
    points = trace_job_schedule(path, workers, seed, steps - 24)
    running = [f"w{i}" for i in range(1, workers + 1)]
    counter = workers
    events = []
    wiped_at = None
    for x, live in points[1:-1]:
        at = 4 + int(x)
        if wiped_at is not None:  # the rise after a wipe: the wipe restarts that many
            running = [f"w{counter + i}" for i in range(1, live + 1)]
            counter += live
            events.append({"at": wiped_at, "action": "full_wipe", "restart": list(running)})
            wiped_at = None
            continue
        if live == 0:
            wiped_at = at
        elif live < len(running):
            for victim in running[:len(running) - live]:
                events.append({"at": at, "action": "kill9", "worker": victim})
            running = running[len(running) - live:]
        else:
            for _ in range(live - len(running)):
                counter += 1
                running.append(f"w{counter}")
                events.append({"at": at, "action": "join", "name": running[-1]})
    if wiped_at is not None:
        events.append({"at": wiped_at, "action": "full_wipe", "restart": 1})
    name = f"trace-{os.path.splitext(os.path.basename(path))[0]}-{workers}w-seed{seed}"
    return {"name": name, "steps": steps, "initial_workers": workers, "events": events}


def validate(schedule):
    """Checks a hand-written schedule's shape; returns it with defaults filled in."""
    s = dict(schedule)
    s.setdefault("name", "schedule")
    s.setdefault("steps", 80)
    s.setdefault("initial_workers", 3)
    events = []
    for i, e in enumerate(s.get("events", [])):
        e = dict(e)
        action = e.get("action")
        if action == "corrupt_newest":  # written apart: belongs to the full wipe before it
            if not events or events[-1]["action"] != "full_wipe":
                raise ValueError(f"event {i}: corrupt_newest must follow a full_wipe "
                                 "(no worker may be alive while the shard is changed)")
            events[-1]["corrupt_newest"] = True
            continue
        if action not in ACTIONS:
            raise ValueError(f"event {i}: unknown action {action!r} (one of {ACTIONS})")
        if not isinstance(e.get("at"), int) or e["at"] < 0:
            raise ValueError(f"event {i}: 'at' must be a step number >= 0")
        if action in ("kill9", "sigterm", "sigstop", "sigcont") and not e.get("worker"):
            raise ValueError(f"event {i}: {action} needs 'worker'")
        if action == "full_wipe":
            restart = e.get("restart", 2)
            if isinstance(restart, int):
                if restart < 1:
                    raise ValueError(f"event {i}: full_wipe must restart at least one worker")
            elif not restart:
                raise ValueError(f"event {i}: full_wipe must restart at least one worker")
        events.append(e)
    if any(b["at"] < a["at"] for a, b in zip(events, events[1:])):
        raise ValueError("events must be in increasing order of 'at'")
    s["events"] = events
    return s


def describe(event):
    extra = []
    if "worker" in event:
        extra.append(event["worker"])
    if "name" in event:
        extra.append(event["name"])
    if event["action"] == "full_wipe":
        restart = event.get("restart", 2)
        extra.append(f"restart={restart if isinstance(restart, int) else ','.join(restart)}")
        if event.get("corrupt_newest"):
            extra.append("corrupt_newest")
        if event.get("coordinator_restart"):
            extra.append("coordinator_restart")
    return f"@{event['at']} {event['action']}" + (f" {' '.join(extra)}" if extra else "")


# ----------------------------------------------------------------------------- running

class Runner:
    """Runs schedules against one corpus; caches the standalone results per config."""

    def __init__(self, workdir, mode, keep, out_dir, verbose):
        self.work = workdir
        self.data = write_corpus(os.path.join(workdir, "data"))
        self.mode = mode
        self.keep = keep
        self.out_dir = out_dir
        self.verbose = verbose
        self._reference = {}

    def config(self, schedule, run_dir):
        return small_config(self.data, deterministic=self.mode == "deterministic",
                            steps=schedule["steps"],
                            checkpoint={"dir": os.path.join(run_dir, "ckpt"),
                                        "every_steps": EVERY, "keep": 3})

    def reference(self, config):
        plain = {k: v for k, v in config.items() if k != "checkpoint"}
        key = json.dumps(plain, sort_keys=True)
        if key not in self._reference:
            self._reference[key] = standalone_result(plain, self.work)
        return self._reference[key]

    def log(self, message):
        if self.verbose:
            print(f"    {message}", flush=True)

    def run(self, schedule):
        """Runs one schedule; returns (ok, message, seconds)."""
        start = time.monotonic()
        run_dir = tempfile.mkdtemp(prefix=f"{schedule['name']}-", dir=self.work)
        config = self.config(schedule, run_dir)
        reference = self.reference(config)
        os.makedirs(os.path.join(run_dir, "cluster"))
        cluster = Cluster(f"chaos-{schedule['name']}", config,
                          workdir=os.path.join(run_dir, "cluster"), keep=True)
        run = _Run(self, cluster, config, schedule)
        ok = False
        message = ""
        try:
            cluster.start_coordinator()
            run.execute()
            message = run.check(reference)
            ok = True
        except Exception as e:  # reported with the schedule; the next one still runs
            message = f"{type(e).__name__}: {e}"
        finally:
            cluster.close(failed=False)
        seconds = time.monotonic() - start
        if ok:
            if not self.keep:
                shutil.rmtree(run_dir, ignore_errors=True)
        else:
            self.report_failure(schedule, message, run, run_dir)
        return ok, message, seconds, run

    def report_failure(self, schedule, message, run, run_dir):
        os.makedirs(self.out_dir, exist_ok=True)
        path = os.path.join(self.out_dir, f"chaos-failed-{schedule['name']}.json")
        with open(path, "w") as f:
            json.dump(schedule, f, indent=2)
        print(f"FAILED schedule {schedule['name']} (seed {schedule.get('seed', '-')}, "
              f"mode {self.mode}): {message}", flush=True)
        print(json.dumps(schedule, indent=2), flush=True)
        print(f"schedule written to {path}; replay with: {sys.argv[0]} --schedule {path}"
              + (f" --mode {self.mode}" if self.mode != "deterministic" else ""), flush=True)
        print(f"what happened:\n  " + "\n  ".join(run.trace), flush=True)
        print(f"logs in {run_dir}/cluster", flush=True)
        for name, proc in [("coordinator", run.cluster.coordinator)] + list(
                run.cluster.workers.items()):
            if proc is not None:
                print(f"--- {name} (last 25 lines)\n{proc.tail(25)}", flush=True)


class _Run:
    """One schedule against one cluster: fires the events, then checks the outcome."""

    def __init__(self, runner, cluster, config, schedule):
        self.runner = runner
        self.cluster = cluster
        self.config = config
        self.schedule = schedule
        self.t0 = time.monotonic()
        self.trace = []
        self.signalled = set()   # workers that got any signal (not held to exit 0)
        self.termed = set()      # SIGTERMed
        self.left = set()        # SIGTERMed after joining the run: must exit 0
        self.stopped = set()     # currently SIGSTOPped
        self.killed = set()      # SIGKILLed (kill9 or full wipe)
        self.skipped = 0
        self.auto_names = 0
        self.stragglers = []
        self.corrupted = None
        self.wipe_losses = []

    def note(self, message):
        line = f"{time.monotonic() - self.t0:7.1f}s {message}"
        self.trace.append(line)
        self.runner.log(line)

    # The helpers below treat a worker as running when its process is alive and not frozen.
    def running(self, exclude=()):
        return [n for n, p in self.cluster.workers.items()
                if p.alive() and n not in self.stopped and n not in self.termed
                and n not in exclude]

    def start_worker(self, name=None):
        if name is None or name in self.cluster.workers:
            self.auto_names += 1
            name = f"x{self.auto_names}"
        self.cluster.start_worker(name)
        return name

    def coordinator_done(self):
        return not self.cluster.coordinator.alive()

    def progress(self):
        """The newest step printed by any live, unfrozen worker (its progress lines), or -1.
        Used for the thresholds instead of the status step: the status is a process start
        per poll, slower than a step here, and lags while workers re-join a restarted
        coordinator."""
        newest = -1
        for name, proc in self.cluster.workers.items():
            if name in self.stopped or not proc.alive():
                continue
            tail = proc.output_tail(4096)
            steps = re.findall(r"^step (\d+)/", tail, re.M)
            if steps:
                newest = max(newest, int(steps[-1]))
        return newest

    def wait_for_step(self, at):
        """Waits until a live worker has printed step `at`; "done" when the run ended (the
        coordinator exited or a worker printed the last step) before that."""
        total = self.schedule["steps"]

        def reached():
            if self.coordinator_done():
                return "done"
            step = self.progress()
            if step >= total:
                return "done"
            return step if step >= at else None
        return wait_until(reached, 400, f"the run to reach step {at}", interval=0.02)

    def execute(self):
        for i in range(self.schedule["initial_workers"]):
            self.cluster.start_worker(f"w{i + 1}")
        self.note(f"started coordinator and {self.schedule['initial_workers']} workers")
        events = self.schedule["events"]
        for index, event in enumerate(events):
            step = self.wait_for_step(event["at"])
            if step == "done":
                left = len(events) - index
                self.note(f"run finished before step {event['at']}: {left} event(s) not fired")
                self.skipped += left
                break
            self.fire(event, step)
        # Nothing stays frozen: thaw whatever is still stopped.
        for name in sorted(self.stopped):
            self.cluster.workers[name].signal(signal.SIGCONT)
            self.note(f"end of schedule: SIGCONT {name}")
        self.stopped.clear()

    def fire(self, event, step):
        action = event["action"]
        where = f"step {step}"
        worker = event.get("worker")
        proc = self.cluster.workers.get(worker) if worker else None
        if action in ("kill9", "sigterm", "sigstop"):
            if proc is None or not proc.alive():
                self.note(f"{describe(event)}: {worker} is not running ({where}); skipped")
                self.skipped += 1
                return
            if not self.running(exclude=(worker,)):
                self.note(f"{describe(event)}: would leave no running worker ({where}); skipped")
                self.skipped += 1
                return
            sig = {"kill9": signal.SIGKILL, "sigterm": signal.SIGTERM,
                   "sigstop": signal.SIGSTOP}[action]
            proc.signal(sig)
            self.signalled.add(worker)
            if action == "sigterm":
                self.termed.add(worker)
            if action == "sigterm" and "joined run" in proc.output():
                # Held to exit 0 (unless killed later). One signalled before it joined may
                # die of the default action, before the worker installs its handler.
                self.left.add(worker)
            if action == "kill9":
                self.killed.add(worker)
            if action == "sigstop":
                self.stopped.add(worker)
            self.note(f"{describe(event)} at {where}")
        elif action == "sigcont":
            if proc is None or worker not in self.stopped:
                self.note(f"{describe(event)}: {worker} is not stopped ({where}); skipped")
                self.skipped += 1
                return
            proc.signal(signal.SIGCONT)
            self.stopped.discard(worker)
            self.note(f"{describe(event)} at {where}")
        elif action == "join":
            name = self.start_worker(event.get("name"))
            self.note(f"join {name} at {where}")
        elif action == "coordinator_restart":
            self.restart_coordinator(where)
        elif action == "full_wipe":
            self.full_wipe(event, where)

    def restart_coordinator(self, where):
        c = self.cluster
        if self.coordinator_done():
            self.note(f"coordinator_restart: the coordinator already exited ({where}); skipped")
            self.skipped += 1
            return
        c.coordinator.signal(signal.SIGKILL)
        c.coordinator.wait(60)
        c.start_coordinator()
        self.note(f"coordinator_restart at {where}: restarted")

    def full_wipe(self, event, where):
        c = self.cluster
        victims = [n for n, p in c.workers.items() if p.alive()]
        for name in victims:
            c.workers[name].signal(signal.SIGKILL)
            self.signalled.add(name)
            self.killed.add(name)
        for name in victims:
            c.workers[name].wait(60)
        self.stopped.clear()
        self.note(f"full_wipe at {where}: killed {','.join(victims) or 'nobody'}")
        # How far back the restore goes (before any corruption): the newest worker step
        # printed against the newest committed checkpoint (the interval bounds it unless
        # commits were missed).
        newest_step = max((max([s for s, _ in step_times_ms(c.workers[n].output())] or [-1])
                           for n in victims), default=-1)
        c.wait_status(lambda s: s["world_size"] == 0 or s["state"] in ("paused", "waiting")
                      or s["state"] == "done", 120, "the coordinator to notice the full wipe")
        if event.get("coordinator_restart"):
            c.coordinator.signal(signal.SIGKILL)
            c.coordinator.wait(60)
            c.start_coordinator()
            self.note("full_wipe: coordinator restarted with no worker alive")
        committed = self.committed()
        behind = newest_step - (committed[-1] if committed else 0)
        self.wipe_losses.append(behind)
        self.note(f"full_wipe: workers had reached step {newest_step}; committed checkpoints "
                  f"{committed or 'none'} ({behind} steps to redo)")
        if event.get("corrupt_newest"):
            self.corrupt_newest()
        restart = event.get("restart", 2)
        names = ([None] * restart) if isinstance(restart, int) else restart
        started = [self.start_worker(n) for n in names]
        self.note(f"full_wipe: started {','.join(started)}")

    def committed(self):
        root = self.config["checkpoint"]["dir"]
        return sorted(int(os.path.basename(os.path.dirname(p))[5:])
                      for p in glob.glob(f"{root}/step-*/manifest.json"))

    def corrupt_newest(self):
        steps = self.committed()
        if len(steps) < 2:
            self.note(f"corrupt_newest: only {len(steps)} committed checkpoint(s) "
                      f"{steps}; not corrupting (nothing to fall back to)")
            self.skipped += 1
            return
        newest = steps[-1]
        root = self.config["checkpoint"]["dir"]
        shard = sorted(glob.glob(f"{root}/step-{newest:08d}/shard-*"))[0]
        with open(shard, "r+b") as f:
            f.seek(200)  # inside the payload (the header is 64 bytes)
            byte = f.read(1)
            f.seek(200)
            f.write(bytes([byte[0] ^ 0xFF]))
            f.flush()
            os.fsync(f.fileno())
        self.corrupted = shard
        self.note(f"corrupt_newest: flipped byte 200 of {os.path.relpath(shard, root)}")

    def wait_coordinator_exit(self, stall_s=120, limit_s=600):
        """Waits for the coordinator to exit; fails when neither the status step nor any
        worker's progress line moved for `stall_s` seconds (a hung run), or after limit_s."""
        c = self.cluster
        start = last_move = time.monotonic()
        last = None
        while c.coordinator.alive():
            now = time.monotonic()
            s = c.try_status()
            seen = (s.get("step") if s else None, s.get("state") if s else None,
                    self.progress())
            if seen != last:
                last, last_move = seen, now
            if now - last_move > stall_s or now - start > limit_s:
                raise TestFailure(
                    f"the run hung: no progress for {now - last_move:.0f}s (status "
                    f"{'step %s, state %s' % seen[:2] if s else 'unavailable'}, newest worker "
                    f"step {seen[2]})")
            try:
                c.coordinator.popen.wait(timeout=0.5)
            except Exception:
                pass
        return c.coordinator.popen.returncode

    def check(self, reference):
        """The oracle. Returns a short summary; raises TestFailure."""
        c = self.cluster
        code = self.wait_coordinator_exit()
        if code != 0:
            raise TestFailure(f"coordinator exited {code}")
        self.note("coordinator exited 0")
        # Workers that are still alive get a generous grace to exit (a fenced worker that
        # woke after the end may wait for a coordinator that is gone: killed, not judged).
        deadline = time.monotonic() + 30
        for name, proc in c.workers.items():
            while proc.alive() and time.monotonic() < deadline:
                try:
                    proc.popen.wait(timeout=0.5)
                except Exception:
                    pass
        # A worker that never heard "run done" (it was re-joining a restarted coordinator, or
        # thawed after the end) cannot tell a finished run from a coordinator outage and
        # keeps trying for --join-timeout-s: expected, killed and reported, not judged.
        stragglers = [n for n, p in c.workers.items() if p.alive()]
        problems = []
        for name in stragglers:
            c.workers[name].close()
        if stragglers:
            self.note(f"still waiting for a coordinator after the end, killed: "
                      f"{','.join(stragglers)}")
        self.stragglers = stragglers
        for name, proc in c.workers.items():
            rc = proc.popen.returncode
            if name in self.left and name not in self.killed and rc != 0:
                problems.append(f"{name} exited {rc} after SIGTERM (expected 0)")
            elif name not in self.signalled and name not in stragglers and rc != 0:
                problems.append(f"{name} (never signalled) exited {rc}")
        digests = c.digests()
        if self.runner.mode == "deterministic":
            want = reference["digest"]
            if not digests:
                problems.append("no worker printed a final state digest")
            for name, digest in sorted(digests.items()):
                if digest != want:
                    problems.append(f"{name}: digest {digest[:16]} != standalone {want[:16]}")
        # Every summary line carries the run's final val loss, whichever epoch the worker
        # finished in (also one that started after the last step): in deterministic mode
        # too, where the digest already decides, a missing evaluation would show as -1.
        want_loss = reference["val_loss"]
        losses = {n: final_val_loss(p.output()) for n, p in c.workers.items()}
        losses = {n: v for n, v in losses.items() if v is not None}
        if not losses:
            problems.append("no worker printed a final val loss")
        for name, loss in sorted(losses.items()):
            if abs(loss - want_loss) > LOSS_TOLERANCE * want_loss:
                problems.append(f"{name}: final val loss {loss:.4f} differs from the "
                                f"standalone {want_loss:.4f} by more than 2%")
        problems += self.check_event_lines(c)
        if problems:
            raise TestFailure("; ".join(problems))
        if self.corrupted and not any(
                "checkpoint skipped" in p.output() and os.path.basename(self.corrupted) in
                p.output() for p in c.workers.values()):
            raise TestFailure(f"no worker reported the corrupted shard {self.corrupted} as "
                              "skipped")
        events = c.events()
        recoveries = [e.get("cause") for e in events]
        restores = sum(1 for e in events if "checkpoint" in str(e.get("state_source", "")))
        fired = len(self.schedule["events"]) - self.skipped
        if self.runner.mode == "deterministic":
            what = f"{len(digests)} digest(s) = standalone {reference['digest'][:12]}"
        else:
            what = (f"val loss {min(losses.values()):.4f}..{max(losses.values()):.4f} vs "
                    f"standalone {reference['val_loss']:.4f}")
        late = f", stragglers killed: {','.join(self.stragglers)}" if self.stragglers else ""
        if self.wipe_losses:
            late += f", full wipe redoes {'/'.join(map(str, self.wipe_losses))} steps"
        return (f"{fired}/{len(self.schedule['events'])} events fired, "
                f"{len(recoveries)} epochs ({','.join(sorted(set(recoveries)))}; "
                f"{restores} from a checkpoint), {what}{late}")


    @staticmethod
    def check_event_lines(c):
        """events.jsonl, across coordinator kills: one line for every epoch a worker started
        (besides a `restored` line when a restart kept it), never two."""
        started = set()
        for proc in c.workers.values():
            started.update(int(m) for m in re.findall(r"epoch (\d+): rank \d+ of \d+, start",
                                                      proc.output()))
        counts = collections.Counter(e.get("epoch") for e in c.events()
                                     if e.get("cause") != "restored" and not e.get("paused"))
        problems = [f"events.jsonl has {counts[epoch]} lines for epoch {epoch} (want 1)"
                    for epoch in sorted(started) if counts[epoch] != 1]
        problems += [f"events.jsonl has {n} lines for epoch {epoch}"
                     for epoch, n in sorted(counts.items()) if n > 1 and epoch not in started]
        return problems


# ----------------------------------------------------------------------------- main

def load_schedule(spec):
    if spec.startswith("builtin:"):
        name = spec[len("builtin:"):]
        if name not in BUILTINS:
            raise SystemExit(f"no built-in schedule {name!r} (have: {', '.join(BUILTINS)})")
        return validate(BUILTINS[name])
    with open(spec) as f:
        schedule = json.load(f)
    schedule.setdefault("name", os.path.splitext(os.path.basename(spec))[0])
    return validate(schedule)


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Schedules: see docs/chaos.md.")
    p.add_argument("--seed", type=int, action="append", default=[],
                   help="run the schedule generated from this seed (repeatable)")
    p.add_argument("--count", type=int, default=1,
                   help="with one --seed S: run seeds S, S+1, ..., S+count-1")
    p.add_argument("--schedule", action="append", default=[],
                   help="run a schedule from a JSON file, or builtin:NAME (all_events, "
                   "late_coordinator_restart) (repeatable)")
    p.add_argument("--trace", action="append", default=[],
                   help="replay a spot availability trace (time_ms,live_instances, e.g. "
                   "examples/traces/aws-p3-spot-32.csv) over the run's steps (repeatable)")
    p.add_argument("--trace-workers", type=int, default=3,
                   help="with --trace: instance slots of the trace's fleet the job holds")
    p.add_argument("--trace-seed", type=int, default=1,
                   help="with --trace: which slots each drop and rise hits")
    p.add_argument("--soak", type=float, default=0,
                   help="run random seeds (from --seed, else from the clock) for this many seconds")
    p.add_argument("--steps", type=int, default=0, help="steps of generated schedules "
                   "(default: chosen by the seed among 80, 90, 100)")
    p.add_argument("--mode", choices=("deterministic", "default"), default="deterministic",
                   help="deterministic: digest oracle; default: val loss within 2%%")
    p.add_argument("--print", action="store_true", help="print the schedules, run nothing")
    p.add_argument("--keep", action="store_true", help="keep the logs of passing runs too")
    p.add_argument("--out", default=os.getcwd(),
                   help="where failing schedules are written (default: the current dir)")
    p.add_argument("--quiet", action="store_true", help="no per-event lines")
    args = p.parse_args(argv[1:])

    schedules = [load_schedule(s) for s in args.schedule]
    schedules += [validate(from_trace(t, args.trace_workers, args.trace_seed, args.steps or 100))
                  for t in args.trace]
    seeds = list(args.seed)
    if len(seeds) == 1 and args.count > 1:
        seeds = list(range(seeds[0], seeds[0] + args.count))
    if not args.soak:
        schedules += [generate(s, args.steps or None) for s in seeds]
        if not schedules:
            p.error("give --seed, --schedule, --trace or --soak")
    if args.print:
        for s in schedules:
            print(json.dumps(s, indent=2))
        return 0

    work = tempfile.mkdtemp(prefix="spotrain-chaos-")
    runner = Runner(work, args.mode, args.keep, args.out, verbose=not args.quiet)
    passed = failed = 0

    def one(schedule):
        nonlocal passed, failed
        label = schedule["name"] + (f" ({schedule['steps']} steps, "
                                    f"{schedule['initial_workers']} workers, "
                                    f"{len(schedule['events'])} events)")
        if not args.quiet:
            print(f"--- {label}: " + "; ".join(describe(e) for e in schedule["events"]),
                  flush=True)
        ok, message, seconds, _ = runner.run(schedule)
        if ok:
            passed += 1
        else:
            failed += 1
        print(f"{'PASS' if ok else 'FAIL'} {label} {seconds:.1f}s: {message}", flush=True)

    try:
        if args.soak:
            end = time.monotonic() + args.soak
            seed = seeds[0] if seeds else int(time.time()) % 1000000
            while time.monotonic() < end:
                one(generate(seed, args.steps or None))
                seed += 1
            for s in schedules:
                one(s)
        else:
            for s in schedules:
                one(s)
    finally:
        if not failed and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{passed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
