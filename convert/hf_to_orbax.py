"""HF safetensors (one file or sharded with an index) -> a zenjax weights dir, one parameter slice at a time."""
from __future__ import annotations

import concurrent.futures
import os

import jax.numpy as jnp
import numpy as np

from convert.common import copy_side_files, progress
from convert.orbax_to_hf import SafetensorsWriter
from zenjax import weights
from zenjax.models.hf import SafetensorsReader, check_keys, check_shapes, model_entries, source


# How far ahead of the conversion the kernel reads the source (into its page cache, not this process).
READ_AHEAD_BYTES = 512 << 20
# How far ahead a background thread reads tensors into this process (at least the next slice, whatever its
# size), so that waiting for the disk overlaps with the layout changes and writes of the slices before.
LOAD_AHEAD_BYTES = 64 << 20


def hf_to_orbax(hf_dir: str, out: str, *, dtype: np.dtype | None = None,
                mesh_shape: dict[str, int] | None = None) -> str:
    """Converts; `dtype` is the stored dtype (default: the source's, promoted across one parameter's tensors).
    Config, tensor names and shapes are checked before anything is written; the output appears only once
    complete, and a failure removes what was written. The config's model_type picks the mapping (see
    `zenjax.models.hf.source`); of a whole Qwen3-Omni-MoE checkpoint, the thinker is converted and the talker's
    and code2wav's tensors are skipped; a Qwen3-Next checkpoint's MTP tensors are carried unchanged (`weights.CARRIED`)."""
    src = source(hf_dir)
    cfg = src.cfg
    if mesh_shape and hasattr(cfg, "check_tensor_parallel"):
        cfg.check_tensor_parallel(mesh_shape.get("tensor", 1))
    with SafetensorsReader(hf_dir) as reader:
        check_keys(cfg, reader.keys(), src.prefix, src.skip + src.carried)
        check_shapes(cfg, reader.shapes(), src.prefix)
        skipped = sorted(k for k in reader.keys() if k.startswith(src.skip)) if src.skip else []
        if skipped:
            prefixes = sorted({p for p in src.skip if any(k.startswith(p) for k in skipped)})
            print(f"skipping {len(skipped)} tensors not part of the thinker (under {', '.join(prefixes)})")
        plan = list(model_entries(cfg, src.prefix))
        dtypes: dict = {}
        for e in plan:
            for k in e.hf_keys:
                d = dtype if dtype is not None else reader.dtype(k)
                dtypes[e.path] = jnp.promote_types(dtypes.get(e.path, d), d)
        nbytes = [sum(int(np.prod(reader.shape(k))) for k in e.hf_keys) * dtypes[e.path].itemsize for e in plan]
        with weights.atomic_directory(out) as tmp:
            stored = {str(d) for d in dtypes.values()}
            name = stored.pop() if len(stored) == 1 else "float32"
            weights.write_config(tmp, cfg, src.config, dtype=name, torch_dtype=name)
            copy_side_files(hf_dir, tmp, src.config)
            # Slices are written in the background while the next is read, up to half the largest in flight.
            writer = weights.WeightsWriter(os.path.join(tmp, weights.PARAMS), cfg, dtypes, mesh_shape,
                                           inflight_bytes=max(nbytes) // 2)

            def load(e):
                return [reader.get(k).astype(dtypes[e.path], copy=False) for k in e.hf_keys]

            with writer, progress(sum(nbytes), "hf-to-orbax") as bar, \
                    concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="zenjax-load") as loader:
                ahead = 0  # entries [i, ahead) have been handed to the kernel's read-ahead
                loads: dict[int, concurrent.futures.Future] = {}  # entries being read into this process
                for i, e in enumerate(plan):
                    while ahead < len(plan) and (ahead <= i or sum(nbytes[i + 1:ahead + 1]) <= READ_AHEAD_BYTES):
                        reader.prefetch(plan[ahead].hf_keys)
                        ahead += 1
                    j = max(loads, default=i - 1) + 1
                    while j < len(plan) and (j <= i + 1 or sum(nbytes[k] for k in loads if k > i) + nbytes[j]
                                             <= LOAD_AHEAD_BYTES):
                        loads[j] = loader.submit(load, plan[j])
                        j += 1
                    tensors = loads.pop(i).result()
                    writer.reserve(nbytes[i])
                    writer.write(e.path, e.layer, e.to_ours(tensors))
                    bar.update(nbytes[i])
                    del tensors  # not held while the next slice is built
            carry(reader, src.carried, os.path.join(tmp, weights.CARRIED))
    return os.path.abspath(out)


def carry(reader: SafetensorsReader, prefixes: tuple[str, ...], out: str) -> None:
    """The tensors under `prefixes`, one at a time, unchanged into an HF-style safetensors dir `out` (none: no dir)."""
    keys = sorted(k for k in reader.keys() if k.startswith(prefixes)) if prefixes else []
    if not keys:
        return
    os.makedirs(out)
    writer = SafetensorsWriter(out, [(k, reader.shape(k), reader.dtype(k)) for k in keys], 5 * 10**9)
    for k in keys:
        writer.write(k, reader.get(k))
    writer.close()
