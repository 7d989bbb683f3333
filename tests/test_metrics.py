"""metrics.jsonl and the TensorBoard events survive a kill mid-append, damage and resumes (each step once); the progress
bar starts with the first step, not during start-up."""
import glob
import json
import logging
import struct

import pytest
from tensorboardX.proto import event_pb2

from zenjax import metrics


def _write(workdir, steps):
    w = metrics.MetricsWriter(str(workdir), total_steps=10)
    for s in steps:
        w.write(s, {"reward_mean": s / 10})
    w.close()


def test_a_line_torn_by_a_kill_is_dropped_on_resume(tmp_path):
    _write(tmp_path, [1, 2, 3])
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "reward_m')  # the process died inside this append
    assert [r["step"] for r in metrics.read(str(tmp_path))] == [1, 2, 3]
    w = metrics.MetricsWriter(str(tmp_path), total_steps=10, start_step=2)  # resumed from the step-2 checkpoint
    w.write(3, {"reward_mean": 0.5})
    w.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["reward_mean"] == 0.5


def test_a_damaged_line_before_the_last_is_an_error(tmp_path):
    _write(tmp_path, [1, 2])
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "metrics.jsonl").write_text("\n".join([lines[0][:5], lines[1]]) + "\n")
    with pytest.raises(ValueError, match="line 1 is not JSON"):
        metrics.read(str(tmp_path))


def test_a_damaged_line_anywhere_is_set_aside_on_resume(tmp_path, caplog):
    _write(tmp_path, [1, 2, 3, 4])
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[1] = lines[1][:9] + "\n"  # step 2's line, cut in the middle of the file
    (tmp_path / "metrics.jsonl").write_text("".join(lines))
    with caplog.at_level(logging.WARNING):
        metrics.MetricsWriter(str(tmp_path), total_steps=10, start_step=1).close()  # resumed from step 1
    assert len(caplog.records) == 1 and "line(s) 2 are damaged" in caplog.records[0].getMessage()
    assert [r["step"] for r in metrics.read(str(tmp_path))] == [1]  # steps 2.. are written again by the run
    (aside,) = glob.glob(str(tmp_path / "metrics.jsonl.damaged-*"))
    assert open(aside).read() == lines[1]


def _events(tb_dir):
    """(step, tag) of every scalar in the directory's event files, read as TensorBoard reads them."""
    out = []
    for path in sorted(glob.glob(f"{tb_dir}/*tfevents*")):
        data = open(path, "rb").read()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack_from("<Q", data, pos)
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            out += [(event.step, v.tag) for v in event.summary.value]
            pos += 12 + n + 4
    return out


def test_tensorboard_holds_each_step_once_across_resumes(tmp_path):
    _write(tmp_path, [1, 2, 3])
    w = metrics.MetricsWriter(str(tmp_path), total_steps=10, start_step=1)  # resumed from step 1: 2 and 3 again
    for s in (2, 3, 4):
        w.write(s, {"reward_mean": s / 10, "loss": float("nan")})  # non-finite values are left out
    w.close()
    assert len(glob.glob(str(tmp_path / "tb" / "*tfevents*"))) == 1
    assert _events(tmp_path / "tb") == [(s, "reward_mean") for s in (1, 2, 3, 4)]


def test_the_progress_bar_appears_with_the_first_step(tmp_path, capsys):
    w = metrics.MetricsWriter(str(tmp_path), total_steps=10)
    w.log("warm-up 1/5")
    assert "gspo" not in capsys.readouterr().err
    w.write(1, {"reward_mean": 0.5})
    w.close()
    assert "gspo" in capsys.readouterr().err
