"""What a config costs before it runs: parameters, FLOPs per token and per-device memory on its mesh.

    python -m zenjax.plan --config=configs/next.py [--config.mesh.expert=8 ...] [--devices=64] [--chip=v5p]

Nothing is allocated: the model and the trainer's sharded train state are built with nnx.eval_shape /
jax.eval_shape on an abstract mesh, with shardings from the same logical rules the trainer uses.

Notation: L layers, H query and K kv heads of width D, E hidden, V vocab, F dense / f expert SwiGLU width,
X experts of which k per token, S = data.max_prompt_len + rl.max_new_tokens, b bytes of the compute dtype,
t = mesh.tensor.
- Training FLOPs per token = 6 N + 12 L H D S. N counts the parameters of every matmul a token passes through:
  attention, router, its k experts (or the dense MLP) and the LM head (counted even when tied: the logits matmul
  runs either way), not the embedding lookup or norm scales. 12 L H D S is QK^T and PV (4 H D S per layer
  forward, x3 with backward) over the whole S: the blockwise CPU attention computes every block (splash on TPU
  skips the fully masked half, so its hardware FLOPs are lower).
  Remat adds one more forward (2 N + 4 L H D S) of hardware FLOPs, not counted.
- Activations kept for backward, bytes per token per layer:
  E (8 + 6 b)               two RMSNorms keep float32 inputs; norm outputs, attention and MLP outputs, residuals
  + b (4 H D + 4 K D) / t   q and k (projected, normed, rotated), v, the attention context
  + (4 + b) H s / t         float32 scores and compute-dtype probabilities of one key block, s = min(S, 512)
                            (models/attention.py: blockwise on CPU, splash tiles on TPU)
  + 4 F b / t               dense SwiGLU: gate, up, silu, product
  | c (2 E b + 4 f b / t)   MoE (models/moe.py): the expert-sorted buffer in, out and its SwiGLU; dropless, it has
      + 2 n E b + 8 X       c = n min(k, X / n) rows per token for n = mesh.expert (the n devices' tokens are
                            all-gathered, then summed back); float32 router logits and probabilities
  Saved: all L layers without remat; with remat only each layer's input (E b), the layer being differentiated
  is recomputed. On top, the backward's working set: 1.5 layers, or the LM-head chunk (float32 logits and their
  gradient for rl.logprob_chunk positions) when that is larger. The constants follow XLA's buffer assignment
  for small float32 models on CPU (training within ~15%, the forward within ~50%; tests/test_plan.py). XLA's TPU
  programs agree within 2x (tests/test_compile.py); `python -m zenjax.compile` gives their exact figures.
- Per device: params, gradients and optimizer state are summed over shard shapes of the real train state.
  Peak = params + optimizer state (+ the KL reference's params when rl.kl_coef > 0) + the largest of (gradients +
  training activations), the old-log-prob forward over one pass of rl.logprob_batch sequences (one layer's scores
  and half its other terms, or one chunk of float32 logits, live; plus the hidden states) and the rollout: its KV
  cache (2 L S K D b per decode slot: every sequence of the batch for the static sampler, rl.slots for the
  continuous engine, which when 0 gets as many slots as fit in HEADROOM of the chip next to the rest) and, with
  rl.rollout_copy, the compute-dtype copy of the policy in the rollout
  layout (zenjax.sharding.ROLLOUT: replicated over fsdp). The sampler's other temporaries (prefill activations)
  are not modelled: the compile tool has them.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
from absl import flags
from flax import nnx
from jax.sharding import AbstractMesh, Mesh

from zenjax import cli, sharding
from zenjax.chips import CHIPS
from zenjax.config import BATCH_AXES, logprob_rows, model_config_from, validate
from zenjax.models import Qwen3Config, attention
from zenjax.models.hf import ModelConfig, build, is_omni, text_config
from zenjax.rl import rewards, sandbox
from zenjax.train_state import abstract_rollout_params, abstract_state, make_optimizer

GIB = 2**30
HEADROOM = 0.9  # above this fraction of a chip's memory, warn that it is tight


@dataclasses.dataclass(frozen=True)
class ParamCount:
    total: int  # every parameter once (a tied head is the embedding)
    active: int  # what one token uses: all but the experts it is not routed to
    embedding: int
    lm_head: int  # 0 when tied
    experts: int  # all experts' SwiGLU weights
    experts_active: int  # k of X of them
    matmul_active: int  # N of the FLOP formula
    vision: int = 0  # an Omni thinker's encoders: in the total, not in `active` (they run on media, not on text)
    audio: int = 0

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding - self.lm_head


def abstract_model(cfg: ModelConfig):
    return nnx.eval_shape(lambda: build(cfg, rngs=nnx.Rngs(0)))


def count_params(cfg: ModelConfig) -> ParamCount:
    """Counts from the abstract model's parameters, classified by their logical axis names (and an Omni thinker's
    by tower)."""
    state = nnx.state(abstract_model(cfg), nnx.Param)
    axes = nnx.to_pure_dict(nnx.get_partition_spec(state))
    shapes = nnx.to_pure_dict(state)
    sums = {"embedding": 0, "lm_head": 0, "experts": 0, "norms": 0, "other": 0, "visual": 0, "audio_tower": 0}

    def add(path, spec, leaf):
        if is_omni(cfg):
            if path[0].key != "text":
                sums[path[0].key] += math.prod(leaf.shape)
                return
            path = path[1:]
        top = path[0].key
        kind = ("embedding" if top == "embed" else "lm_head" if top == "lm_head"
                else "experts" if "expert_mlp" in spec else "norms" if spec[-1] == "norm" else "other")
        sums[kind] += math.prod(leaf.shape)

    jax.tree_util.tree_map_with_path(add, axes, shapes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    text = text_config(cfg)
    experts_active = sums["experts"] * text.num_experts_per_tok // text.num_experts if text.num_experts else 0
    total, encoders = sum(sums.values()), sums["visual"] + sums["audio_tower"]
    return ParamCount(
        total=total, active=total - encoders - sums["experts"] + experts_active, embedding=sums["embedding"],
        lm_head=sums["lm_head"], experts=sums["experts"], experts_active=experts_active,
        matmul_active=sums["other"] + experts_active + text.vocab_size * text.hidden_size,
        vision=sums["visual"], audio=sums["audio_tower"])


def train_flops_per_token(cfg: Qwen3Config, seq_len: int, counts: ParamCount | None = None) -> float:
    """6 N + 12 L H D S (see the module docstring)."""
    counts = counts or count_params(cfg)
    return 6 * counts.matmul_active + 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len


def _layer_bytes(cfg: Qwen3Config, moe: bool, seq_len: int, tensor: int, expert: int) -> tuple[float, float]:
    """Activation bytes one token keeps for backward in one layer, as (attention scores, everything else)."""
    b = jnp.dtype(cfg.dtype).itemsize
    E, H, K, D = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    scores = (4 + b) * H * min(seq_len, attention.BLOCK) / tensor
    other = E * (8 + 6 * b) + b * (4 * H * D + 4 * K * D) / tensor
    if moe:
        rows = expert * min(cfg.num_experts_per_tok, cfg.num_experts // expert)
        buffer = rows * (2 * E * b + 4 * cfg.moe_intermediate_size * b / tensor)
        return scores, other + buffer + 2 * expert * E * b + 8 * cfg.num_experts
    return scores, other + 4 * cfg.intermediate_size * b / tensor


def _head_chunk_bytes(cfg: Qwen3Config, rows: int, seq_len: int, chunk: int, tensor: int, copies: int) -> float:
    return rows * min(chunk, seq_len) * cfg.vocab_size / tensor * 4 * copies


def activation_bytes(cfg: Qwen3Config, rows: int, seq_len: int, *, tensor: int = 1, expert: int = 1,
                     chunk: int = 512, remat: bool) -> float:
    """Training activations of `rows` sequences on one device (module docstring)."""
    tokens = rows * seq_len
    layers = [(n, *_layer_bytes(cfg, moe, seq_len, tensor, expert)) for moe, n in cfg.segments()]
    if remat:
        saved = tokens * cfg.num_layers * cfg.hidden_size * jnp.dtype(cfg.dtype).itemsize
    else:
        # Attention probabilities are recomputed in backward (custom VJP), so only the working layer holds them.
        saved = tokens * sum(n * other for n, _, other in layers)
    working = max(1.5 * tokens * max(scores + other for _, scores, other in layers),
                  _head_chunk_bytes(cfg, rows, seq_len, chunk, tensor, copies=2))
    return saved + working


def logprob_forward_bytes(cfg: Qwen3Config, rows: int, seq_len: int, *, tensor: int = 1, expert: int = 1,
                          chunk: int = 512) -> float:
    """Old log-probs: a forward over the whole rollout batch, one layer (or the head chunk) live at a time."""
    tokens = rows * seq_len
    # The float32 attention scores (the softmax is applied in their buffer) and about half of what a layer would
    # keep for backward.
    scores = 4 * cfg.num_heads * min(seq_len, attention.BLOCK) / tensor
    one = tokens * max(scores + _layer_bytes(cfg, moe, seq_len, tensor, expert)[1] / 2 for moe, _ in cfg.segments())
    hidden = 2 * tokens * cfg.hidden_size * jnp.dtype(cfg.dtype).itemsize
    return max(one, _head_chunk_bytes(cfg, rows, seq_len, chunk, tensor, copies=1)) + hidden


def kv_cache_bytes(cfg: Qwen3Config, rows: int, seq_len: int, *, tensor: int = 1) -> float:
    """Decode memory of `rows` sequences: the attention layers' keys and values, and a Qwen3-Next's Gated DeltaNet
    states (the conv's last W - 1 inputs and the float32 delta-rule state: the same at any length)."""
    b = jnp.dtype(cfg.dtype).itemsize
    full = cfg.num_layers // cfg.full_attention_interval if cfg.hybrid else cfg.num_layers
    kv = 2 * full * rows * seq_len * cfg.num_kv_heads / tensor * cfg.head_dim * b
    if cfg.hybrid:
        G, H, K, V = (cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                      cfg.linear_value_head_dim)
        conv = (cfg.linear_conv_kernel_dim - 1) * (2 * G * K + H * V) * b
        kv += (cfg.num_layers - full) * rows * (conv + H * K * V * 4) / tensor
    return kv


def abstract_train_state(config: ml_collections.ConfigDict, mesh: Mesh | AbstractMesh):
    """The trainer's (abstract params, abstract optimizer state), each leaf a ShapeDtypeStruct with its sharding."""
    cfg = model_config_from(config.model)
    tx, _ = make_optimizer(config.optim, config.steps * config.rl.minibatches)
    _, params, opt_state, _, _ = abstract_state(cfg, tx, mesh, config.seed)
    return params, opt_state


def device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


@dataclasses.dataclass(frozen=True)
class Plan:
    name: str
    cfg: Qwen3Config
    counts: ParamCount
    mesh: dict[str, int]
    seq_len: int
    rollout_rows: int  # sequences per rollout batch (all devices)
    minibatch_rows: int  # sequences per update (all devices)
    flops_per_token: float
    params: int  # bytes per device from here on
    grads: int
    opt_state: int
    activations: float  # with the config's remat setting
    activations_other: float  # with it flipped
    logprob_forward: float
    kv_cache: float
    slots: int  # sequences decoded at once (all devices): the engine's slots, or the whole batch
    reference: int  # the KL reference policy's params (0 without a KL penalty)
    rollout_copy: int  # the policy copy the sampler decodes from (0 with rl.rollout_copy off)
    chip: str | None
    scoring: str = ""  # what the code reward's sandbox costs per step ("" without it)

    @property
    def devices(self) -> int:
        return math.prod(self.mesh.values())

    @property
    def batch_shards(self) -> int:
        return math.prod(self.mesh[a] for a in BATCH_AXES)

    @property
    def peak(self) -> float:
        return self.params + self.opt_state + self.reference + max(self.grads + self.activations, self.logprob_forward,
                                                                   self.kv_cache + self.rollout_copy)

    def warnings(self) -> list[str]:
        if self.chip is None:
            return []
        cap = CHIPS[self.chip].hbm * GIB
        if self.peak > cap:
            out = [f"does not fit: peak {self.peak / GIB:.1f} GiB > {self.chip} {CHIPS[self.chip].hbm} GiB per chip"]
            if self.rollout_copy and self.peak - self.rollout_copy <= cap:
                out.append(f"the rollout copy of the policy ({self.rollout_copy / GIB:.1f} GiB) does not fit next to "
                           "the training state: --config.rl.rollout_copy=False decodes from the training state "
                           "(its weights all-gathered at every token)")
            return out
        if self.peak > HEADROOM * cap:
            return [f"tight: peak {self.peak / GIB:.1f} GiB is over {HEADROOM:.0%} of {self.chip}'s "
                    f"{CHIPS[self.chip].hbm} GiB per chip"]
        return []


def fixed_devices(mesh: ml_collections.ConfigDict) -> int:
    """The devices a mesh config names without its -1 axis (which then gets one)."""
    return math.prod(max(int(mesh[a]), 1) for a in sharding.MESH_AXES)


def rollout_slots(config: ml_collections.ConfigDict, sizes: dict[str, int], fixed: float, hbm: float | None) -> int:
    """Sequences the rollout decodes at once: the whole batch for the static sampler; for the continuous engine
    rl.slots, or when 0 as many whole batch shards of slots as fit in HEADROOM of `hbm` bytes per device next to
    `fixed` bytes (training state and rollout copy), at most the batch; the batch when `hbm` is unknown."""
    rl = config.rl
    rows = rl.prompts_per_step * rl.group_size
    if rl.engine == "static":
        return rows
    if rl.slots or hbm is None:
        return min(rl.slots or rows, rows)
    shards = math.prod(sizes[a] for a in BATCH_AXES)
    cfg = text_config(model_config_from(config.model))
    per_row = kv_cache_bytes(cfg, 1, config.data.max_prompt_len + rl.max_new_tokens, tensor=sizes["tensor"])
    local = int(max(HEADROOM * hbm - fixed, 0) // per_row)
    return max(shards, min(rows, local * shards) // shards * shards)


def scoring_cost(config: ml_collections.ConfigDict, rows: int) -> str:
    """The code reward's worst case per step on this host: `rows` programs, each up to wall_s, on its workers,
    cut at deadline_s ("" when the config has no code reward)."""
    weights, options = rewards.split(config.rewards)
    if "code" not in weights:
        return ""
    o = options.get("code", {})
    default = {k: p.default for k, p in inspect.signature(rewards.code_reward).parameters.items()}
    workers = o.get("workers", default["workers"]) or os.cpu_count()
    wall, deadline = o.get("wall_s", sandbox.Limits.wall_s), o.get("deadline_s", default["deadline_s"])
    worst = math.ceil(rows / workers) * wall
    cut = (f"cut at deadline_s={deadline:g} s (programs unfinished then score 0)" if deadline
           else "no deadline_s: a step waits for all of them")
    whose = "" if o.get("workers") else " (this host's cores)"
    return (f"code reward  {rows} programs/step on {workers} workers{whose}, up to wall_s={wall:g} s each: "
            f"{worst:g} s if all run to their limit; {cut}")


def plan(config: ml_collections.ConfigDict, num_devices: int | None = None, chip: str | None = None,
         hbm: float | None = None) -> Plan:
    """All the numbers for `config` on `num_devices` (default: the product of the mesh's fixed axes); the
    engine's slots are sized to `hbm` bytes per device, else to the chip's."""
    if chip is not None and chip not in CHIPS:
        raise ValueError(f"unknown chip {chip!r}; known: {', '.join(CHIPS)}")
    if num_devices is None:
        num_devices = fixed_devices(config.mesh)
    sizes = validate(config, num_devices=num_devices, num_processes=1)
    model_cfg = model_config_from(config.model)
    cfg, counts = text_config(model_cfg), count_params(model_cfg)
    mesh = AbstractMesh(tuple(sizes[a] for a in sharding.MESH_AXES), sharding.MESH_AXES)
    params, opt_state = abstract_train_state(config, mesh)
    rl, t, n = config.rl, sizes["tensor"], sizes["expert"]
    seq = config.data.max_prompt_len + rl.max_new_tokens
    rollout = rl.prompts_per_step * rl.group_size
    copy = device_bytes(abstract_rollout_params(model_cfg, mesh)[1]) if rl.rollout_copy else 0
    shards = math.prod(sizes[a] for a in BATCH_AXES)
    mb_local = rollout // rl.minibatches // shards
    ref = device_bytes(params) if rl.kl_coef > 0 else 0
    hbm = hbm if hbm is not None else CHIPS[chip].hbm * GIB if chip else None
    slots = rollout_slots(config, sizes, device_bytes(params) + device_bytes(opt_state) + ref + copy, hbm)
    act = {r: activation_bytes(cfg, mb_local, seq, tensor=t, expert=n, chunk=rl.logprob_chunk, remat=r)
           for r in (True, False)}
    return Plan(
        name=config.name, cfg=cfg, counts=counts, mesh=sizes, seq_len=seq, rollout_rows=rollout,
        minibatch_rows=rollout // rl.minibatches, flops_per_token=train_flops_per_token(cfg, seq, counts),
        # Gradients have the params' dtype and shardings.
        params=device_bytes(params), grads=device_bytes(params), opt_state=device_bytes(opt_state),
        activations=act[cfg.remat], activations_other=act[not cfg.remat],
        logprob_forward=logprob_forward_bytes(cfg, logprob_rows(rl) // shards, seq, tensor=t, expert=n,
                                              chunk=rl.logprob_chunk),
        kv_cache=kv_cache_bytes(cfg, slots // shards, seq, tensor=t), slots=slots,
        reference=ref, rollout_copy=copy, chip=chip, scoring=scoring_cost(config, rollout))


def si(n: float, unit: str = "") -> str:
    """3 significant-ish digits with an SI prefix: 596.0M, 32.32B (counts use B for 1e9); bytes ("B") with a binary
    one (12.5 GiB), the unit of the chips' HBM."""
    prefixes = ((1e15, "P"), (1e12, "T"), (1e9, "B" if not unit else "G"), (1e6, "M"), (1e3, "k"))
    if unit == "B":
        prefixes = tuple((2.0 ** (10 * e), p + "i") for e, p in ((5, "P"), (4, "T"), (3, "G"), (2, "M"), (1, "K")))
    for scale, prefix in prefixes:
        if abs(n) >= scale:
            digits = max(0, 3 - len(str(int(n // scale))))
            return f"{n / scale:.{digits}f}" + (f" {prefix}{unit}" if unit else prefix)
    return f"{n:.0f}" + (f" {unit}" if unit else "")


def _row(label: str, n: float, note: str = "") -> str:
    return f"  {label:<30} {si(n, 'B'):>9}" + (f"   {note}" if note else "")


def format_plan(p: Plan, hf_model_id: str = "") -> str:
    cfg, c = p.cfg, p.counts
    arch = (f"{cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_heads}/{cfg.num_kv_heads} heads x "
            f"{cfg.head_dim}, vocab {cfg.vocab_size}")
    arch += (f", {cfg.num_experts} experts top-{cfg.num_experts_per_tok} x {cfg.moe_intermediate_size}"
             if cfg.num_experts else f", mlp {cfg.intermediate_size}")
    head = "tied (the embedding)" if cfg.tie_embeddings else si(c.lm_head)
    lines = [
        f"{p.name}" + (f" ({hf_model_id})" if hf_model_id else ""),
        f"  {arch}",
        f"parameters   total {si(c.total)} ({c.total:,})   active {si(c.active)} ({c.active:,})",
        f"  embedding {si(c.embedding)}   lm head {head}   non-embedding {si(c.non_embedding)}",
    ]
    if cfg.num_experts:
        lines.append(f"  experts {si(c.experts)}, active {si(c.experts_active)}")
    if c.vision or c.audio:
        lines.append(f"  encoders: vision {si(c.vision)}, audio {si(c.audio)} (in the total; active counts a text "
                     "token's)")
    step_tokens = p.rollout_rows * p.seq_len
    lines += [
        f"training FLOPs/token  {si(p.flops_per_token, 'FLOP')} = 6 x {si(c.matmul_active)} + 12 x "
        f"{cfg.num_layers} x {cfg.num_heads} x {cfg.head_dim} x {p.seq_len}",
        f"  per GSPO step (gradient passes over {p.rollout_rows} x {p.seq_len} tokens): "
        f"{si(p.flops_per_token * step_tokens, 'FLOP')}",
        f"mesh  {' '.join(f'{a}={s}' for a, s in p.mesh.items())}  "
        f"({p.devices} device{'s' * (p.devices > 1)}, batch over {p.batch_shards})",
        f"  sequence {p.seq_len}; rollout {p.rollout_rows} seqs ({p.rollout_rows // p.batch_shards}/device); "
        f"minibatch {p.minibatch_rows} ({p.minibatch_rows // p.batch_shards}/device)",
        "per-device memory",
        _row(f"params ({cfg.param_dtype})", p.params),
        _row("gradients", p.grads),
        _row("optimizer state", p.opt_state),
        *([_row("KL reference params", p.reference)] if p.reference else []),
        _row(f"activations, remat {'on' if cfg.remat else 'off'}", p.activations,
             f"(remat {'off' if cfg.remat else 'on'}: {si(p.activations_other, 'B')})"),
        _row("old log-prob forward", p.logprob_forward),
        _row(f"rollout KV cache ({cfg.dtype})", p.kv_cache,
             f"({p.slots} {'decode slots' if p.slots < p.rollout_rows else 'sequences, the whole batch'})"),
        _row(f"rollout weights copy ({cfg.dtype})", p.rollout_copy, "" if p.rollout_copy else "(rl.rollout_copy off)"),
        _row("peak", p.peak),
    ]
    if p.chip:
        lines.append(f"{p.chip}: {CHIPS[p.chip].hbm} GiB per chip, peak uses {p.peak / (CHIPS[p.chip].hbm * GIB):.0%}")
    lines.append("not modelled: the sampler's prefill" + ("" if p.rollout_copy else " and gathered weights")
                 + (", the encoders' activations" if c.vision or c.audio else "")
                 + " (python -m zenjax.compile counts every buffer)")
    if p.scoring:
        lines.append(p.scoring)
    lines += [f"WARNING: {w}" for w in p.warnings()]
    return "\n".join(lines)


FLAGS = flags.FLAGS


def main(config: ml_collections.ConfigDict, argv: list[str]) -> None:
    del argv
    # Shapes only: never claim an accelerator a training job on this host may be using.
    jax.config.update("jax_platforms", "cpu")
    try:
        p = plan(config, FLAGS.devices, FLAGS.chip)
    except ValueError as e:
        raise cli.UserError(cli.message(e)) from None
    print(format_plan(p, config.hf_model_id))
    if FLAGS.devices is None and -1 in config.mesh.values():
        print("note: the mesh's -1 axis was given 1 device; pass --devices=N to plan for an N-chip slice")


if __name__ == "__main__":
    # Defined here, not at import: zenjax.train defines its own --config and tests import both modules.
    flags.DEFINE_string("config", None, cli.CONFIG_HELP)
    flags.DEFINE_integer("devices", None, "devices to plan for (default: the product of the mesh's fixed axes)")
    flags.DEFINE_enum("chip", None, list(CHIPS), "accelerator: warn when the peak does not fit its memory")
    cli.run(main)
