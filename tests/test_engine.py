"""The continuous-batching engine against the static sampler and transformers' greedy generate (the same tokens
whatever the number of slots), its refills and stopping cases, the distribution it samples from, and the same
tokens on a mesh with its slots data-parallel over the batch shards."""
import jax
import numpy as np
import pytest
from flax import nnx

from tests.test_rollout_layout import DENSE, MOE, _params
from tests import test_sampling
from tests.test_sampling import PROMPTS, _allowed, _full_logprobs, _hf_greedy
from zenjax import engine, sharding
from zenjax.models import Qwen3
from zenjax.sampling import sample
from zenjax.train_state import make_rollout_copy

models, greedy = test_sampling.models, test_sampling.greedy  # the static sampler's fixtures


def _same(got, want):
    for name, a, b in zip(want._fields, got, want):
        if name == "logprobs":  # one decode step's float32 math over another batch of rows: rounding only
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
        else:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


def test_greedy_equals_the_static_sampler_and_transformers(models, greedy):
    ref, model, _ = models
    kw, row, stop = greedy  # an EOS that one prompt emits mid-way; 4 prompts of 2-7 tokens x 2 samples
    got, stats = engine.sample(model, PROMPTS, slots=3, **kw)  # 8 sequences: refilled as they end
    _same(got, sample(model, PROMPTS, **kw))
    want = _hf_greedy(ref, PROMPTS, 12, eos=kw["eos_ids"][0])
    mask = np.asarray(got.mask)
    for i in range(len(PROMPTS)):
        n = int(mask[2 * i].sum())
        np.testing.assert_array_equal(np.asarray(got.tokens)[2 * i, :n], want[i, :n])
    lengths = mask.sum(1)
    assert int(stats["refills"]) == 8 and int(stats["slot_tokens"]) == lengths.sum() - 8  # first tokens: prefill
    assert int(stats["decode_steps"]) >= (lengths.max() - 1)


def test_more_sequences_than_slots_and_the_stopping_cases(models):
    _, model, _ = models
    kw = dict(num_samples=3, max_new_tokens=10, rng=None, greedy=True)
    first = np.asarray(sample(model, PROMPTS, **kw).tokens)[:, 0]
    # EOS on the first token: prompt 1's first greedy token ends its three sequences before any decode step.
    eos = int(first[3])
    kw_eos = dict(kw, eos_ids=(eos,))
    got, stats = engine.sample(model, PROMPTS, slots=2, **kw_eos)
    _same(got, sample(model, PROMPTS, **kw_eos))
    ends_at_once = np.asarray(got.mask).sum(1)
    assert (ends_at_once[first == eos] == 1).all() and int(stats["refills"]) == 12
    # Every sequence ends at once (the same budget), and a single one runs to the budget.
    for budgets in ([4] * 12, [1] * 7 + [10] + [1] * 4):
        got, stats = engine.sample(model, PROMPTS, slots=5, budgets=budgets, **kw)
        _same(got, sample(model, PROMPTS, budgets=budgets, **kw))
        np.testing.assert_array_equal(np.asarray(got.mask).sum(1), budgets)
    assert int(stats["decode_steps"]) == 9  # the long one alone, after the others ended on their first token


@pytest.mark.parametrize("T,top_k,top_p", [(0.6, 0, 1.0), (1.0, 0, 0.8)])
def test_sampling_follows_the_truncated_model_distribution(models, T, top_k, top_p):
    # As for the static sampler: 4000 first tokens of one prompt, drawn through 500 slots in 8 refill rounds.
    _, _, sharp = models
    n = 4000
    out, _ = engine.sample(sharp, PROMPTS[:1], slots=500, num_samples=n, max_new_tokens=1, rng=jax.random.key(3),
                           temperature=T, top_k=top_k, top_p=top_p)
    counts = np.bincount(np.asarray(out.tokens)[:, 0], minlength=sharp.cfg.vocab_size)
    probs = np.asarray(jax.nn.softmax(_full_logprobs(sharp, type(out)(*(a[:1] for a in out)))[0, 0] / T), np.float64)
    allowed = _allowed(probs, top_k, top_p)
    expected = n * np.where(allowed, probs, 0) / np.where(allowed, probs, 0).sum()
    big = expected >= 5
    obs, exp = counts[big], expected[big]
    if expected[~big].sum() > 0:  # pool the rare tokens into one bin
        obs, exp = np.append(obs, counts[~big].sum()), np.append(exp, expected[~big].sum())
    df = len(exp) - 1
    assert counts[~allowed].sum() == 0 and df >= 3
    assert ((obs - exp) ** 2 / exp).sum() < df + 6 * np.sqrt(2 * df)  # ~6 sigma, as in test_sampling


def test_sampled_logprobs_are_the_raw_model_distribution(models):
    _, _, sharp = models
    out, _ = engine.sample(sharp, PROMPTS, slots=3, num_samples=2, max_new_tokens=8, rng=jax.random.key(1),
                           temperature=0.7, top_k=5, eos_ids=(3, 17))
    full = _full_logprobs(sharp, out)
    tokens, mask, logp = np.asarray(out.tokens), np.asarray(out.mask), np.asarray(out.logprobs)
    want = np.take_along_axis(full, tokens[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(logp[mask], want[mask], atol=1e-4)
    assert np.all(logp[~mask] == 0)


@pytest.mark.parametrize("cfg", [DENSE, MOE], ids=["dense", "moe"])
def test_slots_over_the_batch_shards_of_the_rollout_layout(cfg):
    # 8 prompts x 2 samples through 8 slots on data 2 x fsdp 2 x expert 2 (4 batch shards, 2 slots and 2 prompts
    # each): the tokens of one device's static sampler, rows split over the batch shards. (That a placement moves no
    # keys between devices is checked on the TPU program, tests/test_compile.py.)
    params = _params(cfg)
    prompts = [[5, 6, 7, 8, 9], [3, 4], [10, 11, 12], [1, 2], [7], [20, 21, 22, 23], [9, 9], [30, 31]]
    kw = dict(num_samples=2, max_new_tokens=6, rng=None, greedy=True, prompt_len=8, eos_ids=(17,))
    model = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: Qwen3(cfg, rngs=nnx.Rngs(0)))), params)
    want = sample(model, prompts, **kw)
    mesh = sharding.make_mesh(data=2, fsdp=2, expert=2)
    params_sh = sharding.param_shardings(mesh, nnx.state(model), sharding.TRAINING)
    with jax.set_mesh(mesh):
        policy = make_rollout_copy(cfg, mesh)(jax.device_put(params, params_sh))
        got, stats = engine.sample(policy, prompts, slots=8, **kw)
    _same(got, want)
    assert got.tokens.sharding.spec[0] == ("data", "fsdp", "expert")
    assert int(stats["refills"]) == 16
