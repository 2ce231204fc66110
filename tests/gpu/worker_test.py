"""The worker training on a GPU, as real processes (label `gpu`; issue: GPU path).

One GPU, so one rank at a time (NCCL rejects two ranks on one device). Scenarios:
  standalone_repeatable  the same deterministic run twice on the GPU: equal digests; its
                         validation loss is close to the CPU's on the same config.
  kill_and_restore       elastic run under a coordinator on cuda:0; kill -9 the worker after
                         a checkpoint; a new GPU worker restores it and finishes with the
                         digest of the uninterrupted GPU run (the restore path of the GPU
                         replica: host state -> device).
  cpu_worker_refused     a CPU worker asking to join a GPU run is refused with the reason.
  bf16                   precision bf16 under a coordinator: finishes, loss goes down.

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


SCENARIOS = {
    "standalone_repeatable": standalone_repeatable,
    "kill_and_restore": kill_and_restore,
    "cpu_worker_refused": cpu_worker_refused,
    "bf16": bf16,
}

if __name__ == "__main__":
    usable, reason = gpu_usable()
    if not usable:
        print(f"SKIPPED: no usable GPU for the worker: {reason}")
        sys.exit(SKIP)
    sys.exit(run_scenarios(SCENARIOS, sys.argv))
