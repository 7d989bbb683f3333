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
        if self.kernels not in ("auto", "cpu", "tpu", "gpu"):
            raise ValueError(f"kernels={self.kernels!r}: expected 'auto', 'cpu', 'tpu' or 'gpu'")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout={self.layout!r}: expected one of {', '.join(LAYOUTS)}")

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
        """Runs of consecutive layers of the same kind: [(is_moe, count), ...]; each run is one scan."""
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
        if model_type not in ("qwen3", "qwen3_moe"):
            raise ValueError(f"unsupported model_type {model_type!r}: zenjax loads 'qwen3' and 'qwen3_moe'")
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
        if model_type == "qwen3_moe":
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
        hf = dict(
            model_type="qwen3_moe" if self.num_experts else "qwen3",
            architectures=["Qwen3MoeForCausalLM" if self.num_experts else "Qwen3ForCausalLM"],
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
        return hf


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
    def __init__(self, dim: int, cfg: Qwen3Config, *, rngs: nnx.Rngs):
        self.scale = param(rngs, cfg, (dim,), ("norm",), init="ones")
        self.eps = cfg.rms_norm_eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


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


class KVCache(NamedTuple):
    """Cache for the whole model. `valid_BS` marks slots holding real (non-pad) tokens; `index` is the next slot."""
    layers: tuple[LayerCache, ...]
    valid_BS: jax.Array
    index: jax.Array

    @classmethod
    def init(cls, cfg: Qwen3Config, batch: int, max_len: int, dtype=None) -> "KVCache":
        dtype = jnp.dtype(dtype or cfg.dtype)
        K, S, D = cfg.num_kv_heads, max_len, cfg.head_dim
        layers = tuple(LayerCache(jnp.zeros((n, batch, K, D, S), dtype), jnp.zeros((n, batch, K, S, D), dtype))
                       for _, n in cfg.segments())
        return cls(layers, jnp.zeros((batch, max_len), bool), jnp.zeros((), jnp.int32))

    def unstack(self) -> "KVCache":
        """One LayerCache per layer, for decoding from `Qwen3.unstack_layers`."""
        return self._replace(layers=tuple(LayerCache(k, v) for c in self.layers for k, v in zip(c.k, c.v)))

    @property
    def max_len(self) -> int:
        return self.valid_BS.shape[1]


class Attention(nnx.Module):
    def __init__(self, cfg: Qwen3Config, *, rngs: nnx.Rngs):
        D, H, K, E = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.hidden_size
        self.cfg = cfg
        self.q = param(rngs, cfg, (E, H, D), ("embed", "heads", "head_dim"))
        self.k = param(rngs, cfg, (E, K, D), ("embed", "kv_heads", "head_dim"))
        self.v = param(rngs, cfg, (E, K, D), ("embed", "kv_heads", "head_dim"))
        self.o = param(rngs, cfg, (H, D, E), ("heads", "head_dim", "embed"))
        self.q_norm = RMSNorm(D, cfg, rngs=rngs)
        self.k_norm = RMSNorm(D, cfg, rngs=rngs)

    def __call__(self, x_BTE, positions_BT, mask_BT, kv: tuple[jax.Array, jax.Array] | None, index, valid_BS):
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        x = x_BTE.astype(dt)
        q_BTHD = self.q_norm(jnp.einsum("bte,ehd->bthd", x, self.q[...].astype(dt)))
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
            out_BTHD = self._decode_attention(q_BKGD, *kv, valid_BS)[:, None].astype(dt)
        else:  # training, and the prefill of an empty cache: the new tokens among themselves
            out_BTHD = attention(q_BTHD, k_BTKD.astype(dt), v_BTKD.astype(dt), mask_BT, platform=cfg.kernel_platform(),
                                 rules=cfg.rules)
        # Heads flattened on both sides: as a 4-d contraction, XLA:CPU transposes the whole o weight at every
        # decode step to match the attention output's layout.
        out_BTE = out_BTHD.reshape(B, T, H * D) @ self.o[...].astype(dt).reshape(H * D, -1)
        return out_BTE, kv

    def _rope(self, x_BTHD, positions):
        cfg = self.cfg
        if cfg.mrope_section:  # positions [3, B, T]
            return apply_mrope(x_BTHD, positions, cfg.rope_theta, cfg.mrope_section)
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

    def __init__(self, cfg: Qwen3Config, *, rngs: nnx.Rngs):
        E, F = cfg.hidden_size, cfg.intermediate_size
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
    def __init__(self, cfg: Qwen3Config, moe: bool, *, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg, rngs=rngs)
        if moe:
            from zenjax.models.moe import MoEBlock  # noqa: PLC0415 - moe imports this module's helpers
            self.mlp = MoEBlock(cfg, rngs=rngs)
        else:
            self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x_BTE, positions_BT, mask_BT, kv, index, valid_BS):
        h, kv = self.attn(self.input_norm(x_BTE), positions_BT, mask_BT, kv, index, valid_BS)
        x_BTE = x_BTE + h.astype(x_BTE.dtype)
        h, aux = self.mlp(self.post_attn_norm(x_BTE), mask_BT)
        x_BTE = constrain(x_BTE + h.astype(x_BTE.dtype), ("batch", "seq", "act_embed"), self.attn.cfg.rules)
        return x_BTE, kv, aux


class Output(NamedTuple):
    hidden_BTE: jax.Array  # final-normed hidden states (feed to `logits` or `token_logprobs`)
    cache: KVCache | None
    aux: dict[str, jax.Array]  # per-MoE-layer routing statistics, stacked [L_moe, ...]; empty for dense


class Qwen3(nnx.Module):
    def __init__(self, cfg: Qwen3Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = param(rngs, cfg, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"))
        self.stacks = nnx.List([self._stack(moe, n, rngs) for moe, n in cfg.segments()])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg, rngs=rngs)
        if not cfg.tie_embeddings:
            self.lm_head = param(rngs, cfg, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"))

    def _stack(self, moe: bool, n: int, rngs: nnx.Rngs) -> Block:
        @nnx.split_rngs(splits=n)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make(r):
            return Block(self.cfg, moe, rngs=r)
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
        out = []
        for stack, (moe, n) in zip(self.stacks, self.cfg.segments()):
            graphdef, state = nnx.split(stack)
            for j in range(n):
                layer = nnx.merge(graphdef, jax.tree.map(lambda a, j=j: a[j], state))
                if moe:
                    layer.mlp.split_experts()
                out.append(nnx.split(layer))
        return tuple(out)

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
        x, new_layers, aux_list = self._scan_stacks(*args) if layers is None else self._one_by_one(layers, *args)
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

    @staticmethod
    def _one_by_one(layers, x, positions_BT, mask_BT, cache, index, valid_BS, deepstack):
        if cache is None or len(cache.layers) != len(layers):
            raise ValueError(f"hidden(layers=...) runs {len(layers)} unstacked layers and needs the cache they "
                             "decode from, one LayerCache per layer (KVCache.unstack())")
        new_layers, aux_list = [], []
        for j, ((graphdef, state), kv) in enumerate(zip(layers, cache.layers)):
            x, kv, aux = nnx.merge(graphdef, state)(x, positions_BT, mask_BT, tuple(kv), index, valid_BS)
            if j < len(deepstack):
                x = x + deepstack[j].astype(x.dtype)
            new_layers.append(LayerCache(*kv))
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
