"""Multi-process test harness: a coordinator and workers on localhost, killed and started
by the test, observed through `spotrain status --json`, events.jsonl and the processes' logs.

Every wait is for an event (a status field, a log line, a process exit) with a generous
deadline, never a fixed sleep. Everything started is killed at the end, also on failure.
Used by the integration tests (ctest) and by the demo and chaos scripts.
"""
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

BUILD_DIR = os.environ.get("SPOTRAIN_BUILD_DIR") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "build")
BIN = os.path.join(BUILD_DIR, "bin")


class TestFailure(Exception):
    pass


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout, what, interval=0.05):
    """Polls predicate() until it returns a truthy value; raises TestFailure after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TestFailure(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def write_corpus(directory, tokens=60000, seed=1):
    """A small token corpus (letters with some structure) in llm.c shard format."""
    os.makedirs(directory, exist_ok=True)
    rng = random.Random(seed)
    words = ["the", "spot", "pod", "train", "ring", "step", "loss", "grad", "node", "lost",
             "join", "leave", "epoch", "plan", "state", "coordinator", "worker"]
    for name, count in (("train_000000.bin", tokens), ("val_000000.bin", tokens // 10)):
        text = []
        while sum(len(w) + 1 for w in text) < count:
            text.append(rng.choice(words))
        data = (" ".join(text)).encode()[:count]
        header = [20240520, 1, len(data)] + [0] * 253
        with open(os.path.join(directory, name), "wb") as f:
            import struct
            f.write(struct.pack("<256i", *header))
            f.write(struct.pack(f"<{len(data)}H", *data))
    return directory


def small_config(data_dir, **overrides):
    config = {
        "model": "gpt-tiny",
        "data": {"train": f"{data_dir}/train_*.bin", "val": f"{data_dir}/val_*.bin"},
        "seq_len": 32,
        "global_batch": 6,
        "micro_batch": 1,
        "steps": 60,
        "eval_every": 0,
        "eval_batches": 2,
        "optimizer": {"lr": 0.002, "warmup_steps": 5},
        "min_workers": 1,
        "max_workers": 8,
        "heartbeat_ms": 100,
        "heartbeat_timeout_ms": 1500,
        "join_settle_ms": 300,
        "op_timeout_ms": 3000,
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key].update(value)
        else:
            config[key] = value
    return config


class Process:
    def __init__(self, name, args, log_path, env):
        self.name = name
        self.args = args
        self.log_path = log_path
        self.log = open(log_path, "ab")
        self.popen = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                      start_new_session=True)

    @property
    def pid(self):
        return self.popen.pid

    def alive(self):
        return self.popen.poll() is None

    def signal(self, sig):
        if self.alive():
            os.kill(self.popen.pid, sig)

    def wait(self, timeout):
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TestFailure(f"{self.name} did not exit within {timeout:.0f}s; log tail:\n"
                              + self.tail())

    def output(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def output_tail(self, nbytes):
        """The last `nbytes` of the log (cheap to poll on a long run); "" if unreadable."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - nbytes))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def tail(self, lines=30):
        return "\n".join(self.output().splitlines()[-lines:])

    def close(self):
        if self.alive():
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.popen.wait()
        self.log.close()


class Cluster:
    """A coordinator and workers in a temporary directory."""

    def __init__(self, name, config, workdir=None, keep=False):
        self.name = name
        self.dir = workdir or tempfile.mkdtemp(prefix=f"spotrain-{name}-")
        self.keep = keep
        self.config = config
        self.config_path = os.path.join(self.dir, "run.json")
        with open(self.config_path, "w") as f:
            json.dump(config, f, indent=2)
        self.state_dir = os.path.join(self.dir, "state")
        self.port = free_port()
        self.token = "test-token-%08x" % random.getrandbits(32)
        self.env = dict(os.environ, SPOTRAIN_TOKEN=self.token)
        self.coordinator = None
        self.workers = {}
        self.extra = []
        self._worker_count = 0

    @property
    def address(self):
        return f"127.0.0.1:{self.port}"

    def start_coordinator(self, *flags):
        if self.coordinator is not None:
            self.coordinator.close()
        self.coordinator = Process(
            "coordinator",
            [os.path.join(BIN, "spotrain-coordinator"), "--config", self.config_path,
             "--port", str(self.port), "--state-dir", self.state_dir, *flags],
            os.path.join(self.dir, "coordinator.log"), self.env)
        wait_until(lambda: self.try_status() is not None or not self.coordinator.alive(), 60,
                   "the coordinator to answer status")
        if not self.coordinator.alive():
            raise TestFailure("coordinator exited at start:\n" + self.coordinator.tail())
        return self.coordinator

    def start_worker(self, name=None, *flags, env=None):
        self._worker_count += 1
        name = name or f"w{self._worker_count}"
        proc = Process(name, [os.path.join(BIN, "spotrain-worker"), "--coordinator",
                              self.address, "--name", name, *flags],
                       os.path.join(self.dir, f"{name}.log"), env or self.env)
        self.workers[name] = proc
        return proc

    def try_status(self):
        try:
            out = subprocess.run(
                [os.path.join(BIN, "spotrain"), "status", "--coordinator", self.address,
                 "--json"], env=self.env, capture_output=True, timeout=10)
        except subprocess.TimeoutExpired:
            return None
        if out.returncode != 0:
            return None
        try:
            return json.loads(out.stdout)
        except json.JSONDecodeError:
            return None

    def status(self):
        return wait_until(self.try_status, 30, "a status answer")

    def wait_status(self, predicate, timeout, what):
        def check():
            s = self.try_status()
            return s if s is not None and predicate(s) else None
        return wait_until(check, timeout, what, interval=0.1)

    def wait_step(self, step, timeout=120):
        return self.wait_status(lambda s: s.get("step", 0) >= step, timeout,
                                f"the run to reach step {step}")

    def events(self):
        path = os.path.join(self.state_dir, "events.jsonl")
        if not os.path.exists(path):
            return []
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def wait_done(self, timeout=300):
        code = self.coordinator.wait(timeout)
        if code != 0:
            raise TestFailure(f"coordinator exited {code}:\n{self.coordinator.tail()}")
        return code

    def digests(self):
        """Final state digests printed by the workers (name -> digest)."""
        out = {}
        for name, proc in self.workers.items():
            m = re.findall(r"state_digest ([0-9a-f]{64})", proc.output())
            if m:
                out[name] = m[-1]
        return out

    def close(self, failed=False):
        for proc in list(self.workers.values()) + self.extra:
            proc.close()
        if self.coordinator:
            self.coordinator.close()
        if failed:
            print(f"--- logs of {self.name} in {self.dir}", file=sys.stderr)
            for proc in [self.coordinator] + list(self.workers.values()):
                if proc:
                    print(f"--- {proc.name} (tail)\n{proc.tail(40)}", file=sys.stderr)
        elif not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)


def run_cluster(name, config, body):
    """Starts a coordinator for `config`, runs body(cluster), and always cleans up (printing
    every process's log tail when body raised)."""
    cluster = Cluster(name, config)
    ok = False
    try:
        cluster.start_coordinator()
        body(cluster)
        ok = True
    finally:
        cluster.close(failed=not ok)


def check(condition, message):
    if not condition:
        raise TestFailure(message)


def standalone_digest(config, workdir):
    """Runs the standalone worker on `config` and returns its final state digest."""
    path = os.path.join(workdir, "standalone.json")
    with open(path, "w") as f:
        json.dump(config, f)
    out = subprocess.run([os.path.join(BIN, "spotrain-worker"), "--config", path],
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise TestFailure("standalone run failed:\n" + out.stderr[-3000:])
    m = re.findall(r"state_digest ([0-9a-f]{64})", out.stdout)
    if not m:
        raise TestFailure("standalone run printed no digest:\n" + out.stdout[-2000:])
    return m[-1]


def run_scenarios(scenarios, argv):
    """Runs the named scenario (argv[1]) or all; prints 'N passed, N failed'."""
    names = argv[1:] or list(scenarios)
    passed = failed = 0
    for name in names:
        start = time.monotonic()
        try:
            scenarios[name]()
            passed += 1
            print(f"PASS {name} ({time.monotonic() - start:.1f}s)", flush=True)
        except Exception as e:  # report and go on
            failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


def final_val_loss(text):
    """The final val loss of a worker's output ("done | steps N | final val loss X | ..."),
    or None when it printed no summary line."""
    m = re.findall(r"^done \| steps \d+ \| final val loss ([0-9.eE+-]+|nan|inf)", text, re.M)
    return float(m[-1]) if m else None


def step_times_ms(text):
    """(step, ms/step) of every progress line of a worker's output, in order."""
    return [(int(m.group(1)), float(m.group(2))) for m in re.finditer(
        r"^step (\d+)/\d+ \|.*?\| ([0-9.]+) ms/step", text, re.M)]


def standalone_result(config, workdir):
    """Runs the standalone worker on `config`; returns {"digest", "val_loss", "output"}."""
    path = os.path.join(workdir, "standalone.json")
    with open(path, "w") as f:
        json.dump(config, f)
    out = subprocess.run([os.path.join(BIN, "spotrain-worker"), "--config", path],
                         capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise TestFailure("standalone run failed:\n" + out.stderr[-3000:])
    m = re.findall(r"state_digest ([0-9a-f]{64})", out.stdout)
    loss = final_val_loss(out.stdout)
    if not m or loss is None:
        raise TestFailure("standalone run printed no summary line:\n" + out.stdout[-2000:])
    return {"digest": m[-1], "val_loss": loss, "output": out.stdout}
