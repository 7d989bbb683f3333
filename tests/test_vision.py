"""The Qwen3-Omni vision encoder against transformers' Qwen3OmniMoeVisionEncoder (float32, random weights)."""
import jax
import numpy as np
import pytest
import torch
from flax import nnx
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeVisionEncoderConfig
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeVisionEncoder

from zenjax.models.vision import VisionConfig, VisionEncoder, from_hf, to_hf

PREFIX = "thinker.visual."
# A 4x4 learned position grid: every test grid below differs from it, so the bilinear resampling is exercised
# (upsampling, downsampling, non-square); deepstack taps at the first and the last layer.
HF_KW = dict(depth=3, hidden_size=32, num_heads=2, intermediate_size=40, patch_size=4, spatial_merge_size=2,
             temporal_patch_size=2, out_hidden_size=48, num_position_embeddings=16, deepstack_visual_indexes=[0, 2])


@pytest.fixture(scope="module")
def hf_tower():
    config = Qwen3OmniMoeVisionEncoderConfig(**HF_KW)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = Qwen3OmniMoeVisionEncoder(config).float().eval()
    # Biases start at zero and norms at one; perturb every tensor so a mis-wired one cannot pass.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tensors = {PREFIX + k: v.numpy() for k, v in model.state_dict().items()}
    return config, model, tensors


@pytest.fixture(scope="module")
def ours(hf_tower):
    config, _, tensors = hf_tower
    cfg = VisionConfig.from_hf(config.to_dict(), dtype="float32")
    model = VisionEncoder(cfg, rngs=nnx.Rngs(0))
    nnx.update(model, from_hf(cfg, {**tensors, "thinker.model.embed_tokens.weight": np.zeros(3)}))
    return cfg, model


# Attention runs on frames padded to the largest: same_size_plus_one pads three of four, the odd one mid-batch.
@pytest.mark.parametrize("grid", [[[1, 6, 8]], [[1, 2, 6], [1, 8, 4]], [[2, 4, 6]],
                                  [[1, 4, 4], [1, 4, 4], [1, 6, 4], [1, 4, 4]]],
                         ids=["one_image", "two_images", "video_t2", "same_size_plus_one"])
def test_matches_transformers(hf_tower, ours, grid):
    _, ref, _ = hf_tower
    cfg, model = ours
    n = int(np.prod(grid, axis=1).sum())
    pixels = np.random.default_rng(0).standard_normal((n, cfg.patch_dim)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.tensor(pixels), grid_thw=torch.tensor(grid))
    got = jax.jit(lambda m, x: m(x, grid))(model, pixels)
    # float32 on both sides; three blocks of float32 matmuls in a different summation order differ by ~1e-6
    # relative, far inside 1e-4.
    tol = dict(atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(got.merged_MO), want.pooler_output.numpy(), **tol)
    np.testing.assert_allclose(np.asarray(got.hidden_NE), want.last_hidden_state.numpy(), **tol)
    assert len(got.deepstack) == len(want.deepstack_features) == 2
    for g, w in zip(got.deepstack, want.deepstack_features):
        np.testing.assert_allclose(np.asarray(g), w.numpy(), **tol)
    assert got.merged_MO.shape == (n // cfg.spatial_merge_size ** 2, cfg.out_hidden_size)


def test_hf_round_trip_is_exact_and_complete(hf_tower):
    config, _, tensors = hf_tower
    cfg = VisionConfig.from_hf(config.to_dict())
    back = to_hf(cfg, from_hf(cfg, tensors))
    assert back.keys() == tensors.keys()
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and np.array_equal(back[k], v), k
    missing = dict(tensors)
    del missing[PREFIX + "blocks.1.attn.qkv.bias"]
    with pytest.raises(ValueError, match="blocks.1.attn.qkv.bias"):
        from_hf(cfg, missing)
    with pytest.raises(ValueError, match="not part of this vision tower"):
        from_hf(cfg, {**tensors, PREFIX + "blocks.3.norm1.weight": np.ones(32)})


def test_config_accepts_hub_key_aliases(hf_tower):
    config, _, _ = hf_tower
    new = VisionConfig.from_hf(config.to_dict())
    hub = dict(HF_KW, in_chans=3, spatial_patch_size=4, num_hidden_layers=3, rope_theta=10000.0)
    for k in ("depth", "patch_size"):
        del hub[k]
    assert VisionConfig.from_hf({"thinker_config": {"vision_config": hub}}) == new
    assert new.num_layers == 3 and new.deepstack_visual_indexes == (0, 2) and new.rope_theta == 10000.0
