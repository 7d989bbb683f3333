"""Curves of a run: `python -m zenjax.report --workdir=DIR` writes DIR/report.png from DIR/metrics.jsonl.

One panel per question a reader asks of a GSPO run (is it learning, is the update clipped, does the policy drift,
what do the steps cost), plus, for an MoE model, two routing panels explained in the caption. The title names the
run, its model and its settings (from the workdir's config.json and run_config.json); the supervised warm-up,
which runs before GSPO step 1, is the shaded band left of step 0.
"""
from __future__ import annotations

import dataclasses
import json
import os

from absl import app, flags

from zenjax import cli
from zenjax.metrics import read


@dataclasses.dataclass(frozen=True)
class Panel:
    title: str
    ylabel: str
    curves: tuple[tuple[str, str], ...]  # (metric, legend label)
    right: tuple[str, tuple[tuple[str, str], ...]] | None = None  # a second y-axis: (label, curves)
    right_absent: str = ""  # what a run without the second axis's metrics says instead
    fraction: bool = False  # values in [0, 1]: the whole range shown
    log: bool = False  # a log y-axis: the first step's compile time would flatten the others
    moe: bool = False  # only for models with experts


PANELS = (
    Panel("Reward", "reward per completion (0-1)",
          (("reward_mean", "training rollouts (mean)"), ("eval_reward", "held-out prompts (greedy)")), fraction=True),
    Panel("Clipped sequences", "fraction of sequences",
          (("clip_frac_low", "ratio below 1 - eps_low"), ("clip_frac_high", "ratio above 1 + eps_high")),
          fraction=True),
    Panel("Policy ratio and KL", "importance ratio (new / old policy)",
          (("ratio_mean", "ratio mean"), ("ratio_min", "ratio min"), ("ratio_max", "ratio max")),
          right=("KL to the initial policy (nats / token)", (("kl", "KL"),)),
          right_absent="KL penalty off (rl.kl_coef = 0)"),
    Panel("Completion length", "tokens", (("completion_len_mean", "mean"), ("completion_len_max", "longest"))),
    Panel("Optimisation", "gradient L2 norm (before clipping)", (("grad_norm", "gradient norm"),),
          right=("policy entropy (nats / token)", (("entropy", "entropy"),))),
    Panel("Time per step (step 1 compiles)", "seconds (log scale)",
          (("time_sampling", "sampling"), ("time_rewards", "rewards"), ("time_updates", "updates"),
           ("time_step", "whole step")), log=True),
    Panel("Expert load", "busiest expert / mean (1 = balanced)", (("max_load_ratio", "max load ratio"),),
          right=("experts that got no token", (("dead_experts", "dead experts"),)), moe=True),
    Panel("Routing stability", "fraction of expert choices", (("routing_change", "routing change"),),
          right=("load-balance loss (= top-k when balanced)", (("aux_loss", "aux loss"),)), moe=True),
)
CAPTION = ("max load ratio: tokens routed to the busiest expert over the mean, averaged over layers (1 = even load).  "
           "dead experts: experts that received no token in the step (mean over layers).\n"
           "routing change: share of the tokens' top-k expert choices that differ between the step's old-policy "
           "pass and the update (later minibatches see updated routers).  aux loss: the load-balance loss "
           "E * sum_e f_e * P_e, as transformers computes it (top-k when balanced).")
COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red")


def _json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def title(workdir: str) -> str:
    """Two lines: the run, its model and data; its GSPO settings."""
    model, run = _json(os.path.join(workdir, "config.json")), _json(os.path.join(workdir, "run_config.json"))
    model = model.get("text_config", model)  # an Omni thinker's decoder
    experts = model.get("num_experts") or 0
    shape = (f"{model.get('num_hidden_layers', '?')} layers x {model.get('hidden_size', '?')} wide, "
             f"vocab {model.get('vocab_size', '?')}" + (f", {experts} experts top-{model.get('num_experts_per_tok')}"
                                                        if experts else ", dense"))
    rl, optim, data = run.get("rl", {}), run.get("optim", {}), run.get("data", {})
    start = f"from {run['init_from']}" if run.get("init_from") else "from random init"
    return (f"{run.get('name', '?')} in {workdir}\n{model.get('model_type', '?')} ({shape}), {start}, data "
            f"{data.get('source', '?')} | {rl.get('loss', '?')}, lr {optim.get('lr', '?')}, "
            f"{rl.get('prompts_per_step', '?')} prompts x {rl.get('group_size', '?')} completions, "
            f"{rl.get('minibatches', '?')} minibatches, kl_coef {rl.get('kl_coef', '?')}")


def plot(workdir: str) -> str:
    """Writes and returns DIR/report.png."""
    import matplotlib.pyplot as plt  # noqa: PLC0415 - plotting is optional at import time

    fig = figure(workdir)
    path = os.path.join(workdir, "report.png")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def figure(workdir: str):
    """The report's matplotlib Figure."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = read(workdir)
    moe = any("aux_loss" in r for r in rows)
    panels = [p for p in PANELS if moe or not p.moe]
    warm_up = _json(os.path.join(workdir, "run_config.json")).get("rl", {}).get("sft_steps", 0)
    last = max((r["step"] for r in rows), default=1)
    band = max(1.0, 0.03 * last)  # the warm-up's width: a marker, not to scale
    cols = 3 if len(panels) <= 6 else 4
    fig, axes = plt.subplots(-(-len(panels) // cols), cols, figsize=(5 * cols, 4.2 * -(-len(panels) // cols) + 1),
                             squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.remove()

    def draw(ax, curves, first_color):
        handles = []
        for (key, label), color in zip(curves, COLORS[first_color:]):
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                xs, ys = zip(*pts)
                handles += ax.plot(xs, ys, color=color, marker="o" if len(pts) < 20 else None, ms=3, label=label)
        ax.ticklabel_format(axis="y", useOffset=False)  # values as they are, not as offsets from +4.115
        return handles

    for i, (ax, p) in enumerate(zip(axes.flat, panels)):
        handles = draw(ax, p.curves, 0)
        ax.set_title(p.title)
        ax.set_xlabel("GSPO step")
        ax.set_ylabel(p.ylabel)
        if p.right and any(k in r for k, _ in p.right[1] for r in rows):
            twin = ax.twinx()
            handles += draw(twin, p.right[1], len(p.curves))
            twin.set_ylabel(p.right[0])
        elif p.right_absent:
            ax.text(0.99, 0.02, p.right_absent, transform=ax.transAxes, ha="right", fontsize=8, color="gray")
        if p.fraction:
            ax.set_ylim(-0.02, max(1.02, ax.get_ylim()[1]))
        if p.log:
            ax.set_yscale("log")
        if warm_up:  # named once, in the first panel's legend
            span = ax.axvspan(-band, 0, color="gray", alpha=0.25,
                              label=f"warm-up: {warm_up} supervised steps before step 1 (not to scale)")
            handles += [span] if i == 0 else []
        ax.set_xlim(-band if warm_up else 0, last + 0.5)
        if handles:
            ax.legend(handles=handles, fontsize=8)
    fig.suptitle(title(workdir), fontsize=10)
    if moe:
        fig.text(0.01, 0.005, CAPTION, fontsize=8, va="bottom")
    fig.tight_layout(rect=(0, 0.06 if moe else 0, 1, 1))
    return fig


def main(argv):
    del argv
    workdir = flags.FLAGS.workdir
    if not os.path.isfile(os.path.join(workdir, "metrics.jsonl")):
        cli.fail(f"no metrics.jsonl in {os.path.abspath(workdir)}: pass the --workdir of a training run")
    print(plot(workdir))


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "A training workdir holding metrics.jsonl.", required=True)
    app.run(main, flags_parser=lambda argv: cli.exit_on_help(argv) or flags.FLAGS(argv))
