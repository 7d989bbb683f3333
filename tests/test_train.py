"""The GSPO loop end to end on tiny configs: it runs, resumes exactly after SIGTERM, and survives a bad checkpoint."""
import glob
import json
import os
import shutil
import signal
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import next as next_config
from configs import nano as nano_config
from zenjax import train
from zenjax.metrics import read

# Timing metrics differ run to run; everything else must be bit-identical after a resume.
TIMING = ("time", "tok_per_s")


def _tiny(module, steps, **rl):
    c = module.get_config("tiny")
    c.unlock()
    c.steps = steps
    c.rl.sft_steps = 2
    c.rl.prompts_per_step = 4
    c.rl.group_size = 4
    c.rl.minibatches = 2
    c.eval_every = 2
    c.checkpoint_every = 1
    c.rl.update(rl)
    return c


def _params(workdir, step):
    return ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "params"))


def _comparable(rows):
    return [{k: v for k, v in r.items() if not any(t in k for t in TIMING)} for r in rows]


def _check_metrics_and_report(workdir, moe):
    rows = read(str(workdir))
    for key in ("reward_mean", "clip_frac_low", "clip_frac_high", "ratio_mean", "grad_norm", "lr", "entropy",
                "completion_len_mean", "zero_adv_groups", "time_sampling", "time_updates", "eval_reward"):
        assert key in rows[-1], key
    if moe:
        for key in ("aux_loss", "routing_change"):
            assert key in rows[-1], key
    assert os.path.exists(workdir / "report.png")
    assert os.path.exists(workdir / "tb")


def test_a_few_steps_log_metrics_and_a_report(tmp_path):
    hist = train.train(_tiny(next_config, 2), str(tmp_path))
    assert [h["step"] for h in hist] == [1, 2]
    _check_metrics_and_report(tmp_path, moe=True)


def test_resume_after_sigterm_is_exact(tmp_path, capsys):
    # With a KL penalty: the resumed run must keep the reference policy of the start, not the resumed one.
    steps, kl = 4, dict(kl_coef=0.05)
    full = str(tmp_path / "full")
    train.train(_tiny(next_config, steps, **kl), full)

    part = str(tmp_path / "part")

    def interrupt_after_step_2():
        path = os.path.join(part, "metrics.jsonl")
        while not (os.path.exists(path) and len(read(part)) >= 2):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=interrupt_after_step_2, daemon=True).start()
    first = train.train(_tiny(next_config, steps, **kl), part)
    assert len(first) < steps, "the signal should have stopped the run early"
    capsys.readouterr()
    second = train.train(_tiny(next_config, steps, **kl), part)
    assert second[0]["step"] == first[-1]["step"] + 1
    assert f"resumed from step {first[-1]['step']} of {part}" in capsys.readouterr().out
    assert _comparable(read(part)) == _comparable(read(full))
    a, b = _params(full, steps), _params(part, steps)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_corrupt_latest_checkpoint_falls_back(tmp_path):
    workdir = str(tmp_path)
    train.train(_tiny(nano_config, 2), workdir)
    _check_metrics_and_report(tmp_path, moe=False)  # the dense model's run, as the MoE one above
    # Damage the newest step: its parameter files lose their contents.
    for f in glob.glob(os.path.join(workdir, "checkpoints", "2", "params", "**", "*"), recursive=True):
        if os.path.isfile(f):
            with open(f, "wb") as fh:
                fh.write(b"garbage")
    hist = train.train(_tiny(nano_config, 3), workdir)
    assert hist[0]["step"] == 2, "resumed from step 1 and redid step 2"
    shutil.rmtree(os.path.join(workdir, "checkpoints"))
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        assert all(json.loads(line)["step"] <= 3 for line in f)


def test_jsonl_prompts_with_an_hf_tokenizer_and_the_math_reward(tmp_path, monkeypatch, caplog):
    from tests.test_tokenizer import _save_bpe  # noqa: PLC0415 - the tiny BPE with a chat template

    _save_bpe(tmp_path / "tok")
    # Some questions are long, so that the longest prompt of a step changes from step to step.
    lines = [{"id": f"q{i}", "prompt": [{"role": "user", "content": f"what is {a} plus {b}" + " please" * (i % 3 == 0) * 12}],
              "answer": str(a + b)}
             for i, (a, b) in enumerate([(1, 2), (3, 4), (2, 2), (5, 1), (4, 4), (3, 3), (1, 1), (2, 5)] * 3)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    c = _tiny(nano_config, 2)
    c.tokenizer = str(tmp_path / "tok")  # 300 tokens, more than the tiny model's 64
    c.model.max_position_embeddings = 256
    c.data.source = str(tmp_path / "train.jsonl")
    c.data.eval_size = 4
    c.data.max_prompt_len = 96
    longest, collect = [], train.rollout.collect
    monkeypatch.setattr(train.rollout, "collect",
                        lambda model, items, *a, **k: longest.append(max(len(it["prompt_ids"]) for it in items))
                        or collect(model, items, *a, **k))
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level("WARNING", logger="jax._src.interpreters.pxla"):
            hist = train.train(c, str(tmp_path / "run"))
    finally:
        jax.config.update("jax_log_compiles", False)
    # Prompts are padded to data.max_prompt_len, so the sampler, the log-prob pass and the update compile once
    # although the steps' longest prompts need different 32-token buckets (a recompile each, before).
    assert len({-(-n // 32) for n in longest}) == 2, longest
    compiled = [r.args[0] for r in caplog.records if r.msg.startswith("Compiling %s")]
    assert compiled.count("jit(update)") == 1 and compiled.count("jit(logprobs)") == 1, compiled
    # Sampling (the tiny default's continuous engine) and the greedy evaluation (the static sampler), once each.
    assert compiled.count("jit(_run)") == 1 and compiled.count("jit(_generate)") == 1, compiled
    assert [h["step"] for h in hist] == [1, 2]
    # A from-scratch model's vocabulary follows its tokenizer, rounded up as real checkpoints pad it.
    assert json.loads((tmp_path / "run" / "config.json").read_text())["vocab_size"] == 384
    assert "reward/math/mean" in hist[-1] and 0.0 <= hist[-1]["reward_mean"] <= 1.0
    # Every math failure has a counted reason; their sum plus the successes is the batch.
    fails = sum(v for k, v in hist[-1].items() if k.startswith("reward/math/fail/"))
    assert fails + hist[-1]["reward/math/mean"] * 16 == pytest.approx(16)
