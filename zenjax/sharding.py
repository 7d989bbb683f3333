"""Device mesh and the tables that map logical axis names to mesh axes, one per role of the weights.

Model code names logical axes only (`embed`, `heads`, `experts`, ...) and takes its table from its config
(`Qwen3Config.layout`). Changing the parallelism strategy is a change of mesh sizes or of a table, never of model
code. TRAINING shards parameters and optimizer state (FSDP); ROLLOUT is the layout of the compute-dtype copy of
the policy that decodes: replicated over the batch axes, so a decode step moves activations, never weights.
"""
from __future__ import annotations

import math
import types
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None for replicated).
TRAINING: Mapping[str, Any] = types.MappingProxyType({
    # activations
    "batch": ("data", "fsdp", "expert"),  # every non-model axis shards the batch (FSDP/EP are data-parallel too)
    "seq": None,
    "act_embed": None,  # hidden states are whole per device; weights are gathered (FSDP), not activations
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
    # parameters
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "experts": "expert",
    "expert_mlp": "tensor",
    "norm": None,
})
# Decoding: the hidden dim whole, experts over `expert`, heads / mlp / vocab over `tensor`. The batch is split as in
# training, so the rows a process holds are the same in both layouts.
ROLLOUT: Mapping[str, Any] = types.MappingProxyType({**TRAINING, "embed": None})
LAYOUTS: Mapping[str, Mapping[str, Any]] = types.MappingProxyType({"training": TRAINING, "rollout": ROLLOUT})


def logical_to_spec(axes: Sequence[str | None] | None, rules: Mapping[str, Any]) -> P:
    """PartitionSpec for a tuple of logical axis names; a mesh axis is used at most once (first wins)."""
    if axes is None:
        return P()
    used: set[str] = set()
    out = []
    for name in axes:
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise KeyError(f"logical axis {name!r} has no rule in the layout's table (zenjax.sharding)")
        mesh_axes = rules[name]
        mesh_axes = () if mesh_axes is None else (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        mesh_axes = tuple(a for a in mesh_axes if a not in used)
        used.update(mesh_axes)
        out.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
    return P(*out)


def _current_mesh():
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def platform(mesh: Mesh | None = None) -> str:
    """The platform of the devices a computation runs on: those of `mesh`, else of the mesh set by `jax.set_mesh`
    (a compile-only TPU mesh on a CPU host is TPU), else of the default device, where an unsharded one runs."""
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
    if isinstance(mesh, Mesh):
        return mesh.devices.flat[0].platform
    device = getattr(mesh, "abstract_device", None)
    return (device if device is not None else jax.devices()[0]).platform


def constrain(x: jax.Array, axes: Sequence[str | None], rules: Mapping[str, Any]) -> jax.Array:
    """Sharding constraint on an activation, a no-op when no mesh is set (single-device use)."""
    mesh = _current_mesh()
    if mesh is None:
        return x
    spec = logical_to_spec(axes, rules)
    # Drop mesh axes of size 1 and axes that don't divide the dimension (e.g. batch 1 while decoding).
    fixed = []
    for dim, entry in zip(x.shape, spec):
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        names = tuple(n for n in names if mesh.shape[n] > 1)
        size = math.prod(mesh.shape[n] for n in names)
        fixed.append(None if not names or dim % size else (names[0] if len(names) == 1 else names))
    return jax.lax.with_sharding_constraint(x, P(*fixed))


def mesh_sizes(sizes: dict[str, int], num_devices: int) -> dict[str, int]:
    """Resolve the one axis that may be -1; errors name the sizes and the device count."""
    sizes = {a: int(sizes[a]) for a in MESH_AXES}
    bad = {a: s for a, s in sizes.items() if s == 0 or s < -1}
    if bad:
        raise ValueError(f"mesh sizes must be positive or -1, got {bad}")
    fill = [a for a, s in sizes.items() if s == -1]
    if len(fill) > 1:
        raise ValueError(f"only one mesh axis may be -1, got mesh.{' and mesh.'.join(fill)}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    show = " ".join(f"{a}={s}" for a, s in sizes.items())
    if fill:
        if num_devices % fixed:
            raise ValueError(f"{num_devices} devices are not divisible by the fixed mesh axes' product {fixed} "
                             f"({show})")
        sizes[fill[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ValueError(f"mesh {show} has {fixed} devices but there are {num_devices}: make the product of "
                         f"the mesh axes {num_devices}, or set one of them to -1")
    return sizes


def make_mesh(data: int = 1, fsdp: int = 1, expert: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A 4-axis mesh; one size may be -1 to take the remaining devices."""
    devices = jax.devices() if devices is None else devices
    sizes = mesh_sizes({"data": data, "fsdp": fsdp, "expert": expert, "tensor": tensor}, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:  # topology-aware placement (ICI rings on TPU); multi-slice or odd shapes fall back to plain order
        dev = mesh_utils.create_device_mesh(shape, devices=devices)
    except (ValueError, AssertionError, NotImplementedError):
        dev = np.asarray(devices).reshape(shape)
    return Mesh(dev, MESH_AXES)


def named(mesh: Mesh, axes: Sequence[str | None] | None, rules: Mapping[str, Any]) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, rules))


def axis_size(mesh: Mesh, logical: str, rules: Mapping[str, Any]) -> int:
    """Number of shards a logical axis is split into on this mesh."""
    spec = logical_to_spec((logical,), rules)[0]
    names = () if spec is None else (spec,) if isinstance(spec, str) else spec
    return math.prod(mesh.shape[n] for n in names)


def _is_spec(x) -> bool:
    return isinstance(x, P)


def param_shardings(mesh: Mesh, abstract_state, rules: Mapping[str, Any]) -> Any:
    """NamedShardings for an nnx State (or abstract model state) from its logical axis names, as a pure dict.

    Raises a clear error when a dimension is not divisible by the mesh axes it is sharded over."""
    from flax import nnx  # noqa: PLC0415 - keep sharding importable without flax for launch tooling

    logical = nnx.to_pure_dict(nnx.get_partition_spec(abstract_state))
    shapes = nnx.to_pure_dict(abstract_state)

    def one(path, spec, leaf):
        mesh_spec = logical_to_spec(tuple(spec), rules)
        for dim, (size, entry, name) in enumerate(zip(leaf.shape, mesh_spec, spec)):
            names = () if entry is None else (entry,) if isinstance(entry, str) else entry
            n = math.prod(mesh.shape[a] for a in names)
            if size % n:
                where = "/".join(str(getattr(k, "key", k)) for k in path)
                raise ValueError(f"parameter {where} dim {dim} ({name}={size}) is not divisible by mesh axes "
                                 f"{names} of total size {n}")
        return NamedSharding(mesh, mesh_spec)

    return jax.tree_util.tree_map_with_path(one, logical, shapes, is_leaf=_is_spec)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Rows over the batch axes (the same in every layout), everything else replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), TRAINING))


def batch_rows(mesh: Mesh, n: int) -> np.ndarray:
    """The rows of an n-row batch whose shards this process's devices hold, in order."""
    index = batch_sharding(mesh, 1).addressable_devices_indices_map((n,)).values()
    size = n // axis_size(mesh, "batch", TRAINING)
    return np.concatenate([np.arange(s, s + size) for s in sorted({i[0].start or 0 for i in index})])
