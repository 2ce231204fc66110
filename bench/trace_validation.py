#!/usr/bin/env python3
"""Validates `spotrain plan` against a live run on the real AWS spot trace.

1. Schedule: the job holds --workers of the 32 instance slots of examples/traces/aws-p3-spot-32.csv
   (slots 0..W-1); every drop of the fleet preempts random live slots, every rise revives random
   missing ones (random.Random(--seed), the slot model of spotrain plan). The job's live count over
   the trace's window (from the first time the fleet reaches 32, 10.95 h) is compressed into
   --period seconds and written as a trace, bench/out/trace_validation_schedule.csv.
2. Calibration (a separate short run just before): step time with 1..W workers, and what a
   join, a loss and a restore after a full wipe cost, from the coordinator's events.jsonl.
3. Live run: a coordinator and workers on this machine. When the schedule drops, the driver kills
   the longest-running workers with SIGKILL; when it rises, it starts new ones. The job is N
   steps, N = --fraction of the steps the schedule allows at the calibrated speeds. The trace
   loops if the run outlasts it, as the simulator's replay does.
4. Prediction: `spotrain plan --trace SCHEDULE --gpus W --trace_offset_s 0 --trials 1` (the same
   schedule, no randomness left) with the measured inputs: (1) the calibration run's numbers (a
   prediction made before the run); (2) the numbers measured in the run itself (a consistency
   check of the model, apart from the machine's speed drifting between the two runs); (3) the
   calibration's event costs with the run's step times; (4) as (2) with linear scaling.

Goodput, on both sides: useful steps x ideal step time / wall time, with the ideal step time the
step time with all W workers of the input set used, and the wall time from the start of the
first workers to the last step. The job always finishes, so useful steps = N.

Writes bench/out/trace_validation.json (inputs, results, the measured progress and the
simulator's timeline) and prints a table. Takes about --period + 2 minutes.
  bench/trace_validation.py [--period 300] [--workers 3] [--seed 1]
  bench/trace_validation.py --from-json bench/out/trace_validation.json   (predictions only)
"""
import argparse
import calendar
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
os.environ.setdefault("SPOTRAIN_BUILD_DIR", os.path.join(ROOT, "build"))
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
from chaos import trace_job_schedule  # noqa: E402
from harness import BIN, Cluster, small_config, wait_until, write_corpus  # noqa: E402

EVERY = 50  # checkpoint.every_steps of both runs


# ----------------------------------------------------------------------------- schedule

def window_seconds(path):
    """Length of the trace's replay window: from the first time the fleet reaches its peak to
    the last line."""
    points = [tuple(int(x) for x in line.split(",")) for line in open(path)
              if line.strip() and line[0].isdigit()]
    peak = max(v for _, v in points)
    start = next(t for t, v in points if v == peak)
    return (points[-1][0] - start) / 1000.0


def write_schedule(schedule, path):
    with open(path, "w") as f:
        f.write("time_ms,live_instances\n")
        last = -1
        for t, v in schedule:
            ms = int(round(t * 1000))
            ms = max(ms, last + 1)  # keep every point distinct (ms resolution)
            f.write(f"{ms},{v}\n")
            last = ms


def looped_events(schedule, period_s, cycles=6):
    """The capacity changes as the simulator replays the schedule: the points after the first,
    then from the next cycle on every point shifted by the period."""
    events = list(schedule[1:])
    for c in range(1, cycles):
        events += [(t + c * period_s, v) for t, v in schedule]
    return events


# ----------------------------------------------------------------------------- a run

def iso_to_epoch(stamp):
    """'2026-11-27T20:11:49.657Z' -> seconds since the epoch (UTC)."""
    base, frac = stamp.rstrip("Z").split(".")
    return calendar.timegm(time.strptime(base, "%Y-%m-%dT%H:%M:%S")) + float("0." + frac)


class LiveRun:
    """A cluster with progress sampling, worker start/kill bookkeeping (wall clock)."""

    def __init__(self, name, config, workdir):
        os.makedirs(workdir, exist_ok=True)
        self.cluster = Cluster(name, config, workdir=workdir, keep=True)
        self.samples = []  # (t since start, step, epoch, world)
        self.starts = {}   # name -> wall time started
        self.kills = []    # (wall time, name)
        self.order = []    # names by start time
        self.count = 0
        self.t0 = None

    def start(self):
        self.cluster.start_coordinator()
        self.t0 = time.monotonic()
        self.wall0 = time.time()

    def now(self):
        return time.monotonic() - self.t0

    def start_worker(self):
        self.count += 1
        name = f"t{self.count}"
        self.starts[name] = time.time()
        self.cluster.start_worker(name)
        self.order.append(name)
        return name

    def live_workers(self):
        return [n for n in self.order if self.cluster.workers[n].alive()]

    def kill_oldest(self, k):
        victims = self.live_workers()[:k]
        for name in victims:
            self.kills.append((time.time(), name))
            self.cluster.workers[name].signal(signal.SIGKILL)
        return victims

    def sample(self):
        """The newest progress line of any live worker -> (step, epoch, world), recorded."""
        best = None
        for name in self.live_workers():
            proc = self.cluster.workers[name]
            tail = proc.output_tail(2048)
            m = re.findall(r"^step (\d+)/\d+ .*\| epoch (\d+) rank \d+/(\d+)$", tail, re.M)
            if m:
                step, epoch, world = (int(x) for x in m[-1])
                if best is None or step > best[0]:
                    best = (step, epoch, world)
        if best is not None:
            self.samples.append((self.now(), *best))
        return best

    def newest_step(self):
        s = self.sample()
        return s[0] if s else -1

    def close(self):
        self.cluster.close(failed=False)


def rates_by_world(samples):
    """Seconds per step for each world size: per epoch, from the first to the last sample of
    that epoch (the transitions between epochs are the recoveries, counted apart)."""
    spans = {}
    for t, step, epoch, world in samples:
        first = spans.setdefault(epoch, [world, t, step, t, step])
        first[3], first[4] = t, step
    total = {}
    for world, t1, s1, t2, s2 in spans.values():
        if t2 - t1 >= 1.0 and s2 > s1:
            acc = total.setdefault(world, [0.0, 0])
            acc[0] += t2 - t1
            acc[1] += s2 - s1
    return {w: acc[0] / acc[1] for w, acc in sorted(total.items())}


def worker_step_ms(run):
    """Median of the workers' own "ms/step" (the step as the trainer times it) by world size:
    a diagnostic beside rates_by_world's wall-clock rates (the gap is time between steps)."""
    by_world = {}
    for proc in run.cluster.workers.values():
        for ms, world in re.findall(r"\| ([0-9.]+) ms/step \| epoch \d+ rank \d+/(\d+)$",
                                    proc.output(), re.M):
            by_world.setdefault(int(world), []).append(float(ms))
    return {w: statistics.median(v) for w, v in sorted(by_world.items())}


def costs_from_events(run, step_s):
    """Join delay and stall, loss recovery and restore, from events.jsonl and the driver's
    start/kill times (seconds). step_s: seconds per step by world size."""
    def step_of(world):
        if world in step_s:
            return step_s[world]
        return min(step_s.values()) if step_s else 0.0

    joins_delay, joins_stall, losses, restores = [], [], [], []
    unmatched = sorted(run.starts.items(), key=lambda kv: kv[1])
    kills = sorted(run.kills)
    for e in run.cluster.events():
        if "cause" not in e or not e.get("recovery"):
            continue
        rec = e["recovery"]
        detected = iso_to_epoch(e["time"])
        world = len(e.get("members_after") or [])
        first = rec.get("first_step_ms")
        plan = rec.get("plan_sent_ms") or 0.0
        if first is None or world == 0:
            continue
        source = str(e.get("state_source", ""))
        grew = len(e["members_after"]) - len(e.get("members_before") or [])
        if grew > 0:
            # The newcomers: the earliest started workers not yet matched, started before.
            newcomers = [kv for kv in unmatched if kv[1] <= detected][:grew]
            for kv in newcomers:
                unmatched.remove(kv)
                joins_delay.append(detected - kv[1] + plan / 1000.0)
            stall = max(0.0, (first - plan) / 1000.0 - step_of(world))
            if "checkpoint" in source:
                restores.append(stall)
            elif e.get("members_before"):
                joins_stall.append(stall)
        elif grew < 0 and e.get("cause") == "lost":
            before = [k for k in kills if k[0] <= detected]
            lag = detected - before[-1][0] if before else 0.0
            losses.append(max(0.0, lag) + max(0.0, first / 1000.0 - step_of(world)))

    def med(v, default):
        return statistics.median(v) if v else default
    return {"join_delay_s": med(joins_delay, 1.0), "join_recovery_s": med(joins_stall, 0.1),
            "peer_recovery_s": med(losses, 0.2), "restore_cost_s": med(restores, 0.5),
            "counts": {"joins": len(joins_delay), "join_stalls": len(joins_stall),
                       "losses": len(losses), "restores": len(restores)}}


# ----------------------------------------------------------------------------- phases

def config_for(data, ckpt, steps):
    return small_config(data, seq_len=64, global_batch=12, steps=steps, log_every=1,
                        max_workers=8, checkpoint={"dir": ckpt, "every_steps": EVERY, "keep": 2})


def calibrate(work, data, workers, measure_steps):
    """One short run: 1..W workers (a join each), a loss, a full wipe and a restore."""
    run = LiveRun("calibrate", config_for(data, os.path.join(work, "cal-ckpt"), 10 ** 6),
                  os.path.join(work, "calibrate"))
    try:
        run.start()

        def steady(world):
            # Wait for a line of this world size, then measure_steps steps in it.
            wait_until(lambda: (run.sample() or (0, 0, 0))[2] == world, 120,
                       f"world size {world}", interval=0.1)
            s0 = run.newest_step()
            wait_until(lambda: run.newest_step() >= s0 + measure_steps, 300,
                       f"{measure_steps} steps with {world} workers", interval=0.1)

        run.start_worker()
        steady(1)
        for world in range(2, workers + 1):
            run.start_worker()
            steady(world)
        run.kill_oldest(1)
        steady(workers - 1)
        # A full wipe: every worker killed after a committed checkpoint, then one new worker.
        run.kill_oldest(len(run.live_workers()))
        wait_until(lambda: run.cluster.try_status() and run.cluster.try_status()["world_size"] == 0,
                   60, "the coordinator to notice the wipe", interval=0.2)
        run.start_worker()
        steady(1)
        step_s = rates_by_world(run.samples)
        costs = costs_from_events(run, step_s)
        return {"step_s": step_s, "worker_step_ms": worker_step_ms(run), **costs}
    finally:
        run.close()


def live_run(work, data, schedule, period_s, steps):
    """Replays the schedule against a run of `steps` steps; returns measurements."""
    run = LiveRun("trace", config_for(data, os.path.join(work, "trace-ckpt"), steps),
                  os.path.join(work, "trace"))
    events = looped_events(schedule, period_s)
    fired = []
    try:
        run.start()
        for _ in range(schedule[0][1]):
            run.start_worker()
        fired.append((0.0, schedule[0][1], "start"))
        finished_at = None
        i = 0
        while finished_at is None:
            t = run.now()
            while i < len(events) and events[i][0] <= t:
                target = events[i][1]
                have = len(run.live_workers())
                if target < have:
                    victims = run.kill_oldest(have - target)
                    fired.append((t, target, "kill " + ",".join(victims)))
                elif target > have:
                    started = [run.start_worker() for _ in range(target - have)]
                    fired.append((t, target, "start " + ",".join(started)))
                i += 1
            newest = run.newest_step()
            if newest >= steps:
                finished_at = run.samples[-1][0]
                break
            if not run.cluster.coordinator.alive():
                # The last step's workers exited between two samples.
                if any(re.search(rf"^step {steps}/{steps} ", p.output(), re.M)
                       for p in run.cluster.workers.values()):
                    finished_at = run.now()
                    break
                raise RuntimeError("the coordinator exited before the last step:\n"
                                   + run.cluster.coordinator.tail())
            if t > 6 * period_s:
                raise RuntimeError(f"no finish after {t:.0f}s (newest step {newest})")
            time.sleep(0.1)
        try:
            code = run.cluster.coordinator.popen.wait(timeout=60)
        except subprocess.TimeoutExpired:
            code = None
        digests = sorted(set(run.cluster.digests().values()))
        step_s = rates_by_world(run.samples)
        costs = costs_from_events(run, step_s)
        epochs = [e for e in run.cluster.events() if "cause" in e]
        return {"wall_s": finished_at, "coordinator_exit": code, "digests": digests,
                "fired": fired, "samples": [list(s) for s in run.samples],
                "epochs": len(epochs),
                "measured": {"step_s": step_s, "worker_step_ms": worker_step_ms(run), **costs}}
    finally:
        run.close()


def predict(schedule_path, workers, steps, inputs, timeline_path, linear=False):
    """`spotrain plan` on the schedule with these inputs; linear: only the step time with all
    workers, scaled as workers/live (the planner's default model)."""
    step_s = {int(k): v for k, v in inputs["step_s"].items()}
    if linear:
        step_s = {workers: step_s[workers]} if workers in step_s else step_s
    # A world size never seen steady: scale from the nearest measured one (linear).
    for k in range(1, workers + 1):
        if k not in step_s:
            near = min(step_s, key=lambda w: abs(w - k))
            step_s[k] = step_s[near] * near / k
    by_live = ",".join(f"{k}:{step_s[k]:.6f}" for k in range(1, workers + 1))
    cmd = [os.path.join(BIN, "spotrain"), "plan", "--trace", schedule_path,
           "--gpus", str(workers), "--trace_offset_s", "0", "--trials", "1",
           "--steps", str(steps),
           *(["--step_seconds", f"{step_s[workers]:.6f}"] if linear
             else ["--step_seconds_by_live", by_live]),
           "--join_delay_s", f"{inputs['join_delay_s']:.4f}",
           "--join_recovery_s", f"{inputs['join_recovery_s']:.4f}",
           "--peer_recovery_s", f"{inputs['peer_recovery_s']:.4f}",
           "--restore_cost_s", f"{inputs['restore_cost_s']:.4f}",
           "--checkpoint_cost_s", "0.01", "--checkpoint_every_steps", str(EVERY),
           "--spot_price", "1", "--on_demand_price", "1", "--json",
           "--timeline_out", timeline_path]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    plan = json.loads(out.stdout)
    mode = next(m for m in plan["modes"] if m["name"] == "spot+spotrain")
    timeline = [[float(x) for x in line.split()] for line in open(timeline_path)
                if line.strip() and not line.startswith("#")]
    return {"command": " ".join(cmd[1:]), "wall_s": mode["wall_hours"]["mean"] * 3600,
            "goodput": mode["goodput"], "step_s": step_s, "timeline": timeline,
            "wipes": mode["wipes"], "peer_recoveries": mode["peer_recoveries"],
            "rollbacks": mode["rollbacks"]}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trace", default=os.path.join(ROOT, "examples/traces/aws-p3-spot-32.csv"))
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--period", type=float, default=300,
                   help="seconds the trace's 10.95 h window is compressed into")
    p.add_argument("--fraction", type=float, default=0.85,
                   help="job length: this fraction of the steps the schedule allows")
    p.add_argument("--calibrate-steps", type=int, default=150,
                   help="steps measured at each number of workers in the calibration run")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "out"))
    p.add_argument("--from-json", default="",
                   help="recompute the predictions of a saved trace_validation.json (no run)")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.from_json:
        recompute(args.from_json, args.out)
        return

    # The job's live count: chaos.py's slot model (the one `spotrain plan` uses for traces).
    schedule = trace_job_schedule(args.trace, args.workers, args.seed, args.period)
    trace_s = window_seconds(args.trace)
    schedule_path = os.path.join(args.out, "trace_validation_schedule.csv")
    write_schedule(schedule, schedule_path)
    work = tempfile.mkdtemp(prefix="spotrain-trace-validation-")
    data = write_corpus(os.path.join(work, "data"))

    load = {"before_calibration": os.getloadavg()[0]}
    cal = calibrate(work, data, args.workers, args.calibrate_steps)
    load["before_run"] = os.getloadavg()[0]
    cal_step = dict(cal["step_s"])
    for k in range(1, args.workers + 1):
        cal_step.setdefault(k, min(cal_step.values()))
    allowed = sum((b[0] - a[0]) / cal_step[a[1]] for a, b in zip(schedule, schedule[1:])
                  if a[1] > 0)
    steps = int(args.fraction * allowed)
    print(f"schedule: {len(schedule) - 2} changes over {args.period:.0f} s "
          f"({trace_s / args.period:.0f}x compressed); calibration {json.dumps(cal)}; "
          f"job {steps} steps", flush=True)

    live = live_run(work, data, schedule, args.period, steps)
    load["after_run"] = os.getloadavg()[0]
    losses = sum(max(0, a[1] - b[1]) for a, b in zip(schedule, schedule[1:]))
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "seed": args.seed,
              "workers": args.workers, "period_s": args.period, "trace_s": trace_s,
              "steps": steps, "checkpoint_every_steps": EVERY, "load_average": load,
              "calibrate_steps": args.calibrate_steps,
              "schedule": schedule, "schedule_changes": len(schedule) - 2,
              "schedule_losses": losses,
              "schedule_wipes": sum(1 for _, v in schedule[1:-1] if v == 0),
              "calibration": cal, "live": live}
    evaluate(result, schedule_path, work)
    with open(os.path.join(args.out, "trace_validation.json"), "w") as f:
        json.dump(result, f)
    show(result)
    shutil.rmtree(work, ignore_errors=True)  # kept when anything above failed


def evaluate(result, schedule_path, work):
    """The simulator's predictions for the run in `result` and the comparison rows."""
    workers, steps, live = result["workers"], result["steps"], result["live"]
    preds = {
        "predicted_from_calibration": ("calibration run (before)", result["calibration"], False),
        "predicted_from_run": ("this run's own measurements", live["measured"], False),
        # Which part of the calibration's miss is the machine's speed: its event costs with
        # the run's step times.
        "predicted_mixed": ("calibration costs, run's step times",
                            dict(result["calibration"], step_s=live["measured"]["step_s"]), False),
        "predicted_linear": ("the run's, linear scaling", live["measured"], True),
    }
    result["rows"] = []
    for key, (label, inputs, linear) in preds.items():
        pred = predict(schedule_path, workers, steps, inputs, os.path.join(work, f"tl-{key}"),
                       linear=linear)
        result[key] = pred
        ideal = steps * pred["step_s"][workers]
        measured = ideal / live["wall_s"]
        result["rows"].append({
            "inputs": label, "ideal_s": ideal, "measured_wall_s": live["wall_s"],
            "predicted_wall_s": pred["wall_s"], "measured_goodput": measured,
            "predicted_goodput": pred["goodput"], "difference": measured / pred["goodput"] - 1})


def show(result):
    live, cal = result["live"], result["calibration"]
    print(f"\nTrace validation ({result['date']}): AWS p3 trace, {result['workers']} worker slots "
          f"(seed {result['seed']}): {result['schedule_changes']} changes, "
          f"{result['schedule_losses']} losses, {result['schedule_wipes']} full wipes; "
          f"{result['trace_s'] / 3600:.2f} h compressed into {result['period_s']:.0f} s; "
          f"gpt-tiny, {result['steps']} steps, checkpoint every {result['checkpoint_every_steps']}")
    print(f"live run: {live['wall_s']:.1f} s to the last step, {live['epochs']} epochs, "
          f"coordinator exit {live['coordinator_exit']}, {len(live['digests'])} final digest(s)")
    print(f"{'simulator inputs from':36s} {'measured wall s':>15s} {'predicted':>10s} "
          f"{'measured goodput':>17s} {'predicted':>10s} {'difference':>10s}")
    for r in result["rows"]:
        print(f"{r['inputs']:36s} {r['measured_wall_s']:15.1f} {r['predicted_wall_s']:10.1f} "
              f"{r['measured_goodput']:17.3f} {r['predicted_goodput']:10.3f} "
              f"{100 * r['difference']:+9.1f}%")
    for label, inputs in (("calibration", cal), ("run", live["measured"])):
        st = ", ".join(f"{k}: {float(v) * 1000:.0f} ms"
                       for k, v in sorted(inputs["step_s"].items(), key=lambda kv: int(kv[0])))
        print(f"inputs ({label}): step time by workers {st}; join delay "
              f"{inputs['join_delay_s']:.2f} s, join stall {inputs['join_recovery_s']:.2f} s, "
              f"loss {inputs['peer_recovery_s']:.2f} s, restore {inputs['restore_cost_s']:.2f} s "
              f"{inputs['counts']}")
        if inputs.get("worker_step_ms"):
            print(f"  the workers' own ms/step (median, by workers): " + ", ".join(
                f"{k}: {float(v):.0f}" for k, v in sorted(inputs["worker_step_ms"].items(),
                                                          key=lambda kv: int(kv[0]))))
    if "load_average" in result:
        print("1-minute load average (2 cores, shared): " + ", ".join(
            f"{k.replace('_', ' ')} {v:.1f}" for k, v in result["load_average"].items()))
    print(f"goodput = steps x (step time with {result['workers']} workers) / wall time; "
          "difference = measured / predicted - 1")


def recompute(path, out):
    """--from-json: the predictions again (e.g. after a change to the simulator), no run."""
    result = json.load(open(path))
    schedule_path = os.path.join(out, "trace_validation_schedule.csv")
    write_schedule(result["schedule"], schedule_path)
    work = tempfile.mkdtemp(prefix="spotrain-trace-validation-")
    evaluate(result, schedule_path, work)
    shutil.rmtree(work, ignore_errors=True)
    with open(os.path.join(out, "trace_validation.json"), "w") as f:
        json.dump(result, f)
    show(result)


if __name__ == "__main__":
    main()
