import gc
import inspect
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from tests.multiprocess_util import REPO, run_processes
from zenjax.checkpoint import Checkpointer, CheckpointError, install_signal_handlers

MESH = jax.make_mesh((4,), ("fsdp",), devices=jax.devices()[:4])
ONE = SingleDeviceSharding(jax.devices()[0])


def _on_mesh(x):
    return NamedSharding(MESH, P("fsdp") if x.ndim and x.shape[0] % 4 == 0 else P())


def _state(seed, sharding=_on_mesh):
    """Params (nnx.to_pure_dict layout: int keys for layer lists) and an AdamW state after an update."""
    rng = np.random.default_rng(seed)
    params = {"embed": {"embedding": rng.standard_normal((512, 256), np.float32)},
              "layers": {i: {"w": rng.standard_normal((32, 48), np.float32).astype(jnp.bfloat16),
                             "norm": rng.standard_normal((32,), np.float32)} for i in range(2)}}
    params = jax.tree.map(lambda x: jax.device_put(x, sharding(x)), params)
    tx = optax.adamw(1e-2)
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda x: jnp.sin(x.astype(jnp.float32)).astype(x.dtype), params)
    _, opt_state = tx.update(grads, opt_state, params)
    meta = {"step": seed, "rng": [seed, 7], "data": {"epoch": 1, "index": 17 * seed}}
    return params, opt_state, meta


def _abstract(tree, sharding=_on_mesh):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding(x)), tree)


def _assert_identical(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert np.asarray(g).tobytes() == np.asarray(w).tobytes()


def _saved(tmp_path, steps, **kwargs):
    ck = Checkpointer(tmp_path, save_every=1, **kwargs)
    for step in steps:
        assert ck.save(step, *_state(step))
    ck.close()
    return tmp_path / "checkpoints"


def _restore(workdir, sharding=_on_mesh):
    params, opt_state, _ = _state(0)
    ck = Checkpointer(workdir)
    try:
        return ck.restore(_abstract(params, sharding), _abstract(opt_state, sharding))
    finally:
        ck.close()


def _one(x):
    return ONE


@pytest.mark.parametrize("save_on,restore_on", [(_one, _on_mesh), (_on_mesh, _one)],
                         ids=["1_to_4_devices", "4_to_1_device"])
def test_round_trip_is_bit_identical_across_device_counts(tmp_path, save_on, restore_on):
    saved = _state(5, save_on)
    ck = Checkpointer(tmp_path)
    assert ck.save(50, *saved)
    ck.close()
    step, params, opt_state, meta = _restore(tmp_path, restore_on)
    assert step == 50 and meta == saved[2]
    _assert_identical((params, opt_state), saved[:2])
    assert isinstance(opt_state[0], optax.ScaleByAdamState) and int(opt_state[0].count) == 1
    requested = jax.tree.leaves(_abstract(saved[:2], restore_on))
    assert [x.sharding for x in jax.tree.leaves((params, opt_state))] == [x.sharding for x in requested]


def test_save_every_keep_and_force(tmp_path):
    ck = Checkpointer(tmp_path, keep=2, save_every=3)
    params, opt_state, meta = _state(1)
    saved = [step for step in range(1, 11) if ck.save(step, params, opt_state, meta)]
    assert saved == [3, 6, 9]
    assert ck.save(10, params, opt_state, meta, force=True)
    assert not ck.save(10, params, opt_state, meta, force=True)  # already there: nothing to do
    ck.close()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["10", "9"]
    assert _restore(tmp_path)[0] == 10


def test_async_save_owns_its_copy_once_save_returns(tmp_path):
    params, opt_state, meta = _state(3)
    want = jax.tree.map(np.asarray, (params, opt_state))
    ck = Checkpointer(tmp_path, save_every=1)
    assert ck.save(1, params, opt_state, meta)
    for x in jax.tree.leaves((params, opt_state)):
        x.delete()  # as a donating train step would
    ck.close()
    _, params, opt_state, _ = _restore(tmp_path)
    _assert_identical((params, opt_state), want)


def test_params_only_restore_and_optimizer_state_without_arrays(tmp_path):
    _saved(tmp_path / "adamw", [1])
    params, _, meta = _state(1)
    ck = Checkpointer(tmp_path / "adamw")
    step, got, no_opt_state, _ = ck.restore(_abstract(params), None)
    ck.close()
    assert step == 1 and no_opt_state is None
    _assert_identical(got, params)
    sgd_state = optax.sgd(0.1).init(params)  # nothing but EmptyState()s
    ck = Checkpointer(tmp_path / "sgd", save_every=1)
    assert ck.save(1, params, sgd_state, meta)
    ck.close()
    ck = Checkpointer(tmp_path / "sgd")
    step, got, got_sgd_state, got_meta = ck.restore(_abstract(params), sgd_state)
    ck.close()
    assert got_sgd_state == sgd_state and got_meta == meta
    _assert_identical(got, params)


def test_empty_workdir_restores_none_and_bad_arguments_are_named(tmp_path):
    assert _restore(tmp_path) is None
    params, opt_state, _ = _state(1)
    ck = Checkpointer(tmp_path, save_every=1)
    with pytest.raises(TypeError, match="meta must be JSON-serialisable"):
        ck.save(1, params, opt_state, {"rng": jax.random.key(0)})
    with pytest.raises(ValueError, match=r"abstract_params\['embed'\]\['embedding'\] has no sharding"):
        ck.restore(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params),
                   _abstract(opt_state))
    ck.close()


def _data_file(step_dir: Path) -> Path:
    """The file holding the embedding: by far the biggest array, random floats barely compress."""
    return max((p for p in (step_dir / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _truncate(step_dir):
    path = _data_file(step_dir)
    os.truncate(path, path.stat().st_size // 2)


def _flip_bit(step_dir):
    path = _data_file(step_dir)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(data)


@pytest.fixture
def abandoned_reads():
    """Orbax leaves the other reads of a failed restore unawaited, and they complain when collected:
    collect them here, under this test's filter, rather than during some later test."""
    yield
    gc.collect()


ABANDONED_READS = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

DAMAGE = {
    "truncated_data_file": _truncate,
    "deleted_data_files": lambda d: [p.unlink() for p in (d / "opt_state").rglob("d/*")],
    "missing_item": lambda d: shutil.rmtree(d / "opt_state"),
    "garbage_meta": lambda d: (d / "meta" / "metadata").write_text('{"step": 2, "rng'),
    # Still valid JSON, and the array checksums still hold: only the meta digest sees it.
    "changed_meta_digit": lambda d: (d / "meta" / "metadata").write_text(
        (d / "meta" / "metadata").read_text().replace('"index": 34', '"index": 35', 1)),
    "flipped_bit": _flip_bit,  # Orbax reads this back as is
}


@ABANDONED_READS
@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_latest_step_falls_back_to_the_previous_one(tmp_path, caplog, damage, abandoned_reads):
    ckpt_dir = _saved(tmp_path, [1, 2])
    DAMAGE[damage](ckpt_dir / "2")
    # A killed save at a later step leaves a temporary directory behind: never a candidate.
    shutil.copytree(ckpt_dir / "1", ckpt_dir / "3.orbax-checkpoint-tmp")
    shutil.rmtree(ckpt_dir / "3.orbax-checkpoint-tmp" / "opt_state")
    with caplog.at_level(logging.WARNING, logger="zenjax.checkpoint"):
        step, params, opt_state, meta = _restore(tmp_path)
    assert step == 1
    want = _state(1)
    _assert_identical((params, opt_state), want[:2])
    assert meta == want[2]
    warned = [r.getMessage() for r in caplog.records]
    assert any("step 2" in m for m in warned) and not any("step 3" in m for m in warned), warned
    # The damaged step is set aside, so training can go on and save step 2 again.
    assert [p.name.split("-")[0] for p in ckpt_dir.glob("2.corrupt-*")] == ["2.corrupt"]
    _saved(tmp_path, [2])
    _assert_identical(_restore(tmp_path)[1], _state(2)[0])


def test_a_step_saved_before_meta_checksums_still_resumes(tmp_path, caplog):
    """Checkpoints of runs started before the meta digest existed stay restorable (with a warning)."""
    ckpt_dir = _saved(tmp_path, [1, 2])
    sums = ckpt_dir / "2" / "checksums" / "metadata"
    sums.write_text(json.dumps({k: v for k, v in json.loads(sums.read_text()).items() if k != "meta"}))
    with caplog.at_level(logging.WARNING, logger="zenjax.checkpoint"):
        step, params, _, meta = _restore(tmp_path)
    assert step == 2 and meta == _state(2)[2]
    _assert_identical(params, _state(2)[0])
    assert any("predates meta checksums" in r.getMessage() for r in caplog.records)


def test_flipped_bit_is_caught_by_the_checksum_not_by_orbax(tmp_path):
    ckpt_dir = _saved(tmp_path, [1])
    DAMAGE["flipped_bit"](ckpt_dir / "1")
    params, _, _ = _state(0)
    plain = ocp.CheckpointManager(ckpt_dir).restore(1, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(_abstract(params))))["params"]
    differs = [not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(_state(1)[0]))]
    assert sum(differs) == 1  # silently wrong data: the case the checksums exist for
    with pytest.raises(CheckpointError, match=r"step 1: CheckpointError: params\[.*\] does not match"):
        _restore(tmp_path)


@ABANDONED_READS
def test_nothing_restorable_is_an_error_naming_every_step(tmp_path, abandoned_reads):
    ckpt_dir = _saved(tmp_path, [1, 2])
    DAMAGE["garbage_meta"](ckpt_dir / "2")
    DAMAGE["missing_item"](ckpt_dir / "1")
    with pytest.raises(CheckpointError, match=r"(?s)none of the checkpoints.*step 2: JSONDecodeError"
                                              r".*step 1: KeyError.*opt_state"):
        _restore(tmp_path)
    assert sorted(p.name for p in ckpt_dir.iterdir() if p.name[0].isdigit()) == ["1", "2"]


def child_state(step):  # a function of the step, so any restored step can be checked
    rng = np.random.default_rng(step)
    params = {"w": rng.standard_normal((256, 1024), np.float32), "b": np.full((1024,), step, np.int32)}
    return params, {"m": params["w"] * 2, "count": np.int32(step)}


CHILD = "import numpy as np\n" + inspect.getsource(child_state) + """
import itertools, sys, time
import jax
from zenjax.checkpoint import Checkpointer, install_signal_handlers

workdir, mode = sys.argv[1], sys.argv[2]
should_stop = install_signal_handlers()
ck = Checkpointer(workdir, keep=2, save_every=1 if mode == "kill" else 1000)
one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), child_state(0))
restored = ck.restore(*abstract)
start = 0
if restored:
    start, params, opt_state, meta = restored
    same = [np.array_equal(a, b) for a, b in zip(jax.tree.leaves((params, opt_state)),
                                                 jax.tree.leaves(child_state(start)))]
    assert meta == {"step": start} and all(same), "bad resume"
print("resumed", start, flush=True)
for step in itertools.count(start + 1):
    if mode == "term":
        time.sleep(0.02)  # a training step
        if should_stop():
            assert ck.save(step, *child_state(step), {"step": step}, force=True)
            ck.close()
            print("stopped at", step, flush=True)
            sys.exit(0)
        print("step", step, flush=True)
    else:
        print("saving", step, flush=True)
        ck.save(step, *child_state(step), {"step": step})
        print("saved", step, flush=True)
"""


def _start_child(tmp_path, mode):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "work"), mode],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    watchdog = threading.Timer(60, proc.kill)  # a hung child fails the test instead of hanging it
    watchdog.daemon = True
    watchdog.start()
    return proc


def _read_until(proc, prefix):
    lines = []
    while line := proc.stdout.readline():
        lines.append(line.rstrip())
        if line.startswith(prefix):
            return lines
    proc.wait()
    output = "\n".join(lines)[-4000:]
    raise AssertionError(f"child exited {proc.returncode} before printing {prefix!r}:\n{output}")


def _restore_child_work(tmp_path):
    one = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=ONE)
    ck = Checkpointer(tmp_path / "work")
    try:
        return ck.restore(*jax.tree.map(one, child_state(0)))
    finally:
        ck.close()


def test_killed_mid_save_resumes_from_the_latest_complete_step(tmp_path):
    # Each round restarts on the same workdir (checking its resume) and is SIGKILLed at another
    # moment of a save: while arrays are copied, while written in the background, or in between.
    moments = [("saving", 0.0), ("saved", 0.0), ("saved", 0.1)]
    committed, unfinished = 0, 0
    for trigger, delay in moments:
        proc = _start_child(tmp_path, "kill")
        resumed = int(_read_until(proc, "resumed")[-1].split()[1])
        assert resumed >= committed  # nothing committed is ever lost
        lines = _read_until(proc, f"{trigger} {resumed + 3}")
        time.sleep(delay)
        proc.kill()
        proc.wait()
        # save(n) begins by waiting for save(n - 1) to commit.
        committed = max(int(line.split()[1]) - 1 for line in lines if line.startswith("saved"))
        ckpt_dir = tmp_path / "work" / "checkpoints"
        unfinished += any(".orbax-checkpoint-tmp" in p.name for p in ckpt_dir.iterdir())
    step, params, opt_state, meta = _restore_child_work(tmp_path)
    assert step >= committed and meta == {"step": step}
    _assert_identical((params, opt_state), child_state(step))
    assert unfinished, "no kill caught a save in flight: the test tests nothing"


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    proc = _start_child(tmp_path, "term")
    _read_until(proc, "step 3")
    proc.send_signal(signal.SIGTERM)
    lines = _read_until(proc, "stopped at")
    assert proc.wait(timeout=30) == 0
    stopped = int(lines[-1].split()[-1])
    step, params, opt_state, meta = _restore_child_work(tmp_path)
    assert step == stopped and meta == {"step": stopped}
    _assert_identical((params, opt_state), child_state(stopped))


def test_signal_handler_flags_then_gives_way():
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        should_stop = install_signal_handlers((signal.SIGUSR1,))
        assert not should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert should_stop() and should_stop()
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # a second one would kill
    finally:
        signal.signal(signal.SIGUSR1, previous)


# Two processes of two devices each, arrays sharded across both: SIGTERM reaches process 1 only,
# yet both stop after the same step, save it together and restore it together.
MULTI = """
import os, signal, sys
import numpy as np
from zenjax.checkpoint import Checkpointer, install_signal_handlers
should_stop = install_signal_handlers()  # before jax.distributed hooks SIGTERM: must still work
from zenjax import distributed
distributed.initialize()
import jax
from jax.sharding import NamedSharding, PartitionSpec as P

pid = jax.process_index()
sharding = NamedSharding(jax.make_mesh((4,), ("fsdp",)), P("fsdp"))

def state(step):
    full = np.random.default_rng(step).standard_normal((8, 64), np.float32)
    put = lambda x: jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])
    return {"w": put(full)}, {"m": put(full * 2)}

ck = Checkpointer(sys.argv[1], save_every=1000)
for step in range(1, 50):
    if step == 3 and pid == 1:
        os.kill(os.getpid(), signal.SIGTERM)
    if should_stop():
        assert ck.save(step, *state(step), {"step": step}, force=True)
        break
abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state(0))
restored_step, params, opt_state, meta = ck.restore(*abstract)
ck.close()
shards = zip(params["w"].addressable_shards, state(step)[0]["w"].addressable_shards)
same = all(np.array_equal(a.data, b.data) for a, b in shards)
print("process", pid, "stopped at", step, "restored", restored_step, meta, same, flush=True)
"""


def test_two_processes_stop_together_and_checkpoint_collectively(tmp_path):
    script = tmp_path / "multi.py"
    script.write_text(MULTI)
    r = run_processes(["python", str(script), str(tmp_path / "work")], tmp_path / "logs", timeout=120)
    assert r.returncode == 0 and r.statuses == {0: 0, 1: 0}, r.report()
    for pid in (0, 1):
        assert f"process {pid} stopped at 3 restored 3 {{'step': 3}} True" in r.logs[pid], r.report()
    # Saved across 4 devices of 2 processes, restored here on one.
    ck = Checkpointer(tmp_path / "work")
    full = np.random.default_rng(3).standard_normal((8, 64), np.float32)
    abstract = {"w": jax.ShapeDtypeStruct((8, 64), np.float32, sharding=ONE)}
    step, params, opt_state, _ = ck.restore(abstract, {"m": abstract["w"]})
    ck.close()
    assert step == 3 and np.array_equal(params["w"], full) and np.array_equal(opt_state["m"], full * 2)
