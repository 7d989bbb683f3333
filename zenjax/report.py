"""Curves of a run: `python -m zenjax.report --workdir=DIR` writes DIR/report.png from DIR/metrics.jsonl."""
from __future__ import annotations

import os

from absl import app, flags

from zenjax import cli
from zenjax.metrics import read

PANELS = (
    ("reward", ("reward_mean", "eval_reward")),
    ("clip fraction", ("clip_frac_low", "clip_frac_high")),
    ("ratio / KL", ("ratio_mean", "ratio_min", "ratio_max", "kl")),
    ("completion length", ("completion_len_mean", "completion_len_max")),
    ("expert load", ("max_load_ratio", "dead_experts", "routing_change", "aux_loss")),
    ("optimisation", ("grad_norm", "entropy")),
)


def plot(workdir: str) -> str:
    import matplotlib  # noqa: PLC0415 - plotting is optional at import time

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = read(workdir)
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (title, keys) in zip(axes.flat, PANELS):
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if k in r]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if len(pts) < 20 else None, ms=3, label=k)
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(workdir, "report.png")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def main(argv):
    del argv
    workdir = flags.FLAGS.workdir
    if not os.path.isfile(os.path.join(workdir, "metrics.jsonl")):
        cli.fail(f"no metrics.jsonl in {os.path.abspath(workdir)}: pass the --workdir of a training run")
    print(plot(workdir))


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "A training workdir holding metrics.jsonl.", required=True)
    app.run(main, flags_parser=lambda argv: cli.exit_on_help(argv) or flags.FLAGS(argv))
