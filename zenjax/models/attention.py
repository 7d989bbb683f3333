"""Causal attention over padded sequences, with the fused kernel of each platform; memory linear in length.

`attention(q, k, v, mask_BT, platform=..., rules=...)` is the one entry point (training, log-prob passes and prefill):
query t attends key s when s <= t and token s is real (mask_BT). Query rows of padding get finite values that
nothing real depends on. Grouped-query heads attend their KV head without K/V being repeated.
- "tpu": the Pallas splash-attention kernel (causal mask, padding as segment ids) per device under shard_map.
- "gpu": cuDNN's fused flash attention (`jax.nn.dot_product_attention`). cuDNN takes padding as sequence lengths
  only (real tokens first), so each row's real tokens are rotated to the front and back: rows whose real tokens
  form one run (left-padded prompt + completion, as the trainer builds them).
- "cpu" and anything else: blockwise attention in plain JAX, an online softmax over key blocks with a custom VJP
  that recomputes each block; one block when the sequence fits one (the fastest XLA:CPU layout).
`reference` is the plain softmax attention, for tests.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from zenjax.sharding import logical_to_spec, platform as mesh_platform

F32 = jnp.float32
BLOCK = 512  # keys per block of the blockwise path; [G*T, BLOCK] float32 scores live at a time
SPLASH_BLOCK = 512  # largest splash tile; sequences are padded to a multiple of the tile


def attention(q_BTHD, k_BTKD, v_BTKD, mask_BT, *, platform: str, rules) -> jax.Array:
    """softmax(q k^T / sqrt(D)) v over allowed keys, [B, T, H, D] in the dtype of q; `rules` (the model's layout
    table) says how the activations are split over the mesh."""
    if platform == "tpu":
        return _splash(q_BTHD, k_BTKD, v_BTKD, mask_BT, rules=rules, interpret=mesh_platform() != "tpu")
    if platform == "gpu":  # cuDNN's flash kernels take 16-bit inputs; float32 runs XLA's version of the call
        fused = mesh_platform() == "gpu" and q_BTHD.dtype in (jnp.bfloat16, jnp.float16)
        return _cudnn(q_BTHD, k_BTKD, v_BTKD, mask_BT, implementation="cudnn" if fused else None)
    return _blockwise(q_BTHD, k_BTKD, v_BTKD, mask_BT)


def reference(q_BTHD, k_BTKD, v_BTKD, mask_BT) -> jax.Array:
    B, T, H, D = q_BTHD.shape
    K = k_BTKD.shape[2]
    k_BTHD, v_BTHD = (jnp.repeat(a, H // K, axis=2) for a in (k_BTKD, v_BTKD))
    scores = jnp.einsum("bthd,bshd->bhts", q_BTHD.astype(F32), k_BTHD.astype(F32)) * D ** -0.5
    allowed = jnp.tril(jnp.ones((T, T), bool))[None, None] & mask_BT[:, None, None, :]
    probs = jax.nn.softmax(jnp.where(allowed, scores, jnp.finfo(F32).min), axis=-1)
    return jnp.einsum("bhts,bshd->bthd", probs, v_BTHD.astype(F32)).astype(q_BTHD.dtype)


# ------------------------------------------------------------------------------------------------ blockwise

def _blockwise(q_BTHD, k_BTKD, v_BTKD, mask_BT):
    """Heads-major: M = G*T query rows per (batch, KV head), so every matmul is a plain batched matmul (left in
    [B, T, K, G, D], XLA:CPU transposes the score blocks between them)."""
    B, T, H, D = q_BTHD.shape
    K = k_BTKD.shape[2]
    G = H // K
    S = k_BTKD.shape[1]
    block = min(BLOCK, S)
    pad = -S % block
    q_BKMD = q_BTHD.reshape(B, T, K, G, D).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, D)
    k_BKSD, v_BKSD = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))).swapaxes(1, 2) for a in (k_BTKD, v_BTKD))
    kmask_BS = jnp.pad(mask_BT, ((0, 0), (0, pad)))
    out_BKMD = _blocks(q_BKMD, k_BKSD, v_BKSD, kmask_BS, block, T)
    return out_BKMD.reshape(B, K, G, T, D).transpose(0, 3, 1, 2, 4).reshape(B, T, H, D)


def _allowed(kmask_BS, j, block: int, T: int, M: int):
    """[B, 1, M, block]: key block j against query rows m (position m % T), causal and real keys only."""
    s_S = j * block + jnp.arange(block)
    t_M = jnp.arange(M) % T
    kmask = jax.lax.dynamic_slice_in_dim(kmask_BS, j * block, block, axis=1)
    return (s_S[None, :] <= t_M[:, None])[None, None] & kmask[:, None, None, :]


def _scores(q_BKMD, k_BKsD, allowed):
    s = jnp.einsum("bkmd,bksd->bkms", q_BKMD, k_BKsD, preferred_element_type=F32) * q_BKMD.shape[-1] ** -0.5
    # A finite floor keeps query rows without any allowed key (padding) finite instead of NaN.
    return jnp.where(allowed, s, jnp.finfo(F32).min)


def _split(a_BKSD, block: int):
    B, K, S, D = a_BKSD.shape
    return a_BKSD.reshape(B, K, S // block, block, D).transpose(2, 0, 1, 3, 4)  # [n, B, K, block, D]


def _scan_blocks(step, carry, xs, n: int):
    # Rematerialised: a block's mask depends on inputs that a surrounding layer scan may hold constant, and JAX
    # would otherwise hoist it out of that scan and stack it over all blocks ([S / block, M, block] per call).
    step = jax.checkpoint(step, prevent_cse=False, policy=jax.checkpoint_policies.nothing_saveable)
    if n == 1:  # no loop around a single block
        carry, y = step(carry, jax.tree.map(lambda a: a[0], xs))
        return carry, jax.tree.map(lambda a: a[None], y)
    return jax.lax.scan(step, carry, xs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _blocks(q_BKMD, k_BKSD, v_BKSD, kmask_BS, block: int, T: int):
    """Attention of the M = G*T query rows (row m at position m % T) on keys in blocks of `block`."""
    return _blocks_fwd(q_BKMD, k_BKSD, v_BKSD, kmask_BS, block, T)[0]


def _blocks_fwd(q_BKMD, k_BKSD, v_BKSD, kmask_BS, block, T):
    B, K, M, D = q_BKMD.shape
    n = k_BKSD.shape[2] // block

    def step(carry, xs):
        # Max and sum kept apart (not as one log-sum-exp): on a row without allowed keys the floor swallows log S.
        acc, max_, sum_ = carry
        j, k_BKsD, v_BKsD = xs
        s = _scores(q_BKMD, k_BKsD, _allowed(kmask_BS, j, block, T, M))
        new_max = jnp.maximum(max_, jnp.max(s, axis=-1, keepdims=True))
        scale = jnp.exp(max_ - new_max)
        p = jnp.exp(s - new_max)
        acc = acc * scale + jnp.einsum("bkms,bksd->bkmd", p.astype(q_BKMD.dtype), v_BKsD, preferred_element_type=F32)
        return (acc, new_max, sum_ * scale + jnp.sum(p, axis=-1, keepdims=True)), None

    init = (jnp.zeros((B, K, M, D), F32), jnp.full((B, K, M, 1), jnp.finfo(F32).min), jnp.zeros((B, K, M, 1), F32))
    (acc, max_, sum_), _ = _scan_blocks(step, init, (jnp.arange(n), _split(k_BKSD, block), _split(v_BKSD, block)), n)
    out_BKMD = (acc / sum_).astype(q_BKMD.dtype)
    return out_BKMD, (q_BKMD, k_BKSD, v_BKSD, kmask_BS, out_BKMD, max_, sum_)


def _blocks_bwd(block, T, res, dout_BKMD):
    # Each block's probabilities are recomputed from q, k and the softmax statistics: one more q.k matmul per
    # block instead of a residual that grows with T^2.
    q_BKMD, k_BKSD, v_BKSD, kmask_BS, out_BKMD, max_, sum_ = res
    dt = q_BKMD.dtype
    M = q_BKMD.shape[2]
    n = k_BKSD.shape[2] // block
    delta_BKM1 = jnp.sum(dout_BKMD.astype(F32) * out_BKMD.astype(F32), axis=-1, keepdims=True)

    def step(dq, xs):
        j, k_BKsD, v_BKsD = xs
        allowed = _allowed(kmask_BS, j, block, T, M)
        probs = jnp.exp(_scores(q_BKMD, k_BKsD, allowed) - max_) / sum_
        dv = jnp.einsum("bkms,bkmd->bksd", probs.astype(dt), dout_BKMD)
        dprobs = jnp.einsum("bkmd,bksd->bkms", dout_BKMD, v_BKsD, preferred_element_type=F32)
        ds = jnp.where(allowed, probs * (dprobs - delta_BKM1) * q_BKMD.shape[-1] ** -0.5, 0.0).astype(dt)
        dq = dq + jnp.einsum("bkms,bksd->bkmd", ds, k_BKsD, preferred_element_type=F32)
        return dq, (jnp.einsum("bkms,bkmd->bksd", ds, q_BKMD), dv)

    xs = (jnp.arange(n), _split(k_BKSD, block), _split(v_BKSD, block))
    dq, (dk_n, dv_n) = _scan_blocks(step, jnp.zeros(q_BKMD.shape, F32), xs, n)
    unsplit = lambda a: a.transpose(1, 2, 0, 3, 4).reshape(k_BKSD.shape)  # noqa: E731
    return dq.astype(dt), unsplit(dk_n), unsplit(dv_n), None


_blocks.defvjp(_blocks_fwd, _blocks_bwd)


# ------------------------------------------------------------------------------------------------ TPU: splash

def _splash(q_BTHD, k_BTKD, v_BTKD, mask_BT, *, rules, interpret: bool):
    """Splash attention per device: batch and heads split as the activations are, each device's rows vmapped over
    a kernel for its heads. Real tokens are segment 1 and padding 0, so a real query sees real keys only."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash  # noqa: PLC0415
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks  # noqa: PLC0415

    B, T, H, D = q_BTHD.shape
    tile = min(SPLASH_BLOCK, -(-T // 128) * 128)
    pad = -T % tile
    Tp = T + pad
    heads_major = lambda a: jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))).swapaxes(1, 2)  # noqa: E731
    q_BHTD = heads_major(q_BTHD * jnp.asarray(D ** -0.5, q_BTHD.dtype))
    k_BKTD, v_BKTD = heads_major(k_BTKD), heads_major(v_BTKD)
    seg_BT = jnp.pad(mask_BT.astype(jnp.int32), ((0, 0), (0, pad)))
    blocks = splash.BlockSizes(block_q=tile, block_kv=tile, block_kv_compute=tile, block_q_dkv=tile,
                               block_kv_dkv=tile, block_kv_dkv_compute=tile, block_q_dq=tile, block_kv_dq=tile)

    def local(q_BHTD, k_BKTD, v_BKTD, seg_BT):
        heads = q_BHTD.shape[1]
        kernel = splash.make_splash_mha(masks.MultiHeadMask([masks.CausalMask((Tp, Tp))] * heads), block_sizes=blocks,
                                        head_shards=1, q_seq_shards=1, interpret=interpret)
        one = lambda q, k, v, seg: kernel(q, k, v, segment_ids=splash.SegmentIds(seg, seg))  # noqa: E731
        return jax.vmap(one)(q_BHTD, k_BKTD, v_BKTD, seg_BT)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or math.prod(mesh.shape.values()) == 1:
        out_BHTD = local(q_BHTD, k_BKTD, v_BKTD, seg_BT)
    else:
        batch, heads, kv_heads = (_axes(logical_to_spec((name,), rules)[0], mesh, size)
                                  for name, size in (("batch", B), ("act_heads", H), ("act_kv_heads", k_BTKD.shape[2])))
        if heads != kv_heads:  # both split over the same axes, or neither: each device keeps whole KV groups
            heads = kv_heads = ()
        spec_q, spec_kv = P(batch or None, heads or None), P(batch or None, kv_heads or None)
        out_BHTD = jax.shard_map(local, mesh=mesh, in_specs=(spec_q, spec_kv, spec_kv, P(batch or None)),
                                 out_specs=spec_q, check_vma=False)(q_BHTD, k_BKTD, v_BKTD, seg_BT)
    return out_BHTD.swapaxes(1, 2)[:, :T]


def _axes(entry, mesh, size: int) -> tuple[str, ...]:
    """The mesh axes of a rules entry that split a dimension of `size` evenly (none when it does not divide)."""
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    names = tuple(a for a in names if mesh.shape[a] > 1)
    return names if size % math.prod(mesh.shape[a] for a in names) == 0 else ()


# ------------------------------------------------------------------------------------------------ GPU: cuDNN

def _cudnn(q_BTHD, k_BTKD, v_BTKD, mask_BT, *, implementation: str | None):
    """cuDNN flash attention with each row rotated so that its real tokens come first (cuDNN's padding is a
    length per row), then rotated back. `implementation=None` runs XLA's version of the same call (tests)."""
    B, T = mask_BT.shape
    start_B = jnp.argmax(mask_BT, axis=1)  # first real token
    length_B = jnp.maximum(jnp.sum(mask_BT, axis=1, dtype=jnp.int32), 1)  # padding rows: token 0, finite
    idx_BT = (jnp.arange(T)[None] + start_B[:, None]) % T
    front = lambda a: jnp.take_along_axis(a, idx_BT[:, :, None, None], axis=1)  # noqa: E731
    out = jax.nn.dot_product_attention(front(q_BTHD), front(k_BTKD), front(v_BTKD), is_causal=True,
                                       query_seq_lengths=length_B, key_value_seq_lengths=length_B,
                                       implementation=implementation)
    back_BT = (jnp.arange(T)[None] - start_B[:, None]) % T
    return jnp.take_along_axis(out, back_BT[:, :, None, None], axis=1)
