#!/usr/bin/env bash
# Test-only remote command for deploy/launch.sh (--remote-cmd "netns_remote.sh SIMDIR"):
#   netns_remote.sh SIMDIR HOST CMD...
# runs CMD in the network namespace HOST, in a private mount namespace where the lines of
# SIMDIR/HOST.mounts change that host's view of the file system, so that one machine can
# play hosts that lack the binaries or do not share the checkpoint volume:
#   empty DIR    an empty tmpfs over DIR (nothing there, or a volume that is not shared)
#   ro DIR       DIR read-only
# A HOST without a namespace fails like an unreachable host (ip netns exec exits non-zero).
set -euo pipefail
sim=${1:?usage: netns_remote.sh SIMDIR HOST CMD...}
host=${2:?usage: netns_remote.sh SIMDIR HOST CMD...}
shift 2
# shellcheck disable=SC2016
exec ip netns exec "$host" unshare --mount --propagation private bash -c '
  set -e
  if [ -f "$0" ]; then
    while read -r op dir; do
      case $op in
        empty) mount -t tmpfs -o size=1m,mode=0755 spotrain-sim "$dir" ;;
        ro) mount --bind "$dir" "$dir" && mount -o remount,bind,ro "$dir" ;;
        "") ;;
        *) echo "netns_remote.sh: unknown mount op $op" >&2; exit 2 ;;
      esac
    done <"$0"
  fi
  exec "$@"' "$sim/$host.mounts" "$@"
