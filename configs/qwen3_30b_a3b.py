"""Qwen3-30B-A3B (the published shapes: 30.5B total, 3.3B active) trained with GSPO on math, the setting of the
GSPO paper's MoE experiments; fits a v5p-128 slice (64 chips) as 8-way FSDP x 8-way expert parallelism.

`--config=configs/qwen3_30b_a3b.py:tiny` is the same MoE family shrunk for a CPU demo.
"""
import ml_collections

from configs import base


def get_config(arg=None):
    c = base.get_config()
    c.name = "qwen3-30b-a3b"  # run name shown in logs
    c.hf_model_id = "Qwen/Qwen3-30B-A3B"  # the checkpoint these shapes describe
    c.init_from = "weights/Qwen3-30B-A3B"  # `python -m convert hf-to-orbax` output
    c.tokenizer = "hf/Qwen3-30B-A3B"  # the downloaded HF snapshot (tokenizer files)
    c.steps = 500  # GSPO steps
    c.model = base.model_config(
        vocab_size=151936,  # Qwen tokenizer
        hidden_size=2048,  # residual width
        num_layers=48,  # decoder layers, all MoE
        num_heads=32,  # query heads (4096 wide, twice the hidden)
        num_kv_heads=4,  # GQA 8:1
        head_dim=128,  # per-head width
        intermediate_size=6144,  # dense SwiGLU width (in config.json; no layer is dense)
        tie_embeddings=False,  # separate LM head
        rope_theta=1_000_000.0,  # RoPE base
        max_position_embeddings=40960,  # trained context
        remat=True,  # recompute layers in backward
        num_experts=128,  # routed experts per layer, no shared expert
        num_experts_per_tok=8,  # top-8
        moe_intermediate_size=768,  # fine-grained experts
        norm_topk_prob=True,  # top-8 weights renormalised to sum to one
        decoder_sparse_step=1,  # every layer MoE
        router_aux_loss_coef=0.001,  # load-balance loss as in pre-training
    )
    c.mesh.data = 1  # no replicas
    c.mesh.fsdp = -1  # the rest of the slice shards params, grads and Adam moments
    c.mesh.expert = 8  # 16 experts per expert shard
    c.optim.lr = 1e-6  # RL of a pretrained model moves slowly
    c.rl.prompts_per_step = 128  # P prompts per rollout batch
    c.rl.group_size = 8  # G completions per prompt: 1024 sequences per step
    c.rl.minibatches = 4  # 4 updates of 256 sequences per rollout batch
    c.rl.max_new_tokens = 2048  # room for a chain of thought
    c.rewards = ml_collections.ConfigDict({"math": 1.0})  # final answer vs reference
    c.data.source = "data/math_train.jsonl"  # {"prompt", "answer"} lines
    c.data.max_prompt_len = 512  # longer prompts are dropped
    return base.variant(c, arg)
