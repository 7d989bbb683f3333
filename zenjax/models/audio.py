"""The audio encoder of the Qwen3-Omni-MoE thinker in Flax NNX (transformers' Qwen3OmniMoeAudioEncoder).

Log-mel frames are cut into chunks of 2 * n_window frames; three stride-2 3x3 convolutions downsample each chunk
eightfold (100 frames -> 13 tokens), sinusoidal positions restart in every chunk, and the transformer layers attend
within windows of n_window_infer // (2 * n_window) chunks of one audio. How a call's frames are cut depends on the
audio lengths: `audio_layout` computes it on the host with numpy from concrete lengths, and the module takes those
index arrays, so a jitted forward compiles once per layout shape. LayerNorm and softmax run in float32.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zenjax.models import hf
from zenjax.models.qwen3 import param
from zenjax.models.vision import LayerNorm, Linear
from zenjax.sharding import TRAINING, constrain

_ACT = {"gelu": lambda x: jax.nn.gelu(x, approximate=False), "gelu_pytorch_tanh": jax.nn.gelu,
        "relu": jax.nn.relu, "silu": jax.nn.silu}


@dataclasses.dataclass(frozen=True)
class AudioConfig:
    num_mel_bins: int = 128
    d_model: int = 1280
    num_layers: int = 32
    num_heads: int = 20
    ffn_dim: int = 5120
    output_dim: int = 3584  # the thinker's text hidden size
    n_window: int = 50  # chunks are 2 * n_window mel frames
    n_window_infer: int = 800  # attention windows span n_window_infer // (2 * n_window) chunks
    downsample_hidden_size: int = 480  # conv channels
    activation: str = "gelu"
    layer_norm_eps: float = 1e-5  # torch's LayerNorm default; HF's config has no field for it
    dtype: str = "bfloat16"  # compute dtype of matmuls and convolutions
    param_dtype: str = "float32"
    remat: bool = False  # recompute each layer in the backward pass (the text model's setting)

    def __post_init__(self):
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}")
        if self.activation not in _ACT:
            raise ValueError(f"activation={self.activation!r}: expected one of {', '.join(_ACT)}")
        if self.n_window_infer < 2 * self.n_window:
            raise ValueError(f"n_window_infer={self.n_window_infer} must be at least 2 * n_window={2 * self.n_window}")

    @property
    def conv_features(self) -> int:
        """Width of the flattened (channel, mel) conv output that conv_out projects."""
        return self.downsample_hidden_size * _conv_len(self.num_mel_bins)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **overrides) -> "AudioConfig":
        """From HF's `audio_config` dict (Qwen3OmniMoeAudioEncoderConfig); absent keys take HF's defaults.
        `scale_embedding` is left out: HF's encoder computes its scale and never applies it."""
        keys = dict(num_mel_bins="num_mel_bins", d_model="d_model", encoder_layers="num_layers",
                    encoder_attention_heads="num_heads", encoder_ffn_dim="ffn_dim", output_dim="output_dim",
                    n_window="n_window", n_window_infer="n_window_infer",
                    downsample_hidden_size="downsample_hidden_size", activation_function="activation")
        return cls(**{ours: hf[theirs] for theirs, ours in keys.items() if theirs in hf}, **overrides)


def _half(n):
    """Length after a stride-2, kernel-3, padding-1 convolution: ceil(n / 2)."""
    return (n - 1) // 2 + 1


def _conv_len(n):
    return _half(_half(_half(n)))


def output_lengths(feature_lens, n_window: int = 50):
    """Tokens the encoder emits for audios of `feature_lens` mel frames (HF's `_get_feat_extract_output_lengths`,
    which hard-codes 13 tokens per full chunk: the same for n_window = 50)."""
    chunk = 2 * n_window
    return (feature_lens // chunk) * _conv_len(chunk) + _conv_len(feature_lens % chunk)


class AudioLayout(NamedTuple):
    """Where the frames and tokens of one call go; host-computed by `audio_layout` (N chunks padded to P frames,
    W attention windows padded to K tokens, V tokens out)."""
    frames_NP: np.ndarray  # frame index of each chunk position; total_frames (a zero frame) for padding
    tokens_WK: np.ndarray  # each window's tokens as flat indices into the [N * T] conv output
    valid_WK: np.ndarray  # the window slots holding a token
    keep_V: np.ndarray  # flat [W * K] slots of the tokens, in output order


def audio_layout(cfg: AudioConfig, feature_lens: Sequence[int]) -> AudioLayout:
    """The layout of audios of `feature_lens` mel frames, concatenated in that order (numpy, concrete lengths).

    As HF: every chunk is zero-padded to the longest chunk of the call, and a window holds
    n_window_infer // (2 * n_window) chunks' worth of that longest chunk's tokens, cut from one audio's tokens."""
    lens = [int(n) for n in np.asarray(feature_lens).reshape(-1)]
    if not lens or min(lens) < 1:
        raise ValueError(f"feature_lens must be one or more positive frame counts, got {lens}")
    chunk = 2 * cfg.n_window
    starts = np.concatenate([[0], np.cumsum(lens)])
    chunk_start = np.array([s + o for s, n in zip(starts, lens) for o in range(0, n, chunk)])
    chunk_len = np.array([min(chunk, n - o) for n in lens for o in range(0, n, chunk)])
    P = int(chunk_len.max())
    pos_P = np.arange(P)
    frames_NP = np.where(pos_P < chunk_len[:, None], chunk_start[:, None] + pos_P, starts[-1])
    T = _conv_len(P)
    tokens_V = np.concatenate([i * T + np.arange(_conv_len(n)) for i, n in enumerate(chunk_len)])
    window = T * (cfg.n_window_infer // chunk)
    audio_tokens = np.concatenate([[0], np.cumsum(output_lengths(np.array(lens), cfg.n_window))])
    win_start = np.array([a + o for a, b in zip(audio_tokens[:-1], audio_tokens[1:]) for o in range(0, b - a, window)])
    win_len = np.minimum(window, np.append(win_start[1:], audio_tokens[-1]) - win_start)
    K = int(win_len.max())
    valid_WK = np.arange(K) < win_len[:, None]
    slot_WK = np.minimum(win_start[:, None] + np.arange(K), len(tokens_V) - 1)
    return AudioLayout(frames_NP.astype(np.int32), np.where(valid_WK, tokens_V[slot_WK], 0).astype(np.int32),
                       valid_WK, np.flatnonzero(valid_WK).astype(np.int32))


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """HF's SinusoidsPositionEmbedding rows [length, channels]: sines then cosines."""
    inv = np.exp(-np.log(max_timescale) / (channels // 2 - 1) * np.arange(channels // 2)).astype(np.float32)
    t = np.arange(length, dtype=np.float32)[:, None] * inv
    return np.concatenate([np.sin(t), np.cos(t)], axis=1)


class Conv(nnx.Module):
    """HF's Conv2d(c_in, c_out, 3, stride=2, padding=1) on NHWC (height = mel bins, width = frames)."""

    def __init__(self, cfg: AudioConfig, c_in: int, c_out: int, *, rngs: nnx.Rngs):
        self.dtype = jnp.dtype(cfg.dtype)
        self.kernel = param(rngs, cfg, (3, 3, c_in, c_out), (None, None, None, None))
        self.bias = param(rngs, cfg, (c_out,), (None,), init="zeros")

    def __call__(self, x_NHWC):
        y = jax.lax.conv_general_dilated(x_NHWC.astype(self.dtype), self.kernel[...].astype(self.dtype), (2, 2),
                                         ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + self.bias[...].astype(self.dtype)


class EncoderLayer(nnx.Module):
    """Pre-norm block: windowed self-attention (biased projections), then fc1 -> activation -> fc2."""

    def __init__(self, cfg: AudioConfig, *, rngs: nnx.Rngs):
        D, F = cfg.d_model, cfg.ffn_dim
        self.num_heads, self.act = cfg.num_heads, _ACT[cfg.activation]
        self.attn_norm = LayerNorm(D, cfg, rngs=rngs)
        self.q = Linear(D, D, ("embed", "heads"), cfg, rngs=rngs)
        self.k = Linear(D, D, ("embed", "heads"), cfg, rngs=rngs)
        self.v = Linear(D, D, ("embed", "heads"), cfg, rngs=rngs)
        self.o = Linear(D, D, ("heads", "embed"), cfg, rngs=rngs)
        self.mlp_norm = LayerNorm(D, cfg, rngs=rngs)
        self.fc1 = Linear(D, F, ("embed", "mlp"), cfg, rngs=rngs)
        self.fc2 = Linear(F, D, ("mlp", "embed"), cfg, rngs=rngs)

    def __call__(self, x_WKD, valid_WK):
        W, K, D = x_WKD.shape
        h = self.attn_norm(x_WKD)
        q_WKHd, k_WKHd, v_WKHd = (p(h).reshape(W, K, self.num_heads, -1) for p in (self.q, self.k, self.v))
        scores_WHKK = jnp.einsum("wqhd,wkhd->whqk", q_WKHd, k_WKHd, preferred_element_type=jnp.float32)
        scores_WHKK = scores_WHKK * q_WKHd.shape[-1] ** -0.5
        scores_WHKK = jnp.where(valid_WK[:, None, None, :], scores_WHKK, jnp.finfo(jnp.float32).min)
        probs_WHKK = jax.nn.softmax(scores_WHKK, axis=-1).astype(v_WKHd.dtype)
        out_WKHd = jnp.einsum("whqk,wkhd->wqhd", probs_WHKK, v_WKHd)
        x_WKD = x_WKD + self.o(out_WKHd.reshape(W, K, D)).astype(x_WKD.dtype)
        h = self.fc2(self.act(self.fc1(self.mlp_norm(x_WKD))))
        return x_WKD + h.astype(x_WKD.dtype)


class AudioEncoder(nnx.Module):
    def __init__(self, cfg: AudioConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        C, D = cfg.downsample_hidden_size, cfg.d_model
        self.conv1 = Conv(cfg, 1, C, rngs=rngs)
        self.conv2 = Conv(cfg, C, C, rngs=rngs)
        self.conv3 = Conv(cfg, C, C, rngs=rngs)
        self.conv_out = Linear(cfg.conv_features, D, (None, "embed"), cfg, bias=False, rngs=rngs)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make(r):
            return EncoderLayer(cfg, rngs=r)

        self.layers = make(rngs)
        self.ln_post = LayerNorm(D, cfg, rngs=rngs)
        self.proj1 = Linear(D, D, ("embed", "mlp"), cfg, rngs=rngs)
        self.proj2 = Linear(D, cfg.output_dim, ("mlp", "embed"), cfg, rngs=rngs)

    def __call__(self, input_features_MF, layout: AudioLayout, rules=TRAINING) -> jax.Array:
        """Encode `input_features_MF` [num_mel_bins, total_frames] (the audios' log-mel frames concatenated, as
        HF's forward takes them) laid out by `audio_layout(cfg, feature_lens)`; returns [V, output_dim]."""
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        feats = jnp.pad(input_features_MF.astype(dt), ((0, 0), (0, 1)))  # the zero frame padding points at
        x = constrain(jnp.transpose(feats[:, layout.frames_NP], (1, 0, 2))[..., None], ("batch", None, None, None),
                      rules)  # chunks over the batch axes
        for conv in (self.conv1, self.conv2, self.conv3):
            x = jax.nn.gelu(conv(x), approximate=False)
        N, F, T, C = x.shape
        # HF flattens each frame's conv output channel-major: (channel, mel).
        x_NTD = self.conv_out(x.transpose(0, 2, 3, 1).reshape(N, T, C * F))
        x_NTD = x_NTD + jnp.asarray(sinusoids(T, cfg.d_model), dt)
        x_WKD = x_NTD.reshape(N * T, -1)[layout.tokens_WK]

        graphdef, state = nnx.split(self.layers)
        valid_WK = jnp.asarray(layout.valid_WK, bool)

        def body(x, layer_state):  # windows over the batch axes: a training batch's rows, each row's audio in turn
            return constrain(nnx.merge(graphdef, layer_state)(x, valid_WK), ("batch", None, "act_embed"), rules), None

        if cfg.remat:
            body = jax.checkpoint(body, prevent_cse=False, policy=jax.checkpoint_policies.nothing_saveable)
        x_WKD, _ = jax.lax.scan(body, constrain(x_WKD, ("batch", None, "act_embed"), rules), state)
        x_VD = self.ln_post(x_WKD.reshape(-1, cfg.d_model)[layout.keep_V])
        return self.proj2(_ACT[cfg.activation](self.proj1(x_VD)))


# (our module path, HF module name, kind): "linear" has weight [out, in] and a bias, "conv" weight [out, in, kh, kw].
_TOP = ((("conv1",), "conv2d1", "conv"), (("conv2",), "conv2d2", "conv"), (("conv3",), "conv2d3", "conv"),
        (("conv_out",), "conv_out", "linear_no_bias"), (("ln_post",), "ln_post", "norm"),
        (("proj1",), "proj1", "linear"), (("proj2",), "proj2", "linear"))
_LAYER = ((("q",), "self_attn.q_proj", "linear"), (("k",), "self_attn.k_proj", "linear"),
          (("v",), "self_attn.v_proj", "linear"), (("o",), "self_attn.out_proj", "linear"),
          (("attn_norm",), "self_attn_layer_norm", "norm"), (("fc1",), "fc1", "linear"), (("fc2",), "fc2", "linear"),
          (("mlp_norm",), "final_layer_norm", "norm"))
_SAME = (lambda a: a, lambda a: a)
_T = (lambda w: w.T, lambda k: k.T)
_BIAS = ("bias", "bias", *_SAME)
# kind -> (our leaf, HF leaf, HF -> ours, ours -> HF) for each tensor
_LEAVES = {
    "linear": (("kernel", "weight", *_T), _BIAS),
    "linear_no_bias": (("kernel", "weight", *_T),),
    "conv": (("kernel", "weight", lambda w: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1)), _BIAS),
    "norm": (("scale", "weight", *_SAME), _BIAS),
}


def entries(cfg: AudioConfig, prefix: str = "thinker.audio_tower.") -> Iterator[hf.Entry]:
    """Every tensor of the encoder as an `hf.Entry` (paths inside the encoder; a layer's tensor once per layer)."""
    def entry(path, layer, name, fwd, inv):
        return hf.Entry(path, layer, (prefix + name,), lambda a: np.ascontiguousarray(fwd(a[0])),
                        lambda v: [np.ascontiguousarray(inv(v))])

    for path, name, kind in _TOP:
        for ours, theirs, fwd, inv in _LEAVES[kind]:
            yield entry((*path, ours), None, f"{name}.{theirs}", fwd, inv)
    for i in range(cfg.num_layers):
        for path, name, kind in _LAYER:
            for ours, theirs, fwd, inv in _LEAVES[kind]:
                yield entry(("layers", *path, ours), i, f"layers.{i}.{name}.{theirs}", fwd, inv)


def from_hf(cfg: AudioConfig, tensors: Mapping[str, np.ndarray], prefix: str = "thinker.audio_tower.") -> dict:
    """An nnx pure dict of numpy arrays in cfg.param_dtype (for `nnx.update(encoder, ...)`) from HF tensors named
    `prefix + <HF name>`; every tensor under `prefix` must be used, and each parameter's shape must match `cfg`."""
    module = nnx.eval_shape(lambda: AudioEncoder(cfg, rngs=nnx.Rngs(0)))
    return hf.gather_tower(list(entries(cfg, prefix)), tensors, prefix, "audio tower", module,
                           jnp.dtype(cfg.param_dtype))


def to_hf(cfg: AudioConfig, params: Mapping[str, Any], prefix: str = "thinker.audio_tower.") -> dict[str, np.ndarray]:
    """HF tensors (numpy, HF layouts) from the encoder's pure dict (`nnx.state(encoder).to_pure_dict()`)."""
    return hf.scatter(entries(cfg, prefix), params)
