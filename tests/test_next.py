"""Qwen3-Next (Gated DeltaNet + gated attention + shared-expert MoE) against transformers' Qwen3NextForCausalLM
(float32, random weights), and the chunked gated delta rule against the recurrent one."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from tests.hf_util import next_config, padded_batch, save_random
from zenjax.models import KVCache, Qwen3Config
from zenjax.models.deltanet import CHUNK, chunked_delta_rule, recurrent_delta_rule
from zenjax import engine, sampling
from zenjax.models.hf import entries, load_hf

# A prompt longer than one chunk of the chunked form and not a multiple of it.
T = CHUNK + 13


def _hf(model, tokens, mask, positions):
    return model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64)),
                 position_ids=torch.tensor(positions)).logits


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    d = tmp_path_factory.mktemp("next")
    return save_random(next_config(), d), load_hf(str(d), dtype="float32")


@pytest.mark.parametrize("tied", [False, True])
def test_logits_match_transformers_on_a_left_padded_batch(tmp_path, untied, tied):
    if tied:
        ref = save_random(next_config(tie_word_embeddings=True), tmp_path, seed=1)
        model = load_hf(str(tmp_path), dtype="float32")
    else:
        ref, model = untied
    cfg = model.cfg
    assert (cfg.full_attention_interval, cfg.partial_rotary_factor, cfg.tie_embeddings) == (4, 0.25, tied)
    assert [k for k, _, _ in cfg.stack_kinds()] == ["linear", "attention"]
    tokens, mask, positions = padded_batch(cfg.vocab_size, [T, 30, 1], T)
    ours, _ = jax.jit(lambda m, t, k: m(t, k))(model, tokens, mask)
    with torch.no_grad():
        want = _hf(ref, tokens, mask, positions).numpy()
    # float32 both sides, the same operations in another order: differences of ~1e-7 of the logits' scale.
    scale = np.abs(want[mask]).max()
    np.testing.assert_array_less(np.abs(np.asarray(ours) - want)[mask].max(), 1e-4 * scale)


def test_gradients_match_torch_autograd(untied):
    """Every parameter's gradient of a weighted sum of the logits (left padding, two chunks of the chunked form)
    against torch autograd through transformers' reference functions."""
    ref, model = untied
    tokens, mask, positions = padded_batch(model.cfg.vocab_size, [T, 9], T, seed=2)
    weights = np.random.default_rng(3).standard_normal((2, T, model.cfg.vocab_size)).astype(np.float32)
    weights *= mask[..., None]  # HF's outputs at padded positions are not comparable
    graphdef, params = nnx.split(model, nnx.Param)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(tokens, mask)[0] * weights)))(params)
    ref.zero_grad()
    (_hf(ref, tokens, mask, positions) * torch.tensor(weights)).sum().backward()
    ours, theirs = dict(nnx.to_flat_state(grads)), _hub_named_grads(ref)
    for e in entries(model.cfg):
        got = np.asarray(ours[e.path].get_value())
        got = got if e.layer is None else got[e.layer]
        want = e.to_ours([theirs[k] for k in e.hf_keys])
        # Relative to each tensor's largest gradient: float32 sums over ~150 tokens in different orders.
        np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max(), err_msg=str(e.hf_keys))


def _hub_named_grads(model):
    """Gradients by checkpoint name: transformers 5 holds each layer's experts fused (experts.gate_up_proj
    [X, 2F, E], experts.down_proj [X, E, F]); checkpoints name them one expert at a time."""
    out = {}
    for name, p in model.named_parameters():
        g = p.grad.numpy()
        if name.endswith("experts.gate_up_proj"):
            base, F = name[:-len("gate_up_proj")], g.shape[1] // 2
            for x in range(g.shape[0]):
                out[f"{base}{x}.gate_proj.weight"], out[f"{base}{x}.up_proj.weight"] = g[x, :F], g[x, F:]
        elif name.endswith("experts.down_proj"):
            out.update({f"{name[:-len('down_proj')]}{x}.down_proj.weight": g[x] for x in range(g.shape[0])})
        else:
            out[name] = g
    return out


def test_chunked_equals_recurrent_outputs_and_final_states():
    B, L, H, K, V = 2, T, 3, 8, 6
    ks = jax.random.split(jax.random.key(0), 6)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731 - the layer L2-normalises q, k
    q, k = unit(jax.random.normal(ks[0], (B, L, H, K))) * K ** -0.5, unit(jax.random.normal(ks[1], (B, L, H, K)))
    v = jax.random.normal(ks[2], (B, L, H, V))
    g = -jax.nn.softplus(jax.random.normal(ks[3], (B, L, H)))  # log decays <= 0
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, L, H)))
    s0 = jax.random.normal(ks[5], (B, H, K, V))
    for init in (None, s0):
        o_c, s_c = jax.jit(chunked_delta_rule)(q, k, v, g, beta, init)
        o_r, s_r = jax.jit(recurrent_delta_rule)(q, k, v, g, beta, init)
        # float32; the chunked form reassociates the same sums (exp of cumulative decays, one solve per chunk).
        np.testing.assert_allclose(o_c, o_r, atol=2e-5)
        np.testing.assert_allclose(s_c, s_r, atol=2e-5)
    # The state carries a sequence on: two calls over parts equal one over the whole.
    part = jax.jit(chunked_delta_rule)
    o1, s1 = part(q[:, :40], k[:, :40], v[:, :40], g[:, :40], beta[:, :40], s0)
    o2, s2 = part(q[:, 40:], k[:, 40:], v[:, 40:], g[:, 40:], beta[:, 40:], s1)
    np.testing.assert_allclose(jnp.concatenate([o1, o2], 1), o_c, atol=2e-5)
    np.testing.assert_allclose(s2, s_c, atol=2e-5)


def test_cached_prefill_then_recurrent_decoding_equals_the_full_forward(untied):
    """Prefill into the cache (the DeltaNet layers' conv and delta-rule states, the attention layer's keys), then
    one token at a time, through the scanned stacks and through unstacked layers (the CPU samplers'): the recurrent
    form and the conv state carry on exactly where the chunked prefill ended."""
    _, model = untied
    L, prompt = T + 6, T
    tokens, mask, positions = padded_batch(model.cfg.vocab_size, [L, 40], L, seed=1)
    full = np.asarray(jax.jit(lambda t, m: model(t, m)[0])(tokens, mask))
    out = jax.jit(model.hidden)(tokens[:, :prompt], mask[:, :prompt], positions[:, :prompt],
                                KVCache.init(model.cfg, 2, L))
    for unstacked in (False, True):
        cache, layers = out.cache, None
        if unstacked:
            layers, cache = model.unstack_layers(), cache.unstack()
        step = jax.jit(lambda *args, layers=layers: model.hidden(*args, layers))  # one compile for the steps
        steps = [model.logits(out.hidden_BTE)]
        for t in range(prompt, L):
            o = step(tokens[:, t:t + 1], mask[:, t:t + 1], positions[:, t:t + 1], cache)
            cache = o.cache
            steps.append(model.logits(o.hidden_BTE))
        cached = np.concatenate([np.asarray(s) for s in steps], axis=1)
        # float32: the recurrent steps against the chunked forward, ~1e-7 of the logits' scale.
        np.testing.assert_allclose(cached[mask], full[mask], atol=1e-5 * np.abs(full[mask]).max(),
                                   err_msg=f"unstacked={unstacked}")


def test_config_from_hub_and_transformers5_keys_and_back():
    t5 = next_config(num_hidden_layers=8).to_dict()
    hub = dict(t5, rope_theta=t5["rope_parameters"]["rope_theta"], partial_rotary_factor=0.25,
               full_attention_interval=4)
    for k in ("rope_parameters", "layer_types"):
        del hub[k]
    a, b = Qwen3Config.from_hf(t5), Qwen3Config.from_hf(hub)
    assert a == b and a.full_attention_interval == 4 and a.num_experts == 6
    assert Qwen3Config.from_hf(a.to_hf()) == a
    assert [i for i in range(8) if not a.is_linear_layer(i)] == [3, 7]
    with pytest.raises(ValueError, match="every n-th layer full attention"):
        Qwen3Config.from_hf(dict(t5, layer_types=["full_attention"] + t5["layer_types"][1:]))
    with pytest.raises(ValueError, match="value heads a multiple of key heads"):
        dataclasses.replace(a, linear_num_value_heads=5)
    with pytest.raises(ValueError, match="not a multiple of full_attention_interval"):
        dataclasses.replace(a, num_layers=6)


def _hf_greedy(ref, prompts, max_new, eos):
    L = max(map(len, prompts))
    ids = torch.tensor([[0] * (L - len(p)) + p for p in prompts])
    attn = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = ref.generate(input_ids=ids, attention_mask=attn, do_sample=False, max_new_tokens=max_new,
                           min_new_tokens=1, eos_token_id=eos, pad_token_id=0)[:, L:].numpy()
    return np.pad(out, ((0, 0), (0, max_new - out.shape[1])))  # generate stops early when every row has ended


def test_greedy_decoding_of_both_samplers_equals_transformers_generate(untied):
    """The static sampler and the continuous engine (8 sequences through 3 slots) carry each DeltaNet layer's conv
    and delta-rule state beside the attention layer's KV cache: greedy tokens equal generate's, with an EOS that
    ends rows at different steps; the recorded log-probs equal a teacher-forced forward pass."""
    ref, model = untied
    prompts = [list(range(1, T + 1)), [3, 4], [10, 11, 12, 13, 14], [50, 60, 70]]  # the first longer than a chunk
    free = _hf_greedy(ref, prompts, 12, eos=None)
    first = lambda tok: {int(np.argmax(r == tok)) for r in free if tok in r[1:]}  # noqa: E731
    eos = next(int(t) for t in np.unique(free) if len(first(t)) > 1)  # rows end at different steps
    want = np.repeat(_hf_greedy(ref, prompts, 12, eos=eos), 2, axis=0)
    kw = dict(num_samples=2, max_new_tokens=12, rng=None, greedy=True, eos_ids=(eos,))
    static = sampling.sample(model, prompts, **kw)
    continuous, stats = engine.sample(model, prompts, slots=3, **kw)
    for out in (static, continuous):
        np.testing.assert_array_equal(np.where(out.mask, out.tokens, 0), want)
    assert int(stats["refills"]) == 8
    tokens = jnp.concatenate([static.prompt_tokens, static.tokens], axis=1)
    mask = jnp.concatenate([static.prompt_mask, static.mask], axis=1)
    logits, _ = model(tokens, mask)
    Lp = static.prompt_tokens.shape[1]
    full = jax.nn.log_softmax(logits[:, Lp - 1:-1], axis=-1)
    teacher = np.take_along_axis(np.asarray(full), np.asarray(static.tokens)[..., None], axis=-1)[..., 0]
    m = np.asarray(static.mask)
    for out in (static, continuous):
        # float32: the recurrent decode against the chunked forward, ~1e-6 apart.
        np.testing.assert_allclose(np.asarray(out.logprobs)[m], teacher[m], atol=1e-5)


def test_planner_counts_the_decode_state_and_cache_the_sampler_allocates():
    """Per sequence: the attention layers' keys and values grow with the length, the DeltaNet states do not."""
    from configs import qwen3_next_80b_a3b  # noqa: PLC0415
    from zenjax.config import model_config_from  # noqa: PLC0415
    from zenjax.plan import kv_cache_bytes  # noqa: PLC0415

    cfg = model_config_from(qwen3_next_80b_a3b.get_config().model)
    for length in (8192, 32768):
        cache = jax.eval_shape(lambda n=length: KVCache.init(cfg, 1, n).layers)
        assert kv_cache_bytes(cfg, 1, length) == sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache))
