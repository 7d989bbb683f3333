"""The compile tool on TPU topologies from this CPU host (libtpu's compile-only client): the three programs of
a GSPO step compile for the slice, their kernels are the TPU ones, and bad input is one clear line."""
import dataclasses
import functools
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import nano as nano_config
from configs import next as next_config
from configs import omni as omni_config
from zenjax import chips, cli, compile as zcompile, plan
from zenjax.sampling import _categorical

pytest.importorskip("libtpu", reason='the TPU compiler is not installed (pip install -e ".[tpu]")')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}


@pytest.mark.parametrize("name, want", [("v5p-128", ("v5p:4x4x4", "v5p", 64)), ("v5p-8", ("v5p:2x2x1", "v5p", 4)),
                                        ("v4-32", ("v4:2x2x4", "v4", 16)), ("v5litepod-16", ("v5e:4x4", "v5e", 16)),
                                        ("v5e-8", ("v5e:2x4", "v5e", 8)), ("v6e-256", ("v6e:16x16", "v6e", 256))])
def test_slice_names_map_to_topologies(name, want):
    assert zcompile.topology(name) == want


def test_a_v4_device_is_a_chip():
    devices, chip, hbm = zcompile.tpu_devices("v4-8")  # 8 TensorCores: 4 chips, one megacore device each
    assert len(devices) == 4 and chip == "v4" and hbm == 32 * 2**30


@pytest.mark.parametrize("name", ["v9-8", "v5p-12", "v5p-2", "tpu"])
def test_unknown_slices_are_user_errors(name):
    with pytest.raises(cli.UserError, match="--topology"):
        zcompile.topology(name)


HLO = """
HloModule m, num_partitions=8
%body.1 (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %x = bf16[1,256]{1,0} parameter(0)
  %ag = bf16[4,256]{1,0} all-gather(bf16[1,256]{1,0} %x), replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}
  %w2 = (s32[]) while((s32[]) %t), condition=%c2, body=%inner, backend_config={"known_trip_count":{"n":"3"}}
  %w3 = (s32[]) while((s32[]) %t), condition=%scan_cond, body=%inner
  %w4 = (u32[]) while((u32[]) %t), condition=%u32_cond, body=%inner
}
%scan_cond (q: (s32[])) -> pred[] {
  %p = (s32[]) parameter(0)
  %i = s32[] get-tuple-element((s32[]) %p), index=0
  %n = s32[] constant(5)
  ROOT %lt = pred[] compare(s32[] %i, s32[] %n), direction=LT
}
%u32_cond (q.1: (u32[])) -> pred[] {
  %p.1 = (u32[]{:T(128)}) parameter(0)
  %i.1 = u32[]{:T(128)} get-tuple-element(%p.1), index=0
  %n.1 = u32[]{:T(128)} constant(7)
  ROOT %lt.1 = pred[]{:T(512)} compare(%i.1, %n.1), direction=LT
}
%cond (q: (s32[], f32[8])) -> pred[] {
  %p.2 = (s32[], f32[8]) parameter(0)
  %i.2 = s32[] get-tuple-element((s32[], f32[8]) %p.2), index=0
  %n.2 = s32[] constant(7)
  %lt.2 = pred[] compare(s32[] %i.2, s32[] %n.2), direction=LT
  %go = pred[] reduce(pred[8]{0} %done, pred[] %f), dimensions={0}, to_apply=%or
  ROOT %both = pred[] and(pred[] %lt.2, pred[] %go)
}
%inner (q: (s32[])) -> (s32[]) {
  %y = f32[16]{0} parameter(0)
  %ar = f32[16]{0} all-reduce(%y), replica_groups=[4,2]<=[8], to_apply=%sum
}
%all-reduce-scatter.1 (input: bf16[1024,8]) -> bf16[256,8] {
  %input = bf16[1024,8]{1,0:T(8,128)(2,1)} parameter(0)
  %all-reduce.2 = bf16[1024,8]{1,0:T(8,128)(2,1)} all-reduce(%input), replica_groups={{0,1,2,3},{4,5,6,7}}
  ROOT %ds = bf16[256,8]{1,0:T(8,128)(2,1)} dynamic-slice(%all-reduce.2, %off, %zero), dynamic_slice_sizes={256,8}
}
ENTRY %main (a: f32[8]) -> f32[8] {
  %z = f32[8,8]{1,0} parameter(0)
  %g = bf16[1024,8]{1,0:T(8,128)(2,1)} parameter(1)
  %a64 = f32[64]{0} parameter(2)
  %a32 = f32[32]{0} parameter(3)
  %rs = f32[2,8]{1,0} reduce-scatter(%z), replica_groups=[2,4]<=[8], dimensions={0}
  %fusion = bf16[256,8]{1,0:T(8,128)(2,1)} fusion(%g), kind=kCustom, calls=%all-reduce-scatter.1
  %car = (f32[64]{0}, f32[32]{0}) all-reduce(%a64, %a32), replica_groups={}, to_apply=%sum
  %cp = f32[32]{0} collective-permute(%a32), source_target_pairs={{0,1},{1,0}}
  %w = (s32[], f32[8]) while((s32[], f32[8]) %init), condition=%cond, body=%body.1
  %r = (s32[]) while((s32[]) %t), condition=%cond, body=%inner, metadata={op_name="jit(_run)/while/body/refill/while"}
}
"""


def test_collectives_are_the_bytes_each_device_sends_per_call_and_per_iteration():
    # Hand-counted, CONVENTION: a ring of n sends n-1 shards of an all-gather's operand, (n-1)/n of a
    # reduce-scatter's or all-to-all's operand, 2(n-1)/n of an all-reduce's, a collective-permute's operand.
    per_call, per_iteration, per_refill = (
        {k: v for k, v in c.items() if k != zcompile.HBM} for c in zcompile.traffic(HLO))
    assert per_call == {
        # 8x8 f32 over groups of 4 ([2,4]<=[8]); the fused all-reduce + dynamic slice of 1024x8 bf16 over 4
        "reduce-scatter": 3 / 4 * 256 + 3 / 4 * 16384,
        "all-reduce": 2 * 7 / 8 * (256 + 128),  # both operands of the combined all-reduce, over all 8 devices
        "collective-permute": 128}
    # Each iteration of the loop that also stops on a reduction (its trip count known at run time only) gathers
    # 1x256 bf16 in groups of 4, and runs a 16-float all-reduce in pairs ([4,2]<=[8]) in a loop XLA knows runs 3
    # times, in a scan whose s32 condition compares the counter with 5, and in a u32 one (XLA's windowed einsums)
    # with 7. The engine's refill loop (traced under its named scope) runs the all-reduce once per placement.
    assert per_iteration == {"all-gather": 3 * 512, "all-reduce": (3 + 5 + 7) * 64}
    assert per_refill == {"all-reduce": 64}
    # With a parameter whose per-device share is [4, 256] (or [1, 4, 256], one layer of a stack) the all-gather is
    # counted as gathering weights too.
    _, per_iteration, _ = zcompile.traffic(HLO, frozenset({(4, 256)}))
    assert per_iteration[zcompile.WEIGHTS] == 3 * 512 == per_iteration["all-gather"]


HBM_HLO = """
HloModule h, num_partitions=1
%nested_slice (n0: f32[10,256], n1: s32[]) -> f32[1,256] {
  %n0 = f32[10,256]{1,0} parameter(0)
  %n1 = s32[] parameter(1)
  %zero = s32[] constant(0)
  ROOT %ds = f32[1,256]{1,0} dynamic-slice(%n0, %n1, %zero), dynamic_slice_sizes={1,256}
}
%fused_slice (p0: f32[10,256], p1: s32[]) -> f32[256] {
  %p0 = f32[10,256]{1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %f = f32[1,256]{1,0} fusion(%p0, %p1), kind=kLoop, calls=%nested_slice
  ROOT %r = f32[256]{0} bitcast(%f)
}
%fused_update (q0: f32[10,256], q1: f32[256], q2: s32[]) -> f32[10,256] {
  %q0 = f32[10,256]{1,0} parameter(0)
  %q1 = f32[256]{0} parameter(1)
  %q2 = s32[] parameter(2)
  %b = f32[1,256]{1,0} bitcast(%q1)
  %z = s32[] constant(0)
  ROOT %dus = f32[10,256]{1,0} dynamic-update-slice(%q0, %b, %q2, %z)
}
%body (s: (s32[], f32[10,256])) -> (s32[], f32[10,256]) {
  %s = (s32[], f32[10,256]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%s), index=0
  %cache = f32[10,256]{1,0} get-tuple-element(%s), index=1
  %row = f32[256]{0} fusion(%cache, %i), kind=kLoop, calls=%fused_slice
  %row2 = f32[256]{0} exponential(%row)
  %vmem = f32[256]{0:S(1)} copy(%row2)
  %new = f32[10,256]{1,0} fusion(%cache, %row2, %i), kind=kLoop, calls=%fused_update
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[10,256]{1,0}) tuple(%next, %new)
}
%cond (c: (s32[], f32[10,256])) -> pred[] {
  %c = (s32[], f32[10,256]{1,0}) parameter(0)
  %ci = s32[] get-tuple-element(%c), index=0
  %n = s32[] constant(10)
  ROOT %lt = pred[] compare(%ci, %n), direction=LT
}
ENTRY %main (a: f32[10,256]) -> f32[10,256] {
  %a = f32[10,256]{1,0} parameter(0)
  %zero.1 = s32[] constant(0)
  %init = (s32[], f32[10,256]{1,0}) tuple(%zero.1, %a)
  %loop = (s32[], f32[10,256]{1,0}) while(%init), condition=%cond, body=%body
  %out = f32[10,256]{1,0} get-tuple-element(%loop), index=1
  ROOT %neg = f32[10,256]{1,0} negate(%out)
}
"""


def test_hbm_bytes_are_operands_and_results_times_the_trip_counts():
    # Hand-counted per iteration of the 10-trip loop: the fusion that slices one 256-float row out of the cache (in
    # a fusion nested in it) reads the row and the s32 index and writes the row (1024 + 4 + 1024); exp reads and
    # writes a row (2048); the copy into VMEM (memory space S(1)) reads a row from HBM (1024); the fusion that
    # updates the cache in place reads the row and the index and writes the row (1024 + 4 + 1024); the counter's
    # add 3 x 4. The entry's negate reads and writes the whole 10x256 cache (2 x 10240). Tuples, parameters and
    # constants move nothing.
    per_call, per_iteration, _ = zcompile.traffic(HBM_HLO)
    assert per_call == {zcompile.HBM: 10 * (2052 + 2048 + 1024 + 2052 + 12) + 20480} and not per_iteration


def test_collectives_of_a_program_compiled_for_tpu():
    """A program with every kind of collective, compiled for 4 v5p chips; what each sends, counted by hand."""
    devices, _, _ = zcompile.tpu_devices("v5p-8")
    mesh = jax.sharding.Mesh(devices, ("x",))

    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P("x"), P(), P("x"), P("x")),
                       out_specs=(P(), P("x"), P(), P(), P("x"), P("x")), check_vma=False)
    def collectives(a, b, c, d):
        body = lambda i, x: x + jax.lax.psum(x, "x")  # noqa: E731
        return (jax.lax.all_gather(a, "x", tiled=True), jax.lax.psum_scatter(b * 2, "x", tiled=True),
                *jax.lax.psum((c * 3, d[:, :64] * 5), "x"),
                jax.lax.fori_loop(jnp.uint32(0), jnp.uint32(5), body, c), jax.lax.fori_loop(0, 3, body, d))

    def program(a, b, c, d, x, w):  # and the gradient of an FSDP weight: summed over the batch, split over x
        grad = jax.grad(lambda w: jnp.sum(jnp.tanh(x @ w)))(w)
        return collectives(a, b, c, d), jax.lax.with_sharding_constraint(grad, NamedSharding(mesh, P("x")))

    def arg(shape, spec, dtype=jnp.float32):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))
    f32 = (arg((64, 128), P("x")), arg((256, 128), P()), arg((64, 128), P("x")), arg((64, 128), P("x")))
    bf16 = (arg((256, 512), P("x"), jnp.bfloat16), arg((512, 256), P("x"), jnp.bfloat16))
    hlo = jax.jit(program).lower(*f32, *bf16).compile().as_text()
    per_call, per_iteration, _ = zcompile.traffic(hlo)
    # Per device: all-gathers of a 16x128 f32 shard and of the weight's 128x256 bf16 shard, 3 shards sent each;
    # the reduce-scatter of 256x128 f32 and the weight's gradient (512x256 bf16, fused by XLA as an all-reduce and
    # a slice), 3/4 of each; all-reduces of 16x128 f32 five times in a u32 loop, three times in an s32 loop and
    # with a 16x64 one combined, 2 x 3/4 of each.
    assert {k: v for k, v in per_call.items() if k != zcompile.HBM} == {
        "all-gather": 3 * (16 * 128 * 4 + 128 * 256 * 2),
        "reduce-scatter": 3 / 4 * (256 * 128 * 4 + 512 * 256 * 2),
        "all-reduce": 3 / 2 * ((5 + 3 + 1) * 16 * 128 * 4 + 16 * 64 * 4)}
    assert per_iteration == {}  # the loops' trip counts are known: no run-time loop


def test_a_bound_names_the_slowest_resource():
    # One second of v5p FLOPs, half a second of strict HBM traffic, compiled twice that: 1 s of HBM; 1.5 s of ICI.
    v5p = chips.CHIPS["v5p"]
    b = zcompile.bound(zcompile.Work(459e12, 2765e9 / 2, "call"), 2765e9, 1.5 * 600e9, v5p)
    assert (b["flops_s"], b["hbm_strict_s"], b["hbm_compiled_s"], b["ici_s"]) == pytest.approx((1, 0.5, 1, 1.5))
    assert b["hbm_ratio"] == 2 and b["binding"] == "ICI"


def _long(config, **mesh):
    """A tiny model on 512-token sequences, so that activations outweigh fixed costs (and TPU tile padding)."""
    config.data.max_prompt_len, config.rl.max_new_tokens, config.model.max_position_embeddings = 32, 480, 512
    config.rl.prompts_per_step, config.rl.group_size, config.rl.minibatches = 4, 4, 1
    config.mesh.update(mesh)
    return config


def _planner_agrees(config, reports, devices):
    # The planner's activation model was fitted to XLA:CPU's buffer assignment of float32 models; TPU's fusions
    # differ (0.6x-1.3x seen): within 2x, where a term of the wrong order (e.g. T^2 attention scores that the
    # program no longer has) is off by more. Its state is exact; TPU tiles pad the tiny model's small arrays.
    p = plan.plan(config, devices)
    r = {x.name: x.bytes for x in reports}
    assert p.params + p.opt_state <= r["update"]["arguments"]
    assert 0.5 <= (p.grads + p.activations) / r["update"]["temporaries"] <= 2, (p, r["update"])
    if "old_logprobs" in r:
        assert 0.5 <= p.logprob_forward / r["old_logprobs"]["temporaries"] <= 2, (p, r["old_logprobs"])
    # The sampler decodes from the rollout copy: the training weights and optimizer state stay resident.
    assert r["sampler"]["resident"] == p.opt_state + p.params and r["update"]["resident"] == 0
    assert 0 < p.rollout_copy <= r["sampler"]["arguments"], (p, r["sampler"])  # the copy is the sampler's argument
    # A decode step's least HBM traffic is the copy and the live cache; the update's, more than the weights.
    b = {x.name: x.bound for x in reports}
    assert b["sampler"]["per"] == "decode step" and b["sampler"]["hbm_strict"] > p.rollout_copy, b["sampler"]
    assert b["update"]["hbm_strict"] > p.rollout_copy + p.params + p.opt_state, b["update"]
    assert all(x.hbm["per call"] > x.bytes["arguments"] for x in reports), [x.hbm for x in reports]


def test_a_tiny_moe_run_compiles_for_v5p_with_the_tpu_kernels():
    config = _long(next_config.get_config("tiny"), data=2, expert=2)
    reports, hbm, sizes, too_big = zcompile.run(config, "v5p-8")
    assert sizes == {"data": 2, "fsdp": 1, "expert": 2, "tensor": 1} and not too_big and hbm == 95 * 2**30
    by_name = {r.name: r for r in reports}
    assert list(by_name) == ["update", "old_logprobs", "sampler"]
    # The host's backend is the CPU, the mesh's devices are TPUs: the experts run TPU's grouped matmul kernel.
    assert any("ragged-dot" in k for k in by_name["update"].kernels), by_name["update"].kernels
    # Expert parallelism over 2 devices: every decoded token's activations travel between them.
    assert sum(by_name["sampler"].per_iteration.values()) > 0
    # Only the decode loop's length is known at run time: the training passes run no per-token collective.
    assert not by_name["update"].per_iteration and not by_name["old_logprobs"].per_iteration
    _planner_agrees(config, reports, 4)


def test_the_omni_thinker_compiles_for_v5p_with_its_media():
    """The tiny thinker's update (the old-log-prob pass is its forward) and sampler on a data x expert mesh, each
    row's image and audio among the inputs."""
    config = omni_config.get_config("tiny")
    config.rl.prompts_per_step, config.rl.group_size, config.rl.minibatches = 4, 4, 1
    config.mesh.update(data=2, expert=2)
    reports, _, _, too_big = zcompile.run(config, "v5p-8", ("update", "sampler"))
    assert [r.name for r in reports] == ["update", "sampler"] and not too_big
    assert all(any("ragged-dot" in k for k in r.kernels) for r in reports), [r.kernels for r in reports]
    assert sum(reports[1].per_iteration.values()) > 0 and sum(reports[1].per_refill.values()) > 0


def test_what_does_not_fit_is_named_with_the_capacity(monkeypatch):
    # A chip of 10.5 KiB: every program of the tiny dense run is over it, by XLA's own per-device figures.
    monkeypatch.setitem(chips.CHIPS, "v5p", dataclasses.replace(chips.CHIPS["v5p"], hbm=1e-5))
    config = _long(nano_config.get_config("tiny"), data=1, fsdp=-1)
    reports, hbm, _, too_big = zcompile.run(config, "v5p-8", ("update", "sampler"))
    assert hbm == 1e-5 * 2**30 and len(reports) == 2
    assert [line.split(" ")[0] for line in too_big[:2]] == ["update", "sampler"]
    assert all("per device, more than the 10.5 KiB of a v5p device" in line for line in too_big[:2]), too_big
    assert "--config.rl.rollout_copy=False samples from the training state" in too_big[2]
    _planner_agrees(config, reports, 4)
    # FSDP over 4 chips, decoding from the rollout copy: a generated token moves no weights between chips, only
    # the engine's few bytes of slot state (less than one layer's weights).
    per_token = reports[1].per_iteration
    assert reports[1].name == "sampler" and zcompile.WEIGHTS not in per_token, per_token
    assert sum(per_token.values()) < 2 * 64 * (4 + 2 + 2 + 4) * 16, per_token


def test_the_engine_places_prompts_without_moving_keys_between_chips():
    # 16 sequences through 8 slots on 4 batch shards: each shard prefills and places its own prompts, so a
    # refill moves less than one prompt's keys (2 layers x 2 kv heads x 16 x 32 positions, bf16, k and v).
    config = _long(nano_config.get_config("tiny"), data=1, fsdp=-1)
    config.rl.slots = 8
    (r,), _, _, too_big = zcompile.run(config, "v5p-8", ("sampler",))
    assert not too_big and r.per_refill, r
    assert sum(r.per_refill.values()) < 2 * (2 * 2 * 16 * 32 * 2), r.per_refill


def test_the_sampler_of_the_training_layout_gathers_weights_every_token():
    config = _long(nano_config.get_config("tiny"), data=1, fsdp=-1)
    config.rl.rollout_copy = False
    (r,), _, _, _ = zcompile.run(config, "v5p-8", ("sampler",))
    gathered = r.per_iteration[zcompile.WEIGHTS]
    # What is gathered is weights, but for the engine's slot state (a few bytes per slot): per token, at least
    # each layer's FSDP-split matrices, gathered whole (each of the 4 devices sends 3/4 of them).
    assert 0 <= r.per_iteration["all-gather"] - gathered < 1024, r.per_iteration
    per_layer = 2 * 64 * (4 + 2 + 2 + 4) * 16 + 2 * 3 * 64 * 128  # bf16 attention and MLP weights of 1 layer
    assert gathered >= 2 * per_layer * 3 / 4, r.per_iteration


def test_the_sampler_draws_with_float32_sums_on_tpu():
    # TPUs multiply default-precision float32 matmuls in bfloat16, which moves the inverse-CDF draw: its
    # cumulative sums must ask for full precision, whatever the process's default.
    devices, _, _ = zcompile.tpu_devices("v5p-8")
    mesh = jax.sharding.Mesh(devices, ("data",))
    x = jax.ShapeDtypeStruct((8, 1000), jnp.float32, sharding=NamedSharding(mesh, P()))
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=NamedSharding(mesh, P()))
    with jax.default_matmul_precision("bfloat16"):
        hlo = jax.jit(_categorical).lower(x, key).compile().as_text()
    dots = [line for line in hlo.splitlines() if re.search(r" (convolution|dot)\(", line)]
    assert dots and all("operand_precision={highest,highest}" in line for line in dots), dots


@pytest.mark.parametrize("args, line", [
    (["--topology=v9-8"],
     "error: --topology='v9-8': expected a slice name such as v4-32, v5litepod-16, v5e-16, v5p-128 or v6e-64"),
    (["--topology=v5p-8", "--config.mesh.data=2"],
     "error: v5p-8 (4 v5p devices): mesh data=2 fsdp=1 expert=1 tensor=1 has 2 devices but there are 4: make the "
     "product of the mesh axes 4, or set one of them to -1")], ids=["unknown slice", "mesh of another size"])
def test_the_cli_rejects_bad_input_in_one_line(tmp_path, args, line):
    bad = subprocess.run([sys.executable, "-m", "zenjax.compile", "--config=configs/nano.py:tiny", *args],
                         cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [line]
