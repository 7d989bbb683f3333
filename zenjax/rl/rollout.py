"""Prompts -> G completions each -> rewards -> group advantages -> one training batch (host numpy)."""
from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np

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


def generate(model, items: list[dict], tokenizer, rl, rng: jax.Array, *, num_samples: int, greedy: bool = False):
    return sampling.sample(model, [it["prompt_ids"] for it in items], num_samples=num_samples,
                           max_new_tokens=rl.max_new_tokens, rng=rng, temperature=rl.temperature, top_k=rl.top_k,
                           top_p=rl.top_p, eos_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_id, greedy=greedy)


def collect(model, items: list[dict], tokenizer, rl, reward_weights: dict[str, float], rng: jax.Array):
    """One rollout batch of len(items) * group_size rows, grouped [p0 g0..g(G-1), p1 ...], and its metrics."""
    G = rl.group_size
    t0 = time.perf_counter()
    out = generate(model, items, tokenizer, rl, rng, num_samples=G)
    jax.block_until_ready(out.tokens)
    t1 = time.perf_counter()
    texts = decode(tokenizer, out)
    r, info = rewards.score(texts, [it for it in items for _ in range(G)], dict(reward_weights))
    batch = to_batch(out, r, G, rl.scale_std)
    lengths = np.asarray(out.mask).sum(1)
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
