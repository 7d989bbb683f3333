"""Zen next: a 32B-total / 8B-active Qwen3-MoE trained with GSPO on math; fits a v5p-128 slice (64 chips) as
16-way FSDP x 4-way expert parallelism.

Shapes (Qwen3-MoE style: q width twice the hidden, head_dim 128, fine-grained top-8 experts, untied head):
embedding + head 2 * 151936 * 4096 = 1.245B; attention 46 * 4096 * 128 * (2*64 + 2*4) = 3.280B;
experts 46 * 64 * 3 * 4096 * 768 = 27.783B, of which 8/64 = 3.473B active; router 12.1M.
Total 32.32B (+1.0% of 32B), active 8.01B (+0.1% of 8B). 64 experts: with 128, the same two budgets need
384-wide experts in a wide, shallow model (28 layers of 6144).

`--config=configs/next.py:tiny` is the same MoE family shrunk for a CPU demo.
"""
import ml_collections

from configs import base


def get_config(arg=None):
    c = base.get_config()
    c.name = "zen-next"  # run name shown in logs
    c.hf_model_id = "Qwen/Qwen3-Next-32B-MoE-Instruct"  # the checkpoint these shapes describe
    c.init_from = "weights/Qwen3-Next-32B-MoE-Instruct"  # `python -m convert hf-to-orbax` output
    c.tokenizer = "hf/Qwen3-Next-32B-MoE-Instruct"  # the downloaded HF snapshot (tokenizer files)
    c.steps = 500  # GSPO steps
    c.model = base.model_config(
        vocab_size=151936,  # Qwen tokenizer
        hidden_size=4096,  # residual width
        num_layers=46,  # decoder layers, all MoE
        num_heads=64,  # query heads (8192 wide, twice the hidden)
        num_kv_heads=4,  # GQA 16:1
        head_dim=128,  # per-head width
        intermediate_size=12288,  # dense SwiGLU width (HF config field; no layer is dense)
        tie_embeddings=False,  # separate LM head
        rope_theta=1_000_000.0,  # RoPE base
        max_position_embeddings=40960,  # trained context
        remat=True,  # recompute layers in backward
        num_experts=64,  # routed experts per layer, no shared expert
        num_experts_per_tok=8,  # top-8
        moe_intermediate_size=768,  # fine-grained experts
        norm_topk_prob=True,  # top-8 weights renormalised to sum to one
        decoder_sparse_step=1,  # every layer MoE
    )
    c.mesh.data = 1  # no replicas
    c.mesh.fsdp = -1  # the rest of the slice (16 of 64 chips) shards params, grads and Adam moments
    # Experts are split fsdp*expert ways either way, but the dropless expert buffer holds
    # expert * min(8, 64 / expert) rows per token (models/moe.py): 4 rather than 8 halves it (zenjax.plan).
    c.mesh.expert = 4  # expert parallelism: 16 experts per shard
    c.optim.lr = 1e-6  # RL of a pretrained model moves slowly
    c.rl.prompts_per_step = 128  # P prompts per rollout batch
    c.rl.group_size = 8  # G completions per prompt: 1024 sequences per step
    c.rl.minibatches = 4  # 4 updates of 256 sequences per rollout batch
    c.rl.max_new_tokens = 2048  # room for a chain of thought
    c.rewards = ml_collections.ConfigDict({"math": 1.0})  # final answer vs reference
    c.data.source = "data/math_train.jsonl"  # {"prompt", "answer"} lines
    c.data.max_prompt_len = 512  # longer prompts are dropped
    return base.variant(c, arg)
