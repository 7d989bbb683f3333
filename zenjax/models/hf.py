"""The one mapping between HF Qwen3 / Qwen3-MoE tensor names and zenjax parameters.

Each `Entry` is one parameter slice: a whole parameter, or one layer of a stacked one. Readers and writers
(the loader below, `convert/`) walk the entries, so a checkpoint streams layer by layer.
"""
from __future__ import annotations

import dataclasses
import glob
import os
from typing import Callable, Iterator

import jax.numpy as jnp
import numpy as np
from flax import nnx

from zenjax.models.qwen3 import Qwen3, Qwen3Config

Path = tuple  # a path into nnx.state(model), e.g. ("stacks", 0, "attn", "q")


@dataclasses.dataclass(frozen=True)
class Entry:
    path: Path
    layer: int | None  # index along the stacked `layers` axis, None for unstacked parameters
    hf_keys: tuple[str, ...]
    to_ours: Callable[[list[np.ndarray]], np.ndarray]  # HF tensors (in hf_keys order) -> our slice
    to_hf: Callable[[np.ndarray], list[np.ndarray]]  # our slice -> HF tensors


def _t(a):
    return np.ascontiguousarray(a.T)


def entries(cfg: Qwen3Config) -> Iterator[Entry]:
    H, K, D, E = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    ident = (lambda arrs: arrs[0], lambda a: [a])
    linear = (lambda arrs: _t(arrs[0]), lambda a: [_t(a)])  # torch Linear stores [out, in]
    yield Entry(("embed",), None, ("model.embed_tokens.weight",), *ident)
    yield Entry(("final_norm", "scale"), None, ("model.norm.weight",), *ident)
    if not cfg.tie_embeddings:
        yield Entry(("lm_head",), None, ("lm_head.weight",), *linear)
    layer = 0
    for s, (moe, n) in enumerate(cfg.segments()):
        for j in range(n):
            p = f"model.layers.{layer}."
            st = ("stacks", s)
            yield Entry(st + ("input_norm", "scale"), j, (p + "input_layernorm.weight",), *ident)
            yield Entry(st + ("post_attn_norm", "scale"), j, (p + "post_attention_layernorm.weight",), *ident)
            yield Entry(st + ("attn", "q_norm", "scale"), j, (p + "self_attn.q_norm.weight",), *ident)
            yield Entry(st + ("attn", "k_norm", "scale"), j, (p + "self_attn.k_norm.weight",), *ident)
            for name, heads in (("q", H), ("k", K), ("v", K)):
                yield Entry(st + ("attn", name), j, (p + f"self_attn.{name}_proj.weight",),
                            lambda a, h=heads: _t(a[0]).reshape(E, h, D), lambda w: [_t(w.reshape(E, -1))])
            yield Entry(st + ("attn", "o"), j, (p + "self_attn.o_proj.weight",),
                        lambda a: _t(a[0]).reshape(H, D, E), lambda w: [_t(w.reshape(H * D, E))])
            if moe:
                yield Entry(st + ("mlp", "router"), j, (p + "mlp.gate.weight",), *linear)
                for name in ("gate", "up", "down"):
                    keys = tuple(p + f"mlp.experts.{x}.{name}_proj.weight" for x in range(cfg.num_experts))
                    yield Entry(st + ("mlp", name), j, keys,
                                lambda arrs: np.stack([_t(a) for a in arrs]),
                                lambda w: [_t(x) for x in w])
            else:
                for name in ("gate", "up", "down"):
                    yield Entry(st + ("mlp", name), j, (p + f"mlp.{name}_proj.weight",), *linear)
            layer += 1


class SafetensorsReader:
    """Memory-mapped reader over one or several safetensors files (with or without an index)."""

    def __init__(self, directory: str):
        from safetensors import safe_open  # noqa: PLC0415 - only readers need it

        files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {directory}")
        self._handles = {f: safe_open(f, framework="np") for f in files}
        self.index = {k: f for f, h in self._handles.items() for k in h.keys()}

    def keys(self) -> set[str]:
        return set(self.index)

    def get(self, key: str) -> np.ndarray:
        if key not in self.index:
            raise KeyError(f"tensor {key!r} is missing from the checkpoint")
        return self._handles[self.index[key]].get_tensor(key)


def check_keys(cfg: Qwen3Config, available: set[str]) -> None:
    """Every HF tensor used exactly once and every parameter filled: name what is off."""
    wanted = {k for e in entries(cfg) for k in e.hf_keys}
    missing, unexpected = sorted(wanted - available), sorted(available - wanted)
    if cfg.tie_embeddings and "lm_head.weight" in unexpected:
        unexpected.remove("lm_head.weight")  # tied checkpoints sometimes still carry the copy
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the config: missing tensors {missing[:20]}"
                         f"{' ...' if len(missing) > 20 else ''}; unexpected tensors {unexpected[:20]}"
                         f"{' ...' if len(unexpected) > 20 else ''}")


def load_hf(directory: str, **cfg_overrides) -> Qwen3:
    """Build a zenjax model from an HF Qwen3 / Qwen3-MoE directory (config.json + safetensors)."""
    cfg = Qwen3Config.from_hf(directory, **cfg_overrides)
    reader = SafetensorsReader(directory)
    check_keys(cfg, reader.keys())
    model = nnx.eval_shape(lambda: Qwen3(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(model)
    flat = dict(nnx.to_flat_state(state))
    values: dict[Path, np.ndarray] = {}
    for e in entries(cfg):
        target = flat[e.path]
        arr = e.to_ours([reader.get(k) for k in e.hf_keys])
        shape = target.get_value().shape
        want = shape if e.layer is None else shape[1:]
        if arr.shape != tuple(want):
            raise ValueError(f"{e.hf_keys[0]}: shape {arr.shape} does not fit parameter {e.path} {tuple(want)}")
        if e.layer is None:
            values[e.path] = arr
        else:
            values.setdefault(e.path, np.zeros(shape, arr.dtype))[e.layer] = arr
    dtype = jnp.dtype(cfg.param_dtype)
    for path, var in flat.items():
        var.set_value(jnp.asarray(values[path], dtype))
    nnx.update(model, nnx.from_flat_state(flat))
    return model
