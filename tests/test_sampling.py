"""The KV-cache sampler against transformers' greedy generate and the model's own full forward pass."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from tests.hf_util import dense_config, save_random
from zenjax.models.hf import load_hf
from zenjax.sampling import _categorical, _first_above, _generate, _nucleus, sample
from zenjax.sharding import TRAINING, make_mesh, named

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [1, 2, 3, 4, 5], [60, 61, 62, 63]]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(transformers model, our model, a copy whose logits are ~20x sharper so sampling settings matter)."""
    path = tmp_path_factory.mktemp("qwen3")
    ref = save_random(dense_config(vocab_size=96), path)  # 96: divisible by the mesh in the sharding test
    model = load_hf(str(path), dtype="float32")
    sharp = load_hf(str(path), dtype="float32")
    sharp.final_norm.scale[...] = sharp.final_norm.scale[...] * 20.0
    return ref, model, sharp


def _full_logprobs(model, out):
    """log_softmax over the vocabulary at every completion step, from one forward pass over prompt + completion."""
    tokens = jnp.concatenate([out.prompt_tokens, out.tokens], axis=1)
    mask = jnp.concatenate([out.prompt_mask, out.mask], axis=1)
    logits, _ = model(tokens, mask)
    Lp = out.prompt_tokens.shape[1]
    return np.asarray(jax.nn.log_softmax(logits[:, Lp - 1:-1], axis=-1))  # [N, max_new, V]


def _hf_greedy(ref, prompts, max_new, eos):
    L = max(map(len, prompts))
    ids = torch.tensor([[0] * (L - len(p)) + p for p in prompts])
    attn = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = ref.generate(input_ids=ids, attention_mask=attn, do_sample=False, max_new_tokens=max_new,
                           eos_token_id=eos, pad_token_id=0)
    return out[:, L:].numpy()


@pytest.fixture(scope="module")
def greedy(models):
    """Greedy settings with an EOS that some prompt emits mid-way, so stopping and padding are exercised."""
    ref, _, _ = models
    rows = _hf_greedy(ref, PROMPTS, 12, eos=None).tolist()
    row, stop = next((r, i) for r in range(len(rows)) for i in range(3, 10) if rows[r][i] not in rows[r][:i])
    return dict(num_samples=2, max_new_tokens=12, rng=None, greedy=True, eos_ids=(rows[row][stop],)), row, stop


def test_greedy_equals_transformers_and_samples_share_the_prompt(models, greedy):
    ref, model, _ = models
    kw, row, stop = greedy
    (eos,) = kw["eos_ids"]
    want = _hf_greedy(ref, PROMPTS, 12, eos=eos)
    out = sample(model, PROMPTS, **kw)
    tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
    assert tokens.shape == (8, 12) and out.prompt_tokens.shape[0] == 8
    np.testing.assert_array_equal(tokens[0::2], tokens[1::2])  # rows ordered [p0 s0, p0 s1, p1 s0, ...]
    np.testing.assert_array_equal(np.asarray(out.prompt_tokens)[0::2], np.asarray(out.prompt_tokens)[1::2])
    for i, p in enumerate(PROMPTS):
        assert list(np.asarray(out.prompt_tokens)[2 * i][np.asarray(out.prompt_mask)[2 * i]]) == p
        n = int(mask[2 * i].sum())
        assert mask[2 * i, :n].all()  # the mask is a prefix: generated tokens up to and including the EOS
        np.testing.assert_array_equal(tokens[2 * i, :n], want[i, :n])
        if n < 12:
            assert tokens[2 * i, n - 1] == eos and np.all(tokens[2 * i, n:] == 0)
    assert mask[2 * row].sum() == stop + 1 and tokens[2 * row, stop] == eos
    compiled = _generate._cache_size()
    sample(model, [p + [9] for p in PROMPTS], **kw)  # new lengths in the same bucket: no retrace
    assert _generate._cache_size() == compiled


def test_the_accelerators_scanned_decode_equals_transformers(tmp_path_factory, models, greedy):
    # TPUs and GPUs decode with the layers' weights sliced from the scanned stack in place (CPU unstacks them
    # first); forced here on the CPU, greedy tokens must equal transformers' and log-probs the CPU path's.
    ref, model, _ = models
    kw, _, _ = greedy
    path = tmp_path_factory.mktemp("qwen3_tpu_paths")
    ref.save_pretrained(path, safe_serialization=True)
    scanned = load_hf(str(path), dtype="float32", kernels="tpu")
    jaxpr = str(jax.make_jaxpr(lambda m: sample(m, PROMPTS, **kw))(scanned))
    assert "scan" in jaxpr.split("while[")[-1]  # the decode loop's body runs the layers as a scan
    out = sample(scanned, PROMPTS, **kw)
    want = _hf_greedy(ref, PROMPTS, 12, eos=kw["eos_ids"][0])
    mask = np.asarray(out.mask)
    for i in range(len(PROMPTS)):
        n = int(mask[2 * i].sum())
        np.testing.assert_array_equal(np.asarray(out.tokens)[2 * i, :n], want[i, :n])
    cpu = sample(model, PROMPTS, **kw)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(cpu.tokens))
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(cpu.logprobs), atol=1e-5)


def test_logprobs_are_the_raw_model_distribution(models):
    _, _, sharp = models
    # Tempered, top-k-truncated sampling; the recorded log-probs are still those of the raw model.
    out = sample(sharp, PROMPTS, num_samples=2, max_new_tokens=8, rng=jax.random.key(1), temperature=0.7,
                 top_k=5, eos_ids=(3, 17))
    full = _full_logprobs(sharp, out)
    tokens, mask, logp = np.asarray(out.tokens), np.asarray(out.mask), np.asarray(out.logprobs)
    want = np.take_along_axis(full, tokens[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(logp[mask], want[mask], atol=1e-4)
    assert np.all(logp[~mask] == 0)
    # top-k: every emitted token is among the 5 most likely at its step.
    rank = (full > want[..., None]).sum(-1)
    assert rank[mask].max() < 5
    assert not np.array_equal(tokens[0], tokens[1])  # two samples of one prompt are drawn independently


def test_vocab_limit_keeps_padded_ids_out_but_logprobs_raw(models):
    _, model, _ = models
    out = sample(model, PROMPTS, num_samples=8, max_new_tokens=6, rng=jax.random.key(4), vocab_limit=40)
    full = _full_logprobs(model, out)
    tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
    assert tokens[mask].max() < 40
    # Without the limit these rows would emit ids >= 40: most of the random model's mass lies there.
    assert np.exp(full[..., 40:]).sum(-1)[mask].min() > 0.3
    want = np.take_along_axis(full, tokens[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(np.asarray(out.logprobs)[mask], want[mask], atol=1e-4)


def _allowed(probs, top_k=0, top_p=1.0):
    """Reference truncation on the last axis: transformers' top-k (ties with the k-th stay), then the sorted
    nucleus (a token stays while the mass ranked above it is < top_p)."""
    keep = np.ones(probs.shape, bool)
    if top_k:
        keep &= probs >= -np.sort(-probs, axis=-1)[..., top_k - 1:top_k]
    probs = np.where(keep, probs, 0) / np.where(keep, probs, 0).sum(-1, keepdims=True)
    order = np.argsort(-probs, axis=-1, kind="stable")
    sorted_ = np.take_along_axis(probs, order, -1)
    in_nucleus = np.zeros(probs.shape, bool)
    np.put_along_axis(in_nucleus, order, np.cumsum(sorted_, -1) - sorted_ < top_p, -1)
    return keep & in_nucleus


def test_top_p_never_emits_excluded_tokens(models):
    _, _, sharp = models
    T, top_p = 1.3, 0.6
    out = sample(sharp, PROMPTS, num_samples=16, max_new_tokens=4, rng=jax.random.key(2), temperature=T,
                 top_p=top_p)
    probs = np.asarray(jax.nn.softmax(_full_logprobs(sharp, out) / T, axis=-1))
    allowed = _allowed(probs, top_p=top_p)
    tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
    assert mask.all() and np.take_along_axis(allowed, tokens[..., None], axis=-1).all()
    assert np.where(allowed, 0, probs).sum(-1).min() > 0.05  # what is excluded would be drawn without top_p


def test_nucleus_is_the_sorted_cumulative_rule():
    probs = jax.nn.softmax(3 * jax.random.normal(jax.random.key(4), (64, 500)), axis=-1)
    for top_p in (0.05, 0.5, 0.9, 0.999):
        np.testing.assert_array_equal(np.asarray(_nucleus(probs, top_p)), _allowed(np.asarray(probs), top_p=top_p))


@pytest.mark.parametrize("T,top_k,top_p", [(0.6, 0, 1.0), (1.0, 4, 1.0), (1.0, 0, 0.8)])
def test_sampling_follows_the_truncated_model_distribution(models, T, top_k, top_p):
    _, _, sharp = models
    n = 4000
    out = sample(sharp, PROMPTS[:1], num_samples=n, max_new_tokens=1, rng=jax.random.key(3), temperature=T,
                 top_k=top_k, top_p=top_p)
    counts = np.bincount(np.asarray(out.tokens)[:, 0], minlength=sharp.cfg.vocab_size)
    logits = _full_logprobs(sharp, type(out)(*(a[:1] for a in out)))[0, 0]

    def chi2(temperature):
        probs = np.asarray(jax.nn.softmax(logits / temperature), np.float64)
        allowed = _allowed(probs, top_k, top_p)
        expected = n * np.where(allowed, probs, 0) / np.where(allowed, probs, 0).sum()
        big = expected >= 5  # pool the rare tokens into one bin
        obs, exp = counts[big], expected[big]
        if expected[~big].sum() > 0:
            obs, exp = np.append(obs, counts[~big].sum()), np.append(exp, expected[~big].sum())
        return ((obs - exp) ** 2 / exp).sum(), len(exp) - 1, allowed

    stat, df, allowed = chi2(T)
    assert counts[~allowed].sum() == 0 and df >= 3
    bound = df + 6 * np.sqrt(2 * df)  # ~6 sigma: never flakes, yet a wrong temperature is far outside
    assert stat < bound, (stat, bound)
    if not top_k and top_p == 1:
        assert chi2(1.0)[0] > 3 * bound and chi2(0.45)[0] > 3 * bound


def test_categorical_draws_follow_softmax_across_chunks():
    V, n = 1000, 20000  # four chunks of 256 ids, the last one padded
    logits = 1.5 * np.asarray(jax.random.normal(jax.random.key(5), (V,)))
    logits[::3] = -np.inf
    logits[256:512] = -np.inf  # a whole chunk without mass
    tokens = np.asarray(_categorical(jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, V)), jax.random.key(6)))
    counts = np.bincount(tokens, minlength=V)
    assert counts[np.isinf(logits)].sum() == 0
    expected = n * np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    big = expected >= 5
    obs, exp = np.append(counts[big], counts[~big].sum()), np.append(expected[big], expected[~big].sum())
    df = len(exp) - 1
    assert ((obs - exp) ** 2 / exp).sum() < df + 6 * np.sqrt(2 * df)
    for only in (0, 255, 256, 767, V - 1):  # a single allowed id, at either end of a chunk
        x = np.full((4, V), -np.inf, np.float32)
        x[:, only] = 3.0
        np.testing.assert_array_equal(np.asarray(_categorical(jnp.asarray(x), jax.random.key(only))), only)
    # u rounded up to the total: the last id with mass, not one past the end or a zero-mass id after it
    assert int(_first_above(jnp.array([[0.0, 0.5, 1.0, 1.0]]), jnp.array([1.0]))[0]) == 2


def test_sharded_params_under_a_mesh_give_the_same_tokens(models, greedy):
    _, model, _ = models
    kw, _, _ = greedy
    expect = sample(model, PROMPTS, **kw)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    graphdef, state = nnx.split(model)
    flat = [(path, jax.device_put(v.get_value(), named(mesh, v.get_metadata()["out_sharding"], TRAINING)))
            for path, v in nnx.to_flat_state(state)]
    with jax.set_mesh(mesh):
        got = sample(nnx.merge(graphdef, nnx.from_flat_state(flat)), PROMPTS, **kw)
    assert got.tokens.sharding.spec[0] == ("data", "fsdp")  # 8 rows split over the 4 data-parallel devices
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(expect.tokens))
    np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(expect.logprobs), atol=1e-5)


def test_clear_errors(models):
    _, model, _ = models
    kw = dict(max_new_tokens=4, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="empty batch"):
        sample(model, [], **kw)
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 96\)"):
        sample(model, [[1, 2], [3, 96]], **kw)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        sample(model, [[-1]], **kw)
    with pytest.raises(ValueError, match="prompt of 5 tokens is longer than prompt_len=4"):
        sample(model, [[1] * 5, [2]], prompt_len=4, **kw)
    with pytest.raises(ValueError, match="does not fit cache_len=16"):
        sample(model, [[1] * 13], cache_len=16, **kw)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings=128"):
        sample(model, [[1] * 126], **kw)
    with pytest.raises(ValueError, match="temperature"):
        sample(model, [[1]], temperature=0.0, **kw)
