"""RL policy losses: group advantages, GSPO, GSPO-token, GRPO and a k3 KL penalty.

Pure functions of jax arrays (no model, no state), safe under ``jax.jit`` and ``jax.grad``.
All arithmetic is float32 whatever the input dtype.

Shapes: ``B`` sequences (completions), ``T`` completion positions, ``N`` rewards.

Every loss has the same signature::

    fn(logp_BT, old_logp_BT, adv_B, mask_BT, *, ref_logp_BT=None, eps_low, eps_high, kl_coef=0.0)
        -> (loss, metrics)

* ``logp_BT``     per-token log-probs of the sampled tokens under the current policy (differentiated).
* ``old_logp_BT`` the same under the behaviour policy that sampled them (treated as a constant).
* ``adv_B``       one advantage per sequence (constant), e.g. from :func:`group_advantages`.
* ``mask_BT``     1 (or True) for completion tokens, 0 for prompt/padding. Values at masked positions
                  are never used, so padding may hold anything (even -inf) without producing NaNs.
* ``ref_logp_BT`` frozen reference-policy log-probs; when given, the k3 KL estimate is reported as
                  ``metrics["kl"]`` and ``kl_coef * kl`` is added to the loss.

Sequences whose mask is all zero contribute nothing and are left out of every mean.

Metrics (float32 scalars): ``loss`` (total), ``pg_loss`` (policy term), ``kl`` (only when
``ref_logp_BT`` is given), ``ratio_mean/min/max`` and ``log_ratio_abs_mean`` of the importance ratio,
``clip_frac_low`` / ``clip_frac_high``: the fraction of ratios that are clipped on that side AND for
which the clip binds the pessimistic objective (low: ratio < 1-eps_low with A < 0; high:
ratio > 1+eps_high with A > 0), i.e. the fraction that gets no gradient. The unit is the ratio's own
unit: sequences for gspo/gspo_token, tokens for grpo.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

f32 = jnp.float32

LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
LOSSES: dict[str, LossFn] = {}


def register(name: str) -> Callable[[LossFn], LossFn]:
    """Decorator adding a loss to :data:`LOSSES` under ``name``."""

    def deco(fn: LossFn) -> LossFn:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is already registered")
        LOSSES[name] = fn
        return fn

    return deco


def get_loss(name: str) -> LossFn:
    try:
        return LOSSES[name]
    except KeyError:
        raise KeyError(f"unknown loss {name!r}; known losses: {', '.join(sorted(LOSSES))}") from None


# --------------------------------------------------------------------------------------------------
# Advantages


def group_advantages(rewards_N, group_size: int, *, scale_std: bool = True, eps: float = 1e-6) -> jax.Array:
    """Group-relative advantages for rewards laid out ``[p0 g0..gG-1, p1 g0..gG-1, ...]``.

    ``(r - mean_group) / (std_group + eps)`` with the population std, or ``r - mean_group`` when
    ``scale_std=False``. Groups in which every reward is equal give exactly 0.
    """
    r = jnp.asarray(rewards_N).astype(f32)
    if r.ndim != 1 or group_size < 1 or r.shape[0] % group_size:
        raise ValueError(f"rewards of shape {r.shape} cannot be split into groups of {group_size}")
    g = r.reshape(-1, group_size)
    adv = g - g.mean(axis=1, keepdims=True)
    if scale_std:
        adv = adv / (g.std(axis=1, keepdims=True) + eps)
    # r - mean need not round to exactly 0 for a constant group (e.g. three rewards of 0.1).
    constant = g.max(axis=1, keepdims=True) == g.min(axis=1, keepdims=True)
    return jnp.where(constant, 0.0, adv).reshape(-1)


# --------------------------------------------------------------------------------------------------
# Shared pieces


class _Batch(NamedTuple):
    logp: jax.Array  # [B, T] f32, 0 at masked positions, differentiable
    old: jax.Array  # [B, T] f32, 0 at masked positions, constant
    ref: jax.Array | None  # [B, T] f32, 0 at masked positions, constant
    adv: jax.Array  # [B] f32, constant
    tok: jax.Array  # [B, T] bool, completion tokens
    n: jax.Array  # [B] f32, max(#tokens, 1)
    valid: jax.Array  # [B] bool, sequence has at least one token


def _prepare(logp_BT, old_logp_BT, adv_B, mask_BT, ref_logp_BT) -> _Batch:
    if logp_BT.ndim != 2 or old_logp_BT.shape != logp_BT.shape or mask_BT.shape != logp_BT.shape:
        raise ValueError(
            f"logp {logp_BT.shape}, old_logp {old_logp_BT.shape} and mask {mask_BT.shape} must share one [B, T] shape"
        )
    if adv_B.shape != logp_BT.shape[:1]:
        raise ValueError(f"adv has shape {adv_B.shape}, expected ({logp_BT.shape[0]},)")
    tok = jnp.asarray(mask_BT) > 0

    def clean(x, const):
        x = jnp.asarray(x).astype(f32)
        if const:
            x = jax.lax.stop_gradient(x)
        # Masking before any arithmetic keeps garbage (inf/nan) in padding out of values and grads.
        return jnp.where(tok, x, 0.0)

    count = tok.sum(axis=-1).astype(f32)
    return _Batch(
        logp=clean(logp_BT, False),
        old=clean(old_logp_BT, True),
        ref=None if ref_logp_BT is None else clean(ref_logp_BT, True),
        adv=jax.lax.stop_gradient(jnp.asarray(adv_B).astype(f32)),
        tok=tok,
        n=jnp.maximum(count, 1.0),
        valid=count > 0,
    )


def _seq_mean(x_BT, b: _Batch) -> jax.Array:
    """Mean over each sequence's completion tokens -> [B] (0 for empty sequences)."""
    return jnp.sum(jnp.where(b.tok, x_BT, 0.0), axis=-1) / b.n


def _mean(x, w) -> jax.Array:
    """Mean of x over the entries where the boolean w is set (0 when none is)."""
    return jnp.sum(jnp.where(w, x, 0.0)) / jnp.maximum(jnp.sum(w), 1).astype(f32)


def _pessimistic(ratio, adv, eps_low, eps_high) -> jax.Array:
    """-min(r A, clip(r, 1-eps_low, 1+eps_high) A), written as a max of the negated terms."""
    clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    return jnp.maximum(-ratio * adv, -clipped * adv)


def _ratio_metrics(ratio, log_ratio, adv, w, eps_low, eps_high) -> dict[str, jax.Array]:
    """Statistics of the ratios where w is set (sequences for GSPO, tokens for GRPO)."""
    ratio, log_ratio = jax.lax.stop_gradient((ratio, log_ratio))
    low = (ratio < 1.0 - eps_low) & (adv < 0)
    high = (ratio > 1.0 + eps_high) & (adv > 0)
    any_w = jnp.any(w)
    return {
        "clip_frac_low": _mean(low.astype(f32), w),
        "clip_frac_high": _mean(high.astype(f32), w),
        "ratio_mean": jnp.where(any_w, _mean(ratio, w), 1.0),
        "ratio_min": jnp.where(any_w, jnp.min(jnp.where(w, ratio, jnp.inf)), 1.0),
        "ratio_max": jnp.where(any_w, jnp.max(jnp.where(w, ratio, -jnp.inf)), 1.0),
        "log_ratio_abs_mean": _mean(jnp.abs(log_ratio), w),
    }


def kl_k3(logp_BT, ref_logp_BT, mask_BT) -> jax.Array:
    """k3 estimate of KL(pi || pi_ref): mean over all completion tokens of exp(d) - d - 1, d = ref - logp.

    Unbiased for the sampled tokens and never negative. The mean is over every completion token of
    the batch (not per sequence first). Gradient flows into logp only.
    """
    tok = jnp.asarray(mask_BT) > 0
    d = jnp.where(tok, jax.lax.stop_gradient(ref_logp_BT.astype(f32)) - logp_BT.astype(f32), 0.0)
    return _mean(jnp.expm1(d) - d, tok)


def _finish(pg_loss, metrics, b: _Batch, kl_coef) -> tuple[jax.Array, dict[str, jax.Array]]:
    loss = pg_loss
    if b.ref is not None:
        kl = kl_k3(b.logp, b.ref, b.tok)
        loss = loss + jnp.asarray(kl_coef, f32) * kl
        metrics["kl"] = jax.lax.stop_gradient(kl)
    metrics["pg_loss"] = jax.lax.stop_gradient(pg_loss)
    metrics["loss"] = jax.lax.stop_gradient(loss)
    return loss, metrics


def _seq_log_ratio(b: _Batch) -> jax.Array:
    """log s_i = sum_t m_it (logp_it - old_it) / sum_t m_it (0 for empty sequences)."""
    return _seq_mean(b.logp - b.old, b)


# --------------------------------------------------------------------------------------------------
# Losses


@register("gspo")
def gspo(logp_BT, old_logp_BT, adv_B, mask_BT, *, ref_logp_BT=None, eps_low=3e-4, eps_high=4e-4, kl_coef=0.0):
    """GSPO (Zheng et al. 2025): one length-normalised importance ratio per sequence.

    s_i = exp(mean_t (logp_it - old_it)); loss_i = -min(s_i A_i, clip(s_i, 1-eps_low, 1+eps_high) A_i);
    loss = mean of loss_i over non-empty sequences.
    """
    b = _prepare(logp_BT, old_logp_BT, adv_B, mask_BT, ref_logp_BT)
    log_s = _seq_log_ratio(b)
    s = jnp.exp(log_s)
    pg_loss = _mean(_pessimistic(s, b.adv, eps_low, eps_high), b.valid)
    return _finish(pg_loss, _ratio_metrics(s, log_s, b.adv, b.valid, eps_low, eps_high), b, kl_coef)


@register("gspo_token")
def gspo_token(logp_BT, old_logp_BT, adv_B, mask_BT, *, ref_logp_BT=None, eps_low=3e-4, eps_high=4e-4, kl_coef=0.0):
    """GSPO-token: s_it = sg(s_i) * exp(logp_it - sg(logp_it)), clipped per token, token-mean per sequence.

    s_it has the value of s_i, so the clip decision is s_i's and the value equals :func:`gspo`. The
    gradient is per token (d s_it / d logp_it = s_i), which for one advantage per sequence equals GSPO's
    after the per-sequence token mean; it differs only if advantages were made per token.
    Metrics are those of the sequence ratios s_i, as in :func:`gspo`.
    """
    b = _prepare(logp_BT, old_logp_BT, adv_B, mask_BT, ref_logp_BT)
    log_s = _seq_log_ratio(b)
    s = jnp.exp(log_s)
    s_BT = jax.lax.stop_gradient(s)[:, None] * jnp.exp(b.logp - jax.lax.stop_gradient(b.logp))
    per_token = _pessimistic(s_BT, b.adv[:, None], eps_low, eps_high)
    pg_loss = _mean(_seq_mean(per_token, b), b.valid)
    return _finish(pg_loss, _ratio_metrics(s, log_s, b.adv, b.valid, eps_low, eps_high), b, kl_coef)


@register("grpo")
def grpo(logp_BT, old_logp_BT, adv_B, mask_BT, *, ref_logp_BT=None, eps_low=0.2, eps_high=0.28, kl_coef=0.0):
    """GRPO with DAPO's clip-higher: token ratios r_it = exp(logp_it - old_it) clipped to [1-eps_low, 1+eps_high].

    Aggregation, as in the original GRPO: the per-token pessimistic objective is averaged over each
    sequence's tokens, then over the non-empty sequences (so every sequence weighs the same whatever
    its length; DAPO's token-level mean over the whole batch is not what this computes).
    Metrics are over the completion tokens.
    """
    b = _prepare(logp_BT, old_logp_BT, adv_B, mask_BT, ref_logp_BT)
    log_r = b.logp - b.old
    r = jnp.exp(log_r)
    adv_BT = jnp.broadcast_to(b.adv[:, None], r.shape)
    per_token = _pessimistic(r, adv_BT, eps_low, eps_high)
    pg_loss = _mean(_seq_mean(per_token, b), b.valid)
    return _finish(pg_loss, _ratio_metrics(r, log_r, adv_BT, b.tok, eps_low, eps_high), b, kl_coef)
