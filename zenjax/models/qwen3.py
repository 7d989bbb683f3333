"""Qwen3 dense and Qwen3-MoE decoder in Flax NNX.

Layers of the same shape are stacked (a leading `layers` axis) and run with `jax.lax.scan`, so a 36-layer
model compiles one layer body per layer kind. The MLP slot holds a dense SwiGLU or an MoE block.
Norms, RoPE, softmax and logits are computed in float32 whatever the compute dtype.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zenjax.models.attention import attention
from zenjax.sharding import LAYOUTS, constrain, platform

# Logical axis names live on the Variables; creating them must not need a mesh.
flax.config.update("flax_always_shard_variable", False)


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    vocab_size: int = 151936
    hidden_size: int = 1024
    num_layers: int = 28
    num_heads: int = 16
    num_kv_heads: int = 8
    head_dim: int = 128  # Qwen3 sets it explicitly; it is not always hidden_size // num_heads
    intermediate_size: int = 3072
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    # Multimodal RoPE (the Qwen3-Omni thinker): positions are [3, B, T] (time, row, column); the interleaved
    # frequency split of `apply_mrope`, summing to head_dim // 2. Empty: plain RoPE on [B, T] positions.
    mrope_section: tuple[int, ...] = ()
    tie_embeddings: bool = True
    max_position_embeddings: int = 40960
    dtype: str = "bfloat16"  # compute dtype of matmuls
    param_dtype: str = "float32"
    remat: bool = False  # recompute each layer in the backward pass instead of storing its activations
    # Qwen3-MoE (num_experts == 0 means dense)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    router_aux_loss_coef: float = 0.001
    router_z_loss_coef: float = 0.0
    # Qwen3-Next (0 means Qwen3): every n-th layer full attention, the others Gated DeltaNet (models/deltanet.py);
    # with it come the gated attention, zero-centred RMSNorms and the MoE's shared expert.
    full_attention_interval: int = 0
    partial_rotary_factor: float = 1.0  # RoPE on this fraction of each head's dims (Qwen3-Next: 0.25)
    shared_expert_intermediate_size: int = 0  # the MoE's shared expert width (0: none)
    linear_num_key_heads: int = 0  # Gated DeltaNet query / key heads
    linear_num_value_heads: int = 0  # ... value heads (a multiple of the key heads)
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel_dim: int = 4  # causal depthwise convolution over q, k and v
    moe_impl: str = "ragged"  # "ragged" (dropless grouped matmul) or "reference" (every expert, tests only)
    balance_global_batch: bool = False  # load-balance statistics summed over the data axes before the product
    kernels: str = "auto"  # whose kernels run: the mesh devices' platform, or "cpu" / "tpu" / "gpu" forced (tests)
    layout: str = "training"  # the zenjax.sharding table placing weights and activations: "training" | "rollout"

    def __post_init__(self):
        object.__setattr__(self, "mlp_only_layers", tuple(int(i) for i in self.mlp_only_layers))
        object.__setattr__(self, "mrope_section", tuple(int(i) for i in self.mrope_section))
        if self.mrope_section and (len(self.mrope_section) != 3 or sum(self.mrope_section) != self.head_dim // 2):
            raise ValueError(f"mrope_section={list(self.mrope_section)} must be three sizes summing to head_dim // 2 "
                             f"= {self.head_dim // 2}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not divisible by num_kv_heads={self.num_kv_heads}")
        if self.num_experts:
            if not 0 < self.num_experts_per_tok <= self.num_experts:
                raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, num_experts="
                                 f"{self.num_experts}]")
            if self.moe_intermediate_size <= 0:
                raise ValueError("moe_intermediate_size must be positive for an MoE model")
            if self.decoder_sparse_step < 1:
                raise ValueError(f"decoder_sparse_step={self.decoder_sparse_step} must be >= 1")
            bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_layers]
            if bad:
                raise ValueError(f"mlp_only_layers {bad} out of range for num_layers={self.num_layers}")
            if self.moe_impl not in ("ragged", "reference"):
                raise ValueError(f"moe_impl={self.moe_impl!r}: expected 'ragged' or 'reference'")
        if self.hybrid:
            self._check_hybrid()
        if self.kernels not in ("auto", "cpu", "tpu", "gpu"):
            raise ValueError(f"kernels={self.kernels!r}: expected 'auto', 'cpu', 'tpu' or 'gpu'")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout={self.layout!r}: expected one of {', '.join(LAYOUTS)}")

    def _check_hybrid(self):
        p = self.full_attention_interval
        if self.num_layers % p:
            raise ValueError(f"num_layers={self.num_layers} is not a multiple of full_attention_interval={p}")
        if len({self.is_moe_layer(i) for i in range(self.num_layers)}) > 1:
            raise ValueError("a Qwen3-Next model needs every layer MoE or every layer dense (mlp_only_layers / "
                             "decoder_sparse_step mix them)")
        heads = (self.linear_num_key_heads, self.linear_num_value_heads, self.linear_key_head_dim,
                 self.linear_value_head_dim, self.linear_conv_kernel_dim)
        if min(heads) < 1 or self.linear_num_value_heads % self.linear_num_key_heads:
            raise ValueError(f"linear heads {self.linear_num_key_heads} key / {self.linear_num_value_heads} value of "
                             f"{self.linear_key_head_dim} / {self.linear_value_head_dim} dims, conv kernel "
                             f"{self.linear_conv_kernel_dim}: all must be positive, value heads a multiple of key heads")
        if not 0 < self.partial_rotary_factor <= 1 or int(self.head_dim * self.partial_rotary_factor) % 2:
            raise ValueError(f"partial_rotary_factor={self.partial_rotary_factor} must give an even number of the "
                             f"head_dim={self.head_dim} dims")

    def check_tensor_parallel(self, n: int) -> None:
        """Heads split over a tensor axis of n devices must divide evenly (Gated DeltaNet heads have no fallback)."""
        if self.hybrid:
            for name in ("linear_num_key_heads", "linear_num_value_heads"):
                if getattr(self, name) % n:
                    raise ValueError(f"{name}={getattr(self, name)} does not divide over tensor={n} devices: "
                                     "choose a tensor axis that divides it")

    @property
    def hybrid(self) -> bool:
        """Qwen3-Next: Gated DeltaNet and gated full-attention layers."""
        return self.full_attention_interval > 0

    def is_linear_layer(self, i: int) -> bool:
        return self.hybrid and (i + 1) % self.full_attention_interval != 0

    def stack_kinds(self) -> list[tuple[str, bool, int]]:
        """(mixer "attention" / "linear", is_moe, count) of each parameter stack: runs of consecutive layers of one
        kind (Qwen3), or a hybrid's Gated DeltaNet layers then its full-attention layers, each stacked in layer order
        and run interleaved (`Qwen3._scan_groups`)."""
        if not self.hybrid:
            return [("attention", moe, n) for moe, n in self.segments()]
        full = self.num_layers // self.full_attention_interval
        moe = self.is_moe_layer(0)
        return [("linear", moe, self.num_layers - full), ("attention", moe, full)]

    def layer_order(self) -> list[tuple[int, int]]:
        """(stack, index in the stack) of every layer, in layer order."""
        seen = [0] * len(self.stack_kinds())
        out = []
        for i in range(self.num_layers):
            s = int(not self.is_linear_layer(i)) if self.hybrid else self._segment_of(i)
            out.append((s, seen[s]))
            seen[s] += 1
        return out

    def _segment_of(self, i: int) -> int:
        end = 0
        for s, (_, n) in enumerate(self.segments()):
            end += n
            if i < end:
                return s
        raise IndexError(i)

    @property
    def rules(self):
        """Logical axis -> mesh axes for this model's weights and activations."""
        return LAYOUTS[self.layout]

    def kernel_platform(self) -> str:
        """The platform whose kernels and code paths the model runs (see `kernels`)."""
        return platform() if self.kernels == "auto" else self.kernels

    def is_moe_layer(self, i: int) -> bool:
        # transformers' Qwen3MoeDecoderLayer rule.
        return (self.num_experts > 0 and i not in self.mlp_only_layers
                and (i + 1) % self.decoder_sparse_step == 0)

    def segments(self) -> list[tuple[bool, int]]:
        """(is_moe, count) of each parameter stack (`stack_kinds`): for Qwen3, runs of consecutive layers of the
        same kind, each run one scan."""
        if self.hybrid:
            return [(moe, n) for _, moe, n in self.stack_kinds()]
        out: list[tuple[bool, int]] = []
        for i in range(self.num_layers):
            kind = self.is_moe_layer(i)
            if out and out[-1][0] == kind:
                out[-1] = (kind, out[-1][1] + 1)
            else:
                out.append((kind, 1))
        return out

    @classmethod
    def from_hf(cls, hf: dict[str, Any] | str | os.PathLike, **overrides) -> "Qwen3Config":
        """From an HF config.json (path, directory or dict); accepts hub and transformers-5 key styles."""
        hf = read_hf_config(hf)
        model_type = hf.get("model_type")
        if model_type not in ("qwen3", "qwen3_moe", "qwen3_next"):
            raise ValueError(f"unsupported model_type {model_type!r}: zenjax loads 'qwen3', 'qwen3_moe' and "
                             "'qwen3_next'")
        if hf.get("attention_bias"):
            raise ValueError("attention_bias=true is not a Qwen3 layout zenjax supports")
        if hf.get("use_sliding_window"):
            raise ValueError("use_sliding_window=true is not supported")
        rope = hf.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
            raise ValueError(f"only default RoPE is supported, got {rope or hf.get('rope_scaling')}")
        fields = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            num_kv_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
            head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"],
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
            tie_embeddings=hf.get("tie_word_embeddings", False),
            max_position_embeddings=hf.get("max_position_embeddings", 40960),
        )
        if model_type == "qwen3_next":
            fields.update(_next_fields(hf, rope))
        if model_type in ("qwen3_moe", "qwen3_next") and hf.get("num_experts", hf.get("num_local_experts")):
            fields.update(
                num_experts=hf.get("num_experts", hf.get("num_local_experts")),
                num_experts_per_tok=hf["num_experts_per_tok"],
                moe_intermediate_size=hf["moe_intermediate_size"],
                norm_topk_prob=hf.get("norm_topk_prob", False),
                decoder_sparse_step=hf.get("decoder_sparse_step", 1),
                mlp_only_layers=tuple(hf.get("mlp_only_layers") or ()),
                router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.001),
            )
        fields.update(overrides)
        return cls(**fields)

    def to_hf(self) -> dict[str, Any]:
        """An HF config.json dict (transformers-5 key style) describing this architecture."""
        model_type, arch = (("qwen3_next", "Qwen3NextForCausalLM") if self.hybrid else
                            ("qwen3_moe", "Qwen3MoeForCausalLM") if self.num_experts else ("qwen3", "Qwen3ForCausalLM"))
        hf = dict(
            model_type=model_type,
            architectures=[arch],
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads, head_dim=self.head_dim,
            intermediate_size=self.intermediate_size, rms_norm_eps=self.rms_norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta}, rope_theta=self.rope_theta,
            tie_word_embeddings=self.tie_embeddings, max_position_embeddings=self.max_position_embeddings,
            hidden_act="silu", attention_bias=False, torch_dtype="float32",
        )
        if self.num_experts:
            hf.update(num_experts=self.num_experts, num_local_experts=self.num_experts,
                      num_experts_per_tok=self.num_experts_per_tok,
                      moe_intermediate_size=self.moe_intermediate_size, norm_topk_prob=self.norm_topk_prob,
                      decoder_sparse_step=self.decoder_sparse_step, mlp_only_layers=list(self.mlp_only_layers),
                      router_aux_loss_coef=self.router_aux_loss_coef, output_router_logits=False)
        if self.hybrid:
            hf["rope_parameters"]["partial_rotary_factor"] = self.partial_rotary_factor
            hf.update(layer_types=["linear_attention" if self.is_linear_layer(i) else "full_attention"
                                   for i in range(self.num_layers)],
                      full_attention_interval=self.full_attention_interval,
                      shared_expert_intermediate_size=self.shared_expert_intermediate_size,
                      linear_num_key_heads=self.linear_num_key_heads,
                      linear_num_value_heads=self.linear_num_value_heads,
                      linear_key_head_dim=self.linear_key_head_dim, linear_value_head_dim=self.linear_value_head_dim,
                      linear_conv_kernel_dim=self.linear_conv_kernel_dim)
        return hf


def _next_fields(hf: Mapping[str, Any], rope: Mapping[str, Any]) -> dict[str, Any]:
    """Qwen3-Next's own config keys; the layer pattern from `layer_types` (transformers 5) or
    `full_attention_interval` (hub), which must be every n-th layer full attention."""
    n = hf["num_hidden_layers"]
    interval = hf.get("full_attention_interval", 4)
    types = list(hf.get("layer_types") or [])
    if types:
        full = [i for i, t in enumerate(types) if t == "full_attention"]
        interval = full[0] + 1 if full else 0
        want = ["linear_attention" if (i + 1) % max(interval, 1) else "full_attention" for i in range(n)]
        if not full or types != want:
            raise ValueError(f"layer_types {types} is not every n-th layer full attention, the others "
                             "linear_attention: the only Qwen3-Next layer pattern zenjax supports")
    return dict(
        full_attention_interval=interval,
        partial_rotary_factor=rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.25)),
        shared_expert_intermediate_size=hf.get("shared_expert_intermediate_size", 0),
        linear_num_key_heads=hf["linear_num_key_heads"], linear_num_value_heads=hf["linear_num_value_heads"],
        linear_key_head_dim=hf["linear_key_head_dim"], linear_value_head_dim=hf["linear_value_head_dim"],
        linear_conv_kernel_dim=hf.get("linear_conv_kernel_dim", 4),
    )


def read_hf_config(hf: Mapping[str, Any] | str | os.PathLike) -> Mapping[str, Any]:
    """An HF config as a dict: `hf` itself, or read from a config.json or the directory holding one."""
    if isinstance(hf, Mapping):
        return hf
    path = os.path.join(hf, "config.json") if os.path.isdir(hf) else hf
    if not os.path.exists(path):
        raise FileNotFoundError(f"no config.json at {path}")
    with open(path) as f:
        return json.load(f)


def param(rngs: nnx.Rngs, cfg: Any, shape, axes, init: str = "normal") -> nnx.Param:
    """A parameter with logical axis names, in `cfg.param_dtype` (any config with that field: the text model's, the
    vision and audio encoders'); HF's init: "normal" 0.02, "ones" (norm scales), "zeros" (biases)."""
    dtype = jnp.dtype(cfg.param_dtype)
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        value = 0.02 * jax.random.normal(rngs.params(), shape, dtype)
    return nnx.Param(value, out_sharding=tuple(axes))


class RMSNorm(nnx.Module):
    """x / rms(x) * scale; Qwen3-Next's norms are zero-centred: * (1 + scale), the scale starting at zero."""

    def __init__(self, dim: int, cfg: Qwen3Config, *, rngs: nnx.Rngs, zero_centred: bool = False):
        self.scale = param(rngs, cfg, (dim,), ("norm",), init="zeros" if zero_centred else "ones")
        self.eps = cfg.rms_norm_eps
        self.offset = 1.0 if zero_centred else 0.0

    def __call__(self, x):
        return (rms_normalize(x, self.eps) * (self.offset + self.scale[...].astype(jnp.float32))).astype(x.dtype)


def rms_normalize(x, eps: float) -> jax.Array:
    """x / rms(x) over the last axis, in float32."""
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)


def rope(x_BTHD: jax.Array, positions_BT: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, transformers' rotate-half convention."""
    d = x_BTHD.shape[-1]
    inv_freq = 1.0 / theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    return _rotate(x_BTHD, positions_BT.astype(jnp.float32)[..., None] * inv_freq)


def apply_mrope(x_BTHD: jax.Array, positions_3BT, theta: float, mrope_section=(24, 20, 20)) -> jax.Array:
    """Interleaved multimodal RoPE (HF Qwen3-Omni thinker / Qwen3-VL) on (time, row, column) positions [3, B, T].

    Frequency j rotates by the row position when j % 3 == 1 and j < 3 * section[1], by the column position when
    j % 3 == 2 and j < 3 * section[2], else by the time position (section[0] is implied, as in HF).
    """
    d = x_BTHD.shape[-1]
    j = np.arange(d // 2)
    row_F = np.where((j % 3 == 1) & (j < 3 * mrope_section[1]), 1, 0)
    row_F = np.where((j % 3 == 2) & (j < 3 * mrope_section[2]), 2, row_F)
    inv_freq = 1.0 / theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    pos_BTF = jnp.moveaxis(jnp.asarray(positions_3BT, jnp.float32)[row_F], 0, -1)
    return _rotate(x_BTHD, pos_BTF * inv_freq)


def _rotate(x_BTHD: jax.Array, angles_BTF: jax.Array) -> jax.Array:
    cos = jnp.cos(angles_BTF)[:, :, None, :]
    sin = jnp.sin(angles_BTF)[:, :, None, :]
    x1, x2 = jnp.split(x_BTHD.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTHD.dtype)


class LayerCache(NamedTuple):
    """KV cache of one scanned run of layers: k [L, B, K, D, S] and v [L, B, K, S, D]; of one layer, without the
    L, in a cache made by `KVCache.unstack`. Heads before slots, keys transposed: both matmuls of a decode step's
    attention are then plain batched matmuls on the cache as stored (with keys as [S, D], XLA:CPU's q.k runs at
    a third of the memory bandwidth: ~15% of an MoE decode step)."""
    k: jax.Array
    v: jax.Array

    AXES = ((None, "batch", "act_kv_heads", None, None),) * 2  # logical axes of k and v (stacked)


class KVCache(NamedTuple):
    """Cache for the whole model, one entry per parameter stack: a LayerCache for attention layers, a
    `deltanet.DeltaState` (constant size) for Gated DeltaNet layers. `valid_BS` marks slots holding real (non-pad)
    tokens; `index` is the next slot."""
    layers: tuple
    valid_BS: jax.Array
    index: jax.Array

    @classmethod
    def init(cls, cfg: Qwen3Config, batch: int, max_len: int, dtype=None) -> "KVCache":
        from zenjax.models.deltanet import DeltaState  # noqa: PLC0415 - deltanet imports this module
        dtype = jnp.dtype(dtype or cfg.dtype)
        K, S, D = cfg.num_kv_heads, max_len, cfg.head_dim
        layers = tuple(DeltaState.init(cfg, n, batch, dtype) if mixer == "linear" else
                       LayerCache(jnp.zeros((n, batch, K, D, S), dtype), jnp.zeros((n, batch, K, S, D), dtype))
                       for mixer, _, n in cfg.stack_kinds())
        return cls(layers, jnp.zeros((batch, max_len), bool), jnp.zeros((), jnp.int32))

    def unstack(self) -> "KVCache":
        """One cache per layer, in layer order, for decoding from `Qwen3.unstack_layers`."""
        per_stack = [[type(c)(*(a[j] for a in c)) for j in range(c[0].shape[0])] for c in self.layers]
        return self._replace(layers=tuple(in_layer_order(per_stack, not isinstance(self.layers[0], LayerCache))))


def in_layer_order(per_stack: Sequence[Sequence], hybrid: bool) -> list:
    """Per-layer items listed per stack (`Qwen3Config.stack_kinds`), in layer order: the stacks one after the other,
    or a hybrid's groups of (interval - 1) Gated DeltaNet layers and one full-attention layer."""
    if not hybrid:
        return [x for stack in per_stack for x in stack]
    linear, full = per_stack
    r = len(linear) // len(full)
    return [x for g in range(len(full)) for x in (*linear[g * r:(g + 1) * r], full[g])]

    @property
    def max_len(self) -> int:
        return self.valid_BS.shape[1]


class Attention(nnx.Module):
    def __init__(self, cfg: Qwen3Config, *, rngs: nnx.Rngs):
        D, H, K, E = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.hidden_size
        self.cfg = cfg
        # Qwen3-Next's q holds each head's query then its output gate (HF's layout): out * sigmoid(gate) before o.
        self.q = param(rngs, cfg, (E, H, 2 * D if cfg.hybrid else D), ("embed", "heads", "head_dim"))
        self.k = param(rngs, cfg, (E, K, D), ("embed", "kv_heads", "head_dim"))
        self.v = param(rngs, cfg, (E, K, D), ("embed", "kv_heads", "head_dim"))
        self.o = param(rngs, cfg, (H, D, E), ("heads", "head_dim", "embed"))
        self.q_norm = RMSNorm(D, cfg, rngs=rngs, zero_centred=cfg.hybrid)
        self.k_norm = RMSNorm(D, cfg, rngs=rngs, zero_centred=cfg.hybrid)

    def __call__(self, x_BTE, positions_BT, mask_BT, kv: tuple[jax.Array, jax.Array] | None, index, valid_BS):
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        x = x_BTE.astype(dt)
        q_BTHD = jnp.einsum("bte,ehd->bthd", x, self.q[...].astype(dt))
        if cfg.hybrid:
            q_BTHD, gate_BTHD = jnp.split(q_BTHD, 2, axis=-1)
        q_BTHD = self.q_norm(q_BTHD)
        k_BTKD = self.k_norm(jnp.einsum("bte,ekd->btkd", x, self.k[...].astype(dt)))
        v_BTKD = jnp.einsum("bte,ekd->btkd", x, self.v[...].astype(dt))
        q_BTHD = constrain(self._rope(q_BTHD, positions_BT), ("batch", "seq", "act_heads", None), cfg.rules)
        k_BTKD = self._rope(k_BTKD, positions_BT)
        if kv is not None:  # write the new keys/values at the cache's next slots
            k_BKDS, v_BKSD = kv
            k_BKDS = jax.lax.dynamic_update_slice_in_dim(k_BKDS, k_BTKD.transpose(0, 2, 3, 1).astype(k_BKDS.dtype),
                                                         index, axis=3)
            v_BKSD = jax.lax.dynamic_update_slice_in_dim(v_BKSD, v_BTKD.swapaxes(1, 2).astype(v_BKSD.dtype),
                                                         index, axis=2)
            kv = (k_BKDS, v_BKSD)
        B, T, H, D = q_BTHD.shape
        if T == 1 and kv is not None:  # decoding reads the cache as stored, its valid slots
            q_BKGD = q_BTHD.reshape(B, cfg.num_kv_heads, H // cfg.num_kv_heads, D)
            out_BTHD = self._decode_attention(q_BKGD, *kv, valid_BS).reshape(B, 1, H, D).astype(dt)
        else:  # training, and the prefill of an empty cache: the new tokens among themselves
            out_BTHD = attention(q_BTHD, k_BTKD.astype(dt), v_BTKD.astype(dt), mask_BT, platform=cfg.kernel_platform(),
                                 rules=cfg.rules)
        if cfg.hybrid:
            out_BTHD = (out_BTHD.astype(jnp.float32) * jax.nn.sigmoid(gate_BTHD.astype(jnp.float32))).astype(dt)
        # Heads flattened on both sides: as a 4-d contraction, XLA:CPU transposes the whole o weight at every
        # decode step to match the attention output's layout.
        out_BTE = out_BTHD.reshape(B, T, H * D) @ self.o[...].astype(dt).reshape(H * D, -1)
        return out_BTE, kv

    def _rope(self, x_BTHD, positions):
        cfg = self.cfg
        if cfg.mrope_section:  # positions [3, B, T]
            return apply_mrope(x_BTHD, positions, cfg.rope_theta, cfg.mrope_section)
        rot = int(cfg.head_dim * cfg.partial_rotary_factor)
        if rot < cfg.head_dim:  # partial rotary: the first `rot` dims turn, the others pass
            return jnp.concatenate([rope(x_BTHD[..., :rot], positions, cfg.rope_theta), x_BTHD[..., rot:]], axis=-1)
        return rope(x_BTHD, positions, cfg.rope_theta)

    @staticmethod
    def _decode_attention(q_BKGD, k_BKDS, v_BKSD, mask_BS):
        """One query per row, in float32: batched matmuls over (batch, kv head) on the cache as stored."""
        f32 = jnp.float32
        q_BKGD = q_BKGD.astype(f32) * (q_BKGD.shape[-1] ** -0.5)
        scores_BKGS = jnp.einsum("bkgd,bkds->bkgs", q_BKGD, k_BKDS.astype(f32))
        scores_BKGS = jnp.where(mask_BS[:, None, None, :], scores_BKGS, jnp.finfo(f32).min)
        probs_BKGS = jax.nn.softmax(scores_BKGS, axis=-1)
        return jnp.einsum("bkgs,bksd->bkgd", probs_BKGS, v_BKSD.astype(f32))


class MLP(nnx.Module):
    """SwiGLU feed-forward."""

    def __init__(self, cfg: Qwen3Config, *, rngs: nnx.Rngs, width: int | None = None):
        E, F = cfg.hidden_size, width or cfg.intermediate_size
        self.dtype = jnp.dtype(cfg.dtype)
        self.layout = cfg.layout
        self.gate = param(rngs, cfg, (E, F), ("embed", "mlp"))
        self.up = param(rngs, cfg, (E, F), ("embed", "mlp"))
        self.down = param(rngs, cfg, (F, E), ("mlp", "embed"))

    def __call__(self, x_BTE, mask_BT):
        dt = self.dtype
        w = (self.gate[...].astype(dt), self.up[...].astype(dt), self.down[...].astype(dt))
        return _swiglu(x_BTE.astype(dt), *w, self.layout), {}


def _swiglu_fwd(x_BTE, gate_EF, up_EF, down_FE, layout):
    g_BTF = constrain(x_BTE @ gate_EF, ("batch", "seq", "act_mlp"), LAYOUTS[layout])
    u_BTF = constrain(x_BTE @ up_EF, ("batch", "seq", "act_mlp"), LAYOUTS[layout])
    return (jax.nn.silu(g_BTF) * u_BTF) @ down_FE, (x_BTE, g_BTF, u_BTF, gate_EF, up_EF, down_FE)


def _swiglu_bwd(layout, res, dy_BTE):
    # Hand-written so that only x, g and u are kept from the forward pass, and the elementwise derivative is one
    # fused float32 pass; autodiff stores sigmoid products too and fuses a transpose into the derivative.
    x_BTE, g_BTF, u_BTF, gate_EF, up_EF, down_FE = res
    dt = g_BTF.dtype
    g, u = g_BTF.astype(jnp.float32), u_BTF.astype(jnp.float32)
    sig = jax.nn.sigmoid(g)
    act = g * sig
    dh_BTF = (dy_BTE @ down_FE.T).astype(jnp.float32)
    act_axes, rules = ("batch", "seq", "act_mlp"), LAYOUTS[layout]
    dg_BTF = constrain((dh_BTF * u * sig * (1 + g * (1 - sig))).astype(dt), act_axes, rules)
    du_BTF = constrain((dh_BTF * act).astype(dt), act_axes, rules)
    h_BTF = (act * u).astype(dt)
    dx_BTE = dg_BTF @ gate_EF.T + du_BTF @ up_EF.T
    # down's gradient as (dy^T h)^T: the matmul then transposes the embed-sized dy, not the mlp-sized h.
    return (dx_BTE, jnp.einsum("bte,btf->ef", x_BTE, dg_BTF), jnp.einsum("bte,btf->ef", x_BTE, du_BTF),
            jnp.einsum("bte,btf->ef", dy_BTE, h_BTF).T)


_swiglu = jax.custom_vjp(lambda x, gate, up, down, layout: _swiglu_fwd(x, gate, up, down, layout)[0],
                         nondiff_argnums=(4,))
_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class Block(nnx.Module):
    """Norm, token mixer (attention, or Qwen3-Next's Gated DeltaNet: `mixer` "linear"), norm, MLP slot."""

    def __init__(self, cfg: Qwen3Config, moe: bool, *, rngs: nnx.Rngs, mixer: str = "attention"):
        self.cfg = cfg
        self.input_norm = RMSNorm(cfg.hidden_size, cfg, rngs=rngs, zero_centred=cfg.hybrid)
        if mixer == "linear":
            from zenjax.models.deltanet import GatedDeltaNet  # noqa: PLC0415 - deltanet imports this module's helpers
            self.linear_attn = GatedDeltaNet(cfg, rngs=rngs)
        else:
            self.attn = Attention(cfg, rngs=rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg, rngs=rngs, zero_centred=cfg.hybrid)
        if moe:
            from zenjax.models.moe import MoEBlock  # noqa: PLC0415 - moe imports this module's helpers
            self.mlp = MoEBlock(cfg, rngs=rngs)
        else:
            self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x_BTE, positions_BT, mask_BT, kv, index, valid_BS):
        """`kv`: this layer's cache, a (k, v) pair, or a Gated DeltaNet's `DeltaState`; None without a cache."""
        if hasattr(self, "linear_attn"):
            h, kv = self.linear_attn(self.input_norm(x_BTE), mask_BT, kv)
        else:
            h, kv = self.attn(self.input_norm(x_BTE), positions_BT, mask_BT, kv, index, valid_BS)
        x_BTE = x_BTE + h.astype(x_BTE.dtype)
        h, aux = self.mlp(self.post_attn_norm(x_BTE), mask_BT)
        x_BTE = constrain(x_BTE + h.astype(x_BTE.dtype), ("batch", "seq", "act_embed"), self.cfg.rules)
        return x_BTE, kv, aux


class Output(NamedTuple):
    hidden_BTE: jax.Array  # final-normed hidden states (feed to `logits` or `token_logprobs`)
    cache: KVCache | None
    aux: dict[str, jax.Array]  # per-MoE-layer routing statistics, stacked [L_moe, ...]; empty for dense


class Qwen3(nnx.Module):
    def __init__(self, cfg: Qwen3Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = param(rngs, cfg, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"))
        self.stacks = nnx.List([self._stack(mixer, moe, n, rngs) for mixer, moe, n in cfg.stack_kinds()])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg, rngs=rngs, zero_centred=cfg.hybrid)
        if not cfg.tie_embeddings:
            self.lm_head = param(rngs, cfg, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"))

    def _stack(self, mixer: str, moe: bool, n: int, rngs: nnx.Rngs) -> Block:
        @nnx.split_rngs(splits=n)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make(r):
            return Block(self.cfg, moe, rngs=r, mixer=mixer)
        return make(rngs)

    def head_weight(self) -> jax.Array:
        """LM head as [embed, vocab] (the transposed embedding when tied)."""
        return self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]

    def unstack_layers(self) -> tuple:
        """Every layer's (graphdef, state), copied out of the stacks, for `hidden(..., layers=...)`.

        XLA:CPU copies a scanned layer's weights out of its stack at every step, which doubles the memory traffic
        of decoding (bound by reading the weights). A decode loop that takes these copies, made once per
        generation, reads each weight once per token, for one more copy of the layer weights while it runs. On one
        device, MoE layers also hold each expert's weights apart (`MoEBlock.split_experts`), for the same reason."""
        per_stack = []
        for stack, (moe, n) in zip(self.stacks, self.cfg.segments()):
            graphdef, state = nnx.split(stack)
            per_stack.append([])
            for j in range(n):
                layer = nnx.merge(graphdef, jax.tree.map(lambda a, j=j: a[j], state))
                if moe:
                    layer.mlp.split_experts()
                per_stack[-1].append(nnx.split(layer))
        return tuple(in_layer_order(per_stack, self.cfg.hybrid))

    def embed_tokens(self, tokens_BT) -> jax.Array:
        """Input embeddings [B, T, E] in the compute dtype."""
        return jnp.take(self.embed[...], tokens_BT, axis=0).astype(jnp.dtype(self.cfg.dtype))

    def hidden(self, tokens_BT, mask_BT=None, positions_BT=None, cache: KVCache | None = None,
               layers: tuple | None = None, *, embeds_BTE=None, deepstack: Sequence[jax.Array] = ()) -> Output:
        """Run the decoder. `mask_BT` marks real tokens (False = padding). With a cache, the T new tokens are
        written at slots [cache.index, cache.index + T): T > 1 tokens are the prefill of an empty cache and attend
        among themselves, one token attends every valid slot. `layers` (from
        `unstack_layers`, with an unstacked cache) runs the layers one by one instead of scanning the stacks.
        `embeds_BTE` replaces the token embeddings (tokens_BT is then None); `deepstack` [B, T, E] arrays are added
        to the hidden states after layers 0, 1, ... (the Omni thinker's visual features, zero elsewhere).
        With `mrope_section`, positions are [3, B, T], or [B, T] for text (the same on the three rows)."""
        cfg = self.cfg
        x = self.embed_tokens(tokens_BT) if embeds_BTE is None else embeds_BTE.astype(jnp.dtype(cfg.dtype))
        B, T = x.shape[:2]
        mask_BT = jnp.ones((B, T), bool) if mask_BT is None else mask_BT.astype(bool)
        if positions_BT is None:
            positions_BT = jnp.maximum(jnp.cumsum(mask_BT, axis=1) - 1, 0)
        if cfg.mrope_section and positions_BT.ndim == 2:  # text: time, row and column positions agree
            positions_BT = jnp.broadcast_to(positions_BT, (3, B, T))
        if len(deepstack) > cfg.num_layers:
            raise ValueError(f"{len(deepstack)} deepstack additions for {cfg.num_layers} layers")
        index = valid_BS = None
        if cache is not None:
            index = cache.index
            valid_BS = jax.lax.dynamic_update_slice_in_dim(cache.valid_BS, mask_BT, index, axis=1)
        x = constrain(x, ("batch", "seq", "act_embed"), cfg.rules)

        args = (x, positions_BT, mask_BT, cache, index, valid_BS, tuple(deepstack))
        if layers is not None:
            x, new_layers, aux_list = self._one_by_one(layers, *args)
        elif cfg.hybrid:
            if deepstack:
                raise ValueError("deepstack additions are for the Omni thinker, not a Qwen3-Next model")
            x, new_layers, aux_list = self._scan_groups(*args[:-1])
        else:
            x, new_layers, aux_list = self._scan_stacks(*args)
        aux = {k: jnp.concatenate([a[k] for a in aux_list]) for k in aux_list[0]} if aux_list else {}
        h = self.final_norm(x)
        if cache is not None:
            cache = KVCache(tuple(new_layers), valid_BS, index + T)
        return Output(h, cache, aux)

    def _scan_stacks(self, x, positions_BT, mask_BT, cache, index, valid_BS, deepstack):
        new_layers, aux_list, first = [], [], 0
        for i, (stack, (_, n)) in enumerate(zip(self.stacks, self.cfg.segments())):
            graphdef, state = nnx.split(stack)

            def body(x, xs, graphdef=graphdef):
                layer_state, kv, add_BTE = xs
                x, kv, aux = nnx.merge(graphdef, layer_state)(x, positions_BT, mask_BT, kv, index, valid_BS)
                return x if add_BTE is None else x + add_BTE.astype(x.dtype), (kv, aux)

            if self.cfg.remat:
                body = jax.checkpoint(body, prevent_cse=False, policy=jax.checkpoint_policies.nothing_saveable)
            kv_in = None if cache is None else tuple(cache.layers[i])
            # The stack's first m layers take a deepstack addition each: they scan on their own, the additions as xs.
            m = min(max(len(deepstack) - first, 0), n)
            outs = []
            for lo, hi in ((0, m), (m, n)) if 0 < m < n else ((0, n),):
                xs = (state, kv_in) if hi - lo == n else jax.tree.map(lambda a, lo=lo, hi=hi: a[lo:hi], (state, kv_in))
                adds_LBTE = jnp.stack(deepstack[first + lo:first + hi]) if lo < m else None
                x, out = jax.lax.scan(body, x, (*xs, adds_LBTE))
                outs.append(out)
            kv_out, aux = outs[0] if len(outs) == 1 else jax.tree.map(lambda *a: jnp.concatenate(a), *outs)
            new_layers.append(None if cache is None else LayerCache(*kv_out))
            if aux:
                aux_list.append(aux)
            first += n
        return x, new_layers, aux_list

    def _scan_groups(self, x, positions_BT, mask_BT, cache, index, valid_BS):
        """A hybrid's layers: one scan over the groups of (interval - 1) Gated DeltaNet layers and one full-attention
        layer, the DeltaNet layers an inner scan. The two stacks keep the usual [layers, ...] parameters (one index
        per layer for the converter and the sharding rules), seen as [groups, per group, ...] here: the program
        compiles one body per layer kind, however many groups."""
        (lin_def, lin_state), (att_def, att_state) = nnx.split(self.stacks[0]), nnx.split(self.stacks[1])
        G = self.cfg.num_layers // self.cfg.full_attention_interval
        grouped = lambda a: a.reshape(G, -1, *a.shape[1:])  # noqa: E731
        lin_cache, att_cache = (None, None) if cache is None else cache.layers

        def layer(graphdef, as_pair: bool):
            def body(x, xs):
                state, kv = xs
                kv = tuple(kv) if as_pair and kv is not None else kv  # Attention takes (k, v); DeltaNet its state
                x, kv, aux = nnx.merge(graphdef, state)(x, positions_BT, mask_BT, kv, index, valid_BS)
                return x, (kv, aux)
            if self.cfg.remat:
                return jax.checkpoint(body, prevent_cse=False, policy=jax.checkpoint_policies.nothing_saveable)
            return body

        lin_body, att_body = layer(lin_def, False), layer(att_def, True)

        def group(x, xs):
            lin_xs, att_xs = xs
            x, lin_out = jax.lax.scan(lin_body, x, lin_xs)
            x, att_out = att_body(x, att_xs)
            return x, (lin_out, att_out)

        xs = ((jax.tree.map(grouped, lin_state), jax.tree.map(grouped, lin_cache)), (att_state, att_cache))
        x, ((lin_kv, lin_aux), (att_kv, att_aux)) = jax.lax.scan(group, x, xs)
        new_layers = [None, None] if cache is None else [
            jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), lin_kv), LayerCache(*att_kv)]
        # Routing statistics in layer order: each group's DeltaNet layers, then its attention layer.
        aux = jax.tree.map(lambda a, b: jnp.concatenate([a, b[:, None]], 1).reshape(-1, *b.shape[1:]),
                           lin_aux, att_aux)
        return x, new_layers, [aux] if aux else []

    @staticmethod
    def _one_by_one(layers, x, positions_BT, mask_BT, cache, index, valid_BS, deepstack):
        if cache is None or len(cache.layers) != len(layers):
            raise ValueError(f"hidden(layers=...) runs {len(layers)} unstacked layers and needs the cache they "
                             "decode from, one LayerCache per layer (KVCache.unstack())")
        new_layers, aux_list = [], []
        for j, ((graphdef, state), kv) in enumerate(zip(layers, cache.layers)):
            if isinstance(kv, LayerCache):
                x, kv, aux = nnx.merge(graphdef, state)(x, positions_BT, mask_BT, tuple(kv), index, valid_BS)
                kv = LayerCache(*kv)
            else:  # a Gated DeltaNet's state
                x, kv, aux = nnx.merge(graphdef, state)(x, positions_BT, mask_BT, kv, index, valid_BS)
            if j < len(deepstack):
                x = x + deepstack[j].astype(x.dtype)
            new_layers.append(kv)
            if aux:
                aux_list.append({k: v[None] for k, v in aux.items()})  # as a scan over one layer stacks it
        return x, new_layers, aux_list

    def logits(self, hidden_BTE) -> jax.Array:
        dt = jnp.dtype(self.cfg.dtype)
        if self.cfg.tie_embeddings and hidden_BTE.shape[1] == 1:
            # A decode step streams the whole [V, E] embedding: XLA:CPU reads it ~30% faster as the left operand
            # of the matmul than as a transposed right one.
            logits = jnp.einsum("ve,bte->vbt", self.embed[...].astype(dt), hidden_BTE.astype(dt),
                                preferred_element_type=jnp.float32).transpose(1, 2, 0)
        else:
            logits = jnp.einsum("bte,ev->btv", hidden_BTE.astype(dt), self.head_weight().astype(dt),
                                preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "seq", "act_vocab"), self.cfg.rules)

    def __call__(self, tokens_BT, mask_BT=None, positions_BT=None):
        out = self.hidden(tokens_BT, mask_BT, positions_BT)
        return self.logits(out.hidden_BTE), out.aux


def token_logprobs(hidden_BTE, head_ED, targets_BT, *, rules, dtype=jnp.float32, chunk: int = 256,
                   with_entropy: bool = False):
    """log p(target) per token (and the entropy of the distribution), in float32, without materialising the
    whole [B, T, V] logits: the sequence is cut into chunks and each chunk's logits are recomputed in backward
    (a sequence that fits one chunk keeps its logits instead: the same peak memory, one matmul less)."""
    B, T, _ = hidden_BTE.shape
    chunk = min(chunk, T)
    pad = -T % chunk
    h = jnp.pad(hidden_BTE, ((0, 0), (0, pad), (0, 0)))
    tgt = jnp.pad(targets_BT, ((0, 0), (0, pad)))
    n = (T + pad) // chunk
    h_NBCE = h.reshape(B, n, chunk, -1).swapaxes(0, 1)
    tgt_NBC = tgt.reshape(B, n, chunk).swapaxes(0, 1)
    w = head_ED.astype(dtype)

    def one(args):
        h_BCE, t_BC = args
        logits = jnp.einsum("bce,ev->bcv", h_BCE.astype(dtype), w, preferred_element_type=jnp.float32)
        logits = constrain(logits, ("batch", "seq", "act_vocab"), rules)
        lse = jax.nn.logsumexp(logits, axis=-1)
        logp = jnp.take_along_axis(logits, t_BC[..., None], axis=-1)[..., 0] - lse
        ent = lse - jnp.sum(jax.nn.softmax(logits, axis=-1) * logits, axis=-1) if with_entropy else lse * 0
        return logp, ent

    logp_NBC, ent_NBC = jax.lax.map(jax.checkpoint(one) if n > 1 else one, (h_NBCE, tgt_NBC))
    unchunk = lambda a: a.swapaxes(0, 1).reshape(B, -1)[:, :T]  # noqa: E731
    return (unchunk(logp_NBC), unchunk(ent_NBC)) if with_entropy else unchunk(logp_NBC)


def sequence_logprobs(model: Qwen3, tokens_BT, mask_BT, *, chunk: int = 256, with_entropy: bool = False,
                      last: int | None = None, media=None, layout=None):
    """log p(tokens[:, t+1] | tokens[:, :t+1]) for t < T-1, as [B, T-1] (+ entropy, + MoE aux). `last` scores
    only the final `last` targets (a rollout's completion): the LM head skips the others, returned as zeros.
    `media` and `layout` (an Omni thinker's `omni.RowMedia` / `RowLayout`) run `model.hidden_rows` instead."""
    out = model.hidden(tokens_BT, mask_BT) if media is None else model.hidden_rows(tokens_BT, mask_BT, media, layout)
    cfg = model.cfg if media is None else model.cfg.text
    start = 0 if last is None else max(tokens_BT.shape[1] - 1 - last, 0)
    res = token_logprobs(out.hidden_BTE[:, start:-1], model.head_weight(), tokens_BT[:, start + 1:],
                         rules=cfg.rules, dtype=jnp.dtype(cfg.dtype), chunk=chunk, with_entropy=with_entropy)
    if start:
        pad = lambda a: jnp.pad(a, ((0, 0), (start, 0)))  # noqa: E731
        res = tuple(map(pad, res)) if with_entropy else pad(res)
    return res, out.aux
