"""Batched generation with a KV cache: one prefill per distinct prompt, then a decode loop inside jit.

`sample` validates on the host and left-pads the prompts to a fixed length or a length bucket, so new prompt
lengths need not recompile. The jitted function prefills the P prompts once, repeats the cache `num_samples` times along the
batch, and runs a `lax.while_loop` that stops when every row has emitted an EOS or the budget is spent.

`logprobs` are log-probabilities under the raw model distribution (temperature 1, no top-k/top-p truncation),
in float32: what GSPO/GRPO need as the old-policy log-probs, whatever sampling settings produced the tokens.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zenjax.models.omni import OmniThinker, RowLayout, RowMedia, placement
from zenjax.models.qwen3 import KVCache, Qwen3
from zenjax.sharding import constrain

BUCKET = 32  # prompts are left-padded to a multiple of this many tokens


class SampleOutput(NamedTuple):
    """N = num_prompts * num_samples rows ordered [p0 s0..s(n-1), p1 s0.., ...]."""
    prompt_tokens: jax.Array  # [N, Lp] int32, left-padded with pad_id
    prompt_mask: jax.Array  # [N, Lp] bool
    tokens: jax.Array  # [N, max_new] int32 completion, pad_id after the end
    mask: jax.Array  # [N, max_new] bool, True for generated tokens up to and including the EOS
    logprobs: jax.Array  # [N, max_new] float32 raw-model log p(token), 0 where mask is False


class Request(NamedTuple):
    """A validated batch of prompts, left-padded, and the settings of its generation (see `sample`)."""
    prompt_PL: np.ndarray  # [P, Lp] int32
    pmask_PL: np.ndarray  # [P, Lp] bool
    budget_N: np.ndarray  # [N] int32 tokens each sequence may emit
    rng: jax.Array
    traced: tuple  # temperature, top_p, pad_id as device scalars
    static: dict  # num_samples, max_new, cache_len, greedy, top_k, use_top_p, eos_ids, vocab_limit


def sample(model: Qwen3, prompts: Sequence[Sequence[int]], *, num_samples: int = 1, max_new_tokens: int,
           rng: jax.Array | None, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           eos_ids: Sequence[int] = (), pad_id: int = 0, greedy: bool = False,
           prompt_len: int | None = None, cache_len: int | None = None,
           vocab_limit: int | None = None, budgets: Sequence[int] | None = None, media: RowMedia | None = None,
           layout: RowLayout | None = None) -> SampleOutput:
    """Generate `num_samples` completions of up to `max_new_tokens` tokens for each prompt.

    Sampling draws from softmax(logits / temperature) restricted to the `top_k` most likely tokens (0 = all)
    and then to the smallest set whose probability reaches `top_p` (transformers' order and rule); `greedy`
    takes the argmax. `prompt_len` left-pads every prompt to exactly that many tokens (default: the longest,
    rounded up to a multiple of BUCKET) and `cache_len` fixes the KV-cache length (default: padded prompt +
    max_new_tokens), so that callers with varying prompt lengths share one compiled function. `vocab_limit` (the tokenizer's size)
    keeps ids the model's padded vocabulary has but the tokenizer lacks from being sampled. `budgets` (one per
    returned row, each in [1, max_new_tokens]) ends rows earlier than `max_new_tokens`. An Omni thinker takes
    `media` of the prompts as they are padded here (`omni.RowMedia`, every prompt's media of one `layout`; for
    media of any sizes, `sample_multimodal`).

    One compilation serves every call with the same model structure, padded shapes and static settings
    (num_samples, max_new_tokens, cache_len, greedy, top_k, whether top_p < 1, eos_ids); weights, rng,
    temperature, top_p and budgets are traced values. The cache is allocated inside the jitted function and
    carried by the loop, so there is nothing to donate.
    """
    req = prepare(model.cfg if media is None else model.cfg.text, prompts, num_samples=num_samples,
                  max_new_tokens=max_new_tokens, rng=rng, temperature=temperature, top_k=top_k, top_p=top_p,
                  eos_ids=eos_ids, pad_id=pad_id, greedy=greedy, prompt_len=prompt_len, cache_len=cache_len,
                  vocab_limit=vocab_limit, budgets=budgets)
    graphdef, state = nnx.split(model)
    return _generate(graphdef, state, req.prompt_PL, req.pmask_PL, media, req.budget_N, req.rng, *req.traced,
                     layout=layout, **req.static)


_TRACED_MEDIA = ("pixel_values", "pixel_values_videos", "input_features")


def sample_multimodal(thinker: OmniThinker, prompts: Sequence[Sequence[int]], media: dict | None = None, *,
                      num_samples: int = 1, max_new_tokens: int, rng: jax.Array | None, temperature: float = 1.0,
                      top_k: int = 0, top_p: float = 1.0, eos_ids: Sequence[int] = (), pad_id: int = 0,
                      greedy: bool = False, prompt_len: int | None = None, cache_len: int | None = None,
                      vocab_limit: int | None = None, budgets: Sequence[int] | None = None) -> SampleOutput:
    """`sample` for prompts with images, videos and audios: an `omni.OmniThinker` and its `media`, the keyword
    arguments of `OmniThinker.__call__` (pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
    video_second_per_grid, input_features, feature_lens, use_audio_in_video) for the prompts' placeholders in
    order over the batch. The placement (3-D positions, rope deltas, placeholder slots) is computed on the host
    from the left-padded prompts; the prefill runs the encoders once per prompt and the `num_samples` rows of a
    prompt share it; a decoded token at text index i (valid tokens before it) is at i + rope delta on all three
    rows. The grids are static: new media sizes recompile. Other settings as `sample`'s."""
    media = dict(media or {})
    unknown = set(media) - {*_TRACED_MEDIA, "image_grid_thw", "video_grid_thw", "video_second_per_grid",
                            "feature_lens", "use_audio_in_video"}
    if unknown:
        raise ValueError(f"sample_multimodal: unknown media arguments {sorted(unknown)}")
    req = prepare(thinker.cfg.text, prompts, num_samples=num_samples, max_new_tokens=max_new_tokens, rng=rng,
                  temperature=temperature, top_k=top_k, top_p=top_p, eos_ids=eos_ids, pad_id=pad_id, greedy=greedy,
                  prompt_len=prompt_len, cache_len=cache_len, vocab_limit=vocab_limit, budgets=budgets)
    grids = {k: None if media.get(k) is None else tuple(tuple(int(x) for x in g) for g in np.reshape(media[k], (-1, 3)))
             for k in ("image_grid_thw", "video_grid_thw")}
    p = placement(thinker.cfg, req.prompt_PL, req.pmask_PL, **grids,
                  video_second_per_grid=media.get("video_second_per_grid"), feature_lens=media.get("feature_lens"),
                  use_audio_in_video=bool(media.get("use_audio_in_video", False)))
    arrays = {k: jnp.asarray(media[k]) for k in _TRACED_MEDIA if media.get(k) is not None}
    graphdef, state = nnx.split(thinker)
    return _generate_multimodal(graphdef, state, req.prompt_PL, req.pmask_PL, p, arrays, req.budget_N, req.rng,
                                *req.traced, **grids, **req.static)


def prepare(cfg, prompts: Sequence[Sequence[int]], *, num_samples: int, max_new_tokens: int, rng: jax.Array | None,
            temperature: float, top_k: int, top_p: float, eos_ids: Sequence[int], pad_id: int, greedy: bool,
            prompt_len: int | None, cache_len: int | None, vocab_limit: int | None,
            budgets: Sequence[int] | None) -> Request:
    """Check a generation request on the host (one clear error per problem) and left-pad its prompts."""
    V = cfg.vocab_size
    if not prompts:
        raise ValueError("sample: empty batch (no prompts)")
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise ValueError(f"sample: prompt {lengths.index(0)} is empty; every prompt needs at least one token")
    if num_samples < 1 or max_new_tokens < 1:
        raise ValueError(f"sample: num_samples={num_samples} and max_new_tokens={max_new_tokens} must be >= 1")
    for i, p in enumerate(prompts):
        bad = [t for t in p if not 0 <= t < V]
        if bad:
            raise ValueError(f"sample: prompt {i} has token ids {bad[:5]} outside the vocabulary [0, {V})")
    eos_ids = tuple(int(e) for e in eos_ids)
    for name, ids in (("eos_ids", eos_ids), ("pad_id", (pad_id,))):
        if any(not 0 <= t < V for t in ids):
            raise ValueError(f"sample: {name}={ids} outside the vocabulary [0, {V})")
    if not greedy:
        if not temperature > 0:
            raise ValueError(f"sample: temperature={temperature} must be > 0 (use greedy=True for argmax)")
        if not 0 < top_p <= 1:
            raise ValueError(f"sample: top_p={top_p} must be in (0, 1]")
        if not 0 <= top_k <= V:
            raise ValueError(f"sample: top_k={top_k} must be in [0, vocab_size={V}]")
        if rng is None:
            raise ValueError("sample: rng is required unless greedy=True")
    N = len(prompts) * num_samples
    budget_N = np.full(N, max_new_tokens, np.int32) if budgets is None else np.asarray(budgets, np.int32)
    if budget_N.shape != (N,) or budget_N.min() < 1 or budget_N.max() > max_new_tokens:
        raise ValueError(f"sample: budgets must be {N} values (one per row) in [1, max_new_tokens={max_new_tokens}]")
    longest = max(lengths)
    if longest + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"sample: prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds "
                         f"max_position_embeddings={cfg.max_position_embeddings}")
    padded = -(-longest // BUCKET) * BUCKET if prompt_len is None else prompt_len
    if longest > padded:
        raise ValueError(f"sample: prompt of {longest} tokens is longer than prompt_len={prompt_len}")
    if cache_len is None:
        cache_len = padded + max_new_tokens
    elif longest + max_new_tokens > cache_len:
        raise ValueError(f"sample: prompt of {longest} tokens + max_new_tokens={max_new_tokens} does not fit "
                         f"cache_len={cache_len}")
    Lp = min(padded, cache_len - max_new_tokens)

    tokens_PL, mask_PL = left_pad(prompts, Lp, pad_id)
    traced = (jnp.float32(temperature if not greedy else 1.0), jnp.float32(top_p), jnp.int32(pad_id))
    static = dict(num_samples=num_samples, max_new=max_new_tokens, cache_len=cache_len, greedy=greedy,
                  top_k=0 if greedy else top_k, use_top_p=not greedy and top_p < 1, eos_ids=eos_ids,
                  vocab_limit=None if vocab_limit is None or vocab_limit >= V else int(vocab_limit))
    return Request(tokens_PL, mask_PL, budget_N, jax.random.key(0) if rng is None else rng, traced, static)


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token rows [P, length] int32, each prompt at the end of its row, and the mask of its tokens."""
    tokens_PL, mask_PL = np.full((len(prompts), length), pad_id, np.int32), np.zeros((len(prompts), length), bool)
    for i, p in enumerate(prompts):
        tokens_PL[i, length - len(p):], mask_PL[i, length - len(p):] = p, True
    return tokens_PL, mask_PL


def prefill(model, prompt_BL, mask_BL, cache: KVCache, media: RowMedia | None = None, layout: RowLayout | None = None):
    """The prompts' prefill into an empty `cache` and the position of each prompt's first new token. With `media`
    (an Omni thinker's prompts, `omni.RowMedia` of the `layout`) the encoders run first and the positions continue
    at the text index + rope delta."""
    start_B = jnp.sum(mask_BL, axis=1, dtype=jnp.int32)
    if media is None:
        return model.hidden(prompt_BL, mask_BL, cache=cache), start_B
    out = model.hidden_rows(prompt_BL, mask_BL, media, layout, cache=cache)
    return out, start_B + media.deltas_B.astype(jnp.int32)


def pick(logits_NV, key, temperature, top_p, *, greedy: bool, top_k: int, use_top_p: bool,
         vocab_limit: int | None):
    """The next token of every row and its log-probability under the raw model (what GSPO needs as the old
    policy's, whatever the sampling settings; `vocab_limit` only restricts the choice)."""
    allowed_NV = logits_NV
    if vocab_limit is not None:
        allowed_NV = jnp.where(jnp.arange(logits_NV.shape[-1]) < vocab_limit, logits_NV, -jnp.inf)
    tok_N = _choose(allowed_NV, key, temperature, top_p, greedy=greedy, top_k=top_k, use_top_p=use_top_p)
    logp_N = jnp.take_along_axis(jax.nn.log_softmax(logits_NV, axis=-1), tok_N[:, None], axis=-1)[:, 0]
    return tok_N, logp_N


def _choose(logits_NV, key, temperature, top_p, *, greedy: bool, top_k: int, use_top_p: bool):
    if greedy:
        return _argmax(logits_NV)
    x_NV = logits_NV / temperature
    if top_k:  # transformers' rule: drop logits below the k-th largest (ties with it stay)
        # min over the k values, not [:, -1]: XLA rewrites a slice of top_k into a full sort of the vocabulary.
        kth_N1 = jnp.min(jax.lax.top_k(x_NV, top_k)[0], axis=-1, keepdims=True)
        x_NV = jnp.where(x_NV < kth_N1, -jnp.inf, x_NV)
    if use_top_p:
        x_NV = jnp.where(_nucleus(jax.nn.softmax(x_NV, axis=-1), top_p), x_NV, -jnp.inf)
    return _categorical(x_NV, key)


def _categorical(x_NV, key, width: int = 256):
    """One draw per row from softmax(x_NV) (-inf excluded), by inverting its CDF at one uniform per row: first
    over the cumulative masses of chunks of `width` ids, then inside the chosen chunk. The cumulative sums are
    matmuls with a triangular ones matrix, at float32 precision: TPUs run default-precision float32 matmuls on
    bfloat16 operands, whose 8-bit mantissas would move the draw. (Gumbel-max noise for the whole [N, V] costs
    ~7% of a decode step; this costs one exp per logit.)"""
    N, V = x_NV.shape
    W = min(width, V)
    C = -(-V // W)
    p_NV = jnp.exp(x_NV - jnp.max(x_NV, axis=-1, keepdims=True))
    p_NCW = jnp.pad(p_NV, ((0, 0), (0, C * W - V))).reshape(N, C, W)
    cumsum = lambda a_NK: jnp.matmul(a_NK, jnp.triu(jnp.ones((a_NK.shape[-1],) * 2, a_NK.dtype)),  # noqa: E731
                                     precision=jax.lax.Precision.HIGHEST)
    cum_NC = cumsum(jnp.sum(p_NCW, axis=-1))
    u_N = jax.random.uniform(key, (N,), cum_NC.dtype) * cum_NC[:, -1]
    c_N = _first_above(cum_NC, u_N)
    before_N = jnp.where(c_N > 0, jnp.take_along_axis(cum_NC, jnp.maximum(c_N - 1, 0)[:, None], axis=-1)[:, 0], 0)
    p_NW = jnp.take_along_axis(p_NCW, c_N[:, None, None], axis=1)[:, 0]
    return c_N * W + _first_above(cumsum(p_NW), u_N - before_N)


def _first_above(cum_NK, u_N):
    """First index whose cumulative mass exceeds u. A zero-mass index repeats its predecessor's sum exactly, so it
    is never the first; when rounding leaves no sum above u, the last index with mass (where the total is first
    reached)."""
    first_N = jnp.sum(cum_NK <= u_N[:, None], axis=-1, dtype=jnp.int32)
    last_N = jnp.sum(cum_NK < cum_NK[:, -1:], axis=-1, dtype=jnp.int32)
    return jnp.minimum(first_N, last_N)


def _argmax(x_NV):
    """First index of each row's maximum. Two plain reductions: XLA:CPU vectorises these, not the fused
    (value, index) reduction of jnp.argmax, which is ~6x slower over a large vocabulary."""
    V = x_NV.shape[-1]
    at_max_NV = x_NV == jnp.max(x_NV, axis=-1, keepdims=True)
    return jnp.min(jnp.where(at_max_NV, jnp.arange(V, dtype=jnp.int32), V - 1), axis=-1)


def _nucleus(probs_NV, top_p):
    """Tokens whose strictly-more-probable mass is < top_p: the sorted-cumsum nucleus, with tied probabilities
    kept or dropped together. Sorting a 150k vocabulary every step costs more than the model's forward pass, so
    the probability threshold is bisected instead, on its float32 bit pattern (monotone for non-negative
    floats): 31 masked sums give the exact threshold."""
    def mass_above(bits_N):
        t_N1 = jax.lax.bitcast_convert_type(bits_N, jnp.float32)[:, None]
        return jnp.sum(jnp.where(probs_NV > t_N1, probs_NV, 0.0), axis=-1)

    def halve(_, lo_hi):  # invariant: mass_above(lo) >= top_p > mass_above(hi)
        lo_N, hi_N = lo_hi
        mid_N = lo_N + (hi_N - lo_N) // 2
        below_N = mass_above(mid_N) < top_p
        return jnp.where(below_N, lo_N, mid_N), jnp.where(below_N, mid_N, hi_N)

    hi_N = jax.lax.bitcast_convert_type(jnp.max(probs_NV, axis=-1), jnp.int32)
    _, hi_N = jax.lax.fori_loop(0, 31, halve, (jnp.zeros_like(hi_N), hi_N))
    return probs_NV >= jax.lax.bitcast_convert_type(hi_N, jnp.float32)[:, None]


_STATIC = ("num_samples", "max_new", "cache_len", "greedy", "top_k", "use_top_p", "eos_ids", "vocab_limit")


@functools.partial(jax.jit, static_argnames=("graphdef", "layout", *_STATIC))
def _generate(graphdef, state, prompt_PL, pmask_PL, media, budget_N, rng, temperature, top_p, pad_id, *, layout,
              num_samples, max_new, cache_len, greedy, top_k, use_top_p, eos_ids, vocab_limit):
    thinker = nnx.merge(graphdef, state)
    model = thinker if media is None else thinker.text  # the decoder
    out, start_P = prefill(thinker, prompt_PL, pmask_PL, KVCache.init(model.cfg, prompt_PL.shape[0], cache_len), media,
                           layout)
    return _decode(model, out, start_P, prompt_PL, pmask_PL, budget_N, rng, temperature, top_p, pad_id,
                   num_samples=num_samples, max_new=max_new, greedy=greedy, top_k=top_k, use_top_p=use_top_p,
                   eos_ids=eos_ids, vocab_limit=vocab_limit)


def _decode(model: Qwen3, out, start_P, prompt_PL, pmask_PL, budget_N, rng, temperature, top_p, pad_id, *,
            num_samples, max_new, greedy, top_k, use_top_p, eos_ids, vocab_limit) -> SampleOutput:
    """From the prefill's output (hidden states and cache of the P prompts) and the position of each prompt's
    first new token, repeat the rows `num_samples` times and decode in a while loop. The token emitted at step t
    is at position start + t (on all three rows of multimodal RoPE)."""
    P, _ = prompt_PL.shape
    N = P * num_samples
    rep = functools.partial(jnp.repeat, repeats=num_samples)

    logits_NV = rep(model.logits(out.hidden_BTE[:, -1:])[:, 0], axis=0)
    # Each prompt's keys (and a Gated DeltaNet's state after the prompt) copied to its samples' rows.
    cache = KVCache(tuple(type(c)(*(constrain(rep(a, axis=1), axes, model.cfg.rules) for a, axes in zip(c, c.AXES)))
                          for c in out.cache.layers),
                    rep(out.cache.valid_BS, axis=0), out.cache.index)
    layers = None
    if model.cfg.kernel_platform() == "cpu":  # see Qwen3.unstack_layers; accelerators slice scanned weights in place
        layers, cache = model.unstack_layers(), cache.unstack()
    next_pos_N = rep(start_P, axis=0)
    eos = jnp.asarray(eos_ids or (-1,), jnp.int32)

    def emit(t, logits_NV, done_N, tokens_NM, mask_NM, logp_NM):
        """Choose token t for the rows still running; rows that are done get pad and mask 0."""
        tok_N, logp_N = pick(logits_NV, jax.random.fold_in(rng, t), temperature, top_p, greedy=greedy, top_k=top_k,
                             use_top_p=use_top_p, vocab_limit=vocab_limit)
        live_N = ~done_N
        tokens_NM = tokens_NM.at[:, t].set(jnp.where(live_N, tok_N, pad_id))
        mask_NM = mask_NM.at[:, t].set(live_N)
        logp_NM = logp_NM.at[:, t].set(jnp.where(live_N, logp_N, 0.0))
        done_N = done_N | (live_N & (jnp.isin(tok_N, eos) | (t + 1 >= budget_N)))
        return tok_N, done_N, tokens_NM, mask_NM, logp_NM

    init = emit(0, logits_NV, jnp.zeros(N, bool), jnp.full((N, max_new), pad_id, jnp.int32),
                jnp.zeros((N, max_new), bool), jnp.zeros((N, max_new), jnp.float32))

    def cond(carry):
        t, _, _, done_N, *_ = carry
        return (t < max_new) & ~jnp.all(done_N)

    def body(carry):
        t, cache, tok_N, done_N, tokens_NM, mask_NM, logp_NM = carry
        out = model.hidden(tok_N[:, None], positions_BT=(next_pos_N + t - 1)[:, None], cache=cache, layers=layers)
        logits_NV = model.logits(out.hidden_BTE)[:, 0]
        return (t + 1, out.cache, *emit(t, logits_NV, done_N, tokens_NM, mask_NM, logp_NM))

    _, _, _, _, tokens_NM, mask_NM, logp_NM = jax.lax.while_loop(cond, body, (jnp.int32(1), cache, *init))
    out = SampleOutput(rep(prompt_PL, axis=0), rep(pmask_PL, axis=0), tokens_NM, mask_NM, logp_NM)
    # Rows over the batch axes as the trainer's batches are: each process then reads its own rows from its devices.
    return SampleOutput(*(constrain(x, ("batch", None), model.cfg.rules) for x in out))


@functools.partial(jax.jit, static_argnames=("graphdef", "image_grid_thw", "video_grid_thw", *_STATIC))
def _generate_multimodal(graphdef, state, prompt_PL, pmask_PL, p, media, budget_N, rng, temperature, top_p, pad_id, *,
                         image_grid_thw, video_grid_thw, num_samples, max_new, cache_len, greedy, top_k, use_top_p,
                         eos_ids, vocab_limit):
    """`_generate` for the Omni thinker: the prefill embeds the media and feeds the placement's 3-D positions."""
    thinker = nnx.merge(graphdef, state)
    x_PLE, deepstack = thinker.embed(prompt_PL, p, **media, image_grid_thw=image_grid_thw,
                                     video_grid_thw=video_grid_thw)
    out = thinker.text.hidden(None, pmask_PL, p.positions_3BT, KVCache.init(thinker.cfg.text, prompt_PL.shape[0],
                                                                            cache_len),
                              embeds_BTE=x_PLE, deepstack=deepstack)
    start_P = pmask_PL.sum(axis=1, dtype=jnp.int32) + p.rope_deltas_B1[:, 0]
    return _decode(thinker.text, out, start_P, prompt_PL, pmask_PL, budget_N, rng, temperature, top_p, pad_id,
                   num_samples=num_samples, max_new=max_new, greedy=greedy, top_k=top_k, use_top_p=use_top_p,
                   eos_ids=eos_ids, vocab_limit=vocab_limit)
