"""Rollout engines side by side: the continuous engine (S slots refilled as sequences end) against the static
sampler run on the same sequences in batches of S, at equal KV-cache memory (S rows x (prompt + max_new)).

    python -m bench.bench_engine                       # dense and MoE benchmark models, float32
    python -m bench.bench_engine --only moe --dtype bfloat16

Completion lengths are long-tailed: each row's length is drawn geometrically with mean max_new / 4 (capped at
max_new) and given to both samplers as its per-row budget, so both decode exactly the same tokens. No EOS ids, so
a random model's samples never end a row early. The first token of a row comes from its prefill; the static
sampler's decode loop runs until the longest row of its batch ends. Occupancy is the tokens decode steps produced
over slot-steps. The in-order bound is the fewest decode steps of any engine that places the queue in order
(lengths are unknown until a sequence ends): a long row placed late drains alone, whatever the engine.
"""
from __future__ import annotations

import argparse
import dataclasses
import heapq
import time

import jax
import numpy as np
from flax import nnx

from bench.bench_model import CFG
from bench.bench_moe import MOE
from zenjax import engine, hostmem, sampling
from zenjax.models import Qwen3, Qwen3Config


def budgets_for(n: int, max_new: int, seed: int) -> np.ndarray:
    """Per-row completion lengths: geometric with mean max_new / 4, in [1, max_new]."""
    return np.minimum(np.random.default_rng(seed).geometric(4 / max_new, n), max_new).astype(np.int32)


def in_order_steps(budgets: np.ndarray, slots: int) -> int:
    """Decode steps of the best schedule that places sequences in queue order into the first free slot (lengths
    are unknown until a sequence ends): the last slot to drain ends the step."""
    free_at = [0] * slots
    for b in budgets:
        heapq.heappush(free_at, heapq.heappop(free_at) + int(b) - 1)  # the first token comes from the prefill
    return max(free_at)


def run_static(model, prompts, budgets, *, group: int, slots: int, max_new: int, rng) -> dict:
    """The static sampler over the rows in batches of `slots` rows (slots // group prompts each)."""
    per = slots // group
    steps = tokens = 0
    t = time.perf_counter()
    for b in range(0, len(prompts), per):
        rows = budgets[b * group:(b + per) * group]
        out = sampling.sample(model, prompts[b:b + per], num_samples=group, max_new_tokens=max_new,
                              rng=jax.random.fold_in(rng, b), budgets=rows.tolist())
        mask = np.asarray(jax.block_until_ready(out).mask)
        steps, tokens = steps + int(mask.sum(1).max()) - 1, tokens + int(mask.sum())  # first tokens: prefill
    wall = time.perf_counter() - t
    return dict(steps=steps, tokens=tokens, occupancy=(tokens - len(budgets)) / (steps * slots), wall=wall)


def run_engine(model, prompts, budgets, *, group: int, slots: int, max_new: int, rng) -> dict:
    t = time.perf_counter()
    out, stats = engine.sample(model, prompts, slots=slots, num_samples=group, max_new_tokens=max_new, rng=rng,
                               budgets=budgets.tolist())
    tokens = int(np.asarray(jax.block_until_ready(out).mask).sum())
    wall = time.perf_counter() - t
    steps = int(stats["decode_steps"])
    return dict(steps=steps, tokens=tokens, occupancy=int(stats["slot_tokens"]) / (steps * slots), wall=wall,
                refills=int(stats["refills"]))


def bench(name: str, cfg: Qwen3Config, args) -> None:
    model = nnx.jit(lambda: Qwen3(cfg, rngs=nnx.Rngs(0)))()
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, cfg.vocab_size, (args.prompts, args.prompt_len)).tolist()
    n = args.prompts * args.group
    budgets = budgets_for(n, args.max_new, 1)
    kw = dict(group=args.group, slots=args.slots, max_new=args.max_new, rng=jax.random.key(0))
    runs = {}
    for label, fn in (("static", run_static), ("continuous", run_engine)):
        fn(model, prompts, budgets, **kw)  # compile / warm up
        runs[label] = min((fn(model, prompts, budgets, **kw) for _ in range(args.repeats)), key=lambda r: r["wall"])
    s, c = runs["static"], runs["continuous"]
    assert s["tokens"] == c["tokens"] == budgets.sum(), (s["tokens"], c["tokens"], budgets.sum())
    print(f"\n{name}: {args.prompts} prompts x {args.group} = {n} sequences, prompt {args.prompt_len}, max_new "
          f"{args.max_new}, {args.slots} slots; {c['tokens']} tokens (mean {budgets.mean():.0f}, "
          f"max {budgets.max()}); {c['refills']} refills")
    print(f"| {'sampler':<10} | decode steps | occupancy | wall s | tok/s |")
    print("|---|---|---|---|---|")
    for label, r in runs.items():
        print(f"| {label:<10} | {r['steps']} | {r['occupancy']:.0%} | {r['wall']:.2f} | {r['tokens'] / r['wall']:.0f} |")
    bound = in_order_steps(budgets, args.slots)
    print(f"in-order bound (any engine placing the queue in order): {bound} decode steps, occupancy "
          f"{(c['tokens'] - n) / (bound * args.slots):.0%}")
    print(f"continuous vs static: {s['steps'] / c['steps']:.2f}x fewer decode steps, "
          f"{s['wall'] / c['wall']:.2f}x tokens/s")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--only", default="all", choices=["all", "dense", "moe"])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--slots", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-new", type=int, default=512)
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args()
    print(f"backend={jax.default_backend()} devices={jax.devices()} dtype={args.dtype}")
    if args.only in ("all", "dense"):
        bench("dense (bench_model)", Qwen3Config(**CFG, dtype=args.dtype), args)
    if args.only in ("all", "moe"):
        bench("MoE (bench_moe)", dataclasses.replace(MOE, dtype=args.dtype), args)


if __name__ == "__main__":
    hostmem.reexec_with_huge_pages()
    main()
