"""Expert parallelism: training-step time with the experts split over the `expert` mesh axis vs replicated on
every device (pure data parallel), and the bytes the dispatch moves.

    python -m bench.bench_expert_parallel             # 8 simulated CPU devices, or the accelerators present
    python -m bench.bench_expert_parallel --dtype bfloat16 --batch 64 --seq 512

On simulated CPU devices every "device" shares the same cores, so the times show the cost of the extra work
(dispatch, per-device sorting) rather than any speed-up; on real accelerators EP also divides the expert
weights, their gradients and optimizer state by the expert-axis size.

Dispatch bytes per step: the ideal dropless all-to-all moves every (token, choice) pair's hidden vector to its
expert's device and back (tokens x top-k x hidden x bytes x 2 directions x MoE layers, x2 for the backward).
zenjax all-gathers the tokens inside each expert group and reduce-scatters the outputs (what a fixed-size,
dropless all-to-all reserves anyway): tokens x (expert-axis size - 1) x hidden x bytes x 2 x layers x 2.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # CPU only; before jax

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from zenjax import hostmem, sharding  # noqa: E402
from zenjax.models import Qwen3, Qwen3Config, moe  # noqa: E402


def config(dtype: str) -> Qwen3Config:
    return Qwen3Config(vocab_size=8192, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64,
                       intermediate_size=1024, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=256,
                       tie_embeddings=True, dtype=dtype)


def train_step(cfg: Qwen3Config, mesh, tokens):
    """A jitted forward + backward (cross-entropy + load-balance loss) with params created sharded."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Qwen3(cfg, rngs=nnx.Rngs(0))))
    shardings = jax.tree.map(lambda spec: NamedSharding(mesh, sharding.logical_to_spec(tuple(spec), sharding.TRAINING)),
                             nnx.get_partition_spec(abstract), is_leaf=lambda x: isinstance(x, P))
    batch = sharding.named(mesh, ("batch", None), sharding.TRAINING)
    with jax.set_mesh(mesh):
        params = jax.jit(lambda: nnx.state(Qwen3(cfg, rngs=nnx.Rngs(0))), out_shardings=shardings)()
        tokens = jax.device_put(tokens, batch)

        def loss_fn(params, tokens):
            logits, aux = nnx.merge(graphdef, params)(tokens)
            logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
            nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()
            return nll + cfg.router_aux_loss_coef * moe.moe_losses(aux, cfg)["aux_loss"]

        step = jax.jit(jax.value_and_grad(loss_fn), in_shardings=(shardings, batch), out_shardings=(None, shardings))

    def run():
        with jax.set_mesh(mesh):
            loss, grads = step(params, tokens)
            jax.block_until_ready(grads)
        return float(loss)
    gate = params["stacks"][0]["mlp"]["gate"][...]
    return run, gate.addressable_shards[0].data.shape[1]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    cfg = config(args.dtype)
    n = len(jax.devices())
    layouts = {f"replicated experts (data={n})": dict(data=n), f"expert parallel (expert={n})": dict(expert=n)}
    if n >= 4 and n % 2 == 0:
        layouts[f"expert parallel (data=2, expert={n // 2})"] = dict(data=2, expert=n // 2)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq)).astype(np.int32)
    print(f"{n} x {jax.devices()[0].device_kind}; {cfg.num_layers} MoE layers, hidden {cfg.hidden_size}, "
          f"{cfg.num_experts} experts top-{cfg.num_experts_per_tok} x {cfg.moe_intermediate_size}, {args.dtype}, "
          f"batch {args.batch} x {args.seq}")

    runs = {}
    for name, axes in layouts.items():
        run, local_experts = train_step(cfg, sharding.make_mesh(**axes), tokens)
        runs[name] = (run, local_experts, axes.get("expert", 1), run())  # compile + warm up; keep the loss
    best = {name: float("inf") for name in runs}
    for _ in range(args.repeats):  # interleaved, so that background load hits every layout alike
        for name, (run, *_) in runs.items():
            t = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - t)

    T = args.batch * args.seq
    nbytes = jnp.dtype(args.dtype).itemsize
    per_pass = cfg.hidden_size * nbytes * 2 * cfg.num_layers * 2  # x 2 directions x layers x (fwd + bwd)
    ideal = T * cfg.num_experts_per_tok * per_pass
    base = best[next(iter(best))]
    print(f"\n| {'layout':<34} | {'experts/dev':>11} | {'step s':>7} | {'vs repl.':>8} | {'ideal a2a MB':>12} |"
          f" {'moved MB':>8} | loss")
    print(f"|{'-' * 36}|{'-' * 13}|{'-' * 9}|{'-' * 10}|{'-' * 14}|{'-' * 10}|------")
    for name, (_, local, n_ep, loss) in runs.items():
        moved = T * (n_ep - 1) * per_pass  # all-gather + reduce-scatter inside each expert group
        ideal_s = f"{ideal / 1e6:12.1f}" if n_ep > 1 else f"{'-':>12}"
        print(f"| {name:<34} | {local:>11} | {best[name]:7.3f} | {best[name] / base:7.2f}x | {ideal_s} |"
              f" {moved / 1e6:8.1f} | {loss:.5f}")


if __name__ == "__main__":
    hostmem.reexec_with_huge_pages()
    main()
