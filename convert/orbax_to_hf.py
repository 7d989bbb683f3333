"""A zenjax weights dir or training workdir -> HF safetensors (sharded, with an index), one slice at a time."""
from __future__ import annotations

import json
import os
import struct

import numpy as np

from convert.common import copy_side_files, progress
from zenjax import weights
from zenjax.models.hf import SAFETENSORS_DTYPES, SafetensorsReader, hf_shapes, model_entries, source

_ST_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
INDEX = "model.safetensors.index.json"


class SafetensorsWriter:
    """Streams tensors into safetensors files planned up front (names, shapes, dtypes, in write order): each
    file's header is known before its data, so tensors go to disk as they come and none is held back.

    Files are cut greedily at `max_shard_size` bytes (a larger tensor gets a file of its own) and named as
    transformers names them, with model.safetensors.index.json when there are several.
    """

    def __init__(self, directory: str, plan: list[tuple[str, tuple[int, ...], np.dtype]], max_shard_size: int):
        self.directory = directory
        shards: list[list] = [[]]
        size = 0
        for key, shape, dtype in plan:
            n = int(np.prod(shape)) * dtype.itemsize
            if shards[-1] and size + n > max_shard_size:
                shards.append([])
                size = 0
            shards[-1].append((key, shape, dtype, n))
            size += n
        count = len(shards)
        self._names = ["model.safetensors"] if count == 1 else [
            f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        self._shards = shards
        self._order = [(i, t) for i, shard in enumerate(shards) for t in shard]
        self._next = 0
        self._file = None
        self._writeback = weights.Writeback(directory)
        self.total_size = sum(t[3] for _, t in self._order)

    def _open(self, i: int) -> None:
        if self._file is not None:
            self._file.close()
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for key, shape, dtype, n in self._shards[i]:
            header[key] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self._file = open(os.path.join(self.directory, self._names[i]), "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, key: str, value: np.ndarray) -> None:
        if self._next >= len(self._order):
            raise ValueError(f"tensor {key!r} was not planned")
        i, (want, shape, dtype, _) = self._order[self._next]
        if key != want or tuple(value.shape) != tuple(shape) or value.dtype != dtype:
            raise ValueError(f"tensor {key!r} {value.shape} {value.dtype} arrived where {want!r} {shape} {dtype} "
                             "was planned")
        if self._next == 0 or self._order[self._next - 1][0] != i:
            self._open(i)
        self._file.write(np.ascontiguousarray(value).reshape(-1).view(np.uint8).data)
        self._next += 1
        self._file.flush()  # the writeback thread sees the bytes written so far
        self._writeback.wrote(value.nbytes)

    def close(self) -> None:
        """Checks every planned tensor was written; writes the index."""
        if self._file is not None:
            self._file.close()
        self._writeback.close()
        if self._next != len(self._order):
            raise ValueError(f"tensors never written: {[t[0] for _, t in self._order[self._next:]][:20]}")
        if len(self._names) > 1:
            index = {"metadata": {"total_size": self.total_size},
                     "weight_map": {t[0]: self._names[i] for i, t in self._order}}
            with open(os.path.join(self.directory, INDEX), "w") as f:
                json.dump(index, f, indent=2)


def orbax_to_hf(src: str, out: str, *, dtype: np.dtype | None = None, max_shard_size: int = 5 * 10**9) -> str:
    """Converts a weights dir or a training workdir (its latest step); `dtype` defaults to each parameter's
    stored dtype. Config, parameter names and shapes are checked before anything is written; the output appears
    only once complete, and a failure removes what was written. A Qwen3-Omni-MoE thinker is written as a
    standalone thinker (`Qwen3OmniMoeThinkerForConditionalGeneration`). Tensors the weights dir carries (a
    Qwen3-Next MTP head, `weights.CARRIED`) follow the model's, unchanged unless `dtype` casts them."""
    loc = weights.locate(src)
    stored = source(loc.config_path)
    cfg, source_config = stored.cfg, stored.config
    reader = weights.ParamsReader(loc.params_dir)
    reader.check(cfg)
    shapes = hf_shapes(cfg)
    plan_entries = list(model_entries(cfg))
    out_dtype = {e.path: dtype if dtype is not None else reader.dtype(e.path) for e in plan_entries}
    plan = [(k, shapes[k], out_dtype[e.path]) for e in plan_entries for k in e.hf_keys]
    carried_dir = os.path.join(loc.files_dir, weights.CARRIED)
    carried = SafetensorsReader(carried_dir) if os.path.isdir(carried_dir) else None
    carried_keys = sorted(carried.keys()) if carried else []
    plan += [(k, carried.shape(k), dtype if dtype is not None else carried.dtype(k)) for k in carried_keys]
    nbytes = [int(np.prod(reader.shape(e.path)[e.layer is not None:])) * reader.dtype(e.path).itemsize
              for e in plan_entries]
    with weights.atomic_directory(out) as tmp:
        writer = SafetensorsWriter(tmp, plan, max_shard_size)
        ahead: dict[int, tuple] = {}  # reads issued ahead, by entry index
        with progress(writer.total_size, "orbax-to-hf") as bar:
            for i, e in enumerate(plan_entries):
                value, done = ahead.pop(i) if i in ahead else reader.read_async(e.path, e.layer)
                done.result()
                # The next slice (and more, up to CHUNK_BYTES) is read in the background while this one is
                # written: at most one slice more in memory.
                j = max(ahead, default=i) + 1
                while (j < len(plan_entries) and (j == i + 1 or sum(nbytes[k] for k in ahead) + nbytes[j]
                                                  <= weights.CHUNK_BYTES)):
                    ahead[j] = reader.read_async(plan_entries[j].path, plan_entries[j].layer)
                    j += 1
                value = value.astype(out_dtype[e.path], copy=False)
                for key, tensor in zip(e.hf_keys, e.to_hf(value), strict=True):
                    writer.write(key, tensor)
                    bar.update(tensor.nbytes)
                del value, tensor  # not held while the next slice is read
            for k, _, d in plan[len(plan) - len(carried_keys):]:
                tensor = carried.get(k).astype(d, copy=False)
                writer.write(k, tensor)
                bar.update(tensor.nbytes)
        writer.close()
        if carried:
            carried.close()
        names = {str(d) for d in out_dtype.values()}
        name = names.pop() if len(names) == 1 else "float32"
        hf_config = {**source_config, **cfg.to_hf(), "dtype": name, "torch_dtype": name}
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
        copy_side_files(loc.files_dir, tmp, hf_config)
    return os.path.abspath(out)
