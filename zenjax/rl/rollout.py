"""Prompts -> G completions each -> rewards -> group advantages -> one training batch (host numpy).

Multi-process runs: every process passes the same global prompt list, so the jitted sampler sees the same
(replicated) inputs everywhere, and gets every completion back. Each process then scores and batches only
its own `rows` (whole groups: advantages stay local); the metrics cover the whole batch.
"""
from __future__ import annotations

import json
import time
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from zenjax import sampling
from zenjax.rl import losses, rewards


def to_batch(out: sampling.SampleOutput, rewards_N: np.ndarray, group_size: int, scale_std: bool) -> dict:
    """Concatenate prompt and completion into one sequence; masks and log-probs aligned with the targets
    tokens[:, 1:], so position t of `completion_mask` / `sampler_logp` describes token t+1."""
    prompt, pmask = np.asarray(out.prompt_tokens), np.asarray(out.prompt_mask, bool)
    comp, cmask = np.asarray(out.tokens), np.asarray(out.mask, bool)
    n, lp = prompt.shape
    lead = np.zeros((n, lp - 1), np.float32)
    return {
        "tokens": np.concatenate([prompt, comp], axis=1).astype(np.int32),
        "mask": np.concatenate([pmask, cmask], axis=1),
        "completion_mask": np.concatenate([lead, cmask.astype(np.float32)], axis=1),
        "sampler_logp": np.concatenate([lead, np.asarray(out.logprobs, np.float32) * cmask], axis=1),
        "adv": np.asarray(losses.group_advantages(rewards_N, group_size, scale_std=scale_std)),
    }


def decode(tokenizer, out: sampling.SampleOutput) -> list[str]:
    toks, mask = np.asarray(out.tokens), np.asarray(out.mask, bool)
    return [tokenizer.decode([int(t) for t in row[m] if t not in tokenizer.eos_ids]) for row, m in zip(toks, mask)]


def _fetch(x: jax.Array) -> np.ndarray:
    """The whole array on this host, also when some of its shards live on other processes."""
    return np.asarray(x) if x.is_fully_addressable else multihost_utils.process_allgather(x, tiled=True)


def generate(model, items: list[dict], tokenizer, rl, rng: jax.Array, *, num_samples: int, prompt_len: int,
             greedy: bool = False) -> sampling.SampleOutput:
    """Completions of the same `items` on every process; all rows come back as numpy on every host. Prompts are
    padded to `prompt_len` tokens, so that the sampler and the training functions compile once per run."""
    out = sampling.sample(model, [it["prompt_ids"] for it in items], num_samples=num_samples,
                          max_new_tokens=rl.max_new_tokens, rng=rng, temperature=rl.temperature, top_k=rl.top_k,
                          top_p=rl.top_p, eos_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_id, greedy=greedy,
                          prompt_len=prompt_len, vocab_limit=tokenizer.vocab_size)
    return sampling.SampleOutput(*map(_fetch, out))


def _allgather_json(value) -> list:
    """`value` (JSON-serialisable) of every process, in process order."""
    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    size = int(multihost_utils.process_allgather(np.int32(len(data))).max())
    gathered = multihost_utils.process_allgather(np.pad(data, (0, size - len(data))))
    return [json.loads(bytes(row).rstrip(b"\0")) for row in gathered]  # JSON text never holds a NUL


def _whole_batch(r: np.ndarray, info: dict, rows: np.ndarray, n: int) -> tuple[np.ndarray, dict]:
    """All n rewards and the reward info of the whole batch, from each process's share."""
    if jax.process_count() == 1:
        return r, info
    gathered = _allgather_json({"rows": rows.tolist(), "r": r.tolist(), "info": info})
    shares = list({tuple(s["rows"]): s for s in gathered}.values())  # a batch replicated over processes counts once
    r_all = np.zeros(n, np.float32)
    for s in shares:
        r_all[s["rows"]] = s["r"]
    merged = {}
    for k in sorted(set().union(*(s["info"] for s in shares))):
        values = [s["info"].get(k, 0) for s in shares]
        if k.endswith("/mean"):  # means over each share's rows; failure counts add up; times: the slowest
            merged[k] = sum(v * len(s["rows"]) for v, s in zip(values, shares)) / n
        else:
            merged[k] = max(values) if k.endswith("time_s") else sum(values)
    return r_all, merged


def collect(model, items: list[dict], tokenizer, rl, reward_weights: dict[str, float], rng: jax.Array, *,
            prompt_len: int, rows: np.ndarray | None = None):
    """One rollout batch of len(items) * group_size rows, grouped [p0 g0..g(G-1), p1 ...], and its metrics.

    `items` are the global batch (the same on every process); this process keeps `rows` (default all), which
    must be whole groups, for decoding, rewards and the returned batch and texts."""
    G, n = rl.group_size, len(items) * rl.group_size
    rows = np.arange(n) if rows is None else np.asarray(rows)
    if len(rows) % G or not np.array_equal(rows, (rows[::G, None] // G * G + np.arange(G)).ravel()):
        raise ValueError(f"rollout rows must be whole groups of {G}: each process scores its own prompts")
    t0 = time.perf_counter()
    out = generate(model, items, tokenizer, rl, rng, num_samples=G, prompt_len=prompt_len)
    t1 = time.perf_counter()
    mine = sampling.SampleOutput(*(x[rows] for x in out))
    texts = decode(tokenizer, mine)
    r, info = rewards.score(texts, [items[i // G] for i in rows], dict(reward_weights))
    batch = to_batch(mine, r, G, rl.scale_std)
    r, info = _whole_batch(r, info, rows, n)
    lengths = out.mask.sum(1)
    by_group = r.reshape(-1, G)
    metrics: dict[str, Any] = {
        "reward_mean": float(r.mean()), "reward_std": float(r.std()), "reward_max": float(r.max()),
        "zero_adv_groups": float(np.mean(by_group.max(1) == by_group.min(1))),
        "completion_len_mean": float(lengths.mean()), "completion_len_max": int(lengths.max()),
        "time_sampling": t1 - t0, "time_rewards": time.perf_counter() - t1,
        "sampled_tokens": int(lengths.sum()),
    }
    metrics.update({f"reward/{k}": v for k, v in info.items() if isinstance(v, (int, float)) and k != "reward_time_s"})
    return batch, metrics, texts
