#!/usr/bin/env python3
"""Regenerates docs/benchmarks.md from the outputs of bench/run_all.sh (bench/out/)."""
import json
import os
import platform
import re
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "bench", "out")
DOC = os.path.join(ROOT, "docs", "benchmarks.md")
IMG = os.path.join(ROOT, "docs", "img")


def text(name):
    path = os.path.join(OUT, f"{name}.txt")
    return open(path).read() if os.path.exists(path) else None


def data(name):
    path = os.path.join(OUT, f"{name}.json")
    return json.load(open(path)) if os.path.exists(path) else None


def machine():
    cpu = "unknown CPU"
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = int(open("/proc/meminfo").readline().split()[1]) // (1024 * 1024)
    return f"{cpu}, {os.cpu_count()} cores, {mem} GiB, {platform.system()} {platform.release()}"


def gnuplot(script):
    try:
        subprocess.run(["gnuplot"], input=script, text=True, check=True, capture_output=True)
        return True
    except (OSError, subprocess.CalledProcessError):
        return False


def section(title, how, body):
    return f"## {title}\n\nReproduce: `{how}`\n\n{body.rstrip()}\n\n"


def fenced(s):
    return "```\n" + s.strip() + "\n```\n"


def last_lines(s, start_pattern):
    lines = s.splitlines()
    for i, line in enumerate(lines):
        if re.search(start_pattern, line):
            return "\n".join(lines[i:])
    return s


def coordinator_cpu_plot(t):
    """docs/img/coordinator-cpu.png from the coordinator_load table; markdown or ''."""
    rows = re.findall(r"^\s*(\d+)\s+([0-9.]+) %\s+(\d+) MB", t, re.M)
    if not rows:
        return ""
    pts = os.path.join(OUT, "coordinator_cpu.dat")
    with open(pts, "w") as f:
        for workers, cpu, rss in rows:
            f.write(f"{workers} {cpu} {rss}\n")
    if not gnuplot(f"""set terminal pngcairo size 800,400
set output "{IMG}/coordinator-cpu.png"
set title "Coordinator CPU and memory against simulated workers (heartbeat 1 Hz)"
set logscale x; set xlabel "workers"; set ylabel "CPU, % of one core"; set y2label "RSS, MB"
set ytics nomirror; set y2tics; set grid; set key left top; set yrange [0:60]; set y2range [0:*]
plot "{pts}" using 1:2 with linespoints lw 2 pt 7 lc rgb "#cc3311" title "CPU %", \\
     "{pts}" using 1:3 axes x1y2 with linespoints lw 2 pt 5 lc rgb "#7799cc" title "RSS MB", \\
     50 with lines dt 2 lc rgb "black" title "target: 50% at 5000"
"""):
        return ""
    return "\n![coordinator CPU against workers](img/coordinator-cpu.png)\n"


def trace_validation_section():
    """The live replay of the AWS trace against the simulator (bench/trace_validation.py)."""
    v = data("trace_validation")
    if not v:
        return ""
    rows = "\n".join(
        f"| {r['inputs']} | {r['measured_wall_s']:.1f} | {r['predicted_wall_s']:.1f} | "
        f"{r['measured_goodput']:.3f} | {r['predicted_goodput']:.3f} | "
        f"**{100 * r['difference']:+.1f}%** |" for r in v["rows"])

    def inputs_row(label, i):
        st = ", ".join(f"{k}: {float(s) * 1000:.0f}" for k, s in sorted(
            i["step_s"].items(), key=lambda kv: int(kv[0])))
        c = i.get("counts", {})
        return (f"| {label} | {st} | {i['join_delay_s']:.2f} | {i['join_recovery_s']:.2f} | "
                f"{i['peer_recovery_s']:.2f} | {i['restore_cost_s']:.2f} | "
                f"{c.get('joins', 0)} / {c.get('losses', 0)} / {c.get('restores', 0)} |")
    live = v["live"]
    body = (
        f"The real AWS p3 trace (32 instances, 10.95 h) replayed against a live run on this "
        f"machine, and the simulator's prediction for the same schedule. The job holds "
        f"{v['workers']} of the 32 instance slots (seed {v['seed']}): {v['schedule_changes']} "
        f"changes of its live count, {v['schedule_losses']} losses, {v['schedule_wipes']} full "
        f"wipes, compressed {v['trace_s'] / v['period_s']:.0f}x into {v['period_s']:.0f} s. "
        f"The driver kills the longest-running workers with SIGKILL when the schedule drops and "
        f"starts new ones when it rises. gpt-tiny (seq 64, global batch 12), {v['steps']} steps, "
        f"checkpoint every {v['checkpoint_every_steps']} steps. The simulator is "
        "`spotrain plan --trace SCHEDULE --trace_offset_s 0 --trials 1` with the measured step "
        "time per number of workers, join delay and stall, loss recovery and restore cost. "
        "**Goodput** = steps x (step time with all workers) / wall time, on both sides; the wall "
        "time runs from the start of the first workers to the last step. "
        f"Live run ({v['date']}): {live['wall_s']:.1f} s, {live['epochs']} epochs, coordinator "
        f"exit {live['coordinator_exit']}, {len(live['digests'])} distinct final digest(s). "
        "Target: within 10%.\n\n"
        "| simulator inputs measured in | measured wall s | predicted wall s | measured goodput "
        "| predicted goodput | difference |\n|---|---|---|---|---|---|\n" + rows + "\n\n"
        "| inputs | ms per step by workers | join delay s | join stall s | loss s | restore s "
        "| joins / losses / restores seen |\n|---|---|---|---|---|---|---|\n"
        + inputs_row("calibration run (before)", v["calibration"]) + "\n"
        + inputs_row("the run itself", live["measured"]) + "\n\n"
        "Rows: (1) a prediction made before the run, from a separate calibration run (1 to "
        f"{v['workers']} workers, a loss, a full wipe and a restore); (2) the simulator fed the "
        "step times and event costs measured in the run itself: this tests the model "
        "(capacity, speed per number of workers, per-event costs, rollbacks) apart from the "
        "machine's speed, which on this shared 2-core machine drifts between runs by more than "
        "the target; (3) the calibration's event costs with the run's step times: how much of "
        "row 1's miss is the step speed; (4) as (2) but with the planner's default linear "
        "scaling of the step time. docs/planner.md discusses the differences.\n")
    # The plot: live workers (schedule), measured useful steps, the simulator's curves.
    sched = os.path.join(OUT, "trace_schedule.dat")
    with open(sched, "w") as f:
        sch = v["schedule"]
        for (t, n), nxt in zip(sch, sch[1:] + [[max(live["wall_s"], sch[-1][0]), sch[-1][1]]]):
            f.write(f"{t} {n}\n{nxt[0]} {n}\n")
        # The trace loops after its period (as the simulator replays it).
        period = v["period_s"]
        if live["wall_s"] > period:
            pts = [(t + period, n) for t, n in sch if t + period <= live["wall_s"]]
            for (t, n), nxt in zip(pts, pts[1:] + [(live["wall_s"], pts[-1][1] if pts else 0)]):
                f.write(f"{t} {n}\n{nxt[0]} {n}\n")
    measured = os.path.join(OUT, "trace_measured.dat")
    with open(measured, "w") as f:
        for t, step, _epoch, _world in live["samples"]:
            f.write(f"{t} {step}\n")
    curves = []
    for key, title, colour in (("predicted_from_run", "simulator (inputs from the run)",
                                "#228833"),
                               ("predicted_from_calibration",
                                "simulator (inputs from the calibration run)", "#999999")):
        path = os.path.join(OUT, f"trace_{key}.dat")
        with open(path, "w") as f:
            for t, steps, _live, _working in v[key]["timeline"]:
                f.write(f"{t} {steps}\n")
        curves.append(f'"{path}" using 1:2 with lines lw 2 dt 2 lc rgb "{colour}" '
                      f'title "{title}"')
    if gnuplot(f"""set terminal pngcairo size 900,450
set output "{IMG}/trace-goodput.png"
set title "AWS p3 spot trace, {v['workers']} worker slots, {v['trace_s'] / 3600:.2f} h compressed into {v['period_s']:.0f} s: useful steps"
set xlabel "seconds since the first workers started"; set ylabel "useful steps (newest step)"
set y2label "live workers (trace)"; set ytics nomirror; set y2tics 1; set y2range [0:{v['workers'] + 1}]
set grid; set key right bottom box opaque
plot "{sched}" using 1:2 axes x1y2 with lines lw 1 lc rgb "#bbbbbb" title "live workers (right axis)", \\
     "{measured}" using 1:2 with lines lw 2 lc rgb "#cc3311" title "measured", \\
     {", ".join(curves)}
"""):
        body += "\n![goodput under the preemption trace](img/trace-goodput.png)\n"
    return section("Goodput under the real AWS spot trace: live run against the simulator",
                   "python3 bench/trace_validation.py   # about 7 minutes", body)


def main():
    os.makedirs(IMG, exist_ok=True)
    parts = [f"# Benchmarks\n\nGenerated by `bench/run_all.sh` (then `bench/report.py`) on "
             f"{time.strftime('%Y-%m-%d')}.\nMachine: {machine()}.\n"
             "Every comparison is measured side by side in the same run (alternating), because "
             "these machines are shared and noisy; compare ratios, not absolute numbers. GPU "
             "results are in `docs/gpu-results.md`.\n\n"]

    curve = text("training_curve")
    if curve:
        vals = re.findall(r"step (\d+)/\d+ \| loss [0-9.]+ \| val ([0-9.]+)", curve)
        stats = json.load(open(os.path.join(ROOT, "data", "pystdlib", "stats.json")))
        rows = "\n".join(f"| {s} | {v} |" for s, v in vals)
        done = re.findall(r"done .*", curve)
        pts = os.path.join(OUT, "curve.dat")
        with open(pts, "w") as f:
            for m in re.finditer(r"step (\d+)/\d+ \| loss ([0-9.]+)( \| val ([0-9.]+))?", curve):
                f.write(f"{m.group(1)} {m.group(2)} {m.group(4) or 'NaN'}\n")
        gnuplot(f"""set terminal pngcairo size 800,450
set output "{IMG}/gpt-tiny-curve.png"
set title "gpt-tiny, Python standard library (bytes), standalone worker, 1 thread"
set xlabel "step"; set ylabel "loss (nats/token)"; set grid
plot "{pts}" using 1:2 with lines lc rgb "#7799cc" title "train loss", \\
     "{pts}" using 1:3 with linespoints lw 2 pt 7 lc rgb "#cc3311" title "val loss", \\
     {stats['unigram_entropy_nats']} with lines dt 2 lc rgb "black" title "unigram entropy"
""")
        parts.append(section(
            "Training curve: gpt-tiny on the default corpus",
            "scripts/prepare_default_data.sh && build/bin/spotrain-worker",
            f"Corpus unigram entropy: **{stats['unigram_entropy_nats']:.4f} nats/token** "
            f"({stats['train_tokens']} train tokens). The validation loss is below it from the "
            "first evaluation (step 50).\n\n| step | val loss |\n|---|---|\n" + rows +
            "\n\n" + fenced("\n".join(done)) + "\n![curve](img/gpt-tiny-curve.png)\n"))

    cpu = data("cpu_throughput")
    if cpu:
        rows = "\n".join(
            f"| {r['preset']} | {r['spotrain_tokens_per_s']:.0f} | {r['pytorch_tokens_per_s']:.0f} | "
            f"**{r['ratio']:.2f}** | {r['spotrain_peak_rss_mib']:.0f} | {r['pytorch_peak_rss_mib']:.0f} |"
            for r in cpu["results"])
        parts.append(section(
            "CPU training throughput against PyTorch (one thread)",
            "OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 /usr/bin/python3 bench/cpu_throughput.py",
            "Same architecture and sizes, AdamW, batch 8, one thread each, runs alternated; "
            "median ms/step after warm-up. Target: ratio spotrain/PyTorch >= 1.0.\n\n"
            "| preset | spotrain tok/s | PyTorch 1.13 tok/s | ratio | spotrain peak RSS MiB | "
            "PyTorch peak RSS MiB |\n|---|---|---|---|---|---|\n" + rows + "\n"))

    rec = data("recovery")
    if rec:
        body = fenced(last_lines(text("recovery") or "", r"^Recovery from"))
        r = rec["spotrain_recovery"]
        pts = os.path.join(OUT, "recovery.dat")
        with open(pts, "w") as f:
            for i, t in enumerate(r):
                f.write(f"{i + 1} {t['detect_ms']:.1f} {t['plan_ms']:.1f} {t['rebuild_ms']:.1f} "
                        f"{t['sync_ms']:.1f} {t['redo_ms']:.1f}\n")
        if gnuplot(f"""set terminal pngcairo size 800,400
set output "{IMG}/recovery-timeline.png"
set title "spotrain: kill -9 of 1 of 3 workers, time to the next completed step"
set style data histograms; set style histogram rowstacked; set style fill solid 0.8 border -1
set boxwidth 0.6; set ylabel "ms"; set xlabel "trial"; set grid ytics
plot "{pts}" using 2:xtic(1) title "detect", "" using 3 title "plan", "" using 4 title "rebuild group", \\
     "" using 5 title "sync state", "" using 6 title "redo step"
"""):
            body += "\n![recovery timeline](img/recovery-timeline.png)\n"
        parts.append(section(
            "Recovery from a lost worker, against torchrun; scale-up; overhead",
            "/usr/bin/python3 bench/recovery.py --trials 5 --torch-trials 3",
            "3 workers training gpt-tiny (checkpoint every 10 steps); one killed with -9 "
            "mid-run. spotrain: time from the kill to the next step completed by the survivors "
            "(breakdown from events.jsonl). torchrun: TorchElastic 1.13, c10d rendezvous, 3 "
            "single-process nodes, same model, checkpoint every 10 steps; time from the kill to "
            "the first step completed by the restarted workers, and the steps rolled back. "
            "Targets: spotrain median under 1 s and at least 20x faster than torchrun; lost "
            "steps <= 1; scale-up under 2 s; overhead ratio <= 1.02.\n\n" + body))

    parts.append(trace_validation_section())

    for name, title, how in (
            ("overhead", "Overhead: one worker under a coordinator against the standalone worker",
             "/usr/bin/python3 bench/overhead.py"),
            ("deterministic_cost", "Deterministic mode cost (3 workers)",
             "python3 bench/deterministic_cost.py"),
            ("checkpoint", "Checkpoint stall and background write throughput (gpt-small state)",
             "build/tests/worker_checkpoint_test --gtest_also_run_disabled_tests "
             "--gtest_filter='CheckpointBench.*'"),
            ("restore", "Restore after a full wipe into 1, 2 and 4 workers",
             "/usr/bin/python3 bench/restore.py"),
            ("coordinator_load", "Coordinator under N simulated workers",
             "bench/coordinator_load.sh"),
            ("plan", "Spot planner on the real AWS trace (8 GPUs, 192 GPU-hours)",
             "build/bin/spotrain plan --trace examples/traces/aws-p3-spot-32.csv --gpus 8 ...")):
        t = text(name)
        if t:
            body = fenced(t[-6000:])
            if name == "coordinator_load":
                body += coordinator_cpu_plot(t)
            parts.append(section(title, how, body))
    with open(DOC, "w") as f:
        f.write("".join(parts))


if __name__ == "__main__":
    main()
