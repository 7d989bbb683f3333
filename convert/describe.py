"""`inspect`: what a checkpoint holds (HF dir, weights dir or training workdir) and whether it fits its config."""
from __future__ import annotations

import dataclasses
import glob
import os

import numpy as np

from zenjax import weights
from zenjax.models.hf import SafetensorsReader, check_keys, check_shapes, is_omni, model_entries, source


def describe(path: str) -> str:
    lines = []
    hf = bool(glob.glob(os.path.join(path, "*.safetensors")))
    loc = None if hf else weights.locate(path)
    config_path = os.path.join(path, "config.json") if hf else loc.config_path
    kind = "HF checkpoint" if hf else "weights dir" if loc.step is None else f"training workdir, step {loc.step}"
    lines.append(f"{os.path.abspath(path)}: {kind}")
    try:
        src = source(config_path)
        cfg = src.cfg
        lines += _fields(cfg)
    except (ValueError, KeyError, FileNotFoundError) as e:
        src = cfg = None
        lines.append(f"  config: {type(e).__name__}: {e}")
    if hf:
        with SafetensorsReader(path) as reader:
            tensors = [(k, reader.shape(k), reader.dtype(k)) for k in sorted(reader.keys())]
            check = (lambda: (check_keys(cfg, reader.keys(), src.prefix, src.skip + src.carried),
                              check_shapes(cfg, reader.shapes(), src.prefix))) if cfg else None
            status = _status(check)
    else:
        reader = weights.ParamsReader(loc.params_dir)
        tensors = [("/".join(map(str, p)), reader.shape(p), reader.dtype(p)) for p in sorted(reader.paths(), key=str)]
        status = _status((lambda: reader.check(cfg)) if cfg else None)
    width = max(len(name) for name, _, _ in tensors)
    lines.append(f"tensors ({len(tensors)}):")
    lines += [f"  {name:<{width}}  {str(dtype):<8}  {tuple(shape)}" for name, shape, dtype in tensors]
    count = sum(int(np.prod(shape)) for _, shape, _ in tensors)
    size = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for _, shape, dtype in tensors)
    lines.append(f"parameters: {count:,} ({size / 2**30:.2f} GiB)")
    if cfg is not None and is_omni(cfg):  # per tower: the decoder, the vision and the audio encoder
        if hf:
            tower = {k: e.path[0] for e in model_entries(cfg, src.prefix) for k in e.hf_keys}
            part = {name: tower.get(name, "skipped" if name.startswith(src.skip) else "other")
                    for name, _, _ in tensors}
        else:
            part = {name: name.split("/")[0] for name, _, _ in tensors}
        counts: dict[str, int] = {}
        for name, shape, _ in tensors:
            counts[part[name]] = counts.get(part[name], 0) + int(np.prod(shape))
        lines += [f"  {p}: {n:,}" for p, n in counts.items()]
    lines.append(f"matches the config: {status}")
    return "\n".join(lines)


# How a run computes, not what the checkpoint holds: `dtype` read as the weights' dtype (bfloat16 for float32 files).
RUN_CHOICES = ("dtype", "remat", "moe_impl", "kernels")


def _fields(cfg, prefix: str = "") -> list[str]:
    """One line per config field stored with the weights; a nested config's (the thinker's towers) under its name."""
    out = []
    for f in dataclasses.fields(cfg):
        if f.name in RUN_CHOICES:
            continue
        value = getattr(cfg, f.name)
        out += (_fields(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value)
                else [f"  {prefix}{f.name}: {value}"])
    return out


def _status(check) -> str:
    if check is None:
        return "unknown (no usable config)"
    try:
        check()
    except ValueError as e:
        return f"no: {e}"
    return "yes"
