"""The trainer's fused AdamW against the optax chain it replaces."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from zenjax.train_state import clipped_adamw


def test_clipped_adamw_is_optax_clip_then_adamw():
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 10, end_value=1e-3)
    ours = clipped_adamw(schedule, 1.0, b1=0.9, b2=0.95, weight_decay=0.1)
    ref = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.1))
    keys = jax.random.split(jax.random.key(0), 3)
    params = {"w": jax.random.normal(keys[0], (16, 8)), "b": jax.random.normal(keys[1], (8,)).astype(jnp.bfloat16)}
    p_ours, p_ref = params, params
    s_ours, s_ref = ours.init(params), ref.init(params)
    for step, scale in enumerate((0.01, 5.0, 0.3, 20.0)):  # global norms below and above the clip
        key = jax.random.fold_in(keys[2], step)
        grads = {name: scale * jax.random.normal(jax.random.fold_in(key, i), p.shape, p.dtype)
                 for i, (name, p) in enumerate(params.items())}
        u_ours, s_ours = jax.jit(ours.update)(grads, s_ours, p_ours)
        u_ref, s_ref = jax.jit(ref.update)(grads, s_ref, p_ref)
        p_ours, p_ref = optax.apply_updates(p_ours, u_ours), optax.apply_updates(p_ref, u_ref)
        for a, b in zip(jax.tree.leaves((u_ours, p_ours)), jax.tree.leaves((u_ref, p_ref))):
            _assert_close(a, b, 1e-5)
    adam = s_ref[1][0]
    assert int(s_ours.count) == int(adam.count) == 4
    for a, b in zip(jax.tree.leaves((s_ours.mu, s_ours.nu)), jax.tree.leaves((adam.mu, adam.nu))):
        _assert_close(a, b, 2e-6)


def _assert_close(a, b, rtol_f32):
    assert a.dtype == b.dtype
    # The clip rounds once where optax rounds twice: bfloat16 leaves end up to two ulps apart.
    rtol = 2**-6 if a.dtype == jnp.bfloat16 else rtol_f32
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=rtol, atol=1e-7)
