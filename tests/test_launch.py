import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.multiprocess_util import REPO, run_processes
from zenjax import distributed

LAUNCH = REPO / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh")) + sorted(LAUNCH.glob("*.sbatch"))


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def _run(argv, env=None, **kw):
    return subprocess.run(argv, cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True,
                          text=True, timeout=60, **kw)


def test_every_script_is_found():
    assert {p.name for p in SCRIPTS} == {"local_multiprocess.sh", "slurm_gpu.sbatch", "tpu_pod.sh"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse(script):
    r = _run(["bash", "-n", str(script)])
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_pass_shellcheck(script):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    r = _run(["shellcheck", "--shell=bash", str(script)])
    assert r.returncode == 0, r.stdout


# --- tpu_pod.sh ---------------------------------------------------------------------------------

def _tpu(*args, env=None):
    return _run(["bash", str(LAUNCH / "tpu_pod.sh"), *args], env=env)


def test_tpu_dry_run_prints_the_gcloud_commands():
    r = _tpu("--dry-run", "--name", "t1", "--zone", "us-east5-a", "--project", "p1", "--type",
             "v6e-64", "--queued", "--spot", "create")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "+ gcloud compute tpus queued-resources describe t1 --zone=us-east5-a --project=p1",
        "+ gcloud compute tpus queued-resources create t1 --node-id=t1 --zone=us-east5-a "
        "--project=p1 --accelerator-type=v6e-64 --runtime-version=v2-alpha-tpuv6e --spot",
        "+ gcloud compute tpus queued-resources describe t1 --zone=us-east5-a --project=p1 "
        "'--format=value(state.state)'",
    ]
    r = _tpu("--dry-run", "--name", "t1", "--zone", "us-east5-a", "--queued", "delete")
    assert r.stdout.splitlines() == [
        "+ gcloud compute tpus queued-resources delete t1 --zone=us-east5-a --force --quiet"]
    r = _tpu("--dry-run", "--name", "t1", "--zone", "us-east5-a", "--bucket", "bkt", "--workdir",
             "/mnt/gcs/runs/a", "run", "--config.init_from=/mnt/gcs/w", "--config.name=it's")
    assert r.stdout.splitlines()[0] == (
        "+ gcloud compute tpus tpu-vm ssh t1 --zone=us-east5-a --worker=all '--command="
        "{ mountpoint -q /mnt/gcs || { sudo mkdir -p /mnt/gcs && sudo chown $USER /mnt/gcs && "
        "gcsfuse --implicit-dirs bkt /mnt/gcs; }; } && cd ~/zenjax && { nohup "
        "$HOME/zenjax-venv/bin/python -m zenjax.train --config=configs/next.py "
        "--workdir=/mnt/gcs/runs/a --config.init_from=/mnt/gcs/w "
        "'\\''--config.name=it'\\''\\'\\'''\\''s'\\'' > ~/zenjax-train.log 2>&1 < /dev/null & "
        "echo $! > ~/zenjax-train.pid; }'")


@pytest.mark.parametrize("args, message", [
    (["run"], "--zone is required"),
    (["--zone", "z", "run"], "run needs --workdir"),
    (["--zone", "z", "--workdir", "gs://bkt/runs/a", "run"], "--workdir=/mnt/gcs/runs/a"),
    (["--zone", "z", "--type", "tpu7x-8", "create"], "pass --runtime"),
    (["--zone", "z", "launch"], "unknown option or command 'launch'"),
])
def test_tpu_rejects_bad_arguments(args, message):
    r = _tpu("--dry-run", *args)
    assert r.returncode == 2 and message in r.stderr, r.stderr


FAKE_GCLOUD = """#!{python}
# Stands for gcloud and for one TPU worker whose home is $HOME.
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(["gcloud"] + args) + "\\n")
if "describe" in args:
    if any(a.startswith("--format") for a in args):
        print("ACTIVE")
        sys.exit(0)
    sys.exit(0 if os.environ.get("FAKE_EXISTS") else 1)
if args[3] == "scp":
    shutil.copy(args[4], os.path.join(os.environ["HOME"], args[5].split(":", 1)[1]))
if args[3] == "ssh":
    command = next(a.split("=", 1)[1] for a in args if a.startswith("--command="))
    sys.exit(subprocess.run(["bash", "-c", command], cwd=os.environ["HOME"]).returncode)
"""

# The uv the installer would leave in ~/.local/bin; its virtualenv's python records what it ran.
FAKE_UV = """#!/bin/sh
echo "uv $*" >> "$HOME/uv.log"
if [ "$1" = venv ]; then
  for last; do :; done
  mkdir -p "$last/bin"
  cp "$FAKE_TRAIN" "$last/bin/python"
fi
"""

FAKE_TRAIN = """#!/bin/sh
printf '%s\\n' "$PWD" "$@" > "$HOME/train_args.txt"
echo training step 1
exec sleep 30
"""


@pytest.fixture
def worker(tmp_path):
    home = tmp_path / "home"
    _write(tmp_path / "bin" / "gcloud", FAKE_GCLOUD.format(python=sys.executable))
    _write(home / ".local" / "bin" / "uv", FAKE_UV)
    env = {"HOME": str(home), "TMPDIR": str(tmp_path), "FAKE_GCLOUD_LOG": str(tmp_path / "gcloud.log"),
           "FAKE_TRAIN": str(_write(tmp_path / "fake_train", FAKE_TRAIN)),
           "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    return home, env


def _printed_and_run(stdout, log: Path):
    printed = [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]
    ran = [json.loads(line) for line in log.read_text().splitlines()]
    return printed, ran


def test_tpu_all_ships_installs_and_starts_training(worker, tmp_path):
    home, env = worker
    r = _tpu("--name=t1", "--zone", "z", "--workdir=/shared/run", "all",
             "--config.init_from=/shared/w", "--config.name=two words, it's", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    printed, ran = _printed_and_run(r.stdout, tmp_path / "gcloud.log")
    assert printed == ran  # what is shown is exactly what runs
    assert [c[3:5] for c in ran] == [["tpu-vm", "describe"], ["tpu-vm", "create"],
                                     ["tpu-vm", "scp"], ["tpu-vm", "ssh"], ["tpu-vm", "ssh"]]
    assert ran[1][5:] == ["t1", "--zone=z", "--accelerator-type=v5p-128", "--version=v2-alpha-tpuv5"]
    # The checkout arrived without its git history and was installed with TPU jax.
    assert (home / "zenjax" / "zenjax" / "distributed.py").is_file()
    assert (home / "zenjax" / "launch" / "tpu_pod.sh").is_file()
    assert not (home / "zenjax" / ".git").exists()
    uv = (home / "uv.log").read_text()
    assert f"uv venv --python 3.11 {home}/zenjax-venv" in uv
    assert f"uv pip install --python {home}/zenjax-venv/bin/python -e {home}/zenjax jax[tpu]" in uv
    args_file = home / "train_args.txt"
    for _ in range(100):
        if args_file.exists() and args_file.read_text().count("\n") >= 6:
            break
        time.sleep(0.05)
    assert args_file.read_text().splitlines() == [
        str(home / "zenjax"), "-m", "zenjax.train", "--config=configs/next.py",
        "--workdir=/shared/run", "--config.init_from=/shared/w", "--config.name=two words, it's"]

    r = _tpu("--name", "t1", "--zone", "z", "logs", env=env)
    assert f"[{os.uname().nodename}] training step 1" in r.stdout, r.stdout + r.stderr
    pid = int((home / "zenjax-train.pid").read_text())
    os.kill(pid, 0)  # still training
    r = _tpu("--name", "t1", "--zone", "z", "stop", env=env)
    assert r.returncode == 0, r.stderr
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"training process {pid} survived stop")


def test_tpu_create_reuses_an_existing_vm_and_waits_for_a_queued_one(worker, tmp_path):
    _, env = worker
    r = _tpu("--name", "t1", "--zone", "z", "create", env={**env, "FAKE_EXISTS": "1"})
    assert r.returncode == 0 and "reusing TPU VM t1" in r.stdout, r.stdout + r.stderr
    r = _tpu("--name", "q1", "--zone", "z", "--queued", "create", env=env)
    assert r.returncode == 0 and "queued resource q1 is ACTIVE" in r.stdout, r.stdout + r.stderr
    printed, ran = _printed_and_run(r.stdout, tmp_path / "gcloud.log")
    assert printed == ran[1:]
    assert [c[3:5] for c in ran] == [["tpu-vm", "describe"]] + [["queued-resources", v] for v in
                                                                 ("describe", "create", "describe")]


# --- slurm_gpu.sbatch ---------------------------------------------------------------------------

FAKE_SRUN = """#!{python}
# Prints what srun was asked to run and what zenjax would make of task 1's environment.
import json, os, sys
sys.path.insert(0, {repo!r})
from zenjax.distributed import detect
env = {{**os.environ, "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0",
        "SLURM_STEP_NODELIST": os.environ["SLURM_JOB_NODELIST"], "SLURM_STEP_TASKS_PER_NODE": "1(x2)"}}
print(json.dumps({{"argv": sys.argv[1:], "cluster": list(detect(env=env))}}))
"""


@pytest.mark.parametrize("port", [None, "29500"])
def test_slurm_batch_script_points_every_node_at_the_first(tmp_path, port):
    _write(tmp_path / "bin" / "scontrol", "#!/bin/sh\n[ \"$*\" = 'show hostnames gpu[007-008]' ] "
           "&& printf 'gpu007\\ngpu008\\n'\n")
    _write(tmp_path / "bin" / "srun", FAKE_SRUN.format(python=sys.executable, repo=str(REPO)))
    env = {"PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "77",
           "SLURM_JOB_NODELIST": "gpu[007-008]", "SLURM_JOB_NUM_NODES": "2"}
    if port:
        env["ZENJAX_COORDINATOR_PORT"] = port
    r = _run(["bash", str(LAUNCH / "slurm_gpu.sbatch"), "--config=configs/next.py",
              "--workdir=/shared/run"], env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.splitlines()[-1])
    assert out["argv"] == ["--ntasks-per-node=1", "--kill-on-bad-exit=1", "--output=zenjax-%j-%t.out",
                           "python", "-m", "zenjax.train", "--config=configs/next.py",
                           "--workdir=/shared/run"]
    assert out["cluster"] == ["slurm", f"gpu007:{port or distributed.DEFAULT_PORT}", 2, 1, None]


def test_slurm_batch_script_needs_training_arguments():
    r = _run(["bash", str(LAUNCH / "slurm_gpu.sbatch")])
    assert r.returncode == 2 and "usage: sbatch" in r.stderr


# --- gke_jobset.yaml ----------------------------------------------------------------------------

def _lookup(config, dotted):
    for key in dotted.split("."):
        config = config[key]
    return config


def test_jobset_is_a_consistent_tpu_slice():
    doc = yaml.safe_load((LAUNCH / "gke_jobset.yaml").read_text())
    assert (doc["apiVersion"], doc["kind"]) == ("jobset.x-k8s.io/v1alpha2", "JobSet")
    [rjob] = doc["spec"]["replicatedJobs"]
    job = rjob["template"]["spec"]
    pod = job["template"]["spec"]
    [container] = pod["containers"]
    chips = math.prod(map(int, pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"].split("x")))
    assert job["parallelism"] == job["completions"]
    assert job["parallelism"] * container["resources"]["limits"]["google.com/tpu"] == chips
    assert container["ports"] == [{"containerPort": distributed.DEFAULT_PORT}]

    cmd = container["command"]
    assert cmd[:3] == ["python", "-m", "zenjax.train"]
    flags = dict(a.split("=", 1) for a in cmd[3:])
    config_path = flags.pop("--config")
    assert (REPO / config_path).is_file()
    mount = container["volumeMounts"][0]["mountPath"]
    assert flags.pop("--workdir").startswith(mount + "/")
    # Every override names a field the config has (ml_collections would reject it at start-up).
    from configs import next as next_config

    config = next_config.get_config()
    for flag, value in flags.items():
        assert flag.startswith("--config."), flag
        _lookup(config, flag.removeprefix("--config."))
        assert value.startswith(mount + "/"), (flag, value)


# --- local_multiprocess.sh ----------------------------------------------------------------------

ECHO_ENV = """
import os, signal, sys, time
print(os.environ["ZENJAX_PROCESS_ID"], os.environ["ZENJAX_NUM_PROCESSES"],
      os.environ["ZENJAX_COORDINATOR"], os.environ["JAX_PLATFORMS"], os.environ["XLA_FLAGS"],
      sys.argv[1:], flush=True)
if sys.argv[1:] == ["fail"]:
    if os.environ["ZENJAX_PROCESS_ID"] == "1":
        sys.exit(3)
    if os.environ["ZENJAX_PROCESS_ID"] == "2":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(60)
"""


def test_local_launcher_gives_each_process_its_rank_and_devices(tmp_path):
    script = _write(tmp_path / "echo_env.py", ECHO_ENV)
    r = run_processes(["python", str(script), "a b"], tmp_path / "logs", num_processes=3, devices=3,
                      timeout=60, env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert r.returncode == 0 and r.statuses == {0: 0, 1: 0, 2: 0}, r.report()
    lines = [log.strip().split(" ", 5) for log in r.logs]
    assert [int(line[0]) for line in lines] == [0, 1, 2]
    assert {line[1] for line in lines} == {"3"}
    assert len({line[2] for line in lines}) == 1 and lines[0][2].startswith("127.0.0.1:")
    assert {line[3] for line in lines} == {"cpu"}
    assert {line[4] for line in lines} == {"--xla_force_host_platform_device_count=3"}
    # args are appended to the command ("a" and "b": --cmd words are split on spaces)
    assert {line[5] for line in lines} == {"['a', 'b']"}


def test_local_launcher_stops_the_rest_when_one_fails(tmp_path):
    script = _write(tmp_path / "echo_env.py", ECHO_ENV)
    r = run_processes(["python", str(script), "fail"], tmp_path / "logs", num_processes=3, grace=1,
                      timeout=30)
    assert r.returncode == 3, r.report()
    assert r.statuses == {0: -15, 1: 3, 2: -9}, r.report()  # 2 ignores SIGTERM
    assert r.seconds < 20, r.report()


# --- dry runs -------------------------------------------------------------------------------------

RECORDER = "#!/usr/bin/env bash\necho \"$(basename \"$0\") $*\" >> \"$RECORD\"\n"
DRY_RUNS = {  # script: (arguments with a {dry} slot in every place a user may put the flag, fakes it calls)
    "tpu_pod.sh": (["{dry}", "--zone", "z", "{dry}", "--bucket=b", "--workdir=/mnt/gcs/r", "{dry}", "all",
                    "{dry}", "--config.init_from=/mnt/gcs/w", "{dry}"], ["gcloud"]),
    "local_multiprocess.sh": (["{dry}", "--devices", "1", "{dry}", "2", "{dry}", "--config=configs/next.py:tiny",
                               "{dry}"], ["python"]),
    "slurm_gpu.sbatch": (["{dry}", "--config=configs/next.py", "{dry}", "--workdir=/shared/r", "{dry}"],
                         ["srun", "scontrol"]),
}
SLOTS = {name: args.count("{dry}") for name, (args, _) in DRY_RUNS.items()}


def _launch(tmp_path, name, dry_slot):
    """Runs a launch script with fakes of every program it may start; returns (result, what they recorded)."""
    args, fakes = DRY_RUNS[name]
    argv, slot = [], 0
    for a in args:
        if a == "{dry}":
            if slot == dry_slot:
                argv.append("--dry-run")
            slot += 1
        else:
            argv.append(a)
    for fake in fakes:
        _write(tmp_path / "bin" / fake, RECORDER)
    record = tmp_path / "record"
    env = {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "RECORD": str(record), "HOME": str(tmp_path),
           "SLURM_JOB_NODELIST": "node[1-2]"}
    r = _run(["bash", str(LAUNCH / name), *argv], env=env)
    return r, record.read_text() if record.exists() else ""


@pytest.mark.parametrize("name, slot", [(n, s) for n, k in SLOTS.items() for s in range(k)],
                         ids=lambda x: str(x))
def test_a_dry_run_anywhere_runs_nothing(tmp_path, name, slot):
    r, ran = _launch(tmp_path, name, slot)
    assert r.returncode == 0, r.stderr
    assert ran == "", f"a dry run started {ran!r}"
    assert r.stdout.startswith("+ ") and "--dry-run" not in r.stdout  # it says what would run, flag not passed on
    assert "started" not in r.stdout.replace("nothing was started", "")


@pytest.mark.parametrize("args, message", [
    (["--config=configs/next.py:tiny"], "unknown option --config (its own: --devices"),
    (["x", "--config=configs/next.py:tiny"], "expected the number of processes N, got 'x'"),
])
def test_local_launcher_without_n_says_so(args, message):
    r = _run(["bash", str(LAUNCH / "local_multiprocess.sh"), *args])
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()] and message in r.stderr, r


@pytest.mark.parametrize("name", list(DRY_RUNS))
def test_without_a_dry_run_the_fakes_do_run(tmp_path, name):
    r, ran = _launch(tmp_path, name, dry_slot=-1)
    assert any(line.split()[0] in DRY_RUNS[name][1] for line in ran.splitlines()), (r.stdout, r.stderr)
