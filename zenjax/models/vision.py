"""The vision encoder of the Qwen3-Omni-MoE thinker in Flax NNX: transformers' `Qwen3OmniMoeVisionEncoder`.

`pixel_values` [N, C*T*P*P] holds one row per patch, each row a (channel, time, row, column) flattened
`temporal_patch_size x patch_size x patch_size` cube, as the HF processor emits them: the patches of each frame
in spatial-merge-block order, every run of `spatial_merge_size**2` rows one merged token's block (raster order
inside it, blocks in raster order). `grid_thw` [num_images, 3] is each image's or video's (t, h, w) in patches.
Attention stays within each frame (HF's `cu_seqlens`). The merger and the deepstack mergers turn each block of
merge**2 patches into one token of `out_hidden_size`.
Blocks are stacked (a leading `layers` axis) and scanned, one scan per run of layers between deepstack taps.
LayerNorms, RoPE and softmax are computed in float32 whatever the compute dtype.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zenjax.models import hf
from zenjax.models.qwen3 import param
from zenjax.sharding import TRAINING, constrain

F32 = jnp.float32
_ACTS = {
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "silu": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Defaults are those of transformers' `Qwen3OmniMoeVisionEncoderConfig`."""
    hidden_size: int = 1152
    num_layers: int = 27
    num_heads: int = 16
    intermediate_size: int = 4304
    hidden_act: str = "gelu_pytorch_tanh"
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    out_hidden_size: int = 3584
    num_position_embeddings: int = 2304  # a square grid of learned positions, resampled to each image's grid
    deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-6  # fixed in HF's modules, not in its config
    dtype: str = "bfloat16"  # compute dtype of matmuls
    param_dtype: str = "float32"
    remat: bool = False  # recompute each block in the backward pass (the text model's setting)

    def __post_init__(self):
        object.__setattr__(self, "deepstack_visual_indexes", tuple(int(i) for i in self.deepstack_visual_indexes))
        idx = self.deepstack_visual_indexes
        if self.hidden_size % self.num_heads or self.head_dim % 4:
            raise ValueError(f"hidden_size={self.hidden_size} / num_heads={self.num_heads} must be a head_dim "
                             "divisible by 4 (the rotary angles are split between rows and columns)")
        if len(set(idx)) != len(idx) or not all(0 <= i < self.num_layers for i in idx):
            raise ValueError(f"deepstack_visual_indexes {list(idx)} must be distinct layers in [0, {self.num_layers})")
        if self.hidden_act not in _ACTS:
            raise ValueError(f"hidden_act={self.hidden_act!r}: expected one of {', '.join(_ACTS)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def merged_dim(self) -> int:
        return self.hidden_size * self.spatial_merge_size ** 2

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **overrides) -> "VisionConfig":
        """From an HF `vision_config` dict (or a whole Omni / thinker config holding one); older key names too."""
        hf = hf.get("thinker_config", hf)
        hf = hf.get("vision_config", hf)
        aliases = dict(hidden_size=("hidden_size", "embed_dim"), num_layers=("depth", "num_hidden_layers"),
                       num_heads=("num_heads", "num_attention_heads"), in_channels=("in_channels", "in_chans"),
                       patch_size=("patch_size", "spatial_patch_size"))
        fields = {}
        for f in dataclasses.fields(cls):
            key = next((k for k in aliases.get(f.name, (f.name,)) if hf.get(k) is not None), None)
            if key is not None:
                fields[f.name] = hf[key]
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "axial")) not in ("axial", "default"):
            raise ValueError(f"only the axial 2-D RoPE is supported, got {rope}")
        if "rope_theta" in rope:
            fields["rope_theta"] = rope["rope_theta"]
        fields.pop("dtype", None)  # HF's `dtype` is the checkpoint's storage dtype, not a compute dtype
        fields.update(overrides)
        return cls(**fields)


class LayerNorm(nnx.Module):
    """torch's LayerNorm (scale and bias), in float32; `cfg` is any config with param_dtype and layer_norm_eps (the
    audio encoder's too)."""

    def __init__(self, dim: int, cfg, *, rngs: nnx.Rngs):
        self.scale = param(rngs, cfg, (dim,), ("norm",), "ones")
        self.bias = param(rngs, cfg, (dim,), ("norm",), "zeros")
        self.eps = cfg.layer_norm_eps

    def __call__(self, x):
        x32 = x.astype(F32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(F32) + self.bias[...].astype(F32)).astype(x.dtype)


class Linear(nnx.Module):
    """x @ kernel (+ bias), the kernel stored [in, out], in cfg.dtype; `cfg` is any config with dtype and
    param_dtype (the audio encoder's too)."""

    def __init__(self, d_in: int, d_out: int, axes, cfg, *, bias: bool = True, rngs: nnx.Rngs):
        self.kernel = param(rngs, cfg, (d_in, d_out), axes)
        self.bias = param(rngs, cfg, (d_out,), axes[1:], "zeros") if bias else None
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, x):
        dt = self.dtype
        y = x.astype(dt) @ self.kernel[...].astype(dt)
        return y if self.bias is None else y + self.bias[...].astype(dt)


def _rope(x_FSHD, cos_FSK, sin_FSK):
    """Rotate-half RoPE with per-patch angles [..., D/2]."""
    x1, x2 = jnp.split(x_FSHD.astype(F32), 2, axis=-1)
    cos, sin = cos_FSK[..., None, :], sin_FSK[..., None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_FSHD.dtype)


class Frames(NamedTuple):
    """What each block's attention needs: the layout from GridArrays and the rotary angles per slot."""
    patch_FS: np.ndarray
    valid_FS: np.ndarray
    slot_N: np.ndarray
    cos_FSK: jax.Array
    sin_FSK: jax.Array


def _to_frames(a_N, patch_FS):
    """[N, ...] -> [F, S, ...], padded slots repeating a patch of their frame; a reshape when no frame is padded."""
    F, S = patch_FS.shape
    return a_N.reshape(F, S, *a_N.shape[1:]) if F * S == len(a_N) else a_N[patch_FS]


def _from_frames(a_FS, slot_N):
    """[F, S, ...] -> [N, ...], the valid slots only (inverse of _to_frames)."""
    a = a_FS.reshape(-1, *a_FS.shape[2:])
    return a if len(a) == len(slot_N) else a[slot_N]


class Attention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        E, H, D = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        self.dtype = jnp.dtype(cfg.dtype)
        self.qkv = param(rngs, cfg, (E, 3, H, D), ("embed", None, "heads", "head_dim"))
        self.qkv_bias = param(rngs, cfg, (3, H, D), (None, "heads", "head_dim"), "zeros")
        self.o = param(rngs, cfg, (H, D, E), ("heads", "head_dim", "embed"))
        self.o_bias = param(rngs, cfg, (E,), ("embed",), "zeros")

    def __call__(self, x_NE, frames: Frames):
        dt = self.dtype
        x_FSE = _to_frames(x_NE.astype(dt), frames.patch_FS)
        qkv_FS3HD = jnp.einsum("fse,ethd->fsthd", x_FSE, self.qkv[...].astype(dt)) + self.qkv_bias[...].astype(dt)
        q_FSHD, k_FSHD = (_rope(qkv_FS3HD[:, :, i], frames.cos_FSK, frames.sin_FSK) for i in (0, 1))
        scale = q_FSHD.shape[-1] ** -0.5
        scores_FHST = jnp.einsum("fshd,fthd->fhst", q_FSHD.astype(F32), k_FSHD.astype(F32)) * scale
        # Padded keys get no weight; padded queries are computed and dropped.
        scores_FHST = jnp.where(frames.valid_FS[:, None, None, :], scores_FHST, jnp.finfo(F32).min)
        out_FSHD = jnp.einsum("fhst,fthd->fshd", jax.nn.softmax(scores_FHST, axis=-1), qkv_FS3HD[:, :, 2].astype(F32))
        out_NHD = _from_frames(out_FSHD.astype(dt), frames.slot_N)
        return jnp.einsum("nhd,hde->ne", out_NHD, self.o[...].astype(dt)) + self.o_bias[...].astype(dt)


class Block(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        E, F = cfg.hidden_size, cfg.intermediate_size
        self.norm1 = LayerNorm(E, cfg, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.norm2 = LayerNorm(E, cfg, rngs=rngs)
        self.fc1 = Linear(E, F, ("embed", "mlp"), cfg, rngs=rngs)
        self.fc2 = Linear(F, E, ("mlp", "embed"), cfg, rngs=rngs)
        self.act = cfg.hidden_act

    def __call__(self, x_NE, frames: Frames):
        x_NE = x_NE + self.attn(self.norm1(x_NE), frames).astype(x_NE.dtype)
        h_NF = self.fc1(self.norm2(x_NE))
        h_NF = _ACTS[self.act](h_NF.astype(F32)).astype(h_NF.dtype)
        return x_NE + self.fc2(h_NF).astype(x_NE.dtype)


class PatchMerger(nnx.Module):
    """merge**2 patches -> one token: LayerNorm (over each patch, or after the shuffle over the concatenated
    block: the deepstack mergers), then Linear, exact GELU, Linear to out_hidden_size."""

    def __init__(self, cfg: VisionConfig, postshuffle: bool, *, rngs: nnx.Rngs):
        M = cfg.merged_dim
        self.merged_dim = M
        self.postshuffle = postshuffle
        self.norm = LayerNorm(M if postshuffle else cfg.hidden_size, cfg, rngs=rngs)
        self.fc1 = Linear(M, M, (None, "mlp"), cfg, rngs=rngs)
        self.fc2 = Linear(M, cfg.out_hidden_size, ("mlp", None), cfg, rngs=rngs)

    def __call__(self, x_NE):
        M = self.merged_dim
        x_MK = self.norm(x_NE.reshape(-1, M)) if self.postshuffle else self.norm(x_NE).reshape(-1, M)
        h = self.fc1(x_MK)
        return self.fc2(jax.nn.gelu(h.astype(F32), approximate=False).astype(h.dtype))


class VisionOutput(NamedTuple):
    merged_MO: jax.Array  # HF's pooler_output: one row per merged token, [N / merge**2, out_hidden_size]
    deepstack: list[jax.Array]  # HF's deepstack_features: one [M, out_hidden_size] per tapped layer, in layer order
    hidden_NE: jax.Array  # HF's last_hidden_state: the last block's output, per patch


class GridArrays(NamedTuple):
    """What grid_thw decides, per patch: bilinear taps into the position table and their weights, the (row,
    column) of the patch in its frame; and the per-frame attention layout, F frames of S = the largest frame's
    patch count: the patch in each slot (a padded slot repeats its frame's first patch), which slots are real,
    and each patch's slot in the flattened [F * S]."""
    taps_N4: np.ndarray
    weights_N4: np.ndarray
    rows_cols_N2: np.ndarray
    patch_FS: np.ndarray
    valid_FS: np.ndarray
    slot_N: np.ndarray


def grid_arrays(cfg: VisionConfig, grid_thw) -> GridArrays:
    """From a concrete grid_thw, with numpy on the host; patches in spatial-merge-block order, frames in turn.
    The position table is resampled as HF does: bilinear, align_corners=True, edge taps clamped."""
    grid = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    m, side = cfg.spatial_merge_size, int(cfg.num_position_embeddings ** 0.5)
    rows, cols, heights, widths = [], [], [], []
    for t, h, w in grid.tolist():
        if h % m or w % m:
            raise ValueError(f"grid (t={t}, h={h}, w={w}): h and w must be multiples of spatial_merge_size={m}")
        r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        block_order = lambda a: a.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).ravel()  # noqa: E731
        rows.append(np.tile(block_order(r), t))
        cols.append(np.tile(block_order(c), t))
        heights.append(np.full(t * h * w, h))
        widths.append(np.full(t * h * w, w))
    row, col, height, width = (np.concatenate(a) for a in (rows, cols, heights, widths))

    def axis(index, size):
        # float32 as HF computes it; src in [0, side-1] and floor+1 clamped at the last entry.
        src = index.astype(np.float32) * np.float32(side - 1) / np.maximum(size - 1, 1).astype(np.float32)
        lo = np.floor(src)
        taps = np.clip(np.stack([lo, lo + 1], -1).astype(np.int64), 0, side - 1)
        frac = src - lo
        return taps, np.stack([1 - frac, frac], -1)

    h_taps, h_w = axis(row, height)
    w_taps, w_w = axis(col, width)
    taps = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
    weights = (h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 4)
    sizes_F = np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0])
    starts_F = np.cumsum(sizes_F) - sizes_F
    offset_FS = np.arange(sizes_F.max())[None, :]
    valid_FS = offset_FS < sizes_F[:, None]
    patch_FS = starts_F[:, None] + np.where(valid_FS, offset_FS, 0)
    slot_N = np.flatnonzero(valid_FS)
    return GridArrays(taps, weights.astype(np.float32), np.stack([row, col], -1), patch_FS, valid_FS, slot_N)


class VisionEncoder(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.patch_embed = Linear(cfg.patch_dim, cfg.hidden_size, (None, "embed"), cfg, rngs=rngs)
        self.pos_embed = param(rngs, cfg, (cfg.num_position_embeddings, cfg.hidden_size), (None, "embed"))

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def stack(r):
            return Block(cfg, rngs=r)

        self.blocks = stack(rngs)
        self.merger = PatchMerger(cfg, postshuffle=False, rngs=rngs)
        self.deepstack_mergers = nnx.List([PatchMerger(cfg, postshuffle=True, rngs=rngs)
                                           for _ in cfg.deepstack_visual_indexes])

    def __call__(self, pixel_values, grid_thw, rules=TRAINING) -> VisionOutput:
        """pixel_values [N, C*T*P*P] (see the module docstring); grid_thw [num_images, 3] must be concrete (a
        static argument under jit): the position taps, rotary angles and the per-frame attention layout are built
        from it with numpy on the host. Attention runs per frame: the patches are gathered into [F, S, E] (S the
        largest frame's patch count, padded keys masked; a plain reshape when all frames are one size), so its
        cost is F * S**2, not N**2. Under a mesh the patches split over the batch axes of `rules` (the rows of a
        training batch, each row's images in turn)."""
        cfg = self.cfg
        g = grid_arrays(cfg, grid_thw)
        N = len(g.slot_N)
        if pixel_values.shape != (N, cfg.patch_dim):
            raise ValueError(f"pixel_values {tuple(pixel_values.shape)}: grid_thw gives {N} patches of "
                             f"{cfg.patch_dim} values")
        x_NE = self.patch_embed(pixel_values)
        pos_N4E = jnp.take(self.pos_embed[...].astype(F32), jnp.asarray(g.taps_N4), axis=0)
        x_NE = x_NE + jnp.einsum("nk,nke->ne", jnp.asarray(g.weights_N4), pos_N4E).astype(x_NE.dtype)
        x_NE = constrain(x_NE, ("batch", "act_embed"), rules)

        # Axial RoPE: a quarter of head_dim's frequencies for the row, the same for the column.
        D = cfg.head_dim
        inv_freq = 1.0 / cfg.rope_theta ** (jnp.arange(0, D // 2, 2, dtype=F32) / (D // 2))
        angles_NK = (jnp.asarray(g.rows_cols_N2, F32)[:, :, None] * inv_freq).reshape(N, D // 2)
        angles_FSK = _to_frames(angles_NK, g.patch_FS)
        frames = Frames(g.patch_FS, g.valid_FS, g.slot_N, jnp.cos(angles_FSK), jnp.sin(angles_FSK))

        deepstack, start = [], 0
        for layer in sorted(cfg.deepstack_visual_indexes):
            x_NE = self._run(x_NE, start, layer + 1, frames, rules)
            deepstack.append(self.deepstack_mergers[cfg.deepstack_visual_indexes.index(layer)](x_NE))
            start = layer + 1
        x_NE = self._run(x_NE, start, cfg.num_layers, frames, rules)
        return VisionOutput(self.merger(x_NE), deepstack, x_NE)

    def _run(self, x_NE, start: int, stop: int, frames: Frames, rules):
        """Blocks [start, stop) as one scan."""
        if start == stop:
            return x_NE
        graphdef, state = nnx.split(self.blocks)
        state = jax.tree.map(lambda a: a[start:stop], state)

        def body(x, layer_state):
            return constrain(nnx.merge(graphdef, layer_state)(x, frames), ("batch", "act_embed"), rules), None

        if self.cfg.remat:
            body = jax.checkpoint(body, prevent_cse=False, policy=jax.checkpoint_policies.nothing_saveable)
        return jax.lax.scan(body, x_NE, state)[0]


# ------------------------------------------------------------------------------------------------ HF weights

def entries(cfg: VisionConfig, prefix: str = "thinker.visual.") -> Iterator[hf.Entry]:
    """Every tensor of the tower as an `hf.Entry` (paths inside the encoder; a block's tensor once per layer)."""
    E, H, D = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    conv_shape = (E, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
    ident = (lambda a: a[0], lambda a: [a])
    linear = (lambda a: np.ascontiguousarray(a[0].T), lambda a: [np.ascontiguousarray(a.T)])  # torch: [out, in]
    conv = (lambda a: np.ascontiguousarray(a[0].reshape(E, -1).T),
            lambda a: [np.ascontiguousarray(a.T).reshape(conv_shape)])
    qkv = (lambda a: np.ascontiguousarray(a[0].T).reshape(E, 3, H, D),
           lambda a: [np.ascontiguousarray(a.reshape(E, -1).T)])
    qkv_bias = (lambda a: a[0].reshape(3, H, D), lambda a: [a.reshape(-1)])
    o = (lambda a: np.ascontiguousarray(a[0].T).reshape(H, D, E),
         lambda a: [np.ascontiguousarray(a.reshape(H * D, E).T)])

    def entry(path, layer, name, fns):
        return hf.Entry(path, layer, (prefix + name,), *fns)

    def dense(path, name, layer=None):
        yield entry(path + ("kernel",), layer, f"{name}.weight", linear)
        yield entry(path + ("bias",), layer, f"{name}.bias", ident)

    def norm(path, name, layer=None):
        yield entry(path + ("scale",), layer, f"{name}.weight", ident)
        yield entry(path + ("bias",), layer, f"{name}.bias", ident)

    def merger(path, name):
        yield from norm(path + ("norm",), f"{name}.ln_q")
        yield from dense(path + ("fc1",), f"{name}.mlp.0")
        yield from dense(path + ("fc2",), f"{name}.mlp.2")

    yield entry(("patch_embed", "kernel"), None, "patch_embed.proj.weight", conv)
    yield entry(("patch_embed", "bias"), None, "patch_embed.proj.bias", ident)
    yield entry(("pos_embed",), None, "pos_embed.weight", ident)
    for i in range(cfg.num_layers):
        b = f"blocks.{i}"
        yield from norm(("blocks", "norm1"), f"{b}.norm1", i)
        yield from norm(("blocks", "norm2"), f"{b}.norm2", i)
        yield entry(("blocks", "attn", "qkv"), i, f"{b}.attn.qkv.weight", qkv)
        yield entry(("blocks", "attn", "qkv_bias"), i, f"{b}.attn.qkv.bias", qkv_bias)
        yield entry(("blocks", "attn", "o"), i, f"{b}.attn.proj.weight", o)
        yield entry(("blocks", "attn", "o_bias"), i, f"{b}.attn.proj.bias", ident)
        yield from dense(("blocks", "fc1"), f"{b}.mlp.linear_fc1", i)
        yield from dense(("blocks", "fc2"), f"{b}.mlp.linear_fc2", i)
    yield from merger(("merger",), "merger")
    for j in range(len(cfg.deepstack_visual_indexes)):
        yield from merger(("deepstack_mergers", j), f"merger_list.{j}")


def from_hf(cfg: VisionConfig, tensors: Mapping[str, np.ndarray], prefix: str = "thinker.visual.") -> dict:
    """The tower's HF tensors (hub names, e.g. `thinker.visual.blocks.0.attn.qkv.weight`) as an nnx pure dict of
    numpy arrays in cfg.param_dtype, for `nnx.update(encoder, ...)`. Every tensor under `prefix` must be used."""
    module = nnx.eval_shape(lambda: VisionEncoder(cfg, rngs=nnx.Rngs(0)))
    return hf.gather_tower(list(entries(cfg, prefix)), tensors, prefix, "vision tower", module,
                           jnp.dtype(cfg.param_dtype))


def to_hf(cfg: VisionConfig, params: Mapping, prefix: str = "thinker.visual.") -> dict[str, np.ndarray]:
    """Inverse of `from_hf`: the nnx pure dict (e.g. `nnx.to_pure_dict(nnx.state(encoder, nnx.Param))`) as HF
    tensors by name, dtypes unchanged."""
    return hf.scatter(entries(cfg, prefix), params)
