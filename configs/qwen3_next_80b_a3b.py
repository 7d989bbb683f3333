"""Qwen3-Next-80B-A3B (Qwen3-Next-80B-A3B-Instruct / -Thinking, Qwen3-Coder-Next: the released shapes) trained with
GSPO on math.

48 layers in 12 groups of three Gated DeltaNet layers (16 key / 32 value heads of 128) and one gated attention
layer (16 query / 2 kv heads of 256, RoPE on a quarter of each head); every layer a 512-expert top-10 MoE plus a
shared expert. Parameters (hand count in tests/test_configs.py, equal to transformers'): embedding + head
2 * 151936 * 2048 = 0.622B; DeltaNet 36 * 2048 * (2*2048 + 2*4096 + 64) + conv + out 36 * 4096 * 2048 = 1.234B;
attention 12 * 2048 * (16*256*2 + 2*2*256 + 16*256) = 0.327B; routed experts 48 * 512 * 3 * 2048 * 512 = 77.3B, of
which 10/512 = 1.51B active; shared experts and routers 48 * (3 * 2048 * 512 + 2048 * 513) = 0.201B. Total
79.7B, active 3.9B (the model card: 80B total, 3B activated "non-embedding" MoE parameters).

`--config=configs/qwen3_next_80b_a3b.py:tiny` is the same hybrid shrunk for a CPU demo (3 DeltaNet + 1 attention).
"""
import ml_collections

from configs import base


def get_config(arg=None):
    c = base.get_config()
    c.name = "qwen3-next-80b-a3b"  # run name shown in logs
    c.hf_model_id = "Qwen/Qwen3-Next-80B-A3B-Instruct"  # the checkpoint these shapes describe
    c.init_from = "weights/Qwen3-Next-80B-A3B-Instruct"  # `python -m convert hf-to-orbax` output
    c.tokenizer = "hf/Qwen3-Next-80B-A3B-Instruct"  # the downloaded HF snapshot (tokenizer files)
    c.steps = 500  # GSPO steps
    c.model = base.model_config(
        vocab_size=151936,  # Qwen tokenizer
        hidden_size=2048,  # residual width
        num_layers=48,  # decoder layers, all MoE
        num_heads=16,  # gated attention query heads (4096 wide)
        num_kv_heads=2,  # GQA 8:1
        head_dim=256,  # per-head width
        intermediate_size=5120,  # dense SwiGLU width (in config.json; no layer is dense)
        tie_embeddings=False,  # separate LM head
        rope_theta=10_000_000.0,  # RoPE base
        partial_rotary_factor=0.25,  # RoPE on 64 of the 256 dims
        max_position_embeddings=262144,  # trained context
        remat=True,  # recompute layers in backward
        num_experts=512,  # routed experts per layer
        num_experts_per_tok=10,  # top-10
        moe_intermediate_size=512,  # fine-grained experts
        shared_expert_intermediate_size=512,  # plus one shared expert, gated
        norm_topk_prob=True,  # top-10 weights renormalised to sum to one
        decoder_sparse_step=1,  # every layer MoE
        router_aux_loss_coef=0.001,  # load-balance loss as in pre-training
        full_attention_interval=4,  # layers 3, 7, ..., 47 full attention, the others Gated DeltaNet
        linear_num_key_heads=16,  # DeltaNet query / key heads
        linear_num_value_heads=32,  # DeltaNet value heads
        linear_key_head_dim=128,  # per key head
        linear_value_head_dim=128,  # per value head
        linear_conv_kernel_dim=4,  # causal conv over q, k, v
    )
    c.mesh.data = 1  # no replicas
    c.mesh.fsdp = -1  # the rest of the slice shards params, grads and Adam moments
    c.mesh.expert = 8  # 64 experts per expert shard
    c.optim.lr = 1e-6  # RL of a pretrained model moves slowly
    c.rl.prompts_per_step = 128  # P prompts per rollout batch
    c.rl.group_size = 8  # G completions per prompt: 1024 sequences per step
    c.rl.minibatches = 4  # 4 updates of 256 sequences per rollout batch
    c.rl.max_new_tokens = 2048  # room for a chain of thought
    c.rewards = ml_collections.ConfigDict({"math": 1.0})  # final answer vs reference
    c.data.source = "data/math_train.jsonl"  # {"prompt", "answer"} lines
    c.data.max_prompt_len = 512  # longer prompts are dropped
    return base.variant(c, arg)
