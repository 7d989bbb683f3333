"""The trainer's jitted GSPO update (AdamW step included) on 8 simulated devices equals the one-device step."""
import dataclasses

import jax
import numpy as np
import pytest

from configs import base
from zenjax import sharding
from zenjax.models import Qwen3Config, moe
from zenjax.train_state import RLHyper, init_state, make_functions, make_optimizer

DENSE = Qwen3Config(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                    intermediate_size=48, dtype="float32")
MOE = Qwen3Config(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                  intermediate_size=48, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                  mlp_only_layers=(0,), dtype="float32", router_aux_loss_coef=0.1)
N, T = 8, 9
LR = 1e-3
# Adam's first step is -lr g / (|g| + 1e-8): for a gradient that cancels to ~1e-8 the step is set by rounding. The
# sharded sums reassociate the float32 gradient terms (<~1e-4 here, ulp ~1e-11), so such a g can move by ~1e-10
# and its step by up to lr * 1e-10 / 1e-8 = 1e-5 (1% of lr); 1.75e-6 was seen. Any real error (a wrong shard, a
# missing reduction) moves steps by ~lr, 100x more.
STEP_ATOL = 1e-2 * LR


def _batch():
    rng = np.random.default_rng(0)
    mask = np.arange(T)[None, :] >= rng.integers(0, 3, N)[:, None]
    comp = np.zeros((N, T - 1), np.float32)
    comp[:, 4:] = mask[:, 5:]
    return {"tokens": rng.integers(0, 64, (N, T)).astype(np.int32), "mask": mask, "completion_mask": comp,
            # old log-probs away from the current ones, so ratios differ from 1 and some clip
            "old_logp": (-4.2 + 0.3 * rng.standard_normal((N, T - 1))).astype(np.float32),
            "adv": rng.standard_normal(N).astype(np.float32)}


def _step(cfg, mesh_sizes, completion_len=None):
    devices = jax.devices()[:int(np.prod(list(mesh_sizes.values())))] if mesh_sizes else jax.devices()[:1]
    mesh = sharding.make_mesh(**mesh_sizes, devices=devices)
    optim = base.get_config().optim
    optim.lr, optim.warmup_steps = LR, 0
    tx, schedule = make_optimizer(optim, 10)
    hyper = RLHyper("gspo", 0.2, 0.28, 0.0, 4, completion_len)
    with jax.set_mesh(mesh):
        state = init_state(cfg, tx, mesh, seed=0)
        _, update = make_functions(state, cfg, tx, hyper, mesh, schedule)
        batch = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in _batch().items()}
        params, _, metrics = update(state.params, state.opt_state, batch, None)
        return params, jax.device_get(metrics)


@pytest.fixture(scope="module", params=[DENSE, MOE], ids=["dense", "moe"])
def cfg_and_reference(request):
    params, metrics = _step(request.param, {})
    return request.param, jax.device_get(params), metrics


# Pure data parallelism is the others' special case (and tests/test_moe_sharded.py runs it).
@pytest.mark.parametrize("mesh", [dict(data=2, expert=4), dict(fsdp=4, tensor=2), dict(data=2, fsdp=2, expert=2)],
                         ids=str)
def test_adamw_step_on_a_mesh_equals_one_device(cfg_and_reference, mesh):
    cfg, want_params, want = cfg_and_reference
    params, metrics = _step(cfg, mesh)
    assert metrics["clip_frac_low"] + metrics["clip_frac_high"] > 0 or metrics["ratio_max"] != 1.0
    for k in ("loss", "grad_norm", "ratio_mean", "clip_frac_low", "clip_frac_high"):
        np.testing.assert_allclose(metrics[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=STEP_ATOL), params,
                 want_params)
    if mesh.get("fsdp") == 4:  # the embedding-dim of large weights is split 4 ways (and heads 2 ways)
        q = params["stacks"][0]["attn"]["q"]
        assert q.addressable_shards[0].data.shape == (q.shape[0], 32 // 4, 4 // 2, 8)


def test_scoring_only_the_completion_gives_the_same_step(cfg_and_reference):
    # The LM head skips the prompt's targets (the first 4 of T - 1 = 8): they never reach the loss.
    cfg, want_params, want = cfg_and_reference
    params, metrics = _step(cfg, {}, completion_len=T - 1 - 4)
    for k in ("loss", "grad_norm", "ratio_mean"):
        np.testing.assert_allclose(metrics[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=STEP_ATOL), params,
                 want_params)


def test_global_batch_balancing_pools_the_step_counts_across_minibatches():
    # balance_global_batch: a minibatch's load-balance loss takes f_x from the whole step batch's routing counts
    # (from the old-log-prob pass), and P_x from its own forward.
    cfg = dataclasses.replace(MOE, balance_global_batch=True)
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    tx, schedule = make_optimizer(base.get_config().optim, 10)
    with jax.set_mesh(mesh):
        state = init_state(cfg, tx, mesh, seed=0)
        logprobs, update = make_functions(state, cfg, tx, RLHyper("gspo", 0.2, 0.28, 0.0, 4), mesh,
                                          schedule)
        full = _batch()
        _, _, routing = logprobs(state.params, full["tokens"], full["mask"])
        half = {k: v[:N // 2] for k, v in full.items()}
        _, aux = state.model()(half["tokens"], half["mask"])
        want = moe.moe_losses(aux, cfg, global_aux=routing["counts"])["aux_loss"]
        own = moe.moe_losses(aux, cfg)["aux_loss"]
        _, _, metrics = update(state.params, state.opt_state, half, routing["counts"])
    np.testing.assert_allclose(metrics["aux_loss"], want, rtol=1e-5)
    assert not np.isclose(want, own, rtol=1e-3), "the half batch's own counts would give the same loss"


def test_a_non_finite_loss_skips_the_update():
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    optim = base.get_config().optim
    optim.warmup_steps = 0
    tx, schedule = make_optimizer(optim, 10)
    with jax.set_mesh(mesh):
        state = init_state(MOE, tx, mesh, seed=0)
        _, update = make_functions(state, MOE, tx, RLHyper("gspo", 0.2, 0.28, 0.0, 4), mesh, schedule)
        want = jax.device_get((state.params, state.opt_state))
        batch = _batch()
        batch["adv"][3] = np.nan
        params, opt_state, metrics = update(state.params, state.opt_state, batch, None)
    assert metrics["finite"] == 0 and not np.isfinite(metrics["total_loss"])
    jax.tree.map(np.testing.assert_array_equal, jax.device_get((params, opt_state)), want)  # count included
    batch["adv"][3] = 0.5
    with jax.set_mesh(mesh):
        params, opt_state, metrics = update(params, opt_state, batch, None)
    assert metrics["finite"] == 1 and int(opt_state.count) == 1
    assert not np.array_equal(np.asarray(params["embed"]), want[0]["embed"])


def test_the_logged_learning_rate_is_the_optimizer_step_s_under_gradient_accumulation():
    # With grad_accum=2 AdamW steps every second update: the rate logged is the one of its own step count.
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    optim = base.get_config().optim
    optim.warmup_steps, optim.grad_accum = 4, 2
    tx, schedule = make_optimizer(optim, 10)
    with jax.set_mesh(mesh):
        state = init_state(DENSE, tx, mesh, seed=0)
        _, update = make_functions(state, DENSE, tx, RLHyper("gspo", 0.2, 0.28, 0.0, 4), mesh, schedule)
        params, opt_state, lrs = state.params, state.opt_state, []
        for _ in range(4):
            params, opt_state, metrics = update(params, opt_state, _batch(), None)
            lrs.append(float(metrics["lr"]))
    want = [float(schedule(k)) for k in (0, 0, 1, 1)]  # warm-up from 0: 0, 0, lr/4, lr/4
    np.testing.assert_allclose(lrs, want, rtol=1e-6)
    assert want[2] > 0
