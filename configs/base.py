"""Fields shared by every zenjax config. Family configs override what differs; `tiny` shrinks the model.

Every field carries a one-line comment; ml_collections rejects unknown `--config.x.y=` keys.
"""
import ml_collections

from zenjax.data import default_data_config


def model_config(**overrides) -> ml_collections.ConfigDict:
    """Mirror of zenjax.models.Qwen3Config (the train CLI turns it into the dataclass)."""
    m = ml_collections.ConfigDict()
    m.hf_config = ""  # path to an HF config.json (or its dir); when set it defines the architecture
    m.vocab_size = 151936  # tokens
    m.hidden_size = 1024  # residual width
    m.num_layers = 28  # decoder layers
    m.num_heads = 16  # query heads
    m.num_kv_heads = 8  # key/value heads (GQA)
    m.head_dim = 128  # per-head width (not always hidden / heads in Qwen3)
    m.intermediate_size = 3072  # dense SwiGLU width
    m.rms_norm_eps = 1e-6  # RMSNorm epsilon
    m.rope_theta = 1_000_000.0  # RoPE base
    m.tie_embeddings = True  # LM head shares the embedding matrix
    m.max_position_embeddings = 40960  # longest context the checkpoint was trained for
    m.dtype = "bfloat16"  # compute dtype of matmuls (float32 on CPU benches)
    m.param_dtype = "float32"  # master weights
    m.remat = True  # recompute layer activations in backward (memory for FLOPs)
    m.num_experts = 0  # 0 = dense model
    m.num_experts_per_tok = 0  # top-k routing
    m.moe_intermediate_size = 0  # per-expert SwiGLU width
    m.norm_topk_prob = False  # renormalise the k router weights to sum to one
    m.decoder_sparse_step = 1  # every n-th layer is MoE
    m.mlp_only_layers = ()  # layer indices that keep a dense MLP
    m.router_aux_loss_coef = 0.001  # load-balance loss coefficient (added to the policy loss)
    m.router_z_loss_coef = 0.0  # ST-MoE router z-loss coefficient
    m.moe_impl = "ragged"  # "ragged" dropless grouped matmul; "reference" runs every expert (tests only)
    m.balance_global_batch = False  # balance over the global batch instead of each micro-batch
    m.full_attention_interval = 0  # Qwen3-Next: every n-th layer full attention, the others Gated DeltaNet (0: Qwen3)
    m.partial_rotary_factor = 1.0  # fraction of each head's dims RoPE turns (Qwen3-Next: 0.25)
    m.shared_expert_intermediate_size = 0  # MoE shared expert width (0: none)
    m.linear_num_key_heads = 0  # Gated DeltaNet query / key heads
    m.linear_num_value_heads = 0  # Gated DeltaNet value heads (a multiple of the key heads)
    m.linear_key_head_dim = 0  # Gated DeltaNet key width per head
    m.linear_value_head_dim = 0  # Gated DeltaNet value width per head
    m.linear_conv_kernel_dim = 4  # causal depthwise convolution over q, k, v
    m.kernels = "auto"  # "auto": the kernels of the mesh devices' platform; "cpu" / "tpu" / "gpu" forces them
    m.update(overrides)
    return m


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "base"  # run name shown in logs
    c.hf_model_id = ""  # metadata: the HF model this config describes
    c.seed = 0  # params init, sampling and data order
    c.steps = 1000  # GSPO steps (one rollout batch each)
    c.init_from = ""  # weights dir (convert hf-to-orbax output) to start from; empty = random init
    c.tokenizer = ""  # "char" (built-in) or a local HF tokenizer dir; "": init_from's own, else "char"
    c.model = model_config()

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # data-parallel replicas (-1: the remaining devices)
    c.mesh.fsdp = 1  # parameter/optimizer sharding, also splits the batch
    c.mesh.expert = 1  # expert parallelism (MoE), also splits the batch
    c.mesh.tensor = 1  # tensor parallelism over heads / mlp / vocab

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-6  # peak learning rate (RL of a pretrained model)
    c.optim.warmup_steps = 100  # a fresh Adam ramps up slowly so it does not undo the warm-up
    c.optim.min_lr_ratio = 0.1  # cosine decays to lr * this
    c.optim.b1 = 0.9  # AdamW beta1
    c.optim.b2 = 0.999  # AdamW beta2
    c.optim.weight_decay = 0.01  # AdamW decoupled weight decay
    c.optim.grad_clip = 1.0  # global-norm gradient clipping
    c.optim.grad_accum = 1  # micro-batches accumulated per optimizer step
    c.optim.max_bad_steps = 5  # stop after this many non-finite updates in a row

    c.rl = ml_collections.ConfigDict()
    c.rl.loss = "gspo"  # registered loss: gspo | gspo_token | grpo
    c.rl.eps_low = 3e-4  # lower clip (GSPO paper)
    c.rl.eps_high = 4e-4  # upper clip (GSPO paper)
    c.rl.kl_coef = 0.0  # k3 KL to the initial policy; 0 disables (GSPO default)
    c.rl.prompts_per_step = 64  # P prompts per rollout batch
    c.rl.group_size = 8  # G completions per prompt
    c.rl.minibatches = 4  # optimizer steps per rollout batch (later ones are off-policy)
    c.rl.max_new_tokens = 1024  # completion budget
    c.rl.temperature = 1.0  # sampling temperature for rollouts
    c.rl.top_k = 0  # 0 disables top-k
    c.rl.top_p = 1.0  # 1.0 disables nucleus sampling
    c.rl.scale_std = True  # divide advantages by the group std
    c.rl.old_logprobs = "recompute"  # "recompute" with the trainer, or "sampler" to reuse the sampler's
    c.rl.logprob_chunk = 512  # sequence chunk for log-probs (bounds the [B, chunk, V] logits)
    c.rl.logprob_batch = 0  # sequences per old-log-prob / KL pass (bounds its memory); 0 = an update minibatch's
    c.rl.engine = "continuous"  # rollout sampler: "continuous" (decode slots refilled as sequences end) | "static"
    c.rl.slots = 0  # decode slots of the continuous engine; 0 = as many as the rollout's memory holds (zenjax.plan)
    c.rl.rollout_copy = True  # decode from a compute-dtype copy in the rollout layout; False: from the training state
    c.rl.sft_steps = 0  # supervised warm-up steps on reference answers before GSPO; -N: N from random init only
    c.rl.sft_lr = 1e-3  # learning rate of the warm-up

    c.rewards = ml_collections.ConfigDict({"math": 1.0})  # reward name -> weight

    c.data = default_data_config()  # prompt source and task settings, documented in zenjax/data.py

    c.eval_every = 100  # steps between greedy evaluations on the held-out split on held-out prompts (0 = never)
    c.checkpoint_every = 50  # steps between checkpoints (also saved at the end and on SIGTERM)
    c.keep_checkpoints = 3  # newest checkpoints kept
    return c


def tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrink a family config (in place) to its `tiny` variant: the same architecture family, small enough to
    learn the built-in arithmetic task on 2 CPU cores in minutes, from random init."""
    m = c.model
    c.name += "-tiny"  # keeps tiny runs apart from the real ones in logs
    c.hf_model_id = ""  # no checkpoint describes it
    c.init_from = ""  # random init, then the SFT warm-up
    c.tokenizer = ""  # init_from's own tokenizer, else the built-in character one (53 ids)
    c.steps = 600  # GSPO steps: the training reward climbs from ~0.4-0.6 to ~0.8-1.0 (README)
    m.hf_config = ""  # the shapes below define it
    m.vocab_size = 64  # covers the char tokenizer, rounded up
    m.hidden_size = 64  # residual width
    m.num_layers = 2  # one scanned pair
    m.num_heads = 4  # query heads
    m.num_kv_heads = 2  # GQA kept (2 queries per kv head)
    m.head_dim = 16  # hidden_size // num_heads
    m.intermediate_size = 128  # dense SwiGLU width (2x hidden)
    m.max_position_embeddings = 128  # prompts + completions are a few dozen characters
    m.dtype = "float32"  # CPU has no fast bfloat16
    m.remat = False  # activations are tiny; recomputing only costs time
    if m.num_experts:
        m.num_experts = 8  # still routed: exercises dispatch, balance loss and routing stats
        m.num_experts_per_tok = 2  # top-2 of 8
        m.moe_intermediate_size = 32  # fine-grained experts, half the hidden width
        m.mlp_only_layers = ()  # every layer MoE
        m.shared_expert_intermediate_size = 32 if m.shared_expert_intermediate_size else 0  # as wide as an expert
    if m.full_attention_interval:  # Qwen3-Next: one group of three Gated DeltaNet layers and one attention layer
        m.num_layers = 4  # the smallest whole group
        m.full_attention_interval = 4  # layer 3 full attention
        m.linear_num_key_heads = 2  # DeltaNet query / key heads
        m.linear_num_value_heads = 4  # two value heads per key head, as released
        m.linear_key_head_dim = 16  # per key head
        m.linear_value_head_dim = 16  # per value head
    c.mesh.data = -1  # pure data parallelism over whatever devices there are
    c.mesh.fsdp = 1  # nothing worth sharding
    c.mesh.expert = 1  # 8 small experts fit everywhere
    c.mesh.tensor = 1  # no tensor parallelism
    c.optim.lr = 3e-4  # at 1e-3 the first GSPO updates collapse the entropy and the reward dips
    c.optim.warmup_steps = 100  # a fresh Adam ramps up slowly so it does not undo the warm-up
    c.optim.weight_decay = 0.0  # nothing to regularise in a 150-step demo
    c.optim.grad_accum = 1  # each minibatch is one optimizer step
    c.rl.loss = "gspo"  # the method being demonstrated
    # GSPO's 3e-4/4e-4 clips suit a pretrained policy moving ~1e-6 per step; at lr 1e-3 the sequence ratio leaves
    # that band after one minibatch and nearly every sequence would be clipped, so use the usual PPO/DAPO widths.
    c.rl.eps_low = 0.2  # lower clip of the sequence ratio
    c.rl.eps_high = 0.28  # upper clip (DAPO's clip-higher)
    c.rl.prompts_per_step = 16  # P prompts per rollout batch: fewer make the reward curve noisy
    c.rl.group_size = 8  # G completions per prompt
    c.rl.minibatches = 2  # two updates per rollout batch: the second one is off-policy, so the clip matters
    c.rl.max_new_tokens = 6  # answers are at most a few digits plus EOS
    c.rl.slots = 64  # half the 128 sequences: slots are refilled as answers end
    c.rl.logprob_chunk = 64  # whole sequences fit in one chunk
    c.rl.sft_steps = -100  # warm-up from random init (first rollouts earn ~0.3); none on init_from weights
    c.rl.sft_lr = 3e-3  # warm-up learning rate
    c.rewards = ml_collections.ConfigDict({"math": 1.0})  # numeric answer matches the reference
    c.data.source = "arithmetic"  # built-in task
    c.data.max_prompt_len = 32  # arithmetic prompts are short
    c.eval_every = 100  # steps between greedy evaluations on the held-out split
    c.checkpoint_every = 50  # steps between checkpoints
    return c


def variant(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """The config a family file returns for `--config=file.py[:arg]`: as is, or `tiny`."""
    if arg in (None, ""):
        return c
    if arg == "tiny":
        return tiny(c)
    raise ValueError(f"unknown config variant {arg!r}: expected nothing or 'tiny'")
