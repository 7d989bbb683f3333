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
#                    their own, then SIGTERM, then S more seconds before SIGKILL (default 30)
#   --dry-run        print each process's environment and command, start none (anywhere in
#                    the arguments: it is never passed on)
#
# Each process gets ZENJAX_COORDINATOR=127.0.0.1:<free port>, ZENJAX_NUM_PROCESSES=N and
# ZENJAX_PROCESS_ID=I. Exits 0 if all succeed, else with the status of the first failure.
set -euo pipefail

usage() { sed -n '2,17s/^# \{0,1\}//p' "$0" >&2; exit 2; }

devices=2
cmd="python -m zenjax.train"
log_dir=""
grace=30
dry_run=0
args=()
for arg in "$@"; do  # a dry run, wherever it was asked for
  if [[ "$arg" == --dry-run ]]; then dry_run=1; else args+=("$arg"); fi
done
set -- "${args[@]}"
while [[ $# -gt 0 ]]; do
  [[ "$1" == --*=* ]] && set -- "${1%%=*}" "${1#*=}" "${@:2}"  # --opt=value
  case "$1" in
    --devices) devices="$2"; shift 2 ;;
    --cmd) cmd="$2"; shift 2 ;;
    --log-dir) log_dir="$2"; shift 2 ;;
    --grace) grace="$2"; shift 2 ;;
    -h|--help) usage ;;
    --*) echo "local_multiprocess.sh: unknown option $1 (its own: --devices --cmd --log-dir --grace --dry-run);" \
           "the number of processes N comes before the command's arguments: $0 2 --config=..." >&2; exit 2 ;;
    *) break ;;
  esac
done
if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "local_multiprocess.sh: expected the number of processes N, got '${1:-nothing}': $0 2 --config=..." >&2
  exit 2
fi
n="$1"; shift
read -r -a cmd_words <<< "$cmd"

# Replace any device count inherited from the caller (pytest asks for 8 in its own process).
xla_flags="$(sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g; s/^ +| +$//g' <<< "${XLA_FLAGS:-}")"
xla_flags="${xla_flags:+$xla_flags }--xla_force_host_platform_device_count=${devices}"
if [[ $dry_run == 1 ]]; then
  for ((i = 0; i < n; i++)); do
    printf '+ JAX_PLATFORMS=cpu XLA_FLAGS=%q ZENJAX_COORDINATOR=127.0.0.1:PORT ZENJAX_NUM_PROCESSES=%s' \
      "$xla_flags" "$n"
    printf ' ZENJAX_PROCESS_ID=%s' "$i"
    printf ' %q' "${cmd_words[@]}" "$@"
    [[ -n "$log_dir" ]] && printf ' > %q' "${log_dir}/process_${i}.log"
    echo
  done
  exit 0
fi
[[ -n "$log_dir" ]] && mkdir -p "$log_dir"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

pids=()
kill_all() {
  for pid in "${pids[@]}"; do kill -s "${1:-TERM}" "$pid" 2>/dev/null || true; done
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
done

# Poll rather than `wait -n`, which can miss a process that ends together with another (seen
# with bash 5.2 and two aborting processes) and then blocks; `wait PID` still gets its status.
status=0
deadline=""
signal=TERM
declare -A exit_of=()
while [[ ${#exit_of[@]} -lt $n ]]; do
  for ((i = 0; i < n; i++)); do
    [[ -n "${exit_of[$i]:-}" ]] && continue
    kill -0 "${pids[$i]}" 2>/dev/null && continue
    rc=0
    wait "${pids[$i]}" || rc=$?
    exit_of[$i]=$rc
    echo "local_multiprocess: process $i exited with status $rc" >&2
    if [[ $rc -ne 0 && $status -eq 0 ]]; then
      status=$rc
      deadline=$((SECONDS + grace))
      echo "local_multiprocess: giving the other processes ${grace}s to exit" >&2
    fi
  done
  if [[ -n "$deadline" && $SECONDS -ge $deadline ]]; then
    echo "local_multiprocess: grace period over, sending SIG${signal} to the rest" >&2
    kill_all "$signal"
    # A process may catch SIGTERM to checkpoint; one that is still there later gets SIGKILL.
    if [[ $signal == TERM ]]; then signal=KILL deadline=$((SECONDS + grace)); else deadline=""; fi
  fi
  sleep 0.2
done
exit "$status"
