"""Gated DeltaNet, Qwen3-Next's linear attention (transformers' Qwen3NextGatedDeltaNet).

Shapes: B batch, T sequence, E hidden, H value heads, G key heads (H a multiple of G), K key dims, V value dims,
W conv kernel, N chunks of C tokens.

Per value head the layer keeps a state S [K, V]: at each token S <- exp(g) S, then S <- S + k (beta (v - S^T k))^T
(the delta rule: beta moves the value S predicts for k towards v), and the output is S^T q. The chunked form
(`chunked_delta_rule`, training and prefill) solves each chunk's C updates at once with a unit-triangular solve and
carries S across chunks in a scan: memory linear in T, all of it float32. `recurrent_delta_rule` steps token by
token (decoding). Both return the final state, which a `DeltaState` carries between calls with the last W - 1
inputs of the causal convolution: constant memory per sequence, whatever its length.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from zenjax.models.qwen3 import Qwen3Config, param, rms_normalize
from zenjax.sharding import constrain

F32 = jnp.float32
CHUNK = 64  # tokens per chunk of the chunked form (transformers' and FLA's)


class DeltaState(NamedTuple):
    """The decode state of Gated DeltaNet layers: the convolution's last W - 1 inputs conv [.., B, W-1, G, 2K + rV]
    (per key head its q, k and r value heads) and the delta-rule state s [.., B, H, K, V] (float32). Stacked: a
    leading layers axis."""
    conv: jax.Array
    s: jax.Array

    AXES = ((None, "batch", None, "act_heads", None), (None, "batch", "act_heads", None, None))  # stacked

    @classmethod
    def init(cls, cfg: Qwen3Config, n: int, batch: int, dtype) -> "DeltaState":
        G, H, K, V, W = _dims(cfg)
        return cls(jnp.zeros((n, batch, W - 1, G, 2 * K + H // G * V), dtype), jnp.zeros((n, batch, H, K, V), F32))


def _dims(cfg: Qwen3Config):
    return (cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
            cfg.linear_value_head_dim, cfg.linear_conv_kernel_dim)


class GatedDeltaNet(nnx.Module):
    """Projections to q, k (key heads), v, z (value heads), b, a; causal depthwise conv + SiLU on q, k and v;
    the gated delta rule; RMSNorm(out) * silu(z) per value head; out projection.

    The projections keep HF's per-key-head layout (in_proj_qkvz: for each key head g its q, k, its r = H / G value
    heads' v, then their z; in_proj_ba: its r b's then r a's) so that sharding the key heads keeps each head's
    parts together; the convolution's channels are laid out the same way ([G, 2K + rV]); hf.py maps HF's
    [all q | all k | all v] conv1d channels to it."""

    def __init__(self, cfg: Qwen3Config, *, rngs: nnx.Rngs):
        G, H, K, V, W = _dims(cfg)
        E, r = cfg.hidden_size, H // G
        self.cfg = cfg
        self.qkvz = param(rngs, cfg, (E, G, 2 * K + 2 * r * V), ("embed", "heads", None))
        self.ba = param(rngs, cfg, (E, G, 2 * r), ("embed", "heads", None))
        # torch's Conv1d init (uniform, fan-in W) keeps the convolution's output the size of its input.
        self.conv = nnx.Param(jax.random.uniform(rngs.params(), (W, G, 2 * K + r * V), jnp.dtype(cfg.param_dtype),
                                                 -1, 1) / math.sqrt(W), out_sharding=(None, "heads", None))
        self.dt_bias = param(rngs, cfg, (H,), ("heads",), init="ones")
        # HF's init: decay rates A uniform in [0.01, 16].
        self.A_log = nnx.Param(jnp.log(jax.random.uniform(rngs.params(), (H,), jnp.dtype(cfg.param_dtype), 0.01, 16)),
                               out_sharding=("heads",))
        self.norm = param(rngs, cfg, (V,), ("norm",), init="ones")
        self.out = param(rngs, cfg, (H, V, E), ("heads", "head_dim", "embed"))

    def __call__(self, x_BTE, mask_BT, state: DeltaState | None):
        """New tokens x (padding zeroed first, as transformers does); `state` continues a sequence (a cached
        prefill or one decode token), None starts from zero and returns no state."""
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        G, H, K, V, W = _dims(cfg)
        B, T, _ = x_BTE.shape
        r = H // G  # key head g serves value heads g*r .. g*r + r - 1
        x = jnp.where(mask_BT[..., None], x_BTE, 0).astype(dt)
        qkvz_BTGX = jnp.einsum("bte,egx->btgx", x, self.qkvz[...].astype(dt))
        ba_BTGX = jnp.einsum("bte,egx->btgx", x, self.ba[...].astype(dt))
        z_BTHV = qkvz_BTGX[..., 2 * K + r * V:].reshape(B, T, H, V)
        b_BTH, a_BTH = ba_BTGX[..., :r].reshape(B, T, H), ba_BTGX[..., r:].reshape(B, T, H)
        qkv_BTGX, conv = _causal_conv(qkvz_BTGX[..., :2 * K + r * V], self.conv[...],
                                      None if state is None else state.conv, W)
        q_BTGK, k_BTGK = qkv_BTGX[..., :K], qkv_BTGX[..., K:2 * K]
        v_BTHV = qkv_BTGX[..., 2 * K:].reshape(B, T, H, V)

        q_BTHK = jnp.repeat(_l2norm(q_BTGK), r, axis=2) * K ** -0.5
        k_BTHK = jnp.repeat(_l2norm(k_BTGK), r, axis=2)
        q_BTHK = constrain(q_BTHK, ("batch", "seq", "act_heads", None), cfg.rules)
        beta_BTH = jax.nn.sigmoid(b_BTH.astype(F32))
        g_BTH = -jnp.exp(self.A_log[...].astype(F32)) * jax.nn.softplus(a_BTH.astype(F32) + self.dt_bias[...].astype(F32))
        # Padding writes nothing (k = 0); its decay of the (zero) state is dropped too, which keeps the chunked
        # form's cumulative decays small: float32 differences of large sums lose digits, in the gradient most.
        g_BTH = jnp.where(mask_BT[..., None], g_BTH, 0.0)
        s0 = None if state is None else state.s
        rule = recurrent_delta_rule if (state is not None and T == 1) else chunked_delta_rule
        o_BTHV, s = rule(q_BTHK, k_BTHK, v_BTHV.astype(F32), g_BTH, beta_BTH, s0)

        o_BTHV = rms_normalize(o_BTHV, cfg.rms_norm_eps) * self.norm[...].astype(F32) * jax.nn.silu(z_BTHV.astype(F32))
        out_BTE = o_BTHV.astype(dt).reshape(B, T, H * V) @ self.out[...].astype(dt).reshape(H * V, -1)
        new = None if state is None else DeltaState(conv.astype(state.conv.dtype), s)
        return out_BTE, new


def _causal_conv(u_BTHD, w_WHD, prev_BPHD, W: int):
    """SiLU of the causal depthwise convolution out[t] = sum_i w[i] u[t - W + 1 + i] (inputs before the sequence:
    `prev`, the previous call's last W - 1, else zeros), in float32; and the last W - 1 inputs for the next call."""
    T = u_BTHD.shape[1]
    if prev_BPHD is None:
        prev_BPHD = jnp.zeros((u_BTHD.shape[0], W - 1, *u_BTHD.shape[2:]), u_BTHD.dtype)
    xx = jnp.concatenate([prev_BPHD.astype(u_BTHD.dtype), u_BTHD], axis=1).astype(F32)
    out = sum(w_WHD[i].astype(F32) * xx[:, i:i + T] for i in range(W))
    return jax.nn.silu(out), xx[:, T:]


def _l2norm(x, eps: float = 1e-6):
    x = x.astype(F32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def recurrent_delta_rule(q_BTHK, k_BTHK, v_BTHV, g_BTH, beta_BTH, s_BHKV=None):
    """The gated delta rule token by token (float32); q already scaled. Returns the outputs and the final state."""
    B, T, H, K = k_BTHK.shape
    s = jnp.zeros((B, H, K, v_BTHV.shape[-1]), F32) if s_BHKV is None else s_BHKV.astype(F32)

    def step(s_BHKV, xs):
        q_BHK, k_BHK, v_BHV, g_BH, b_BH = xs
        s_BHKV = s_BHKV * jnp.exp(g_BH)[..., None, None]
        delta_BHV = (v_BHV - jnp.einsum("bhkv,bhk->bhv", s_BHKV, k_BHK)) * b_BH[..., None]
        s_BHKV = s_BHKV + k_BHK[..., None] * delta_BHV[..., None, :]
        return s_BHKV, jnp.einsum("bhkv,bhk->bhv", s_BHKV, q_BHK)

    xs = tuple(jnp.moveaxis(a.astype(F32), 1, 0) for a in (q_BTHK, k_BTHK, v_BTHV, g_BTH, beta_BTH))
    s, o_TBHV = jax.lax.scan(step, s, xs)
    return jnp.moveaxis(o_TBHV, 0, 1), s


def chunked_delta_rule(q_BTHK, k_BTHK, v_BTHV, g_BTH, beta_BTH, s_BHKV=None, chunk: int = CHUNK):
    """The gated delta rule over chunks of `chunk` tokens (float32): within a chunk, the C updates in closed form
    (the WY / UT representation: one unit-lower-triangular solve), across chunks a scan carrying the state. The
    sequence is padded at its end to whole chunks with k = 0, g = 0 (no update, no decay)."""
    B, T, H, K = k_BTHK.shape
    V = v_BTHV.shape[-1]
    C = min(chunk, T)
    N = -(-T // C)
    pad = N * C - T

    def chunks(a):  # [B, T, H, ...] -> [N, B, H, C, ...]
        a = jnp.pad(a.astype(F32), ((0, 0), (0, pad)) + ((0, 0),) * (a.ndim - 2))
        a = a.reshape(B, N, C, *a.shape[2:])
        return jnp.moveaxis(a, (1, 2), (0, 3))

    q, k, v, g, beta = (chunks(a) for a in (q_BTHK, k_BTHK, v_BTHV, g_BTH, beta_BTH))
    cum = jnp.cumsum(g, axis=-1)  # [N, B, H, C] log decay from the chunk's start through each token
    incl = jnp.tril(jnp.ones((C, C), bool))
    # exp(cum_i - cum_j) for j <= i: the decay from token j to token i (masked before exp: no overflow above)
    decay_CC = jnp.where(incl, jnp.exp(jnp.where(incl, cum[..., :, None] - cum[..., None, :], 0.0)), 0.0)
    kb, vb = k * beta[..., None], v * beta[..., None]
    strict = jnp.tril(jnp.ones((C, C), bool), -1)
    inv = _unit_lower_inverse(jnp.where(strict, jnp.einsum("...ik,...jk->...ij", kb, k) * decay_CC, 0.0))
    u = _mm(inv, vb)  # [N, B, H, C, V] the values each token writes, given a zero state at the chunk's start
    w = _mm(inv, kb * jnp.exp(cum)[..., None])  # [N, B, H, C, K] how the state at the chunk's start changes them
    intra = jnp.einsum("...ik,...jk->...ij", q, k) * decay_CC
    q_dec = q * jnp.exp(cum)[..., None]
    k_dec = k * jnp.exp(cum[..., -1:] - cum)[..., None]
    chunk_decay = jnp.exp(cum[..., -1])[..., None, None]

    def step(s_BHKV, xs):
        u, w, intra, q_dec, k_dec, cd = xs
        v_new = u - w @ s_BHKV
        o = q_dec @ s_BHKV + intra @ v_new
        return s_BHKV * cd + jnp.swapaxes(k_dec, -1, -2) @ v_new, o

    s = jnp.zeros((B, H, K, V), F32) if s_BHKV is None else s_BHKV.astype(F32)
    s, o_NBHCV = jax.lax.scan(step, s, (u, w, intra, q_dec, k_dec, chunk_decay))
    o_BTHV = jnp.moveaxis(o_NBHCV, (0, 3), (1, 2)).reshape(B, N * C, H, V)[:, :T]
    return o_BTHV, s


def _mm(a, b):
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)  # float32 operands even on a TPU's MXU


def _unit_lower_inverse(a_CC):
    """(I + A)^-1 for strictly lower-triangular A (nilpotent: A^C = 0) as (I - A)(I + A^2)(I + A^4)...: log2(C)
    squarings, matmuls only: with jax.lax.linalg.triangular_solve (a LAPACK custom call on CPU) the tiny training
    run hung twice inside a step, all threads idle; on accelerators matmuls are the fast path anyway."""
    C = a_CC.shape[-1]
    inv, p, n = jnp.eye(C, dtype=a_CC.dtype) - a_CC, a_CC, 1
    while 2 * n < C:
        p, n = _mm(p, p), 2 * n
        inv = inv + _mm(inv, p)
    return inv
