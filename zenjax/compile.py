"""Compile a run's programs for a TPU slice from any host, and report what each needs of every chip.

    python -m zenjax.compile --config=configs/next.py --topology=v5p-128 [--config.a.b=...] [--json]

libtpu's compile-only client (`pip install -e ".[tpu]"`) gives the slice's devices on a host without TPUs. The
mesh is built over them, and the three programs of a GSPO step are lowered from abstract sharded inputs (no
weight is allocated) and compiled for TPU: the minibatch update, the old-log-prob pass over the whole rollout
batch (in passes of rl.logprob_batch sequences) and the sampler (the continuous engine's refill and decode loops
over its planner-sized slots, or the static prefill + decode loop; from the rollout copy of the policy unless
rl.rollout_copy is off). For each: the compile time; XLA's per-chip bytes, plus what the run keeps
in HBM outside the program's arguments (optimizer state, a KL reference, the training weights next to the rollout
copy), against the chip's HBM; the bytes each device sends in each kind of collective (CONVENTION: as a ring sends
them) per call, per iteration of the loops whose trip count is only known at run time (the decode loop: what every
generated token moves) and per placement of the engine's refills, with the all-gathers of weights apart; the
compiled program's HBM bytes (operands + results of its instructions, times the trip counts of their loops); and a
bound per call (the sampler: per decode step): the planner's FLOPs at the chip's peak, the strict HBM bytes (Work)
and the compiled ones at its HBM bandwidth, the collective bytes at its ICI bandwidth (zenjax.chips), the slowest
named.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
from absl import flags
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from zenjax import chips, cli, engine, plan, sampling, sharding
from zenjax.config import BATCH_AXES, logprob_rows, model_config_from, prompt_media, validate
from zenjax.models.hf import build, text_config
from zenjax.train_state import RLHyper, State, abstract_rollout_params, abstract_state, make_functions, \
    make_optimizer, rollout_config

# Slice names count TensorCores on v4 / v5p (two per chip, a 3-D torus) and chips on v5e / v6e (a 2-D one).
GENERATIONS = {"v4": ("v4", 2, 3), "v5p": ("v5p", 2, 3), "v5e": ("v5e", 1, 2), "v5litepod": ("v5e", 1, 2),
               "v6e": ("v6e", 1, 2)}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "ragged-all-to-all",
               "collective-permute")


def topology(slice_name: str) -> tuple[str, str, int]:
    """'v5p-128' -> ('v5p:4x4x4', 'v5p', 64): the topology libtpu knows, the chip and the number of chips."""
    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", slice_name)
    if not m:
        raise cli.UserError(f"--topology={slice_name!r}: expected a slice name such as v4-32, v5litepod-16, v5e-16, "
                            "v5p-128 or v6e-64")
    chip, per_chip, ndim = GENERATIONS[m.group(1)]
    n_chips = int(m.group(2)) // per_chip
    if n_chips < 1 or n_chips & (n_chips - 1) or (ndim == 3 and n_chips < 4):
        raise cli.UserError(f"--topology={slice_name!r}: {chip} slices have a power of two of chips"
                            f"{', at least 4' if ndim == 3 else ''}"
                            f"{' (the name counts 2 TensorCores per chip)' if per_chip == 2 else ''}")
    dims = [2, 2, 1] if ndim == 3 else [1, 1]
    while math.prod(dims) < n_chips:  # double the last of the smallest sides: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, ...
        i = max(j for j, d in enumerate(dims) if d == min(dims))
        dims[i] *= 2
    return f"{chip}:{'x'.join(map(str, dims))}", chip, n_chips


def tpu_devices(slice_name: str) -> tuple[list, str, float]:
    """The slice's compile-only devices, its chip and each device's HBM in bytes."""
    name, chip, n_chips = topology(slice_name)
    # Compile-only: no chip is opened, so libtpu's one-process-per-host lock need not hold (tests, parallel runs);
    # the rest is what a TPU VM's metadata server would say, which libtpu otherwise asks for and complains about.
    for var, value in (("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"), ("TPU_SKIP_MDS_QUERY", "1"),
                       ("TPU_ACCELERATOR_TYPE", slice_name), ("TPU_WORKER_HOSTNAMES", "localhost")):
        os.environ.setdefault(var, value)
    try:
        from jax.experimental import topologies  # noqa: PLC0415

        # v4 runs its two TensorCores per chip as one device (megacore), as v4 jobs do.
        extra = {"chip_config_name": "megacore"} if chip == "v4" else {}
        devices = topologies.get_topology_desc(platform="tpu", topology_name=name, **extra).devices
    except (ImportError, RuntimeError, ValueError) as e:
        raise cli.UserError(f"cannot get the {slice_name} devices from libtpu ({cli.message(e)[:200]}); install it "
                            f'with pip install -e ".[tpu]" (jax[tpu] of the installed jax version)') from None
    return devices, chip, chips.CHIPS[chip].hbm * plan.GIB * n_chips / len(devices)


# ------------------------------------------------------------------------------------------- the programs

def _sds(shape, dtype, sh):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sh)


def programs(config: ml_collections.ConfigDict, mesh, hbm: float | None = None) -> dict:
    """name -> (jitted function, abstract args, static kwargs, bytes per device held by the run outside the
    program's arguments, its Work) for the update, the log-prob pass and the sampler (the config's rl.engine, its slots
    sized to `hbm` bytes per device as the trainer sizes them; from the rollout copy of the policy unless
    rl.rollout_copy is off)."""
    model_cfg = model_config_from(config.model)
    cfg, media = text_config(model_cfg), prompt_media(config)
    layout = None if media is None else media.layout
    rl = config.rl
    tx, schedule = make_optimizer(config.optim, config.steps * rl.minibatches // config.optim.grad_accum)
    # Eager work (optax's placeholders) stays outside the mesh context.
    graphdef, abs_params, abs_opt, param_sh, opt_sh = abstract_state(model_cfg, tx, mesh, config.seed)
    state = State(graphdef, abs_params, abs_opt, param_sh, opt_sh)
    hyper = RLHyper(rl.loss, rl.eps_low, rl.eps_high, rl.kl_coef, rl.logprob_chunk, completion_len=rl.max_new_tokens,
                    logprob_rows=logprob_rows(rl))
    logprobs, update = make_functions(state, model_cfg, tx, hyper, mesh, schedule, layout)

    prompt_len = config.data.max_prompt_len  # the trainer pads every prompt to it
    T = prompt_len + rl.max_new_tokens
    rows, mb = rl.prompts_per_step * rl.group_size, rl.prompts_per_step * rl.group_size // rl.minibatches
    rows_sh = lambda ndim: sharding.batch_sharding(mesh, ndim)  # noqa: E731

    def media_of(n, sh=None):  # n rows' media, over the batch axes (or `sh`)
        if layout is None:
            return None
        return jax.tree.map(lambda a: _sds(a.shape, a.dtype, sh or rows_sh(a.ndim)),
                            layout.abstract(model_cfg, n, prompt_len))
    minibatch = {"tokens": _sds((mb, T), jnp.int32, rows_sh(2)), "mask": _sds((mb, T), jnp.bool_, rows_sh(2)),
                 "completion_mask": _sds((mb, T - 1), jnp.float32, rows_sh(2)),
                 "old_logp": _sds((mb, T - 1), jnp.float32, rows_sh(2)), "adv": _sds((mb,), jnp.float32, rows_sh(1))}
    if rl.kl_coef > 0:
        minibatch["ref_logp"] = minibatch["old_logp"]
    if layout is not None:
        minibatch["media"] = media_of(mb)
    if cfg.num_experts:  # the old pass's routing, for the routing-change metric
        minibatch["old_topk"] = _sds((mb, cfg.num_layers, T, cfg.num_experts_per_tok),
                                     jnp.uint8 if cfg.num_experts <= 256 else jnp.int32, rows_sh(4))
    counts_arg = None
    if cfg.num_experts and cfg.balance_global_batch:
        with jax.set_mesh(mesh):
            counts_arg = jax.eval_shape(logprobs, abs_params, minibatch["tokens"], minibatch["mask"],
                                    minibatch.get("media"))[2]["counts"]

    rollout_graphdef, rollout = abstract_rollout_params(model_cfg, mesh)
    sampler_cfg, sampler_graphdef, sampler_params = model_cfg, graphdef, abs_params
    if rl.rollout_copy:
        sampler_cfg, sampler_graphdef, sampler_params = rollout_config(model_cfg), rollout_graphdef, rollout
    _, model_state = jax.eval_shape(lambda: nnx.split(build(sampler_cfg, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(model_state, sampler_params)
    replicated = NamedSharding(mesh, P())  # the sampler gets host prompts, as in the trainer
    P_ = rl.prompts_per_step
    sampler_args = (sampler_graphdef, model_state, _sds((P_, prompt_len), jnp.int32, replicated),
                    _sds((P_, prompt_len), jnp.bool_, replicated), media_of(P_, replicated),
                    _sds((P_ * rl.group_size,), jnp.int32, replicated),
                    jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated),
                    _sds((), jnp.float32, replicated), _sds((), jnp.float32, replicated),
                    _sds((), jnp.int32, replicated))
    sampler_kw = dict(layout=layout, num_samples=rl.group_size, max_new=rl.max_new_tokens, greedy=False,
                      top_k=rl.top_k, use_top_p=rl.top_p < 1, eos_ids=(0,), vocab_limit=None)
    # In HBM all along, outside some programs' arguments: the optimizer state, the KL reference's weights, and
    # while the rollout copy decodes, the training weights.
    params_bytes = plan.device_bytes(abs_params)
    ref = params_bytes if rl.kl_coef > 0 else 0
    opt = plan.device_bytes(abs_opt) + ref
    copy = plan.device_bytes(sampler_params) * rl.rollout_copy
    sampler = sampling._generate
    slots = rows
    if rl.engine == "continuous":
        sampler = engine._run
        slots = sampler_kw["slots"] = plan.rollout_slots(config, dict(mesh.shape), params_bytes + opt + copy, hbm)
    else:
        sampler_kw["cache_len"] = T

    # The least each program must do per device: every weight a device multiplies with (its share of the
    # compute-dtype weights, gathered over fsdp: the rollout layout) read once; the update also reads and writes
    # its params and optimizer state once; a decode step reads the live cache once: the prompt and, on average,
    # half the completion of each of its slots. FLOPs: 6 (2 forward) x matmul params x tokens + attention.
    devices, shards = mesh.size, math.prod(mesh.shape[a] for a in BATCH_AXES)
    weights, counts = plan.device_bytes(rollout), plan.count_params(model_cfg)
    train_flops = plan.train_flops_per_token(cfg, T, counts)
    live = prompt_len + rl.max_new_tokens / 2
    step_flops = 2 * counts.matmul_active + 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * live
    kv = plan.kv_cache_bytes(cfg, slots / shards, live, tensor=mesh.shape["tensor"])
    return {
        "update": (update, (abs_params, abs_opt, minibatch, counts_arg), {}, ref,
                   Work(train_flops * mb * T / devices, weights + 2 * (params_bytes + opt - ref), "call")),
        "old_logprobs": (logprobs, (abs_params, _sds((rows, T), jnp.int32, rows_sh(2)),
                                    _sds((rows, T), jnp.bool_, rows_sh(2)), media_of(rows)), {}, opt,
                         Work(train_flops / 3 * rows * T / devices, weights, "call")),
        "sampler": (sampler, sampler_args, sampler_kw, opt + params_bytes * rl.rollout_copy,
                    Work(step_flops * slots / devices, weights + kv, "decode step")),
    }


def weight_shapes(config: ml_collections.ConfigDict, mesh) -> frozenset:
    """Per-device shapes of the parameters in the rollout layout, whole and per layer of a stack: an all-gather
    with such a result gathers weights."""
    _, params = abstract_rollout_params(model_config_from(config.model), mesh)
    shapes = {x.sharding.shard_shape(x.shape) for x in jax.tree.leaves(params)}
    return frozenset(map(_squeezed, shapes | {s[1:] for s in shapes if len(s) > 2}))


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(d for d in shape if d != 1)  # a layer is sliced out of its stack as [1, ...]


# ------------------------------------------------------------------------------------------- the report

_ARRAY = re.compile(r"\b(pred|[su](?:2|4|8|16|32|64)|f8e\w+|f4e\w+|bf16|f16|f32|f64|c64|c128)\[([\d,]*)\]"
                    r"(?:\{([^}]*)\})?")
_BITS = {"pred": 8, "c64": 64, "c128": 128, "f8": 8, "f4": 4}
_NAME = re.compile(r"^\s*(ROOT )?%?([\w.\-]+) = ")
_COMP = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{\s*$")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_REFILL = re.compile(r'op_name="[^"]*/refill/')
# A group's size from replica_groups: listed ({{0,1},{2,3}}), iota ([2,2]<=[4]) or over mesh axes.
_GROUPS = re.compile(r"replica_groups=(?:\[\d+,(\d+)\]<=|\{\{([\d,]*)\}|mesh\[([^\]]*)\]\s*\{([^}]*)\})")
_CALLED = re.compile(r"\b(to_apply|calls|body|condition|branch_computations|true_computation|false_computation)="
                     r"(?:\{([^}]*)\}|%?([\w.\-]+))")
# A kernel's op_name follows its attributes, which may span lines, but comes before the next instruction.
_KERNEL = re.compile(r'custom_call_target="tpu_custom_call"(?:(?!\n\s*(?:ROOT )?%).)*?op_name="([^"]+)"', re.S)
# Bytes one device sends per byte of a collective's operands, as a ring sends them, in a group of n devices.
RING = {"all-gather": lambda n: n - 1, "reduce-scatter": lambda n: (n - 1) / n, "all-reduce": lambda n: 2 * (n - 1) / n,
        "all-to-all": lambda n: (n - 1) / n, "ragged-all-to-all": lambda n: (n - 1) / n,
        "collective-permute": lambda n: 1}
CONVENTION = ("bytes each device sends, as a ring sends them: all-gather and reduce-scatter (n-1)/n of the whole "
              "array, all-reduce 2(n-1)/n, all-to-all (n-1)/n, collective-permute its operand; n the group's size")
WEIGHTS = "all-gather of weights"  # the all-gathers whose result is one device's share of a parameter
HBM = "hbm"  # the key of the compiled program's HBM bytes in traffic()'s totals
# Instructions that move nothing in HBM themselves (a loop's or a call's body is counted instead).
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional", "call",
         "after-all", "add-dependency", "partition-id", "replica-id", "opt-barrier", "domain", "async-update"}
_SLICING = {"dynamic-slice", "slice", "gather"}  # they read only their result's bytes of their first operand


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    type: str  # the result's: an array or a tuple
    opcode: str
    operands: tuple[str, ...]  # names (a constant's: its literal)
    attrs: str
    root: bool


def _close(text: str, i: int) -> int:
    """The index after the bracket that closes the one opened at text[i]."""
    depth = 0
    for j in range(i, len(text)):
        depth += (text[j] in "([{") - (text[j] in ")]}")
        if depth == 0:
            return j + 1
    return len(text)


def _split(text: str) -> list[str]:
    """Top-level comma-separated parts."""
    parts, depth, start = [], 0, 0
    for j, ch in enumerate(text):
        depth += (ch in "([{") - (ch in ")]}")
        if ch == "," and depth == 0:
            parts.append(text[start:j].strip())
            start = j + 1
    return parts + [text[start:].strip()] if text.strip() else parts


def _instruction(line: str, types: dict[str, str]) -> Instruction | None:
    m = _NAME.match(line)
    if not m:
        return None
    rest = line[m.end():]
    end = _close(rest, 0) if rest.startswith("(") else rest.find(" ")
    type_, rest = rest[:end], rest[end:].lstrip()
    op = re.match(r"([\w\-]+)\(", rest)
    if not op:
        return None
    close = _close(rest, op.end() - 1)
    names = []
    for operand in _split(rest[op.end():close - 1]):
        *typed, name = operand.split()  # CPU HLO writes an operand's type before its name, TPU HLO only the name
        names.append(name.lstrip("%"))
        if typed:
            types.setdefault(names[-1], " ".join(typed))
    types[m.group(2)] = type_
    return Instruction(m.group(2), type_, op.group(1), tuple(names), rest[close:], bool(m.group(1)))


def _bytes(type_: str, hbm_only: bool = False) -> int:
    """Bytes of the arrays of an HLO type; `hbm_only`: not those in another memory space (TPU's S(1): VMEM)."""
    total = 0
    for dtype, dims, layout in _ARRAY.findall(type_):
        space = re.search(r"S\((\d+)\)", layout)
        if hbm_only and space and space.group(1) != "0":
            continue
        bits = _BITS.get(dtype, _BITS.get(dtype[:2], int(re.sub(r"\D", "", dtype) or 8)))
        total += math.prod(int(d) for d in dims.split(",") if d) * bits // 8
    return total


def _largest_shape(type_: str) -> tuple[int, ...]:
    """An async start's tuple holds its operand and its result: the result is the largest array."""
    shapes = [tuple(int(d) for d in dims.split(",") if d) for _, dims, _ in _ARRAY.findall(type_)]
    return max(shapes, key=math.prod, default=())


class Module:
    """Optimized HLO text as computations of instructions, with what they move."""

    def __init__(self, hlo: str):
        self.comps: dict[str, list[Instruction]] = {}
        self.types: dict[str, str] = {}  # instruction name -> result type (names are unique in a module)
        self.entry, current = None, None
        for line in hlo.splitlines():
            m = _COMP.match(line)
            if m:
                current = m.group(1)
                self.comps[current] = []
                self.entry = current if line.startswith("ENTRY") else self.entry
            elif current is not None and (instr := _instruction(line, self.types)):
                self.comps[current].append(instr)
        n = [re.search(rf"{key}=(\d+)", hlo) for key in ("num_partitions", "replica_count")]
        self.devices = math.prod(int(m.group(1)) for m in n if m)

    def operand_bytes(self, instr: Instruction, hbm_only: bool = False) -> list[int]:
        return [_bytes(self.types.get(name, ""), hbm_only) for name in instr.operands]

    def called(self, instr: Instruction) -> dict[str, list[str]]:
        return {key: [c.strip().lstrip("%") for c in (listed or one).split(",")]
                for key, listed, one in _CALLED.findall(instr.attrs)}

    def trip_count(self, instr: Instruction) -> int | None:
        """XLA's known trip count, or a counted loop's: a condition that only compares the counter with one
        constant, of any integer type (XLA's windowed einsums count in u32); None for a loop whose length is only
        known at run time (e.g. the decode loop: it also stops when every row is done)."""
        known = _TRIP.search(instr.attrs)
        if known:
            return int(known.group(1))
        body = self.comps.get(self.called(instr).get("condition", [""])[0], [])
        consts = [int(i.operands[0]) for i in body if i.opcode == "constant" and re.match(r"[su]\d+\[\]", i.type)]
        if {i.opcode for i in body} <= {"parameter", "get-tuple-element", "constant", "compare"} and len(consts) == 1:
            return consts[0]
        return None

    def sent(self, instr: Instruction, kind: str) -> float:
        """Bytes one device sends for a collective (CONVENTION), n from its replica groups (none: every device)."""
        m = _GROUPS.search(instr.attrs)
        if not m:
            n = self.devices
        elif m.group(3) is not None:  # mesh['a'=4,'b'=2] {'a'}
            sizes = {k: int(v) for k, v in re.findall(r"'([^']+)'=(\d+)", m.group(3))}
            n = math.prod(sizes[a] for a in re.findall(r"'([^']+)'", m.group(4)))
        else:
            n = int(m.group(1)) if m.group(1) else len(m.group(2).split(","))
        operands = self.operand_bytes(instr)
        if kind in ("ragged-all-to-all", "collective-permute"):
            operands = operands[:1]  # the others are its output buffer and offsets
        return RING[kind](n) * sum(operands)

    def hbm_bytes(self, instr: Instruction) -> int:
        """Operand + result bytes in HBM. A fusion counts them at its boundary, where an operand that is only sliced
        reads the slices and an operand updated in place (dynamic-update-slice) writes only the update; an async
        start reads its operands and its done writes the result."""
        op = instr.opcode
        if op in _FREE:
            return 0
        reads, write = self.operand_bytes(instr, hbm_only=True), _bytes(instr.type, hbm_only=True)
        if op.endswith("-start"):
            return sum(reads)
        if op.endswith("-done"):
            return write
        if op in _SLICING:
            return 2 * write + sum(reads[1:])
        if op == "dynamic-update-slice":
            return 2 * reads[1] + sum(reads[2:])
        if op != "fusion":
            return sum(reads) + write
        body = self.comps.get(self.called(instr).get("calls", [""])[0], [])
        params = {i.name: int(i.operands[0]) for i in body if i.opcode == "parameter"}
        total = sum(min(self._read(body, p, reads[k]), reads[k]) for p, k in params.items() if k < len(reads))
        by_name = {i.name: i for i in body}
        root = next((i for i in body if i.root), None)
        outputs = [by_name.get(n) for n in root.operands] if root and root.opcode == "tuple" else [root]
        types = _split(instr.type[1:-1]) if instr.type.startswith("(") else [instr.type]
        for out, type_ in zip(outputs, types):
            in_place = out is not None and out.opcode == "dynamic-update-slice" and out.operands[0] in params
            total += _bytes(self.types.get(out.operands[1], ""), True) if in_place else _bytes(type_, True)
        return total

    def _read(self, body: list[Instruction], value: str, whole: int) -> int:
        """HBM bytes a fused computation reads of `value` (`whole` bytes): the slices taken of it, through bitcasts
        and nested fusions; none where it is the buffer of an in-place update; else all of it."""
        total = 0
        for user in body:
            for k, name in enumerate(user.operands):
                if name != value:
                    continue
                if user.opcode in _SLICING and k == 0:
                    total += _bytes(user.type, hbm_only=True)
                elif user.opcode == "bitcast":
                    total += self._read(body, user.name, whole)
                elif user.opcode == "fusion":
                    inner = self.comps.get(self.called(user).get("calls", [""])[0], [])
                    param = next((i.name for i in inner if i.opcode == "parameter" and i.operands == (str(k),)), None)
                    total += self._read(inner, param, whole) if param else whole
                elif not (user.opcode == "dynamic-update-slice" and k == 0):
                    return whole
        return total


def _add(into: dict, more: dict, n: float = 1):
    for k, v in more.items():
        into[k] = into.get(k, 0) + n * v


def traffic(hlo: str, weight_shapes: frozenset = frozenset()) -> tuple[dict[str, float], dict[str, float],
                                                                        dict[str, float]]:
    """(per call, per iteration of the innermost loops without a known trip count, per iteration of the engine's
    refill loops) of what a device moves, from compiled HLO (an outer run-time loop's own traffic, e.g. per round of
    the engine's refills and decode steps, is in none of them): kind of collective -> bytes sent (CONVENTION), and
    HBM -> operand + result bytes of the instructions (Module.hbm_bytes), each multiplied by the trip counts of the
    loops around it. A refill loop is a run-time loop traced under `named_scope("refill")` (zenjax.engine: one
    placement, a prompt's prefill included); the others are decode loops (per token). The all-gathers whose result
    has the shape of a parameter's per-device share in the rollout layout (`weight_shapes`, whole or one layer of a
    stack) are counted under WEIGHTS as well: they gather FSDP shards of the weights. An all-reduce that XLA fused
    with the dynamic slice of its result (an `all-reduce-scatter` fusion) is a reduce-scatter."""
    module = Module(hlo)

    def total(name: str, seen: tuple = (), fused: bool = False, scatter: bool = False):
        direct, loops, refills = {}, {}, {}
        for instr in module.comps.get(name, ()):
            kind = instr.opcode.removesuffix("-start")
            if kind in RING:
                kind = "reduce-scatter" if scatter and kind == "all-reduce" else kind
                sent = module.sent(instr, kind)
                _add(direct, {kind: sent})
                if kind == "all-gather" and _squeezed(_largest_shape(instr.type)) in weight_shapes:
                    _add(direct, {WEIGHTS: sent})
            if not fused:  # a fusion's (or an async op's) bytes are counted at its boundary
                _add(direct, {HBM: module.hbm_bytes(instr)})
            called = module.called(instr)
            if instr.opcode == "while":
                subs = [[(called["body"][0], module.trip_count(instr), fused, False)]]
            elif instr.opcode == "conditional":  # one branch runs: count the one that moves the most
                subs = [[(b, 1, fused, False)] for key in ("branch_computations", "true_computation",
                                                            "false_computation") for b in called.get(key, ())]
            elif instr.opcode == "call":
                subs = [[(c, 1, fused, False) for c in called.get("to_apply", ())]]
            elif instr.opcode in ("fusion", "async-start"):
                subs = [[(c, 1, True, "all-reduce-scatter" in instr.name + c) for c in called.get("calls", ())]]
            else:
                subs = []
            options = []
            for option in subs:
                d, lp, rf = {}, {}, {}
                for sub, n, sub_fused, sub_scatter in option:
                    if sub in seen or sub not in module.comps:
                        continue
                    inner, inner_loops, inner_refills = total(sub, seen + (name,), sub_fused, sub_scatter)
                    if n is not None:
                        _add(d, inner, n)
                    elif _REFILL.search(instr.attrs):
                        _add(rf, inner)
                    elif not inner_loops:  # an innermost run-time loop: what one step moves
                        _add(lp, inner)
                    _add(lp, inner_loops)
                    _add(rf, inner_refills)
                options.append((d, lp, rf))
            if options:
                d, lp, rf = max(options, key=lambda o: sum(o[0].values()) + sum(o[1].values()))
                _add(direct, d)
                _add(loops, lp)
                _add(refills, rf)
        return direct, loops, refills

    return total(module.entry) if module.entry else ({}, {}, {})


@dataclasses.dataclass(frozen=True)
class Work:
    """What a program must do on each device at least: its FLOPs (the planner's analytic count) and its HBM bytes
    (each weight read once, the optimizer state read and written once, the live KV cache read once), per call or
    per decode step."""
    flops: float
    hbm: float
    per: str  # "call" or "decode step"


@dataclasses.dataclass
class Report:
    name: str
    compile_s: float
    bytes: dict[str, int]  # per device: arguments, temporaries, outputs, aliased, resident (optimizer state held
    # outside the program's arguments) and total (what the device needs while the program runs)
    collectives: dict[str, float]  # kind -> bytes a device sends (CONVENTION) per call (run-time loops excluded)
    per_iteration: dict[str, float]  # the same per iteration of the run-time-length loops (decoding: per token),
    per_refill: dict[str, float]  # and per iteration of the engine's refill loops (a placement, its prefill included)
    hbm: dict[str, float]  # the compiled program's HBM bytes per device: per call, per iteration, per refill
    bound: dict[str, float | str]  # bound(): lower-bound times per call (the sampler: per decode step)
    kernels: list[str]  # the Pallas / Mosaic kernels the program calls (e.g. ragged-dot on TPU)


def bound(work: Work, hbm: float, sent: float, chip: chips.Chip) -> dict[str, float | str]:
    """The lower-bound time of each resource on `chip`: the FLOPs at peak, the strict and the compiled HBM bytes at
    HBM bandwidth, the collective bytes sent at ICI bandwidth; the binding resource is the compiled program's
    slowest."""
    times = {"FLOPs": work.flops / chip.flops, "HBM": hbm / chip.hbm_bw, "ICI": sent / chip.ici_bw}
    return {"per": work.per, "flops": work.flops, "hbm_strict": work.hbm, "hbm_compiled": hbm, "ici_sent": sent,
            "flops_s": times["FLOPs"], "hbm_strict_s": work.hbm / chip.hbm_bw, "hbm_compiled_s": times["HBM"],
            "ici_s": times["ICI"], "hbm_ratio": hbm / work.hbm, "binding": max(times, key=times.get)}


class DoesNotFit(Exception):
    """XLA's TPU compiler refused a program for want of HBM."""


def compile_one(name: str, fn, args, kwargs, resident: int, work: Work, mesh, chip: chips.Chip,
                weight_shapes: frozenset = frozenset()) -> Report:
    t = time.perf_counter()
    try:
        with jax.set_mesh(mesh):
            compiled = fn.lower(*args, **kwargs).compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        raise DoesNotFit(f"{name}: {cli.message(e).split('RESOURCE_EXHAUSTED: ')[-1]}") from None
    seconds = time.perf_counter() - t
    m = compiled.memory_analysis()
    sizes = {"arguments": m.argument_size_in_bytes, "temporaries": m.temp_size_in_bytes,
             "outputs": m.output_size_in_bytes, "aliased": m.alias_size_in_bytes, "resident": resident}
    sizes["total"] = sum(sizes[k] for k in ("arguments", "temporaries", "outputs", "resident")) - sizes["aliased"]
    return report(name, seconds, sizes, compiled.as_text(), work, chip, weight_shapes)


def report(name: str, seconds: float, sizes: dict[str, int], hlo: str, work: Work, chip: chips.Chip,
           weight_shapes: frozenset = frozenset()) -> Report:
    """A compiled program's report from its memory sizes and optimized HLO."""
    scopes = traffic(hlo, weight_shapes)
    hbm = dict(zip(("per call", "per iteration", "per refill"), (c.pop(HBM, 0) for c in scopes)))
    per_call, per_iteration, per_refill = scopes
    step = per_iteration if work.per == "decode step" else per_call
    sent = sum(v for k, v in step.items() if k != WEIGHTS)
    b = bound(work, hbm["per iteration" if work.per == "decode step" else "per call"], sent, chip)
    kernels = sorted({name.removesuffix("/pallas_call").rsplit("/", 1)[-1] for name in _KERNEL.findall(hlo)})
    return Report(name, seconds, sizes, per_call, per_iteration, per_refill, hbm, b, kernels)


def _gb(n: float) -> str:
    return plan.si(n, "B")


def format_report(r: Report, hbm: float) -> str:
    b = r.bytes
    lines = [f"{r.name}: compiled in {r.compile_s:.1f} s; per device {_gb(b['total'])} of {_gb(hbm)} "
             f"(arguments {_gb(b['arguments'])}, temporaries {_gb(b['temporaries'])}, outputs {_gb(b['outputs'])}, "
             f"aliased {_gb(b['aliased'])}" + (f", optimizer state held {_gb(b['resident'])}" if b["resident"] else "")
             + ")"]
    for label, c in (("collective bytes sent per call", r.collectives),
                     ("per iteration of the run-time loops (decoding: per token)", r.per_iteration),
                     ("per placement of the engine's refills (a prompt's prefill included)", r.per_refill)):
        if c:
            lines.append(f"  {label}: " + ", ".join(f"{k} {_gb(v)}" for k, v in sorted(c.items())))
    if r.kernels:
        lines.append("  kernels: " + ", ".join(r.kernels))
    b = r.bound
    lines.append(f"  bound per {b['per']}: FLOPs {plan.si(b['flops'], 'FLOP')} = {_ms(b['flops_s'])}, HBM strict "
                 f"{_gb(b['hbm_strict'])} = {_ms(b['hbm_strict_s'])}, compiled {_gb(b['hbm_compiled'])} = "
                 f"{_ms(b['hbm_compiled_s'])} ({b['hbm_ratio']:.2f}x strict), collectives {_gb(b['ici_sent'])} sent = "
                 f"{_ms(b['ici_s'])}: bound by {b['binding']}")
    return "\n".join(lines)


def _ms(seconds: float) -> str:
    scale, unit = next(((f, u) for f, u in ((1, "s"), (1e-3, "ms")) if seconds >= f), (1e-6, "us"))
    return f"{seconds / scale:.3g} {unit}"


PROGRAMS = ("update", "old_logprobs", "sampler")


def run(config: ml_collections.ConfigDict, slice_name: str,
        names: tuple[str, ...] = PROGRAMS) -> tuple[list[Report], float, dict, list[str]]:
    """Reports for the programs `names` on `slice_name`, a device's HBM bytes, the mesh sizes, what does not fit."""
    unknown = sorted(set(names) - set(PROGRAMS))
    if unknown:
        raise cli.UserError(f"--programs: unknown {', '.join(unknown)}; the programs are {', '.join(PROGRAMS)}")
    devices, chip, hbm = tpu_devices(slice_name)
    try:
        sizes = validate(config, num_devices=len(devices), num_processes=1)
    except ValueError as e:
        raise cli.UserError(f"{slice_name} ({len(devices)} {chip} devices): {cli.message(e)}") from None
    mesh = sharding.make_mesh(**config.mesh, devices=devices)
    reports, too_big = [], []
    weights = weight_shapes(config, mesh)
    for name, p in programs(config, mesh, hbm).items():
        if name not in names:
            continue
        try:
            reports.append(compile_one(name, *p, mesh, chips.CHIPS[chip], weights))
        except DoesNotFit as e:
            too_big.append(str(e))
    too_big += [f"{r.name} needs {_gb(r.bytes['total'])} per device, more than the {_gb(hbm)} of a {chip} device"
                for r in reports if r.bytes["total"] > hbm]
    if config.rl.rollout_copy and any(line.startswith("sampler") for line in too_big):
        too_big.append("the sampler decodes from a copy of the policy next to the training state: "
                       "--config.rl.rollout_copy=False samples from the training state instead (less memory, "
                       "the weights all-gathered at every token)")
    return reports, hbm, sizes, too_big


FLAGS = flags.FLAGS


def main(config: ml_collections.ConfigDict, argv: list[str]) -> None:
    del argv
    if not FLAGS.topology:
        raise cli.UserError("--topology is required, e.g. --topology=v5p-128")
    reports, hbm, sizes, too_big = run(config, FLAGS.topology, tuple(FLAGS.programs))
    if FLAGS.json:
        print(json.dumps({"topology": FLAGS.topology, "hbm_bytes": hbm, "mesh": sizes, "collectives": CONVENTION,
                          "programs": [dataclasses.asdict(r) for r in reports], "does_not_fit": too_big}, indent=1))
    else:
        print(f"{config.name} on {FLAGS.topology}, mesh " + " ".join(f"{a}={s}" for a, s in sizes.items()))
        print(f"collective bytes: {CONVENTION}")
        for r in reports:
            print(format_report(r, hbm))
    for line in too_big:
        print(f"does not fit: {line}", file=sys.stderr)
    if too_big:
        sys.exit(1)


if __name__ == "__main__":
    # Eager work on the host's CPU; the TPU devices come from libtpu's compile-only client.
    jax.config.update("jax_platforms", "cpu")
    flags.DEFINE_string("config", None, cli.CONFIG_HELP)
    flags.DEFINE_string("topology", None, "TPU slice to compile for: v4-N, v5litepod-N / v5e-N, v5p-N, v6e-N")
    flags.DEFINE_list("programs", list(PROGRAMS), "which programs to compile")
    flags.DEFINE_bool("json", False, "print the report as JSON")
    cli.run(main)
