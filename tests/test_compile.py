"""The compile tool on TPU topologies from this CPU host (libtpu's compile-only client): the three programs of
a GSPO step compile for the slice, their kernels are the TPU ones, and bad input is one clear line."""
import os
import subprocess
import sys

import pytest

from configs import nano as nano_config
from configs import next as next_config
from zenjax import cli, compile as zcompile

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
}
"""


def test_collectives_per_call_and_per_iteration_of_a_run_time_loop():
    # Hand-counted: the entry's reduce-scatter result (2*8 f32). Each iteration of the loop that also stops on a
    # reduction (its trip count known at run time only) gathers 4*256 bf16 and runs a 16-float all-reduce in a
    # loop XLA knows runs 3 times and in a scan whose condition compares the counter with 5.
    per_call, per_iteration = zcompile.collective_bytes(HLO)
    assert per_call == {"reduce-scatter": 64}
    assert per_iteration == {"all-gather": 2048, "all-reduce": (3 + 5) * 64}


def test_a_tiny_moe_run_compiles_for_v5p_with_the_tpu_kernels():
    config = next_config.get_config("tiny")
    config.mesh.data, config.mesh.expert = 2, 2
    reports, hbm, sizes, too_big = zcompile.run(config, "v5p-8")
    assert sizes == {"data": 2, "fsdp": 1, "expert": 2, "tensor": 1} and not too_big and hbm == 95 * 2**30
    by_name = {r.name: r for r in reports}
    assert list(by_name) == ["update", "old_logprobs", "sampler"]
    for r in reports:
        assert r.bytes["arguments"] > 0 and r.bytes["total"] > 0, r
    # The host's backend is the CPU, the mesh's devices are TPUs: the experts run TPU's grouped matmul kernel.
    assert any("ragged-dot" in k for k in by_name["update"].kernels), by_name["update"].kernels
    # Expert parallelism over 2 devices: every decoded token's activations travel between them.
    assert sum(by_name["sampler"].per_iteration.values()) > 0


def test_what_does_not_fit_is_named_with_the_capacity(monkeypatch):
    # A chip of 10.7 kB: every program of the tiny run is over it, by XLA's own per-device figures.
    monkeypatch.setitem(zcompile.plan.CHIPS, "v5e", 1e-5)
    reports, hbm, _, too_big = zcompile.run(nano_config.get_config("tiny"), "v5e-4")
    assert hbm == 1e-5 * 2**30 and len(reports) == 3
    assert [line.split(" ")[0] for line in too_big] == ["update", "old_logprobs", "sampler"]
    assert all("per device, more than the 10.7 kB of a v5e device" in line for line in too_big), too_big


def test_the_cli_rejects_an_unknown_slice_in_one_line(tmp_path):
    bad = subprocess.run([sys.executable, "-m", "zenjax.compile", "--config=configs/nano.py:tiny", "--topology=v9-8"],
                         cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: --topology='v9-8': expected a slice name such as v4-32, v5litepod-16, v5e-16, v5p-128 or v6e-64"]
