"""Each attention kernel against the plain softmax reference, values and gradients: the blockwise CPU path, the
TPU splash kernel in interpret mode and the GPU path's cuDNN call (XLA's implementation of the same call), over
causal + padded rows, GQA ratios 1, 2 and 8, head_dim 64 and 128, lengths that are no multiple of the block; and
the train step's memory growing linearly with length."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from zenjax import sharding
from zenjax.models import Qwen3, Qwen3Config, attention, sequence_logprobs

KERNELS = {
    "blockwise": attention._blockwise,
    "splash": lambda *a: attention._splash(*a, rules=sharding.TRAINING, interpret=True),
    "cudnn_call": lambda *a: attention._cudnn(*a, implementation=None),
}


def _inputs(T, H, K, D, dtype):
    kq, kk, kv, kw = jax.random.split(jax.random.key(T * H + D), 4)
    q, k, v = (jax.random.normal(key, (3, T, n, D)).astype(dtype) for key, n in ((kq, H), (kk, K), (kv, K)))
    # Rows: no padding; left padding + right padding (a prompt and a finished completion); half left padding.
    first, end = np.array([0, 5, T // 2]), np.array([T, T - 3, T])
    mask = jnp.asarray((np.arange(T) >= first[:, None]) & (np.arange(T) < end[:, None]))
    # Cotangent on real query rows only: padding rows' outputs feed nothing real.
    w = jax.random.normal(kw, (3, T, H, D)) * mask[:, :, None, None]
    return q, k, v, mask, w


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    # Several key blocks (and splash tiles) at test sizes, with the last one partly padding.
    monkeypatch.setattr(attention, "BLOCK", 16)
    monkeypatch.setattr(attention, "SPLASH_BLOCK", 128)


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("T, H, K, D", [(40, 4, 4, 64), (200, 8, 1, 128), (45, 4, 2, 128)],
                         ids=["gqa1-d64", "gqa8-d128-2tiles", "gqa2-d128"])
def test_float32_values_and_gradients_equal_the_reference(kernel, T, H, K, D):
    q, k, v, mask, w = _inputs(T, H, K, D, jnp.float32)
    fn = KERNELS[kernel]
    out = fn(q, k, v, mask)
    want = attention.reference(q, k, v, mask)
    real = np.asarray(mask)[:, :, None, None]
    assert np.all(np.isfinite(np.asarray(out)))
    # Outputs are convex combinations of unit-normal values: float32 sums over T keys err by ~sqrt(T) ulp.
    np.testing.assert_allclose(np.asarray(out) * real, np.asarray(want) * real, atol=1e-5)
    loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v, mask) * w)  # noqa: E731
    got = jax.grad(loss(fn), argnums=(0, 1, 2))(q, k, v)
    ref = jax.grad(loss(attention.reference), argnums=(0, 1, 2))(q, k, v)
    for name, g, r in zip("qkv", got, ref):
        # Gradients sum T terms of the scale of the largest: 1e-5 of it is ~100 float32 ulps of margin.
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5 * float(jnp.max(jnp.abs(r))),
                                   err_msg=f"d{name}")


@pytest.mark.parametrize("kernel", ["blockwise", "splash"])  # on a GPU the bfloat16 call is cuDNN's: no CPU runs it
def test_bfloat16_is_within_bfloat16_rounding_of_the_float32_result(kernel):
    q, k, v, mask, w = _inputs(45, 8, 2, 64, jnp.bfloat16)
    fn = KERNELS[kernel]
    f32 = [a.astype(jnp.float32) for a in (q, k, v)]
    real = np.asarray(mask)[:, :, None, None]
    out = np.asarray(fn(q, k, v, mask).astype(jnp.float32)) * real
    want = np.asarray(attention.reference(*f32, mask)) * real
    # bfloat16 keeps 8 bits: probabilities and outputs each rounded once (2 * 2^-8 of values up to ~4).
    np.testing.assert_allclose(out, want, atol=4 * 2 * 2**-8)
    loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v, mask).astype(jnp.float32) * w)  # noqa: E731
    got = jax.grad(loss(fn), argnums=(0, 1, 2))(q, k, v)
    ref = jax.grad(loss(attention.reference), argnums=(0, 1, 2))(*f32)
    for name, g, r in zip("qkv", got, ref):
        # Products of two rounded bfloat16 factors summed in float32: a few 2^-8 of the largest gradient.
        np.testing.assert_allclose(np.asarray(g.astype(jnp.float32)), np.asarray(r),
                                   atol=4 * 2**-8 * float(jnp.max(jnp.abs(r))), err_msg=f"d{name}")


def test_train_step_memory_grows_linearly_with_length():
    # XLA:CPU's own buffer assignment of a tiny model's gradient step: 4x the tokens may cost 4.5x the
    # temporaries (the T^2 score arrays of a whole-sequence attention cost 16x).
    cfg = Qwen3Config(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                      intermediate_size=128, dtype="float32", remat=True, max_position_embeddings=8192)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen3(cfg, rngs=nnx.Rngs(0))))

    def loss(state, tokens, mask):
        logp, _ = sequence_logprobs(nnx.merge(graphdef, state), tokens, mask)
        return -jnp.mean(logp)

    temps = {}
    for T in (2048, 8192):
        args = (jax.ShapeDtypeStruct((1, T), jnp.int32), jax.ShapeDtypeStruct((1, T), jnp.bool_))
        compiled = jax.jit(jax.grad(loss)).lower(state, *args).compile()
        temps[T] = compiled.memory_analysis().temp_size_in_bytes
    assert temps[8192] <= 4.5 * temps[2048], temps


def test_the_tpu_model_under_a_sharded_mesh_equals_the_cpu_model():
    # The TPU path end to end, on 8 CPU devices: splash (interpreted) per device under shard_map, batch over
    # data and heads over tensor, against the CPU model's blockwise attention: logits and gradients.
    base = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                intermediate_size=64, dtype="float32")
    tokens = jax.random.randint(jax.random.key(1), (4, 20), 0, 64)
    mask = jnp.arange(20)[None] >= jnp.array([0, 3, 7, 1])[:, None]

    def loss(model):
        logits, _ = model(tokens, mask)
        return jnp.sum(jnp.where(mask[..., None], jax.nn.log_softmax(logits), 0.0)), logits

    results = {}
    for kernels in ("cpu", "tpu"):
        model = Qwen3(Qwen3Config(**base, kernels=kernels), rngs=nnx.Rngs(0))
        with jax.set_mesh(sharding.make_mesh(data=4, tensor=2)):
            (_, logits), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
        results[kernels] = np.asarray(logits), {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(grads)}
    (want, want_g), (got, got_g) = results["cpu"], results["tpu"]
    np.testing.assert_allclose(got[np.asarray(mask)], want[np.asarray(mask)], atol=1e-5)
    for path, g in want_g.items():
        np.testing.assert_allclose(got_g[path], g, atol=1e-5 * max(1.0, float(np.abs(g).max())), err_msg=str(path))
