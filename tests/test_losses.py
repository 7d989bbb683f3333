"""RL losses against numbers derived by hand from the formulas (never from the implementation).

Conventions used in the derivations below:
  GSPO   s_i = exp(sum_t m_it (logp_it - old_it) / |y_i|),  loss_i = -min(s_i A_i, clip(s_i, 1-el, 1+eh) A_i),
         loss = mean_i loss_i.  For an unclipped (or clipped-but-not-binding) sequence
         d loss / d logp_it = -A_i s_i m_it / |y_i| / B;  for a clipped-and-binding one it is 0.
  GRPO   r_it = exp(logp_it - old_it), loss = mean_i mean_t -min(r A, clip(r) A);
         d loss / d logp_it = -A_i r_it / |y_i| / B when the token is not clipped-and-binding, else 0.
  k3     d = ref - logp, k3 = e^d - d - 1, mean over all completion tokens; d k3 / d logp = 1 - e^d.
The clip binds (takes the gradient away) when ratio < 1-el with A < 0, or ratio > 1+eh with A > 0.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zenjax.rl import losses
from zenjax.rl.losses import LOSSES, get_loss, group_advantages

LN = np.log


def _grad_logp(fn, logp, old, adv, mask, **kw):
    """d loss / d logp and d loss / d old (the latter must be 0: old is a constant)."""
    g = jax.grad(lambda lp, od: fn(lp, od, adv, mask, **kw)[0], argnums=(0, 1))(logp, old)
    return np.asarray(g[0]), np.asarray(g[1])


# --------------------------------------------------------------------------------------------------
# Hand-built GSPO batch: B = 6 sequences, T = 4 positions, eps_low = 0.2, eps_high = 0.25
# (clip range [0.8, 1.25]). Each sequence's per-token log ratios are ln(s_i) plus offsets summing to 0,
# so the length-normalised sum is exactly ln(s_i) while tokens differ.
#
#  i  |y_i|  s_i   A_i   case                                   -min(sA, clip(s)A)               grad per token
#  0   1     1.5   +1    s > 1.25, A > 0: high clip BINDS       -min(1.5, 1.25)    = -1.25       0
#  1   2     0.5   -2    s < 0.8,  A < 0: low clip BINDS        -min(-1.0, -1.6)   = +1.6        0
#  2   3     0.6   +0.5  s < 0.8,  A > 0: clipped, not binding  -min(0.3, 0.4)     = -0.3        -0.5*0.6/3/6 = -1/60
#  3   4     1.5   -1    s > 1.25, A < 0: clipped, not binding  -min(-1.5, -1.25)  = +1.5        +1*1.5/4/6   = 1/16
#  4   2     1.1   +2    inside the range                       -min(2.2, 2.2)     = -2.2        -2*1.1/2/6   = -11/60
#  5   3     1.0   -0.5  inside the range                       -min(-0.5, -0.5)   = +0.5        +0.5*1/3/6   = 1/36
#
#  loss = (-1.25 + 1.6 - 0.3 + 1.5 - 2.2 + 0.5) / 6 = -0.15 / 6 = -0.025
#  clip_frac_low = 1/6 (seq 1), clip_frac_high = 1/6 (seq 0)
#  ratio_mean = (1.5 + 0.5 + 0.6 + 1.5 + 1.1 + 1.0) / 6 = 6.2 / 6, min 0.5, max 1.5
#  log_ratio_abs_mean = (ln1.5 + ln2 + |ln0.6| + ln1.5 + ln1.1 + 0) / 6
# --------------------------------------------------------------------------------------------------

S = [1.5, 0.5, 0.6, 1.5, 1.1, 1.0]
LENS = [1, 2, 3, 4, 2, 3]
A = np.array([1.0, -2.0, 0.5, -1.0, 2.0, -0.5], np.float32)
OFFSETS = {1: [0.0], 2: [0.1, -0.1], 3: [0.2, -0.05, -0.15], 4: [0.3, -0.1, -0.1, -0.1]}
EL, EH = 0.2, 0.25


def _gspo_batch():
    B, T = len(S), 4
    old = -1.0 - 0.25 * np.arange(B * T, dtype=np.float64).reshape(B, T)  # arbitrary behaviour log-probs
    delta = np.full((B, T), 40.0)  # padding: a huge "log ratio" that would explode anything unmasked
    mask = np.zeros((B, T), np.float32)
    for i, (s, n) in enumerate(zip(S, LENS)):
        delta[i, :n] = LN(s) + np.array(OFFSETS[n])
        mask[i, :n] = 1
    logp = old + delta
    return jnp.asarray(logp, jnp.float32), jnp.asarray(old, jnp.float32), jnp.asarray(A), jnp.asarray(mask)


EXPECTED_GSPO_LOSS = -0.025
EXPECTED_GSPO_GRAD_PER_TOKEN = [0.0, 0.0, -1 / 60, 1 / 16, -11 / 60, 1 / 36]


def _expected_gspo_grad():
    g = np.zeros((len(S), 4))
    for i, (n, gi) in enumerate(zip(LENS, EXPECTED_GSPO_GRAD_PER_TOKEN)):
        g[i, :n] = gi
    return g


@pytest.mark.parametrize("name", ["gspo", "gspo_token"])
def test_gspo_hand_values_and_grads(name):
    logp, old, adv, mask = _gspo_batch()
    fn = get_loss(name)
    loss, m = fn(logp, old, adv, mask, eps_low=EL, eps_high=EH)
    np.testing.assert_allclose(loss, EXPECTED_GSPO_LOSS, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m["loss"], EXPECTED_GSPO_LOSS, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m["clip_frac_low"], 1 / 6, rtol=1e-6)
    np.testing.assert_allclose(m["clip_frac_high"], 1 / 6, rtol=1e-6)
    np.testing.assert_allclose(m["ratio_mean"], 6.2 / 6, rtol=1e-5)
    np.testing.assert_allclose(m["ratio_min"], 0.5, rtol=1e-5)
    np.testing.assert_allclose(m["ratio_max"], 1.5, rtol=1e-5)
    lram = (LN(1.5) + LN(2.0) + abs(LN(0.6)) + LN(1.5) + LN(1.1) + 0.0) / 6
    np.testing.assert_allclose(m["log_ratio_abs_mean"], lram, rtol=1e-5)
    assert "kl" not in m

    g_logp, g_old = _grad_logp(fn, logp, old, adv, mask, eps_low=EL, eps_high=EH)
    np.testing.assert_allclose(g_logp, _expected_gspo_grad(), rtol=1e-5, atol=1e-7)
    assert np.all(g_old == 0)  # behaviour log-probs are constants


def test_gspo_negative_advantages_clip_the_right_side():
    # One token each, clip range [0.8, 1.25] (eps 0.2 / 0.25), B = 4:
    #   s = 0.5, A = -1: below range, A < 0 -> low clip BINDS:  -min(-0.5, -0.8)  = 0.8,   grad 0
    #   s = 1.5, A = -1: above range, A < 0 -> no bind:          -min(-1.5, -1.25) = 1.5,   grad = 1*1.5/4
    #   s = 0.5, A = +1: below range, A > 0 -> no bind:          -min(0.5, 0.8)    = -0.5,  grad = -0.5/4
    #   s = 1.5, A = +1: above range, A > 0 -> high clip BINDS: -min(1.5, 1.25)   = -1.25, grad 0
    # loss = (0.8 + 1.5 - 0.5 - 1.25) / 4 = 0.1375; low 1/4, high 1/4.
    s = np.array([0.5, 1.5, 0.5, 1.5])
    adv = jnp.array([-1.0, -1.0, 1.0, 1.0])
    old = jnp.full((4, 1), -2.0)
    logp = jnp.asarray(-2.0 + LN(s)[:, None], jnp.float32)
    mask = jnp.ones((4, 1))
    loss, m = losses.gspo(logp, old, adv, mask, eps_low=EL, eps_high=EH)
    np.testing.assert_allclose(loss, 0.1375, rtol=1e-5)
    np.testing.assert_allclose([m["clip_frac_low"], m["clip_frac_high"]], [0.25, 0.25])
    g, _ = _grad_logp(losses.gspo, logp, old, adv, mask, eps_low=EL, eps_high=EH)
    np.testing.assert_allclose(g[:, 0], [0.0, 1.5 / 4, -0.5 / 4, 0.0], rtol=1e-5, atol=1e-7)


def test_gspo_paper_default_eps():
    # eps_low = 3e-4, eps_high = 4e-4 (clip range [0.9997, 1.0004]); one token each, B = 3.
    #   log s = +1e-3, A = +1: s = 1.0010005 > 1.0004 -> high binds: -1.0004
    #   log s = -1e-3, A = -1: s = 0.9990005 < 0.9997 -> low binds:  -min(-0.9990005, -0.9997) = 0.9997
    #   log s = +1e-4, A = +1: s = 1.0001 inside:                     -exp(1e-4)
    logs = np.array([1e-3, -1e-3, 1e-4])
    adv = jnp.array([1.0, -1.0, 1.0])
    old = jnp.full((3, 1), -0.5)
    logp = jnp.asarray(-0.5 + logs[:, None], jnp.float32)
    mask = jnp.ones((3, 1))
    expected = (-1.0004 + 0.9997 - np.exp(1e-4)) / 3
    loss, m = losses.gspo(logp, old, adv, mask)  # defaults
    np.testing.assert_allclose(loss, expected, rtol=1e-4)
    np.testing.assert_allclose([m["clip_frac_low"], m["clip_frac_high"]], [1 / 3, 1 / 3], rtol=1e-6)


def test_gspo_empty_sequence_is_ignored():
    # Append a 7th sequence with an all-zero mask and -inf / nan junk everywhere: the hand numbers of
    # the 6-sequence batch must not move (it is excluded from every mean), and nothing becomes nan.
    logp, old, adv, mask = _gspo_batch()
    logp = jnp.concatenate([logp, jnp.full((1, 4), -jnp.inf)])
    old = jnp.concatenate([old, jnp.full((1, 4), jnp.nan)])
    adv = jnp.concatenate([adv, jnp.array([5.0])])
    mask = jnp.concatenate([mask, jnp.zeros((1, 4))])
    for name in ("gspo", "gspo_token", "grpo"):
        fn = get_loss(name)
        loss, m = fn(logp, old, adv, mask, eps_low=EL, eps_high=EH, ref_logp_BT=old, kl_coef=0.1)
        assert all(np.isfinite(v) for v in jax.tree.leaves(m)), (name, m)
        g, _ = _grad_logp(fn, logp, old, adv, mask, eps_low=EL, eps_high=EH)
        assert np.all(np.isfinite(g)) and np.all(g[-1] == 0), name
        if name != "grpo":
            np.testing.assert_allclose(loss - 0.1 * m["kl"], EXPECTED_GSPO_LOSS, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(g[:-1], _expected_gspo_grad(), rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose([m["clip_frac_low"], m["clip_frac_high"]], [1 / 6, 1 / 6], rtol=1e-6)
            np.testing.assert_allclose([m["ratio_min"], m["ratio_max"]], [0.5, 1.5], rtol=1e-5)
    # A batch with no tokens at all: loss 0, finite metrics.
    loss, m = losses.gspo(logp[-1:], old[-1:], adv[-1:], mask[-1:])
    assert loss == 0 and all(np.isfinite(v) for v in jax.tree.leaves(m))


def test_gspo_token_matches_gspo_on_random_batch():
    rng = np.random.default_rng(0)
    B, T = 8, 7
    old = rng.normal(-2.0, 0.5, (B, T))
    logp = old + rng.normal(0.0, 0.05, (B, T))  # ratios around 1, some well outside [1-3e-4, 1+4e-4]
    lens = rng.integers(1, T + 1, B)
    mask = (np.arange(T)[None] < lens[:, None]).astype(np.float32)
    adv = rng.normal(0.0, 1.0, B)
    args = [jnp.asarray(x, jnp.float32) for x in (logp, old, adv, mask)]
    for kw in ({}, {"eps_low": 0.02, "eps_high": 0.03}):
        l1, m1 = losses.gspo(*args, **kw)
        l2, m2 = losses.gspo_token(*args, **kw)
        np.testing.assert_allclose(l1, l2, rtol=1e-6, atol=1e-7)
        for k in m1:
            np.testing.assert_allclose(m1[k], m2[k], rtol=1e-6, atol=1e-7)
        g1, _ = _grad_logp(losses.gspo, *args, **kw)
        g2, _ = _grad_logp(losses.gspo_token, *args, **kw)
        np.testing.assert_allclose(g1, g2, rtol=1e-5, atol=1e-8)
        assert np.abs(g1).max() > 0


# --------------------------------------------------------------------------------------------------
# GRPO: B = 3, T = 3, clip range [0.8, 1.28] (eps 0.2 / 0.28, the defaults).
#
#  seq 0, A = +1, 3 tokens, r = [1.5, 1.0, 0.7]:
#     1.5 > 1.28, A > 0 -> high BINDS: -1.28          grad 0
#     1.0 inside                        : -1.0           grad -1*1.0/3/3 = -1/9
#     0.7 < 0.8, A > 0 -> not binding   : -min(.7,.8) = -0.7  grad -0.7/9
#     sequence mean (-1.28 - 1.0 - 0.7)/3 = -2.98/3
#  seq 1, A = -1, 2 tokens, r = [0.5, 1.4]:
#     0.5 < 0.8, A < 0 -> low BINDS     : -min(-0.5, -0.8) = 0.8   grad 0
#     1.4 > 1.28, A < 0 -> not binding  : -min(-1.4, -1.28) = 1.4  grad +1.4/2/3 = 1.4/6
#     sequence mean 2.2/2 = 1.1
#  seq 2, A = +0.5, 1 token, r = 1.2 inside: -0.6;  grad -0.5*1.2/1/3 = -0.2
#  loss = (-2.98/3 + 1.1 - 0.6)/3;  clip_frac_low = 1/6 tokens, clip_frac_high = 1/6 tokens
#  ratio_mean = (1.5+1.0+0.7+0.5+1.4+1.2)/6 = 1.05, min 0.5, max 1.5
# --------------------------------------------------------------------------------------------------


def test_grpo_hand_values_and_grads():
    ratios = np.array([[1.5, 1.0, 0.7], [0.5, 1.4, 1.0], [1.2, 1.0, 1.0]])
    mask = np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0]], np.float32)
    old = np.array([[-0.3, -1.2, -2.5], [-0.9, -0.1, -7.0], [-1.5, -3.0, -4.0]])
    logp = old + LN(ratios) + 30.0 * (1 - mask)  # junk in padding
    adv = np.array([1.0, -1.0, 0.5])
    args = [jnp.asarray(x, jnp.float32) for x in (logp, old, adv, mask)]
    loss, m = losses.grpo(*args)
    np.testing.assert_allclose(loss, (-2.98 / 3 + 1.1 - 0.6) / 3, rtol=1e-5)
    np.testing.assert_allclose([m["clip_frac_low"], m["clip_frac_high"]], [1 / 6, 1 / 6], rtol=1e-6)
    np.testing.assert_allclose([m["ratio_mean"], m["ratio_min"], m["ratio_max"]], [1.05, 0.5, 1.5], rtol=1e-5)
    lram = (LN(1.5) + 0 + abs(LN(0.7)) + LN(2.0) + LN(1.4) + LN(1.2)) / 6
    np.testing.assert_allclose(m["log_ratio_abs_mean"], lram, rtol=1e-5)
    g, g_old = _grad_logp(losses.grpo, *args)
    expected = [[0.0, -1 / 9, -0.7 / 9], [0.0, 1.4 / 6, 0.0], [-0.2, 0.0, 0.0]]
    np.testing.assert_allclose(g, expected, rtol=1e-5, atol=1e-7)
    assert np.all(g_old == 0)


# --------------------------------------------------------------------------------------------------
# KL (k3). All advantages 0, so the policy term and its gradient are exactly 0 and loss = kl_coef * kl.
#   d = ref - logp on the 4 completion tokens: seq 0 [ln2, 0, -ln2], seq 1 [ln2]
#   k3(ln2) = 2 - ln2 - 1 = 1 - ln2;  k3(0) = 0;  k3(-ln2) = 1/2 + ln2 - 1 = ln2 - 1/2
#   kl = (1 - ln2 + 0 + ln2 - 1/2 + 1 - ln2) / 4 = (1.5 - ln2) / 4
#   d(kl_coef * kl)/d logp = kl_coef * (1 - e^d) / 4:  d = ln2 -> -kl_coef/4, 0 -> 0, -ln2 -> kl_coef/8
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gspo", "gspo_token", "grpo"])
def test_kl_k3_hand_values(name):
    d = np.array([[LN(2), 0.0, -LN(2)], [LN(2), 0.0, 0.0]])
    mask = np.array([[1, 1, 1], [1, 0, 0]], np.float32)
    logp = np.array([[-1.0, -2.0, -0.5], [-3.0, -np.inf, -np.inf]])  # -inf padding must not leak
    ref = np.where(mask > 0, logp + d, 123.0)
    old = np.where(mask > 0, logp - 0.05, -np.inf)
    adv = np.zeros(2)
    args = [jnp.asarray(x, jnp.float32) for x in (logp, old, adv, mask)]
    kl_coef = 0.5
    kw = dict(ref_logp_BT=jnp.asarray(ref, jnp.float32), kl_coef=kl_coef)
    fn = get_loss(name)
    loss, m = fn(*args, **kw)
    kl = (1.5 - LN(2)) / 4
    np.testing.assert_allclose(m["kl"], kl, rtol=1e-5)
    np.testing.assert_allclose(loss, kl_coef * kl, rtol=1e-5)
    np.testing.assert_allclose(m["pg_loss"], 0.0, atol=1e-7)
    g = np.asarray(jax.grad(lambda lp: fn(lp, *args[1:], **kw)[0])(args[0]))
    np.testing.assert_allclose(g, [[-kl_coef / 4, 0.0, kl_coef / 8], [-kl_coef / 4, 0.0, 0.0]], rtol=1e-5, atol=1e-7)
    # kl_coef = 0 still reports kl but leaves the loss alone; no ref -> no kl metric.
    loss0, m0 = fn(*args, ref_logp_BT=kw["ref_logp_BT"], kl_coef=0.0)
    assert loss0 == 0 and np.isclose(m0["kl"], kl, rtol=1e-5)
    assert "kl" not in fn(*args)[1]


# --------------------------------------------------------------------------------------------------
# Advantages: G = 4, three groups
#   [1, 0, 0, 1]: mean 0.5, population std 0.5 -> (+-0.5) / (0.5 + eps)
#   [2, 2, 2, 2]: all equal -> exactly 0
#   [0, 0, 0, 3]: mean 0.75, var (3 * 0.75^2 + 2.25^2) / 4 = 1.6875, std = sqrt(1.6875) = 0.75 * sqrt(3)
#                 -> -0.75 / (0.75 sqrt3) = -1/sqrt3 for the zeros, 2.25 / (0.75 sqrt3) = sqrt3 for the 3
# --------------------------------------------------------------------------------------------------


def test_group_advantages_hand_values():
    r = jnp.array([1, 0, 0, 1, 2, 2, 2, 2, 0, 0, 0, 3], jnp.float32)
    eps = 1e-6
    std2 = 0.75 * np.sqrt(3)
    expected = [0.5 / (0.5 + eps) * x for x in (1, -1, -1, 1)] + [0.0] * 4 + [
        -0.75 / (std2 + eps)
    ] * 3 + [2.25 / (std2 + eps)]
    adv = group_advantages(r, 4)
    assert adv.dtype == jnp.float32
    np.testing.assert_allclose(adv, expected, rtol=1e-6)
    np.testing.assert_allclose(adv[8:], [-1 / np.sqrt(3)] * 3 + [np.sqrt(3)], rtol=1e-5)
    assert np.all(np.asarray(adv[4:8]) == 0.0)
    centred = [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, -0.75, -0.75, -0.75, 2.25]  # r - group mean
    np.testing.assert_allclose(group_advantages(r, 4, scale_std=False), centred, rtol=1e-6)


def test_group_advantages_constant_group_is_exactly_zero():
    # 0.1 is not representable; mean(0.1, 0.1, 0.1) need not round back to 0.1, yet the answer must be 0.
    r = jnp.array([0.1, 0.1, 0.1, 0.7, 0.7, 0.7, 1.0, 0.0, 0.0], jnp.float32)
    for scale in (True, False):
        adv = np.asarray(jax.jit(functools.partial(group_advantages, group_size=3, scale_std=scale))(r))
        assert np.all(adv[:6] == 0.0)
        assert np.all(adv[6:] != 0.0)
    with pytest.raises(ValueError):
        group_advantages(r, 4)


# --------------------------------------------------------------------------------------------------
# Registry, jit, dtypes


def test_registry():
    assert set(LOSSES) >= {"gspo", "gspo_token", "grpo"}
    assert get_loss("gspo") is losses.gspo
    with pytest.raises(KeyError, match="gspo_token"):
        get_loss("ppo2")

    @losses.register("_test_dummy")
    def dummy(logp_BT, old_logp_BT, adv_B, mask_BT, **kw):
        return jnp.float32(0), {}

    try:
        assert get_loss("_test_dummy") is dummy
        with pytest.raises(ValueError):
            losses.register("_test_dummy")(dummy)
    finally:
        del LOSSES["_test_dummy"]


@pytest.mark.parametrize("name", ["gspo", "gspo_token", "grpo"])
def test_jit_matches_eager(name):
    logp, old, adv, mask = _gspo_batch()
    fn = get_loss(name)
    kw = dict(eps_low=EL, eps_high=EH, ref_logp_BT=old - 0.1, kl_coef=0.05)
    eager = fn(logp, old, adv, mask, **kw)
    jitted = jax.jit(lambda *a: fn(*a, **kw))(logp, old, adv, mask)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # eps and kl_coef may be traced too.
    traced_fn = jax.jit(
        lambda el, eh, c: fn(logp, old, adv, mask, eps_low=el, eps_high=eh, ref_logp_BT=old - 0.1, kl_coef=c)
    )
    traced = traced_fn(EL, EH, 0.05)
    np.testing.assert_allclose(traced[0], eager[0], rtol=1e-6, atol=1e-7)
    g = jax.jit(jax.grad(lambda lp: fn(lp, old, adv, mask, **kw)[0]))(logp)
    assert np.all(np.isfinite(g))


@pytest.mark.parametrize("name", ["gspo", "gspo_token", "grpo"])
def test_bf16_inputs_give_float32_math(name):
    # A single token with log ratio 2^-7, exact in bf16 (logp = -2 + 2^-7 = -1.9921875, old = -2).
    # In float32 the ratio is exp(2^-7) = 1.0078431; computed in bf16 it would round to 1.0078125,
    # which these tolerances tell apart. A = +1: GSPO's ratio is above 1 + 4e-4, so pg_loss = -(1 + 4e-4);
    # GRPO's is inside [0.8, 1.28], so pg_loss = -exp(2^-7).
    logp = jnp.array([[-1.9921875, -5.0]], jnp.bfloat16)
    old = jnp.array([[-2.0, -5.0]], jnp.bfloat16)
    mask = jnp.array([[1, 0]], jnp.bfloat16)
    adv = jnp.array([1.0], jnp.bfloat16)
    fn = get_loss(name)
    loss, m = jax.jit(lambda *a: fn(*a, ref_logp_BT=a[1], kl_coef=0.1))(logp, old, adv, mask)
    assert loss.dtype == jnp.float32
    assert all(v.dtype == jnp.float32 and v.shape == () for v in m.values())
    np.testing.assert_allclose(m["ratio_max"], np.exp(2.0**-7), rtol=2e-6)
    np.testing.assert_allclose(m["pg_loss"], -np.exp(2.0**-7) if name == "grpo" else -(1 + 4e-4), rtol=2e-6)
    # k3 at d = -2^-7: e^d - d - 1
    d = -(2.0**-7)
    np.testing.assert_allclose(m["kl"], np.exp(d) - d - 1, rtol=1e-4)
    g = jax.grad(lambda lp: fn(lp, old, adv, mask)[0].astype(jnp.float32))(logp)
    assert g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, np.float32)))
