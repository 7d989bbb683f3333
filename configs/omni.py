"""Zen omni: the Qwen3-Omni-MoE thinker (a vision and an audio encoder feeding a Qwen3-MoE decoder with multimodal
RoPE and deepstack), 14B total / 4B active, trained with GSPO on image and audio prompts;
fits a v5p-64 slice (32 chips) with 8-way expert parallelism.

Shapes (the text decoder in Qwen3-MoE style: q width twice the hidden, head_dim 128, fine-grained top-8 experts,
untied head; the encoders are Qwen3-Omni's, projecting to the decoder's 3072):
- embedding + head 2 * 151936 * 3072 = 0.933B;
- attention 39 * 3072 * 128 * (2*48 + 2*4) = 1.595B;
- experts 39 * 56 * 3 * 3072 * 512 = 10.305B, of which 8/56 = 1.472B active; router 8.4M;
- vision 0.558B: 27 blocks of 15.3M (width 1152, mlp 4304), its merger and 3 deepstack mergers (4608 -> 4608 ->
  3072, 35.4M each), patch and position embeddings;
- audio 0.649B: 32 layers of 19.7M (width 1280, ffn 5120), convolutions and projection.
Total 14.05B (+0.3% of 14B); active per text token 4.01B (+0.2% of 4B): the encoders run on media tokens only
(`python -m zenjax.plan --config=configs/omni.py` counts them).
56 experts (7 per expert shard): with 39 layers, the count that lands both totals.

`--config=configs/omni.py:tiny` is the same thinker shrunk for a CPU demo: it learns the built-in "see_hear" task
(count the squares in an image, tell which of two tones is higher) from random init.
"""
import ml_collections

from configs import base


def get_config(arg=None):
    c = base.get_config()
    c.name = "zen-omni"  # run name shown in logs
    c.hf_model_id = "Qwen/Qwen3-Omni-14B-MoE"  # the checkpoint these shapes describe
    c.init_from = "weights/Qwen3-Omni-14B-MoE"  # `python -m convert hf-to-orbax` output (the thinker)
    c.tokenizer = "hf/Qwen3-Omni-14B-MoE"  # the downloaded HF snapshot (tokenizer files)
    c.steps = 500  # GSPO steps
    c.model = base.model_config(
        vocab_size=151936,  # Qwen tokenizer
        hidden_size=3072,  # residual width
        num_layers=39,  # decoder layers, all MoE
        num_heads=48,  # query heads (6144 wide, twice the hidden)
        num_kv_heads=4,  # GQA 12:1
        head_dim=128,  # per-head width
        intermediate_size=9216,  # dense SwiGLU width (HF config field; no layer is dense)
        tie_embeddings=False,  # separate LM head
        rope_theta=1_000_000.0,  # RoPE base
        mrope_section=(24, 20, 20),  # multimodal RoPE: time / row / column frequencies, summing to head_dim / 2
        max_position_embeddings=40960,  # trained context
        remat=True,  # recompute layers in backward
        num_experts=56,  # routed experts per layer, no shared expert
        num_experts_per_tok=8,  # top-8
        moe_intermediate_size=512,  # fine-grained experts
        norm_topk_prob=True,  # top-8 weights renormalised to sum to one
        decoder_sparse_step=1,  # every layer MoE
    )
    c.model.vision = ml_collections.ConfigDict(dict(  # zenjax.models.vision.VisionConfig
        hidden_size=1152,  # encoder width
        num_layers=27,  # transformer blocks
        num_heads=16,  # attention heads (72 wide)
        intermediate_size=4304,  # block MLP width
        patch_size=16,  # pixels per patch side
        temporal_patch_size=2,  # frames per patch (an image is repeated once)
        spatial_merge_size=2,  # 2x2 patches merge into one decoder token
        out_hidden_size=3072,  # the decoder's hidden size
        num_position_embeddings=2304,  # a 48x48 learned position grid, resampled to each image
        deepstack_visual_indexes=(8, 16, 24),  # blocks whose merged features are added after decoder layers 0-2
    ))
    c.model.audio = ml_collections.ConfigDict(dict(  # zenjax.models.audio.AudioConfig
        num_mel_bins=128,  # log-mel features per frame (10 ms)
        d_model=1280,  # encoder width
        num_layers=32,  # transformer layers
        num_heads=20,  # attention heads
        ffn_dim=5120,  # layer MLP width
        output_dim=3072,  # the decoder's hidden size
        n_window=50,  # chunks of 100 frames, 13 tokens each
        n_window_infer=800,  # attention windows of 8 chunks
        downsample_hidden_size=480,  # convolution channels
    ))
    c.model.media_tokens = ml_collections.ConfigDict(dict(  # the Qwen tokenizer's ids
        image_token_id=151655,  # one per image feature
        video_token_id=151656,  # one per video feature
        audio_token_id=151646,  # one per audio feature
        vision_start_token_id=151652,  # opens an image or video
        vision_end_token_id=151653,  # closes it
        audio_start_token_id=151647,  # opens an audio clip
        audio_end_token_id=151648,  # closes it
    ))
    c.mesh.data = 1  # no replicas
    c.mesh.fsdp = -1  # the rest of the slice shards params, grads and Adam moments
    c.mesh.expert = 8  # 7 experts per expert shard
    c.optim.lr = 1e-6  # RL of a pretrained model moves slowly
    c.rl.prompts_per_step = 64  # P prompts per rollout batch
    c.rl.group_size = 8  # G completions per prompt: 512 sequences per step
    c.rl.minibatches = 4  # 4 updates of 128 sequences per rollout batch
    c.rl.max_new_tokens = 2048  # room for a chain of thought
    # Mostly correctness; a small bonus for <think>...</think><answer>...</answer> keeps answers extractable.
    c.rewards = ml_collections.ConfigDict({"math": 1.0, "format": 0.2})
    c.data.source = "data/multimodal_train.jsonl"  # {"prompt", "answer", "images", "audios"} lines, paths relative
    c.data.images = 1  # every prompt has one image
    c.data.audios = 1  # and one audio clip
    c.data.image_size = 448  # 28x28 patches: 196 image tokens
    c.data.audio_seconds = 10.0  # 130 audio tokens
    c.data.max_prompt_len = 768  # the media's 326 tokens and the question; longer prompts are dropped
    c = base.variant(c, arg)
    if arg == "tiny":
        tiny_towers(c)
    return c


def tiny_towers(c: ml_collections.ConfigDict) -> None:
    """The encoders and the task of `omni.py:tiny`, next to base.tiny's decoder."""
    v, a, t = c.model.vision, c.model.audio, c.model.media_tokens
    v.hidden_size = 32  # encoder width
    v.num_layers = 2  # transformer blocks
    v.num_heads = 2  # attention heads
    v.intermediate_size = 64  # block MLP width
    v.out_hidden_size = c.model.hidden_size  # the decoder's
    v.num_position_embeddings = 16  # a 4x4 grid: a 64-pixel image's patches
    v.deepstack_visual_indexes = (0,)  # one deepstack addition, after decoder layer 0
    a.d_model = 32  # encoder width
    a.num_layers = 2  # transformer layers
    a.num_heads = 2  # attention heads
    a.ffn_dim = 64  # layer MLP width
    a.output_dim = c.model.hidden_size  # the decoder's
    a.downsample_hidden_size = 8  # convolution channels
    # The char tokenizer's 56 ids are followed by the media tokens, which the sampler never emits (vocab_limit).
    t.image_token_id, t.video_token_id, t.audio_token_id = 56, 57, 58
    t.vision_start_token_id, t.vision_end_token_id, t.audio_start_token_id, t.audio_end_token_id = 59, 60, 61, 62
    c.model.mrope_section = (2, 3, 3)  # head_dim 16: 8 frequencies
    c.rl.max_new_tokens = 3  # one character and EOS
    c.rewards = ml_collections.ConfigDict({"exact": 1.0})  # the answer is one character
    c.data.source = "see_hear"  # built-in multimodal task
    c.data.image_size = 64  # 4x4 patches: 4 image tokens
    c.data.audio_seconds = 0.5  # the two tones: 50 frames, 7 audio tokens
    c.data.max_prompt_len = 32  # BOS, 6 + 11 media tokens and the question
