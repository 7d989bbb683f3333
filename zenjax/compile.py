"""Compile a run's programs for a TPU slice from any host, and report what each needs of every chip.

    python -m zenjax.compile --config=configs/next.py --topology=v5p-128 [--config.a.b=...] [--json]

libtpu's compile-only client (`pip install -e ".[tpu]"`) gives the slice's devices on a host without TPUs. The
mesh is built over them, and the three programs of a GSPO step are lowered from abstract sharded inputs (no
weight is allocated) and compiled for TPU: the minibatch update, the old-log-prob pass over the whole rollout
batch (in passes of rl.logprob_batch sequences) and the sampler (the continuous engine's refill and decode loops
over its planner-sized slots, or the static prefill + decode loop; from the rollout copy of the policy unless
rl.rollout_copy is off). For each: the compile time; XLA's per-chip bytes, plus what the run keeps
in HBM outside the program's arguments (optimizer state, a KL reference, the training weights next to the rollout
copy), against the chip's HBM; and the bytes of the results of each kind of collective per chip, per call and per
iteration of the loops whose trip count is only known at run time (the decode loop: what every generated token
moves) and per placement of the engine's refills, with the all-gathers of weights apart. Result bytes are what a device ends up holding, not ring traffic:
an all-gather's result is the whole gathered array.
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

from zenjax import cli, engine, plan, sampling, sharding
from zenjax.config import logprob_rows, model_config_from, prompt_media, validate
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
    chips = int(m.group(2)) // per_chip
    if chips < 1 or chips & (chips - 1) or (ndim == 3 and chips < 4):
        raise cli.UserError(f"--topology={slice_name!r}: {chip} slices have a power of two of chips"
                            f"{', at least 4' if ndim == 3 else ''}"
                            f"{' (the name counts 2 TensorCores per chip)' if per_chip == 2 else ''}")
    dims = [2, 2, 1] if ndim == 3 else [1, 1]
    while math.prod(dims) < chips:  # double the last of the smallest sides: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, ...
        i = max(j for j, d in enumerate(dims) if d == min(dims))
        dims[i] *= 2
    return f"{chip}:{'x'.join(map(str, dims))}", chip, chips


def tpu_devices(slice_name: str) -> tuple[list, str, float]:
    """The slice's compile-only devices, its chip and each device's HBM in bytes."""
    name, chip, chips = topology(slice_name)
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
    return devices, chip, plan.CHIPS[chip] * plan.GIB * chips / len(devices)


# ------------------------------------------------------------------------------------------- the programs

def _sds(shape, dtype, sh):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sh)


def programs(config: ml_collections.ConfigDict, mesh, hbm: float | None = None) -> dict:
    """name -> (jitted function, abstract args, static kwargs, bytes per device held by the run outside the
    program's arguments) for the update, the log-prob pass and the sampler (the config's rl.engine, its slots
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
    counts = None
    if cfg.num_experts and cfg.balance_global_batch:
        with jax.set_mesh(mesh):
            counts = jax.eval_shape(logprobs, abs_params, minibatch["tokens"], minibatch["mask"],
                                    minibatch.get("media"))[2]["counts"]

    sampler_cfg, sampler_graphdef, sampler_params = model_cfg, graphdef, abs_params
    if rl.rollout_copy:
        sampler_cfg = rollout_config(model_cfg)
        sampler_graphdef, sampler_params = abstract_rollout_params(model_cfg, mesh)
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
    ref = plan.device_bytes(abs_params) if rl.kl_coef > 0 else 0
    opt = plan.device_bytes(abs_opt) + ref
    copy = plan.device_bytes(sampler_params) * rl.rollout_copy
    sampler = sampling._generate
    if rl.engine == "continuous":
        sampler = engine._run
        sampler_kw["slots"] = plan.rollout_slots(config, dict(mesh.shape), plan.device_bytes(abs_params) + opt + copy,
                                                 hbm)
    else:
        sampler_kw["cache_len"] = T
    return {
        "update": (update, (abs_params, abs_opt, minibatch, counts), {}, ref),
        "old_logprobs": (logprobs, (abs_params, _sds((rows, T), jnp.int32, rows_sh(2)),
                                    _sds((rows, T), jnp.bool_, rows_sh(2)), media_of(rows)), {}, opt),
        "sampler": (sampler, sampler_args, sampler_kw,
                    opt + plan.device_bytes(abs_params) * rl.rollout_copy),
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

@dataclasses.dataclass
class Report:
    name: str
    compile_s: float
    bytes: dict[str, int]  # per device: arguments, temporaries, outputs, aliased, resident (optimizer state held
    # outside the program's arguments) and total (what the device needs while the program runs)
    collectives: dict[str, int]  # kind -> result bytes per device per call (run-time-length loops excluded)
    per_iteration: dict[str, int]  # kind -> result bytes per device per iteration of the run-time-length loops
    # (decoding: per token), and per iteration of the engine's refill loops (a placement, a prompt's prefill included)
    per_refill: dict[str, int]
    kernels: list[str]  # the Pallas / Mosaic kernels the program calls (e.g. ragged-dot on TPU)


_SHAPE = re.compile(r"\b(pred|s4|s8|s16|s32|s64|u4|u8|u16|u32|u64|f8e\w+|bf16|f16|f32|f64|c64|c128)\[([\d,]*)\]")
_BITS = {"pred": 8, "c64": 64, "c128": 128, "f8": 8}
_COMP = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{\s*$")
_OP = re.compile(r"= (.+?) (" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_WHILE = re.compile(r"\bwhile\(.*?condition=%?([\w.\-]+), body=%?([\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_OPCODE = re.compile(r"= [^=]*? ([a-z][a-z\-]*)\(")
_REFILL = re.compile(r'op_name="[^"]*/refill/')
_CONST = re.compile(r"s32\[\]\S* constant\((\d+)\)")
# A kernel's op_name follows its attributes, which may span lines, but comes before the next instruction.
_KERNEL = re.compile(r'custom_call_target="tpu_custom_call"(?:(?!\n\s*(?:ROOT )?%).)*?op_name="([^"]+)"', re.S)
_CALLS = re.compile(r"\b(?:to_apply|calls|branch_computations|true_computation|false_computation)=\{?%?([\w.\-, %]+)\}?")


def _result(result_type: str) -> tuple[int, tuple[int, ...]]:
    """Bytes and dims of an HLO result type; an async start's tuple holds its operand and result: the largest."""
    best = (0, ())
    for dtype, dims in _SHAPE.findall(result_type):
        bits = _BITS.get(dtype, _BITS.get(dtype[:2], int(re.sub(r"\D", "", dtype) or 8)))
        shape = tuple(int(d) for d in dims.split(",") if d)
        best = max(best, (math.prod(shape) * bits // 8, shape))
    return best


WEIGHTS = "all-gather of weights"  # the all-gathers whose result is one device's share of a parameter


def collective_bytes(hlo: str, weight_shapes: frozenset = frozenset()) -> tuple[dict[str, int], dict[str, int],
                                                                                dict[str, int]]:
    """(per call, per iteration of the loops without a known trip count, per iteration of the engine's refill
    loops), kind -> bytes, from compiled HLO. A refill loop is a run-time loop traced under `named_scope("refill")`
    (zenjax.engine: one placement, a prompt's prefill included); the others are decode loops (per token). The
    all-gathers whose result has the shape of a parameter's per-device share in the rollout layout (`weight_shapes`,
    whole or one layer of a stack) are counted under WEIGHTS as well: they gather FSDP shards of the weights."""
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo.splitlines():
        m = _COMP.match(line)
        if m:
            current = m.group(1)
            comps[current] = []
            entry = current if line.startswith("ENTRY") else entry
        elif current is not None:
            comps[current].append(line)

    def trip_count(line: str, condition: str) -> int | None:
        """XLA's known trip count, or a scan's: a condition that only compares the counter with a constant."""
        known = _TRIP.search(line)
        if known:
            return int(known.group(1))
        body = comps.get(condition, [])
        ops = {m.group(1) for m in map(_OPCODE.search, body) if m}
        consts = [int(v) for v in _CONST.findall("\n".join(body))]
        if ops <= {"parameter", "get-tuple-element", "constant", "compare"} and len(consts) == 1:
            return consts[0]
        return None  # e.g. the decode loop: it also stops when every row is done

    def add(into: dict, more: dict, n: int = 1):
        for k, v in more.items():
            into[k] = into.get(k, 0) + n * v

    def total(name: str, seen=()) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
        direct, loops, refills = {}, {}, {}
        for line in comps.get(name, ()):
            op = _OP.search(line)
            if op:
                nbytes, shape = _result(op.group(1))
                direct[op.group(2)] = direct.get(op.group(2), 0) + nbytes
                if op.group(2) == "all-gather" and _squeezed(shape) in weight_shapes:
                    direct[WEIGHTS] = direct.get(WEIGHTS, 0) + nbytes
            loop = _WHILE.search(line)
            subs = [(loop.group(2), trip_count(line, loop.group(1)))] if loop else []
            subs += [(s.strip().lstrip("%"), 1) for c in _CALLS.findall(line) for s in c.split(",")]
            for sub, n in subs:
                if sub in seen or sub not in comps:
                    continue
                inner, inner_loops, inner_refills = total(sub, seen + (name,))
                if n is None:  # a run-time-length loop: what one iteration moves
                    add(refills if _REFILL.search(line) else loops, inner)
                else:
                    add(direct, inner, n)
                add(loops, inner_loops)
                add(refills, inner_refills)
        return direct, loops, refills

    return total(entry) if entry else ({}, {}, {})


class DoesNotFit(Exception):
    """XLA's TPU compiler refused a program for want of HBM."""


def compile_one(name: str, fn, args, kwargs, resident: int, mesh, weight_shapes: frozenset = frozenset()) -> Report:
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
    hlo = compiled.as_text()
    per_call, per_iteration, per_refill = collective_bytes(hlo, weight_shapes)
    kernels = sorted({name.removesuffix("/pallas_call").rsplit("/", 1)[-1] for name in _KERNEL.findall(hlo)})
    return Report(name, seconds, sizes, per_call, per_iteration, per_refill, kernels)


def _gb(n: float) -> str:
    return plan.si(n, "B")


def format_report(r: Report, hbm: float) -> str:
    b = r.bytes
    lines = [f"{r.name}: compiled in {r.compile_s:.1f} s; per device {_gb(b['total'])} of {_gb(hbm)} "
             f"(arguments {_gb(b['arguments'])}, temporaries {_gb(b['temporaries'])}, outputs {_gb(b['outputs'])}, "
             f"aliased {_gb(b['aliased'])}" + (f", optimizer state held {_gb(b['resident'])}" if b["resident"] else "")
             + ")"]
    for label, c in (("collective results per call", r.collectives),
                     ("per iteration of the run-time loops (decoding: per token)", r.per_iteration),
                     ("per placement of the engine's refills (a prompt's prefill included)", r.per_refill)):
        if c:
            lines.append(f"  {label}: " + ", ".join(f"{k} {_gb(v)}" for k, v in sorted(c.items())))
    if r.kernels:
        lines.append("  kernels: " + ", ".join(r.kernels))
    return "\n".join(lines)


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
            reports.append(compile_one(name, *p, mesh, weights))
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
        print(json.dumps({"topology": FLAGS.topology, "hbm_bytes": hbm, "mesh": sizes,
                          "programs": [dataclasses.asdict(r) for r in reports], "does_not_fit": too_big}, indent=1))
    else:
        print(f"{config.name} on {FLAGS.topology}, mesh " + " ".join(f"{a}={s}" for a, s in sizes.items()))
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
