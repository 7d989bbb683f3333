"""The Qwen3-Omni audio encoder against transformers' Qwen3OmniMoeAudioEncoder (float32, random weights)."""
import jax
import numpy as np
import pytest
import torch
from flax import nnx
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeAudioEncoderConfig
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (Qwen3OmniMoeAudioEncoder,
                                                                         _get_feat_extract_output_lengths)

from zenjax.models.audio import AudioConfig, AudioEncoder, audio_layout, from_hf, output_lengths, to_hf

PREFIX = "thinker.audio_tower."
# n_window must stay 50: HF counts 13 tokens per full chunk whatever n_window is. n_window_infer 200 makes attention
# windows of two chunks (26 tokens), so a long audio spans several windows.
HF_CFG = dict(num_mel_bins=16, encoder_layers=3, encoder_attention_heads=2, encoder_ffn_dim=64, d_model=32,
              output_dim=48, n_window=50, n_window_infer=200, downsample_hidden_size=8, max_source_positions=64)


@pytest.fixture(scope="module")
def hf():
    torch.manual_seed(0)
    model = Qwen3OmniMoeAudioEncoder(Qwen3OmniMoeAudioEncoderConfig(**HF_CFG)).float().eval()
    # HF's init (weights of std 0.02, zero biases, unit norms) leaves the signal too small to show a mis-wired bias
    # or the conv's padding (whose gelu(bias) reaches the last tokens): weights of std 1/sqrt(fan_in), random rest.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.normal_(0.0, p[0].numel() ** -0.5)
            else:
                p.copy_(("weight" in name) + 0.3 * torch.randn_like(p))
    tensors = {PREFIX + k: v.numpy() for k, v in model.state_dict().items()}
    return model, tensors


@pytest.fixture(scope="module")
def ours(hf):
    cfg = AudioConfig.from_hf(HF_CFG, dtype="float32")
    model = nnx.eval_shape(lambda: AudioEncoder(cfg, rngs=nnx.Rngs(0)))  # shapes only: from_hf gives the values
    nnx.update(model, from_hf(cfg, hf[1]))
    return model


# 77: one short chunk; 250 + 137: several chunks, tails of 50 and 37 frames, the first audio over two windows;
# 200 + 60: a whole number of chunks next to a short audio.
@pytest.mark.parametrize("lens", [[77], [250, 137], [200, 60]])
def test_outputs_match_transformers(hf, ours, lens):
    feats = np.random.default_rng(sum(lens)).standard_normal((16, sum(lens))).astype(np.float32)
    with torch.no_grad():
        want = hf[0](torch.tensor(feats), feature_lens=torch.tensor(lens)).last_hidden_state.numpy()
    got = jax.jit(lambda m, x, layout: m(x, layout))(ours, feats, audio_layout(ours.cfg, lens))
    assert got.shape == want.shape == (int(output_lengths(np.array(lens)).sum()), 48)
    # float32 on both sides; the tolerance covers rounding accumulated over the convs and three layers.
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)


def test_to_hf_inverts_from_hf(hf, ours):
    tensors = hf[1]
    back = to_hf(ours.cfg, from_hf(ours.cfg, tensors))
    assert back.keys() == tensors.keys()
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k
    assert to_hf(ours.cfg, nnx.state(ours).to_pure_dict()).keys() == tensors.keys()


def test_from_hf_names_missing_and_unused_tensors(hf, ours):
    tensors = dict(hf[1])
    with pytest.raises(ValueError, match="unused"):
        from_hf(ours.cfg, {**tensors, PREFIX + "unused.weight": np.zeros(1)})
    del tensors[PREFIX + "layers.2.fc1.bias"]
    with pytest.raises(ValueError, match=r"'thinker\.audio_tower\.layers\.2\.fc1\.bias' is missing"):
        from_hf(ours.cfg, tensors)


def test_output_lengths_match_transformers():
    lens = np.arange(1, 1001)
    np.testing.assert_array_equal(output_lengths(lens), _get_feat_extract_output_lengths(torch.tensor(lens)).numpy())


def test_config_from_hf_dict():
    cfg = AudioConfig.from_hf(Qwen3OmniMoeAudioEncoderConfig(**HF_CFG).to_dict())
    assert (cfg.num_layers, cfg.num_heads, cfg.ffn_dim, cfg.d_model, cfg.n_window_infer) == (3, 2, 64, 32, 200)
    assert cfg.conv_features == 8 * 2  # 16 mel bins -> 8 -> 4 -> 2
    assert AudioConfig.from_hf({}) == AudioConfig()  # HF's defaults
