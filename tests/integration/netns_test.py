#!/usr/bin/env python3
"""Multi-host scenarios for deploy/launch.sh (issue "Deploy"), one host per network namespace.

Every host (the coordinator and each worker) is a network namespace with its own address on
a veth whose other end is a port of a bridge inside a "switch" namespace: addresses exist only
on interfaces this test creates, nothing is routed out, and the machine's own namespace gets
no interface at all. launch.sh reaches the hosts through its remote-command hook
(`ip netns exec NAME bash -s`) instead of ssh. Everything is deleted at the end, also on
failure and on SIGTERM/SIGINT; namespaces left by a killed earlier run are removed first.

  cluster: coordinator + 3 workers through `launch.sh --watch`; one worker's link is cut
           (silent loss, no RST), another host is killed -9 and vanishes, then comes back and
           a new host is appended to the hosts file: the watch starts workers there, the cut
           worker is fenced when its link returns and rejoins, the run finishes with the
           expected world sizes, bounded lost steps and one final state on every worker.
  checks:  the launcher's checks on a bad hosts file (unreachable host, missing binaries,
           checkpoint volume not shared, read-only volume, no route to the coordinator):
           each failure is named with its host, nothing starts without --keep-going.

Needs root (network namespaces). Prints the launcher's output (docs/deploy.md quotes it).

  netns_test.py [cluster|checks]
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import BIN as _BIN, TestFailure, small_config, wait_until, write_corpus  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
LAUNCH = os.path.join(ROOT, "deploy", "launch.sh")
REMOTE = os.path.join(ROOT, "tests", "integration", "netns_remote.sh")
PREFIX = "sptn"  # namespaces are named sptn<PID>-<host>
PORT = 7777
BIN = os.path.realpath(_BIN)


def sh(*args, check=True, timeout=60):
    out = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise TestFailure(f"{' '.join(args)} failed ({out.returncode}): {out.stderr.strip()}")
    return out


def check(condition, message):
    if not condition:
        raise TestFailure(message)


def namespaces():
    out = sh("ip", "netns", "list", check=False)
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


def kill_namespace(ns):
    """Kills every process in namespace ns, then deletes it (its veths and bridge go with it)."""
    out = sh("ip", "netns", "pids", ns, check=False)
    for pid in out.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    sh("ip", "netns", "del", ns, check=False)


def remove_stale_namespaces():
    """Namespaces of earlier runs of this test whose process is gone (killed by a timeout)."""
    for ns in namespaces():
        m = re.match(rf"{PREFIX}(\d+)-", ns)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            kill_namespace(ns)


class Net:
    """A switch namespace with a bridge, and host namespaces plugged into it."""

    def __init__(self):
        self.tag = f"{PREFIX}{os.getpid()}"
        self.switch = f"{self.tag}-sw"
        self.hosts = {}  # short name -> (namespace, address)
        self.created = []  # namespaces, in creation order
        try:
            sh("ip", "netns", "add", self.switch)
        except TestFailure as e:
            raise TestFailure(f"cannot create a network namespace (this test needs root and "
                              f"iproute2): {e}")
        self.created.append(self.switch)
        sh("ip", "-n", self.switch, "link", "set", "lo", "up")
        sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.switch, "link", "set", "br0", "up")

    def ns(self, name):
        return f"{self.tag}-{name}"

    def port(self, name):
        return f"p-{name}"  # the host's port on the bridge (in the switch namespace)

    def add_host(self, name, address, linked=True):
        ns = self.ns(name)
        sh("ip", "netns", "add", ns)
        self.created.append(ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        if linked:
            sh("ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name",
               self.port(name), "netns", self.switch)
            sh("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", self.switch, "link", "set", self.port(name), "master", "br0")
            sh("ip", "-n", self.switch, "link", "set", self.port(name), "up")
        self.hosts[name] = (ns, address)
        return ns

    def remove_host(self, name):
        """The host vanishes: its namespace is unlinked (processes in it keep running until
        killed; its veth goes when the last of them exits)."""
        ns, _ = self.hosts.pop(name)
        sh("ip", "netns", "del", ns, check=False)

    def set_link(self, name, up):
        sh("ip", "-n", self.switch, "link", "set", self.port(name), "up" if up else "down")

    def worker_pids(self, name):
        ns, _ = self.hosts[name]
        out = sh("ip", "netns", "pids", ns, check=False)
        pids = []
        for pid in out.stdout.split():
            try:
                if os.readlink(f"/proc/{pid}/exe").endswith("/spotrain-worker"):
                    pids.append(int(pid))
            except OSError:
                pass
        return pids

    def close(self):
        for ns in reversed(self.created):
            kill_namespace(ns)
        left = [ns for ns in namespaces() if ns.startswith(self.tag + "-")]
        if left:
            print(f"warning: namespaces left behind: {left}", file=sys.stderr)


class Run:
    """Files of one launch.sh run: shared dir, pid dir, config, hosts file."""

    def __init__(self, net, name, config_overrides, workers):
        self.net = net
        self.name = name
        self.dir = tempfile.mkdtemp(prefix=f"spotrain-netns-{name}-")
        self.shared = os.path.join(self.dir, "shared")
        self.pids = os.path.join(self.dir, "pids")
        self.sim = os.path.join(self.dir, "sim")
        os.makedirs(self.sim)
        write_corpus(os.path.join(self.shared, "data"))
        # Relative paths: resolved against the shared dir on every host.
        self.config = small_config("data", **config_overrides)
        self.config_path = os.path.join(self.dir, "run.json")
        with open(self.config_path, "w") as f:
            json.dump(self.config, f, indent=1)
        self.hosts_file = os.path.join(self.dir, "hosts")
        self.set_hosts(workers)
        self.run_dir = os.path.join(self.shared, "spotrain", name)
        self.launchers = []

    def set_hosts(self, lines):
        with open(self.hosts_file, "w") as f:
            f.write("# worker hosts (network namespaces)\n")
            for line in lines:
                f.write(line + "\n")

    def args(self, *extra, remote=None):
        ns_c, addr_c = self.net.hosts["c"]
        return [LAUNCH, "--config", self.config_path, "--hosts-file", self.hosts_file,
                "--coordinator-host", ns_c, "--coordinator-address", addr_c,
                "--remote-cmd", remote or "ip netns exec", "--shared-dir", self.shared,
                "--pid-dir", self.pids, "--bin-dir", BIN, "--run", self.name,
                "--port", str(PORT), "--timeout", "60", *extra]

    def launch(self, *extra, remote=None, timeout=180):
        out = subprocess.run(self.args(*extra, remote=remote), capture_output=True, text=True,
                             timeout=timeout)
        return out.returncode, out.stdout + out.stderr

    def launch_background(self, *extra):
        log_path = os.path.join(self.dir, f"launch-{len(self.launchers)}.log")
        log = open(log_path, "w")
        proc = subprocess.Popen(self.args(*extra), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.launchers.append((proc, log_path, log))
        return proc, log_path

    def try_status(self):
        ns_c, addr_c = self.net.hosts["c"]
        try:
            out = subprocess.run(
                ["ip", "netns", "exec", ns_c, os.path.join(BIN, "spotrain"), "status",
                 "--coordinator", f"{addr_c}:{PORT}", "--json", "--token-file",
                 os.path.join(self.run_dir, "token")], capture_output=True, text=True,
                timeout=10)
        except subprocess.TimeoutExpired:
            return None
        if out.returncode != 0:
            return None
        try:
            return json.loads(out.stdout)
        except json.JSONDecodeError:
            return None

    def wait_status(self, predicate, timeout, what):
        def probe():
            s = self.try_status()
            return s if s is not None and predicate(s) else None
        return wait_until(probe, timeout, what, interval=0.1)

    def worker_log(self, label):
        path = os.path.join(self.run_dir, "logs", f"worker-{label}.log")
        try:
            with open(path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def worker_pid(self, label):
        with open(os.path.join(self.pids, label, "worker.pid")) as f:
            return int(f.read().strip())

    def events(self):
        path = os.path.join(self.run_dir, "coordinator", "events.jsonl")
        if not os.path.exists(path):
            return []
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def dump(self):
        """Logs for a failed run (stderr)."""
        for proc, log_path, _ in self.launchers:
            with open(log_path, errors="replace") as f:
                print(f"--- {os.path.basename(log_path)}\n{f.read()[-4000:]}", file=sys.stderr)
        logs = os.path.join(self.run_dir, "logs")
        if os.path.isdir(logs):
            for name in sorted(os.listdir(logs)):
                with open(os.path.join(logs, name), errors="replace") as f:
                    tail = "\n".join(f.read().splitlines()[-25:])
                print(f"--- {name} (tail)\n{tail}", file=sys.stderr)

    def close(self, failed):
        for proc, _, log in self.launchers:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
            log.close()
        if failed:
            self.dump()
            print(f"--- files kept in {self.dir}", file=sys.stderr)
        else:
            shutil.rmtree(self.dir, ignore_errors=True)


def worker_ids(log):
    """Worker ids a worker process was given, in order ("joined run R as worker N")."""
    return [int(m) for m in re.findall(r"joined run \S+ as worker (\d+)", log)]


def active_names(status):
    return sorted(m["name"] for m in status.get("members", [])
                  if m.get("state") == "active" and m.get("rank", -1) >= 0)


def scenario_cluster():
    net = Net()
    run = None
    ok = False
    try:
        net.add_host("c", "10.250.0.1")
        for i in (1, 2, 3):
            net.add_host(f"h{i}", f"10.250.0.{10 + i}")
        h = {i: net.ns(f"h{i}") for i in (1, 2, 3, 4)}
        run = Run(net, "nt", dict(deterministic=True, steps=300, log_every=10,
                                  checkpoint={"dir": "checkpoints", "every_steps": 50}),
                  [h[1], h[2], h[3]])
        watcher, watch_log = run.launch_background("--watch", "--watch-interval", "0.5")

        def one_worker_per_host():
            for name in list(net.hosts):
                if name != "c":
                    pids = net.worker_pids(name)
                    check(len(pids) <= 1, f"{name} runs {len(pids)} workers: {pids}")

        s = run.wait_status(lambda s: s["world_size"] == 3 and s["step"] >= 5, 120,
                            "3 workers training")
        print(f"world 3 at step {s['step']}: {active_names(s)}", flush=True)

        # The token is in a 0600 file on the shared dir, never on a command line.
        token_path = os.path.join(run.run_dir, "token")
        check(os.stat(token_path).st_mode & 0o777 == 0o600, "the token file is not mode 0600")
        with open(token_path) as f:
            token = f.read().strip()
        for name, (ns, _) in net.hosts.items():
            for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        check(token.encode() not in f.read(), f"the token is on a command line in {name}")
                except OSError:
                    pass

        # A second launch of the same run starts nothing new: everything is running.
        code, out = run.launch()
        print("--- second launch.sh (everything already running):\n" + out, flush=True)
        check(code == 0, f"second launch exited {code}")
        check(out.count("worker already running") == 3, "second launch did not find 3 workers")
        check("coordinator already running" in out, "second launch did not find the coordinator")
        one_worker_per_host()

        # Host h3 vanishes: its namespace disappears and its worker is killed -9.
        h3_pid = run.worker_pid(h[3])
        net.remove_host("h3")
        os.kill(h3_pid, signal.SIGKILL)
        s = run.wait_status(lambda s: s["world_size"] == 2, 60, "world size 2 after kill -9")
        check(s["state"] != "done", "the run ended before the failures were injected")
        print(f"world 2 at step {s['step']}: {active_names(s)}", flush=True)

        # h2's link is cut: packets are dropped without any RST.
        h2_pid = run.worker_pid(h[2])
        net.set_link("h2", False)
        s = run.wait_status(lambda s: s["world_size"] == 1, 60, "world size 1 after the cut")
        print(f"world 1 at step {s['step']}: {active_names(s)}", flush=True)
        check(active_names(s) == [h[1]], f"expected only {h[1]} active: {active_names(s)}")
        check(os.path.exists(f"/proc/{h2_pid}"), "the cut-off worker died (expected: alive)")
        alone_at = s["step"]
        run.wait_status(lambda s: s["step"] >= alone_at + 3, 60, "progress with 1 worker")
        one_worker_per_host()

        # h3 comes back (same address) and a new host h4 is appended to the hosts file.
        net.add_host("h3", "10.250.0.13")
        net.add_host("h4", "10.250.0.14")
        run.set_hosts([h[1], h[2], h[3], h[4]])
        s = run.wait_status(lambda s: s["world_size"] == 3, 90,
                            "the watch to start workers on h3 and h4 (world size 3)")
        print(f"world 3 at step {s['step']}: {active_names(s)}", flush=True)
        check(active_names(s) == sorted([h[1], h[3], h[4]]), f"members: {active_names(s)}")
        one_worker_per_host()

        # h2's link returns: its old identity is fenced (declared lost, never readmitted);
        # the same process has to join again as a newcomer and gets a new worker id.
        h2_ids = worker_ids(run.worker_log(h[2]))
        check(len(h2_ids) == 1, f"h2 joined {len(h2_ids)} times before the cut")
        net.set_link("h2", True)
        wait_until(lambda: len(worker_ids(run.worker_log(h[2]))) >= 2, 60,
                   "the cut-off worker to rejoin under a new id")
        s = run.wait_status(lambda s: s["world_size"] == 4 or s["state"] == "done", 90,
                            "h2 to rejoin (world size 4)")
        check(s["world_size"] == 4, f"the run ended before h2 rejoined: {s}")
        print(f"world 4 at step {s['step']}: {active_names(s)}", flush=True)
        new_ids = worker_ids(run.worker_log(h[2]))
        print(f"h2: worker id {h2_ids[0]} before the cut, {new_ids[-1]} after", flush=True)
        check(new_ids[-1] != h2_ids[0], f"h2 came back under its old id {h2_ids[0]}")
        check(run.worker_pid(h[2]) == h2_pid, "h2's worker was replaced (expected the same "
              "process to rejoin)")
        one_worker_per_host()

        # The run finishes; the watch ends with the coordinator's status.
        try:
            code = watcher.wait(timeout=240)
        except subprocess.TimeoutExpired:
            raise TestFailure("the run did not finish within 240 s")
        with open(watch_log) as f:
            watch_out = f.read()
        print("--- launch.sh --watch output:\n" + watch_out, flush=True)
        check(code == 0, f"launch.sh --watch exited {code}")
        check(re.search(rf"{h[3]}: worker started", watch_out), "no relaunch on h3 in the output")
        check(re.search(rf"{h[4]}: worker started", watch_out), "no start on h4 in the output")

        events = run.events()
        sizes = [len(e.get("members_after", [])) for e in events]
        causes = [e.get("cause") for e in events]
        print("events (cause, world size, lost steps): "
              f"{[(e.get('cause'), len(e.get('members_after', [])), e.get('lost_steps', 0)) for e in events]}",
              flush=True)
        lost = [e for e in events if e.get("cause") == "lost"]
        check(len(lost) >= 2, f"expected 2 losses in events.jsonl: {causes}")
        for e in lost:
            check(e.get("lost_steps", 0) <= 2, f"a loss cost {e.get('lost_steps')} steps: {e}")
        it = iter(sizes)
        check(all(any(x == want for x in it) for want in (3, 2, 1)),
              f"world sizes {sizes} do not go 3 -> 2 -> 1")
        check(sizes and sizes[-1] == 4, f"final world size {sizes[-1:]} (expected 4)")
        fenced_at = next(i for i, e in enumerate(events) if e.get("cause") == "lost"
                         and h2_ids[0] not in e.get("members_after", []))
        check(all(h2_ids[0] not in e.get("members_after", []) for e in events[fenced_at:]),
              f"worker {h2_ids[0]} (h2's old id) was readmitted after its loss: {events}")

        digests = {}
        for i in (1, 2, 3, 4):
            m = re.findall(r"state_digest ([0-9a-f]{64})", run.worker_log(h[i]))
            if m:
                digests[i] = m[-1]
        check(len(digests) == 4, f"not every worker printed a final digest: {sorted(digests)}")
        check(len(set(digests.values())) == 1, f"final digests differ: {digests}")
        ok = True
    finally:
        if run:
            run.close(failed=not ok)
        net.close()


def scenario_checks():
    net = Net()
    run = None
    ok = False
    try:
        net.add_host("c", "10.250.0.1")
        net.add_host("good", "10.250.0.11")
        net.add_host("nobin", "10.250.0.12")
        net.add_host("private", "10.250.0.13")
        net.add_host("readonly", "10.250.0.14")
        net.add_host("isolated", "10.250.0.15", linked=False)
        n = {k: net.ns(k) for k in ("good", "nobin", "private", "readonly", "isolated",
                                    "ghost")}
        run = Run(net, "checks", dict(steps=100000, checkpoint={"dir": "checkpoints"}),
                  [n["good"], n["ghost"], n["nobin"], n["private"], n["readonly"],
                   n["isolated"]])
        with open(os.path.join(run.sim, n["nobin"] + ".mounts"), "w") as f:
            f.write(f"empty {BIN}\n")
        with open(os.path.join(run.sim, n["private"] + ".mounts"), "w") as f:
            f.write(f"empty {run.shared}\n")
        with open(os.path.join(run.sim, n["readonly"] + ".mounts"), "w") as f:
            f.write(f"ro {run.shared}\n")
        remote = f"{REMOTE} {run.sim}"

        code, out = run.launch("--check", remote=remote)
        print("--- launch.sh --check (bad hosts file):\n" + out, flush=True)
        check(code == 1, f"--check exited {code} (expected 1)")

        def line(label):
            m = re.search(rf"^  {re.escape(label)} +(.*)$", out, re.M)
            check(m, f"no line for {label} in the output")
            return m.group(1)

        check(line(n["good"]) == "ok", f"good host: {line(n['good'])}")
        check(line(n["isolated"]) == "ok", "isolated host: file checks should pass")
        check("unreachable" in line(n["ghost"]), f"ghost: {line(n['ghost'])}")
        check("spotrain-worker not found" in line(n["nobin"]), f"nobin: {line(n['nobin'])}")
        check("not shared with the coordinator host" in line(n["private"]),
              f"private: {line(n['private'])}")
        check("no training data" in line(n["private"]), f"private: {line(n['private'])}")
        check("not writable" in line(n["readonly"]), f"readonly: {line(n['readonly'])}")

        code, out = run.launch(remote=remote)
        print("--- launch.sh (bad hosts file, no --keep-going):\n" + out, flush=True)
        check(code == 1, f"launch with failing hosts exited {code} (expected 1)")
        check("not started" in out, "the launcher did not say it started nothing")
        check(not os.path.exists(os.path.join(run.pids, "coordinator.pid")),
              "a coordinator was started although checks failed")

        code, out = run.launch("--keep-going", remote=remote)
        print("--- launch.sh --keep-going (bad hosts file):\n" + out, flush=True)
        check(code == 1, f"--keep-going with a failed start exited {code} (expected 1)")
        check(re.search(rf"^  {n['good']} +worker started", out, re.M), "good host not started")
        check(re.search(rf"^  {n['isolated']} +cannot reach the coordinator at 10\.250\.0\.1:"
                        rf"{PORT}", out, re.M), "isolated host: no port failure")
        check(not os.path.exists(os.path.join(run.pids, n["nobin"], "worker.pid")),
              "a worker was started on a failed host")
        run.wait_status(lambda s: s["world_size"] == 1, 60, "the good host's worker to train")

        # Two hosts lines naming the same host are refused.
        run.set_hosts([n["good"], n["good"]])
        code, out = run.launch("--check", remote=remote)
        check(code == 2 and "listed twice" in out, f"duplicate host: exit {code}: {out}")

        run.set_hosts([n["good"]])
        code, out = run.launch("--stop", remote=remote)
        print("--- launch.sh --stop:\n" + out, flush=True)
        check(code == 0, f"--stop exited {code}")
        check(re.search(rf"{n['good']} +worker stopped", out), "the worker was not stopped")
        check(re.search(r"coordinator:.* stopped", out), "the coordinator was not stopped")
        with open(os.path.join(run.pids, n["good"], "worker.exit")) as f:
            check(f.read().strip() == "0", "the worker did not leave cleanly on SIGTERM")
        ok = True
    finally:
        if run:
            run.close(failed=not ok)
        net.close()


SCENARIOS = {"cluster": scenario_cluster, "checks": scenario_checks}


def main(argv):
    if os.geteuid() != 0:
        print("FAIL: netns_test.py needs root (it creates network namespaces)")
        print("0 passed, 1 failed")
        return 1
    for tool in ("ip", "unshare", "flock", "setsid", "timeout"):
        if shutil.which(tool) is None:
            print(f"FAIL: {tool} is missing (iproute2 / util-linux / coreutils)")
            print("0 passed, 1 failed")
            return 1

    def on_signal(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_signal)
    remove_stale_namespaces()
    from harness import run_scenarios
    return run_scenarios(SCENARIOS, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
