"""The compile tool on TPU topologies from this CPU host (libtpu's compile-only client): the three programs of
a GSPO step compile for the slice, their kernels are the TPU ones, and bad input is one clear line."""
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
from zenjax import cli, compile as zcompile, plan
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
%body.1 (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %ag = bf16[4,256]{1,0} all-gather(bf16[1,256]{1,0} %x), replica_groups={}
  %w2 = (s32[]) while((s32[]) %t), condition=%c2, body=%inner, backend_config={"known_trip_count":{"n":"3"}}
  %w3 = (s32[]) while((s32[]) %t), condition=%scan_cond, body=%inner
}
%scan_cond (q: (s32[])) -> pred[] {
  %p = (s32[]) parameter(0)
  %i = s32[] get-tuple-element((s32[]) %p), index=0
  %n = s32[] constant(5)
  ROOT %lt = pred[] compare(s32[] %i, s32[] %n), direction=LT
}
%cond (q: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]) parameter(0)
  %i = s32[] get-tuple-element((s32[], f32[8]) %p), index=0
  %n = s32[] constant(7)
  %lt = pred[] compare(s32[] %i, s32[] %n), direction=LT
  %go = pred[] reduce(pred[8]{0} %done, pred[] %f), dimensions={0}, to_apply=%or
  ROOT %both = pred[] and(pred[] %lt, pred[] %go)
}
%inner (q: (s32[])) -> (s32[]) {
  %ar = f32[16]{0} all-reduce(f32[16]{0} %y), to_apply=%sum
}
ENTRY %main (a: f32[8]) -> f32[8] {
  %rs = f32[2,8]{1,0} reduce-scatter(f32[8,8]{1,0} %z), dimensions={0}
  %w = (s32[], f32[8]) while((s32[], f32[8]) %init), condition=%cond, body=%body.1
  %r = (s32[]) while((s32[]) %t), condition=%cond, body=%inner, metadata={op_name="jit(_run)/while/body/refill/while"}
}
"""


def test_collectives_per_call_and_per_iteration_of_a_run_time_loop():
    # Hand-counted: the entry's reduce-scatter result (2*8 f32). Each iteration of the loop that also stops on a
    # reduction (its trip count known at run time only) gathers 4*256 bf16 and runs a 16-float all-reduce in a
    # loop XLA knows runs 3 times and in a scan whose condition compares the counter with 5. The engine's refill
    # loop (traced under its named scope) runs the all-reduce once per placement.
    per_call, per_iteration, per_refill = zcompile.collective_bytes(HLO)
    assert per_call == {"reduce-scatter": 64}
    assert per_iteration == {"all-gather": 2048, "all-reduce": (3 + 5) * 64}
    assert per_refill == {"all-reduce": 64}
    # With a parameter whose per-device share is [4, 256] (or [1, 4, 256], one layer of a stack) the all-gather is
    # counted as gathering weights too.
    _, per_iteration, _ = zcompile.collective_bytes(HLO, frozenset({(4, 256)}))
    assert per_iteration[zcompile.WEIGHTS] == 2048 == per_iteration["all-gather"]


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
    monkeypatch.setitem(zcompile.plan.CHIPS, "v5p", 1e-5)
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
    # each layer's FSDP-split matrices, gathered whole.
    assert 0 <= r.per_iteration["all-gather"] - gathered < 1024, r.per_iteration
    per_layer = 2 * 64 * (4 + 2 + 2 + 4) * 16 + 2 * 3 * 64 * 128  # bf16 attention and MLP weights of 1 layer
    assert gathered >= 2 * per_layer, r.per_iteration


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
