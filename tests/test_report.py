"""report.png reads on its own: a title naming the run, labelled axes, the warm-up marked, routing panels (with
their caption) only for an MoE model and the KL where the run has one."""
import json

import matplotlib.pyplot as plt
import pytest

from zenjax import report

DENSE = {"model_type": "qwen3", "num_hidden_layers": 2, "hidden_size": 64, "vocab_size": 64}
MOE = dict(DENSE, model_type="qwen3_moe", num_experts=8, num_experts_per_tok=2)
COMMON = ("reward_mean", "clip_frac_low", "clip_frac_high", "ratio_mean", "ratio_min", "ratio_max",
          "completion_len_mean", "completion_len_max", "grad_norm", "entropy", "time_sampling", "time_rewards",
          "time_updates", "time_step")
ROUTING = ("max_load_ratio", "dead_experts", "routing_change", "aux_loss")


def _workdir(path, model, keys, sft_steps):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(model))
    run = {"name": "zen-x-tiny", "init_from": "", "data": {"source": "arithmetic"},
           "optim": {"lr": 3e-4}, "rl": {"loss": "gspo", "prompts_per_step": 16, "group_size": 8, "minibatches": 2,
                                        "kl_coef": 0.0, "sft_steps": sft_steps}}
    (path / "run_config.json").write_text(json.dumps(run))
    (path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, **{k: 0.5 + s for k in keys}}) + "\n"
                                                for s in range(1, 6)))
    return str(path)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_report_panels_are_titled_labelled_and_fit_the_model(tmp_path, moe):
    keys = COMMON + (ROUTING if moe else ())
    fig = report.figure(_workdir(tmp_path / "run", MOE if moe else DENSE, keys, sft_steps=100))
    try:
        axes = [ax for ax in fig.axes if ax.get_title()]  # the panels (twin axes carry no title)
        titles = [ax.get_title() for ax in axes]
        assert ("Expert load" in titles and "Routing stability" in titles) == moe
        assert len(titles) == (8 if moe else 6)
        assert all(ax.get_ylabel() and ax.get_xlabel() == "GSPO step" for ax in axes)
        assert all(ax.lines for ax in axes), "a panel without a curve"
        head = fig._suptitle.get_text()
        assert "zen-x-tiny" in head and "16 prompts x 8 completions" in head
        assert ("8 experts top-2" in head) == moe and ("dense" in head) != moe
        # The warm-up: a shaded band before step 0 in every panel, named once.
        assert all(any(p.get_x() < 0 for p in ax.patches) for ax in axes)
        assert any("warm-up: 100 supervised steps" in t.get_text() for t in axes[0].get_legend().get_texts())
        caption = " ".join(t.get_text() for t in fig.texts)
        assert ("max load ratio:" in caption and "routing change:" in caption) == moe
        ratio = axes[titles.index("Policy ratio and KL")]
        assert any("KL penalty off" in t.get_text() for t in ratio.texts)  # no KL logged: said, not left blank
    finally:
        plt.close(fig)
