"""Prompts -> G completions each -> rewards -> group advantages -> one training batch.

Multi-process runs: every process passes the same global prompt list, so the jitted sampler sees the same
(replicated) inputs everywhere. Its outputs stay on the devices, rows split over the batch axes; each process
fetches only its own `rows` (whole groups: advantages stay local) from its own devices, decodes and scores them;
the metrics cover the whole batch.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from zenjax import engine, sampling
from zenjax.models.omni import RowLayout, RowMedia, row_media
from zenjax.rl import losses, rewards


@jax.jit
def sequences(out: sampling.SampleOutput) -> dict:
    """Prompt and completion as one sequence, on device; masks and log-probs aligned with the targets
    tokens[:, 1:], so position t of `completion_mask` / `sampler_logp` describes token t+1."""
    n, lp = out.prompt_tokens.shape
    lead = jnp.zeros((n, lp - 1), jnp.float32)
    cmask = out.mask.astype(jnp.float32)
    return {
        "tokens": jnp.concatenate([out.prompt_tokens, out.tokens], axis=1).astype(jnp.int32),
        "mask": jnp.concatenate([out.prompt_mask, out.mask], axis=1),
        "completion_mask": jnp.concatenate([lead, cmask], axis=1),
        "sampler_logp": jnp.concatenate([lead, out.logprobs.astype(jnp.float32) * cmask], axis=1),
    }


def decode(tokenizer, out: sampling.SampleOutput) -> list[str]:
    toks, mask = np.asarray(out.tokens), np.asarray(out.mask, bool)
    return [tokenizer.decode([int(t) for t in row[m] if t not in tokenizer.eos_ids]) for row, m in zip(toks, mask)]


def _fetch(x: jax.Array) -> np.ndarray:
    """The whole array on this host, also when some of its shards live on other processes."""
    return np.asarray(x) if x.is_fully_addressable else multihost_utils.process_allgather(x, tiled=True)


def _own_rows(x: jax.Array, rows: np.ndarray) -> np.ndarray:
    """Rows `rows` of a row-split array, read from this process's devices only."""
    if x.is_fully_addressable:
        return np.asarray(x)[rows]
    shards = {s.index[0].start or 0: s.data for s in x.addressable_shards}  # replicas of a shard: read once
    held = np.concatenate([np.arange(start, start + shards[start].shape[0]) for start in sorted(shards)])
    pos = np.minimum(np.searchsorted(held, rows), len(held) - 1)
    if not np.array_equal(held[pos], rows):
        raise ValueError("rollout rows are not on this process's devices: pass the rows of its batch shards")
    return np.concatenate([np.asarray(shards[start]) for start in sorted(shards)])[pos]


def media_rows(cfg, items: list[dict], layout: RowLayout, ids, mask):
    """`omni.RowMedia` (host numpy) of token rows `ids` / `mask` that hold the items' prompts, one row per item
    (left-padded prompts as the sampler takes them: `sampling.left_pad`)."""
    stack = lambda k, on: np.stack([it[k] for it in items]) if on else None  # noqa: E731
    return row_media(cfg, ids, mask, layout, stack("pixels", layout.image_grids),
                     stack("features", layout.audio_frames))


def _rows_like(x: np.ndarray, like: jax.Array) -> jax.Array:
    """A host array, the same on every process, split over its rows as `like` is (the sampler's output)."""
    s = like.sharding
    if not isinstance(s, NamedSharding):
        return jnp.asarray(x)
    sh = NamedSharding(s.mesh, PartitionSpec(s.spec[0] if s.spec else None, *(None,) * (x.ndim - 1)))
    return jax.make_array_from_callback(x.shape, sh, lambda index: x[index])


def generate(model, items: list[dict], tokenizer, rl, rng: jax.Array, *, num_samples: int, prompt_len: int,
             greedy: bool = False, engine_name: str | None = None, layout: RowLayout | None = None,
             media: RowMedia | None = None) -> tuple[sampling.SampleOutput, dict[str, int]]:
    """Completions of the same `items` on every process, on device (rows over the batch axes), finished, and the
    continuous engine's counters (none for the static sampler). Prompts are padded to `prompt_len` tokens, so
    that the sampler and the training functions compile once per run. `engine_name` overrides rl.engine.
    An Omni thinker's items carry their media of the run's `layout` ("pixels", "features"); `media` are their
    `media_rows` at `prompt_len`, made here when not given."""
    kw = dict(num_samples=num_samples, max_new_tokens=rl.max_new_tokens, rng=rng, temperature=rl.temperature,
              top_k=rl.top_k, top_p=rl.top_p, eos_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_id, greedy=greedy,
              prompt_len=prompt_len, vocab_limit=tokenizer.vocab_size)
    prompts = [it["prompt_ids"] for it in items]
    if layout is not None:
        if media is None:
            media = media_rows(model.cfg, items, layout, *sampling.left_pad(prompts, prompt_len, tokenizer.pad_id))
        kw.update(media=media, layout=layout)
    if (engine_name or rl.engine) == "static":
        return jax.block_until_ready(sampling.sample(model, prompts, **kw)), {}
    slots = min(rl.slots or len(prompts) * num_samples, len(prompts) * num_samples)  # 0: one slot per row
    out, stats = engine.sample(model, prompts, slots=slots, **kw)
    return jax.block_until_ready(out), {"slots": slots, **{k: int(v) for k, v in stats.items()}}


def fetch_all(out: sampling.SampleOutput) -> sampling.SampleOutput:
    """Every row as numpy on every host (evaluation batches are small)."""
    return sampling.SampleOutput(*map(_fetch, out))


def _allgather_json(value) -> list:
    """`value` (JSON-serialisable) of every process, in process order."""
    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    size = int(multihost_utils.process_allgather(np.int32(len(data))).max())
    gathered = multihost_utils.process_allgather(np.pad(data, (0, size - len(data))))
    return [json.loads(bytes(row).rstrip(b"\0")) for row in gathered]  # JSON text never holds a NUL


def _whole_batch(r: np.ndarray, lengths: np.ndarray, info: dict, rows: np.ndarray,
                 n: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """All n rewards and completion lengths and the reward info of the whole batch, from each process's share."""
    if jax.process_count() == 1:
        return r, lengths, info
    gathered = _allgather_json({"rows": rows.tolist(), "r": r.tolist(), "len": lengths.tolist(), "info": info})
    shares = list({tuple(s["rows"]): s for s in gathered}.values())  # a batch replicated over processes counts once
    r_all, len_all = np.zeros(n, np.float32), np.zeros(n, np.int64)
    for s in shares:
        r_all[s["rows"]], len_all[s["rows"]] = s["r"], s["len"]
    merged = {}
    for k in sorted(set().union(*(s["info"] for s in shares))):
        values = [s["info"].get(k, 0) for s in shares]
        if k.endswith("/mean"):  # means over each share's rows; failure counts add up; times: the slowest
            merged[k] = sum(v * len(s["rows"]) for v, s in zip(values, shares)) / n
        else:
            merged[k] = max(values) if k.endswith("time_s") else sum(values)
    return r_all, len_all, merged


def collect(model, items: list[dict], tokenizer, rl, reward_weights, rng: jax.Array, *,
            prompt_len: int, rows: np.ndarray | None = None, overlap: Callable[[dict], dict] | None = None,
            layout: RowLayout | None = None):
    """One rollout batch of len(items) * group_size rows, grouped [p0 g0..g(G-1), p1 ...], its metrics and this
    process's texts. `reward_weights` is the config's `rewards` section: weights, and options such as the code
    reward's per-step `deadline_s` (`rewards.split`).

    `items` are the global batch (the same on every process); this process fetches, decodes and scores its `rows`
    (default all), which must be whole groups and held by its devices. The batch's sequences stay on device, whole;
    its "adv" are this process's rows, as numpy. `overlap(batch)`, when given, is called before the host work
    with the device batch: what it dispatches (the old-log-prob pass) runs while rewards are scored, and the
    arrays it returns join the batch."""
    G, n = rl.group_size, len(items) * rl.group_size
    rows = np.arange(n) if rows is None else np.asarray(rows)
    if len(rows) % G or not np.array_equal(rows, (rows[::G, None] // G * G + np.arange(G)).ravel()):
        raise ValueError(f"rollout rows must be whole groups of {G}: each process scores its own prompts")
    t0 = time.perf_counter()
    media = None
    if layout is not None:
        ids, mask = sampling.left_pad([it["prompt_ids"] for it in items], prompt_len, tokenizer.pad_id)
        media = media_rows(model.cfg, items, layout, ids, mask)
    out, counters = generate(model, items, tokenizer, rl, rng, num_samples=G, prompt_len=prompt_len, layout=layout,
                             media=media)
    t1 = time.perf_counter()
    batch = sequences(out)
    if media is not None:  # each row's media, for the log-prob and update passes
        batch["media"] = jax.tree.map(lambda x: _rows_like(np.repeat(x, G, axis=0), out.tokens), media)
    if overlap is not None:
        batch.update(overlap(batch))
    mine = sampling.SampleOutput(*(_own_rows(x, rows) for x in out))
    texts = decode(tokenizer, mine)
    r, info = rewards.score(texts, [items[i // G] for i in rows], dict(reward_weights))
    batch["adv"] = np.asarray(losses.group_advantages(r, G, scale_std=rl.scale_std))
    r, lengths, info = _whole_batch(r, mine.mask.sum(1), info, rows, n)
    by_group = r.reshape(-1, G)
    metrics: dict[str, Any] = {
        "reward_mean": float(r.mean()), "reward_std": float(r.std()), "reward_max": float(r.max()),
        "zero_adv_groups": float(np.mean(by_group.max(1) == by_group.min(1))),
        "completion_len_mean": float(lengths.mean()), "completion_len_max": int(lengths.max()),
        "time_sampling": t1 - t0, "time_rewards": time.perf_counter() - t1,
        "sampled_tokens": int(lengths.sum()),
    }
    if counters:  # the continuous engine's: decode steps, the fraction of slot-steps that made a token, refills
        metrics.update(decode_steps=counters["decode_steps"], refills=counters["refills"],
                       slot_occupancy=counters["slot_tokens"] / max(counters["decode_steps"] * counters["slots"], 1))
    metrics.update({f"reward/{k}": v for k, v in info.items() if isinstance(v, (int, float)) and k != "reward_time_s"})
    return batch, metrics, texts
