"""One full GSPO iteration, phase by phase: sampling, old log-probs, rewards, minibatch updates.

    python -m bench.bench_gspo                   # float32 (CPU)
    python -m bench.bench_gspo --dtype bfloat16  # e.g. on a GPU

4 prompts x G=8 completions, 32-token prompts, 128-token completions (no EOS, so every row is full length),
4 minibatch updates with the GSPO-token loss, on the foundation's mid-size dense config and the MoE config of
the MoE benchmark. Prints the time split and tokens/s of each phase (best of a few iterations after warm-up).
"""
from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from configs import base
from zenjax import hostmem, sharding
from zenjax.models import Qwen3Config
from zenjax.rl import rollout
from zenjax.train_state import RLHyper, init_state, make_functions, make_optimizer

SHAPE = dict(vocab_size=32768, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64,
             max_position_embeddings=4096)
CONFIGS = {
    "dense": dict(SHAPE, intermediate_size=1536, tie_embeddings=True),
    "moe": dict(SHAPE, intermediate_size=1536, tie_embeddings=True, num_experts=16, num_experts_per_tok=4,
                moe_intermediate_size=384),
}
P, G, PROMPT, NEW, MINIBATCHES = 4, 8, 32, 128, 4


class IdsTokenizer:
    """Decodes ids as numbers so the math reward has text to score; no EOS so completions are full length."""
    eos_ids: tuple = ()
    pad_id = 0
    vocab_size = SHAPE["vocab_size"]

    def decode(self, ids):
        return " ".join(map(str, ids))


def iteration(cfg: Qwen3Config, repeats: int):
    config = base.get_config()
    config.rl.update(prompts_per_step=P, group_size=G, max_new_tokens=NEW, minibatches=MINIBATCHES,
                     loss="gspo_token", temperature=1.0, logprob_chunk=256)
    mesh = sharding.make_mesh(data=1, devices=jax.devices()[:1])
    tx, schedule = make_optimizer(config.optim, 1000)
    hyper = RLHyper("gspo_token", 3e-4, 4e-4, 0.0, 256, completion_len=NEW)
    rng = np.random.default_rng(0)
    items = [{"id": str(i), "prompt_ids": rng.integers(3, cfg.vocab_size, PROMPT).tolist(), "answer": "7",
              "prompt": ""} for i in range(P)]
    with jax.set_mesh(mesh):
        state = init_state(cfg, tx, mesh)
        logprobs_fn, update_fn = make_functions(state, cfg, tx, hyper, mesh, schedule)
        best = None
        for it in range(repeats + 1):  # the first iteration compiles
            t0 = time.perf_counter()
            batch, metrics, _ = rollout.collect(state.model(), items, IdsTokenizer(), config.rl, {"math": 1.0},
                                                jax.random.key(it), prompt_len=PROMPT)
            t1 = time.perf_counter()
            old_logp, _, routing = logprobs_fn(state.params, batch["tokens"], batch["mask"])
            batch["old_logp"] = np.asarray(old_logp)
            del batch["sampler_logp"]
            t2 = time.perf_counter()
            size = P * G // MINIBATCHES
            for i in range(MINIBATCHES):
                mb = {k: v[i * size:(i + 1) * size] for k, v in batch.items()}
                state.params, state.opt_state, m = update_fn(state.params, state.opt_state, mb,
                                                             routing.get("counts"))
            jax.block_until_ready(m)
            t3 = time.perf_counter()
            times = dict(sampling=metrics["time_sampling"], rewards=metrics["time_rewards"],
                         other=t1 - t0 - metrics["time_sampling"] - metrics["time_rewards"],
                         old_logprobs=t2 - t1, updates=t3 - t2, total=t3 - t0)
            if it and (best is None or times["total"] < best["total"]):
                best = times
    seq_tokens = P * G * (PROMPT + NEW)
    return best, {"sampling": P * G * NEW, "old_logprobs": seq_tokens, "updates": seq_tokens}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    hostmem.keep_freed_memory()  # as the trainer does
    print(f"backend {jax.default_backend()}, dtype {args.dtype}; {P} prompts x G={G}, {PROMPT}+{NEW} tokens, "
          f"{MINIBATCHES} minibatch updates")
    print(f"{'config':6} {'phase':13} {'seconds':>8} {'share':>6} {'tokens/s':>9}")
    for name, shape in CONFIGS.items():
        cfg = Qwen3Config(**shape, dtype=args.dtype)
        times, tokens = iteration(cfg, args.repeats)
        for phase in ("sampling", "old_logprobs", "rewards", "updates", "other", "total"):
            tps = f"{tokens[phase] / times[phase]:9.0f}" if phase in tokens else " " * 9
            print(f"{name:6} {phase:13} {times[phase]:8.3f} {times[phase] / times['total']:6.1%} {tps}")


if __name__ == "__main__":
    hostmem.reexec_with_huge_pages()
    main()
