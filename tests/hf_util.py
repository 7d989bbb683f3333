"""Tiny random HF Qwen3 / Qwen3-MoE checkpoints, the reference every model test compares against."""
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


def save_random(config, directory, seed=0, **save_kw):
    """A randomly initialised transformers model saved with save_pretrained; returns the torch model (eval)."""
    torch.manual_seed(seed)
    cls = transformers.Qwen3MoeForCausalLM if config.model_type == "qwen3_moe" else transformers.Qwen3ForCausalLM
    model = cls(config).float().eval()
    # Norm weights start at one; perturb them so a mis-wired norm cannot pass.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
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
