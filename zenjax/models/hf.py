"""The one mapping between HF Qwen3 / Qwen3-MoE tensor names and zenjax parameters.

Each `Entry` is one parameter slice: a whole parameter, or one layer of a stacked one. Readers and writers
(the loader below, `convert/`) walk the entries, so a checkpoint streams layer by layer.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import glob
import json
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zenjax.models.qwen3 import Qwen3, Qwen3Config, read_hf_config

Path = tuple  # a path into nnx.state(model), e.g. ("stacks", 0, "attn", "q")


@dataclasses.dataclass(frozen=True)
class Entry:
    path: Path
    layer: int | None  # index along the stacked `layers` axis, None for unstacked parameters
    hf_keys: tuple[str, ...]
    to_ours: Callable[[list[np.ndarray]], np.ndarray]  # HF tensors (in hf_keys order) -> our slice
    to_hf: Callable[[np.ndarray], Iterable[np.ndarray]]  # our slice -> HF tensors (in hf_keys order)


# Transposes are split across threads (numpy's copies release the GIL): a conversion is otherwise bound to one
# core by its layout changes.
_THREADS = os.cpu_count() or 1
_POOL = concurrent.futures.ThreadPoolExecutor(_THREADS, thread_name_prefix="zenjax-transpose")


def _t(a):
    """a.T as a new C-contiguous array. Large matrices are copied in strips of 16 rows, split across threads:
    numpy's plain transposed copy walks the whole output for every input row and runs several times slower."""
    if a.ndim != 2 or a.size < 1 << 16 or a.itemsize not in (1, 2, 4, 8):  # small, or a shape-only probe
        return np.ascontiguousarray(a.T)
    src = a.view(f"u{a.itemsize}")  # numpy's own integer copy loops beat ml_dtypes' bfloat16 ones ~1.6x
    out = np.empty(a.shape[::-1], src.dtype)

    def strips(rows):
        for i in rows:
            for j in range(0, a.shape[1], 4096):
                out[j:j + 4096, i:i + 16] = src[i:i + 16, j:j + 4096].T

    starts = range(0, a.shape[0], 16)
    list(_POOL.map(strips, (starts[k::_THREADS] for k in range(_THREADS))))
    return out.view(a.dtype)


def _stack_t(arrs: Sequence[np.ndarray]) -> np.ndarray:
    """Experts' [out, in] tensors -> [experts, in, out], filled one expert at a time: one expert's transposed
    copy at a time, not all of them before a stack."""
    out = None
    for x, a in enumerate(arrs):
        if out is None:
            out = np.empty((len(arrs),) + a.shape[::-1], a.dtype)
        out[x] = _t(a)
    return out


def entries(cfg: Qwen3Config, prefix: str = "") -> Iterator[Entry]:
    """Every parameter slice of the model; `prefix` goes before each HF name ("thinker." for the Omni thinker's
    decoder, whose names are otherwise those of Qwen3MoeForCausalLM)."""
    H, K, D, E = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    ident = (lambda arrs: arrs[0], lambda a: [a])
    linear = (lambda arrs: _t(arrs[0]), lambda a: [_t(a)])  # torch Linear stores [out, in]
    yield Entry(("embed",), None, (prefix + "model.embed_tokens.weight",), *ident)
    yield Entry(("final_norm", "scale"), None, (prefix + "model.norm.weight",), *ident)
    if not cfg.tie_embeddings:
        yield Entry(("lm_head",), None, (prefix + "lm_head.weight",), *linear)
    kinds = cfg.stack_kinds()
    for layer, (s, j) in enumerate(cfg.layer_order()):
        mixer, moe, _ = kinds[s]
        p = f"{prefix}model.layers.{layer}."
        st = ("stacks", s)
        yield Entry(st + ("input_norm", "scale"), j, (p + "input_layernorm.weight",), *ident)
        yield Entry(st + ("post_attn_norm", "scale"), j, (p + "post_attention_layernorm.weight",), *ident)
        if mixer == "linear":
            yield from _deltanet_entries(cfg, st + ("linear_attn",), j, p + "linear_attn.")
        else:
            yield Entry(st + ("attn", "q_norm", "scale"), j, (p + "self_attn.q_norm.weight",), *ident)
            yield Entry(st + ("attn", "k_norm", "scale"), j, (p + "self_attn.k_norm.weight",), *ident)
            for name, heads in (("q", H), ("k", K), ("v", K)):
                yield Entry(st + ("attn", name), j, (p + f"self_attn.{name}_proj.weight",),
                            lambda a, h=heads: _t(a[0]).reshape(E, h, -1), lambda w: [_t(w.reshape(E, -1))])
            yield Entry(st + ("attn", "o"), j, (p + "self_attn.o_proj.weight",),
                        lambda a: _t(a[0]).reshape(H, D, E), lambda w: [_t(w.reshape(H * D, E))])
        if moe:
            yield Entry(st + ("mlp", "router"), j, (p + "mlp.gate.weight",), *linear)
            for name in ("gate", "up", "down"):
                keys = tuple(p + f"mlp.experts.{x}.{name}_proj.weight" for x in range(cfg.num_experts))
                yield Entry(st + ("mlp", name), j, keys, _stack_t, lambda w: (_t(x) for x in w))
            if cfg.shared_expert_intermediate_size:
                for name in ("gate", "up", "down"):
                    yield Entry(st + ("mlp", "shared", name), j, (p + f"mlp.shared_expert.{name}_proj.weight",),
                                *linear)
                yield Entry(st + ("mlp", "shared_gate"), j, (p + "mlp.shared_expert_gate.weight",),
                            lambda a: a[0][0], lambda w: [w[None]])
        else:
            for name in ("gate", "up", "down"):
                yield Entry(st + ("mlp", name), j, (p + f"mlp.{name}_proj.weight",), *linear)


def _deltanet_entries(cfg: Qwen3Config, st: Path, j: int, p: str) -> Iterator[Entry]:
    """A Gated DeltaNet layer (models/deltanet.py). HF's conv1d channels are [all q | all k | all v]; ours per key
    head [G, q K | k K | v rV], as in_proj_qkvz's rows."""
    G, Hv, K, V = cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim
    E = cfg.hidden_size
    ident = (lambda arrs: arrs[0], lambda a: [a])

    def conv_to_ours(a):  # [C, 1, W] -> [W, G, 2K + rV]
        a = a[0][:, 0, :]
        q, k, v = a[:G * K].reshape(G, K, -1), a[G * K:2 * G * K].reshape(G, K, -1), a[2 * G * K:].reshape(G, -1, a.shape[-1])
        return np.ascontiguousarray(np.concatenate([q, k, v], axis=1).transpose(2, 0, 1))

    def conv_to_hf(w):
        a = w.transpose(1, 2, 0)  # [G, 2K + rV, W]
        return [np.concatenate([a[:, :K].reshape(G * K, -1), a[:, K:2 * K].reshape(G * K, -1),
                                a[:, 2 * K:].reshape(Hv * V, -1)])[:, None, :]]

    for ours, theirs in (("qkvz", "in_proj_qkvz"), ("ba", "in_proj_ba")):
        yield Entry(st + (ours,), j, (p + f"{theirs}.weight",), lambda a: _t(a[0]).reshape(E, G, -1),
                    lambda w: [_t(w.reshape(E, -1))])
    yield Entry(st + ("conv",), j, (p + "conv1d.weight",), conv_to_ours, conv_to_hf)
    yield Entry(st + ("dt_bias",), j, (p + "dt_bias",), *ident)
    yield Entry(st + ("A_log",), j, (p + "A_log",), *ident)
    yield Entry(st + ("norm",), j, (p + "norm.weight",), *ident)
    yield Entry(st + ("out",), j, (p + "out_proj.weight",), lambda a: _t(a[0]).reshape(Hv, V, E),
                lambda w: [_t(w.reshape(Hv * V, E))])


# ------------------------------------------------------------------------------------ which mapping a config picks

# A Qwen3Config (Qwen3 / Qwen3-MoE) or an omni.OmniConfig (the Qwen3-Omni-MoE thinker); omni.py imports this module,
# so it is imported where an OmniConfig is handled, not at the top.
ModelConfig = Any
# In a whole Qwen3-Omni-MoE checkpoint: the tensors under these prefixes are the talker's and the code2wav's, which
# zenjax has no model for.
OMNI_SKIPPED = ("talker.", "code2wav.")


def _omni():
    from zenjax.models import omni  # noqa: PLC0415 - omni imports this module
    return omni


def is_omni(cfg: ModelConfig) -> bool:
    return not isinstance(cfg, Qwen3Config)


def text_config(cfg: ModelConfig) -> Qwen3Config:
    """The decoder's config: `cfg` itself, or the thinker's text config."""
    return cfg.text if is_omni(cfg) else cfg


def build(cfg: ModelConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    """The model a config describes: Qwen3, or the Omni thinker."""
    return _omni().OmniThinker(cfg, rngs=rngs) if is_omni(cfg) else Qwen3(cfg, rngs=rngs)


def model_entries(cfg: ModelConfig, prefix: str = "") -> Iterator[Entry]:
    """Every parameter slice of the model a config describes (`entries`, or `omni.entries` for the thinker)."""
    return _omni().entries(cfg, prefix) if is_omni(cfg) else entries(cfg, prefix)


@dataclasses.dataclass(frozen=True)
class Source:
    """What an HF config.json says about its checkpoint's tensors."""
    cfg: ModelConfig
    prefix: str  # before every converted tensor's name ("thinker." in a whole Qwen3-Omni-MoE checkpoint)
    skip: tuple[str, ...]  # prefixes of tensors present but not converted
    config: dict  # the converted model's own config dict (a whole Qwen3-Omni-MoE's thinker_config)
    # Prefixes of tensors zenjax has no model for but keeps: copied unchanged into the weights dir and written back
    # on export (Qwen3-Next's multi-token-prediction head, for speculative decoding).
    carried: tuple[str, ...] = ()


def source(hf_cfg: Mapping[str, Any] | str | os.PathLike, **overrides) -> Source:
    """Dispatches on model_type: qwen3 / qwen3_moe (`Qwen3Config`), qwen3_omni_moe_thinker (a standalone thinker)
    or qwen3_omni_moe (a whole model, of which the thinker is converted). `hf_cfg` is a dict, a config.json or the
    directory holding it."""
    hf_cfg = read_hf_config(hf_cfg)
    model_type = hf_cfg.get("model_type")
    if model_type == "qwen3_omni_moe":
        return Source(_omni().OmniConfig.from_hf(hf_cfg, **overrides), "thinker.", OMNI_SKIPPED,
                      dict(hf_cfg.get("thinker_config") or {}))
    if model_type == "qwen3_omni_moe_thinker":
        return Source(_omni().OmniConfig.from_hf(hf_cfg, **overrides), "", (), dict(hf_cfg))
    cfg = Qwen3Config.from_hf(hf_cfg, **overrides)  # refuses other model types
    return Source(cfg, "", (), dict(hf_cfg), ("mtp.",) if cfg.hybrid else ())


# ------------------------------------------------------------------------------------ whole models as pure dicts

def lookup(tree: Mapping, path: Path):
    for p in path:
        tree = tree[p]
    return tree


def gather(plan: Iterable[Entry], tensors: Mapping[str, np.ndarray], dtype=None) -> dict:
    """An nnx pure dict from HF tensors by name (numpy; cast to `dtype` if given), layers stacked in order."""
    out: dict = {}
    layers: dict[Path, list] = {}
    for e in plan:
        arr = e.to_ours([np.asarray(tensors[k]) for k in e.hf_keys])
        arr = arr if dtype is None else arr.astype(dtype, copy=False)
        if e.layer is None:
            node = out
            for p in e.path[:-1]:
                node = node.setdefault(p, {})
            node[e.path[-1]] = arr
        else:
            layers.setdefault(e.path, []).append(arr)
    for path, arrs in layers.items():
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = np.stack(arrs)
    return out


def gather_tower(plan: list[Entry], tensors: Mapping[str, np.ndarray], prefix: str, what: str, module: nnx.Module,
                 dtype=None) -> dict:
    """`gather` of one tower of a checkpoint that holds others: every tensor of `plan` present, every tensor under
    `prefix` used, and each parameter of `module` (abstract: `nnx.eval_shape`) the shape it gathers to."""
    used = {k for e in plan for k in e.hf_keys}
    missing = sorted(used - set(tensors))
    if missing:
        raise ValueError(f"HF tensor {missing[0]!r} is missing for the {what}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    extra = sorted(k for k in tensors if k.startswith(prefix) and k not in used)
    if extra:
        raise ValueError(f"{len(extra)} HF tensors under {prefix!r} are not part of this {what} (unused): "
                         f"{extra[:10]}")
    out = gather(plan, tensors, dtype)
    want = dict(nnx.to_flat_state(nnx.state(module)))
    bad = [f"{e.hf_keys[0]!r} gives {'/'.join(map(str, e.path))} shape {lookup(out, e.path).shape}, expected "
           f"{want[e.path].get_value().shape}" for e in plan
           if lookup(out, e.path).shape != want[e.path].get_value().shape]
    if bad:
        raise ValueError(f"HF tensors of the wrong shape for the {what}: " + "; ".join(sorted(set(bad))[:10]))
    return out


def scatter(plan: Iterable[Entry], params: Mapping) -> dict[str, np.ndarray]:
    """Inverse of `gather`: HF tensors by name from a pure dict, dtypes unchanged."""
    params = jax.tree.map(np.asarray, params)  # once, not once per layer slice
    out = {}
    for e in plan:
        node = lookup(params, e.path)
        out.update(zip(e.hf_keys, e.to_hf(node if e.layer is None else node[e.layer]), strict=True))
    return out


# safetensors dtype names <-> numpy dtypes (bfloat16 from ml_dtypes, as jax uses it).
SAFETENSORS_DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
                      "BF16": np.dtype(jnp.bfloat16)}


class SafetensorsReader:
    """Reads one or several safetensors files; with model.safetensors.index.json, the files it names.

    Tensors are read with positioned reads into fresh arrays rather than through a memory map: the process holds
    only the tensors in use, not mapped pages of the whole checkpoint (which count towards its resident memory).
    """

    def __init__(self, directory: str):
        index_path = os.path.join(directory, "model.safetensors.index.json")
        weight_map = None
        if os.path.exists(index_path):
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
            absent = [f for f in files if not os.path.exists(os.path.join(directory, f))]
            if absent:
                raise FileNotFoundError(f"{index_path} names files that do not exist: {absent}")
        else:
            files = sorted(os.path.basename(f) for f in glob.glob(os.path.join(directory, "*.safetensors")))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {directory}")
        self._fds: dict[str, int] = {}
        # posix_fadvise(WILLNEED) blocks while it queues the reads: issue it off the caller's thread.
        self._prefetcher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="zenjax-prefetch")
        self._tensors: dict[str, tuple[str, np.dtype, tuple[int, ...], int, int]] = {}
        for name in files:
            path = os.path.join(directory, name)
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # larger kernel read-ahead
            (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
            header = json.loads(os.pread(fd, n, 8))
            for key, t in header.items():
                if key == "__metadata__":
                    continue
                if key in self._tensors:
                    raise ValueError(f"tensor {key!r} is in both {self._tensors[key][0]} and {path}")
                if t["dtype"] not in SAFETENSORS_DTYPES:
                    raise ValueError(f"tensor {key!r} in {path} has dtype {t['dtype']}; supported: "
                                     f"{sorted(SAFETENSORS_DTYPES)}")
                start, end = t["data_offsets"]
                dtype = SAFETENSORS_DTYPES[t["dtype"]]
                self._tensors[key] = (path, dtype, tuple(t["shape"]), 8 + n + start, end - start)
        if weight_map is not None and set(weight_map) != set(self._tensors):
            raise ValueError(f"{index_path} does not match the files' contents: listed but absent "
                             f"{sorted(set(weight_map) - set(self._tensors))[:20]}, present but unlisted "
                             f"{sorted(set(self._tensors) - set(weight_map))[:20]}")

    def keys(self) -> set[str]:
        return set(self._tensors)

    def _info(self, key: str):
        if key not in self._tensors:
            raise KeyError(f"tensor {key!r} is missing from the checkpoint")
        return self._tensors[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._info(key)[2]

    def dtype(self, key: str) -> np.dtype:
        return self._info(key)[1]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: t[2] for k, t in self._tensors.items()}

    def prefetch(self, keys: Iterable[str]) -> None:
        """Asks the kernel, in the background, to start reading these tensors into the page cache (not into this
        process), so that disk reads overlap with converting what was read before."""
        for key in keys:
            path, _, _, offset, nbytes = self._info(key)
            self._prefetcher.submit(os.posix_fadvise, self._fds[path], offset, nbytes, os.POSIX_FADV_WILLNEED)

    def get(self, key: str) -> np.ndarray:
        path, dtype, shape, offset, nbytes = self._info(key)
        if nbytes != dtype.itemsize * int(np.prod(shape)):
            raise ValueError(f"tensor {key!r} in {path}: {nbytes} bytes do not hold {shape} {dtype}")
        buf = np.empty(nbytes, np.uint8)
        view, done = memoryview(buf), 0
        while done < nbytes:  # one read returns at most ~2 GiB on Linux
            got = os.preadv(self._fds[path], [view[done:]], offset + done)
            if got == 0:
                raise ValueError(f"{path} is truncated: tensor {key!r} ends past the end of the file")
            done += got
        return buf.view(dtype).reshape(shape)

    def close(self) -> None:
        if hasattr(self, "_prefetcher"):
            self._prefetcher.shutdown(wait=True, cancel_futures=True)
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)
        self._fds = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()


def check_keys(cfg: ModelConfig, available: set[str], prefix: str = "", skip: tuple[str, ...] = ()) -> None:
    """Every HF tensor used exactly once and every parameter filled: name what is off. Tensors whose names start
    with one of `skip` (parts of the checkpoint that are not converted) are left out."""
    wanted = {k for e in model_entries(cfg, prefix) for k in e.hf_keys}
    missing = sorted(wanted - available)
    unexpected = sorted(k for k in available - wanted if not k.startswith(skip))
    if text_config(cfg).tie_embeddings and prefix + "lm_head.weight" in unexpected:
        unexpected.remove(prefix + "lm_head.weight")  # tied checkpoints sometimes still carry the copy
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the config: missing tensors {missing[:20]}"
                         f"{' ...' if len(missing) > 20 else ''}; unexpected tensors {unexpected[:20]}"
                         f"{' ...' if len(unexpected) > 20 else ''}")


def param_shapes(cfg: ModelConfig) -> dict[Path, tuple[tuple[int, ...], tuple[str | None, ...]]]:
    """Shape and logical axis names of every parameter, by path; nothing is allocated."""
    return dict(_param_shapes(cfg))


@functools.lru_cache(maxsize=16)
def _param_shapes(cfg: Qwen3Config) -> tuple:
    # Traced once per config: a conversion asks several times, and tracing a large model takes a while.
    # jax.eval_shape, not nnx.eval_shape: that one resolves the logical names against the current mesh.
    params = jax.eval_shape(lambda: nnx.state(build(cfg, rngs=nnx.Rngs(0)), nnx.Param))
    return tuple((path, (tuple(var.get_value().shape), tuple(var.get_metadata()["out_sharding"])))
                 for path, var in nnx.to_flat_state(params))


def slice_shape(e: Entry, param_shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(param_shape if e.layer is None else param_shape[1:])


# Zero bytes per element: the layout functions run on shapes alone, however large the model.
_PROBE = np.dtype([])


def hf_shapes(cfg: ModelConfig, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """The shape every HF tensor must have, derived from the parameter shapes through `Entry.to_hf`."""
    shapes = param_shapes(cfg)
    out = {}
    for e in model_entries(cfg, prefix):
        probe = np.empty(slice_shape(e, shapes[e.path][0]), _PROBE)
        out.update({k: a.shape for k, a in zip(e.hf_keys, e.to_hf(probe), strict=True)})
    return out


def check_shapes(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]], prefix: str = "") -> None:
    """Every tensor the config needs has the shape it needs: name each that does not, with both shapes."""
    bad = [f"{k} is {tuple(shapes[k])}, expected {want}"
           for k, want in hf_shapes(cfg, prefix).items() if k in shapes and tuple(shapes[k]) != want]
    if bad:
        raise ValueError(f"checkpoint does not match the config: {len(bad)} tensors have the wrong shape: "
                         + "; ".join(bad[:20]) + (" ..." if len(bad) > 20 else ""))


def load_hf(directory: str, **cfg_overrides) -> Qwen3:
    """Build a zenjax model from an HF Qwen3 / Qwen3-MoE directory (config.json + safetensors)."""
    cfg = Qwen3Config.from_hf(directory, **cfg_overrides)
    reader = SafetensorsReader(directory)
    check_keys(cfg, reader.keys())
    check_shapes(cfg, reader.shapes())
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
