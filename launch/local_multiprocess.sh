#!/usr/bin/env bash
# Runs N cooperating JAX processes on this machine, on CPU, to rehearse a multi-host job.
#
#   launch/local_multiprocess.sh [options] N [args...]
#
#   --devices K      simulated CPU devices per process (default 2)
#   --cmd "CMD"      command each process runs, split on spaces, args appended
#                    (default "python -m zenjax.train")
#   --log-dir DIR    process I writes DIR/process_I.log instead of sharing this terminal
#   --grace S        once one process fails, the others get S seconds to notice and exit on
#                    their own before they are killed (default 30)
#
# Each process gets ZENJAX_COORDINATOR=127.0.0.1:<free port>, ZENJAX_NUM_PROCESSES=N and
# ZENJAX_PROCESS_ID=I. Exits 0 if all succeed, else with the status of the first failure.
set -euo pipefail

usage() { sed -n '2,15s/^# \{0,1\}//p' "$0" >&2; exit 2; }

devices=2
cmd="python -m zenjax.train"
log_dir=""
grace=30
while [[ $# -gt 0 ]]; do
  case "$1" in
    --devices) devices="$2"; shift 2 ;;
    --cmd) cmd="$2"; shift 2 ;;
    --log-dir) log_dir="$2"; shift 2 ;;
    --grace) grace="$2"; shift 2 ;;
    -h|--help) usage ;;
    --*) echo "unknown option $1" >&2; usage ;;
    *) break ;;
  esac
done
[[ $# -ge 1 && "$1" =~ ^[1-9][0-9]*$ ]] || usage
n="$1"; shift
read -r -a cmd_words <<< "$cmd"
[[ -n "$log_dir" ]] && mkdir -p "$log_dir"

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# Replace any device count inherited from the caller (pytest asks for 8 in its own process).
xla_flags="$(sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g' <<< "${XLA_FLAGS:-}")"
xla_flags="${xla_flags} --xla_force_host_platform_device_count=${devices}"

declare -A index_of=()
pids=()
kill_all() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap kill_all EXIT
trap 'exit 130' INT TERM

for ((i = 0; i < n; i++)); do
  (
    export JAX_PLATFORMS=cpu XLA_FLAGS="$xla_flags"
    export ZENJAX_COORDINATOR="127.0.0.1:${port}" ZENJAX_NUM_PROCESSES="$n" ZENJAX_PROCESS_ID="$i"
    if [[ -n "$log_dir" ]]; then
      exec "${cmd_words[@]}" "$@" > "${log_dir}/process_${i}.log" 2>&1
    fi
    exec "${cmd_words[@]}" "$@"
  ) &
  pids+=("$!")
  index_of[$!]=$i
done

status=0
timer=""  # a plain `sleep` child: when it ends, the grace period is over
for ((left = n; left > 0; )); do
  set +e
  wait -n -p done_pid
  rc=$?
  set -e
  if [[ "$done_pid" == "$timer" ]]; then
    echo "local_multiprocess: grace period over, killing the rest" >&2
    kill_all
    continue
  fi
  left=$((left - 1))
  echo "local_multiprocess: process ${index_of[$done_pid]} exited with status $rc" >&2
  if [[ $rc -ne 0 && $status -eq 0 ]]; then
    status=$rc
    if [[ $left -gt 0 ]]; then
      echo "local_multiprocess: giving the other processes ${grace}s to exit" >&2
      sleep "$grace" > /dev/null 2>&1 &
      timer=$!
    fi
  fi
done
[[ -n "$timer" ]] && { kill "$timer" 2>/dev/null || true; }
exit "$status"
