// Offline validation of spotrain's Kubernetes manifests (no API server needed).
//
//   node deploy/validate/validate.mjs [--kubectl PATH] [--coordinator-bin PATH] [--self-test]
//                                     [--print] DIR...
//
// For each kustomize directory (the base and every overlay): renders it with
// `kubectl kustomize DIR`, validates every object against the Kubernetes OpenAPI schema of
// the npm package kubernetes-models (types, enums, required fields) and, stricter than that
// schema, rejects fields the schema does not know (a misspelt key would otherwise be dropped
// silently by the API server), then asserts the deployment rules of docs/deploy.md: the
// coordinator never tolerates spot and excludes spot nodes, the workers select and tolerate
// the provider's spot nodes, one ReadWriteMany checkpoint volume mounted at the same path in
// both, the RunConfig only in the coordinator and accepted by `spotrain-coordinator
// --check-config`, the token Secret in both, and so on. --self-test breaks a rendered overlay
// in known ways and checks that each break is reported. Prints PASS/FAIL lines and
// "N passed, N failed"; exits 1 on any failure.
import { execFileSync, spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const modelsDir = path.join(here, "node_modules", "kubernetes-models");

// Spot labels of each provider (REFERENCE.md): key, value meaning spot, and the overlay.
const SPOT = {
  gke: { key: "cloud.google.com/gke-spot", value: "true" },
  eks: { key: "eks.amazonaws.com/capacityType", value: "SPOT", onDemand: "ON_DEMAND" },
  karpenter: { key: "karpenter.sh/capacity-type", value: "spot", onDemand: "on-demand" },
  aks: { key: "kubernetes.azure.com/scalesetpriority", value: "spot", taint: true },
};
const NOTICE = { gke: "gcp", eks: "aws", karpenter: "aws" };

function parseArgs(argv) {
  const opts = { kubectl: "kubectl", coordinatorBin: "", selfTest: false, print: false, dirs: [] };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === "--kubectl") opts.kubectl = argv[++i];
    else if (a === "--coordinator-bin") opts.coordinatorBin = argv[++i];
    else if (a === "--self-test") opts.selfTest = true;
    else if (a === "--print") opts.print = true;
    else if (a.startsWith("--")) throw new Error(`unknown option ${a}`);
    else opts.dirs.push(a);
  }
  return opts;
}

// ---- schema ------------------------------------------------------------------------------
function schemaName(apiVersion, kind) {
  const [groupPart, version] = apiVersion.includes("/") ? apiVersion.split("/") : ["core", apiVersion];
  const group = groupPart.split(".")[0];
  const cap = (s) => s.charAt(0).toUpperCase() + s.slice(1);
  return `IoK8sApi${cap(group)}${cap(version)}${kind}`;
}

function modelPath(apiVersion, kind) {
  const dir = apiVersion.includes("/") ? apiVersion : `v1`;
  return path.join(modelsDir, dir, `${kind}.mjs`);
}

const loaded = new Map();
async function loadModel(apiVersion, kind) {
  const key = `${apiVersion}/${kind}`;
  if (!loaded.has(key)) {
    const mp = modelPath(apiVersion, kind);
    const sp = path.join(modelsDir, "_schemas", `${schemaName(apiVersion, kind)}.mjs`);
    if (!fs.existsSync(mp) || !fs.existsSync(sp)) {
      loaded.set(key, null);
    } else {
      const model = (await import(pathToFileURL(mp).href))[kind];
      const { validate } = await import(pathToFileURL(sp).href);
      loaded.set(key, { model, validate });
    }
  }
  return loaded.get(key);
}

// Runs the compiled schema validator on a proxy of obj and returns the paths of the fields
// it never looked at: the validators read every property the schema defines, and enumerate
// the keys of maps (labels, limits), so an unread key is one the schema does not have.
function unknownFields(validate, obj) {
  const infos = [];
  const cache = new WeakMap();
  const wrap = (v, at) => {
    if (v === null || typeof v !== "object") return v;
    if (cache.has(v)) return cache.get(v);
    const info = { at, v, read: new Set(), listed: false };
    infos.push(info);
    const proxy = new Proxy(v, {
      get(t, k, r) {
        const x = Reflect.get(t, k, r);
        if (typeof k !== "string") return x;
        info.read.add(k);
        return wrap(x, `${at}.${k}`);
      },
      has(t, k) {
        if (typeof k === "string") info.read.add(k);
        return Reflect.has(t, k);
      },
      ownKeys(t) {
        info.listed = true;
        return Reflect.ownKeys(t);
      },
    });
    cache.set(v, proxy);
    return proxy;
  };
  const ok = validate(wrap(obj, ""));
  if (!ok) return [];  // schema errors are reported by the model; unread keys mean nothing then
  const unknown = [];
  for (const info of infos) {
    if (info.listed || Array.isArray(info.v)) continue;
    for (const k of Object.keys(info.v)) {
      if (!info.read.has(k)) unknown.push(`${info.at}.${k}`.replace(/^\./, ""));
    }
  }
  return unknown;
}

// Real fields that the compiled schemas of kubernetes-models 4.5.1 never read (the generator
// drops properties named "description"), so the unknown-field check must let them pass.
const SCHEMA_BLIND_SPOTS = { PriorityClass: ["description"] };

async function schemaErrors(obj) {
  const where = `${obj.kind}/${obj.metadata?.name}`;
  if (!obj.apiVersion || !obj.kind) return [`an object without apiVersion/kind: ${JSON.stringify(obj).slice(0, 80)}`];
  const m = await loadModel(obj.apiVersion, obj.kind);
  if (!m) return [`${where}: no schema for ${obj.apiVersion} ${obj.kind} in kubernetes-models`];
  const errors = [];
  try {
    new m.model(JSON.parse(JSON.stringify(obj))).validate();
  } catch (e) {
    errors.push(`${where}: schema: ${e.message}`);
  }
  for (const f of unknownFields(m.validate, JSON.parse(JSON.stringify(obj)))) {
    if (!(SCHEMA_BLIND_SPOTS[obj.kind] ?? []).includes(f)) errors.push(`${where}: unknown field ${f}`);
  }
  return errors;
}

// ---- rules -------------------------------------------------------------------------------
const find = (objs, kind, name) => objs.find((o) => o.kind === kind && o.metadata?.name === name);
const podSpec = (o) => o?.spec?.template?.spec ?? {};
const container = (o) => podSpec(o).containers?.[0] ?? {};
const argValue = (c, flag) => {
  const args = [...(c.command ?? []), ...(c.args ?? [])];
  let value;
  for (let i = 0; i < args.length; i++) {
    if (args[i].startsWith(`${flag}=`)) value = args[i].slice(flag.length + 1);
    else if (args[i] === flag && i + 1 < args.length) value = args[i + 1];
  }
  return value;  // absl flags: the last occurrence wins
};
const labelsMatch = (selector, labels) =>
  Object.entries(selector ?? {}).every(([k, v]) => labels?.[k] === v);

// The volume mounted at (or above) a file path in a container, and its mount.
function mountOf(o, file) {
  const mounts = container(o).volumeMounts ?? [];
  const m = mounts
    .filter((vm) => file === vm.mountPath || file.startsWith(vm.mountPath.replace(/\/$/, "") + "/"))
    .sort((a, b) => b.mountPath.length - a.mountPath.length)[0];
  if (!m) return {};
  const vol = (podSpec(o).volumes ?? []).find((v) => v.name === m.name);
  return { mount: m, volume: vol };
}

// True when a toleration lets a pod onto nodes tainted with key=value (any effect).
const tolerates = (t, key, value) =>
  (!t.key && t.operator === "Exists") ||
  (t.key === key && (t.operator === "Exists" || (t.value ?? "") === value));

// True when a node selector requirement rules out nodes whose label key has value.
function excludes(expr, key, value) {
  if (expr.key !== key) return false;
  if (expr.operator === "NotIn") return (expr.values ?? []).includes(value);
  if (expr.operator === "In") return !(expr.values ?? []).includes(value);
  return expr.operator === "DoesNotExist";
}

function checkRules(objs, overlay) {
  const errs = [];
  const need = (cond, msg) => { if (!cond) errs.push(msg); };
  const coord = find(objs, "StatefulSet", "spotrain-coordinator");
  const worker = find(objs, "Deployment", "spotrain-worker");
  const svc = find(objs, "Service", "spotrain-coordinator");
  const pvc = find(objs, "PersistentVolumeClaim", "spotrain-checkpoints");
  const cm = objs.find((o) => o.kind === "ConfigMap" && o.metadata?.name?.startsWith("spotrain-run"));
  need(coord, "no StatefulSet spotrain-coordinator");
  need(worker, "no Deployment spotrain-worker");
  need(svc, "no Service spotrain-coordinator");
  need(pvc, "no PersistentVolumeClaim spotrain-checkpoints");
  need(cm, "no ConfigMap spotrain-run");
  if (!coord || !worker || !svc || !pvc || !cm) return { errs };
  const cc = container(coord);
  const wc = container(worker);

  // Coordinator: one replica, stable name, high priority.
  need(coord.spec.replicas === 1, `coordinator replicas ${coord.spec.replicas} (must be 1)`);
  need(coord.spec.serviceName === svc.metadata.name, "StatefulSet serviceName is not the Service");
  need(labelsMatch(svc.spec.selector, coord.spec.template.metadata?.labels),
    "the Service does not select the coordinator pods");
  need(!labelsMatch(svc.spec.selector, worker.spec.template.metadata?.labels),
    "the coordinator Service also selects worker pods");
  const port = Number(argValue(cc, "--port") ?? 7777);
  const sport = (svc.spec.ports ?? []).find((p) => p.port === port);
  need(sport, `the Service has no port ${port} (coordinator --port)`);
  if (sport) {
    const cport = (cc.ports ?? []).find((p) => p.name === sport.targetPort || p.containerPort === sport.targetPort);
    need(cport?.containerPort === port, `Service port ${port} does not reach the container port ${port}`);
  }
  const pcName = podSpec(coord).priorityClassName;
  const pc = find(objs, "PriorityClass", pcName);
  need(pc, `the coordinator's PriorityClass '${pcName}' is not defined`);
  need(!pc || pc.value >= 1000000, `PriorityClass ${pcName} value ${pc?.value} is not high (>= 1000000)`);

  // Coordinator never on spot.
  for (const t of podSpec(coord).tolerations ?? []) {
    for (const [name, s] of Object.entries(SPOT)) {
      need(!tolerates(t, s.key, s.value), `the coordinator tolerates ${name} spot nodes: ${JSON.stringify(t)}`);
    }
  }
  const ns = podSpec(coord).nodeSelector ?? {};
  for (const [name, s] of Object.entries(SPOT)) {
    need(ns[s.key] !== s.value, `the coordinator's nodeSelector selects ${name} spot nodes`);
  }
  const terms = podSpec(coord).affinity?.nodeAffinity?.requiredDuringSchedulingIgnoredDuringExecution?.nodeSelectorTerms ?? [];
  need(terms.length > 0, "the coordinator has no required node affinity (on-demand nodes only)");
  for (const [name, s] of Object.entries(SPOT)) {
    const excluded = terms.length > 0 && terms.every((term) =>
      (term.matchExpressions ?? []).some((e) => excludes(e, s.key, s.value)));
    const selected = s.onDemand && ns[s.key] === s.onDemand;
    need(excluded || selected, `the coordinator's node affinity does not exclude ${name} spot nodes (${s.key}=${s.value})`);
  }
  if (SPOT[overlay]?.onDemand) {
    need(ns[SPOT[overlay].key] === SPOT[overlay].onDemand,
      `the coordinator does not select ${SPOT[overlay].key}=${SPOT[overlay].onDemand}`);
  }

  // Workers: spot per overlay, one GPU, graceful leave, pod IP.
  const wps = podSpec(worker);
  if (SPOT[overlay]) {
    const s = SPOT[overlay];
    need((wps.nodeSelector ?? {})[s.key] === s.value, `workers do not select ${s.key}=${s.value}`);
    need((wps.tolerations ?? []).some((t) => t.key === s.key && tolerates(t, s.key, s.value)),
      `workers do not tolerate ${s.key}=${s.value}`);
  } else {
    for (const [name, s] of Object.entries(SPOT)) {
      need((wps.nodeSelector ?? {})[s.key] === undefined, `base workers select ${name} nodes`);
    }
  }
  const expectNotice = NOTICE[overlay] ?? "none";
  need((argValue(wc, "--preemption-notice") ?? "none") === expectNotice,
    `workers watch notices '${argValue(wc, "--preemption-notice") ?? "none"}' (expected ${expectNotice})`);
  need(String(wc.resources?.limits?.["nvidia.com/gpu"]) === "1", "workers do not limit nvidia.com/gpu to 1");
  need((wps.tolerations ?? []).some((t) => t.key === "nvidia.com/gpu" && t.operator === "Exists"),
    "workers do not tolerate nvidia.com/gpu");
  need((wps.terminationGracePeriodSeconds ?? 30) >= 30,
    `worker terminationGracePeriodSeconds ${wps.terminationGracePeriodSeconds} < 30`);
  need(wc.lifecycle?.preStop, "workers have no preStop hook");
  const adv = argValue(wc, "--advertise-host");
  const advVar = /^\$\((\w+)\)$/.exec(adv ?? "")?.[1];
  const advEnv = (wc.env ?? []).find((e) => e.name === advVar);
  need(advEnv?.valueFrom?.fieldRef?.fieldPath === "status.podIP",
    `worker --advertise-host=${adv} does not come from the downward API status.podIP`);
  const target = argValue(wc, "--coordinator");
  need(target === `${svc.metadata.name}:${port}`,
    `workers dial ${target}, expected the Service ${svc.metadata.name}:${port}`);

  // Checkpoints: one RWX volume at the same path in both.
  need((pvc.spec.accessModes ?? []).includes("ReadWriteMany"), "the checkpoint volume is not ReadWriteMany");
  const ckptMount = (o) => {
    const vol = (podSpec(o).volumes ?? []).find((v) => v.persistentVolumeClaim?.claimName === pvc.metadata.name);
    return vol && (container(o).volumeMounts ?? []).find((m) => m.name === vol.name);
  };
  const cm1 = ckptMount(coord);
  const cm2 = ckptMount(worker);
  need(cm1, "the coordinator does not mount the checkpoint volume");
  need(cm2, "workers do not mount the checkpoint volume");
  need(!cm1 || !cm2 || cm1.mountPath === cm2.mountPath,
    `checkpoint volume at ${cm1?.mountPath} in the coordinator but ${cm2?.mountPath} in workers`);
  need(!cm1?.readOnly && !cm2?.readOnly, "the checkpoint volume is mounted read-only");

  // RunConfig: a ConfigMap mounted only into the coordinator, at --config.
  const configPath = argValue(cc, "--config") ?? "";
  const cfgMount = mountOf(coord, configPath);
  need(cfgMount.volume?.configMap?.name === cm.metadata.name,
    `coordinator --config=${configPath} is not in the ConfigMap ${cm.metadata.name}`);
  const key = cfgMount.mount ? path.relative(cfgMount.mount.mountPath, configPath) : "";
  const runJson = cm.data?.[key];
  need(runJson, `the ConfigMap has no key ${key}`);
  need(!(wps.volumes ?? []).some((v) => v.configMap?.name === cm.metadata.name ||
    (v.projected?.sources ?? []).some((s) => s.configMap?.name === cm.metadata.name)),
  "the RunConfig ConfigMap is mounted into workers");
  let run = {};
  try {
    run = JSON.parse(runJson ?? "{}");
  } catch (e) {
    errs.push(`run.json in the ConfigMap is not JSON: ${e.message}`);
  }
  if (cm1 && run.checkpoint?.dir) {
    need(run.checkpoint.dir.startsWith(cm1.mountPath.replace(/\/$/, "") + "/"),
      `checkpoint.dir ${run.checkpoint.dir} is not on the checkpoint volume (${cm1.mountPath})`);
  } else {
    need(run.checkpoint?.dir, "run.json sets no checkpoint.dir");
  }

  // The token: one Secret, mounted into both, given with --token-file.
  const tokenSecret = (o, c) => {
    const f = argValue(c, "--token-file");
    const m = f && mountOf(o, f);
    return m?.volume?.secret?.secretName;
  };
  const ts1 = tokenSecret(coord, cc);
  const ts2 = tokenSecret(worker, wc);
  need(ts1, "the coordinator's --token-file is not in a Secret volume");
  need(ts2, "the workers' --token-file is not in a Secret volume");
  need(!ts1 || ts1 === ts2, `token Secrets differ: ${ts1} / ${ts2}`);
  for (const [o, c] of [[coord, cc], [worker, wc]]) {
    need(!(c.env ?? []).some((e) => e.name === "SPOTRAIN_TOKEN" && e.value),
      `${o.metadata.name} has the token as a literal env value`);
  }

  // Coordinator state on its own claim.
  const stateDir = argValue(cc, "--state-dir") ?? "";
  const stateMount = (cc.volumeMounts ?? []).find((m) => m.mountPath === stateDir);
  need(stateMount && (coord.spec.volumeClaimTemplates ?? []).some((t) => t.metadata?.name === stateMount.name),
    `coordinator --state-dir=${stateDir} is not on a volumeClaimTemplate`);

  // Prometheus.
  const ann = coord.spec.template.metadata?.annotations ?? {};
  const mport = argValue(cc, "--metrics-port");
  need(ann["prometheus.io/scrape"] === "true", "coordinator pods lack prometheus.io/scrape: \"true\"");
  need(mport && ann["prometheus.io/port"] === mport,
    `prometheus.io/port ${ann["prometheus.io/port"]} is not --metrics-port ${mport}`);
  need((cc.ports ?? []).some((p) => String(p.containerPort) === mport), "the metrics port is not a container port");

  // Network policies.
  const policies = objs.filter((o) => o.kind === "NetworkPolicy");
  const coordLabels = coord.spec.template.metadata?.labels;
  const workerLabels = worker.spec.template.metadata?.labels;
  const cpol = policies.filter((p) => labelsMatch(p.spec.podSelector?.matchLabels, coordLabels));
  const wpol = policies.filter((p) => labelsMatch(p.spec.podSelector?.matchLabels, workerLabels));
  need(cpol.length > 0, "no NetworkPolicy selects the coordinator");
  need(wpol.length > 0, "no NetworkPolicy selects the workers");
  const portCovered = (rule, p) => (rule.ports ?? []).length === 0 ||
    rule.ports.some((rp) => rp.port === p || (rp.endPort && rp.port <= p && p <= rp.endPort));
  const onlyFrom = (rule, labels) => (rule.from ?? []).length > 0 && rule.from.every((f) =>
    !f.ipBlock && !f.namespaceSelector && f.podSelector &&
    Object.keys(f.podSelector.matchLabels ?? {}).length > 0 &&
    labelsMatch(f.podSelector.matchLabels, labels));
  for (const p of cpol) {
    for (const rule of p.spec.ingress ?? []) {
      if (portCovered(rule, port)) {
        need(onlyFrom(rule, workerLabels),
          `NetworkPolicy ${p.metadata.name} opens the coordinator port to more than the run's pods`);
      }
    }
    need((p.spec.ingress ?? []).some((r) => portCovered(r, port)), `NetworkPolicy ${p.metadata.name} blocks workers from the coordinator`);
  }
  // The collective ports are the workers' ephemeral ports: the range their pod sets with the
  // net.ipv4.ip_local_port_range sysctl, else the whole unprivileged range.
  const range = (podSpec(worker).securityContext?.sysctls ?? [])
    .find((s) => s.name === "net.ipv4.ip_local_port_range");
  const [lo, hi] = range ? String(range.value).trim().split(/\s+/).map(Number) : [1024, 65535];
  need(Number.isInteger(lo) && Number.isInteger(hi) && 1024 <= lo && lo <= hi && hi <= 65535,
    `worker net.ipv4.ip_local_port_range "${range?.value}" is not "LOW HIGH" within 1024-65535`);
  for (const p of wpol) {
    const rules = p.spec.ingress ?? [];
    need(rules.length > 0, `NetworkPolicy ${p.metadata.name} lets no worker reach the collective ports`);
    for (const rule of rules) {
      need(onlyFrom(rule, workerLabels), `NetworkPolicy ${p.metadata.name} opens worker ports to non-workers`);
      need(portCovered(rule, lo) && portCovered(rule, hi),
        `NetworkPolicy ${p.metadata.name} does not open the workers' ephemeral collective ports ${lo}-${hi}`);
    }
  }
  return { errs, runJson };
}

function checkConfig(bin, runJson) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "spotrain-validate-"));
  try {
    const file = path.join(dir, "run.json");
    fs.writeFileSync(file, runJson);
    const out = spawnSync(bin, ["--check-config", "--config", file], { encoding: "utf8" });
    if (out.error) return [`cannot run ${bin}: ${out.error.message}`];
    if (out.status !== 0) return [`spotrain-coordinator --check-config rejects run.json: ${(out.stderr || out.stdout).trim()}`];
    return [];
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

async function validateObjects(objs, overlay, opts) {
  const errors = [];
  for (const o of objs) errors.push(...(await schemaErrors(o)));
  const { errs, runJson } = checkRules(objs, overlay);
  errors.push(...errs);
  if (runJson && opts.coordinatorBin) errors.push(...checkConfig(opts.coordinatorBin, runJson));
  return errors;
}

async function render(kubectl, dir) {
  const { parseAllDocuments } = await import("yaml");
  const text = execFileSync(kubectl, ["kustomize", dir], { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
  return { text, objs: parseAllDocuments(text).map((d) => d.toJS()).filter((o) => o) };
}

// Breaks a rendered overlay in known ways; each break must produce an error mentioning it.
async function selfTest(objs, overlay, opts) {
  const clone = () => JSON.parse(JSON.stringify(objs));
  const coordOf = (os) => find(os, "StatefulSet", "spotrain-coordinator");
  const workerOf = (os) => find(os, "Deployment", "spotrain-worker");
  const cases = [
    ["coordinator tolerates spot", /coordinator tolerates/, (os) => {
      podSpec(coordOf(os)).tolerations = [{ key: SPOT[overlay].key, operator: "Exists", effect: "NoSchedule" }];
    }],
    ["coordinator without node affinity", /node affinity/, (os) => { delete podSpec(coordOf(os)).affinity; }],
    ["workers off spot", /workers do not select/, (os) => { delete podSpec(workerOf(os)).nodeSelector; }],
    ["RWO checkpoint volume", /not ReadWriteMany/, (os) => {
      find(os, "PersistentVolumeClaim", "spotrain-checkpoints").spec.accessModes = ["ReadWriteOnce"];
    }],
    ["checkpoint volume at another path", /checkpoint volume at/, (os) => {
      const m = container(workerOf(os)).volumeMounts.find((v) => v.name === "checkpoints");
      m.mountPath = "/data";
    }],
    ["RunConfig in workers", /mounted into workers/, (os) => {
      const name = os.find((o) => o.kind === "ConfigMap").metadata.name;
      podSpec(workerOf(os)).volumes.push({ name: "cfg", configMap: { name } });
    }],
    ["misspelt field", /unknown field spec\.template\.spec\.tolerationz/, (os) => {
      podSpec(workerOf(os)).tolerationz = [];
    }],
    ["wrong type", /schema/, (os) => { coordOf(os).spec.replicas = "one"; }],
    ["invalid RunConfig", /check-config rejects/, (os) => {
      const cmo = os.find((o) => o.kind === "ConfigMap");
      cmo.data["run.json"] = JSON.stringify({ ...JSON.parse(cmo.data["run.json"]), micro_batch: 7 });
    }],
    ["advertise host not the pod IP", /advertise-host/, (os) => {
      container(workerOf(os)).env = [];
    }],
    ["worker ephemeral range wider than the policy", /ephemeral collective ports 20000-60999/, (os) => {
      podSpec(workerOf(os)).securityContext.sysctls =
        [{ name: "net.ipv4.ip_local_port_range", value: "20000 60999" }];
    }],
    ["open coordinator port", /opens the coordinator port/, (os) => {
      const p = os.find((o) => o.kind === "NetworkPolicy" && o.metadata.name === "spotrain-coordinator");
      p.spec.ingress[0].from.push({ namespaceSelector: {} });
    }],
  ];
  const failures = [];
  for (const [name, expect, mutate] of cases) {
    const os = clone();
    mutate(os);
    const errors = await validateObjects(os, overlay, opts);
    if (!errors.some((e) => expect.test(e))) {
      failures.push(`self-test '${name}' not caught (got: ${errors.join(" | ") || "no error"})`);
    }
  }
  return { failures, count: cases.length };
}

async function main() {
  let opts;
  try {
    opts = parseArgs(process.argv.slice(2));
  } catch (e) {
    console.error(`validate.mjs: ${e.message}`);
    return 2;
  }
  if (!fs.existsSync(path.join(modelsDir, "package.json"))) {
    console.log("FAIL: deploy/validate/node_modules is missing: run `npm ci --prefix deploy/validate` " +
      "(scripts/setup.sh does it)");
    console.log("0 passed, 1 failed");
    return 1;
  }
  const probe = spawnSync(opts.kubectl, ["version", "--client"], { encoding: "utf8" });
  if (probe.error || probe.status !== 0) {
    console.log(`FAIL: ${opts.kubectl} is not usable (${probe.error?.message ?? probe.stderr.trim()}); ` +
      "install kubectl (with its built-in kustomize, v5 or newer)");
    console.log("0 passed, 1 failed");
    return 1;
  }
  // kubectl 1.14-1.20 embed kustomize v2, which lacks `patches:` (Debian 12's kubernetes-client
  // is 1.20): ask for a newer one instead of failing on the overlays.
  const kustomize = /Kustomize Version: v(\d+)/.exec(probe.stdout);
  if (kustomize && Number(kustomize[1]) < 4) {
    console.log(`FAIL: ${opts.kubectl} embeds kustomize v${kustomize[1]}; the overlays need v4 or newer ` +
      "(kubectl 1.21 or newer)");
    console.log("0 passed, 1 failed");
    return 1;
  }
  let passed = 0;
  let failed = 0;
  for (const dir of opts.dirs) {
    const overlay = path.basename(path.resolve(dir));
    let rendered;
    try {
      rendered = await render(opts.kubectl, dir);
    } catch (e) {
      console.log(`FAIL ${dir}: kubectl kustomize failed: ${(e.stderr || e.message).toString().trim()}`);
      failed++;
      continue;
    }
    if (opts.print) process.stdout.write(rendered.text);
    const errors = await validateObjects(rendered.objs, overlay, opts);
    if (errors.length === 0) {
      console.log(`PASS ${dir}: ${rendered.objs.length} objects (${rendered.objs.map((o) => o.kind).join(", ")})`);
      passed++;
    } else {
      console.log(`FAIL ${dir}:\n  ${errors.join("\n  ")}`);
      failed++;
    }
    if (opts.selfTest && SPOT[overlay]) {
      const { failures, count } = await selfTest(rendered.objs, overlay, opts);
      if (failures.length === 0) {
        console.log(`PASS ${dir} self-test: ${count} broken variants each reported`);
        passed++;
      } else {
        console.log(`FAIL ${dir} self-test:\n  ${failures.join("\n  ")}`);
        failed++;
      }
    }
  }
  console.log(`${passed} passed, ${failed} failed`);
  return failed ? 1 : 0;
}

process.exitCode = await main();
