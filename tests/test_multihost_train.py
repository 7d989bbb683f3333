"""Multi-host training: 2 processes of 2 CPU devices train like 1 process of 4 devices, and a checkpoint the
2-process job wrote resumes in a single process. The runs go through the CLI (`python -m zenjax.train`)."""
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
import orbax.checkpoint as ocp

from tests.multiprocess_util import run_processes
from zenjax.metrics import read

# Tiny MoE, mesh data=1 x expert=4: each device holds 2 of the 8 experts, so tokens are dispatched across the
# process boundary. 4 prompts x 4 completions = 16 rows: 8 per process, minibatches of 8 rows over 4 devices.
# A constant learning rate makes a 2-step and a 3-step run agree on their first 2 steps. It is small because Adam
# turns the rounding noise of a near-zero gradient into a step of about lr.
ARGS = ["-m", "zenjax.train", "--config=configs/next.py:tiny", "--config.rl.sft_steps=2",
        "--config.rl.prompts_per_step=4", "--config.rl.group_size=4", "--config.rl.minibatches=2",
        "--config.mesh.data=1", "--config.mesh.expert=4", "--config.optim.lr=1e-4", "--config.optim.warmup_steps=0",
        "--config.optim.min_lr_ratio=1.0", "--config.eval_every=2", "--config.checkpoint_every=1"]
TIMING = ("time_", "tok_per_s", "sampled_tok_per_s", "reward/reward_time", "reward/math/time_s")
# What the sampler produced and how it scored: the same tokens must come out, so these match exactly.
ROLLOUT = ("reward_mean", "reward_std", "reward_max", "zero_adv_groups", "completion_len_mean",
           "completion_len_max", "sampled_tokens", "reward/math/mean", "eval_reward")


def _train(workdir, steps, num_processes, devices, env=None):
    r = run_processes(["python", *ARGS, f"--workdir={workdir}", f"--config.steps={steps}"],
                      f"{workdir}-logs", num_processes=num_processes, devices=devices, env=env, timeout=300)
    assert r.returncode == 0 and set(r.statuses.values()) == {0}, r.report()


def _params(workdir, step):
    """A checkpoint's params as numpy, whatever devices wrote it."""
    path = os.path.join(workdir, "checkpoints", str(step), "params")
    ckpt = ocp.StandardCheckpointer()
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                          ckpt.metadata(path).item_metadata)
    return ckpt.restore(path, target)


def _data_state(workdir, step):
    with open(os.path.join(workdir, "checkpoints", str(step), "meta", "metadata")) as f:
        return json.load(f)["data"]


def _assert_same_run(rows, expected, params, expected_params):
    assert [r["step"] for r in rows] == [r["step"] for r in expected]
    for r, e in zip(rows, expected):
        assert r.keys() == e.keys()
        for k in r:
            if k.startswith(ROLLOUT):
                assert r[k] == e[k], (r["step"], k)
            elif not k.startswith(TIMING):
                # Processes sum gradients in another order than one process: float32 rounding, nothing more.
                np.testing.assert_allclose(r[k], e[k], rtol=1e-5, atol=1e-6, err_msg=f"step {r['step']} {k}")
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=1e-5), params, expected_params)


def test_two_processes_train_like_one_and_hand_over_their_checkpoint(tmp_path):
    multi, single, resumed = (str(tmp_path / name) for name in ("multi", "single", "resumed"))
    # The single-process run compiles what the resumed one needs (tests/conftest.py: one compilation cache).
    with ThreadPoolExecutor(2) as pool:  # the 2-process job idles in its collectives: overlap the two jobs
        runs = [pool.submit(_train, multi, 2, 2, 2), pool.submit(_train, single, 3, 1, 4)]
        for run in runs:
            run.result()
    a, b = read(multi), read(single)
    assert "eval_reward" in a[-1] and "aux_loss" in a[-1]
    _assert_same_run(a, b[:2], _params(multi, 2), _params(single, 2))
    # Every process read the whole batch: the data position is the single-process one.
    assert _data_state(multi, 2) == _data_state(single, 2)

    shutil.copytree(multi, resumed)
    _train(resumed, 3, 1, 4)
    rows = read(resumed)
    assert rows[:2] == a, "steps 1-2 are the 2-process job's, untouched: it resumed rather than restarted"
    _assert_same_run(rows[2:], b[2:], _params(resumed, 3), _params(single, 3))
