#!/usr/bin/env bash
# Starts a spotrain run on plain hosts (RunPod pods, VMs): the coordinator on one host (an
# on-demand one), a worker on each of N hosts (spot ones), all sharing one directory (the
# RunPod network volume at /workspace by default) for the token, the config, the logs and the
# checkpoints. Hosts are reached through a remote command, `ssh -o BatchMode=yes` by default;
# tests use `ip netns exec`. Every remote call runs `REMOTE_CMD HOST bash -s` with the script
# on standard input, so nothing secret is ever on a command line.
#
#   deploy/launch.sh --config run.json --hosts-file hosts.txt [--coordinator-host HOST] ...
#   deploy/launch.sh --help
#
# Before starting anything it checks every host and names each failure per host: host
# reachable, binaries present and loadable, the shared directory writable and really shared
# (a marker written from the coordinator host must be read back on every worker host), the
# checkpoint directory writable, the training data visible, the coordinator's port free and
# then reachable from every worker host. A pid file per host (on that host) guarantees one
# worker per host; --watch relaunches the worker of a host that comes back.
set -euo pipefail

prog=$(basename "$0")

usage() {
  cat <<'EOF'
usage: deploy/launch.sh --config RUN.json (--hosts a,b,c | --hosts-file FILE) [options]

Starts the coordinator on --coordinator-host and one worker on each worker host.

Hosts:
  --hosts LIST              comma-separated worker hosts, each [user@]host
  --hosts-file FILE         one worker host per line: [user@]host [ADVERTISE_ADDRESS]
                            ('#' starts a comment; with --watch the file is re-read each
                            round, so appending a line brings a new host in)
  --coordinator-host HOST   where the coordinator runs; 'local' (default) runs it on this
                            machine without the remote command
  --coordinator-address A   address the workers dial (default: the coordinator host's name,
                            or this machine's first address for 'local')
  --remote-cmd CMD          how to run a command on a host: CMD HOST bash -s
                            (default: "ssh -o BatchMode=yes -o ConnectTimeout=10")

Run:
  --config FILE             run configuration (JSON, see README); copied to the shared dir.
                            Relative paths in it are relative to --shared-dir.
  --run NAME                run name (default: spotrain); files go to SHARED/spotrain/NAME
  --shared-dir DIR          directory mounted at the same path on every host
                            (default: /workspace, the RunPod network volume)
  --state-dir DIR           coordinator state (default: SHARED/spotrain/NAME/coordinator)
  --pid-dir DIR             host-local directory for pid files (default: /tmp/spotrain-NAME)
  --bin-dir DIR             where the binaries are on every host (default: PATH, then
                            /opt/spotrain/bin)
  --port P                  coordinator gRPC port (default: 7777)
  --metrics-port P          coordinator Prometheus port, 0 for none (default: 9090)
  --token-file FILE         local file holding the run token (default: $SPOTRAIN_TOKEN, else
                            a new random token); it is written to SHARED/spotrain/NAME/token
                            (mode 0600) and the binaries get --token-file
  --worker-args ARGS        extra worker flags (shell words), e.g. "--preemption-notice auto"
  --coordinator-args ARGS   extra coordinator flags (shell words)

Modes (default: check, then start):
  --check                   only run the checks
  --watch                   after starting, keep a worker on every host that is reachable
                            (relaunch one when a host comes back); ends when the coordinator
                            exits
  --watch-interval S        seconds between watch rounds (default: 10)
  --keep-going              start on the hosts that pass the checks, skip the others (with
                            --watch they are checked again every round)
  --stop                    SIGTERM every worker (announced leave) and then the coordinator
  --timeout S               limit for one remote call (default: 60)
  -h, --help                this text

Exit status: 0 started (or, with --watch, the coordinator exited 0), 1 a check or a start
failed (each failure is printed with its host), 2 bad arguments.
EOF
}

die_usage() {
  echo "$prog: $*" >&2
  echo "$prog: see --help" >&2
  exit 2
}

# ---- arguments ----------------------------------------------------------------------------
hosts_list=""
hosts_file=""
coord_host="local"
coord_address=""
default_remote_cmd="ssh -o BatchMode=yes -o ConnectTimeout=10"
remote_cmd=$default_remote_cmd
config=""
run_name="spotrain"
shared_dir="/workspace"
state_dir=""
pid_dir=""
bin_dir=""
port=7777
metrics_port=9090
token_file=""
worker_args=""
coord_args=""
mode="start"
watch=0
watch_interval=10
keep_going=0
call_timeout=60

while (($#)); do
  opt=$1
  case $opt in
    --*=*) set -- "${opt%%=*}" "${opt#*=}" "${@:2}"; continue ;;
  esac
  case $opt in
    -h | --help) usage; exit 0 ;;
    --check) mode="check"; shift; continue ;;
    --stop) mode="stop"; shift; continue ;;
    --watch) watch=1; shift; continue ;;
    --keep-going) keep_going=1; shift; continue ;;
  esac
  case $opt in
    --hosts | --hosts-file | --coordinator-host | --coordinator-address | --remote-cmd | \
      --config | --run | --shared-dir | --state-dir | --pid-dir | --bin-dir | --port | \
      --metrics-port | --token-file | --worker-args | --coordinator-args | --watch-interval | \
      --timeout) ;;
    *) die_usage "unknown option $opt" ;;
  esac
  (($# >= 2)) || die_usage "$opt needs a value"
  val=$2
  case $opt in
    --hosts) hosts_list=$val ;;
    --hosts-file) hosts_file=$val ;;
    --coordinator-host) coord_host=$val ;;
    --coordinator-address) coord_address=$val ;;
    --remote-cmd) remote_cmd=$val ;;
    --config) config=$val ;;
    --run) run_name=$val ;;
    --shared-dir) shared_dir=$val ;;
    --state-dir) state_dir=$val ;;
    --pid-dir) pid_dir=$val ;;
    --bin-dir) bin_dir=$val ;;
    --port) port=$val ;;
    --metrics-port) metrics_port=$val ;;
    --token-file) token_file=$val ;;
    --worker-args) worker_args=$val ;;
    --coordinator-args) coord_args=$val ;;
    --watch-interval) watch_interval=$val ;;
    --timeout) call_timeout=$val ;;
    *) die_usage "unknown option $opt" ;;
  esac
  shift 2
done

[[ -n $hosts_list || -n $hosts_file ]] || die_usage "give the worker hosts: --hosts a,b,c or --hosts-file FILE"
[[ -z $hosts_list || -z $hosts_file ]] || die_usage "--hosts and --hosts-file exclude each other"
[[ -z $hosts_file || -r $hosts_file ]] || die_usage "cannot read hosts file $hosts_file"
[[ $run_name =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*$ ]] || die_usage "--run must be letters, digits, . _ -"
if ! [[ $port =~ ^[0-9]+$ ]] || ((port == 0 || port > 65535)); then
  die_usage "--port $port is not a port"
fi
if ! [[ $metrics_port =~ ^[0-9]+$ ]] || ((metrics_port > 65535)); then
  die_usage "--metrics-port $metrics_port is not a port"
fi
[[ $watch_interval =~ ^[0-9]+([.][0-9]+)?$ ]] || die_usage "--watch-interval must be a number of seconds"
[[ $call_timeout =~ ^[0-9]+$ ]] || die_usage "--timeout must be a number of seconds"
[[ $shared_dir == /* ]] || die_usage "--shared-dir must be an absolute path"
if [[ $mode != stop ]]; then
  [[ -n $config ]] || die_usage "--config is required"
  [[ -r $config ]] || die_usage "cannot read config $config"
fi
read -r -a remote <<<"$remote_cmd"
((${#remote[@]})) || die_usage "--remote-cmd is empty"

run_dir="$shared_dir/spotrain/$run_name"
state_dir=${state_dir:-$run_dir/coordinator}
pid_dir=${pid_dir:-/tmp/spotrain-$run_name}

# ---- hosts --------------------------------------------------------------------------------
# Parallel arrays: host (as given to the remote command), label (file names), advertise.
host_names=()
host_labels=()
host_adv=()

label_of() {
  local h=${1#*@}
  h=${h//[^A-Za-z0-9_.-]/_}
  printf '%s' "$h"
}

load_hosts() {
  host_names=()
  host_labels=()
  host_adv=()
  local line h a extra
  declare -A seen=()
  if [[ -n $hosts_list ]]; then
    local IFS=','
    # shellcheck disable=SC2206
    local parts=($hosts_list)
    unset IFS
    for h in "${parts[@]}"; do
      h=${h//[[:space:]]/}
      [[ -n $h ]] || continue
      host_names+=("$h")
      host_adv+=("")
    done
  else
    while IFS= read -r line || [[ -n $line ]]; do
      line=${line%%#*}
      read -r h a extra <<<"$line" || true
      [[ -n ${h:-} ]] || continue
      if [[ -n ${extra:-} ]]; then
        echo "$prog: $hosts_file: ignoring extra words after '$h ${a:-}'" >&2
      fi
      host_names+=("$h")
      host_adv+=("${a:-}")
    done <"$hosts_file"
  fi
  local i l
  for i in "${!host_names[@]}"; do
    l=$(label_of "${host_names[$i]}")
    if [[ -n ${seen[$l]:-} ]]; then
      echo "$prog: host '${host_names[$i]}' is listed twice; one worker per host" >&2
      return 1
    fi
    seen[$l]=1
    host_labels+=("$l")
  done
  return 0
}

# ---- remote execution ---------------------------------------------------------------------
# Shell-quotes $1 for a POSIX shell.
q() {
  local s=${1//\'/\'\\\'\'}
  printf "'%s'" "$s"
}

workdir=$(mktemp -d "${TMPDIR:-/tmp}/spotrain-launch.XXXXXX")
markers_written=0
cleanup() {
  # The markers of the shared-dir checks go with this launcher (best effort, short).
  if ((markers_written)); then
    local files
    files=$(q "$run_dir/.markers/$marker")
    [[ -z $ckpt_abs ]] || files+=" $(q "$ckpt_abs/.spotrain-probe-$marker")"
    call_timeout=10 run_on "$coord_host" "rm -f $files" >/dev/null 2>&1 || true
  fi
  rm -rf "$workdir"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# run_on HOST SCRIPT: runs SCRIPT with bash on HOST ('local': here). The script's output goes
# to stdout; the remote command's own failure (unreachable host) is its exit status.
run_on() {
  local host=$1 script=$2
  if [[ $host == local ]]; then
    timeout "$call_timeout" bash -s <<<"$script"
  else
    timeout "$call_timeout" "${remote[@]}" "$host" bash -s <<<"$script"
  fi
}

# Every remote script starts with the run's variables and a few helpers. Remote scripts print
# "FAIL reason" lines for failed checks, "INFO ..." lines, and "SPOTRAIN-END" as their last
# line: a missing end line means the remote command itself failed.
prelude() {
  cat <<EOF
set -u
shared_dir=$(q "$shared_dir")
run_dir=$(q "$run_dir")
pid_dir=$(q "$pid_dir")
bin_dir=$(q "$bin_dir")
port=$(q "$port")
fail() { echo "FAIL \$*"; }
info() { echo "INFO \$*"; }
find_bin() {
  if [ -n "\$bin_dir" ]; then
    [ -x "\$bin_dir/\$1" ] && { echo "\$bin_dir/\$1"; return 0; }
    return 1
  fi
  command -v "\$1" 2>/dev/null && return 0
  [ -x "/opt/spotrain/bin/\$1" ] && { echo "/opt/spotrain/bin/\$1"; return 0; }
  return 1
}
# alive PIDFILE NAME: the pid in PIDFILE is a live process running NAME.
alive() {
  local pid
  pid=\$(cat "\$1" 2>/dev/null) || return 1
  case \$pid in ''|*[!0-9]*) return 1 ;; esac
  kill -0 "\$pid" 2>/dev/null || return 1
  # Its program (first word of the command line) ends in NAME: not a recycled pid.
  case \$(tr '\0' '\n' <"/proc/\$pid/cmdline" 2>/dev/null | head -n 1) in
    *"\$2") return 0 ;;
  esac
  return 1
}
# tcp_open HOST PORT: a TCP connection to HOST:PORT succeeds within 5 s.
tcp_open() {
  timeout 5 bash -c 'exec 3<>"/dev/tcp/\$0/\$1"' "\$1" "\$2" 2>/dev/null
}
EOF
}

# call HOST LABEL SCRIPT: runs prelude+SCRIPT on HOST, leaves the output in
# $workdir/LABEL.out and a one-line verdict in $workdir/LABEL.verdict ("ok" or the failures).
call() {
  local host=$1 label=$2 script=$3 out="$workdir/$2.out" rc=0
  # The script runs as a function so that it can end early with 'return'.
  run_on "$host" "$(prelude)
main() {
$script
}
main
echo SPOTRAIN-END" >"$out" 2>"$workdir/$label.err" || rc=$?
  if ! grep -q '^SPOTRAIN-END$' "$out"; then
    local why
    why=$(grep -v '^[[:space:]]*$' "$workdir/$label.err" | tail -n 2 | tr '\n' ' ')
    if ((rc == 124)); then why="no answer within ${call_timeout}s"; fi
    echo "unreachable through '${remote_cmd}${host:+ $host}' (exit $rc): ${why:-no output}" \
      >"$workdir/$label.verdict"
  elif grep -q '^FAIL ' "$out"; then
    grep '^FAIL ' "$out" | sed 's/^FAIL //' | paste -sd';' - | sed 's/;/; /g' \
      >"$workdir/$label.verdict"
  else
    echo ok >"$workdir/$label.verdict"
  fi
}

verdict() { cat "$workdir/$1.verdict"; }

# ---- scripts ------------------------------------------------------------------------------
# The worker-host check: binary, shared dir (marker), checkpoint dir, data.
worker_check_script() {
  local label=$1 check_shared=${2:-1}
  cat <<EOF
label=$(q "$label")
check_shared=$check_shared
marker=$(q "$marker")
ckpt_dir=$(q "$ckpt_dir")
data_globs=$(q "$data_globs")
if bin=\$(find_bin spotrain-worker); then
  "\$bin" --version >/dev/null 2>&1 || fail "spotrain-worker at \$bin does not run (missing libraries?): \$("\$bin" --version 2>&1 | head -n 1)"
else
  fail "spotrain-worker not found (\${bin_dir:-PATH and /opt/spotrain/bin})"
fi
if [ ! -d "\$shared_dir" ]; then
  fail "shared dir \$shared_dir does not exist"
elif [ "\$check_shared" = 0 ]; then
  :
elif [ "\$(cat "\$run_dir/.markers/\$marker" 2>/dev/null)" != "\$marker" ]; then
  fail "shared dir \$shared_dir is not shared with the coordinator host (a marker written there from the coordinator host is not visible here)"
elif ! (mkdir -p "\$run_dir/logs" && : >"\$run_dir/.probe-\$label" && rm -f "\$run_dir/.probe-\$label") 2>/dev/null; then
  fail "shared dir \$shared_dir is not writable"
fi
if [ -n "\$ckpt_dir" ]; then
  case \$ckpt_dir in /*) d=\$ckpt_dir ;; *) d=\$shared_dir/\$ckpt_dir ;; esac
  if [ "\$(cat "\$d/.spotrain-probe-\$marker" 2>/dev/null)" != "\$marker" ]; then
    fail "checkpoint dir \$d is not shared with the coordinator host (marker not visible)"
  elif ! (: >"\$d/.probe-\$label" && rm -f "\$d/.probe-\$label") 2>/dev/null; then
    fail "checkpoint dir \$d is not writable"
  fi
fi
cd "\$shared_dir" 2>/dev/null || true
for g in \$data_globs; do
  set -- \$g
  [ -e "\$1" ] || fail "no training data matches \$g"
done
EOF
}

# The coordinator-host check and preparation: binary, config valid, shared dir writable
# (token, config and marker written there), checkpoint dir marker, port free.
coord_prepare_script() {
  local token_b64 config_b64
  token_b64=$(printf '%s' "$token" | base64 | tr -d '\n')
  config_b64=$(base64 <"$config" | tr -d '\n')
  cat <<EOF
marker=$(q "$marker")
state_dir=$(q "$state_dir")
if bin=\$(find_bin spotrain-coordinator); then
  "\$bin" --version >/dev/null 2>&1 || fail "spotrain-coordinator at \$bin does not run (missing libraries?): \$("\$bin" --version 2>&1 | head -n 1)"
else
  fail "spotrain-coordinator not found (\${bin_dir:-PATH and /opt/spotrain/bin})"
  bin=""
fi
if ! mkdir -p "\$run_dir/logs" 2>/dev/null || ! : >"\$run_dir/.probe" 2>/dev/null; then
  fail "shared dir \$shared_dir is not writable (cannot create \$run_dir)"
else
  rm -f "\$run_dir/.probe"
  mkdir -p "\$run_dir/.markers" && printf '%s' "\$marker" >"\$run_dir/.markers/\$marker"
  token_given=$(q "$token_given")
  if alive "\$pid_dir/coordinator.pid" spotrain-coordinator && [ -s "\$run_dir/token" ]; then
    if [ "\$token_given" = 1 ] && [ "\$(printf '%s' $(q "$token_b64") | base64 -d)" != "\$(cat "\$run_dir/token")" ]; then
      fail "the running coordinator uses another token (\$run_dir/token); stop it or give that token"
    fi
    info "token kept: the coordinator is running"
  elif [ "\$token_given" = 0 ] && [ -s "\$run_dir/token" ]; then
    info "token kept: \$run_dir/token exists"
  else
    (umask 077 && printf '%s' $(q "$token_b64") | base64 -d >"\$run_dir/token.tmp" && mv "\$run_dir/token.tmp" "\$run_dir/token") || fail "cannot write the token file"
  fi
  printf '%s' $(q "$config_b64") | base64 -d >"\$run_dir/run.json.tmp" && mv "\$run_dir/run.json.tmp" "\$run_dir/run.json"
  if [ -n "\$bin" ]; then
    cd "\$shared_dir"
    if "\$bin" --check-config --config "\$run_dir/run.json" >"\$run_dir/run.effective.json" 2>"\$run_dir/.check.err"; then
      echo "CONFIG-BEGIN"; cat "\$run_dir/run.effective.json"; echo; echo "CONFIG-END"
    else
      fail "config rejected by spotrain-coordinator --check-config: \$(tr '\n' ' ' <"\$run_dir/.check.err")"
    fi
  fi
  mkdir -p "\$state_dir" 2>/dev/null || fail "cannot create the state dir \$state_dir"
fi
if alive "\$pid_dir/coordinator.pid" spotrain-coordinator; then
  info "coordinator already running (pid \$(cat "\$pid_dir/coordinator.pid"))"
elif tcp_open 127.0.0.1 "\$port"; then
  fail "port \$port is already in use on the coordinator host"
fi
EOF
}

coord_ckpt_marker_script() {
  cat <<EOF
d=$(q "$ckpt_dir")
case \$d in /*) ;; *) d=\$shared_dir/\$d ;; esac
if mkdir -p "\$d" 2>/dev/null && printf '%s' $(q "$marker") >"\$d/.spotrain-probe-"$(q "$marker") 2>/dev/null; then :; else
  fail "checkpoint dir \$d is not writable from the coordinator host"
fi
EOF
}

coord_start_script() {
  cat <<EOF
state_dir=$(q "$state_dir")
extra=$(q "$coord_args")
mkdir -p "\$pid_dir" || { fail "cannot create \$pid_dir"; return 0; }
exec 9>"\$pid_dir/coordinator.lock"
flock -w 30 9 || { fail "another launch holds \$pid_dir/coordinator.lock"; return 0; }
if alive "\$pid_dir/coordinator.pid" spotrain-coordinator; then
  info "coordinator already running (pid \$(cat "\$pid_dir/coordinator.pid"))"
  return 0
fi
bin=\$(find_bin spotrain-coordinator)
cd "\$shared_dir"
rm -f "\$pid_dir/coordinator.pid" "\$pid_dir/coordinator.exit"
log="\$run_dir/logs/coordinator.log"
# shellcheck disable=SC2086
( setsid "\$bin" --config "\$run_dir/run.json" --state-dir "\$state_dir" --port "\$port" \\
    --metrics-port $(q "$metrics_port") --token-file "\$run_dir/token" \$extra \\
    </dev/null >>"\$log" 2>&1 &
  echo \$! >"\$pid_dir/coordinator.pid.tmp" && mv "\$pid_dir/coordinator.pid.tmp" "\$pid_dir/coordinator.pid"
  wait \$!; echo \$? >"\$pid_dir/coordinator.exit" ) </dev/null >/dev/null 2>&1 9>&- &
i=0
while [ ! -s "\$pid_dir/coordinator.pid" ] && [ \$i -lt 100 ]; do sleep 0.1; i=\$((i + 1)); done
i=0
while ! tcp_open 127.0.0.1 "\$port"; do
  if ! alive "\$pid_dir/coordinator.pid" spotrain-coordinator; then
    fail "coordinator exited at start: \$(tail -n 5 "\$log" | tr '\n' ' ')"
    return 0
  fi
  i=\$((i + 1))
  [ \$i -lt 300 ] || { fail "coordinator does not listen on port \$port after 60 s"; return 0; }
  sleep 0.2
done
info "coordinator started (pid \$(cat "\$pid_dir/coordinator.pid"))"
EOF
}

# Starts the worker of one host unless its pid file names a live worker; checks first that
# the coordinator's port is reachable from the host.
worker_start_script() {
  local label=$1 adv=$2
  cat <<EOF
label=$(q "$label")
adv=$(q "$adv")
coord=$(q "$coord_address")
extra=$(q "$worker_args")
hdir="\$pid_dir/\$label"
mkdir -p "\$hdir" || { fail "cannot create \$hdir"; return 0; }
exec 9>"\$hdir/worker.lock"
flock -w 30 9 || { fail "another launch holds \$hdir/worker.lock"; return 0; }
if alive "\$hdir/worker.pid" spotrain-worker; then
  info "worker already running (pid \$(cat "\$hdir/worker.pid"))"
  return 0
fi
if ! tcp_open "\$coord" "\$port"; then
  fail "cannot reach the coordinator at \$coord:\$port from this host"
  return 0
fi
if [ -z "\$adv" ]; then
  ip=\$(getent ahostsv4 "\$coord" 2>/dev/null | awk 'NR==1 {print \$1}')
  adv=\$(ip -4 route get "\${ip:-\$coord}" 2>/dev/null | sed -n 's/.* src \\([0-9.]*\\).*/\\1/p' | head -n 1)
  [ -n "\$adv" ] || adv=\$(hostname -I 2>/dev/null | awk '{print \$1}')
  [ -n "\$adv" ] || { fail "cannot find this host's address (give it in the hosts file)"; return 0; }
fi
bin=\$(find_bin spotrain-worker) || { fail "spotrain-worker not found"; return 0; }
cd "\$shared_dir"
rm -f "\$hdir/worker.pid" "\$hdir/worker.exit"
log="\$run_dir/logs/worker-\$label.log"
echo "=== \$(date -u +%FT%TZ) launch.sh starts a worker on \$label (advertise \$adv)" >>"\$log"
# shellcheck disable=SC2086
( setsid "\$bin" --coordinator "\$coord:\$port" --token-file "\$run_dir/token" \\
    --advertise-host "\$adv" --name "\$label" \$extra </dev/null >>"\$log" 2>&1 &
  echo \$! >"\$hdir/worker.pid.tmp" && mv "\$hdir/worker.pid.tmp" "\$hdir/worker.pid"
  wait \$!; echo \$? >"\$hdir/worker.exit" ) </dev/null >/dev/null 2>&1 9>&- &
i=0
while [ ! -s "\$hdir/worker.pid" ] && [ \$i -lt 100 ]; do sleep 0.1; i=\$((i + 1)); done
info "worker started (pid \$(cat "\$hdir/worker.pid" 2>/dev/null), advertise \$adv)"
EOF
}

# Prints "alive PID", "exited CODE" or "none" for the worker of a host.
worker_probe_script() {
  local label=$1
  cat <<EOF
hdir="\$pid_dir/"$(q "$label")
if alive "\$hdir/worker.pid" spotrain-worker; then
  info "alive \$(cat "\$hdir/worker.pid")"
elif [ -s "\$hdir/worker.exit" ]; then
  info "exited \$(cat "\$hdir/worker.exit")"
else
  info "none"
fi
EOF
}

stop_script() {
  local pidfile=$1 name=$2
  cat <<EOF
f="\$pid_dir/"$(q "$pidfile")
if alive "\$f" $(q "$name"); then
  pid=\$(cat "\$f"); kill -TERM "\$pid"
  i=0
  while kill -0 "\$pid" 2>/dev/null && [ \$i -lt 600 ]; do sleep 0.1; i=\$((i + 1)); done
  if kill -0 "\$pid" 2>/dev/null; then fail "still running 60 s after SIGTERM (pid \$pid)"; else info "stopped (pid \$pid)"; fi
else
  info "not running"
fi
EOF
}

# ---- steps --------------------------------------------------------------------------------
# Runs the worker-host checks on hosts (indices) in parallel; sets good_idx and bad_idx.
check_workers() {
  good_idx=()
  bad_idx=()
  local i
  for i in "$@"; do
    call "${host_names[$i]}" "${host_labels[$i]}" "$(worker_check_script "${host_labels[$i]}")" &
  done
  wait
  for i in "$@"; do
    if [[ $(verdict "${host_labels[$i]}") == ok ]]; then good_idx+=("$i"); else bad_idx+=("$i"); fi
  done
}

start_workers() {  # start_workers INDEX...: sets started_idx and failed_idx
  started_idx=()
  failed_idx=()
  local i
  for i in "$@"; do
    call "${host_names[$i]}" "${host_labels[$i]}" \
      "$(worker_start_script "${host_labels[$i]}" "${host_adv[$i]}")" &
  done
  wait
  for i in "$@"; do
    local l=${host_labels[$i]}
    if [[ $(verdict "$l") == ok ]]; then
      started_idx+=("$i")
      grep '^INFO ' "$workdir/$l.out" | sed 's/^INFO //' | tail -n 1 >"$workdir/$l.verdict"
    else
      failed_idx+=("$i")
    fi
  done
}

labels_of() {
  local i
  for i in "$@"; do printf '%s\n' "${host_labels[$i]}"; done
}

coord_label="coordinator:$(label_of "$coord_host")"

load_hosts || exit 2
((${#host_names[@]})) || die_usage "no worker hosts given"

if [[ -z $coord_address ]]; then
  if [[ $coord_host == local ]]; then
    coord_address=$(hostname -I 2>/dev/null | awk '{print $1}')
    [[ -n $coord_address ]] || coord_address=$(hostname)
  else
    coord_address=${coord_host#*@}
  fi
fi

if [[ $mode == stop ]]; then
  status=0
  for i in "${!host_names[@]}"; do
    call "${host_names[$i]}" "${host_labels[$i]}" \
      "$(stop_script "${host_labels[$i]}/worker.pid" spotrain-worker)" &
  done
  wait
  for l in "${host_labels[@]}" @coord; do
    if [[ $l == @coord ]]; then
      call "$coord_host" @coord "$(stop_script coordinator.pid spotrain-coordinator)"
    fi
    v=$(verdict "$l")
    if [[ $v == ok ]]; then
      v=$(grep '^INFO ' "$workdir/$l.out" | sed 's/^INFO //' | tail -n 1)
    else
      status=1
    fi
    if [[ $l == @coord ]]; then
      printf '  %-24s %s\n' "$coord_label" "$v"
    else
      printf '  %-24s worker %s\n' "$l" "$v"
    fi
  done
  exit "$status"
fi

# The token: never on a command line, here or remotely.
# A token that is neither given nor generated here is the one already in the shared dir
# (a second launch of the same run keeps it).
token_given=1
if [[ -n $token_file ]]; then
  [[ -r $token_file ]] || die_usage "cannot read --token-file $token_file"
  token=$(tr -d '[:space:]' <"$token_file")
elif [[ -n ${SPOTRAIN_TOKEN:-} ]]; then
  token=$(printf '%s' "$SPOTRAIN_TOKEN" | tr -d '[:space:]')
else
  token_given=0
  token=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
fi
[[ -n $token ]] || die_usage "the run token is empty"
marker="spotrain-marker-$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')"
ckpt_dir=""
data_globs=""

echo "== checks: coordinator host $coord_host, ${#host_names[@]} worker host(s), shared dir $shared_dir"
markers_written=1
ckpt_abs=""
call "$coord_host" @coord "$(coord_prepare_script)"
coord_verdict=$(verdict @coord)
if [[ $coord_verdict == ok ]]; then
  effective=$(sed -n '/^CONFIG-BEGIN$/,/^CONFIG-END$/p' "$workdir/@coord.out")
  # The checkpoint dir and the data globs of the effective config (pretty-printed JSON).
  ckpt_dir=$(printf '%s\n' "$effective" | sed -n '/"checkpoint": {/,/}/s/^ *"dir": "\(.*\)",\{0,1\}$/\1/p' | head -n 1)
  data_globs=$(printf '%s\n' "$effective" | sed -n '/"data": {/,/}/s/^ *"\(train\|val\)": "\(.*\)",\{0,1\}$/\2/p' | tr '\n' ' ')
  if [[ -n $ckpt_dir ]]; then
    if [[ $ckpt_dir == /* ]]; then ckpt_abs=$ckpt_dir; else ckpt_abs=$shared_dir/$ckpt_dir; fi
    call "$coord_host" @coord "$(coord_ckpt_marker_script)"
    coord_verdict=$(verdict @coord)
  else
    echo "warning: the config sets no checkpoint.dir: losing every worker at once loses the run"
  fi
fi
printf '  %-24s %s\n' "$coord_label" "$coord_verdict"

all_idx=("${!host_names[@]}")
if [[ $coord_verdict == ok ]]; then
  check_workers "${all_idx[@]}"
else
  # Without the coordinator host's marker the shared-dir check means nothing; check the rest.
  good_idx=()
  bad_idx=()
  for i in "${all_idx[@]}"; do
    call "${host_names[$i]}" "${host_labels[$i]}" "$(worker_check_script "${host_labels[$i]}" 0)" &
  done
  wait
  for i in "${all_idx[@]}"; do
    if [[ $(verdict "${host_labels[$i]}") == ok ]]; then good_idx+=("$i"); else bad_idx+=("$i"); fi
  done
fi
for i in "${all_idx[@]}"; do
  printf '  %-24s %s\n' "${host_labels[$i]}" "$(verdict "${host_labels[$i]}")"
done

failures=${#bad_idx[@]}
[[ $coord_verdict == ok ]] || failures=$((failures + 1))
if [[ $mode == check ]]; then
  if ((failures)); then
    echo "== $failures host(s) failed the checks"
    exit 1
  fi
  echo "== all checks passed (the coordinator port is checked from the workers at start)"
  return 0
fi
if [[ $coord_verdict != ok ]]; then
  echo "== not started: the coordinator host failed its checks"
  exit 1
fi
if ((${#bad_idx[@]})) && ((!keep_going)); then
  echo "== not started: ${#bad_idx[@]} worker host(s) failed the checks (--keep-going starts on the others)"
  exit 1
fi
if ((${#good_idx[@]} == 0)) && ((!watch)); then
  echo "== not started: no worker host passed the checks"
  exit 1
fi

echo "== starting the coordinator on $coord_host"
call "$coord_host" @coord "$(coord_start_script)"
if [[ $(verdict @coord) != ok ]]; then
  echo "  $coord_label: $(verdict @coord)"
  exit 1
fi
echo "  $coord_label: $(grep '^INFO ' "$workdir/@coord.out" | sed 's/^INFO //' | tail -n 1)"

status=0
if ((${#good_idx[@]})); then
  echo "== starting workers"
  start_workers "${good_idx[@]}"
  for i in "${good_idx[@]}"; do
    printf '  %-24s %s\n' "${host_labels[$i]}" "$(verdict "${host_labels[$i]}")"
  done
  if ((${#failed_idx[@]})); then
    status=1
    echo "== ${#failed_idx[@]} worker(s) did not start"
  fi
fi

# The options --stop needs to find this run again, shell-quoted.
stop_args() {
  printf ' --run %s --shared-dir %s --coordinator-host %s' "$(q "$run_name")" "$(q "$shared_dir")" "$(q "$coord_host")"
  [[ -z $hosts_file ]] || printf ' --hosts-file %s' "$(q "$hosts_file")"
  [[ -z $hosts_list ]] || printf ' --hosts %s' "$(q "$hosts_list")"
  [[ $pid_dir == "/tmp/spotrain-$run_name" ]] || printf ' --pid-dir %s' "$(q "$pid_dir")"
  [[ -z $bin_dir ]] || printf ' --bin-dir %s' "$(q "$bin_dir")"
  [[ $remote_cmd == "$default_remote_cmd" ]] || printf ' --remote-cmd %s' "$(q "$remote_cmd")"
}

cat <<EOF
== run '$run_name'
  coordinator: $coord_address:$port (on $coord_host; metrics: ${metrics_port/#0/off})
  shared dir:  $run_dir (token, config, logs/)
  status:      spotrain status --coordinator $coord_address:$port --token-file $run_dir/token
               (on any host of the run; add --json for JSON)
  logs:        $run_dir/logs/
  stop:        $0 --stop$(stop_args)
EOF
if [[ $metrics_port != 0 ]]; then
  echo "  metrics:     http://$coord_address:$metrics_port/metrics"
fi

((watch)) || exit "$status"

# ---- watch --------------------------------------------------------------------------------
coord_probe_script() {
  cat <<'EOF'
if alive "$pid_dir/coordinator.pid" spotrain-coordinator; then
  info "alive $(cat "$pid_dir/coordinator.pid")"
elif [ -s "$pid_dir/coordinator.exit" ]; then
  info "exited $(cat "$pid_dir/coordinator.exit")"
else
  info "none"
fi
EOF
}

echo "== watching (every ${watch_interval}s; ends when the coordinator exits)"
declare -A last_state=()
declare -A was_down=()
while true; do
  call "$coord_host" @coord "$(coord_probe_script)"
  cstate=$(grep '^INFO ' "$workdir/@coord.out" 2>/dev/null | sed 's/^INFO //' | tail -n 1)
  if [[ $(verdict @coord) == ok && $cstate == exited* ]]; then
    code=${cstate#exited }
    echo "$(date -u +%T) coordinator exited with status $code; watch ends"
    exit "$code"
  elif [[ $(verdict @coord) == ok && $cstate == none ]]; then
    echo "$(date -u +%T) coordinator is not running; watch ends"
    exit 1
  elif [[ $(verdict @coord) != ok ]]; then
    echo "$(date -u +%T) coordinator host: $(verdict @coord)"
  fi
  if [[ -n $hosts_file ]]; then
    load_hosts || true
  fi
  for i in "${!host_names[@]}"; do
    call "${host_names[$i]}" "${host_labels[$i]}" "$(worker_probe_script "${host_labels[$i]}")" &
  done
  wait
  relaunch=()
  for i in "${!host_names[@]}"; do
    l=${host_labels[$i]}
    v=$(verdict "$l")
    if [[ $v != ok ]]; then
      state="unreachable"
    else
      state=$(grep '^INFO ' "$workdir/$l.out" | sed 's/^INFO //' | tail -n 1)
    fi
    if [[ ${last_state[$l]:-} != "${state%% *}" ]]; then
      echo "$(date -u +%T) $l: worker ${state}"
      last_state[$l]=${state%% *}
    fi
    # Relaunch where no worker runs: a host never started or wiped (none), a worker that
    # died (exit != 0), or any host that was unreachable and is back. A worker that exited 0
    # finished or left on a preemption notice: its host is going away, leave it alone.
    case $state in
      alive*) ;;
      unreachable) was_down[$l]=1 ;;
      "exited 0")
        if [[ -n ${was_down[$l]:-} ]]; then relaunch+=("$i"); fi ;;
      *) relaunch+=("$i") ;;
    esac
  done
  if ((${#relaunch[@]})); then
    check_workers "${relaunch[@]}"
    for i in "${bad_idx[@]}"; do
      echo "$(date -u +%T) ${host_labels[$i]}: not relaunched: $(verdict "${host_labels[$i]}")"
    done
    if ((${#good_idx[@]})); then
      start_workers "${good_idx[@]}"
      for i in "${good_idx[@]}"; do
        echo "$(date -u +%T) ${host_labels[$i]}: $(verdict "${host_labels[$i]}")"
        if [[ " ${started_idx[*]} " == *" $i "* ]]; then
          last_state[${host_labels[$i]}]=alive
          unset "was_down[${host_labels[$i]}]"
        fi
      done
    fi
  fi
  sleep "$watch_interval"
done
