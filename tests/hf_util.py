"""Tiny random HF Qwen3 / Qwen3-MoE / Qwen3-Next checkpoints, the reference every model test compares against."""
import numpy as np
import torch
import transformers


def dense_config(**kw):
    base = dict(vocab_size=97, hidden_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, intermediate_size=64, max_position_embeddings=128, rope_theta=10000.0,
                tie_word_embeddings=False)
    base.update(kw)
    return transformers.Qwen3Config(**base)


def moe_config(**kw):
    base = dict(vocab_size=97, hidden_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, intermediate_size=64, moe_intermediate_size=24, num_experts=6, num_experts_per_tok=2,
                max_position_embeddings=128, rope_theta=10000.0, tie_word_embeddings=False)
    base.update(kw)
    return transformers.Qwen3MoeConfig(**base)


def next_config(**kw):
    """Qwen3-Next: 4 layers (3 Gated DeltaNet + 1 gated attention), 2 key / 4 value linear heads, shared expert."""
    base = dict(vocab_size=97, hidden_size=48, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, intermediate_size=64, moe_intermediate_size=24, shared_expert_intermediate_size=20,
                num_experts=6, num_experts_per_tok=2, linear_num_key_heads=2, linear_num_value_heads=4,
                linear_key_head_dim=8, linear_value_head_dim=12, max_position_embeddings=256, rope_theta=10000.0,
                tie_word_embeddings=False)
    base.update(kw)
    return transformers.Qwen3NextConfig(**base)


CAUSAL_LM = {"qwen3": transformers.Qwen3ForCausalLM, "qwen3_moe": transformers.Qwen3MoeForCausalLM,
             "qwen3_next": transformers.Qwen3NextForCausalLM}


def save_random(config, directory, seed=0, **save_kw):
    """A randomly initialised transformers model saved with save_pretrained; returns the torch model (eval)."""
    torch.manual_seed(seed)
    model = CAUSAL_LM[config.model_type](config).float().eval()
    # Norm weights start at one (Qwen3-Next's at zero); perturb them so a mis-wired norm cannot pass.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            if name.endswith("A_log"):
                # Decay rates in [0.1, 2] rather than HF's init [0.01, 16]: at 16 per token a chunk's cumulative
                # decay reaches ~-1000 and the float32 gradients of the decay parameters lose ~1e-3 of their
                # digits in transformers' reference itself (measured against a float64 recurrence).
                p.copy_(torch.empty_like(p).uniform_(0.1, 2).log())
    model.save_pretrained(directory, **save_kw)
    return model


def padded_batch(vocab, lengths, T, seed=0):
    """Left-padded tokens [B, T], mask and position ids; HF gets the position ids explicitly so both see the same."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (len(lengths), T))
    mask = np.zeros((len(lengths), T), bool)
    for i, n in enumerate(lengths):
        mask[i, T - n:] = True
    return np.where(mask, tokens, 0), mask, np.maximum(np.cumsum(mask, 1) - 1, 0)
