"""Multi-process start-up: one call that works on a laptop, a TPU pod, SLURM and GKE.

Precedence: explicit arguments > ZENJAX_* variables > what the cluster environment says.
Call `initialize()` before any other JAX call (jax refuses once a backend exists).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax

log = logging.getLogger(__name__)

DEFAULT_PORT = 8482  # the port jax itself uses on TPU pods
# jax declares a process dead after this many seconds without heartbeats and aborts the rest.
HEARTBEAT_TIMEOUT_S = 100
# A process that ends (or raises) waits this long at the shutdown barrier for the others.
SHUTDOWN_TIMEOUT_S = 300
INIT_TIMEOUT_S = 300


class Cluster(NamedTuple):
    kind: str  # "single", "env" (explicit), "tpu", "slurm", "jobset", "initialized"
    coordinator: str | None
    num_processes: int | None
    process_id: int | None
    local_device_ids: tuple[int, ...] | None = None


def _int(value, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _with_port(address: str, env: Mapping[str, str]) -> str:
    if re.search(r":\d+$", address):
        return address
    return f"{address}:{env.get('ZENJAX_COORDINATOR_PORT', DEFAULT_PORT)}"


def _first_slurm_host(nodelist: str) -> str:
    # "node[003-010,012],gpu7" -> "node003", as `scontrol show hostnames | head -1` says.
    m = re.match(r"([^,\[]+)(?:\[([^,\-\]]+))?", nodelist)
    if not m:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    return m.group(1) + (m.group(2) or "")


def _from_slurm(env: Mapping[str, str]) -> Cluster:
    nodelist = env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"]
    per_node = re.findall(r"(\d+)(?:\(x\d+\))?", env.get("SLURM_STEP_TASKS_PER_NODE", "1"))
    # Tasks sharing a node share its GPUs: give each its own one, as jax does under SLURM.
    local = (int(env["SLURM_LOCALID"]),) if max(map(int, per_node)) > 1 else None
    return Cluster("slurm", _first_slurm_host(nodelist), int(env["SLURM_STEP_NUM_TASKS"]),
                   int(env["SLURM_PROCID"]), local)


def _from_jobset(env: Mapping[str, str]) -> Cluster:
    if _int(env.get("JOB_INDEX"), "JOB_INDEX"):
        raise ValueError("outside TPU, zenjax derives process ids for one Job per JobSet "
                         f"(replicas: 1); got JOB_INDEX={env['JOB_INDEX']}: set ZENJAX_PROCESS_ID")
    name, job = env["JOBSET_NAME"], env.get("REPLICATED_JOB_NAME")
    if not job:
        raise ValueError("JOBSET_NAME is set but REPLICATED_JOB_NAME is not: pass the pod label "
                         "jobset.sigs.k8s.io/replicatedjob-name (see launch/gke_jobset.yaml)")
    # Pod 0 of job 0, behind the JobSet's headless service (named like the JobSet by default).
    return Cluster("jobset", f"{name}-{job}-0-0.{name}", None, int(env["JOB_COMPLETION_INDEX"]))


def _on_tpu_pod(env: Mapping[str, str]) -> bool:
    from jax._src import cloud_tpu_init  # flag set when jax was imported on a TPU VM

    if not cloud_tpu_init.running_in_cloud_tpu_vm:
        return False
    # jax finds the workers from these variables (GKE) or from the GCE metadata server.
    return ("TPU_WORKER_HOSTNAMES" in env or "TPU_PROCESS_ADDRESSES" in env
            or "TPU_SKIP_MDS_QUERY" not in env)


def detect(coordinator: str | None = None, num_processes: int | None = None,
           process_id: int | None = None, env: Mapping[str, str] | None = None,
           on_tpu: bool = False) -> Cluster:
    """Decides how this process joins the job, without starting anything."""
    env = os.environ if env is None else env
    explicit = {
        "coordinator": coordinator or env.get("ZENJAX_COORDINATOR") or None,
        "num_processes": num_processes if num_processes is not None
        else _int(env.get("ZENJAX_NUM_PROCESSES"), "ZENJAX_NUM_PROCESSES"),
        "process_id": process_id if process_id is not None
        else _int(env.get("ZENJAX_PROCESS_ID"), "ZENJAX_PROCESS_ID"),
    }
    if explicit["coordinator"]:
        explicit["coordinator"] = _with_port(explicit["coordinator"], env)
    if explicit["num_processes"] == 1:
        return Cluster("single", None, 1, 0)
    if on_tpu:  # jax fills whatever is unset from the TPU environment
        return Cluster("tpu", **explicit)
    if "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:  # inside `srun` only
        base = _from_slurm(env)
    elif "JOBSET_NAME" in env and "JOB_COMPLETION_INDEX" in env:
        base = _from_jobset(env)
    elif all(v is None for v in explicit.values()):
        return Cluster("single", None, 1, 0)
    else:
        base = Cluster("env", None, None, None)
    c = base._replace(**{k: v for k, v in explicit.items() if v is not None})
    missing = [f"ZENJAX_{k.upper()} (--{k})" for k in explicit if getattr(c, k) is None]
    if missing:
        raise ValueError(f"multi-process run ({c.kind}) is missing {', '.join(missing)} "
                         "(ZENJAX_NUM_PROCESSES=1 runs a single process)")
    if c.num_processes == 1:
        return Cluster("single", None, 1, 0)
    if not 0 <= c.process_id < c.num_processes:
        raise ValueError(f"process id {c.process_id} is outside [0, {c.num_processes})")
    return c._replace(coordinator=_with_port(c.coordinator, env))


def _seconds(value: int | None, name: str, default: int) -> int:
    if value is not None:
        return value
    return _int(os.environ.get(name), name) or default


def skip_absent_tpu() -> None:
    """On a host with no TPU chips and no other accelerator, use the CPU without first trying libtpu (installed
    to compile TPU programs here), which would print its failure at every start. Call before any JAX work."""
    from jax._src import cloud_tpu_init, xla_bridge  # what jax found at import: chips, and backends to try

    if os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms or cloud_tpu_init.running_in_cloud_tpu_vm:
        return
    if set(xla_bridge._backend_factories) <= {"cpu", "tpu"}:
        jax.config.update("jax_platforms", "cpu")


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: Sequence[int] | None = None,
               *, heartbeat_timeout_s: int | None = None, shutdown_timeout_s: int | None = None,
               init_timeout_s: int | None = None) -> Cluster:
    """Joins the multi-process job if there is one; a plain run is left untouched.

    Timeouts default to $ZENJAX_HEARTBEAT_TIMEOUT / $ZENJAX_SHUTDOWN_TIMEOUT / $ZENJAX_INIT_TIMEOUT
    (seconds). When a process dies, jax aborts the others once its heartbeats stop (at once if it
    was process 0, the coordinator) with "Terminating process because the JAX distributed service
    detected fatal errors". A process that raises waits at the shutdown barrier, then all abort.
    """
    from jax._src import distributed as jax_distributed

    if jax.distributed.is_initialized():
        s = jax_distributed.global_state
        return Cluster("initialized", s.coordinator_address, s.num_processes, s.process_id)
    cluster = detect(coordinator, num_processes, process_id, on_tpu=_on_tpu_pod(os.environ))
    if cluster.kind == "single":
        return cluster
    if local_device_ids is not None:
        cluster = cluster._replace(local_device_ids=tuple(local_device_ids))
    # CPU-only processes need a transport for cross-process collectives (unused on TPU/GPU).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        cluster.coordinator, cluster.num_processes, cluster.process_id,
        list(cluster.local_device_ids) if cluster.local_device_ids else None,
        # SLURM/JobSet are resolved above; jax's own guess would pin one GPU per host.
        cluster_detection_method=None if cluster.kind == "tpu" else "deactivate",
        initialization_timeout=_seconds(init_timeout_s, "ZENJAX_INIT_TIMEOUT", INIT_TIMEOUT_S),
        heartbeat_timeout_seconds=_seconds(heartbeat_timeout_s, "ZENJAX_HEARTBEAT_TIMEOUT",
                                           HEARTBEAT_TIMEOUT_S),
        shutdown_timeout_seconds=_seconds(shutdown_timeout_s, "ZENJAX_SHUTDOWN_TIMEOUT",
                                          SHUTDOWN_TIMEOUT_S),
    )
    s = jax_distributed.global_state
    cluster = cluster._replace(coordinator=s.coordinator_address, num_processes=s.num_processes,
                               process_id=s.process_id)
    log.info("joined %s job as process %d of %d (coordinator %s)", cluster.kind,
             cluster.process_id, cluster.num_processes, cluster.coordinator)
    return cluster


def is_main_process() -> bool:
    """True on the process that writes logs, metrics and one-off files."""
    return jax.process_index() == 0
