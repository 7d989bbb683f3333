"""A full or failing disk stops a run at once with one line and exit status 2, keeping the last complete checkpoint,
and the same command then resumes exactly; a stop signal ends a run whose write hangs; what a resume reads is verified.

The workdir is on a small tmpfs (the test host runs as root, as CI does; elsewhere these tests are skipped). The
checkpoint writer fills it for real. The metrics and TensorBoard appends get an injected ENOSPC instead: an append to
a small file on a full tmpfs only fails when it needs a new page, so a real one could not be timed to a given write.
"""
import errno
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import nano as nano_config
from tests.multiprocess_util import REPO
from tests.test_metrics import _events
from tests.test_train import _comparable, _params, _tiny
from zenjax import metrics, storage, train
from zenjax.checkpoint import Checkpointer
from zenjax.metrics import read

STEPS = 3
FIX = "free space, then rerun the same command to resume, or pass another --workdir"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: every resume below must end equal to it."""
    workdir = tmp_path_factory.mktemp("reference")
    train.train(_tiny(nano_config, STEPS), str(workdir))
    return workdir


def _assert_same_run(workdir, reference):
    assert _comparable(read(str(workdir))) == _comparable(read(str(reference)))
    jax.tree.map(np.testing.assert_array_equal, _params(workdir, STEPS), _params(reference, STEPS))


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "fs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here (root or CAP_SYS_ADMIN needed): {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(fs):
    with open(fs / "filler", "ab") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC


def _no_space_on(target):
    """metrics' `open`, failing an append to a path containing `target` as a full disk does."""
    def fake(path, mode="r", *args, **kwargs):
        if target in str(path) and mode.startswith("a"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return open(path, mode, *args, **kwargs)
    return fake


def test_a_full_disk_at_each_writer_stops_at_once_and_the_same_run_resumes_exactly(reference, small_fs, monkeypatch):
    workdir = small_fs / "run"
    config = _tiny(nano_config, STEPS)

    # The disk fills before the final save: Orbax writes it in the background, the wait after the loop raises.
    save = Checkpointer.save

    filled = []

    def fill_before_the_last_save(self, step, *args, **kwargs):
        if step == STEPS:
            _fill(small_fs)
            filled.append(time.monotonic())
        return save(self, step, *args, **kwargs)

    monkeypatch.setattr(Checkpointer, "save", fill_before_the_last_save)
    with pytest.raises(storage.WriteError) as e:
        train.train(config, str(workdir))
    assert time.monotonic() - filled[0] < 30  # from the failing write, not the run's start
    assert str(e.value) == f"no space left on device in {workdir}/checkpoints: {FIX}"
    # The last complete checkpoint is as it was written; the failed one left no step behind.
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())[-1] == str(STEPS - 1)
    jax.tree.map(np.testing.assert_array_equal, _params(workdir, STEPS - 1), _params(reference, STEPS - 1))
    monkeypatch.undo()
    (small_fs / "filler").unlink()

    # A metrics line, then a TensorBoard event, fail to be appended: each stops the step it belongs to.
    for target, path in (("metrics.jsonl", f"{workdir}/metrics.jsonl"), ("tfevents", f"{workdir}/tb/events\\S+")):
        with monkeypatch.context() as m:
            m.setattr(metrics, "open", _no_space_on(target), raising=False)
            with pytest.raises(storage.WriteError, match=f"^no space left on device in {path}: {FIX}$"):
                train.train(config, str(workdir))

    hist = train.train(config, str(workdir))
    assert [h["step"] for h in hist] == [STEPS]
    _assert_same_run(workdir, reference)
    # Four runs wrote TensorBoard events; each step is there once, as in the uninterrupted run.
    assert _events(workdir / "tb") == _events(reference / "tb")
    # A run with no steps left still draws the report.
    (workdir / "report.png").unlink()
    assert train.train(config, str(workdir)) == [] and (workdir / "report.png").exists()


def _meta_digit(workdir):
    path = workdir / "checkpoints" / str(STEPS) / "meta" / "metadata"
    text = path.read_text()
    position = re.search(r'"next_index": (\d+)', text)  # the data position: training would go on elsewhere
    changed = str(int(position.group(1)) + 1)
    path.write_text(text[:position.start(1)] + changed + text[position.end(1):])


def _manifest(workdir):
    (workdir / "checkpoints" / str(STEPS) / "opt_state" / "manifest.ocdbt").write_bytes(b"\x17" * 40)


def _torn_middle_line(workdir):
    # The restored step is 1 (the later checkpoints are gone), so the torn step-2 line is one the run rewrites.
    for step in (2, 3):
        shutil.rmtree(workdir / "checkpoints" / str(step))
    path = workdir / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + lines[1][:len(lines[1]) // 2] + "\n" + "".join(lines[2:]))


@pytest.mark.parametrize("damage,restored,warning", [
    (_meta_digit, 2, "checkpoint step 3 cannot be restored (CheckpointError: meta does not match its checksum"),
    (_manifest, 2, "checkpoint step 3 cannot be restored (ValueError: DATA_LOSS"),
    (_torn_middle_line, 1, "line(s) 2 are damaged"),
], ids=["changed_meta_digit", "damaged_manifest", "torn_middle_metrics_line"])
def test_damage_is_one_warning_and_an_exact_resume(reference, tmp_path, caplog, damage, restored, warning):
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    damage(workdir)
    with caplog.at_level(logging.WARNING):
        hist = train.train(_tiny(nano_config, STEPS), str(workdir))
    assert hist[0]["step"] == restored + 1
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1 and warning in warned[0], warned
    _assert_same_run(workdir, reference)


class _Cli:
    """`python -m zenjax.train` as a user runs it (the reference run's config), in the background."""

    def __init__(self, workdir, logs, steps=STEPS):
        config = {"steps": steps, "rl.sft_steps": 2, "rl.prompts_per_step": 4, "rl.group_size": 4,
                  "rl.minibatches": 2, "eval_every": 2, "checkpoint_every": 1}
        cmd = [sys.executable, "-m", "zenjax.train", "--config=configs/nano.py:tiny", f"--workdir={workdir}",
               *(f"--config.{k}={v}" for k, v in config.items())]
        self.stderr = logs / f"stderr{len(list(logs.iterdir()))}.txt"
        with open(self.stderr, "w") as err:  # a file, not a pipe: the progress bar must never block on it
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err,
                                         env={**os.environ, "PYTHONPATH": str(REPO)})

    def wait_for(self, condition, timeout=120):
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.proc.poll() is None, self.stderr.read_text()
            assert time.monotonic() < deadline, "the run did not get there in time"
            time.sleep(0.05)

    def end(self, timeout):
        """(seconds it took to exit, its stderr), the process killed if it took longer than `timeout`."""
        t0 = time.monotonic()
        try:
            self.proc.wait(timeout)
        finally:
            self.proc.kill()
        return time.monotonic() - t0, self.stderr.read_text()


def _last_line(stderr):
    """The last line a terminal shows (the progress bar redraws with carriage returns)."""
    return [line for line in re.split(r"[\r\n]", stderr) if line.strip()][-1]


def test_the_cli_on_a_full_disk_and_with_every_checkpoint_damaged(small_fs, tmp_path):
    workdir, logs = small_fs / "run", tmp_path / "logs"
    logs.mkdir()

    # The disk fills after the first step: whichever write comes next fails.
    run = _Cli(workdir, logs)
    run.wait_for(lambda: (workdir / "metrics.jsonl").exists() and len(read(str(workdir))) >= 1)
    _fill(small_fs)
    took, err = run.end(timeout=60)
    assert took < 30 and run.proc.returncode == 2, err
    assert "Traceback" not in err and err.count("error:") == 1, err
    assert re.fullmatch(f"error: no space left on device in {workdir}/(checkpoints|metrics.jsonl|tb/\\S+): {FIX}",
                        _last_line(err)), err
    (small_fs / "filler").unlink()

    # Every checkpoint's arrays damaged: one line, exit status 2 (before, the reads each failed restore abandons
    # printed a traceback apiece at exit).
    steps = [p for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    assert steps
    for data_file in (f for step in steps for f in step.glob("*/d/*")):
        data_file.write_bytes(b"garbage")
    run = _Cli(workdir, logs)
    _, err = run.end(timeout=120)
    assert run.proc.returncode == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: none of the checkpoints in {workdir}/checkpoints can be restored (step"), err
    assert err.rstrip().endswith(f"move {workdir}/checkpoints aside to train from the start, or pass another --workdir")


# A write that never returns (a FIFO nobody reads, as a write to a dead mount): the main thread cannot get out of it
# to stop after its step, so the stop signal's watchdog ends the process.
BLOCKED = """
import os, sys
from zenjax.checkpoint import install_signal_handlers
from zenjax.metrics import MetricsWriter

workdir = sys.argv[1]
should_stop = install_signal_handlers()
writer = MetricsWriter(workdir, total_steps=10)
writer.write(1, {"reward_mean": 0.5})
os.mkfifo(workdir + "/fifo")
os.replace(workdir + "/fifo", workdir + "/metrics.jsonl")
print("writing", flush=True)
writer.write(2, {"reward_mean": 0.5})
print("returned", flush=True)
"""


def test_sigterm_ends_a_process_blocked_in_a_write(tmp_path):
    (tmp_path / "blocked.py").write_text(BLOCKED)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "blocked.py"), str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout.readline() == "writing\n", proc.communicate()
        time.sleep(0.5)  # into the write
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM and "returned" not in out, err
    assert time.monotonic() - t0 < 10  # the writers' patience is 5 s
    assert re.fullmatch(f"error: stopping: a write to {tmp_path}/metrics.jsonl has not returned for \\d+ s; exiting "
                        "without it \\(the last complete checkpoint is kept\\): check the disk or mount",
                        err.strip().splitlines()[-1]), err
