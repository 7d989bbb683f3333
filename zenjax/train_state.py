"""Sharded train state and the jitted functions the RL loop calls: log-probs, policy update, SFT warm-up.

Params are the pure nested dict of the model's nnx.Param state (the same tree checkpoints and weight
directories hold); each jitted function rebuilds the module with `nnx.merge(graphdef, params)`.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from zenjax import sharding
from zenjax.models import Qwen3, sequence_logprobs
from zenjax.models.hf import ModelConfig, build, is_omni, text_config
from zenjax.rl import losses

Params = Any


def make_optimizer(o: ml_collections.ConfigDict, total_steps: int, lr: float | None = None):
    """AdamW with warm-up + cosine decay and global-norm clipping; returns (tx, schedule)."""
    peak = o.lr if lr is None else lr
    warmup = min(o.warmup_steps, max(total_steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, warmup + 1),
                                                  end_value=peak * o.min_lr_ratio)
    tx = clipped_adamw(schedule, o.grad_clip, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay)
    if o.grad_accum > 1:
        tx = optax.MultiSteps(tx, o.grad_accum)
    return tx, schedule


def clipped_adamw(schedule: optax.Schedule, max_norm: float, *, b1: float, b2: float, weight_decay: float,
                  eps: float = 1e-8) -> optax.GradientTransformation:
    """`optax.chain(optax.clip_by_global_norm(max_norm), optax.adamw(schedule, b1, b2, eps, weight_decay=...))`
    with the same arithmetic up to rounding (the tests compare them), written as one function per parameter so
    that XLA:CPU fuses each parameter's moments and update instead of running the chain's separate tree maps.
    The clip multiplies by one float32 factor where optax selects `g / norm * max_norm`: XLA will not repeat a
    division in each consumer, so that form writes a clipped copy of every gradient first (the MoE benchmark
    model's optimizer step: 147-169 -> 77-79 ms, and 395 MB less scratch). The state is optax's
    ScaleByAdamState; the learning rate is `schedule(count)` before the count is incremented, as in adamw."""
    def init(params):
        zeros = lambda: jax.tree.map(jnp.zeros_like, params)  # noqa: E731
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=zeros(), nu=zeros())

    def update(grads, state, params):
        g_norm = optax.global_norm(grads)
        count = optax.safe_increment(state.count)
        lr = schedule(state.count)
        scale = jnp.where(g_norm < max_norm, 1.0, max_norm / g_norm).astype(jnp.float32)

        def leaf(g, m, v, p):
            g = (g.astype(jnp.float32) * scale).astype(g.dtype)
            m = (1 - b1) * g + b1 * m
            v = (1 - b2) * (g * g) + b2 * v
            m_hat = m / (1 - b1**count).astype(m.dtype)
            v_hat = v / (1 - b2**count).astype(v.dtype)
            return jnp.asarray(-lr, m.dtype) * (m_hat / (jnp.sqrt(v_hat) + eps) + weight_decay * p), m, v

        out = jax.tree.map(leaf, grads, state.mu, state.nu, params)
        part = lambda i: jax.tree.map(lambda _, o: o[i], grads, out)  # noqa: E731
        return part(0), optax.ScaleByAdamState(count=count, mu=part(1), nu=part(2))

    return optax.GradientTransformation(init, update)


@dataclasses.dataclass
class State:
    """What the loop needs to run the model: static graph, sharded params and optimizer state."""
    graphdef: Any
    params: Params
    opt_state: Any
    param_shardings: Any
    opt_shardings: Any

    def model(self, params: Params | None = None) -> Qwen3:
        return nnx.merge(self.graphdef, self.params if params is None else params)


def abstract_state(cfg: ModelConfig, tx, mesh: Mesh, seed: int = 0):
    """(graphdef, abstract params, abstract opt state, param shardings, opt shardings) without allocating."""
    # jax.eval_shape, not nnx.eval_shape: the latter turns logical names into shardings of the current mesh.
    graphdef, abs_state = jax.eval_shape(lambda: nnx.split(build(cfg, rngs=nnx.Rngs(seed))))
    param_sh = sharding.param_shardings(mesh, abs_state, text_config(cfg).rules)
    abs_params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              nnx.to_pure_dict(abs_state), param_sh)
    abs_opt = jax.eval_shape(tx.init, abs_params)
    replicated = NamedSharding(mesh, P())
    # Optimizer moments mirror the params they belong to; counters and other scalars are replicated.
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, abs_opt, param_sh,
                                   transform_non_params=lambda _: replicated)
    opt_sh = jax.tree.map(lambda s: replicated if s is None else s, opt_sh,
                          is_leaf=lambda x: x is None or isinstance(x, NamedSharding))
    abs_opt = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_opt, opt_sh)
    return graphdef, abs_params, abs_opt, param_sh, opt_sh


def rollout_config(cfg: ModelConfig) -> ModelConfig:
    """The policy as the sampler holds it: weights in the compute dtype, placed by the rollout rules."""
    if is_omni(cfg):  # the encoders' weights too; their placement follows the text model's rules
        as_computed = lambda c: dataclasses.replace(c, param_dtype=c.dtype)  # noqa: E731
        return dataclasses.replace(cfg, text=rollout_config(cfg.text), vision=as_computed(cfg.vision),
                                   audio=as_computed(cfg.audio))
    return dataclasses.replace(cfg, param_dtype=cfg.dtype, layout="rollout")


def abstract_rollout_params(cfg: ModelConfig, mesh: Mesh):
    """(graphdef, abstract params with their shardings) of the rollout copy of a `cfg` policy."""
    rcfg = rollout_config(cfg)
    graphdef, abs_state = jax.eval_shape(lambda: nnx.split(build(rcfg, rngs=nnx.Rngs(0))))
    shardings = sharding.param_shardings(mesh, abs_state, text_config(rcfg).rules)
    return graphdef, jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  nnx.to_pure_dict(abs_state), shardings)


def make_rollout_copy(cfg: ModelConfig, mesh: Mesh) -> Callable[[Params], Qwen3]:
    """`copy(params)`: the policy re-laid out for decoding, once per rollout, so that the decode loop reads local
    weights instead of all-gathering the FSDP shards at every token. Cast first: the reshard moves half the bytes."""
    graphdef, abstract = abstract_rollout_params(cfg, mesh)
    out_sh = jax.tree.map(lambda a: a.sharding, abstract)
    cast = jax.jit(lambda p: jax.tree.map(lambda x, a: x.astype(a.dtype), p, abstract), out_shardings=out_sh)
    return lambda params: nnx.merge(graphdef, cast(params))


def init_state(cfg: ModelConfig, tx, mesh: Mesh, seed: int = 0, params: Params | None = None) -> State:
    """Params and optimizer state created directly in their shardings (never whole on one device)."""
    graphdef, _, _, param_sh, opt_sh = abstract_state(cfg, tx, mesh, seed)
    if params is None:
        params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(build(cfg, rngs=nnx.Rngs(seed)))),
                         out_shardings=param_sh)()
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
    return State(graphdef, params, opt_state, param_sh, opt_sh)


@dataclasses.dataclass(frozen=True)
class RLHyper:
    loss: str
    eps_low: float
    eps_high: float
    kl_coef: float
    chunk: int
    completion_len: int | None = None  # targets scored per sequence, the last ones (a rollout's completions)
    logprob_rows: int = 0  # sequences per pass of the log-prob function (0: the whole batch at once)


def _moe_terms(model: Qwen3, aux, global_counts=None):
    """Load-balance / z losses and routing statistics of an MoE forward (nothing for dense models)."""
    if not aux:
        return jnp.float32(0.0), {}
    from zenjax.models import moe  # noqa: PLC0415 - dense-only installs never need it

    cfg = text_config(model.cfg)
    terms = moe.moe_losses(aux, cfg, global_aux=global_counts)
    extra = cfg.router_aux_loss_coef * terms["aux_loss"] + cfg.router_z_loss_coef * terms["z_loss"]
    stats = moe.routing_stats(aux)
    metrics = {"aux_loss": terms["aux_loss"], "z_loss": terms["z_loss"]}
    metrics.update({k: jnp.mean(v) for k, v in stats.items() if k != "expert_fraction"})
    return extra, metrics


def make_functions(state: State, cfg: ModelConfig, tx, hyper: RLHyper, mesh: Mesh, schedule: Callable,
                   layout=None):
    """Jitted `logprobs(params, tokens, mask, media=None, with_entropy=True)` -> (log-probs, entropies or None, MoE
    routing: {} for dense) and
    `update(params, opt_state, minibatch, global_counts)` (the routing's "counts", or None), with shardings
    from the rules. An Omni thinker's rows carry `omni.RowMedia` of the run's `layout` (batch["media"])."""
    graphdef = state.graphdef
    loss_fn = losses.get_loss(hyper.loss)
    cfg = text_config(cfg)

    def forward(params, tokens_NT, mask_NT, media, with_entropy=False):
        model = nnx.merge(graphdef, params)
        res, aux = sequence_logprobs(model, tokens_NT, mask_NT, chunk=hyper.chunk, with_entropy=with_entropy,
                                     last=hyper.completion_len, media=media, layout=layout)
        return model, res, aux

    def one_pass(params, tokens_NT, mask_NT, media, with_entropy):
        _, res, aux = forward(params, tokens_NT, mask_NT, media, with_entropy=with_entropy)
        logp, ent = res if with_entropy else (res, None)
        if not aux:
            return logp, ent, {}
        topk = jnp.moveaxis(aux["topk"], 0, 1).astype(jnp.uint8 if cfg.num_experts <= 256 else jnp.int32)
        return logp, ent, {"topk": topk, "counts": {k: aux[k] for k in ("expert_counts", "tokens")}}

    @functools.partial(jax.jit, static_argnames="with_entropy")
    def logprobs(params, tokens_NT, mask_NT, media=None, with_entropy=True):
        """Per-token log-probs and entropies, and for MoE the routing of the whole batch: every token's top-k
        experts ([N, L, T, k], rows first so minibatches slice them; uint8 saves memory) and the per-layer expert
        counts that global-batch balancing (`balance_global_batch`) pools over all minibatches of the step.
        The policy's entropy is logged from here, once per step, rather than from every update's forward.
        Runs `hyper.logprob_rows` sequences at a time, so memory follows that, not the rollout batch."""
        N = tokens_NT.shape[0]
        size = hyper.logprob_rows or N
        if N % size:
            raise ValueError(f"log-prob pass: {N} sequences are not divisible into passes of {size}")
        if size == N:
            return one_pass(params, tokens_NT, mask_NT, media, with_entropy)
        m = N // size
        # Pass i takes rows i, i + m, i + 2m, ...: a strided split keeps every row on the device that holds it.
        split = lambda a: jnp.moveaxis(a.reshape(size, m, *a.shape[1:]), 1, 0)  # noqa: E731
        join = lambda a: jnp.moveaxis(a, 0, 1).reshape(N, *a.shape[2:])  # noqa: E731
        logp, ent, routing = jax.lax.map(lambda xs: one_pass(params, *xs, with_entropy),
                                         jax.tree.map(split, (tokens_NT, mask_NT, media)))
        if routing:
            routing = {"topk": join(routing["topk"]), "counts": jax.tree.map(lambda c: c.sum(0), routing["counts"])}
        return join(logp), None if ent is None else join(ent), routing

    def update(params, opt_state, batch, global_counts):
        def objective(params):
            model, logp, aux = forward(params, batch["tokens"], batch["mask"], batch.get("media"))
            comp = batch["completion_mask"]
            loss, metrics = loss_fn(logp, batch["old_logp"], batch["adv"], comp, ref_logp_BT=batch.get("ref_logp"),
                                    eps_low=hyper.eps_low, eps_high=hyper.eps_high, kl_coef=hyper.kl_coef)
            extra, moe_metrics = _moe_terms(model, aux, global_counts)
            metrics.update(moe_metrics)
            if "old_topk" in batch and aux:
                from zenjax.models import moe  # noqa: PLC0415

                old = {"topk": jnp.moveaxis(batch["old_topk"], 1, 0)}
                metrics["routing_change"] = moe.routing_change(old, aux, batch["mask"])
            return loss + extra, metrics

        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(params)
        grad_norm = optax.global_norm(grads)

        def apply(params, opt_state):
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        # A non-finite loss or gradient skips the update (counted by the loop) instead of poisoning the weights.
        # A cond rather than a select between old and new state, which costs one more pass over all of it (and
        # keeps XLA from fusing the optimizer's passes: 165 vs 107 ms for the MoE benchmark model).
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # The rate AdamW steps with: its own count of applied steps, not the micro-step (grad_accum > 1).
        lr = schedule(optax.tree_utils.tree_get(opt_state, "count"))
        params, opt_state = jax.lax.cond(finite, apply, lambda *state: state, params, opt_state)
        metrics.update(total_loss=loss, grad_norm=grad_norm, finite=finite.astype(jnp.float32), lr=lr)
        return params, opt_state, metrics

    update = jax.jit(update, in_shardings=(state.param_shardings, state.opt_shardings, None, None),
                     out_shardings=(state.param_shardings, state.opt_shardings, None), donate_argnums=(0, 1))
    return logprobs, update


def make_sft_step(state: State, tx, layout=None):
    """Supervised warm-up: mean cross-entropy of the completion tokens (reference answers)."""
    graphdef = state.graphdef

    def step(params, opt_state, tokens_NT, mask_NT, target_mask_NT, media=None):
        def objective(params):
            logp, _ = sequence_logprobs(nnx.merge(graphdef, params), tokens_NT, mask_NT, media=media, layout=layout)
            return -jnp.sum(logp * target_mask_NT) / jnp.maximum(jnp.sum(target_mask_NT), 1)

        loss, grads = jax.value_and_grad(objective)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, in_shardings=(state.param_shardings, None, None, None, None, None),
                   out_shardings=(state.param_shardings, None, None), donate_argnums=(0, 1))
