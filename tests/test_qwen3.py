"""The dense Qwen3 model against transformers' Qwen3ForCausalLM (float32, random weights)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from tests.hf_util import dense_config, padded_batch, save_random
from zenjax.models import KVCache, Qwen3Config, token_logprobs
from zenjax.sharding import TRAINING
from zenjax.models.hf import entries, load_hf


def _hf_logits(model, tokens, mask, positions):
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64)),
                     position_ids=torch.tensor(positions)).logits.numpy()


@pytest.mark.parametrize("tied,head_dim", [(True, 16), (False, 16), (False, 20)])
def test_logits_match_transformers(tmp_path, tied, head_dim):
    # head_dim 16 / 20 with hidden 48 and 4 heads: neither equals hidden // heads = 12.
    hf_cfg = dense_config(tie_word_embeddings=tied, head_dim=head_dim)
    ref = save_random(hf_cfg, tmp_path)
    model = load_hf(str(tmp_path), dtype="float32")
    assert model.cfg.tie_embeddings == tied and model.cfg.head_dim == head_dim
    tokens, mask, positions = padded_batch(hf_cfg.vocab_size, [9, 5, 1], 9)
    ours, _ = jax.jit(lambda m, t, k: m(t, k))(model, tokens, mask)
    want = _hf_logits(ref, tokens, mask, positions)
    np.testing.assert_array_less(np.abs(np.asarray(ours) - want)[mask].max(), 1e-4)


def test_config_accepts_hub_and_transformers5_keys():
    base = dict(model_type="qwen3", vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, head_dim=4, intermediate_size=16)
    hub = Qwen3Config.from_hf(dict(base, rope_theta=1e6))
    new = Qwen3Config.from_hf(dict(base, rope_parameters={"rope_type": "default", "rope_theta": 1e6}))
    assert hub == new and hub.rope_theta == 1e6
    with pytest.raises(ValueError, match="model_type 'llama'"):
        Qwen3Config.from_hf(dict(base, model_type="llama"))


@pytest.mark.parametrize("unstacked", [False, True], ids=["scanned", "unstacked"])
def test_cached_decoding_equals_full_forward(tmp_path, unstacked):
    save_random(dense_config(), tmp_path)
    model = load_hf(str(tmp_path), dtype="float32")
    tokens, mask, _ = padded_batch(model.cfg.vocab_size, [7, 4], 10, seed=1)
    full, _ = model(tokens, mask)
    prompt = 6  # prefill 6 tokens, then feed the remaining 4 one at a time
    cache = KVCache.init(model.cfg, 2, 12)
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    out = model.hidden(tokens[:, :prompt], mask[:, :prompt], positions[:, :prompt], cache)
    steps = [model.logits(out.hidden_BTE)]
    cache, layers = out.cache, None
    if unstacked:  # the CPU sampler's decode: per-layer weights and caches
        layers = model.unstack_layers()
        with pytest.raises(ValueError, match="one LayerCache per layer"):
            model.hidden(tokens[:, prompt:prompt + 1], cache=cache, layers=layers)
        cache = cache.unstack()
    for t in range(prompt, 10):
        out = model.hidden(tokens[:, t:t + 1], mask[:, t:t + 1], positions[:, t:t + 1], cache, layers)
        cache = out.cache
        steps.append(model.logits(out.hidden_BTE))
    cached = np.concatenate([np.asarray(s) for s in steps], axis=1)
    np.testing.assert_allclose(cached[mask], np.asarray(full)[mask], atol=1e-5)


def test_chunked_logprobs_equal_full_log_softmax():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    h = jax.random.normal(k1, (2, 11, 8))
    w = jax.random.normal(k2, (8, 50))
    tgt = jax.random.randint(k3, (2, 11), 0, 50)

    def full(h, w):
        logp = jax.nn.log_softmax(h @ w, axis=-1)
        return jnp.take_along_axis(logp, tgt[..., None], -1)[..., 0]

    def chunked(h, w):
        return token_logprobs(h, w, tgt, rules=TRAINING, chunk=4)  # 11 is not a multiple of 4: exercises the padding

    np.testing.assert_allclose(chunked(h, w), full(h, w), atol=1e-5)
    loss = lambda f: lambda h, w: jnp.sum(f(h, w) * jnp.arange(11.0))  # noqa: E731
    g_full = jax.grad(loss(full), argnums=(0, 1))(h, w)
    g_chunk = jax.grad(loss(chunked), argnums=(0, 1))(h, w)
    for a, b in zip(g_chunk, g_full):
        np.testing.assert_allclose(a, b, atol=1e-4)
    _, ent = token_logprobs(h, w, tgt, rules=TRAINING, chunk=4, with_entropy=True)
    p = jax.nn.softmax(h @ w, -1)
    np.testing.assert_allclose(ent, -jnp.sum(p * jnp.log(p), -1), atol=1e-4)


def test_gradients_match_transformers(tmp_path):
    """Every parameter's gradient against torch autograd: guards the hand-written MLP and attention backward
    passes (left padding included, so fully-masked query rows are exercised)."""
    ref = save_random(dense_config(), tmp_path)
    model = load_hf(str(tmp_path), dtype="float32")
    tokens, mask, positions = padded_batch(model.cfg.vocab_size, [9, 5], 9, seed=2)
    weights = np.random.default_rng(3).standard_normal((2, 9, model.cfg.vocab_size)).astype(np.float32)
    weights *= mask[..., None]  # HF's outputs at padded positions are not comparable
    graphdef, params = nnx.split(model, nnx.Param)
    grads = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(tokens, mask)[0] * weights))(params)
    out = ref(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64)),
              position_ids=torch.tensor(positions)).logits
    (out * torch.tensor(weights)).sum().backward()
    ours, theirs = dict(nnx.to_flat_state(grads)), dict(ref.named_parameters())
    for e in entries(model.cfg):
        got = np.asarray(ours[e.path].get_value())
        got = got if e.layer is None else got[e.layer]
        want = e.to_ours([theirs[k].grad.numpy() for k in e.hf_keys])
        np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), err_msg=str(e.hf_keys))
