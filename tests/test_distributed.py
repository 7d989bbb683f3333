import textwrap

import jax
import pytest

from tests.multiprocess_util import run_processes
from zenjax import distributed
from zenjax.distributed import Cluster, detect

# Two processes of two CPU devices each: a 4-device global mesh, rows split by process.
PRELUDE = """
import os, sys, time
import numpy as np
from zenjax import distributed

cluster = distributed.initialize()

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

pid = jax.process_index()
mesh = jax.make_mesh((4,), ("data",))
full = np.arange(12, dtype=np.float32).reshape(4, 3) - 5.0
x = jax.make_array_from_process_local_data(
    NamedSharding(mesh, P("data")), full[2 * pid:2 * pid + 2], full.shape)
sum_sq = jax.jit(lambda a: (a * a).sum(axis=0), out_shardings=NamedSharding(mesh, P()))
"""

COLLECTIVE = PRELUDE + """
assert cluster.kind == "env" and cluster.num_processes == 2 and cluster.process_id == pid, cluster
assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 4, 2)
assert distributed.is_main_process() == (pid == 0)
assert {d.process_index for d in x.addressable_shards[0].data.devices()} == {pid}
y = sum_sq(x)  # each process holds half the rows: the sum needs the other process's half
single = jax.jit(lambda a: (a * a).sum(axis=0))(jax.device_put(full, jax.local_devices()[0]))
np.testing.assert_allclose(np.asarray(y), np.asarray(single), rtol=1e-6)
np.testing.assert_allclose(np.asarray(y), (full * full).sum(axis=0), rtol=1e-6)
print("process", pid, "ok", np.asarray(y).tolist(), flush=True)
"""

DIE = PRELUDE + """
victim, survivor_computes = int(sys.argv[1]), sys.argv[2] == "computes"
sum_sq(x).block_until_ready()
print("first step done", flush=True)
if pid == victim and sys.argv[3] == "raises":
    raise RuntimeError("boom")
if pid == victim:
    os._exit(7)
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    if survivor_computes:  # the collective itself fails; otherwise only heartbeats can tell
        sum_sq(x).block_until_ready()
    time.sleep(0.1)
print("survivor never noticed", flush=True)
"""


def _script(tmp_path, text):
    path = tmp_path / "worker.py"
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_two_processes_reduce_across_the_global_mesh(tmp_path):
    r = run_processes(["python", _script(tmp_path, COLLECTIVE)], tmp_path / "logs", timeout=120)
    assert r.returncode == 0 and r.statuses == {0: 0, 1: 0}, r.report()
    for pid in (0, 1):
        assert f"process {pid} ok [46.0, 46.0, 54.0]" in r.logs[pid], r.report()


@pytest.mark.parametrize("survivor", ["computes", "idles"])
@pytest.mark.parametrize("victim", [0, 1], ids=["coordinator_dies", "worker_dies"])
def test_death_of_one_process_stops_the_other(tmp_path, victim, survivor):
    # A 5 s heartbeat keeps the test short; the launcher's 60 s grace lets the survivor die alone.
    env = {"ZENJAX_HEARTBEAT_TIMEOUT": "5", "ZENJAX_SHUTDOWN_TIMEOUT": "10"}
    script = _script(tmp_path, DIE)
    r = run_processes(["python", script, str(victim), survivor, "exits"], tmp_path / "logs",
                      env=env, grace=60, timeout=110)
    survivor = 1 - victim
    assert r.returncode == 7 and r.statuses[victim] == 7, r.report()
    assert "first step done" in r.logs[survivor], r.report()
    assert r.statuses[survivor] not in (0, -15), r.report()  # failed by itself, not killed by us
    assert "JAX distributed service detected fatal errors" in r.logs[survivor], r.report()
    assert r.seconds < 60, r.report()


def test_exception_in_one_process_ends_both_after_the_shutdown_timeout(tmp_path):
    # The raising process waits at jax's shutdown barrier for the others; when that times out,
    # every process aborts. A 5 s timeout here; 300 s (ZENJAX_SHUTDOWN_TIMEOUT) by default.
    env = {"ZENJAX_HEARTBEAT_TIMEOUT": "5", "ZENJAX_SHUTDOWN_TIMEOUT": "5"}
    script = _script(tmp_path, DIE)
    r = run_processes(["python", script, "1", "idles", "raises"], tmp_path / "logs", env=env,
                      grace=60, timeout=110)
    assert "RuntimeError: boom" in r.logs[1], r.report()
    assert r.returncode != 0 and r.statuses[0] not in (0, -15), r.report()
    assert "JAX distributed service detected fatal errors" in r.logs[0], r.report()
    assert r.seconds < 60, r.report()


def test_plain_run_starts_nothing(monkeypatch):
    for var in ("ZENJAX_COORDINATOR", "ZENJAX_NUM_PROCESSES", "ZENJAX_PROCESS_ID",
                "SLURM_STEP_NUM_TASKS", "JOBSET_NAME"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.initialize() == Cluster("single", None, 1, 0)
    assert not jax.distributed.is_initialized()


def test_explicit_values_beat_environment_variables():
    env = {"ZENJAX_COORDINATOR": "10.0.0.1:999", "ZENJAX_NUM_PROCESSES": "8",
           "ZENJAX_PROCESS_ID": "3"}
    assert detect(env=env) == Cluster("env", "10.0.0.1:999", 8, 3)
    assert detect("head", 4, 1, env=env) == Cluster("env", "head:8482", 4, 1)
    assert detect(env={**env, "ZENJAX_NUM_PROCESSES": "1"}).kind == "single"


def test_incomplete_or_inconsistent_settings_name_the_problem():
    with pytest.raises(ValueError, match="ZENJAX_NUM_PROCESSES.*ZENJAX_PROCESS_ID"):
        detect(env={"ZENJAX_COORDINATOR": "head:1234"})
    with pytest.raises(ValueError, match=r"process id 2 is outside \[0, 2\)"):
        detect(env={"ZENJAX_COORDINATOR": "h", "ZENJAX_NUM_PROCESSES": "2",
                    "ZENJAX_PROCESS_ID": "2"})
    with pytest.raises(ValueError, match="ZENJAX_PROCESS_ID must be an integer"):
        detect(env={"ZENJAX_PROCESS_ID": "first"})


SLURM = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "2",
         "SLURM_LOCALID": "0", "SLURM_STEP_NODELIST": "gpu[007-009,012]",
         "SLURM_STEP_TASKS_PER_NODE": "1(x4)", "SLURM_NTASKS": "4"}


def test_slurm_step_one_process_per_node():
    assert detect(env=SLURM) == Cluster("slurm", "gpu007:8482", 4, 2, None)
    # The sbatch script names the coordinator itself; SLURM still gives the ranks.
    env = {**SLURM, "ZENJAX_COORDINATOR": "gpu007:29500"}
    assert detect(env=env) == Cluster("slurm", "gpu007:29500", 4, 2, None)


def test_slurm_tasks_sharing_a_node_get_one_device_each():
    env = {**SLURM, "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_LOCALID": "1",
           "ZENJAX_COORDINATOR_PORT": "1234"}
    assert detect(env=env) == Cluster("slurm", "gpu007:1234", 4, 2, (1,))


def test_slurm_batch_script_outside_srun_is_a_single_process():
    env = {k: v for k, v in SLURM.items() if not k.startswith("SLURM_STEP")}
    assert detect(env=env).kind == "single"


@pytest.mark.parametrize("nodelist", ["node001", "node001,host2", "node[001-0015],host2",
                                      "node[001,007-015]", "rack-a[3-4]"])
def test_slurm_first_host_matches_jax(monkeypatch, nodelist):
    from jax._src.clusters import SlurmCluster

    monkeypatch.setenv("SLURM_STEP_NODELIST", nodelist)
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    expected = SlurmCluster.get_coordinator_address(None, "8482")
    assert detect(env={**SLURM, "SLURM_STEP_NODELIST": nodelist}).coordinator == expected


def test_gke_jobset_coordinator_is_pod_zero_of_the_headless_service():
    env = {"JOBSET_NAME": "rl", "REPLICATED_JOB_NAME": "workers", "JOB_INDEX": "0",
           "JOB_COMPLETION_INDEX": "3", "ZENJAX_NUM_PROCESSES": "4"}
    assert detect(env=env) == Cluster("jobset", "rl-workers-0-0.rl:8482", 4, 3)
    with pytest.raises(ValueError, match="ZENJAX_NUM_PROCESSES"):
        detect(env={k: v for k, v in env.items() if k != "ZENJAX_NUM_PROCESSES"})
    with pytest.raises(ValueError, match="JOB_INDEX=1"):
        detect(env={**env, "JOB_INDEX": "1"})


def test_tpu_pod_leaves_the_rest_to_jax():
    assert detect(env={}, on_tpu=True) == Cluster("tpu", None, None, None)
    # Even on TPU, an explicit setting wins (jax then detects only what is missing).
    env = {"ZENJAX_COORDINATOR": "w0"}
    assert detect(env=env, on_tpu=True) == Cluster("tpu", "w0:8482", None, None)
