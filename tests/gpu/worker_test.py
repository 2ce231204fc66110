"""The worker training on a GPU, as real processes (label `gpu`; issue: GPU path).

One rank per GPU (NCCL rejects two ranks on one device). Scenarios:
  standalone_repeatable  the same deterministic run twice on the GPU: equal digests; its
                         validation loss is close to the CPU's on the same config.
  kill_and_restore       elastic run under a coordinator on cuda:0; kill -9 the worker after
                         a checkpoint; a new GPU worker restores it and finishes with the
                         digest of the uninterrupted GPU run (the restore path of the GPU
                         replica: host state -> device).
  cpu_worker_refused     a CPU worker asking to join a GPU run is refused with the reason.
  bf16                   precision bf16 under a coordinator: finishes, loss goes down.
  nccl_shrink            three GPU ranks, the lowest killed with -9: the survivors shrink
                         their NCCL communicator and end with the one-GPU run's digest.
  nccl_frozen_peer       three GPU ranks, one frozen with SIGSTOP: the hung collective is
                         revoked, the survivors go on and end with that digest.
  nccl_grow              two GPU ranks, a third joins (new communicator, state broadcast):
                         all three end with that digest.
  nccl_bf16_shrink       bf16, default mode (fp32 sums on the device), three GPU ranks, one
                         killed: the survivors shrink and end within 2% of the one-GPU
                         bf16 run's validation loss.
The nccl_* scenarios need a GPU per rank (3), or the emulator, where every rank has cuda:0 and
the emulated NCCL links processes over TCP; with fewer GPUs they print "skipped" and pass.

Exit code 77 (ctest: skipped) when this machine has no usable GPU or the build has no CUDA.
SPOTRAIN_TEST_EMULATED=1 (ctest's emulated.worker, on the worker built for the CPU emulator of
the CUDA code, tests/emulation/): the same scenarios with half the batch and half the steps.
  worker_test.py [scenario...]
"""
import os
import re
import signal
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))
from harness import (BIN, TestFailure, check, final_val_loss, run_cluster, run_scenarios,  # noqa: E402
                     small_config, wait_until, write_corpus)

SKIP = 77
# The device under test; SPOTRAIN_TEST_DEVICE=cpu dry-runs the scenario logic on a CPU
# machine (cpu_worker_refused and bf16 then fail by design).
DEVICE = os.environ.get("SPOTRAIN_TEST_DEVICE", "cuda:0")
EMULATED = os.environ.get("SPOTRAIN_TEST_EMULATED") == "1"
WORK = tempfile.mkdtemp(prefix="spotrain-gpu-worker-")
DATA = write_corpus(os.path.join(WORK, "data"))


def gpu_usable():
    """(usable, reason): asks the worker itself, as a user would."""
    out = subprocess.run([os.path.join(BIN, "spotrain-worker"), "--device", DEVICE,
                          "--check-config"], capture_output=True, text=True, timeout=120)
    return out.returncode == 0, (out.stderr.strip().splitlines() or [""])[-1]


def steps(n):
    """n steps on a GPU, half as many on the emulator (a step there takes ~2 s)."""
    return n // 2 if EMULATED else n


def config(**overrides):
    base = dict(model="gpt-tiny", seq_len=64, global_batch=4 if EMULATED else 8, micro_batch=2,
                steps=steps(40), deterministic=True, optimizer={"lr": 0.003, "warmup_steps": 5})
    base.update(overrides)
    return small_config(DATA, **base)


def standalone(cfg, device, name):
    """Runs the standalone worker; returns (digest, final val loss, output)."""
    path = os.path.join(WORK, f"{name}.json")
    with open(path, "w") as f:
        import json
        json.dump(cfg, f)
    out = subprocess.run([os.path.join(BIN, "spotrain-worker"), "--config", path, "--device",
                          device], capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise TestFailure(f"standalone {device} run failed:\n{out.stderr[-3000:]}")
    digests = re.findall(r"state_digest ([0-9a-f]{64})", out.stdout)
    loss = final_val_loss(out.stdout)
    check(digests and loss is not None, f"standalone {device} printed no summary:\n"
          + out.stdout[-2000:])
    return digests[-1], loss, out.stdout + out.stderr


_reference = {}


def gpu_reference(cfg):
    key = repr(sorted(cfg.items()))
    if key not in _reference:
        _reference[key] = standalone(cfg, DEVICE, "reference")
    return _reference[key]


def standalone_repeatable():
    cfg = config()
    first = gpu_reference(cfg)
    second = standalone(cfg, DEVICE, "again")
    check(f"on {DEVICE}" in first[2], "the standalone log does not say it trained on cuda:0:\n"
          + first[2][-1500:])
    check(first[0] == second[0], f"two deterministic GPU runs differ: {first[0][:16]} vs "
          f"{second[0][:16]}")
    cpu = standalone(cfg, "cpu", "cpu")
    rel = abs(first[1] - cpu[1]) / cpu[1]
    print(f"  val loss: GPU {first[1]:.4f}, CPU {cpu[1]:.4f} (relative difference {rel:.2e})")
    check(rel < 0.02, f"GPU val loss {first[1]} is not within 2% of the CPU's {cpu[1]}")


def committed(cfg):
    root = cfg["checkpoint"]["dir"]
    if not os.path.isdir(root):
        return []
    return sorted(int(d[5:]) for d in os.listdir(root)
                  if d.startswith("step-") and os.path.exists(os.path.join(root, d, "manifest.json")))


def kill_and_restore():
    cfg = config(steps=steps(60),
                 checkpoint={"dir": os.path.join(WORK, "ckpt"), "every_steps": steps(10)})
    plain = dict(cfg)
    plain.pop("checkpoint")
    reference = gpu_reference(plain)[0]

    def body(cluster):
        w1 = cluster.start_worker("g1", "--device", DEVICE)
        wait_until(lambda: committed(cfg) or not w1.alive(), 300, "a first checkpoint")
        check(w1.alive(), "worker g1 exited:\n" + w1.tail())
        check(f"training on {DEVICE}" in w1.output(), "g1 does not say it trains on cuda:0:\n"
              + w1.tail())
        w1.signal(signal.SIGKILL)
        w1.wait(30)
        w2 = cluster.start_worker("g2", "--device", DEVICE)
        cluster.wait_done(timeout=600)
        digest = cluster.digests().get("g2")
        check(digest == reference, f"g2 ended with digest {str(digest)[:16]}, the uninterrupted "
              f"GPU run with {reference[:16]}:\n{w2.tail()}")
        restored = [e for e in cluster.events()
                    if "checkpoint" in str(e.get("state_source", "")).lower()]
        check(restored, f"no restore from a checkpoint in the events: {cluster.events()}")

    run_cluster("gpu-kill", cfg, body)


def cpu_worker_refused():
    cfg = config(steps=400)

    def body(cluster):
        gpu = cluster.start_worker("g1", "--device", DEVICE)
        cluster.wait_step(2, timeout=300)
        cpu = cluster.start_worker("c1", "--device", "cpu", "--join-timeout-s", "20")
        code = cpu.wait(120)
        check(code != 0, "the CPU worker joined a GPU run")
        check("cannot join" in cpu.output() and "cuda" in cpu.output(),
              "the CPU worker's refusal does not give the reason:\n" + cpu.tail())
        check(gpu.alive(), "the GPU worker stopped:\n" + gpu.tail())

    run_cluster("gpu-mixed", cfg, body)


def bf16():
    cfg = config(deterministic=False, precision="bf16", steps=steps(60), log_every=1)

    def body(cluster):
        w = cluster.start_worker("b1", "--device", DEVICE)
        cluster.wait_done(timeout=600)
        losses = [float(x) for x in re.findall(r"^step \d+/\d+ \| loss ([0-9.]+)", w.output(),
                                               re.M)]
        check(len(losses) >= steps(20), "too few progress lines:\n" + w.tail())
        first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
        print(f"  bf16 loss: first 5 steps {first:.4f}, last 5 {last:.4f}")
        check(last < first, f"bf16 loss did not go down: {first:.4f} -> {last:.4f}")
        check("bf16" in w.output(), "the worker does not say it trains in bf16:\n" + w.tail())

    run_cluster("gpu-bf16", cfg, body)


def gpu_devices(n):
    """Devices for n GPU workers on this machine, or None: on the emulator every worker has
    the one emulated cuda:0; on GPUs, NCCL needs a device per rank (cuda:0 .. cuda:n-1)."""
    if EMULATED:
        return [DEVICE] * n
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    count = sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))
    return [f"cuda:{i}" for i in range(n)] if count >= n else None


def ranks_config(**overrides):
    """Three ranks, one micro-batch each; timeouts for three emulated GPUs sharing 2 cores."""
    return config(global_batch=6, micro_batch=2, steps=steps(40), heartbeat_timeout_ms=5000,
                  op_timeout_ms=60000, **overrides)


def nccl_log_lines(cluster, names):
    return [line for n in names for line in cluster.workers[n].output().splitlines()
            if "NCCL communicator" in line]


def check_reference_digests(cluster, names, reference):
    digests = cluster.digests()
    for n in names:
        check(digests.get(n) == reference, f"{n} ended with digest {str(digests.get(n))[:16]}, "
              f"the uninterrupted one-GPU run with {reference[:16]}:\n{cluster.workers[n].tail()}")


def ranks_setup(**overrides):
    """(devices, config, the one-GPU run (digest, val loss, output)) of the three-rank
    scenarios, or None (after printing "skipped") where there is no device per rank."""
    devices = gpu_devices(3)
    if devices is None:
        print("  skipped: needs 3 GPUs (NCCL runs one rank per device)")
        return None
    cfg = ranks_config(**overrides)
    return devices, cfg, gpu_reference(cfg)


def start_ranks(cluster, names, devices, min_step):
    """Starts one GPU worker per name and waits until they train together at min_step."""
    for n, d in zip(names, devices):
        cluster.start_worker(n, "--device", d)
    cluster.wait_status(lambda s: s["world_size"] == len(names) and s["step"] >= min_step, 300,
                        f"{len(names)} GPU ranks training")


def nccl_shrink():
    """Three GPU ranks; the lowest (the hub of the emulated NCCL's star) is killed with -9 at
    step 4: the survivors shrink their NCCL communicator (no new unique id), keep their state
    and finish with the digest of an uninterrupted one-GPU run (deterministic mode)."""
    setup = ranks_setup()
    if setup is None:
        return
    devices, cfg, (reference, _, _) = setup

    def body(cluster):
        names = ["r1", "r2", "r3"]
        start_ranks(cluster, names, devices, 4)
        victim = next((n for n in names if re.search(r"rank 0 of 3", cluster.workers[n].output())),
                      None)
        check(victim, "no worker logged 'rank 0 of 3' (the log format changed?):\n"
              + cluster.workers["r1"].tail())
        cluster.workers[victim].signal(signal.SIGKILL)
        survivors = [n for n in names if n != victim]
        cluster.wait_done(timeout=600)
        check_reference_digests(cluster, survivors, reference)
        lines = nccl_log_lines(cluster, survivors)
        check(any("shrunk from epoch" in line for line in lines),
              f"no survivor shrank its NCCL communicator (killed {victim}): {lines}\n"
              + cluster.workers[survivors[0]].tail())
        lost = [e for e in cluster.events() if e.get("cause") in ("lost", "collective_failed")]
        check(lost, f"no loss in the events: {cluster.events()}")
        check(sum(e.get("lost_steps", 0) for e in lost) <= 1,
              f"more than one step lost: {lost}")
        print(f"  killed {victim}; survivors: {'; '.join(lines)}")

    run_cluster("gpu-shrink", cfg, body)


def nccl_frozen_peer():
    """Three GPU ranks; one is frozen with SIGSTOP mid-run (its sockets stay open, so the
    survivors' collective hangs rather than fails): the coordinator's missed heartbeats end
    the epoch, the survivors revoke the hung collective, shrink, and finish with the
    reference digest."""
    setup = ranks_setup()
    if setup is None:
        return
    devices, cfg, (reference, _, _) = setup

    def body(cluster):
        start_ranks(cluster, ["f1", "f2", "f3"], devices, 4)
        frozen = cluster.workers["f3"]
        frozen.signal(signal.SIGSTOP)
        try:
            cluster.wait_status(lambda s: s["world_size"] == 2, 300,
                                "the survivors to go on without the frozen rank")
            cluster.wait_done(timeout=600)
        finally:
            frozen.signal(signal.SIGKILL)
        check_reference_digests(cluster, ["f1", "f2"], reference)
        lines = nccl_log_lines(cluster, ["f1", "f2"])
        check(any("shrunk from epoch" in line or "re-initialised from epoch" in line
                  for line in lines),
              f"the survivors built no NCCL communicator from the old one: {lines}")
        print(f"  survivors: {'; '.join(lines)}")

    run_cluster("gpu-frozen", cfg, body)


def nccl_grow():
    """Two GPU ranks, then a third joins: a new NCCL communicator over old and new ranks
    (fresh unique id), the new rank gets the state by broadcast, and all finish with the
    reference digest."""
    setup = ranks_setup()
    if setup is None:
        return
    devices, cfg, (reference, _, _) = setup

    def body(cluster):
        start_ranks(cluster, ["j1", "j2"], devices, 3)
        cluster.start_worker("j3", "--device", devices[2])
        cluster.wait_status(lambda s: s["world_size"] == 3, 300, "the third rank to join")
        cluster.wait_done(timeout=600)
        check_reference_digests(cluster, ["j1", "j2", "j3"], reference)
        joined = [e for e in cluster.events() if e.get("cause") == "joined"]
        check(joined, f"no join in the events: {cluster.events()}")
        check("broadcast" in str(joined[-1].get("state_source", "")).lower(),
              f"the joiner did not get the state by broadcast: {joined[-1]}")

    run_cluster("gpu-grow", cfg, body)


def nccl_bf16_shrink():
    """bf16 in default mode (fp32 gradients summed by NCCL on the device, not fixed point) on
    three GPU ranks, one killed with -9 at step 4: the survivors shrink, finish, and their
    validation loss is within 2% of the one-GPU bf16 run's (digests may differ: the order of
    the fp32 sums does)."""
    setup = ranks_setup(deterministic=False, precision="bf16")
    if setup is None:
        return
    devices, cfg, (_, reference_loss, _) = setup

    def body(cluster):
        names = ["b1", "b2", "b3"]
        start_ranks(cluster, names, devices, 4)
        cluster.workers["b2"].signal(signal.SIGKILL)
        survivors = ["b1", "b3"]
        cluster.wait_done(timeout=600)
        lines = nccl_log_lines(cluster, survivors)
        check(any("shrunk from epoch" in line for line in lines),
              f"no survivor shrank its NCCL communicator: {lines}")
        for n in survivors:
            loss = final_val_loss(cluster.workers[n].output())
            check(loss is not None and abs(loss - reference_loss) / reference_loss < 0.02,
                  f"{n}: final val loss {loss}, the one-GPU bf16 run's {reference_loss:.4f}:\n"
                  + cluster.workers[n].tail())
        print(f"  val loss: survivors {final_val_loss(cluster.workers['b1'].output()):.4f}, "
              f"one GPU {reference_loss:.4f}")

    run_cluster("gpu-bf16-shrink", cfg, body)


SCENARIOS = {
    "standalone_repeatable": standalone_repeatable,
    "kill_and_restore": kill_and_restore,
    "cpu_worker_refused": cpu_worker_refused,
    "bf16": bf16,
    "nccl_shrink": nccl_shrink,
    "nccl_frozen_peer": nccl_frozen_peer,
    "nccl_grow": nccl_grow,
    "nccl_bf16_shrink": nccl_bf16_shrink,
}

if __name__ == "__main__":
    usable, reason = gpu_usable()
    if not usable:
        print(f"SKIPPED: no usable GPU for the worker: {reason}")
        sys.exit(SKIP)
    sys.exit(run_scenarios(SCENARIOS, sys.argv))
