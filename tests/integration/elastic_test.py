#!/usr/bin/env python3
"""Elastic training scenarios on localhost (issue: elastic data-parallel training on CPU).

Each scenario starts a coordinator and workers as real processes, injects a failure (kill -9,
SIGTERM, SIGSTOP, joins, preemption notices, garbage on the ports) and asserts the outcome:
the run finishes, the steps lost are bounded, and, in deterministic mode, the final state
digest equals that of the uninterrupted standalone run of the same config.

  elastic_test.py [scenario...]      (all scenarios when none is named)
"""
import http.server
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (Cluster, TestFailure, check, run_cluster, small_config,
                     standalone_digest, wait_until, write_corpus)

WORK = tempfile.mkdtemp(prefix="spotrain-elastic-")
DATA = write_corpus(os.path.join(WORK, "data"))
_reference = {}


def reference_digest(config):
    key = repr(sorted(config.items()))
    if key not in _reference:
        _reference[key] = standalone_digest(config, WORK)
    return _reference[key]


def finish_and_check_digest(cluster, config, expect_workers=None):
    cluster.wait_done(timeout=300)
    status_lost = [e.get("lost_steps", 0) for e in cluster.events()]
    digests = cluster.digests()
    reference = reference_digest(config)
    finished = {n: d for n, d in digests.items()
                if expect_workers is None or n in expect_workers}
    check(finished, "no worker printed a final digest")
    for name, digest in finished.items():
        check(digest == reference,
              f"{name} ended with digest {digest[:16]}..., reference {reference[:16]}...")
    return status_lost


def start_training(cluster, workers, min_step):
    """Starts `workers` workers and waits until they train together at step >= min_step."""
    for _ in range(workers):
        cluster.start_worker()
    return cluster.wait_status(lambda s: s["world_size"] == workers and s["step"] >= min_step,
                               120, f"{workers} workers training")


def scenario_kill9():
    config = small_config(DATA, deterministic=True, steps=60)

    def body(c):
        start_training(c, 3, 10)
        c.workers["w2"].signal(signal.SIGKILL)
        c.wait_status(lambda s: s["world_size"] == 2 and s["step"] >= 20, 120,
                      "the survivors to go on as 2")
        finish_and_check_digest(c, config, {"w1", "w3"})
        lost = [e for e in c.events() if e.get("cause") == "lost"]
        check(lost, f"no 'lost' event in events.jsonl: {c.events()}")
        total_lost = sum(e.get("lost_steps", 0) for e in lost)
        check(total_lost <= 1, f"lost {total_lost} steps (at most 1 allowed)")
        check(all("checkpoint" not in str(e.get("state_source", "")).lower() for e in c.events()),
              "a checkpoint was read for a single loss")
    run_cluster("kill9", config, body)


def scenario_sigterm():
    config = small_config(DATA, deterministic=True, steps=60)

    def body(c):
        start_training(c, 3, 10)
        c.workers["w3"].signal(signal.SIGTERM)
        code = c.workers["w3"].wait(120)
        check(code == 0, f"w3 exited {code} after SIGTERM (expected 0)")
        c.wait_status(lambda s: s["world_size"] == 2, 60, "world size 2 after the leave")
        finish_and_check_digest(c, config, {"w1", "w2"})
        left = [e for e in c.events() if e.get("cause") == "left"]
        check(left, f"no 'left' event: {c.events()}")
        check(sum(e.get("lost_steps", 0) for e in c.events()) == 0, "steps were lost on a leave")
    run_cluster("sigterm", config, body)


def scenario_sigstop():
    config = small_config(DATA, deterministic=True, steps=80)

    def body(c):
        start_training(c, 3, 10)
        stopped = c.workers["w2"]
        stopped.signal(signal.SIGSTOP)
        s = c.wait_status(lambda s: s["world_size"] == 2, 60,
                          "the frozen worker to be declared lost")
        step_then = s["step"]
        c.wait_step(step_then + 5, 120)
        stopped.signal(signal.SIGCONT)
        # Fenced: it either re-joins as a newcomer or exits with a clear message.
        wait_until(lambda: not stopped.alive() or "re-join" in stopped.output()
                   or "fenced" in stopped.output(), 120, "the stale worker to be fenced")
        finish_and_check_digest(c, config, {"w1", "w3"})
    run_cluster("sigstop", config, body)


def scenario_grow():
    config = small_config(DATA, deterministic=True, steps=80)

    def body(c):
        start_training(c, 2, 10)
        c.start_worker()
        c.start_worker()
        c.wait_status(lambda s: s["world_size"] == 4, 120, "world size 4")
        finish_and_check_digest(c, config)
        check(sum(e.get("lost_steps", 0) for e in c.events()) == 0,
              "steps were rolled back on a join")
        joined = [e for e in c.events() if e.get("cause") == "joined"]
        check(joined, f"no 'joined' event: {c.events()}")
    run_cluster("grow", config, body)


def scenario_down_to_one():
    config = small_config(DATA, deterministic=True, steps=60)

    def body(c):
        start_training(c, 3, 5)
        c.workers["w1"].signal(signal.SIGKILL)
        c.workers["w3"].signal(signal.SIGKILL)
        s = c.wait_status(lambda s: s["world_size"] == 1, 120, "world size 1")
        c.wait_step(s["step"] + 5, 120)
        finish_and_check_digest(c, config, {"w2"})
    run_cluster("down_to_one", config, body)


class FakeMetadata(http.server.BaseHTTPRequestHandler):
    """AWS IMDSv2 and GCP metadata, answering 'no notice' until `preempted` is set."""
    preempted = threading.Event()

    def log_message(self, *args):
        pass

    def _send(self, code, body=b""):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self):
        if self.path == "/latest/api/token" and self.headers.get(
                "X-aws-ec2-metadata-token-ttl-seconds"):
            return self._send(200, b"fake-token")
        self._send(400)

    def do_GET(self):
        if self.path == "/latest/meta-data/spot/instance-action":
            if self.headers.get("X-aws-ec2-metadata-token") != "fake-token":
                return self._send(401)
            if self.preempted.is_set():
                return self._send(200, b'{"action":"terminate","time":"2099-01-01T00:00:00Z"}')
            return self._send(404)
        if self.path == "/computeMetadata/v1/instance/preempted":
            if self.headers.get("Metadata-Flavor") != "Google":
                return self._send(403)
            return self._send(200, b"TRUE" if self.preempted.is_set() else b"FALSE")
        self._send(404)


def notice_scenario(provider):
    config = small_config(DATA, deterministic=True, steps=60)

    def body(c):
        handler = type("Handler", (FakeMetadata,), {"preempted": threading.Event()})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}"
        try:
            c.start_worker()
            c.start_worker()
            c.start_worker("noticed", "--preemption-notice", provider,
                           f"--{provider}-metadata-url", url, "--notice-poll-ms", "100")
            c.wait_status(lambda s: s["world_size"] == 3 and s["step"] >= 5, 120,
                          "3 workers training")
            handler.preempted.set()
            code = c.workers["noticed"].wait(120)
            check(code == 0, f"the noticed worker exited {code}")
            check("preemption notice" in c.workers["noticed"].output().lower()
                  or "interruption notice" in c.workers["noticed"].output().lower(),
                  "the worker did not log the notice")
            finish_and_check_digest(c, config, {"w1", "w2"})
            check(sum(e.get("lost_steps", 0) for e in c.events()) == 0, "steps lost on notice")
        finally:
            server.shutdown()
    run_cluster(f"notice-{provider}", config, body)


def listening_ports(pid):
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    ports = []
    for line in out.splitlines():
        if f"pid={pid}," in line:
            ports.append(int(line.split()[3].rsplit(":", 1)[1]))
    return ports


def send_garbage(port, payloads):
    for payload in payloads:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.sendall(payload)
                s.settimeout(1)
                try:
                    s.recv(1024)
                except OSError:
                    pass
        except OSError:
            pass


def scenario_bad_peers():
    config = small_config(DATA, deterministic=True, steps=60)
    junk = [b"\x00" * 64, os.urandom(4096), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + os.urandom(512)]

    def body(c):
        start_training(c, 3, 5)
        send_garbage(c.port, junk)
        for name in ("w1", "w2"):
            for port in listening_ports(c.workers[name].pid):
                send_garbage(port, junk)
        s = c.status()
        c.wait_step(s["step"] + 5, 120)
        finish_and_check_digest(c, config)
    run_cluster("bad_peers", config, body)


SCENARIOS = {
    "kill9": scenario_kill9,
    "sigterm": scenario_sigterm,
    "sigstop": scenario_sigstop,
    "grow": scenario_grow,
    "down_to_one": scenario_down_to_one,
    "notice_aws": lambda: notice_scenario("aws"),
    "notice_gcp": lambda: notice_scenario("gcp"),
    "bad_peers": scenario_bad_peers,
}

if __name__ == "__main__":
    from harness import run_scenarios
    sys.exit(run_scenarios(SCENARIOS, sys.argv))
