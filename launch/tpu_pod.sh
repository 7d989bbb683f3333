#!/usr/bin/env bash
# Trains zenjax on a Cloud TPU VM slice: create (or reuse) it, ship the code, run on every worker.
#
#   launch/tpu_pod.sh [options] COMMAND [options] [train args, e.g. --config.init_from=/mnt/gcs/w ...]
#
# The options below may come before or after the command word, and --dry-run anywhere at all; every
# other word after the command, and everything after `--`, goes to `python -m zenjax.train`.
#
# Commands:
#   create   create the TPU VM (with --queued: a queued resource, then wait until it is ACTIVE)
#            unless one of that name exists
#   setup    copy this checkout (or clone --repo) to ~/zenjax on every worker; install it with
#            jax[tpu] into ~/zenjax-venv (Python from --python, fetched by uv); with --bucket,
#            install gcsfuse and mount the bucket at /mnt/gcs
#   run      start `python -m zenjax.train` on every worker in the background; each worker logs
#            to its own ~/zenjax-train.log
#   logs     print the last lines of every worker's log, each line prefixed by its host
#   stop     stop the training processes
#   delete   delete the TPU VM (and its queued resource)
#   all      create, setup, run
#
# Options:
#   --name NAME        TPU VM (and queued resource) name (default zenjax)
#   --zone ZONE        zone, e.g. us-east5-a (required)
#   --project ID       GCP project (default: gcloud's configured project)
#   --type TYPE        accelerator type: v5p-128, v6e-256, v5litepod-16, v4-32 (default v5p-128)
#   --runtime VERSION  TPU software version (default: the one that fits --type)
#   --queued           create through a queued resource, which waits for capacity
#   --spot             use spot capacity (cheaper, can be preempted)
#   --config PATH      training config, may end in :tiny (default configs/next.py)
#   --workdir DIR      checkpoints and metrics, on storage every worker shares, e.g.
#                      /mnt/gcs/runs/next with --bucket (required by run)
#   --bucket NAME      Cloud Storage bucket mounted at /mnt/gcs on every worker (gcsfuse)
#   --repo URL         git URL the workers clone, instead of copying this checkout
#   --branch NAME      branch of --repo (default main)
#   --python VERSION   Python of the workers' virtualenv (default 3.11)
#   --lines N          lines per worker shown by logs (default 30)
#   --dry-run          print the commands without running them
set -euo pipefail

usage() { sed -n '2,41s/^# \{0,1\}//p' "$0" >&2; exit 2; }

name=zenjax zone="" project="" type=v5p-128 runtime="" queued=0 spot=0
config=configs/next.py workdir="" bucket="" repo="" branch=main python=3.11 lines=30 dry_run=0
command="" train_args=()
for arg in "$@"; do [[ "$arg" == --dry-run ]] && dry_run=1; done  # a dry run, wherever it was asked for
while [[ $# -gt 0 ]]; do
  case "${1%%=*}" in  # --opt=value, for this script's own options only (train args keep their form)
    --name|--zone|--project|--type|--runtime|--config|--workdir|--bucket|--repo|--branch|--python|--lines)
      [[ "$1" == *=* ]] && set -- "${1%%=*}" "${1#*=}" "${@:2}" ;;
  esac
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --type) type="$2"; shift 2 ;;
    --runtime) runtime="$2"; shift 2 ;;
    --queued) queued=1; shift ;;
    --spot) spot=1; shift ;;
    --config) config="$2"; shift 2 ;;
    --workdir) workdir="$2"; shift 2 ;;
    --bucket) bucket="$2"; shift 2 ;;
    --repo) repo="$2"; shift 2 ;;
    --branch) branch="$2"; shift 2 ;;
    --python) python="$2"; shift 2 ;;
    --lines) lines="$2"; shift 2 ;;
    --dry-run) shift ;;
    -h|--help) usage ;;
    --) shift; train_args+=("$@"); break ;;
    *)
      if [[ -z "$command" && "$1" =~ ^(create|setup|run|logs|stop|delete|all)$ ]]; then command="$1"
      elif [[ -n "$command" ]]; then train_args+=("$1")
      else echo "tpu_pod.sh: unknown option or command '$1'" >&2; usage
      fi
      shift ;;
  esac
done
[[ -n "$command" ]] || usage
[[ -n "$zone" ]] || { echo "tpu_pod.sh: --zone is required" >&2; exit 2; }

if [[ -z "$runtime" ]]; then
  case "$type" in
    v6e-*) runtime=v2-alpha-tpuv6e ;;
    v5p-*) runtime=v2-alpha-tpuv5 ;;
    v5litepod-*) runtime=v2-alpha-tpuv5-lite ;;
    v4-*) runtime=tpu-ubuntu2204-base ;;
    *) echo "tpu_pod.sh: no default runtime for --type $type; pass --runtime" >&2; exit 2 ;;
  esac
fi

where=(--zone="$zone")
[[ -n "$project" ]] && where+=(--project="$project")
spot_flag=()
[[ $spot == 1 ]] && spot_flag=(--spot)

# Shell words as they would be typed: bare when safe, else single-quoted.
quote() {
  local out=() a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then out+=("$a"); else out+=("'${a//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}

step() {
  echo "+ $(quote "$@")"
  [[ $dry_run == 1 ]] || "$@"
}

chain() {
  local joined="$1" c
  shift
  for c in "$@"; do joined+=" && $c"; done
  echo "$joined"
}

# A dry run prints the probe and assumes the answer is "no".
probe() {
  echo "+ $(quote "$@")"
  [[ $dry_run == 0 ]] && "$@" > /dev/null 2>&1
}

# Every process must see one workdir: a bucket mounted at the same path on every worker.
mount="{ mountpoint -q /mnt/gcs || { sudo mkdir -p /mnt/gcs && sudo chown \$USER /mnt/gcs"
mount+=" && gcsfuse --implicit-dirs $(quote "$bucket") /mnt/gcs; }; }"

on_workers() {
  step gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=all --command="$1"
}

create() {
  if [[ $queued == 1 ]]; then
    if probe gcloud compute tpus queued-resources describe "$name" "${where[@]}"; then
      echo "reusing queued resource $name"
    else
      step gcloud compute tpus queued-resources create "$name" --node-id="$name" "${where[@]}" \
        --accelerator-type="$type" --runtime-version="$runtime" "${spot_flag[@]}"
    fi
    local state=""
    until [[ "$state" == ACTIVE ]]; do
      echo "+ $(quote gcloud compute tpus queued-resources describe "$name" "${where[@]}" \
        --format='value(state.state)')"
      [[ $dry_run == 1 ]] && return
      state=$(gcloud compute tpus queued-resources describe "$name" "${where[@]}" \
        --format='value(state.state)')
      echo "queued resource $name is $state"
      case "$state" in
        FAILED|SUSPENDED) echo "tpu_pod.sh: queued resource $name is $state" >&2; exit 1 ;;
        ACTIVE) ;;
        *) sleep 30 ;;
      esac
    done
  elif probe gcloud compute tpus tpu-vm describe "$name" "${where[@]}"; then
    echo "reusing TPU VM $name"
  else
    step gcloud compute tpus tpu-vm create "$name" "${where[@]}" --accelerator-type="$type" \
      --version="$runtime" "${spot_flag[@]}"
  fi
}

setup() {
  # Stock TPU images ship an older Python than zenjax needs: uv fetches the right one.
  local steps=(
    "export PATH=\$HOME/.local/bin:\$PATH"
    "{ command -v uv > /dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh; }"
    "{ [ -x ~/zenjax-venv/bin/python ] || uv venv --python $(quote "$python") ~/zenjax-venv; }"
    "uv pip install --python ~/zenjax-venv/bin/python -e ~/zenjax \"jax[tpu]\""
  )
  if [[ -n "$bucket" ]]; then
    # gcsfuse from Google's apt repository, as its install guide has it.
    local key=/usr/share/keyrings/cloud.google.asc apt=https://packages.cloud.google.com/apt
    local list=/etc/apt/sources.list.d/gcsfuse.list gcsfuse
    gcsfuse=$(chain "curl -fsSL $apt/doc/apt-key.gpg | sudo tee $key > /dev/null" \
      "echo \"deb [signed-by=$key] $apt gcsfuse-\$(lsb_release -cs) main\" | sudo tee $list > /dev/null" \
      "sudo apt-get update -q" "sudo apt-get install -yq gcsfuse")
    steps+=("{ command -v gcsfuse > /dev/null || { $gcsfuse; }; }" "$mount")
  fi
  if [[ -n "$repo" ]]; then
    local b r update
    b=$(quote "$branch") r=$(quote "$repo")
    update=$(chain "[ -d ~/zenjax/.git ]" "git -C ~/zenjax fetch origin" \
      "git -C ~/zenjax checkout $b" "git -C ~/zenjax pull --ff-only origin $b")
    on_workers "$(chain "{ $update || git clone --branch $b $r ~/zenjax; }" "${steps[@]}")"
  else
    local root archive
    root=$(cd "$(dirname "$0")/.." && pwd)
    archive="${TMPDIR:-/tmp}/zenjax-$name.tar.gz"
    # Tracked and untracked-but-not-ignored files, so local edits travel and build outputs do not.
    if [[ $dry_run == 1 ]]; then
      echo "(would pack $root into $archive)"
    else
      (cd "$root" && git ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' f; do [[ -e "$f" ]] && printf '%s\0' "$f"; done |
        tar --null -T - -czf "$archive")
      echo "packed $root into $archive"
    fi
    step gcloud compute tpus tpu-vm scp "$archive" "$name:zenjax.tar.gz" "${where[@]}" --worker=all
    on_workers "$(chain "rm -rf ~/zenjax" "mkdir ~/zenjax" "tar -xzf ~/zenjax.tar.gz -C ~/zenjax" \
      "${steps[@]}")"
  fi
}

run() {
  [[ -n "$workdir" ]] || { echo "tpu_pod.sh: run needs --workdir" >&2; exit 2; }
  if [[ "$workdir" == gs://* ]]; then
    echo "tpu_pod.sh: zenjax.train writes its workdir as local files; use --bucket and" \
      "--workdir=/mnt/gcs/${workdir#gs://*/}" >&2
    exit 2
  fi
  local train steps=()
  train="\$HOME/zenjax-venv/bin/python -m zenjax.train $(quote --config="$config" \
    --workdir="$workdir" "${train_args[@]}")"
  [[ -n "$bucket" ]] && steps+=("$mount")  # a restarted VM has lost its mount
  steps+=("cd ~/zenjax"
    "{ nohup $train > ~/zenjax-train.log 2>&1 < /dev/null & echo \$! > ~/zenjax-train.pid; }")
  on_workers "$(chain "${steps[@]}")"
  if [[ $dry_run == 1 ]]; then
    echo "dry run: nothing was started"
  else
    echo "started; follow with: $0 --name $name --zone $zone${project:+ --project $project} logs"
  fi
}

case "$command" in
  create) create ;;
  setup) setup ;;
  run) run ;;
  logs) on_workers "tail -n $lines ~/zenjax-train.log | sed \"s/^/[\$(hostname)] /\"" ;;
  stop) on_workers "[ -f ~/zenjax-train.pid ] && kill \$(cat ~/zenjax-train.pid) || true" ;;
  delete)
    if [[ $queued == 1 ]]; then
      step gcloud compute tpus queued-resources delete "$name" "${where[@]}" --force --quiet
    else
      step gcloud compute tpus tpu-vm delete "$name" "${where[@]}" --quiet
    fi ;;
  all) create; setup; run ;;
esac
