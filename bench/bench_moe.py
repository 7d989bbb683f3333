"""MoE throughput: the dropless ragged experts vs the every-expert reference path, a dense model with the same
active parameters, and transformers' Qwen3MoeForCausalLM (torch, same threads).

    python -m bench.bench_moe                   # float32 on the default JAX backend; transformers on CPU only
    python -m bench.bench_moe --only train --repeats 2

A training step is forward + backward of the mean next-token cross-entropy, scored as the trainer scores it
(`sequence_logprobs`, no [B, T, V] float32 logits), plus the load-balance loss for MoE as transformers adds it;
no optimizer. Generation is greedy, every sequence runs the full budget.
Runs of a phase are interleaved and the best of `--repeats` is kept, so load from other processes hits every row
alike.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time

import jax
import numpy as np
from flax import nnx

from bench.bench_model import decode_ceiling, hf_generate, hf_model, stream_bandwidth
from zenjax import hostmem
from zenjax.models import Qwen3, Qwen3Config, moe, sequence_logprobs

BASE = dict(vocab_size=32768, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64,
            tie_embeddings=True, max_position_embeddings=4096, dtype="float32")
MOE = Qwen3Config(**BASE, intermediate_size=1536, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=384)
DENSE = Qwen3Config(**BASE, intermediate_size=4 * 384)  # the same active parameters per token


def interleaved_best(runners: dict, repeats: int) -> dict:
    """Best wall time of each runner, the runs interleaved so that load from other processes hits all alike."""
    for run in runners.values():
        run()  # compile / warm up
    best = {name: float("inf") for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            t = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def jax_train(cfg: Qwen3Config, tokens):
    graphdef, params = nnx.split(nnx.jit(lambda: Qwen3(cfg, rngs=nnx.Rngs(0)))())
    mask = np.ones(tokens.shape, bool)

    @jax.jit
    def grads(params, tokens):
        def loss_fn(params):  # the trainer's log-prob path (the LM head without [B, T, V] float32 logits)
            logp, aux = sequence_logprobs(nnx.merge(graphdef, params), tokens, mask)
            return -logp.mean() + cfg.router_aux_loss_coef * moe.moe_losses(aux, cfg)["aux_loss"]
        return jax.grad(loss_fn)(params)

    return lambda: jax.block_until_ready(grads(params, tokens))


def jax_generate(cfg: Qwen3Config, prompts, new: int):
    from zenjax.sampling import sample  # noqa: PLC0415 - written alongside; the bench runs without it

    model = nnx.jit(lambda: Qwen3(cfg, rngs=nnx.Rngs(0)))()
    return lambda: sample(model, prompts, max_new_tokens=new, rng=None, greedy=True).tokens.block_until_ready()


def hf_train(cfg: Qwen3Config, tokens):
    import torch  # noqa: PLC0415

    model = hf_model(cfg).train()
    ids = torch.tensor(np.asarray(tokens), dtype=torch.long)

    def run():
        out = model(input_ids=ids, labels=ids, output_router_logits=True)  # loss includes coef * aux_loss
        out.loss.backward()
        model.zero_grad(set_to_none=True)
    return run


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256, help="training sequence length")
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--only", default="all", choices=["all", "train", "generate"])
    args = p.parse_args()

    backend = jax.default_backend()
    use_hf = backend == "cpu"
    threads = len(os.sched_getaffinity(0))
    if use_hf:
        import torch  # noqa: PLC0415
        torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, MOE.vocab_size, (args.batch, args.seq)).astype(np.int32)
    prompts = rng.integers(0, MOE.vocab_size, (args.batch, args.prompt)).tolist()
    print(f"backend={backend} threads={threads} float32; MoE: {MOE.num_experts} experts top-{MOE.num_experts_per_tok}"
          f" x {MOE.moe_intermediate_size}; dense: {DENSE.intermediate_size}; {MOE.num_layers} layers, hidden"
          f" {MOE.hidden_size}, vocab {MOE.vocab_size}")

    runners, counts = {}, {}  # name -> run(), tokens per run
    if args.only in ("all", "train"):
        for name, cfg in (("MoE ragged", MOE), ("dense, same active params", DENSE),
                          ("MoE reference (every expert)", dataclasses.replace(MOE, moe_impl="reference"))):
            runners[f"train {name}"] = jax_train(cfg, tokens)
        if use_hf:
            runners["train transformers MoE"] = hf_train(MOE, tokens)
        counts.update({name: args.batch * args.seq for name in runners})
    if args.only in ("all", "generate"):
        try:
            runners["generate MoE ragged"] = jax_generate(MOE, prompts, args.new)
        except ImportError:
            print("zenjax.sampling not available: our generation skipped")
        if use_hf:
            runners["generate transformers MoE"] = hf_generate(MOE, prompts, args.new)
        counts.update({name: args.batch * args.new for name in runners if name.startswith("generate")})
    best = {}  # each phase's runs interleaved among themselves: a transformers generate slows what follows it
    for phase in ("train", "generate"):
        best.update(interleaved_best({k: v for k, v in runners.items() if k.startswith(phase)}, args.repeats))
    rows = {name: counts[name] / t for name, t in best.items()}

    print(f"\n| {f'batch {args.batch}: train {args.seq}, generate {args.prompt}+{args.new}':<36} | {'tok/s':>7} |"
          f" {'s/run':>6} |")
    print(f"|{'-' * 38}|{'-' * 9}|{'-' * 8}|")
    for name, tps in rows.items():
        print(f"| {name:<36} | {tps:7.0f} | {best[name]:6.2f} |")
    checks = [("MoE step time / dense step time", "train dense, same active params", "train MoE ragged", "<= 1.4"),
              ("MoE ragged / reference tok/s", "train MoE ragged", "train MoE reference (every expert)", ">= 2"),
              ("MoE ragged / transformers train tok/s", "train MoE ragged", "train transformers MoE", ">= 2"),
              ("generation / transformers tok/s", "generate MoE ragged", "generate transformers MoE", "")]
    for label, a, b, target in checks:
        if a in rows and b in rows:
            print(f"{label}: {rows[a] / rows[b]:.2f}{'  (target ' + target + ')' if target else ''}")
    if "generate MoE ragged" in rows:
        bandwidth = stream_bandwidth(MOE.dtype, args.batch)
        prefill = interleaved_best({"prefill": jax_generate(MOE, prompts, 1)}, args.repeats)["prefill"]
        ceiling = decode_ceiling(MOE, args.batch, args.prompt, args.new, bandwidth, prefill)
        print(f"generation roofline (prefill {1e3 * prefill:.0f} ms, then only weights and KV cache read at "
              f"{bandwidth / 1e9:.1f} GB/s): {ceiling:.0f} tok/s")


if __name__ == "__main__":
    hostmem.reexec_with_huge_pages()
    main()
