"""The planner: its numbers for nano by hand, MoE FLOPs and sharded bytes by hand, its activation model against
XLA's own buffer assignment, chip warnings and the CLI."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from configs import nano, next as zen_next, qwen3_30b_a3b
from zenjax.models import Qwen3, Qwen3Config, sequence_logprobs
from zenjax.plan import activation_bytes, logprob_forward_bytes, plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = 151936


def test_nano_plan_by_hand():
    p = plan(nano.get_config(), num_devices=8)  # data=1, fsdp=8
    assert p.mesh == {"data": 1, "fsdp": 8, "expert": 1, "tensor": 1}
    assert p.counts.total == p.counts.active == 596_049_920

    # FLOPs: per layer q, k, v, o (1024 x 128 x (16 + 8 + 8 + 16)) and the SwiGLU (3 x 1024 x 3072), 28 layers,
    # plus the tied head's logits matmul; attention over S = 512 + 1024 positions.
    S = 1536
    N = 28 * (1024 * 128 * 48 + 3 * 1024 * 3072) + V * 1024
    assert N == 595_984_384
    assert p.flops_per_token == 6 * N + 12 * 28 * 16 * 128 * S

    # Bytes: everything with a hidden (`embed`) dim is split 8 ways over fsdp; the 65,536 norm scales are whole.
    norms = 28 * (2 * 1024 + 2 * 128) + 1024
    assert norms == 65_536
    assert p.params == p.grads == 4 * ((596_049_920 - norms) // 8 + norms) == 298_254_336
    assert 0 <= p.opt_state - 2 * p.params <= 64  # Adam mu and nu, plus step counters

    # Activations of one minibatch: 64 * 8 / 4 = 128 sequences over 8 devices = 16 each, bfloat16 (2 bytes).
    rows, tokens = 16, 16 * S
    scores = (4 + 2) * 16 * 512  # float32 scores + bf16 probabilities of one 512-key block, per token per layer
    other = 1024 * (8 + 6 * 2) + 2 * (4 * 16 * 128 + 4 * 8 * 128) + 4 * 3072 * 2
    assert (scores, other) == (49_152, 69_632)
    head = rows * 512 * V * 4 * 2  # a 512-position chunk of float32 logits and their gradient
    working = max(1.5 * tokens * (scores + other), head)
    assert working == head  # the 152k vocabulary dominates the backward's working set
    assert p.activations == tokens * 28 * 1024 * 2 + working  # remat: each layer keeps its bf16 input
    # no remat: each layer keeps everything but its attention probabilities (recomputed in backward)
    assert p.activations_other == tokens * 28 * other + working

    # Old log-probs: passes of one minibatch's 128 sequences (rl.logprob_batch=0), 16 per device, one layer (or a
    # logits chunk) live at a time.
    tokens = 16 * S
    assert p.logprob_forward == max(tokens * (scores + other / 2), 16 * 512 * V * 4) + 2 * tokens * 1024 * 2
    # The rollout: all 512 sequences' KV cache, 64 per device, and the bf16 copy of the policy, whole on each device
    # (the rollout layout drops fsdp; nano has no tensor axis): 2 bytes per parameter.
    assert p.kv_cache == 2 * 28 * 64 * S * 8 * 128 * 2
    assert p.rollout_copy == 2 * 596_049_920
    assert p.peak == p.params + p.opt_state + max(p.grads + p.activations, p.logprob_forward,
                                                  p.kv_cache + p.rollout_copy)


def test_moe_flops_and_bytes_by_hand():
    # Qwen3-30B-A3B: N = attention + router + 8 of 128 experts per layer, plus the LM head.
    p = plan(qwen3_30b_a3b.get_config(), num_devices=64)
    L, E = 48, 2048
    N = L * (E * 128 * (32 + 4 + 4 + 32) + E * 128 + 8 * 3 * E * 768) + V * E
    assert p.flops_per_token == 6 * N + 12 * L * 32 * 128 * (512 + 2048)

    # Zen next on 64 devices, fsdp=16 x expert=4: expert weights split 64 ways, all else with a hidden dim 16 ways.
    p = plan(zen_next.get_config(), num_devices=64)
    assert p.mesh == {"data": 1, "fsdp": 16, "expert": 4, "tensor": 1}
    L, E = 46, 4096
    norms = L * (2 * E + 2 * 128) + E
    experts = L * 64 * 3 * E * 768
    rest = 2 * V * E + L * (E * 128 * (64 + 4 + 4 + 64) + E * 64)  # embedding, head, attention, router
    assert p.counts.total == norms + experts + rest
    assert p.params == 4 * (norms + experts // 64 + rest // 16)


def _xla_temp_bytes(cfg, rows, seq, chunk, grad):
    """XLA's own temporary-buffer size for the trainer's log-prob computation (with gradient or forward only)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen3(cfg, rngs=nnx.Rngs(0))))

    def f(state, tokens, mask):
        (logp, _), _ = sequence_logprobs(nnx.merge(graphdef, state), tokens, mask, chunk=chunk, with_entropy=True)
        return logp.sum() if grad else logp

    args = (state, jax.ShapeDtypeStruct((rows, seq), jnp.int32), jax.ShapeDtypeStruct((rows, seq), bool))
    compiled = jax.jit(jax.grad(f) if grad else f).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("remat", [False, True])
def test_activation_estimate_tracks_xla_buffer_assignment(remat):
    cfg = Qwen3Config(vocab_size=2048, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=2, head_dim=64,
                      intermediate_size=768, dtype="float32", remat=remat)
    measured = _xla_temp_bytes(cfg, 4, 512, 128, grad=True)
    assert measured > 50e6  # big enough that fixed overheads do not matter
    assert 0.75 < activation_bytes(cfg, 4, 512, chunk=128, remat=remat) / measured < 1.3
    if not remat:
        fwd = _xla_temp_bytes(cfg, 4, 512, 128, grad=False)
        assert 0.6 < logprob_forward_bytes(cfg, 4, 512, chunk=128) / fwd < 1.6


def test_chip_warnings():
    c = nano.get_config()
    assert "does not fit" in plan(c, num_devices=1, chip="v5e").warnings()[0]  # 16 GiB
    assert plan(c, num_devices=8, chip="h200").warnings() == []
    with pytest.raises(ValueError, match="unknown chip 'v9'"):
        plan(c, num_devices=8, chip="v9")


def test_cli():
    out = subprocess.run(
        [sys.executable, "-m", "zenjax.plan", "--config=configs/nano.py", "--config.mesh.data=-1",
         "--config.mesh.fsdp=2", "--devices=8", "--chip=v5e"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr
    assert "596,049,920" in out.stdout and "data=4 fsdp=2" in out.stdout
    # 15.0 GiB of the v5e's 16 GiB (the compile tool's figure, in the same unit): it fits, barely.
    assert "v5e: 16 GiB per chip" in out.stdout and "WARNING: tight: peak 15.0 GiB" in out.stdout
