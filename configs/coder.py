"""Zen coder: a 7B-total / 2B-active Qwen3-MoE trained with GSPO on code with unit-test rewards; fits a v5p-64
slice (32 chips) with 8-way expert parallelism.

Shapes (Qwen3-MoE style: q width twice the hidden, head_dim 128, fine-grained top-8 experts, untied head):
embedding + head 2 * 151936 * 2048 = 0.622B; attention 36 * 2048 * 128 * (2*32 + 2*8) = 0.755B;
experts 36 * 64 * 3 * 2048 * 384 = 5.436B, of which 8/64 = 0.679B active; router 4.7M.
Total 6.82B (-2.6% of 7B), active 2.06B (+3.1% of 2B). 64 experts: with 128, the same two budgets need
256-wide experts (e.g. 18 layers of 3072), too narrow for the MXU.

`--config=configs/coder.py:tiny` is the same MoE family shrunk for a CPU demo (arithmetic, not code).
"""
import ml_collections

from configs import base


def get_config(arg=None):
    c = base.get_config()
    c.name = "zen-coder"  # run name shown in logs
    c.hf_model_id = "Qwen/Qwen3-Coder-7B-MoE-Instruct"  # the checkpoint these shapes describe
    c.init_from = "weights/Qwen3-Coder-7B-MoE-Instruct"  # `python -m convert hf-to-orbax` output
    c.tokenizer = "hf/Qwen3-Coder-7B-MoE-Instruct"  # the downloaded HF snapshot (tokenizer files)
    c.steps = 500  # GSPO steps
    c.model = base.model_config(
        vocab_size=151936,  # Qwen tokenizer
        hidden_size=2048,  # residual width
        num_layers=36,  # decoder layers, all MoE
        num_heads=32,  # query heads (4096 wide, twice the hidden)
        num_kv_heads=8,  # GQA 4:1
        head_dim=128,  # per-head width
        intermediate_size=6144,  # dense SwiGLU width (HF config field; no layer is dense)
        tie_embeddings=False,  # separate LM head
        rope_theta=1_000_000.0,  # RoPE base
        max_position_embeddings=40960,  # trained context
        remat=True,  # recompute layers in backward: 3k-token sequences
        num_experts=64,  # routed experts per layer, no shared expert
        num_experts_per_tok=8,  # top-8
        moe_intermediate_size=384,  # fine-grained experts
        norm_topk_prob=True,  # top-8 weights renormalised to sum to one
        decoder_sparse_step=1,  # every layer MoE
    )
    c.mesh.data = 1  # no replicas
    c.mesh.fsdp = -1  # the rest of the slice shards params, grads and Adam moments
    c.mesh.expert = 8  # 8 experts per expert shard
    c.optim.lr = 1e-6  # RL of a pretrained model moves slowly
    c.rl.prompts_per_step = 64  # P problems per rollout batch (sandboxed tests are the slow part)
    c.rl.group_size = 8  # G programs per problem: 512 sequences per step
    c.rl.minibatches = 4  # 4 updates of 128 sequences per rollout batch
    c.rl.max_new_tokens = 2048  # reasoning plus a program
    # The item's tests hold on the program's values (sandboxed); each step's scoring stops at deadline_s.
    c.rewards = ml_collections.ConfigDict({"code": {"weight": 1.0, "workers": 0, "deadline_s": 120.0, "wall_s": 10.0,
                                                    "memory_mb": 1024, "allow_missing": ""}})
    c.data.source = "data/code_train.jsonl"  # {"prompt", "tests"} lines
    c.data.max_prompt_len = 1024  # problem statements with examples are long
    return base.variant(c, arg)
