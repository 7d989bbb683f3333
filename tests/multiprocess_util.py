"""Runs a command as N cooperating JAX processes on this machine through launch/local_multiprocess.sh."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "launch" / "local_multiprocess.sh"


@dataclass
class MultiprocessResult:
    returncode: int  # the launcher's: 0, or the status of the first process that failed
    statuses: dict[int, int]  # process index -> exit status (negative: killed by that signal)
    logs: list[str]  # each process's stdout + stderr
    launcher_output: str
    seconds: float

    def report(self) -> str:
        parts = [f"launcher exit {self.returncode}: {self.launcher_output.strip()}"]
        parts += [f"--- process {i} ---\n{log[-4000:]}" for i, log in enumerate(self.logs)]
        return "\n".join(parts)


def run_processes(cmd: Sequence[str], log_dir: Path, *, num_processes: int = 2, devices: int = 2,
                  timeout: float = 120, grace: float = 30,
                  env: Mapping[str, str] | None = None) -> MultiprocessResult:
    """Runs `cmd` (no spaces inside words) in `num_processes` processes of `devices` CPU devices.

    The whole process group is killed if it outlives `timeout`, and the test fails with the logs.
    """
    log_dir = Path(log_dir)
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), full_env.get("PYTHONPATH")]))
    argv = ["bash", str(LAUNCHER), "--devices", str(devices), "--log-dir", str(log_dir),
            "--grace", str(grace), "--cmd", " ".join([sys.executable if c == "python" else c
                                                      for c in cmd]), str(num_processes)]
    start = time.monotonic()
    proc = subprocess.Popen(argv, cwd=REPO, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        result = _result(proc.returncode, out, log_dir, num_processes, time.monotonic() - start)
        raise AssertionError(f"processes still running after {timeout}s\n{result.report()}")
    return _result(proc.returncode, out, log_dir, num_processes, time.monotonic() - start)


def _result(returncode, out, log_dir, n, seconds) -> MultiprocessResult:
    statuses = {}
    for i, rc in re.findall(r"process (\d+) exited with status (\d+)", out):
        rc = int(rc)
        statuses[int(i)] = 128 - rc if rc > 128 else rc  # bash reports signal k as 128 + k
    logs = []
    for i in range(n):
        path = log_dir / f"process_{i}.log"
        logs.append(path.read_text(errors="replace") if path.exists() else "")
    return MultiprocessResult(returncode, statuses, logs, out, seconds)
