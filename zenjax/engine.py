"""Continuous batching for rollouts: the P x G sequences of a step decode through S slots, and a slot whose
sequence ends takes the next pending one, all inside compiled code. A step then costs about the sum of the
completion lengths over S, not P x G / S times the longest one.

The KV cache is slot-contiguous: S rows of Lp prompt columns, where a placement writes its prompt's keys, and a
ring of max_new columns for the decoded ones. Every decode step writes all slots' new keys at the same ring column
(the ring's head), so the write is one dynamic_update_slice at a scalar index, as in the static sampler, on every
backend. A sequence decodes into at most max_new - 1 columns from the head where it was placed, so the ring never
overwrites one of its own keys before it ends. Keys are stored already rotated to their positions, so attention
does not care which column holds a key: the row's valid mask says which are the sequence's own. (Pages would let
slots share a prompt's keys, at the price of a gather on every attention read; here memory is S x (Lp + max_new)
whatever P x G is.)

Under a mesh the slots are data-parallel: each of the n batch shards owns S / n slots and P / n prompts, whose rows
are the ones its devices hold of the output, so a placement never moves keys between devices. The G samples of a
prompt share one prefill: each shard prefills its next S / (n G) prompts at once (enough to fill its slots) into a
buffer from which each sample's placement copies its prompt into a slot. Rows come back in the static sampler's
order [p0 s0..s(G-1), p1 ...], with its masks and raw-model log-probs (`sampling.SampleOutput`).

An Omni thinker's prompts carry their media (`omni.RowMedia`, one layout for every prompt): a prefill runs the
encoders on its prompts' media, and their samples decode on from the text index + rope delta.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental.layout import Layout, with_layout_constraint

from zenjax import sampling
from zenjax.models.omni import RowLayout, RowMedia
from zenjax.models.qwen3 import KVCache, Qwen3
from zenjax.sharding import axis_size, constrain


class Slots(NamedTuple):
    seq_S: jax.Array  # int32 sequence each slot holds (row of the output)
    t_S: jax.Array  # int32 tokens that sequence has emitted
    pos_S: jax.Array  # int32 position of the token fed next
    tok_S: jax.Array  # int32 token fed next
    live_S: jax.Array  # bool: the slot's sequence is still running


class Prefill(NamedTuple):
    layers: tuple  # n x R prompts' keys/values (shard after shard), laid out as the cache (stacked or per layer)
    valid_BL: jax.Array  # bool real prompt tokens
    logits_BV: jax.Array  # float32 logits of each prompt's first new token
    start_B: jax.Array  # int32 position of that token


class Carry(NamedTuple):
    cache: KVCache
    slots: Slots
    buffer: Prefill
    start_n: jax.Array  # int32 per shard: its first prompt in the buffer (of the shard's own prompts)
    next_n: jax.Array  # int32 per shard: its first sequence not yet placed (of the shard's own)
    out: tuple  # tokens_NM, mask_NM, logp_NM
    stats: dict


def sample(model: Qwen3, prompts: Sequence[Sequence[int]], *, slots: int, num_samples: int = 1, max_new_tokens: int,
           rng: jax.Array | None, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           eos_ids: Sequence[int] = (), pad_id: int = 0, greedy: bool = False, prompt_len: int | None = None,
           vocab_limit: int | None = None, budgets: Sequence[int] | None = None, media: RowMedia | None = None,
           layout: RowLayout | None = None) -> tuple[sampling.SampleOutput, dict[str, jax.Array]]:
    """`sampling.sample`'s completions decoded through `slots` decode slots, and the engine's counters:
    decode_steps, slot_tokens (tokens the decode steps produced for real sequences: occupancy is
    slot_tokens / (decode_steps * slots)), refills (sequences placed into a slot) and prefills. An Omni thinker
    takes `media` of the prompts as the sampler pads them (to `prompt_len`) and their `layout`."""
    if slots < 1:
        raise ValueError(f"engine: slots={slots} must be >= 1")
    cfg = model.cfg if media is None else model.cfg.text  # the decoder's
    req = sampling.prepare(cfg, prompts, num_samples=num_samples, max_new_tokens=max_new_tokens, rng=rng,
                           temperature=temperature, top_k=top_k, top_p=top_p, eos_ids=eos_ids, pad_id=pad_id,
                           greedy=greedy, prompt_len=prompt_len, cache_len=None, vocab_limit=vocab_limit,
                           budgets=budgets)
    static = {k: v for k, v in req.static.items() if k != "cache_len"}
    graphdef, state = nnx.split(model)
    return _run(graphdef, state, req.prompt_PL, req.pmask_PL, media, req.budget_N, req.rng, *req.traced, slots=slots,
                layout=layout, **static)


@functools.partial(jax.jit, static_argnames=("graphdef", "slots", "layout", "num_samples", "max_new", "greedy",
                                             "top_k", "use_top_p", "eos_ids", "vocab_limit"))
def _run(graphdef, state, prompt_PL, pmask_PL, media, budget_N, rng, temperature, top_p, pad_id, *, slots, layout,
         num_samples, max_new, greedy, top_k, use_top_p, eos_ids, vocab_limit):
    thinker = nnx.merge(graphdef, state)
    model = thinker if media is None else thinker.text  # the decoder
    cfg = model.cfg
    P, Lp = prompt_PL.shape
    G, S = num_samples, slots
    N = P * G
    mesh = jax.sharding.get_abstract_mesh()
    n = 1 if mesh.empty else axis_size(mesh, "batch", cfg.rules)
    n = n if P % n == 0 and S % n == 0 else 1  # else one queue: placements then move keys between devices
    P_l, S_l = P // n, S // n
    N_l = P_l * G
    R = min(P_l, max(1, S_l // G))  # prompts a shard prefills at once: enough to fill its slots
    shard_n = jnp.arange(n, dtype=jnp.int32)
    pick = functools.partial(sampling.pick, temperature=temperature, top_p=top_p, greedy=greedy, top_k=top_k,
                             use_top_p=use_top_p, vocab_limit=vocab_limit)
    rng_first, rng_decode = jax.random.split(rng)
    eos = jnp.asarray(eos_ids or (-1,), jnp.int32)

    cache = KVCache.init(cfg, S, Lp + max_new)._replace(index=jnp.int32(Lp))
    cache = cache._replace(layers=tuple(type(c)(*(constrain(a, axes, cfg.rules) for a, axes in zip(c, c.AXES)))
                                        for c in cache.layers))
    unstack = cfg.kernel_platform() == "cpu"  # as in the static sampler (Qwen3.unstack_layers)
    layers = None
    if unstack:
        layers, cache = model.unstack_layers(), cache.unstack()

    def prefill(start_n):
        """Each shard's prompts [start, start + R) of its own, all at once."""
        rows = (shard_n[:, None] * P_l + start_n[:, None] + jnp.arange(R)).reshape(-1)
        out, start_B = sampling.prefill(thinker, prompt_PL[rows], pmask_PL[rows], KVCache.init(cfg, n * R, Lp),
                                        jax.tree.map(lambda a: a[rows], media), layout)
        kv = out.cache.unstack() if unstack else out.cache
        # Laid out as the cache it is copied into (row-major): XLA would otherwise give the refill loop's cache the
        # prefill's layout and convert the whole cache between it and the decode loop's at every refill.
        row_major = lambda a: with_layout_constraint(a, Layout(tuple(range(a.ndim))))  # noqa: E731
        layers = tuple(type(c)(*map(row_major, c)) for c in kv.layers)
        return Prefill(layers, kv.valid_BS, model.logits(out.hidden_BTE[:, -1:])[:, 0], start_B)

    def by_shard(x, axis):
        """[.., n * m, ..] -> [.., n, m, ..]: a shard's rows side by side, as its devices hold them."""
        return x.reshape(x.shape[:axis] + (n, x.shape[axis] // n) + x.shape[axis + 1:])

    def place(cache, buffer, r_n, b_n, do_n):
        """Per shard (where do): its buffered prompt r into the prompt columns of its slot b; none of that row's
        ring columns valid."""
        def one(dst, src, r, b, do):  # a shard's slots and buffer, batch axis first
            row = jax.lax.dynamic_slice_in_dim(src, r, 1).astype(dst.dtype)
            zeros = (0,) * (dst.ndim - 1)
            old = jax.lax.dynamic_slice(dst, (b,) + zeros, row.shape)
            return jax.lax.dynamic_update_slice(dst, jnp.where(do, row, old), (b,) + zeros)

        def write(dst, src, ax):  # ax: the batch axis
            new = jax.vmap(one, in_axes=(ax, ax, 0, 0, 0), out_axes=ax)(by_shard(dst, ax), by_shard(src, ax), r_n,
                                                                        b_n, do_n)
            return new.reshape(dst.shape)

        # A Gated DeltaNet's conv and delta-rule states are whole rows, also with the batch axis 4th from last.
        kv = tuple(type(c)(*(write(d, s_, d.ndim - 4) for d, s_ in zip(c, s))) for c, s in zip(cache.layers,
                                                                                             buffer.layers))
        return cache._replace(layers=kv, valid_BS=write(cache.valid_BS, jnp.pad(buffer.valid_BL, ((0, 0), (0, max_new))),
                                                        0))

    def record(out, rows, cols, tok, logp):
        """Tokens into the output rows; rows == N (no sequence) are dropped."""
        tokens_NM, mask_NM, logp_NM = out
        at = lambda a: a.at[rows, cols]  # noqa: E731
        return (at(tokens_NM).set(tok, mode="drop"), at(mask_NM).set(True, mode="drop"),
                at(logp_NM).set(logp, mode="drop"))

    def free_and_pending(c):
        return jnp.any(~by_shard(c.slots.live_S, 0), axis=1) & (c.next_n < N_l)

    def refill(carry):
        """Place pending sequences into free slots, one per shard at a time, until no shard has both."""
        def place_next(c):
            can_n = free_and_pending(c)
            p_n = c.next_n // G
            need_n = can_n & (p_n >= c.start_n + R)
            start_n = jnp.where(need_n, jnp.minimum(p_n, P_l - R), c.start_n)
            # Shards that need no prompts recompute their buffer's: the devices run the prefill in lockstep anyway.
            buffer = jax.lax.cond(jnp.any(need_n), lambda: prefill(start_n), lambda: c.buffer)
            r_n = shard_n * R + p_n - start_n  # the prompt's row in the buffer
            b_n = jnp.argmax(~by_shard(c.slots.live_S, 0), axis=1) + shard_n * S_l  # the first free slot
            seq_n = shard_n * N_l + c.next_n  # the sequence's output row
            tok_n, logp_n = pick(buffer.logits_BV[r_n], jax.random.fold_in(rng_first, c.stats["refills"]))
            done_n = jnp.isin(tok_n, eos) | (budget_N[seq_n] <= 1)
            at = jnp.where(can_n, b_n, S)  # S: dropped
            s = c.slots
            slots = Slots(*(a.at[at].set(v, mode="drop") for a, v in (
                (s.seq_S, seq_n), (s.t_S, jnp.ones_like(seq_n)),
                (s.pos_S, buffer.start_B[r_n]), (s.tok_S, tok_n),
                (s.live_S, ~done_n))))
            stats = {**c.stats, "prefills": c.stats["prefills"] + jnp.any(need_n),
                     "refills": c.stats["refills"] + jnp.sum(can_n, dtype=jnp.int32)}
            return Carry(place(c.cache, buffer, r_n - shard_n * R, b_n - shard_n * S_l, can_n), slots, buffer, start_n,
                         c.next_n + can_n, record(c.out, jnp.where(can_n, seq_n, N), jnp.zeros_like(seq_n), tok_n,
                                                  logp_n), stats)

        with jax.named_scope("refill"):
            return jax.lax.while_loop(lambda c: jnp.any(free_and_pending(c)), place_next, carry)

    def step(c):
        """One decode step of every slot; tokens of slots without a running sequence are discarded."""
        s = c.slots
        out = model.hidden(s.tok_S[:, None], positions_BT=s.pos_S[:, None], cache=c.cache, layers=layers)
        tok_S, logp_S = pick(model.logits(out.hidden_BTE)[:, 0], jax.random.fold_in(rng_decode, c.stats["decode_steps"]))
        recorded = record(c.out, jnp.where(s.live_S, s.seq_S, N), s.t_S, tok_S, logp_S)
        done_S = jnp.isin(tok_S, eos) | (s.t_S + 1 >= budget_N[s.seq_S])
        slots = Slots(s.seq_S, s.t_S + 1, s.pos_S + 1, tok_S, s.live_S & ~done_S)
        stats = {**c.stats, "decode_steps": c.stats["decode_steps"] + 1,
                 "slot_tokens": c.stats["slot_tokens"] + jnp.sum(s.live_S, dtype=jnp.int32)}
        cache = out.cache._replace(index=Lp + (c.cache.index + 1 - Lp) % max_new)  # the ring's next column
        return c._replace(cache=cache, slots=slots, out=recorded, stats=stats)

    def decode(c):
        """Decode steps until a shard has a free slot and a pending sequence (or every sequence has ended). Its own
        loop, fed by and feeding its caller's directly: XLA then updates the cache in place in the layers' scan."""
        def until_refill(c):
            return jnp.any(c.slots.live_S) & ~jnp.any(free_and_pending(c))
        with jax.named_scope("decode"):
            return jax.lax.while_loop(until_refill, step, c)

    zeros_S, zeros_n = jnp.zeros(S, jnp.int32), jnp.zeros(n, jnp.int32)
    init = Carry(cache, Slots(zeros_S, zeros_S, zeros_S, zeros_S, jnp.zeros(S, bool)), prefill(zeros_n), zeros_n,
                 zeros_n, (jnp.full((N, max_new), pad_id, jnp.int32), jnp.zeros((N, max_new), bool),
                           jnp.zeros((N, max_new), jnp.float32)),
                 {k: jnp.int32(k == "prefills") for k in ("decode_steps", "slot_tokens", "refills", "prefills")})
    final = jax.lax.while_loop(lambda c: jnp.any(c.slots.live_S) | jnp.any(c.next_n < N_l),
                               lambda c: decode(refill(c)), init)
    rep = functools.partial(jnp.repeat, repeats=G, axis=0)
    out = sampling.SampleOutput(rep(prompt_PL), rep(pmask_PL), *final.out)
    return sampling.SampleOutput(*(constrain(x, ("batch", None), cfg.rules) for x in out)), final.stats
