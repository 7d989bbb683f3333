"""The MoE model on 8 simulated devices: expert parallel, FSDP, tensor and data meshes all equal one device."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from zenjax import sharding
from zenjax.models import Qwen3, Qwen3Config, moe
from zenjax.sampling import sample

CFG = Qwen3Config(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
                  intermediate_size=48, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=16,
                  norm_topk_prob=True, dtype="float32", router_aux_loss_coef=0.1, router_z_loss_coef=0.01)
TOKENS = np.random.default_rng(0).integers(0, CFG.vocab_size, (8, 7))
MASK = np.arange(7)[None, :] >= np.array([0, 3, 0, 1, 6, 0, 2, 0])[:, None]  # left padding


def loss_fn(model, tokens, mask):
    logits, aux = model(tokens, mask)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    m = mask[:, 1:] & mask[:, :-1]  # predictions from real tokens: a padding position's output is unspecified
    terms = moe.moe_losses(aux, model.cfg)
    loss = jnp.sum(nll * m) / jnp.sum(m) + CFG.router_aux_loss_coef * terms["aux_loss"]
    return loss + CFG.router_z_loss_coef * terms["z_loss"], logits


step = jax.jit(nnx.value_and_grad(loss_fn, has_aux=True))


def flat(grads):
    return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(grads))}


@pytest.fixture(scope="module")
def split_model():
    return nnx.split(nnx.jit(lambda: Qwen3(CFG, rngs=nnx.Rngs(0)))())  # one compile instead of one per op


@pytest.fixture(scope="module")
def single_device(split_model):
    (_, logits), grads = step(nnx.merge(*split_model), TOKENS, MASK)
    return np.asarray(logits), flat(grads)


def placed_model(split_model, mesh):
    """The same parameters, each sharded by its logical axes through the rules table."""
    graphdef, state = split_model
    shardings = jax.tree.map(lambda spec: NamedSharding(mesh, sharding.logical_to_spec(tuple(spec), sharding.TRAINING)),
                             nnx.get_partition_spec(state), is_leaf=lambda x: isinstance(x, P))
    return nnx.merge(graphdef, jax.device_put(state, shardings))


@pytest.mark.parametrize("axes", [dict(data=8), dict(data=2, expert=4), dict(data=1, expert=8),
                                  dict(fsdp=4, tensor=2), dict(data=2, fsdp=2, expert=2)], ids=str)
def test_sharded_logits_and_gradients_equal_single_device(split_model, single_device, axes):
    _check_sharded(split_model, single_device, axes)


@pytest.mark.parametrize("axes", [dict(fsdp=2, expert=2, tensor=2)], ids=str)
def test_the_accelerator_expert_kernel_under_expert_parallelism(single_device, axes):
    # What TPU and GPU meshes run, forced on the CPU devices: ragged_dot (megablox on TPU) inside the
    # expert-parallel shard_map, against the single-device CPU kernel, values and gradients.
    split = nnx.split(nnx.jit(lambda: Qwen3(dataclasses.replace(CFG, kernels="tpu"), rngs=nnx.Rngs(0)))())
    jaxpr = _check_sharded(split, single_device, axes)
    assert "ragged_dot_general" in jaxpr and "shard_map" in jaxpr


def _check_sharded(split_model, single_device, axes) -> str:
    """Asserts logits and gradients on `axes` equal one device's; returns the step's jaxpr."""
    want_logits, want_grads = single_device
    mesh = sharding.make_mesh(**axes)
    with jax.set_mesh(mesh):
        model = placed_model(split_model, mesh)
        batch = sharding.named(mesh, ("batch", None), sharding.TRAINING)
        tokens, mask = jax.device_put(TOKENS, batch), jax.device_put(MASK, batch)
        (_, logits), grads = step(model, tokens, mask)
        jaxpr = str(jax.make_jaxpr(nnx.value_and_grad(loss_fn, has_aux=True))(model, tokens, mask))
    np.testing.assert_allclose(np.asarray(logits)[MASK], want_logits[MASK], atol=1e-5)
    got = flat(grads)
    assert got.keys() == want_grads.keys()
    for path, g in want_grads.items():
        np.testing.assert_allclose(got[path], g, atol=1e-5, err_msg=str(path))
    n_ep = mesh.shape["expert"]
    for name in ("gate", "up", "down"):
        w = nnx.state(model)["stacks"][0]["mlp"][name][...]  # [layers, experts, ...]
        assert {s.data.shape[1] for s in w.addressable_shards} == {CFG.num_experts // n_ep}
    return jaxpr


def test_batch_that_does_not_divide_the_mesh_routes_on_replicated_tokens(split_model, single_device):
    # Two sequences on 8 expert shards (decoding-sized): every device sees all tokens, computes its own expert,
    # and the partial outputs are summed.
    mesh = sharding.make_mesh(expert=8)
    with jax.set_mesh(mesh):
        logits, _ = jax.jit(lambda m, t, k: m(t, k))(placed_model(split_model, mesh), TOKENS[:2], MASK[:2])
    np.testing.assert_allclose(np.asarray(logits)[MASK[:2]], single_device[0][:2][MASK[:2]], atol=1e-5)


def test_experts_not_divisible_by_the_expert_axis_is_a_clear_error():
    cfg = Qwen3Config(hidden_size=16, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=8, num_layers=1,
                      num_heads=2, num_kv_heads=1, dtype="float32")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: moe.MoEBlock(cfg, rngs=nnx.Rngs(0))))
    x = jax.ShapeDtypeStruct((8, 3, 16), jnp.float32)
    with jax.set_mesh(sharding.make_mesh(data=2, expert=4)):
        with pytest.raises(ValueError, match=r"num_experts=6 is not divisible by the expert-parallel mesh size 4"):
            jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x, jnp.ones(x.shape[:2], bool)), state, x)


@pytest.mark.parametrize("axes", [dict(data=2, expert=4), dict(fsdp=2, expert=2, tensor=2)], ids=str)
def test_sampling_with_sharded_experts_equals_one_device(split_model, axes):
    # Decoding routes a few tokens per step: the every-expert path, on each device's slice of the experts.
    prompts = [[5, 6, 7, 8, 9], [3, 4], [10, 11, 12], [1, 2]]
    kw = dict(num_samples=2, max_new_tokens=6, rng=None, greedy=True)
    want = sample(nnx.merge(*split_model), prompts, **kw)
    mesh = sharding.make_mesh(**axes)
    with jax.set_mesh(mesh):
        got = sample(placed_model(split_model, mesh), prompts, **kw)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(want.logprobs), atol=1e-5)
