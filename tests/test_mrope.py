"""Multimodal RoPE against transformers' Qwen3-Omni-MoE thinker (get_rope_index, text rotary embedding)."""
import functools
import types

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as hf
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import (
    Qwen3OmniMoeTextConfig, Qwen3OmniMoeThinkerConfig)

from zenjax.models.audio import output_lengths
from zenjax.models.mrope import MRopeConfig, rope_index
from zenjax.models.qwen3 import apply_mrope
from zenjax.models.qwen3 import rope

# Small ids and non-default sizes, so a mixed-up id or an ignored setting shows.
CFG = MRopeConfig(image_token_id=5, video_token_id=6, audio_token_id=7, vision_start_token_id=8,
                  audio_start_token_id=9, spatial_merge_size=2, position_id_per_seconds=13, n_window=50)
VISION_END, AUDIO_END, PAD = 10, 11, 0
RNG = np.random.default_rng(0)


def _hf_stub():
    """The smallest `self` HF's get_rope_index needs: the thinker config and spatial_merge_size."""
    config = Qwen3OmniMoeThinkerConfig(
        image_token_id=CFG.image_token_id, video_token_id=CFG.video_token_id, audio_token_id=CFG.audio_token_id,
        vision_start_token_id=CFG.vision_start_token_id, audio_start_token_id=CFG.audio_start_token_id,
        position_id_per_seconds=CFG.position_id_per_seconds, audio_config={"n_window": CFG.n_window})
    stub = types.SimpleNamespace(config=config, spatial_merge_size=CFG.spatial_merge_size)
    cls = hf.Qwen3OmniMoePreTrainedModelForConditionalGeneration
    stub.get_llm_pos_ids_for_vision = functools.partial(cls.get_llm_pos_ids_for_vision, stub)
    return stub, functools.partial(cls.get_rope_index, stub)


STUB, HF_ROPE_INDEX = _hf_stub()


def text(n):
    return list(RNG.integers(20, 100, n))


def image(grid):
    return [CFG.vision_start_token_id] + [CFG.image_token_id] * (int(np.prod(grid)) // 4) + [VISION_END]


def video(grid):
    return [CFG.vision_start_token_id] + [CFG.video_token_id] * (int(np.prod(grid)) // 4) + [VISION_END]


def audio(frames):
    return [CFG.audio_start_token_id] + [CFG.audio_token_id] * int(output_lengths(frames, CFG.n_window)) + [AUDIO_END]


def audio_in_video(grid, frames):
    n_audio = int(output_lengths(frames, CFG.n_window))
    body = [CFG.video_token_id] * (int(np.prod(grid)) // 4) + [CFG.audio_token_id] * n_audio
    return [CFG.vision_start_token_id, CFG.audio_start_token_id] + body + [AUDIO_END, VISION_END]


def batch(rows, left=True):
    T = max(map(len, rows))
    ids, mask = np.full((len(rows), T), PAD), np.zeros((len(rows), T), np.int64)
    for b, r in enumerate(rows):
        sl = slice(T - len(r), T) if left else slice(0, len(r))
        ids[b, sl], mask[b, sl] = r, 1
    return ids, mask


def _t(a, dtype=torch.long):
    return None if a is None else torch.tensor(np.asarray(a), dtype=dtype)


def check(rows, left=True, images=None, videos=None, audios=None, seconds=None, in_video=False):
    ids, mask = batch(rows, left)
    pos, deltas = rope_index(ids, mask, images, videos, audios, seconds, in_video, CFG)
    want_pos, want_deltas = HF_ROPE_INDEX(_t(ids), _t(images), _t(videos), _t(mask), in_video, _t(audios),
                                          _t(seconds, torch.float32))
    assert pos.shape == (3, *ids.shape) and deltas.shape == (len(rows), 1)
    assert pos.dtype == deltas.dtype == np.float32
    np.testing.assert_array_equal(pos, want_pos.numpy())
    np.testing.assert_array_equal(deltas, want_deltas.numpy())
    return pos, deltas, mask


def test_text_only():
    check([text(7), text(4)], left=True)
    check([text(7), text(1)], left=False)


def test_one_image():
    check([text(3) + image((1, 4, 6)) + text(5)], images=[[1, 4, 6]])


def test_two_images_different_grids():
    # The second image has two temporal steps: HF steps its time row by position_id_per_seconds.
    check([text(2) + image((1, 4, 6)) + text(3) + image((2, 6, 4)) + text(2)], images=[[1, 4, 6], [2, 6, 4]])


def test_video_two_temporal_grids():
    # 2/24 s per grid step: fractional time positions, and text after them continues from a fraction.
    check([text(3) + video((2, 4, 4)) + text(4)], videos=[[2, 4, 4]], seconds=[2 / 24])
    check([text(1) + video((2, 4, 6)) + text(2) + video((3, 2, 2)) + text(1)], videos=[[2, 4, 6], [3, 2, 2]],
          seconds=[1.0, 0.5])


def test_audio_and_text():
    # Without image/video grids HF takes the 1-D text path, audio included; with one it takes the 3-D path.
    check([text(2) + audio(250) + text(3), text(1) + audio(37) + text(1)], audios=[250, 37])
    check([text(2) + audio(250) + text(1) + image((1, 2, 2)) + text(2)], images=[[1, 2, 2]], audios=[250])


@pytest.mark.parametrize("left", [True, False])
def test_padded_mixed_batch(left):
    rows = [text(2) + image((1, 4, 4)) + audio(90) + text(3),
            text(1) + video((2, 4, 4)) + text(2) + image((1, 2, 6)) + text(1),
            text(5),
            audio(61) + text(2)]
    pos, deltas, mask = check(rows, left=left, images=[[1, 4, 4], [1, 2, 6]], videos=[[2, 4, 4]],
                              audios=[90, 61], seconds=[0.75])
    assert (pos[:, mask == 0] == 0).all()


@pytest.mark.parametrize("grid,frames,seconds", [((3, 4, 4), 300, 1.0), ((3, 4, 4), 100, 1.0),
                                                  ((3, 4, 4), 700, 1.0), ((2, 16, 16), 37, 0.04)])
def test_audio_in_video(grid, frames, seconds):
    # Audio ends inside, at, or after the video. Last case: HF starts <audio_end> after the audio tail's max,
    # below the video's row/column maximum, so those positions overlap; matched as is.
    rows = [text(2) + audio_in_video(grid, frames) + text(3), text(4)]
    check(rows, videos=[grid], audios=[frames], seconds=[seconds], in_video=True)


def test_decode_positions_use_deltas():
    # HF's thinker while decoding: text position (valid tokens before) + delta; the first one gets max + 1.
    rows = [text(2) + image((1, 4, 6)) + text(3), text(1) + video((2, 4, 4)) + text(1)]
    ids, mask = batch(rows)
    pos, deltas = rope_index(ids, mask, [[1, 4, 6]], [[2, 4, 4]], None, [1.0], False, CFG)
    mask1 = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
    model = types.SimpleNamespace(rope_deltas=torch.tensor(deltas))
    cache = types.SimpleNamespace(get_seq_length=lambda: ids.shape[1])
    got = hf.Qwen3OmniMoeThinkerModel.compute_3d_position_ids(
        model, _t(ids[:, -1:]), None, None, torch.zeros(2, 1, 4), _t(mask1), cache=cache)
    first_3B = got[:, :, -1].numpy()
    np.testing.assert_array_equal(first_3B, np.broadcast_to(mask.sum(1) + deltas[:, 0], (3, 2)))
    np.testing.assert_array_equal(first_3B, np.broadcast_to(pos.max(axis=(0, 2)) + 1, (3, 2)))


def _hf_rotary(x, pos, theta, section):
    d = x.shape[-1]
    rope_parameters = {"rope_type": "default", "rope_theta": theta, "mrope_section": section}
    cfg = Qwen3OmniMoeTextConfig(head_dim=d, hidden_size=2 * d, num_attention_heads=2, rope_parameters=rope_parameters)
    xt = torch.tensor(np.asarray(x))
    cos, sin = hf.Qwen3OmniMoeThinkerTextRotaryEmbedding(cfg)(xt, torch.tensor(pos))
    return hf.apply_rotary_pos_emb(xt, xt, cos, sin, unsqueeze_dim=2)[0].numpy()


@pytest.mark.parametrize("d,section", [(128, [24, 20, 20]), (32, [6, 5, 5]), (32, [4, 4, 4])])
def test_apply_mrope_matches_transformers(d, section):
    rows = [text(2) + image((1, 4, 6)) + text(2) + video((2, 4, 4)) + text(1), text(3) + image((1, 2, 2))]
    ids, mask = batch(rows)
    pos, _ = rope_index(ids, mask, [[1, 4, 6], [1, 2, 2]], [[2, 4, 4]], None, [2 / 24], False, CFG)
    x = RNG.standard_normal((2, ids.shape[1], 2, d)).astype(np.float32)
    # Same float32 ops on both sides; 1e-5 leaves room for pow/sin/cos ulps at angles of a few hundred radians.
    np.testing.assert_allclose(apply_mrope(x, pos, 1e6, section), _hf_rotary(x, pos, 1e6, section), atol=1e-5)


def test_equal_rows_is_rope():
    x = jnp.asarray(RNG.standard_normal((2, 9, 3, 16)), jnp.bfloat16)
    p = RNG.integers(0, 500, (2, 9))
    out = apply_mrope(x, np.stack([p] * 3), 1e4, (3, 3, 2))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(rope(x, jnp.asarray(p), 1e4), np.float32))
