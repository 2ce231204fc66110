#!/usr/bin/env python3
"""Offline checks of deploy/ (issue "Deploy"); no cluster, no container engine.

  manifests: every kustomize directory (deploy/k8s/base and each overlay) rendered with
             `kubectl kustomize`, every object validated against the Kubernetes schema
             (npm kubernetes-models, plus an unknown-field check), the deployment rules
             asserted and the ConfigMap's RunConfig passed to `spotrain-coordinator
             --check-config` (deploy/validate/validate.mjs), with a self-test that broken
             variants are reported.
  files:     the Dockerfile as text (multi-stage CUDA devel -> runtime, built by
             scripts/setup.sh, binaries copied, the uid the manifests run as), the bundle it
             ships (deploy/bundle.sh on this build: every library resolves inside the
             bundle), shellcheck on the scripts, launch.sh's argument errors, and the
             Grafana dashboard (valid JSON, every metric it queries is one the coordinator
             registers in coordinator/metrics.cc).

A missing tool (node, kubectl, shellcheck, the npm packages) fails with what to install.

  deploy_test.py [manifests|files]
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import BIN, TestFailure, run_scenarios  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
DEPLOY = os.path.join(ROOT, "deploy")


def check(condition, message):
    if not condition:
        raise TestFailure(message)


def need_tool(name, hint):
    path = shutil.which(name)
    check(path, f"{name} is not installed: {hint}")
    return path


def scenario_manifests():
    node = need_tool("node", "install Node.js 18 or newer (Debian: nodejs)")
    kubectl = need_tool("kubectl", "install kubectl 1.27 or newer (it carries kustomize 5)")
    check(os.path.isdir(os.path.join(DEPLOY, "validate", "node_modules", "kubernetes-models")),
          "deploy/validate/node_modules is missing: run `npm ci --prefix deploy/validate` "
          "(scripts/setup.sh does it)")
    coordinator = os.path.join(BIN, "spotrain-coordinator")
    check(os.access(coordinator, os.X_OK), f"{coordinator} is missing: build it first")
    overlays = sorted(os.path.join(DEPLOY, "k8s", "overlays", d)
                      for d in os.listdir(os.path.join(DEPLOY, "k8s", "overlays")))
    check({os.path.basename(d) for d in overlays} >= {"gke", "eks", "karpenter", "aks"},
          f"overlays missing: {overlays}")
    out = subprocess.run([node, os.path.join(DEPLOY, "validate", "validate.mjs"), "--self-test",
                          "--kubectl", kubectl, "--coordinator-bin", coordinator,
                          os.path.join(DEPLOY, "k8s", "base"), *overlays],
                         capture_output=True, text=True, timeout=300)
    print(out.stdout + out.stderr, end="", flush=True)
    check(out.returncode == 0, f"validate.mjs exited {out.returncode}")
    # One PASS per directory plus one self-test per overlay.
    check(out.stdout.count("\nPASS ") + out.stdout.startswith("PASS ") == 1 + 2 * len(overlays),
          "validate.mjs did not pass every directory")


def metric_names_registered():
    with open(os.path.join(ROOT, "coordinator", "metrics.cc")) as f:
        text = f.read()
    names = set(re.findall(r'\.Name\("(spotrain_[a-z0-9_]+)"\)', text))
    names |= set(re.findall(r'(?:Gauge|Counter)\(\s*"(spotrain_[a-z0-9_]+)"', text))
    return names


def scenario_files():
    # Dockerfile: text checks only (no container engine here).
    with open(os.path.join(DEPLOY, "Dockerfile")) as f:
        dockerfile = f.read()
    lines = [l.strip() for l in re.sub(r"\\\n", " ", dockerfile).splitlines()
             if l.strip() and not l.strip().startswith("#")]
    froms = [l for l in lines if l.upper().startswith("FROM ")]
    check(len(froms) == 2, f"expected a two-stage build, FROM lines: {froms}")
    check(re.match(r"FROM nvidia/cuda:\S+-devel-\S+ AS build$", froms[0], re.I),
          f"first stage is not the CUDA devel image: {froms[0]}")
    check(re.match(r"FROM nvidia/cuda:\S+-runtime-\S+$", froms[1], re.I),
          f"last stage is not the CUDA runtime image: {froms[1]}")
    runs = [l for l in lines if l.upper().startswith("RUN ")]
    check(any("scripts/setup.sh" in r for r in runs), "no RUN step runs scripts/setup.sh")
    check(any("deploy/bundle.sh" in r for r in runs), "no RUN step runs deploy/bundle.sh")
    copies = " ".join(l for l in lines if l.upper().startswith("COPY --FROM=BUILD"))
    for b in ("spotrain-coordinator", "spotrain-worker", "spotrain"):
        check(re.search(rf"/opt/spotrain/bin/{b}\b", copies), f"the image does not copy {b}")
    check(re.search(r"/opt/spotrain/lib", copies), "the image does not copy the bundled libraries")
    check(re.search(r"^ENV .*LD_LIBRARY_PATH=/opt/spotrain/lib", "\n".join(lines), re.M),
          "LD_LIBRARY_PATH does not include /opt/spotrain/lib")
    user = [l for l in lines if l.upper().startswith("USER ")]
    check(user and user[-1].split()[1].split(":")[0] == "10001", f"image user {user}")
    for manifest in ("coordinator.yaml", "worker.yaml"):
        with open(os.path.join(DEPLOY, "k8s", "base", manifest)) as f:
            check("runAsUser: 10001" in f.read(), f"{manifest} does not run as the image's uid")
    check(os.path.exists(os.path.join(DEPLOY, "Dockerfile.dockerignore")), "no Dockerfile.dockerignore")
    print("Dockerfile: two stages (CUDA devel -> runtime), setup.sh + bundle.sh, 3 binaries, uid 10001")

    # The bundle the image ships, made from this build: all libraries resolve inside it.
    with tempfile.TemporaryDirectory(prefix="spotrain-bundle-") as out:
        build = os.path.dirname(BIN)
        res = subprocess.run([os.path.join(DEPLOY, "bundle.sh"), out, build], capture_output=True,
                             text=True, timeout=300)
        check(res.returncode == 0, f"bundle.sh failed: {res.stderr}")
        print(res.stdout.strip())
        env = {"PATH": "/usr/bin:/bin", "LD_LIBRARY_PATH": os.path.join(out, "lib")}
        skip = re.compile(r"^(linux-vdso|ld-linux|libc\.so|libm\.so|libdl\.so|librt\.so|"
                          r"libpthread\.so|libutil\.so|libresolv\.so|libstdc\+\+\.so|libgcc_s\.so)")
        for b in ("spotrain-coordinator", "spotrain-worker", "spotrain"):
            ldd = subprocess.run(["ldd", os.path.join(out, "bin", b)], capture_output=True,
                                 text=True, env=env).stdout
            for line in ldd.splitlines():
                parts = line.split()
                if len(parts) >= 3 and parts[1] == "=>" and not skip.match(parts[0]):
                    check(parts[2].startswith(out + "/lib/"),
                          f"{b}: {parts[0]} resolves outside the bundle: {parts[2]}")
            ver = subprocess.run([os.path.join(out, "bin", b), "--version"], capture_output=True,
                                 text=True, env=env)
            check(ver.returncode != 127 and "error while loading" not in ver.stderr,
                  f"bundled {b} does not start: {ver.stderr[-300:]}")
            if b != "spotrain":  # the command-line tool has subcommands, no --version
                check(ver.returncode == 0, f"bundled {b} --version exited {ver.returncode}")

    # Scripts.
    shellcheck = need_tool("shellcheck", "install shellcheck (Debian: shellcheck)")
    scripts = [os.path.join(DEPLOY, "launch.sh"), os.path.join(DEPLOY, "bundle.sh"),
               os.path.join(ROOT, "tests", "integration", "netns_remote.sh")]
    res = subprocess.run([shellcheck, *scripts], capture_output=True, text=True)
    check(res.returncode == 0, f"shellcheck:\n{res.stdout}")
    launch = os.path.join(DEPLOY, "launch.sh")
    res = subprocess.run([launch, "--help"], capture_output=True, text=True)
    check(res.returncode == 0 and "--remote-cmd" in res.stdout, "launch.sh --help")
    for args, what in ((["--config", "/nonexistent", "--hosts", "a"], "cannot read config"),
                       (["--hosts", "a"], "--config is required"),
                       (["--config", launch], "give the worker hosts"),
                       (["--config", launch, "--hosts", "a", "--port", "99999"], "not a port"),
                       (["--config", launch, "--hosts", "a,a"], "listed twice"),
                       (["--bogus"], "unknown option")):
        res = subprocess.run([launch, *args], capture_output=True, text=True, timeout=30)
        check(res.returncode == 2 and what in res.stderr,
              f"launch.sh {' '.join(args)}: exit {res.returncode}, stderr {res.stderr!r}")
    print("scripts: shellcheck clean; launch.sh argument errors exit 2 with a message")

    # Grafana dashboard.
    with open(os.path.join(DEPLOY, "grafana", "spotrain.json")) as f:
        dash = json.load(f)
    registered = metric_names_registered()
    check(len(registered) >= 10, f"found only {sorted(registered)} in coordinator/metrics.cc")
    exprs = []
    ids = set()
    for p in dash["panels"]:
        check(p["id"] not in ids, f"duplicate panel id {p['id']}")
        ids.add(p["id"])
        g = p["gridPos"]
        check(g["x"] + g["w"] <= 24, f"panel {p['title']} is wider than the grid")
        for t in p.get("targets", []):
            exprs.append(t["expr"])
    for a in dash.get("annotations", {}).get("list", []):
        if "expr" in a:
            exprs.append(a["expr"])
    used = set()
    for e in exprs:
        for m in re.findall(r"\b(spotrain_[a-z0-9_]+)", e):
            base = re.sub(r"_(bucket|sum|count)$", "", m)
            check(base in registered, f"the dashboard queries {m}, which metrics.cc does not "
                                      f"register ({sorted(registered)})")
            used.add(base)
    unused = registered - used
    check(not unused, f"metrics not on the dashboard: {sorted(unused)}")
    print(f"grafana: {len(dash['panels'])} panels, {len(used)} metrics, all registered")


SCENARIOS = {"manifests": scenario_manifests, "files": scenario_files}

if __name__ == "__main__":
    sys.exit(run_scenarios(SCENARIOS, sys.argv))
