"""Forward + backward time of causal attention at long lengths on the default backend: the platform's kernel
(splash on TPU, cuDNN on GPU, blockwise on CPU) against the whole-matrix reference where it fits.

    python -m bench.bench_attention [--lengths=2048,8192,32768] [--batch=1] [--dtype=bfloat16]

Qwen3-0.6B heads (16 query, 8 KV, head_dim 128), left-padded rows. Prints ms per call (best of 3 after warm-up)
and tokens/s.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from zenjax import sharding
from zenjax.models import attention


def _time(fn, *args) -> float:
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="2048,8192,32768")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    platform = jax.default_backend()
    H, K, D = 16, 8, 128
    print(f"{platform}: {jax.devices()[0].device_kind}, {args.dtype}, batch {args.batch}")
    print(f"{'T':>6} {'kernel ms':>10} {'tok/s':>10} {'reference ms':>13}")
    for T in map(int, args.lengths.split(",")):
        kq, kk, kv = jax.random.split(jax.random.key(T), 3)
        dt = jnp.dtype(args.dtype)
        q = jax.random.normal(kq, (args.batch, T, H, D), dt)
        k, v = (jax.random.normal(key, (args.batch, T, K, D), dt) for key in (kk, kv))
        mask = jnp.arange(T)[None] >= jnp.arange(args.batch)[:, None] * 7  # a few left-padding tokens per row

        def step(f):
            loss = lambda q, k, v: jnp.sum(f(q, k, v, mask).astype(jnp.float32))  # noqa: E731
            return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

        ours = _time(step(lambda *a: attention.attention(*a, platform=platform, rules=sharding.TRAINING)), q, k, v)
        ref = "-"
        if args.batch * H * T * T * 4 < 8e9:  # the reference's [B, H, T, T] scores
            ref = f"{_time(step(attention.reference), q, k, v) * 1e3:.1f}"
        print(f"{T:>6} {ours * 1e3:>10.1f} {args.batch * T / ours:>10.0f} {ref:>13}", flush=True)


if __name__ == "__main__":
    main()
