"""Qwen3-MoE sparse block: float32 router, dropless grouped-matmul experts, expert parallelism, routing losses.

Shapes: B batch, T sequence, E hidden, X experts, F expert width, K experts per token, N tokens (B*T),
P (token, choice) pairs (N*K), M rows of the expert-sorted buffer.

The experts ("ragged" path) run on (token, choice) pairs sorted by expert: grouped matmuls over contiguous groups,
no capacity factor, no dropped tokens. Rows move between token order and expert order by gathers only; the
gradient of a gather through a partial permutation is the gather through its inverse (`_take_rows`), so there is
no scatter-add anywhere.

Under a mesh the experts run in `shard_map`: each device computes its own batch shard with the experts it holds
(`experts` -> `expert` axis). With an expert axis of n > 1 the n devices of an expert group all-gather their
tokens, each computes only the pairs routed to its X/n experts, and a reduce-scatter returns every token's sum
to its owner. XLA:CPU has no `ragged_all_to_all`, and a fixed-size all-to-all that is safe for dropless routing
must reserve a whole batch shard per destination, which is exactly an all-gather of the tokens (and the way back
a reduce-scatter). That sends each token to the n - 1 other devices of its group; a ragged all-to-all sends the
K(n - 1)/n of its K pairs that leave the device: no more bytes when n <= K, the usual expert-parallel size.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from zenjax.models.qwen3 import MLP, Qwen3Config, param
from zenjax.sharding import logical_to_spec

F32 = jnp.float32
GATE_AXES = ("experts", "embed", "expert_mlp")  # also up
DOWN_AXES = ("experts", "expert_mlp", "embed")


class MoEBlock(nnx.Module):
    """Router + top-k + SwiGLU experts (+ Qwen3-Next's shared expert, scaled by sigmoid(x @ shared_gate)); returns
    (y_BTE, aux) where aux holds this layer's routing statistics."""

    def __init__(self, cfg: Qwen3Config, *, rngs: nnx.Rngs):
        E, X, F = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
        self.cfg = cfg
        self.router = param(rngs, cfg, (E, X), ("embed", None))
        self.gate = param(rngs, cfg, (X, E, F), GATE_AXES)
        self.up = param(rngs, cfg, (X, E, F), GATE_AXES)
        self.down = param(rngs, cfg, (X, F, E), DOWN_AXES)
        if cfg.shared_expert_intermediate_size:
            self.shared = MLP(cfg, rngs=rngs, width=cfg.shared_expert_intermediate_size)
            self.shared_gate = param(rngs, cfg, (E,), ("embed",))

    def __call__(self, x_BTE, mask_BT):
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        logits_BTX = jnp.einsum("bte,ex->btx", x_BTE.astype(F32), self.router[...].astype(F32))
        probs_BTX = jax.nn.softmax(logits_BTX, axis=-1)
        w_BTK, idx_BTK = jax.lax.top_k(probs_BTX, cfg.num_experts_per_tok)
        if cfg.norm_topk_prob:
            w_BTK = w_BTK / jnp.sum(w_BTK, axis=-1, keepdims=True)
        weights = tuple(_cast(p.get_value(), dt) for p in (self.gate, self.up, self.down))
        if cfg.moe_impl == "reference":
            y_BTE = _reference(x_BTE.astype(dt), idx_BTK, w_BTK, *weights)
        else:  # the grouped-matmul kernel of accelerators (megablox on TPU); XLA:CPU runs blocks of rows faster
            kernel = "blocked" if cfg.kernel_platform() == "cpu" else "ragged_dot"
            y_BTE = _sharded_experts(x_BTE.astype(dt), idx_BTK, w_BTK, *weights, kernel=kernel, rules=cfg.rules)
        if cfg.shared_expert_intermediate_size:
            gate_BT1 = jax.nn.sigmoid(x_BTE.astype(F32) @ self.shared_gate[...].astype(F32))[..., None]
            y_BTE = (y_BTE.astype(F32) + gate_BT1 * self.shared(x_BTE, mask_BT)[0].astype(F32)).astype(dt)
        return y_BTE, _router_aux(logits_BTX, probs_BTX, idx_BTK, mask_BT)

    def split_experts(self):
        """Hold each expert's weights as an array of its own, for decoding on one CPU device (see
        `Qwen3.unstack_layers`): the experts then run from their weights in place, where taking one out of the
        stack would copy it at every step. Forward only. Under a mesh of several devices it does nothing: sharded
        experts stay stacked for their shard_map."""
        if not _on_one_device(jax.sharding.get_abstract_mesh()):
            return
        for p in (self.gate, self.up, self.down):
            p.set_value(tuple(jnp.unstack(p.get_value())))


def _cast(w, dtype):
    return tuple(a.astype(dtype) for a in w) if isinstance(w, tuple) else w.astype(dtype)


def _router_aux(logits_BTX, probs_BTX, idx_BTK, mask_BT):
    """Per-layer sums over the real tokens (padding routed but not counted), plus every token's choices.
    Under jit these sums run over the whole (global) batch, whatever the mesh."""
    m_BT = mask_BT.astype(F32)
    X = probs_BTX.shape[-1]
    chosen_BTX = jnp.any(idx_BTK[..., None] == jnp.arange(X), axis=-2).astype(F32)
    lse_BT = jax.nn.logsumexp(logits_BTX, axis=-1)
    entropy_BT = lse_BT - jnp.sum(probs_BTX * logits_BTX, axis=-1)
    return {
        "expert_counts": jnp.einsum("btx,bt->x", chosen_BTX, m_BT),  # selections per expert
        "prob_sums": jnp.einsum("btx,bt->x", probs_BTX, m_BT),  # router probability mass per expert
        "tokens": jnp.sum(m_BT),
        "z_sum": jnp.sum(m_BT * lse_BT**2),
        "entropy_sum": jnp.sum(m_BT * entropy_BT),
        "topk": idx_BTK.astype(jnp.int32),
    }


def _reference(x_BTE, idx_BTK, w_BTK, gate_XEF, up_XEF, down_XFE):
    """Every expert on every token. Tests only."""
    flat = lambda a: a.reshape(-1, a.shape[-1])  # noqa: E731
    return _every_expert(flat(x_BTE), flat(idx_BTK), flat(w_BTK), gate_XEF, up_XEF, down_XFE, 0).reshape(x_BTE.shape)


def _every_expert(x_NE, idx_NK, w_NK, gate_XEF, up_XEF, down_XFE, first):
    """Every expert held here ([first, first + X)) on every token, combined with the routing weights (zero
    outside a token's top-k, and for experts held elsewhere)."""
    X = gate_XEF.shape[0]
    combine_NX = jnp.einsum("nk,nkx->nx", w_NK, jax.nn.one_hot(idx_NK - first, X, dtype=F32))
    # A batched matmul over the experts, on a materialised copy of the tokens per expert: otherwise XLA:CPU
    # relayouts all the expert weights at every call.
    x_XNE = jax.lax.optimization_barrier(jnp.broadcast_to(x_NE, (X, *x_NE.shape)))
    h_XNF = jax.nn.silu(jnp.einsum("xne,xef->xnf", x_XNE, gate_XEF)) * jnp.einsum("xne,xef->xnf", x_XNE, up_XEF)
    y_XNE = jnp.einsum("xnf,xfe->xne", h_XNF, down_XFE)
    return jnp.einsum("xne,nx->ne", y_XNE.astype(F32), combine_NX).astype(x_NE.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Sharding


def _on_one_device(mesh) -> bool:
    """No mesh or a one-device mesh: the experts run without shard_map."""
    return mesh.empty or mesh.size == 1


def _mesh_axes(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _sharded_experts(x_BTE, idx_BTK, w_BTK, gate_XEF, up_XEF, down_XFE, *, kernel: str, rules):
    mesh = jax.sharding.get_abstract_mesh()
    if _on_one_device(mesh):
        y_NE = _local_experts(x_BTE.reshape(-1, x_BTE.shape[-1]), idx_BTK.reshape(-1, idx_BTK.shape[-1]),
                              w_BTK.reshape(-1, w_BTK.shape[-1]), gate_XEF, up_XEF, down_XFE, 0, kernel)
        return y_NE.reshape(x_BTE.shape)

    gate_spec, down_spec = logical_to_spec(GATE_AXES, rules), logical_to_spec(DOWN_AXES, rules)
    ep = _mesh_axes(gate_spec[0])  # mesh axes splitting the experts
    tp = _mesh_axes(gate_spec[2])  # ... splitting each expert's width (partial sums, one psum)
    fsdp = _mesh_axes(gate_spec[1])  # ... splitting the hidden dim of the weights (all-gathered inside)
    X = gate_XEF.shape[0]
    n_ep = math.prod(mesh.shape[a] for a in ep)
    if X % n_ep:
        raise ValueError(f"num_experts={X} is not divisible by the expert-parallel mesh size {n_ep} "
                         f"(mesh axes {ep})")
    # The batch is split like every activation (rules' "batch"), or kept whole when it does not divide (decoding
    # a single sequence): then every device of an expert group already holds all tokens and nothing is gathered.
    batch = _mesh_axes(rules["batch"])
    if x_BTE.shape[0] % math.prod(mesh.shape[a] for a in batch):
        batch = ()
    gather_ep = tuple(a for a in ep if a in batch)
    act = P(batch or None)

    def local(x_BTE, idx_BTK, w_BTK, gate_XEF, up_XEF, down_XFE):
        if fsdp:  # the gathered weights are the same on every fsdp shard (matters when tokens are not split)
            gather = functools.partial(jax.lax.all_gather, axis_name=fsdp, tiled=True, to="invarying")
            gate_XEF, up_XEF, down_XFE = gather(gate_XEF, axis=1), gather(up_XEF, axis=1), gather(down_XFE, axis=2)
        B, T, E = x_BTE.shape
        x_NE, idx_NK, w_NK = x_BTE.reshape(B * T, E), idx_BTK.reshape(B * T, -1), w_BTK.reshape(B * T, -1)
        if gather_ep:
            x_NE, idx_NK, w_NK = (jax.lax.all_gather(a, gather_ep, axis=0, tiled=True) for a in (x_NE, idx_NK, w_NK))
        first = jax.lax.axis_index(ep) * gate_XEF.shape[0] if ep else 0
        y_NE = _local_experts(x_NE, idx_NK, w_NK, gate_XEF, up_XEF, down_XFE, first, kernel)
        if gather_ep:
            y_NE = jax.lax.psum_scatter(y_NE, gather_ep, scatter_dimension=0, tiled=True)
        rest = tuple(a for a in ep + tp if a not in gather_ep)
        if rest:  # other experts' contributions (tokens not gathered) and the width shards' partial sums
            y_NE = jax.lax.psum(y_NE, rest)
        return y_NE.reshape(B, T, E)

    return jax.shard_map(local, mesh=mesh, in_specs=(act, act, act, gate_spec, gate_spec, down_spec),
                         out_specs=act)(x_BTE, idx_BTK, w_BTK, gate_XEF, up_XEF, down_XFE)


# ---------------------------------------------------------------------------------------------------------------
# Experts on one device


MIN_BLOCK = 8  # rows of the smallest block of the CPU kernel


def _local_experts(x_NE, idx_NK, w_NK, gate_XEF, up_XEF, down_XFE, first, kernel: str):
    """sum_k w_nk * expert_{idx_nk}(x_n) over the pairs whose expert is one of the X held here
    ([first, first + X)); other pairs contribute zero."""
    N, K = idx_NK.shape
    split = isinstance(gate_XEF, tuple)  # one array per expert (MoEBlock.split_experts)
    X = len(gate_XEF) if split else gate_XEF.shape[0]
    if kernel == "blocked" and N <= MIN_BLOCK and not split:
        # Decoding a few tokens: the blocked kernel would pad each used expert to a block of MIN_BLOCK rows
        # anyway, so running every expert held here on all N rows costs no more matmul rows, reads each expert's
        # weights once in place (no per-block copies) and skips the sort.
        return _every_expert(x_NE, idx_NK, w_NK, gate_XEF, up_XEF, down_XFE, first)
    capacity = N * min(K, X)  # a token's K choices are distinct experts: at most min(K, X) of them land here
    # The blocked kernel pads each expert's group to whole blocks and runs them two at a time, then the odd one. A
    # block of an eighth to a quarter of the mean rows per expert pads by an eighth at most, on average, while
    # most matmuls run on the double block, a quarter to a half of the mean: smaller matmuls cost more in
    # per-block overhead than they save (one layer of a GSPO minibatch, 320 rows per expert, forward and
    # backward: 97 / 79 / 83 ms with single blocks of 256 / 128 / 64; the whole minibatch update 1.30-1.34 s with
    # single blocks of 128, 1.26 s with pairs of 64). Blocks of at most 128 rows: larger measured no faster.
    eighth_to_quarter_mean = 1 << max(0, (capacity // X).bit_length() - 3)
    block = 1 if kernel == "ragged_dot" else max(MIN_BLOCK, min(128, eighth_to_quarter_mean))
    lay = _layout(idx_NK.reshape(-1) - first, X, block, capacity)
    x_ME = _take_rows(x_NE, lay.src_M, lay.dest_P, K)
    if split:  # reads only the used experts' weights, in place
        y_ME = _expert_by_expert(x_ME, gate_XEF, up_XEF, down_XFE, lay.blocks_X, block)
    elif kernel == "ragged_dot":
        sizes = lay.sizes_X.astype(jnp.int32)
        h_MF = jax.nn.silu(jax.lax.ragged_dot(x_ME, gate_XEF, sizes)) * jax.lax.ragged_dot(x_ME, up_XEF, sizes)
        y_ME = jax.lax.ragged_dot(h_MF, down_XFE, sizes)
    elif kernel == "blocked":
        y_ME = _blocked_mlp(*_vary_together(x_ME, gate_XEF, up_XEF, down_XFE), lay.blocks_X, block)
    else:
        raise ValueError(f"unknown expert kernel {kernel!r}: expected 'blocked' or 'ragged_dot'")
    y_NKE = _take_rows(y_ME, lay.dest_P, lay.src_M, 1).reshape(N, K, -1)
    return jnp.einsum("nke,nk->ne", y_NKE.astype(F32), w_NK).astype(x_NE.dtype)


class _Layout(NamedTuple):
    dest_P: jax.Array  # buffer row of each pair; M (out of range) for pairs of experts held elsewhere
    src_M: jax.Array  # pair of each buffer row; P (out of range) for padding rows
    sizes_X: jax.Array  # pairs per expert
    blocks_X: jax.Array  # blocks per expert: expert x's rows are the next blocks_X[x] blocks after expert x-1's


def _layout(expert_P, num_experts: int, block: int, capacity: int) -> _Layout:
    """Pairs sorted by expert (stable), each expert's group padded to a multiple of `block` rows. Experts outside
    [0, num_experts) are not placed. The buffer is sized for `capacity` placed pairs."""
    X, n_pairs = num_experts, expert_P.shape[0]
    placed = (expert_P >= 0) & (expert_P < X)
    key_P = jnp.where(placed, expert_P, X)  # pairs held elsewhere sort last, as group X
    order = jnp.argsort(key_P, stable=True)
    sizes = jnp.bincount(key_P, length=X + 1)
    rank_P = jnp.argsort(order) - (jnp.cumsum(sizes) - sizes)[key_P]  # position within its expert's group
    padded_X = -(-sizes[:X] // block) * block
    end_X = jnp.cumsum(padded_X)
    n_blocks = (capacity + X * (block - 1)) // block  # sum_x ceil(size_x / block) can never exceed this
    M = n_blocks * block
    dest_P = jnp.where(placed, (end_X - padded_X)[jnp.minimum(key_P, X - 1)] + rank_P, M).astype(jnp.int32)
    src_M = jnp.full((M,), n_pairs, jnp.int32).at[dest_P].set(jnp.arange(n_pairs, dtype=jnp.int32), mode="drop")
    return _Layout(dest_P, src_M, sizes[:X], (padded_X // block).astype(jnp.int32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _take_rows(x_RE, rows_S, inverse_R, fan: int):
    """out[s] = x[rows[s] // fan], zeros where rows[s] is out of range: a partial permutation of x's rows, each
    repeated `fan` times. `inverse` [R * fan] names the output that reads each copy (out of range if none), so
    the gradient is a gather too, summed over the copies."""
    return x_RE.at[rows_S // fan].get(mode="fill", fill_value=0)


def _take_rows_fwd(x_RE, rows_S, inverse_R, fan):
    return _take_rows(x_RE, rows_S, inverse_R, fan), inverse_R


def _take_rows_bwd(fan, inverse_R, g_SE):
    g_RE = g_SE.at[inverse_R].get(mode="fill", fill_value=0)
    return g_RE.reshape(-1, fan, g_RE.shape[-1]).sum(1), None, None


_take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


# ---------------------------------------------------------------------------------------------------------------
# CPU grouped SwiGLU. XLA:CPU lowers `ragged_dot` to a dense matmul against every group (X times the work), so on
# CPU the experts run as a loop over the filled blocks only, each block one expert's dense [block, E] x [E, F].


def _vary_together(*arrays):
    """Inside shard_map, give the arrays the union of the mesh axes they vary over (adding a zero that has it):
    a custom VJP's cotangents and a loop's carries must keep their inputs' types. Autodiff sums each gradient
    back over the axes its array did not vary over (the data-parallel psum of the weight gradients)."""
    if not jax.sharding.get_abstract_mesh().manual_axes:
        return arrays
    zero = sum(jnp.zeros_like(a, shape=()) for a in arrays)
    return tuple(a + zero.astype(a.dtype) for a in arrays)


def _rows(a, start, rows: int):
    return jax.lax.dynamic_slice_in_dim(a, start, rows)


def _put_rows(a, start, value):
    return jax.lax.dynamic_update_slice_in_dim(a, value.astype(a.dtype), start, 0)


def _each_block(first, end, block: int, body, carry):
    """carry = body(start_row, rows, carry) over blocks [first, end) of the buffer: two blocks at a time (rows =
    2 * block), then the odd one (rows = block). `body` is traced once per static size."""
    pairs = (end - first) // 2
    carry = jax.lax.fori_loop(0, pairs, lambda i, c: body((first + 2 * i) * block, 2 * block, c), carry)
    return jax.lax.fori_loop(first + 2 * pairs, end, lambda j, c: body(j * block, block, c), carry)


def _each_expert(blocks_X, body, carry):
    """carry = body(e, first_block, end_block, carry) for every expert e in turn, over its blocks of the buffer."""
    first_X = jnp.cumsum(blocks_X) - blocks_X
    return jax.lax.fori_loop(0, blocks_X.shape[0],
                             lambda e, c: body(e, first_X[e], first_X[e] + blocks_X[e], c), carry)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _blocked_mlp(x_ME, gate_XEF, up_XEF, down_XFE, blocks_X, block: int):
    return _blocked_mlp_fwd(x_ME, gate_XEF, up_XEF, down_XFE, blocks_X, block)[0]


# Both passes loop over the experts, and over each expert's blocks inside: an expert's weights are sliced out of
# the stacks (a copy, on CPU) once for all its blocks rather than once per block.


def _blocked_mlp_fwd(x_ME, gate_XEF, up_XEF, down_XFE, blocks_X, block):
    M, F = x_ME.shape[0], gate_XEF.shape[-1]

    def expert(e, first, end, carry):
        gate_EF, up_EF, down_FE = gate_XEF[e], up_XEF[e], down_XFE[e]

        def body(start, rows, carry):
            y_ME, a_MF, c_MF = carry
            x = _rows(x_ME, start, rows)
            a, c = x @ gate_EF, x @ up_EF
            y = (jax.nn.silu(a) * c) @ down_FE
            return _put_rows(y_ME, start, y), _put_rows(a_MF, start, a), _put_rows(c_MF, start, c)
        return _each_block(first, end, block, body, carry)

    init = (jnp.zeros_like(x_ME), *(jnp.zeros_like(x_ME, shape=(M, F)) for _ in range(2)))
    y_ME, a_MF, c_MF = _each_expert(blocks_X, expert, init)
    return y_ME, (x_ME, gate_XEF, up_XEF, down_XFE, blocks_X, a_MF, c_MF)


def _blocked_mlp_bwd(block, res, dy_ME):
    x_ME, gate_XEF, up_XEF, down_XFE, blocks_X, a_MF, c_MF = res

    def expert(e, first, end, carry):
        dx_ME, dgate, dup, ddown = carry
        gate_EF, up_EF, down_FE = gate_XEF[e], up_XEF[e], down_XFE[e]

        def body(start, rows, carry):
            dx_ME, dgate_EF, dup_EF, ddown_FE = carry
            x, a, c, dy = (_rows(t, start, rows) for t in (x_ME, a_MF, c_MF, dy_ME))
            sig = jax.nn.sigmoid(a)
            silu = a * sig
            dh = dy @ down_FE.T
            dc = dh * silu
            da = dh * c * sig * (1 + a * (1 - sig))
            dx = da @ gate_EF.T + dc @ up_EF.T
            # Weight gradients accumulate over many blocks: keep them in float32 whatever the compute dtype.
            acc = lambda g, l, r: g + jnp.dot(l.T, r, preferred_element_type=F32)  # noqa: E731
            return _put_rows(dx_ME, start, dx), acc(dgate_EF, x, da), acc(dup_EF, x, dc), acc(ddown_FE, silu * c, dy)

        # zeros_like keeps the operands' varying mesh axes (inside shard_map a loop carry's type may not change).
        zeros = tuple(jnp.zeros_like(w, dtype=F32) for w in (gate_EF, up_EF, down_FE))
        dx_ME, *grads = _each_block(first, end, block, body, (dx_ME, *zeros))
        return dx_ME, *(g.at[e].set(d) for g, d in zip((dgate, dup, ddown), grads))

    init = (jnp.zeros_like(x_ME), *(jnp.zeros_like(w, dtype=F32) for w in (gate_XEF, up_XEF, down_XFE)))
    dx_ME, dgate, dup, ddown = _each_expert(blocks_X, expert, init)
    return dx_ME, dgate.astype(gate_XEF.dtype), dup.astype(up_XEF.dtype), ddown.astype(down_XFE.dtype), None


_blocked_mlp.defvjp(_blocked_mlp_fwd, _blocked_mlp_bwd)


def _expert_by_expert(x_ME, gates, ups, downs, blocks_X, block):
    """The blocked forward over experts held one array each (`MoEBlock.split_experts`): a loop per expert,
    unrolled, whose matmuls read that expert's weights in place."""
    first_X = jnp.cumsum(blocks_X) - blocks_X
    y_ME = jnp.zeros_like(x_ME)
    for e, weights in enumerate(zip(gates, ups, downs)):
        def body(start, rows, y_ME, weights=weights):
            gate_EF, up_EF, down_FE = weights
            x = _rows(x_ME, start, rows)
            return _put_rows(y_ME, start, (jax.nn.silu(x @ gate_EF) * (x @ up_EF)) @ down_FE)
        y_ME = _each_block(first_X[e], first_X[e] + blocks_X[e], block, body, y_ME)
    return y_ME


# ---------------------------------------------------------------------------------------------------------------
# Losses and statistics over the stacked aux of every MoE layer ([L, ...] per key, from `Qwen3.__call__`)


def moe_losses(aux: dict, cfg: Qwen3Config, *, global_aux: dict | None = None) -> dict[str, jax.Array]:
    """The router losses, NOT multiplied by their coefficients (the trainer adds
    `cfg.router_aux_loss_coef * aux_loss + cfg.router_z_loss_coef * z_loss`).

    aux_loss: transformers' Qwen3-MoE `load_balancing_loss_func`: X * sum_x f_x * P_x with f_x the fraction of
    tokens choosing x (counted k times per token) and P_x the mean router probability, both pooled over all
    layers and all real tokens of the batch before the product.
    z_loss: ST-MoE's router z-loss, the mean over layers and real tokens of logsumexp(router logits)^2.

    Under jit the sums in `aux` already cover the whole global batch, so data-parallel shards are balanced
    together. `cfg.balance_global_batch` extends that across the micro-batches / minibatches of one optimizer
    step: pass `global_aux`, the aux of a forward over the whole step batch (e.g. the rollout's old-log-prob
    pass), and f_x comes from its counts (global-batch balancing, Qiu et al. 2025). f_x carries no gradient, so
    this is the global loss's gradient, while P_x stays this micro-batch's.
    """
    if not aux:  # dense model
        return {"aux_loss": jnp.zeros((), F32), "z_loss": jnp.zeros((), F32)}
    counts = global_aux if cfg.balance_global_batch and global_aux is not None else aux
    tokens = jnp.maximum(jnp.sum(aux["tokens"]), 1.0)
    f_X = jnp.sum(counts["expert_counts"], axis=0) / jnp.maximum(jnp.sum(counts["tokens"]), 1.0)
    p_X = jnp.sum(aux["prob_sums"], axis=0) / tokens
    return {"aux_loss": f_X.shape[0] * jnp.sum(f_X * p_X), "z_loss": jnp.sum(aux["z_sum"]) / tokens}


def routing_stats(aux: dict) -> dict[str, jax.Array]:
    """Cheap per-layer statistics for logging: `expert_fraction` [L, X] (share of the routing choices taken by
    each expert), and [L] each: `max_load_ratio` (busiest expert / mean), `router_entropy` (mean per-token
    entropy of the router, nats), `dead_experts` (experts that received no token)."""
    counts_LX = aux["expert_counts"]
    total_L = jnp.maximum(jnp.sum(counts_LX, axis=-1), 1.0)
    return {
        "expert_fraction": counts_LX / total_L[:, None],
        "max_load_ratio": jnp.max(counts_LX, axis=-1) * counts_LX.shape[-1] / total_L,
        "router_entropy": aux["entropy_sum"] / jnp.maximum(aux["tokens"], 1.0),
        "dead_experts": jnp.sum(counts_LX == 0, axis=-1).astype(F32),
    }


def routing_change(aux_a: dict, aux_b: dict, mask_BT) -> jax.Array:
    """Fraction of the real tokens' routing choices (expert sets, order ignored) that differ between two
    forwards of the same batch, over all MoE layers."""
    a_LBTK, b_LBTK = aux_a["topk"].astype(jnp.int32), aux_b["topk"].astype(jnp.int32)
    kept_LBTK = jnp.any(a_LBTK[..., :, None] == b_LBTK[..., None, :], axis=-1)
    m_BT = mask_BT.astype(F32)
    L, K = a_LBTK.shape[0], a_LBTK.shape[-1]
    changed = jnp.sum(jnp.sum(1.0 - kept_LBTK, axis=(0, -1)) * m_BT)
    return changed / jnp.maximum(jnp.sum(m_BT) * L * K, 1.0)
