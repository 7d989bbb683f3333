"""Zen nano: Qwen3-0.6B (the published shapes) trained with GSPO on math; fits a v5p-8 slice (4 chips).

`--config=configs/nano.py:tiny` is the same dense, tied-embedding family shrunk for a CPU demo.
"""
import ml_collections

from configs import base


def get_config(arg=None):
    c = base.get_config()
    c.name = "zen-nano"  # run name shown in logs
    c.hf_model_id = "Qwen/Qwen3-0.6B"  # the checkpoint these shapes describe
    c.init_from = "weights/Qwen3-0.6B"  # `python -m convert hf-to-orbax` output
    c.tokenizer = "hf/Qwen3-0.6B"  # the downloaded HF snapshot (tokenizer files)
    c.steps = 500  # GSPO steps
    c.model = base.model_config(
        vocab_size=151936,  # Qwen tokenizer
        hidden_size=1024,  # residual width
        num_layers=28,  # decoder layers
        num_heads=16,  # query heads
        num_kv_heads=8,  # GQA 2:1
        head_dim=128,  # wider than hidden / heads (64)
        intermediate_size=3072,  # SwiGLU width
        tie_embeddings=True,  # LM head is the embedding
        rope_theta=1_000_000.0,  # RoPE base
        max_position_embeddings=40960,  # trained context
        remat=True,  # recompute layers in backward: 1.5k-token sequences
    )
    c.mesh.data = 1  # no replicas: the whole slice shards the state
    c.mesh.fsdp = -1  # params, grads and Adam moments split over every chip
    c.optim.lr = 1e-6  # RL of a pretrained model moves slowly
    c.rl.prompts_per_step = 64  # P prompts per rollout batch
    c.rl.group_size = 8  # G completions per prompt: 512 sequences per step
    c.rl.minibatches = 4  # 4 updates of 128 sequences per rollout batch
    c.rl.max_new_tokens = 1024  # room for short chains of thought
    c.rewards = ml_collections.ConfigDict({"math": 1.0})  # final answer vs reference
    c.data.source = "data/math_train.jsonl"  # {"prompt", "answer"} lines
    c.data.max_prompt_len = 512  # longer prompts are dropped
    return base.variant(c, arg)
