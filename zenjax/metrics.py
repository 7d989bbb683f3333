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
            self._bar = tqdm.tqdm(total=total_steps, initial=start_step, desc="gspo", dynamic_ncols=True)
            self._drop_after(start_step)

    def _drop_after(self, step: int) -> None:
        """On resume, forget lines past the restored step so the file holds each step once."""
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        with open(self.path + ".tmp", "w") as f:
            f.writelines(keep)
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
        self._bar.update(step - self._bar.n)
        self._bar.set_postfix({k: f"{clean[k]:.3g}" for k in KEY_FIGURES if k in clean}, refresh=False)

    def log(self, message: str) -> None:
        if self.enabled:
            tqdm.tqdm.write(message)

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._bar.close()


def read(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
