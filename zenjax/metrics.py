"""Step metrics to JSONL + TensorBoard (process 0 only) and a console progress bar."""
from __future__ import annotations

import json
import math
import os

import tqdm

KEY_FIGURES = ("reward_mean", "eval_reward", "clip_frac_low", "clip_frac_high", "completion_len_mean", "tok_per_s")


class MetricsWriter:
    def __init__(self, workdir: str, total_steps: int, start_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        self._bar = None
        if enabled:
            from tensorboardX import SummaryWriter  # noqa: PLC0415 - heavy import, main process only

            self._tb = SummaryWriter(os.path.join(workdir, "tb"))
            self._total, self._start = total_steps, start_step
            self._drop_after(start_step)

    def _drop_after(self, step: int) -> None:
        """On resume, forget lines past the restored step (and a line torn by a kill) so the file holds each
        step once; the rewrite is atomic."""
        if not os.path.exists(self.path):
            return
        keep = [json.dumps(row) + "\n" for row in _rows(self.path) if row.get("step", 0) <= step]
        with open(self.path + ".tmp", "w") as f:
            f.writelines(keep)
            f.flush()
            os.fsync(f.fileno())
        os.replace(self.path + ".tmp", self.path)

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) or hasattr(v, "item")}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
        for k, v in clean.items():
            if math.isfinite(v):
                self._tb.add_scalar(k, v, step)
        if self._bar is None:  # from the first step on, so start-up and warm-up do not skew its ETA
            self._bar = tqdm.tqdm(total=self._total, initial=self._start, desc="gspo", dynamic_ncols=True)
        self._bar.update(step - self._bar.n)
        self._bar.set_postfix({k: f"{clean[k]:.3g}" for k in KEY_FIGURES if k in clean}, refresh=False)

    def log(self, message: str) -> None:
        if self.enabled:
            tqdm.tqdm.write(message)

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            if self._bar is not None:
                self._bar.close()


def _rows(path: str) -> list[dict]:
    """The file's rows; a last line that a kill cut short is left out (every other line must parse)."""
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1 or line.endswith("\n"):
                raise ValueError(f"{path}: line {i + 1} is not JSON") from None
    return rows


def read(workdir: str) -> list[dict]:
    return _rows(os.path.join(workdir, "metrics.jsonl"))
