"""The weights directory: what `python -m convert hf-to-orbax` writes and training's `init_from` reads.

    <dir>/config.json   HF-style config (`Qwen3Config.to_hf()`, or a Qwen3-Omni-MoE thinker's `OmniConfig.to_hf()`,
                        plus the source's other keys such as token ids)
    <dir>/params/       Orbax checkpoint of `nnx.to_pure_dict(nnx.state(model, nnx.Param))`
    <dir>/tokenizer*    tokenizer and generation files copied from the HF source, if any

`WeightsWriter` fills `params/` one parameter slice at a time (a whole parameter, or one layer of a stacked one)
with TensorStore, in the layout Orbax's PyTree handler writes (OCDBT + zarr, `_METADATA`), so a conversion holds
one slice in memory instead of the model and Orbax restores the result like any checkpoint of its own.
`ParamsReader` reads such a checkpoint slice by slice: a weights dir's or a training step's `params` item.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from zenjax.models import hf
from zenjax.models.hf import ModelConfig, Path, param_shapes
from zenjax.sharding import MESH_AXES, TRAINING, logical_to_spec, param_shardings

PARAMS = "params"
CONFIG = "config.json"
# Stored arrays are split into chunks of at most this size, so TensorStore writes and reads a large parameter
# chunk by chunk rather than through one more whole copy of it.
CHUNK_BYTES = 64 << 20
# Written bytes after which a writer asks the kernel to start writing them back.
WRITEBACK_BYTES = 128 << 20

_th = ocp.type_handlers


def read_config(path: str | os.PathLike) -> ModelConfig:
    """The model config of a weights dir or training workdir: a Qwen3Config, or an OmniConfig for a thinker's."""
    return hf.source(locate(path).config_path).cfg


CARRIED = "carried"  # subdirectory of tensors kept unchanged (hf.Source.carried), as HF safetensors


def write_config(directory: str | os.PathLike, cfg: ModelConfig, base: Mapping[str, Any] | None = None,
                 **extra) -> None:
    """config.json: `base` (e.g. the source's config, for its token ids) overridden by `cfg.to_hf()` and `extra`."""
    hf = {**(base or {}), **cfg.to_hf(), **extra}
    with open(os.path.join(directory, CONFIG), "w") as f:
        json.dump(hf, f, indent=2)


def umask() -> int:
    """The process's umask (reading it means setting it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary sibling of `path` to fill, renamed to `path` once the block succeeds and removed if it
    fails: an output directory that exists is complete. `path` may exist only as an empty directory."""
    path = os.path.abspath(path)
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise FileExistsError(f"{path} already exists and is not empty; remove it or choose another output")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=parent)  # same filesystem: atomic rename
    os.chmod(tmp, 0o777 & ~umask())  # mkdtemp's 0700 would hide the output from the user's group
    try:
        yield tmp
        _fsync_tree(tmp)
        os.rename(tmp, path)
        _fsync(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    """On disk before the rename publishes it: a crash must not leave a complete-looking output with lost data."""
    for directory, _, files in os.walk(root):
        for name in files:
            _fsync(os.path.join(directory, name))
        _fsync(directory)


def start_writeback(root: str) -> None:
    """Starts the kernel writing these files' dirty pages to disk without waiting (POSIX_FADV_DONTNEED), so that
    the fsync that publishes the output finds little left to write."""
    for directory, _, files in os.walk(root):
        for name in files:
            try:
                fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            except FileNotFoundError:  # TensorStore's short-lived lock files
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


class Writeback:
    """Calls `start_writeback(root)` every WRITEBACK_BYTES written, on a thread of its own: the calls take a
    tenth of a conversion's time, which the writing thread would otherwise wait for."""

    def __init__(self, root: str):
        self.root = root
        self._unflushed = 0
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="zenjax-writeback")
        self._pending: concurrent.futures.Future | None = None

    def wrote(self, nbytes: int) -> None:
        self._unflushed += nbytes
        if self._unflushed >= WRITEBACK_BYTES and (self._pending is None or self._pending.done()):
            self._unflushed = 0
            self._pending = self._pool.submit(start_writeback, self.root)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _name(path: Path) -> str:
    return ".".join(str(k) for k in path)  # Orbax's name for a leaf (its key in the OCDBT store)


def _path(keys) -> Path:
    """A pure-dict path with nnx.List indices as ints, whether they were saved as ints or strings."""
    return tuple(int(k) if isinstance(k, str) and k.isdigit() else k for k in keys)


def _key(k) -> Any:
    return getattr(k, "key", getattr(k, "idx", k))


def _flatten(tree) -> dict[Path, Any]:
    return {_path(_key(k) for k in kp): v for kp, v in jax.tree_util.tree_leaves_with_path(tree)}


def _unflatten(flat: Mapping[Path, Any]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return out


def _write_shape(shape: tuple[int, ...], axes: tuple, mesh_shape: Mapping[str, int] | None) -> tuple[int, ...]:
    """One device's shard for `mesh_shape`, one layer at a time: restoring onto that mesh then reads whole
    chunks."""
    out = []
    for size, name, entry in zip(shape, axes, logical_to_spec(axes, TRAINING)):
        names = () if entry is None else (entry,) if isinstance(entry, str) else entry
        n = int(np.prod([(mesh_shape or {}).get(a, 1) for a in names]))
        out.append(1 if name == "layers" else size // n if size % n == 0 else size)
    return tuple(out)


class WeightsWriter:
    """Writes a params checkpoint one slice at a time; `close()` checks every slice was written exactly once.

    `dtypes` maps parameter paths (or gives one dtype for all) to the stored dtype. `mesh_shape` (e.g.
    {"fsdp": 4, "tensor": 2}) chunks each parameter as one device's shard on that mesh. Up to `inflight_bytes`
    of slices are written in the background while the caller builds the next (see `reserve`); 0 writes each
    slice before `write` returns. A writer used as a context manager closes on success and, on an error, waits
    for its writes so the caller can remove the directory.
    """

    def __init__(self, directory: str | os.PathLike, cfg: ModelConfig, dtypes: Mapping[Path, Any] | Any,
                 mesh_shape: Mapping[str, int] | None = None, inflight_bytes: int = 0):
        if mesh_shape and set(mesh_shape) - set(MESH_AXES):
            raise ValueError(f"unknown mesh axes {sorted(set(mesh_shape) - set(MESH_AXES))}; known: {MESH_AXES}")
        self.directory = os.path.abspath(directory)
        os.makedirs(self.directory)
        # No fsync per write (it cuts throughput ~15x); `atomic_directory` syncs the finished output once.
        self._ctx = ts.Context({**_th.get_ts_context(use_ocdbt=True).spec.to_json(), "file_io_sync": False})
        self._shapes = param_shapes(cfg)
        self._todo: dict[Path, set] = {}
        self._inflight: collections.deque = collections.deque()
        self._writeback = Writeback(self.directory)
        self.inflight_bytes = inflight_bytes
        opens = {}
        for path, (shape, axes) in self._shapes.items():
            dtype = np.dtype(dtypes[path] if isinstance(dtypes, Mapping) else dtypes)
            info = _th.ParamInfo(name=_name(path), parent_dir=epath.Path(self.directory), is_ocdbt_checkpoint=True,
                                 use_zarr3=False, use_compression=False, ts_context=self._ctx)
            # Uncompressed: bf16/fp32 weights barely compress and zstd would halve the conversion's throughput.
            spec = _th.get_json_tspec_write(info, True, shape, _write_shape(shape, axes, mesh_shape), dtype,
                                            arg=_th.SaveArgs(chunk_byte_size=CHUNK_BYTES))
            opens[path] = ts.open(ts.Spec(spec), create=True, open=True, context=self._ctx)
            self._todo[path] = set(range(shape[0])) if axes[0] == "layers" else {None}
        self._stores = {path: f.result() for path, f in opens.items()}

    def write(self, path: Path, layer: int | None, value: np.ndarray) -> None:
        """Writes `value` as layer `layer` of a stacked parameter, or as the whole parameter (`layer=None`).
        The writer keeps `value` (without copying) until it is written: do not modify it afterwards."""
        path = _path(path)
        if path not in self._shapes:
            raise KeyError(f"no parameter {_name(path)} in this model")
        shape, axes = self._shapes[path]
        stacked = axes[0] == "layers"
        if layer is None:
            want, slots = shape, set(range(shape[0])) if stacked else {None}
        elif stacked and 0 <= layer < shape[0]:
            want, slots = shape[1:], {layer}
        else:
            raise ValueError(f"parameter {_name(path)} {shape} has no layer {layer}")
        if tuple(value.shape) != want:
            raise ValueError(f"parameter {_name(path)} (layer {layer}): got shape {tuple(value.shape)}, "
                             f"expected {want}")
        if not slots <= self._todo[path]:
            raise ValueError(f"parameter {_name(path)} (layer {layer}) is written twice")
        self._todo[path] -= slots
        store = self._stores[path]
        target = store if layer is None else store[layer]
        value = value.astype(store.dtype.numpy_dtype, copy=False)
        # Referenced, not copied: the caller hands `value` over, and it lives until written.
        self._inflight.append((target.write(value, can_reference_source_data_indefinitely=True), value.nbytes))
        self.reserve(0)

    def reserve(self, nbytes: int) -> None:
        """Waits for background writes until `nbytes` more fit in the budget: call before building a slice, and
        the process holds at most max(budget, one slice) of slices (a slice larger than the budget is written
        before the next is built)."""
        while self._inflight and sum(n for _, n in self._inflight) + nbytes > self.inflight_bytes:
            future, n = self._inflight.popleft()
            future.result()
            self._writeback.wrote(n)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
            return
        for future, _ in self._inflight:
            with contextlib.suppress(Exception):  # the error in flight is what the caller sees
                future.result()
        self._writeback.close()

    def close(self) -> None:
        while self._inflight:
            self._inflight.popleft()[0].result()
        self._writeback.close()
        missing = sorted(f"{_name(p)}" + ("" if None in left else f" layers {sorted(left)}")
                         for p, left in self._todo.items() if left)
        if missing:
            raise ValueError(f"parameters never written: {missing[:20]}{' ...' if len(missing) > 20 else ''}")
        metadata = {
            "tree_metadata": {
                str(tuple(str(k) for k in path)): {
                    "key_metadata": [{"key": str(k), "key_type": 2} for k in path],  # 2: a dict key
                    "value_metadata": {"value_type": "np.ndarray", "skip_deserialize": False},
                } for path in self._shapes},
            "use_ocdbt": True, "use_zarr3": False, "store_array_data_equal_to_fill_value": True,
            "custom_metadata": None,
        }
        with open(os.path.join(self.directory, "_METADATA"), "w") as f:
            json.dump(metadata, f)
        self._stores = {}


class ParamsReader:
    """Reads a params checkpoint written by `WeightsWriter` or by Orbax (a training step's `params` item)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = epath.Path(os.path.abspath(directory))
        if not (self.directory / "_METADATA").exists():
            raise FileNotFoundError(f"{self.directory} is not an Orbax checkpoint (no _METADATA)")
        handler = ocp.PyTreeCheckpointHandler()
        try:
            meta = handler.metadata(self.directory)
        finally:
            handler.close()
        self._meta = _flatten(meta.tree)
        self._use_zarr3 = bool(meta.use_zarr3)
        self._ocdbt = _th.is_ocdbt_checkpoint(self.directory)
        self._ctx = _th.get_ts_context(use_ocdbt=self._ocdbt)
        self._stores: dict[Path, ts.TensorStore] = {}

    def paths(self) -> list[Path]:
        return list(self._meta)

    def shape(self, path: Path) -> tuple[int, ...]:
        return tuple(self._meta[_path(path)].shape)

    def dtype(self, path: Path) -> np.dtype:
        return np.dtype(self._meta[_path(path)].dtype)

    def check(self, cfg: ModelConfig) -> None:
        """Every parameter of the model present with its shape, and nothing else: name what is off."""
        want = {p: s for p, (s, _) in param_shapes(cfg).items()}
        missing = sorted(_name(p) for p in want.keys() - self._meta.keys())
        unexpected = sorted(_name(p) for p in self._meta.keys() - want.keys())
        wrong = [f"{_name(p)} is {self.shape(p)}, expected {s}"
                 for p, s in want.items() if p in self._meta and self.shape(p) != s]
        if missing or unexpected or wrong:
            raise ValueError(f"{self.directory} does not match the config: missing parameters {missing[:20]}; "
                             f"unexpected parameters {unexpected[:20]}; wrong shapes {wrong[:20]}")

    def read(self, path: Path, layer: int | None = None) -> np.ndarray:
        """The whole parameter, or layer `layer` of a stacked one."""
        out, done = self.read_async(path, layer)
        done.result()
        return out

    def read_async(self, path: Path, layer: int | None = None) -> tuple[np.ndarray, ts.Future]:
        """An array and the future of its filling: chunk by chunk, never a second copy of the whole slice."""
        store = self._store(path, layer)
        out = np.empty(store.shape, store.dtype.numpy_dtype)
        return out, ts.array(out, copy=False, write=True).write(store)

    def _store(self, path: Path, layer: int | None) -> ts.TensorStore:
        path = _path(path)
        if path not in self._stores:
            info = _th.ParamInfo(name=self._meta[path].name, parent_dir=self.directory, use_zarr3=self._use_zarr3,
                                 is_ocdbt_checkpoint=self._ocdbt, ts_context=self._ctx)
            spec = _th.get_json_tspec_read(info, use_ocdbt=self._ocdbt)
            self._stores[path] = ts.open(ts.Spec(spec), open=True, read=True, context=self._ctx).result()
        store = self._stores[path]
        return store if layer is None else store[layer]


@dataclasses.dataclass(frozen=True)
class Located:
    config_path: str
    params_dir: str
    files_dir: str  # where tokenizer / generation files live
    step: int | None  # the training step, for a workdir


def locate(path: str | os.PathLike) -> Located:
    """A weights dir (config.json + params/) or a training workdir (config.json + checkpoints/<step>/params,
    the latest step)."""
    path = os.path.abspath(path)
    config = os.path.join(path, CONFIG)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} does not exist")
    if os.path.isdir(os.path.join(path, PARAMS)):
        params, step = os.path.join(path, PARAMS), None
    elif os.path.isdir(os.path.join(path, "checkpoints")):
        latest = ocp.path.step.latest_step_metadata(epath.Path(path) / "checkpoints",
                                                    ocp.path.step.standard_name_format())
        if latest is None:
            raise FileNotFoundError(f"{path}/checkpoints holds no finished checkpoint step")
        params, step = os.path.join(str(latest.path), PARAMS), latest.step
    else:
        raise FileNotFoundError(f"{path} is neither a weights dir (config.json + {PARAMS}/) nor a training "
                                "workdir (config.json + checkpoints/)")
    if not os.path.exists(config):
        raise FileNotFoundError(f"no config.json at {config}")
    return Located(config, params, path, step)


def save_weights(directory: str | os.PathLike, cfg: ModelConfig, params: Mapping) -> None:
    """Writes a weights dir from a pure param dict (host or addressable arrays; one process)."""
    flat = _flatten(params)
    with atomic_directory(directory) as tmp:
        write_config(tmp, cfg)
        with WeightsWriter(os.path.join(tmp, PARAMS), cfg, {p: np.asarray(v).dtype for p, v in flat.items()}) as w:
            for path, value in flat.items():
                w.write(path, None, np.asarray(value))


def load_weights(path: str | os.PathLike, *, mesh: Mesh | None = None, dtype=None) -> tuple[ModelConfig, dict]:
    """(config, pure param dict) from a weights dir or training workdir. With a mesh, each array is restored
    straight into its NamedSharding from the parameters' logical axes (each device reads its own shard);
    without, into host numpy arrays. `dtype` casts while reading (default: as stored)."""
    loc = locate(path)
    cfg = read_config(path)
    reader = ParamsReader(loc.params_dir)
    reader.check(cfg)
    shapes = param_shapes(cfg)
    if mesh is not None:
        # jax.eval_shape, not nnx.eval_shape: that one resolves the logical names against the current mesh.
        abstract = jax.eval_shape(lambda: nnx.state(hf.build(cfg, rngs=nnx.Rngs(0)), nnx.Param))
        shardings = _flatten(param_shardings(mesh, abstract, hf.text_config(cfg).rules))
    args = {}
    for p, (shape, _) in shapes.items():
        dt = np.dtype(dtype) if dtype is not None else reader.dtype(p)
        args[p] = (_th.ArrayRestoreArgs(sharding=shardings[p], global_shape=shape, dtype=dt) if mesh is not None
                   else _th.RestoreArgs(restore_type=np.ndarray, dtype=dt))
    item = _unflatten({p: np.empty((0,)) for p in shapes})  # structure only
    with ocp.PyTreeCheckpointer() as ckptr:
        params = ckptr.restore(reader.directory, args=ocp.args.PyTreeRestore(item=item,
                                                                              restore_args=_unflatten(args)))
    return cfg, params

