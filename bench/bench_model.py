"""Foundation throughput: a training step and greedy generation, zenjax vs transformers (torch, CPU).

    python -m bench.bench_model                     # float32 on the default JAX backend
    python -m bench.bench_model --dtype bfloat16    # e.g. on a GPU; transformers is skipped off-CPU

MFU is measured against the peak of a 2048^3 matmul in the compute dtype, timed in this process.
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from zenjax import hostmem
from zenjax.models import Qwen3, Qwen3Config, sequence_logprobs
from zenjax.sampling import sample

CFG = dict(vocab_size=32768, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64,
           intermediate_size=1536, tie_embeddings=True, max_position_embeddings=4096)


def best_time(fn, repeats: int) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def matmul_peak(dtype) -> float:
    a = jnp.ones((2048, 2048), dtype)
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=dtype))
    return 2 * 2048 ** 3 / best_time(lambda: f(a, a).block_until_ready(), 10)


def stream_bandwidth(dtype, batch: int) -> float:
    """Bytes/s at which XLA streams a 256 MiB weight (beyond any cache) through a [batch, 512] x [512, N] matmul:
    the rate at which a decode step, which reads every weight once, can read them."""
    w = jnp.ones((512, (256 << 20) // (512 * jnp.dtype(dtype).itemsize)), dtype)
    x = jnp.ones((batch, 512), dtype)
    f = jax.jit(lambda x, w: x @ w)
    return w.nbytes / best_time(lambda: f(x, w).block_until_ready(), 10)


def decode_ceiling(cfg: Qwen3Config, batch: int, prompt: int, new: int, bandwidth: float, prefill: float) -> float:
    """Generated tokens/s if, after a prefill of `prefill` seconds (measured: the prompt and the first token), each
    decode step did nothing but read, at `bandwidth`, the weights it uses and the KV cache (at its mean length):
    attention math, norms and sampling free. No implementation on this backend passes it. The tied embedding is
    read once, as the LM head; an MoE step reads the experts that at least one of the `batch` tokens chose, in
    expectation under uniform routing."""
    n = jnp.dtype(cfg.dtype).itemsize
    E, L, X = cfg.hidden_size, cfg.num_layers, cfg.num_experts
    attn = E * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    if X:
        used = X * (1 - (1 - cfg.num_experts_per_tok / X) ** batch)
        mlp = used * 3 * E * cfg.moe_intermediate_size + E * X
    else:
        mlp = 3 * E * cfg.intermediate_size
    head = E * cfg.vocab_size  # tied or not, one [E, V] matrix is read whole; embedding rows are only gathered
    kv = 2 * L * batch * cfg.num_kv_heads * cfg.head_dim * (prompt + new / 2)
    step = n * (L * (attn + mlp) + head + kv) / bandwidth
    return batch * new / (prefill + (new - 1) * step)


def train_flops_per_token(cfg: Qwen3Config, seq: int) -> float:
    """6 x matmul params (attention, MLP, LM head) + attention scores and values over the full sequence."""
    E, H, K, D, F = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    layer = E * D * (2 * H + 2 * K) + 3 * E * F
    return 6 * (cfg.num_layers * layer + E * cfg.vocab_size) + 12 * cfg.num_layers * H * D * seq


def jax_train(cfg, tokens, steps):
    model = Qwen3(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tx = optax.adamw(1e-4)
    opt = tx.init(params)
    mask = jnp.ones(tokens.shape, bool)

    def step(params, opt, tokens):
        def loss_fn(params):
            logp, _ = sequence_logprobs(nnx.merge(graphdef, params), tokens, mask)
            return -logp.mean()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    step = jax.jit(step, donate_argnums=(0, 1))
    state = [params, opt]

    def run():
        state[0], state[1], loss = step(state[0], state[1], tokens)
        loss.block_until_ready()
    return best_time(run, steps)


def jax_generate(cfg, prompts, new, repeats):
    model = Qwen3(cfg, rngs=nnx.Rngs(0))

    def run():  # no EOS: every row generates all `new` tokens
        sample(model, prompts, max_new_tokens=new, rng=None, greedy=True).tokens.block_until_ready()
    return best_time(run, repeats)


def hf_model(cfg: Qwen3Config):
    """transformers' Qwen3ForCausalLM, or Qwen3MoeForCausalLM for an MoE config, with random weights."""
    import torch  # noqa: PLC0415 - only for the reference
    import transformers  # noqa: PLC0415

    torch.manual_seed(0)
    hf = cfg.to_hf()
    hf.pop("torch_dtype")
    if cfg.num_experts:
        model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**hf))
    else:
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**hf))
    return model.to(getattr(torch, cfg.dtype))


def hf_train(cfg, tokens, steps):
    import torch  # noqa: PLC0415

    model = hf_model(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.tensor(np.asarray(tokens), dtype=torch.long)

    def run():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return best_time(run, steps)


def hf_generate(cfg, prompts, new):
    """A function that runs transformers' greedy generation of exactly `new` tokens per prompt."""
    import torch  # noqa: PLC0415

    model = hf_model(cfg).eval()
    ids = torch.tensor(prompts)

    def run():
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
        assert out.shape[1] == ids.shape[1] + new
    return run


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256, help="training sequence length")
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hf", default="auto", choices=["auto", "yes", "no"],
                   help="run transformers too (auto: only on a CPU backend)")
    p.add_argument("--only", default="all", choices=["all", "train", "generate"])
    args = p.parse_args()

    cfg = Qwen3Config(**CFG, dtype=args.dtype)
    backend = jax.default_backend()
    use_hf = args.hf == "yes" or (args.hf == "auto" and backend == "cpu")
    threads = len(os.sched_getaffinity(0))
    if use_hf:
        import torch  # noqa: PLC0415
        torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    train_tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (args.batch, args.seq)), jnp.int32)
    prompts = rng.integers(0, cfg.vocab_size, (args.batch, args.prompt)).tolist()

    peak = matmul_peak(jnp.dtype(args.dtype))
    print(f"backend={backend} devices={jax.devices()} threads={threads} dtype={args.dtype} batch={args.batch}")
    print(f"matmul 2048^3 peak: {peak / 1e9:.0f} GFLOP/s")
    rows = []
    if args.only in ("all", "train"):
        n = args.batch * args.seq
        ours = n / jax_train(cfg, train_tokens, args.repeats)
        mfu = ours * train_flops_per_token(cfg, args.seq) / peak
        ref = n / hf_train(cfg, train_tokens, args.repeats) if use_hf else None
        rows.append((f"train step (seq {args.seq}) tok/s", ours, ref, f"MFU {mfu:.0%}"))
    if args.only in ("all", "generate"):
        n = args.batch * args.new
        ours = n / jax_generate(cfg, prompts, args.new, args.repeats)
        ref = n / best_time(hf_generate(cfg, prompts, args.new), args.repeats) if use_hf else None
        bandwidth = stream_bandwidth(cfg.dtype, args.batch)
        print(f"weight streaming, [{args.batch}, 512] x [512, N] over 256 MiB: {bandwidth / 1e9:.1f} GB/s")
        prefill = jax_generate(cfg, prompts, 1, args.repeats)
        ceiling = decode_ceiling(cfg, args.batch, args.prompt, args.new, bandwidth, prefill)
        rows.append((f"generate ({args.prompt}+{args.new}, greedy) tok/s", ours, ref,
                     f"{1e3 * args.batch / ours:.1f} ms/token step, prefill included; roofline {ceiling:.0f}, prefill "
                     f"{1e3 * prefill:.0f} ms"))
    print(f"\n| {'metric':<36} | {'zenjax':>9} | {'transformers':>12} | {'ratio':>6} | note")
    print(f"|{'-' * 38}|{'-' * 11}|{'-' * 14}|{'-' * 8}|------")
    for name, ours, ref, note in rows:
        ref_s, ratio = (f"{ref:12.0f}", f"{ours / ref:5.2f}x") if ref else (f"{'-':>12}", f"{'-':>6}")
        print(f"| {name:<36} | {ours:9.0f} | {ref_s} | {ratio} | {note}")


if __name__ == "__main__":
    hostmem.reexec_with_huge_pages()
    main()
