"""Qwen3-MoE against transformers' Qwen3MoeForCausalLM (float32, random weights), and the ragged experts against
the every-expert reference."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from tests.hf_util import moe_config, padded_batch, save_random
from zenjax.models import Qwen3Config, moe
from zenjax.models.hf import load_hf
from zenjax.sampling import sample


def _hf_forward(model, tokens, mask, positions):
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64)),
                     position_ids=torch.tensor(positions), output_router_logits=True)


def _to_hub_keys(directory):
    """Rewrite the transformers-5 config.json that save_pretrained writes with the keys hub checkpoints use."""
    path = directory / "config.json"
    c = json.loads(path.read_text())
    c["num_experts"] = c.pop("num_local_experts")
    c["rope_theta"] = c.pop("rope_parameters")["rope_theta"]
    path.write_text(json.dumps(c))


@pytest.mark.parametrize("hf_kw,hub_keys", [
    (dict(norm_topk_prob=True, num_experts_per_tok=2), True),
    (dict(norm_topk_prob=False, num_experts_per_tok=1, mlp_only_layers=[1]), False),
    (dict(norm_topk_prob=True, num_experts_per_tok=3, mlp_only_layers=[0]), True),
], ids=["norm-top2-hub_keys", "top1-mlp_only-t5_keys", "norm-top3-mlp_only-hub_keys"])
def test_logits_and_aux_loss_match_transformers(tmp_path, hf_kw, hub_keys):
    ref = save_random(moe_config(**hf_kw), tmp_path)
    if hub_keys:
        _to_hub_keys(tmp_path)
    model = load_hf(str(tmp_path), dtype="float32")
    cfg = model.cfg
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob) == (6, hf_kw["num_experts_per_tok"],
                                                                             hf_kw["norm_topk_prob"])
    assert cfg.mlp_only_layers == tuple(hf_kw.get("mlp_only_layers", ()))
    tokens, mask, positions = padded_batch(cfg.vocab_size, [9, 5, 1], 9)
    logits, aux = jax.jit(lambda m, t, k: m(t, k))(model, tokens, mask)
    want = _hf_forward(ref, tokens, mask, positions)
    np.testing.assert_array_less(np.abs(np.asarray(logits) - want.logits.numpy())[mask].max(), 1e-4)
    losses = moe.moe_losses(aux, cfg)
    np.testing.assert_allclose(losses["aux_loss"], want.aux_loss.item(), rtol=1e-5, atol=1e-6)

    # z-loss and routing statistics from HF's router logits (padding excluded), computed independently here.
    hf_logits = torch.stack(want.router_logits).reshape(len(want.router_logits), *tokens.shape, -1)
    m = torch.tensor(mask)
    lse = torch.logsumexp(hf_logits, -1)
    np.testing.assert_allclose(losses["z_loss"], (lse[:, m] ** 2).mean().item(), rtol=1e-5)
    chosen = torch.topk(hf_logits, cfg.num_experts_per_tok, dim=-1).indices[:, m]  # [L, n_real, K]
    counts = torch.nn.functional.one_hot(chosen, cfg.num_experts).sum((1, 2)).numpy()
    stats = moe.routing_stats(aux)
    np.testing.assert_allclose(stats["expert_fraction"], counts / counts.sum(1, keepdims=True), atol=1e-6)
    np.testing.assert_allclose(stats["max_load_ratio"], counts.max(1) / counts.mean(1), rtol=1e-5)
    np.testing.assert_array_equal(stats["dead_experts"], (counts == 0).sum(1))
    p = torch.softmax(hf_logits, -1)[:, m]
    np.testing.assert_allclose(stats["router_entropy"], (-(p * p.log()).sum(-1)).mean(1).numpy(), rtol=1e-4)
    assert moe.routing_change(aux, aux, mask) == 0.0


def test_greedy_generation_equals_transformers(tmp_path):
    # On CPU decoding runs unstacked layers with each expert's weights an array of its own; 6 copies of each
    # prompt give experts more than one block of rows.
    ref = save_random(moe_config(norm_topk_prob=True, mlp_only_layers=[1]), tmp_path)
    model = load_hf(str(tmp_path), dtype="float32")
    prompts = [[5, 6, 7, 8, 9], [3, 4], [10, 11, 12]]
    got = np.asarray(sample(model, prompts, num_samples=6, max_new_tokens=10, rng=None, greedy=True).tokens)
    L = max(map(len, prompts))
    ids = torch.tensor([[0] * (L - len(p)) + p for p in prompts])
    attn = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        want = ref.generate(input_ids=ids, attention_mask=attn, do_sample=False, max_new_tokens=10,
                            min_new_tokens=10, pad_token_id=0)[:, L:].numpy()
    np.testing.assert_array_equal(got.reshape(len(prompts), 6, -1), np.repeat(want[:, None], 6, axis=1))


def test_balance_global_batch_recombines_to_the_full_batch_loss(tmp_path):
    # f_e from the whole batch, P_e per micro-batch: the token-weighted mean of the micro-batch losses equals the
    # transformers loss of the whole batch.
    ref = save_random(moe_config(), tmp_path)
    model = load_hf(str(tmp_path), dtype="float32", balance_global_batch=True)
    tokens, mask, positions = padded_batch(model.cfg.vocab_size, [8, 3, 6, 8], 8, seed=2)
    fwd = jax.jit(lambda m, t, k: m(t, k)[1])
    full = fwd(model, tokens, mask)
    parts = [fwd(model, tokens[s], mask[s]) for s in (slice(0, 2), slice(2, 4))]
    combined = sum(moe.moe_losses(a, model.cfg, global_aux=full)["aux_loss"] * np.sum(a["tokens"]) for a in parts)
    want = _hf_forward(ref, tokens, mask, positions).aux_loss.item()
    np.testing.assert_allclose(combined / np.sum(full["tokens"]), want, rtol=1e-5)
    # Without the flag a micro-batch is balanced on its own counts, a different number.
    own = moe.moe_losses(parts[0], dataclasses.replace(model.cfg, balance_global_batch=False), global_aux=full)
    assert not np.isclose(own["aux_loss"], moe.moe_losses(parts[0], model.cfg, global_aux=full)["aux_loss"])


def test_routing_change_counts_changed_choices_ignoring_order():
    a = {"topk": jnp.array([[[[0, 1], [2, 3]]]])}  # [L=1, B=1, T=2, K=2]
    b = {"topk": jnp.array([[[[1, 0], [2, 4]]]], jnp.uint8)}  # same set for token 0, one of two changed for 1
    assert moe.routing_change(a, b, jnp.array([[True, True]])) == pytest.approx(0.25)
    assert moe.routing_change(a, b, jnp.array([[True, False]])) == 0.0


def _block_and_input(impl):
    cfg = Qwen3Config(hidden_size=16, num_experts=6, num_experts_per_tok=3, moe_intermediate_size=8,
                      norm_topk_prob=True, moe_impl=impl, dtype="float32", num_layers=1, num_heads=2, num_kv_heads=1)
    block = moe.MoEBlock(cfg, rngs=nnx.Rngs(3))
    x = jax.random.normal(jax.random.key(4), (3, 5, 16))
    mask = jnp.arange(5)[None, :] >= jnp.array([[0], [2], [4]])
    return block, x, mask


def test_ragged_equals_reference_in_values_and_gradients():
    blocks = {impl: _block_and_input(impl) for impl in ("ragged", "reference")}

    def loss(block, x, mask):
        y, aux = block(x, mask)
        w = jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)  # weights every output differently
        return jnp.sum(y * w) + moe.moe_losses(jax.tree.map(lambda a: a[None], aux), block.cfg)["aux_loss"], y

    out = {impl: jax.jit(nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True))(*b) for impl, b in blocks.items()}
    (_, y_rag), (g_rag, gx_rag) = out["ragged"]
    (_, y_ref), (g_ref, gx_ref) = out["reference"]
    np.testing.assert_allclose(y_rag, y_ref, atol=1e-6)
    np.testing.assert_allclose(gx_rag, gx_ref, atol=1e-6)
    for name in ("router", "gate", "up", "down"):
        np.testing.assert_allclose(getattr(g_rag, name)[...], getattr(g_ref, name)[...], atol=1e-6, err_msg=name)
        assert np.abs(getattr(g_ref, name)[...]).max() > 1e-3  # the comparison is not between zeros


@pytest.mark.parametrize("kernel,N", [("blocked", 10), ("blocked", 5), ("ragged_dot", 10)],
                         ids=["blocked", "blocked-decode", "ragged_dot"])
def test_local_expert_kernels_with_a_slice_of_the_experts(kernel, N):
    # The expert-parallel building block: only pairs routed to experts [first, first + 3) count, every kernel
    # (ragged_dot is what accelerators run; XLA:CPU lowers it densely, which is fine at this size). At most
    # moe.MIN_BLOCK tokens, the CPU kernel runs every held expert on every token (decoding).
    X, E, F, K, first = 7, 8, 4, 3, 2
    ks = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(ks[0], (N, E))
    idx = jax.vmap(lambda k: jax.random.permutation(k, X)[:K])(jax.random.split(ks[1], N))
    w = jax.random.uniform(ks[2], (N, K))
    g, u = jax.random.normal(ks[3], (2, X, E, F))
    d = jax.random.normal(ks[4], (X, F, E))

    def want(x, g, u, d):
        h_NXF = jax.nn.silu(jnp.einsum("ne,xef->nxf", x, g)) * jnp.einsum("ne,xef->nxf", x, u)
        y_NXE = jnp.einsum("nxf,xfe->nxe", h_NXF, d)
        local = (idx >= first) & (idx < first + 3)
        return jnp.einsum("nke,nk->ne", jnp.take_along_axis(y_NXE, idx[..., None], 1), jnp.where(local, w, 0))

    def got(x, g, u, d):
        sl = slice(first, first + 3)
        return moe._local_experts(x, idx, w, g[sl], u[sl], d[sl], first, kernel=kernel)

    def value_and_grads(f):
        return jax.jit(jax.value_and_grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2, 3)))(x, g, u, d)

    (v_got, g_got), (v_want, g_want) = value_and_grads(got), value_and_grads(want)
    np.testing.assert_allclose(v_got, v_want, rtol=1e-5)
    for a, b in zip(g_got, g_want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_bad_configs_raise_clear_errors():
    base = dict(num_layers=2, num_experts=4, moe_intermediate_size=8)
    with pytest.raises(ValueError, match=r"num_experts_per_tok=5 must be in \[1, num_experts=4\]"):
        Qwen3Config(num_experts_per_tok=5, **base)
    with pytest.raises(ValueError, match=r"mlp_only_layers \[2\] out of range for num_layers=2"):
        Qwen3Config(num_experts_per_tok=2, mlp_only_layers=(0, 2), **base)
    hf = dict(model_type="qwen3_moe", vocab_size=10, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
              head_dim=4, intermediate_size=16, num_local_experts=4, num_experts_per_tok=6, moe_intermediate_size=8)
    with pytest.raises(ValueError, match="num_experts_per_tok=6"):
        Qwen3Config.from_hf(hf)
