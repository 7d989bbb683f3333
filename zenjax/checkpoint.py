"""Training checkpoints that resume exactly or fail loudly, and clean stops on preemption.

`<workdir>/checkpoints/<step>/` holds four Orbax items: `params` (the pure dict of the nnx.Param
values), `opt_state`, `meta` (the trainer's small JSON: the data-iterator state) and `checksums` (a
fingerprint of every array, and a digest of the step and its meta, which with the config's seed
give the step's random keys). Orbax commits a step atomically (a temporary directory renamed when
complete; a commit marker on GCS), so a killed or failed save never shows up as a step. What can
still go wrong is a committed step damaged later (lost or truncated files, bit rot that Orbax
reads back without complaint): `restore` checks everything it restores against the checksums and
falls back to the previous step, setting the bad ones aside. A save that fails in Orbax's
background threads (a full disk) is raised by the next `save` call, as a storage.WriteError.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from zenjax import cli, storage

log = logging.getLogger(__name__)
# How long a checkpoint write may still take once a stop signal came: it is the run's last save.
SAVE_PATIENCE_S = 300.0


class CheckpointError(cli.UserError):
    """Checkpoints exist but none of them can be restored (one line, exit status 2, like a user error)."""


class _QuietOrbaxErrors(logging.Filter):
    """Orbax logs each failure of its background threads with a traceback (hundreds of lines for one full disk),
    asyncio each read a failed restore abandoned; the Checkpointer raises or reports the failure itself."""

    def filter(self, record):
        if record.levelno < logging.ERROR:
            return True
        trace = logging.Formatter().formatException(record.exc_info) if record.exc_info else ""
        return f"{os.sep}orbax{os.sep}" not in record.pathname + record.getMessage() + trace


for _name in ("absl", "asyncio"):
    logging.getLogger(_name).addFilter(_QuietOrbaxErrors())


def _quiet_abandoned_reads(unraisable, previous=sys.unraisablehook):
    # A restore that fails leaves its other TensorStore reads running; when they finish, their
    # callbacks find Orbax's event loop closed: one traceback each, about nothing that matters.
    if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
        previous(unraisable)


sys.unraisablehook = _quiet_abandoned_reads
warnings.filterwarnings("ignore", r"coroutine '.*' was never awaited", RuntimeWarning)  # the same reads, at exit


def frozen_reference(workdir: str | epath.PathLike, params, abstract_params):
    """The KL penalty's reference policy, saved once at `<workdir>/reference` (atomically, like a step) and
    restored from there afterwards: a resumed run keeps the policy that RL started from, not the resumed one."""
    path = epath.Path(workdir) / "reference"
    with ocp.StandardCheckpointer() as ckptr:
        if path.exists():
            return ckptr.restore(path, abstract_params)
        ref = jax.tree.map(jnp.copy, params)  # a copy: the update donates the live parameters' buffers
        with storage.writing(str(path), SAVE_PATIENCE_S):
            ckptr.save(path, ref)
            ckptr.wait_until_finished()
    return ref


class Checkpointer:
    """Saves (asynchronously, every `save_every` steps, keeping the last `keep`) and restores.

    Every process must make the same calls: saving and restoring are collective.
    """

    def __init__(self, workdir: str | epath.PathLike, *, keep: int = 3, save_every: int = 50,
                 async_save: bool = True):
        if keep < 1 or save_every < 1:
            raise ValueError(f"keep and save_every must be >= 1, got keep={keep}, "
                             f"save_every={save_every}")
        self.directory = epath.Path(workdir) / "checkpoints"
        self.save_every = save_every
        self._manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # what killed saves left behind
            # Process 0 lists the steps for all: on an eventually consistent store (GCS)
            # processes listing for themselves could disagree on the latest step.
            single_host_load_and_broadcast=True,
        ))

    def save(self, step: int, params, opt_state, meta: dict[str, Any], *,
             force: bool = False) -> bool:
        """Starts saving when `step % save_every == 0` or `force`; False when it does not save.

        Returns once the arrays are copied off the devices, so the caller may then donate or
        overwrite them; the write finishes in the background (see `wait`). Call it every step:
        it raises (on every process) the storage.WriteError of a background save that failed.
        """
        self._raise_failed_save()
        if not (force or step % self.save_every == 0):
            return False
        if step in self._manager.all_steps():
            return False  # e.g. the forced final save right after a periodic one
        try:
            json.dumps(meta)
        except (TypeError, ValueError) as e:
            raise TypeError(f"checkpoint meta must be JSON-serialisable: {e}") from None
        checksums = {"params": _fingerprints(params), "opt_state": _fingerprints(opt_state),
                     "meta": _digest(step, meta)}
        items = {"params": ocp.args.StandardSave(params), "meta": ocp.args.JsonSave(meta),
                 "checksums": ocp.args.JsonSave(checksums)}
        if jax.tree.leaves(opt_state):  # Orbax refuses an item without arrays (plain SGD's state)
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        with storage.writing(str(self.directory), SAVE_PATIENCE_S):  # it first waits for the previous save
            return self._manager.save(step, force=True, args=ocp.args.Composite(**items))

    def _raise_failed_save(self) -> None:
        """A finished background save's failure, raised on every process (they stop together)."""
        failed = None
        if not self._manager.is_saving_in_progress():
            try:
                self.wait()  # returns at once: nothing is in flight
            except storage.WriteError as e:
                failed = e
        if _gather(failed is not None).any():
            raise failed or storage.WriteError(f"a checkpoint save in {self.directory} failed on another process: "
                                               "see its log; free space or fix the mount, then rerun to resume")

    def restore(self, abstract_params, abstract_opt_state):
        """(step, params, opt_state, meta) of the latest step that restores intact, else None.

        Arrays land directly in the shardings of the abstract trees (jax.ShapeDtypeStruct with
        `.sharding`), whatever the device count at save time. `abstract_opt_state=None` restores
        no optimizer state (returned as None). A damaged step is skipped with a warning and
        renamed `<step>.corrupt-<time>`; if checkpoints exist but none restores, raises
        CheckpointError. None only when there is no checkpoint at all.
        """
        _require_shardings(abstract_params, "abstract_params")
        _require_shardings(abstract_opt_state, "abstract_opt_state")
        self._manager.wait_until_finished()
        self._manager.reload()
        bad: list[tuple[int, Exception]] = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                restored, error = self._restore_step(step, abstract_params, abstract_opt_state), None
            except Exception as e:  # whatever the damage, the previous step may be intact
                restored, error = None, e
            restored_everywhere = _gather(error is None).all()
            if error is None and not restored_everywhere:
                error = CheckpointError("it failed to restore on another process")
            if error is not None:
                bad.append((step, error))
                continue
            if bad:
                self._set_aside(bad, step)
            log.info("restored checkpoint step %d from %s", step, self.directory)
            return restored
        if bad:
            raise CheckpointError(
                f"none of the checkpoints in {self.directory} can be restored ("
                + "; ".join(f"step {s}: {_brief(e)}" for s, e in bad)
                + f"): move {self.directory} aside to train from the start, or pass another --workdir") from None
        return None

    def wait(self) -> None:
        """Blocks until saves in flight are committed; raises what a background save raised (a write
        failure as a storage.WriteError)."""
        with storage.writing(str(self.directory), SAVE_PATIENCE_S):
            self._manager.wait_until_finished()

    def close(self) -> None:
        with storage.writing(str(self.directory), SAVE_PATIENCE_S):
            self._manager.close()

    def _restore_step(self, step, abstract_params, abstract_opt_state):
        items = {"params": ocp.args.StandardRestore(abstract_params),
                 "meta": ocp.args.JsonRestore(), "checksums": ocp.args.JsonRestore()}
        if jax.tree.leaves(abstract_opt_state):
            items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        for name in ("params", "opt_state"):
            if name in items:
                _verify(restored[name], restored["checksums"][name], name)
        digest = restored["checksums"].get("meta")
        if digest is None:  # written before meta was fingerprinted: still a run the user wants to resume
            log.warning("checkpoint step %d predates meta checksums: its data position is restored unverified", step)
        elif digest != _digest(step, restored["meta"]):
            raise CheckpointError("meta does not match its checksum: the data is damaged")
        # Without arrays (None, or plain SGD's state) the abstract tree is the value.
        opt_state = restored["opt_state"] if "opt_state" in items else abstract_opt_state
        return step, restored["params"], opt_state, restored["meta"]

    def _set_aside(self, bad: Sequence[tuple[int, Exception]], restored: int) -> None:
        # Renamed rather than deleted: a step that failed for a passing reason can be recovered
        # by hand. Out of the way, it is neither the converter's "latest" nor blocks a new save.
        # One warning line per step, as the error says what is wrong and where it went.
        if jax.process_index() == 0:
            for step, error in bad:
                path = self.directory / str(step)
                aside = path.parent / f"{step}.corrupt-{int(time.time())}"
                try:
                    path.rename(aside)
                    log.warning("checkpoint step %d cannot be restored (%s): moved to %s; using step %d",
                                step, _brief(error), aside, restored)
                except OSError as e:  # restoring the good step still counts; say what is left over
                    log.warning("checkpoint step %d cannot be restored (%s) nor moved aside (%s): remove %s "
                                "by hand, or it stays the 'latest' step until newer ones replace it; using "
                                "step %d", step, _brief(error), e, path, restored)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("zenjax.checkpoint.set_aside")
        self._manager.reload()


def install_signal_handlers(signals=(signal.SIGTERM, signal.SIGINT)) -> Callable[[], bool]:
    """Makes SIGTERM/SIGINT ask for a clean stop; returns `should_stop()` for the loop to poll.

    Once it returns True, save with `force=True`, `close()` and exit. With several processes
    `should_stop()` is a collective, so call it at the same point of every step on every
    process: it turns True on all of them once any one was signalled, so all stop after the same
    step. A second signal gets the previous behaviour (Ctrl-C twice kills); a write that hangs past
    its patience ends the process (storage.exit_if_blocked).
    """
    received: list[int] = []

    def handle(signum, frame):
        received.append(signum)
        signal.signal(signum, previous[signum] or signal.SIG_DFL)
        log.warning("received %s: stopping after this step", signal.Signals(signum).name)
        storage.exit_if_blocked(signum)

    def should_stop() -> bool:
        for s in signals:
            if s not in received:  # take it back: jax.distributed.initialize hooks SIGTERM
                signal.signal(s, handle)
        return bool(_gather(bool(received)).any())

    storage.stop_watching()
    previous = {s: signal.signal(s, handle) for s in signals}
    should_stop.received = received  # which signal stopped the run: its exit status
    return should_stop


def _gather(flag: bool) -> np.ndarray:
    """Every process's flag."""
    if jax.process_count() == 1:
        return np.array([flag])
    return np.asarray(multihost_utils.process_allgather(np.array(flag)))


@jax.jit
def _fingerprint(x: jax.Array) -> jax.Array:
    # Position-weighted sum of the raw bits modulo 2**32: odd weights are invertible, so any one
    # changed element changes it, and integer sums do not depend on how the array is sharded.
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    elif x.dtype.itemsize >= 4:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)  # 8-byte types gain a trailing 2
    else:
        bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}"))
        bits = bits.astype(jnp.uint32)
    index, stride = jnp.zeros(bits.shape, jnp.uint32), 1
    for dim in reversed(range(bits.ndim)):  # flat index without a reshape that would reshard
        index += jax.lax.broadcasted_iota(jnp.uint32, bits.shape, dim) * jnp.uint32(stride % 2**32)
        stride *= bits.shape[dim]
    return jnp.sum(bits * (2 * index + 1), dtype=jnp.uint32)


def _fingerprints(tree) -> dict[str, list]:
    """{key path: [dtype, fingerprint]} of every array in the tree."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    sums = [_fingerprint(x) for _, x in leaves]  # dispatch all before waiting for any
    return {jax.tree_util.keystr(path): [str(x.dtype), int(s.addressable_data(0))]
            for (path, x), s in zip(leaves, sums)}


def _digest(step: int, meta: dict) -> str:
    return hashlib.sha256(json.dumps([int(step), meta], sort_keys=True).encode()).hexdigest()


def _verify(tree, saved: dict[str, list], item: str) -> None:
    for path, (dtype, value) in _fingerprints(tree).items():
        if path not in saved:
            raise CheckpointError(f"{item}{path} has no saved checksum")
        saved_dtype, saved_value = saved[path]
        # An array restored into another dtype was converted: its bits cannot match.
        if saved_dtype == dtype and saved_value != value:
            raise CheckpointError(f"{item}{path} does not match its checksum: the data is damaged")


def _brief(error: Exception) -> str:
    # TensorStore errors go on to print the whole array spec.
    lines = str(error).strip().splitlines() or [""]
    return f"{type(error).__name__}: {lines[0][:300]}"


def _require_shardings(tree, name: str) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if getattr(leaf, "sharding", None) is None:
            raise ValueError(f"{name}{jax.tree_util.keystr(path)} has no sharding: restore needs "
                             "jax.ShapeDtypeStruct leaves with .sharding (jax.eval_shape + rules)")
