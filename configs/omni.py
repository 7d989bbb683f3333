"""Zen omni: a 14B-total / 4B-active Qwen3-MoE (the text decoder) trained with GSPO on math with a format bonus;
fits a v5p-64 slice (32 chips) with 8-way expert parallelism.

Shapes (Qwen3-MoE style: q width twice the hidden, head_dim 128, fine-grained top-8 experts, untied head):
embedding + head 2 * 151936 * 3072 = 0.933B; attention 38 * 3072 * 128 * (2*48 + 2*4) = 1.554B;
experts 38 * 64 * 3 * 3072 * 512 = 11.476B, of which 8/64 = 1.434B active; router 7.5M.
Total 13.97B (-0.2% of 14B), active 3.93B (-1.8% of 4B). 64 experts: the 4B active budget is two thirds
embedding and attention, so 8-of-64 is the sparsity that lands both totals.

`--config=configs/omni.py:tiny` is the same MoE family shrunk for a CPU demo.
"""
import ml_collections

from configs import base


def get_config(arg=None):
    c = base.get_config()
    c.name = "zen-omni"  # run name shown in logs
    c.hf_model_id = "Qwen/Qwen3-Omni-14B-MoE"  # the checkpoint these shapes describe
    c.init_from = "weights/Qwen3-Omni-14B-MoE"  # `python -m convert hf-to-orbax` output
    c.tokenizer = "hf/Qwen3-Omni-14B-MoE"  # the downloaded HF snapshot (tokenizer files)
    c.steps = 500  # GSPO steps
    c.model = base.model_config(
        vocab_size=151936,  # Qwen tokenizer
        hidden_size=3072,  # residual width
        num_layers=38,  # decoder layers, all MoE
        num_heads=48,  # query heads (6144 wide, twice the hidden)
        num_kv_heads=4,  # GQA 12:1
        head_dim=128,  # per-head width
        intermediate_size=9216,  # dense SwiGLU width (HF config field; no layer is dense)
        tie_embeddings=False,  # separate LM head
        rope_theta=1_000_000.0,  # RoPE base
        max_position_embeddings=40960,  # trained context
        remat=True,  # recompute layers in backward
        num_experts=64,  # routed experts per layer, no shared expert
        num_experts_per_tok=8,  # top-8
        moe_intermediate_size=512,  # fine-grained experts
        norm_topk_prob=True,  # top-8 weights renormalised to sum to one
        decoder_sparse_step=1,  # every layer MoE
    )
    c.mesh.data = 1  # no replicas
    c.mesh.fsdp = -1  # the rest of the slice shards params, grads and Adam moments
    c.mesh.expert = 8  # 8 experts per expert shard
    c.optim.lr = 1e-6  # RL of a pretrained model moves slowly
    c.rl.prompts_per_step = 64  # P prompts per rollout batch
    c.rl.group_size = 8  # G completions per prompt: 512 sequences per step
    c.rl.minibatches = 4  # 4 updates of 128 sequences per rollout batch
    c.rl.max_new_tokens = 2048  # room for a chain of thought
    # Mostly correctness; a small bonus for <think>...</think><answer>...</answer> keeps answers extractable.
    c.rewards = ml_collections.ConfigDict({"math": 1.0, "format": 0.2})
    c.data.source = "data/math_train.jsonl"  # {"prompt", "answer"} lines
    c.data.max_prompt_len = 512  # longer prompts are dropped
    return base.variant(c, arg)
