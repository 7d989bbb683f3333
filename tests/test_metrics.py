"""metrics.jsonl survives a kill mid-append; the progress bar starts with the first step, not during start-up."""
import json

import pytest

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


def test_the_progress_bar_appears_with_the_first_step(tmp_path, capsys):
    w = metrics.MetricsWriter(str(tmp_path), total_steps=10)
    w.log("warm-up 1/5")
    assert "gspo" not in capsys.readouterr().err
    w.write(1, {"reward_mean": 0.5})
    w.close()
    assert "gspo" in capsys.readouterr().err
