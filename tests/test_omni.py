"""The Qwen3-Omni-MoE thinker against transformers' Qwen3OmniMoeThinkerForConditionalGeneration (float32, random
weights): text, images, video, audio and a left-padded mix of them; the HF weight mapping and config."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeThinkerConfig
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeThinkerForConditionalGeneration

from zenjax.models import KVCache, sequence_logprobs
from zenjax.models.audio import output_lengths
from zenjax.models.omni import OmniConfig, OmniThinker, RowLayout, from_hf, placement, row_media, to_hf

IMAGE, VIDEO, AUDIO, V_START, V_END, A_START, A_END, PAD = range(290, 298)
# Three decoder layers and two deepstack taps: the decoder's scan is split after layer 1. mrope_section sums to
# head_dim / 2; position_id_per_seconds 13 with 0.5 s per video grid step gives fractional time positions.
HF_CFG = dict(
    text_config=dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                      "interleaved": True}),
    vision_config=dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=40, patch_size=4, out_hidden_size=32,
                       num_position_embeddings=16, deepstack_visual_indexes=[0, 1]),
    audio_config=dict(num_mel_bins=16, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64, d_model=32,
                      output_dim=32, downsample_hidden_size=8, max_source_positions=64),
    image_token_id=IMAGE, video_token_id=VIDEO, audio_token_id=AUDIO, vision_start_token_id=V_START,
    audio_start_token_id=A_START, vision_end_token_id=V_END, audio_end_token_id=A_END, position_id_per_seconds=13)
RNG = np.random.default_rng(0)


def random_thinker():
    """The tiny HF thinker with weights of std 1/sqrt(fan_in) and random norms and biases: HF's init (std 0.02,
    zero biases, unit norms) leaves features too small to show a misplaced one."""
    torch.manual_seed(0)
    model = Qwen3OmniMoeThinkerForConditionalGeneration(Qwen3OmniMoeThinkerConfig(**HF_CFG)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.normal_(0.0, (p.shape[-1] if "experts" in name else p[0].numel()) ** -0.5)
            else:
                p.copy_(("weight" in name) + 0.2 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    model = random_thinker()
    path = tmp_path_factory.mktemp("thinker")
    model.save_pretrained(path)  # the names a checkpoint has: transformers 5 renames (and unfuses experts) on save
    return model, load_file(str(path / "model.safetensors")), path


@pytest.fixture(scope="module")
def ours(hf):
    cfg = OmniConfig.from_hf(hf[2], dtype="float32")  # the saved config.json
    model = nnx.eval_shape(lambda: OmniThinker(cfg, rngs=nnx.Rngs(0)))  # shapes only: from_hf gives the values
    nnx.update(model, from_hf(cfg, hf[1], prefix=""))
    return model


def text(n):
    return list(RNG.integers(0, 280, n))


def vision(grid, token=IMAGE):  # t*h*w / merge**2 placeholders
    return [V_START] + [token] * (int(np.prod(grid)) // 4) + [V_END]


def audio(frames):
    return [A_START] + [AUDIO] * int(output_lengths(np.array(frames))) + [A_END]


def left_pad(rows):
    T = max(map(len, rows))
    ids, mask = np.full((len(rows), T), PAD), np.zeros((len(rows), T), bool)
    for b, r in enumerate(rows):
        ids[b, T - len(r):], mask[b, T - len(r):] = r, True
    return ids, mask


G1, G2, GV = [1, 4, 6], [1, 2, 4], [2, 4, 4]  # two image sizes (6 and 2 tokens) and a 2-frame video (8 tokens)
CASES = {
    "text": dict(rows=[text(9), text(5)]),
    "images": dict(rows=[text(3) + vision(G1) + text(4), text(2) + vision(G2) + text(3)], images=[G1, G2]),
    "video": dict(rows=[text(3) + vision(GV, VIDEO) + text(2)], videos=[GV]),
    "audio": dict(rows=[text(2) + audio(150) + text(3), text(4) + audio(77) + text(1)], audios=[150, 77]),
    "mixed": dict(rows=[text(2) + vision(G2) + text(2) + audio(77) + text(2), text(1) + vision(GV, VIDEO) + text(3),
                        text(4)], images=[G2], videos=[GV], audios=[77]),
    # A video's own audio: <vision_start><audio_start> video and audio placeholders <audio_end><vision_end>.
    "audio_in_video": dict(rows=[text(2) + [V_START] + audio(77)[:-1] + vision(GV, VIDEO)[1:-1] + [A_END, V_END]],
                           videos=[GV], audios=[77], in_video=True),
}


def inputs(rows, images=None, videos=None, audios=None, in_video=False):
    """(input_ids, mask) and the media keyword arguments of our thinker and of HF's, random pixels and mel frames."""
    ids, mask = left_pad(rows)
    ours, theirs = ({"use_audio_in_video": True}, {"use_audio_in_video": True}) if in_video else ({}, {})
    for grids, px, g, extra in ((images, "pixel_values", "image_grid_thw", {}),
                                (videos, "pixel_values_videos", "video_grid_thw", {"video_second_per_grid": [0.5]})):
        if grids:
            pixels = RNG.standard_normal((int(np.prod(grids, axis=1).sum()), 96)).astype(np.float32)
            ours.update({px: pixels, g: grids, **extra})
            theirs.update({px: torch.tensor(pixels), g: torch.tensor(grids),
                           **{k: torch.tensor(v) for k, v in extra.items()}})
    if audios:
        feats = [RNG.standard_normal((16, n)).astype(np.float32) for n in audios]
        ours.update(input_features=np.concatenate(feats, axis=1), feature_lens=audios)
        padded, fmask = np.zeros((len(audios), 16, max(audios)), np.float32), np.zeros((len(audios), max(audios)))
        for i, f in enumerate(feats):  # HF's processor pads the clips and masks the padding
            padded[i, :, :f.shape[1]], fmask[i, :f.shape[1]] = f, 1
        theirs.update(input_features=torch.tensor(padded), feature_attention_mask=torch.tensor(fmask, dtype=torch.long))
    return ids, mask, ours, theirs


def forward(model, ids, mask, kw):
    """Our logits and aux: the placement on the host, then the jitted forward (grids static, as a sampler runs it)."""
    host = ("video_second_per_grid", "feature_lens", "use_audio_in_video")
    p = placement(model.cfg, ids, mask, **{k: kw.pop(k) for k in host if k in kw},
                  **{k: kw[k] for k in ("image_grid_thw", "video_grid_thw") if k in kw})
    grids = {k: tuple(map(tuple, kw.pop(k))) for k in ("image_grid_thw", "video_grid_thw") if k in kw}
    return jax.jit(lambda m, ids, mask, p, media: m.forward(ids, mask, p, **media, **grids))(model, ids, mask, p, kw)


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(hf, ours, case):
    ids, mask, kw, hf_kw = inputs(**CASES[case])
    with torch.no_grad():
        want = hf[0](input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask, dtype=torch.long),
                     **hf_kw).logits.numpy()
    got, aux = forward(ours, ids, mask, kw)
    # float32 on both sides: encoders and three MoE layers in another summation order differ by ~1e-6 relative
    # on logits of order one. Padding's logits are not compared (HF's are garbage from fully masked rows too).
    np.testing.assert_allclose(np.asarray(got)[mask], want[mask], atol=1e-4, rtol=1e-4)
    # Routing statistics of the three layers, in order, though the decoder's scan is split for deepstack.
    assert aux["expert_counts"].shape == (3, 4) and np.all(np.asarray(aux["expert_counts"]).sum(1) == 2 * mask.sum())


def test_eager_call_and_placeholder_counts(ours):
    ids, mask, kw, _ = inputs(**CASES["text"])
    np.testing.assert_allclose(np.asarray(ours(ids, mask)[0]), np.asarray(forward(ours, ids, mask, kw)[0]), atol=1e-6)
    ids, mask, kw, _ = inputs(**CASES["mixed"])
    with pytest.raises(ValueError, match=r"2 image placeholder tokens \(id 290\) but 6 image features"):
        placement(ours.cfg, ids, mask, image_grid_thw=[G1], video_grid_thw=[GV], video_second_per_grid=[0.5])
    with pytest.raises(ValueError, match="10 audio placeholder tokens .* but 20 audio features"):
        placement(ours.cfg, ids, mask, feature_lens=[150])


def test_cached_prefill_then_decode_matches_transformers(hf, ours):
    """The sampler's way: prefill a cache (deepstack splits its scan), then one step at text index + rope delta."""
    ids, mask, kw, hf_kw = inputs(**CASES["mixed"])
    new = np.array([[7], [8], [9]])
    with torch.no_grad():
        want = hf[0](input_ids=torch.tensor(np.concatenate([ids, new], 1)), **hf_kw,
                     attention_mask=torch.tensor(np.concatenate([mask, new > 0], 1), dtype=torch.long)).logits.numpy()
    p = placement(ours.cfg, ids, mask, image_grid_thw=[G2], video_grid_thw=[GV], video_second_per_grid=[0.5],
                  feature_lens=[77])
    media = {k: kw[k] for k in ("pixel_values", "pixel_values_videos", "input_features")}

    def prefill_and_step(m, ids, mask, p, media):
        x, deep = m.embed(ids, p, **media, image_grid_thw=(tuple(G2),), video_grid_thw=(tuple(GV),))
        B, T = ids.shape
        out = m.text.hidden(None, mask, p.positions_3BT, KVCache.init(m.cfg.text, B, T + 1), embeds_BTE=x,
                            deepstack=deep)
        pos_3B1 = jnp.broadcast_to(mask.sum(1, keepdims=True) + p.rope_deltas_B1, (3, B, 1))
        return m.text.logits(out.hidden_BTE), m.text.logits(m.text.hidden(new, None, pos_3B1, out.cache).hidden_BTE)

    prompt, step = jax.jit(prefill_and_step)(ours, ids, mask, p, media)
    np.testing.assert_allclose(np.asarray(prompt)[mask], want[:, :-1][mask], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(step[:, 0]), want[:, -1], atol=1e-4, rtol=1e-4)


def test_hf_weights_round_trip_exactly(hf, ours):
    tensors = hf[1]  # every tensor of the saved checkpoint, by its saved name
    back = to_hf(ours.cfg, from_hf(ours.cfg, tensors, prefix=""), prefix="")
    assert back.keys() == tensors.keys()
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k
    # The hub's names carry "thinker."; the talker's tensors beside them are not the thinker's concern.
    hub = {"thinker." + k: v for k, v in tensors.items()}
    assert to_hf(ours.cfg, nnx.to_pure_dict(nnx.state(ours, nnx.Param))).keys() == hub.keys()
    from_hf(ours.cfg, hub | {"talker.model.norm.weight": np.ones(3)})
    with pytest.raises(ValueError, match=r"unexpected tensors \['model.layers.3.input_layernorm.weight'\]"):
        from_hf(ours.cfg, hub | {"thinker.model.layers.3.input_layernorm.weight": np.ones(32)})
    del hub["thinker.model.layers.2.mlp.experts.3.up_proj.weight"]
    with pytest.raises(ValueError, match=r"missing tensors \['model.layers.2.mlp.experts.3.up_proj.weight'\]"):
        from_hf(ours.cfg, hub)


def test_config_round_trips_through_transformers(hf, ours):
    cfg = OmniConfig.from_hf(hf[0].config.to_dict())
    t = cfg.text
    assert (t.num_layers, t.num_experts, t.num_experts_per_tok, t.norm_topk_prob, t.tie_embeddings) == (3, 4, 2, 1, 0)
    assert (t.mrope_section, t.rope_theta, cfg.vision.deepstack_visual_indexes) == ((2, 3, 3), 10000.0, (0, 1))
    assert (cfg.mrope.image_token_id, cfg.mrope.position_id_per_seconds, cfg.audio_end_token_id) == (IMAGE, 13, A_END)
    assert OmniConfig.from_hf(Qwen3OmniMoeThinkerConfig(**cfg.to_hf()).to_dict()) == cfg
    assert OmniConfig.from_hf({"thinker_config": cfg.to_hf()}, dtype="float32") == ours.cfg  # a whole model's
    # The hub's key style: rope_scaling, rope_theta beside it, num_local_experts.
    hub = cfg.to_hf()
    text = hub["text_config"]
    theta = text.pop("rope_parameters")["rope_theta"]
    text.update(rope_scaling={"mrope_section": [2, 3, 3], "interleaved": True, "mrope_interleaved": True,
                              "rope_type": "default"}, rope_theta=theta, num_local_experts=text.pop("num_experts"))
    assert OmniConfig.from_hf(hub) == cfg


def test_training_rows_match_transformers(hf, ours):
    """The trainer's way: left-padded prompts with one image and one audio each (one layout for every row), then
    completions with padding after their ends; log-probs of every valid target equal HF's on each row alone."""
    layout = RowLayout(image_grids=(tuple(G2),), audio_frames=(77,))
    prompts = [text(n) + vision(G2) + text(2) + audio(77) + text(1) for n in (3, 1, 4)]
    completions = [text(5), text(2), text(4)]
    ids_PL, mask_PL = left_pad(prompts)
    P, L, M = *ids_PL.shape, 5
    ids = np.full((P, L + M), PAD)
    ids[:, :L] = ids_PL
    mask = np.concatenate([mask_PL, np.zeros((P, M), bool)], 1)
    for b, c in enumerate(completions):
        ids[b, L:L + len(c)], mask[b, L:L + len(c)] = c, True
    pixels = RNG.standard_normal((P, 2 * 4, 96)).astype(np.float32)  # [1, 2, 4] patches of 96 values per image
    feats = RNG.standard_normal((P, 16, 77)).astype(np.float32)
    media = row_media(ours.cfg, ids_PL, mask_PL, layout, pixels, feats)
    got = jax.jit(lambda m, ids, mask, media: sequence_logprobs(m, ids, mask, media=media, layout=layout)[0])(
        ours, ids, mask, media)
    for b in range(P):
        row = ids[b][mask[b]]
        with torch.no_grad():
            # HF computes multimodal positions only when given an attention mask.
            logits = hf[0](input_ids=torch.tensor(row[None]), pixel_values=torch.tensor(pixels[b]),
                           attention_mask=torch.ones((1, len(row)), dtype=torch.long),
                           image_grid_thw=torch.tensor([G2]), input_features=torch.tensor(feats[b][None]),
                           feature_attention_mask=torch.ones((1, 77), dtype=torch.long)).logits[0]
        want = torch.log_softmax(logits[:-1].double(), -1).gather(1, torch.tensor(row[1:])[:, None])[:, 0].numpy()
        # float32 log-probs of order one through both encoders and three MoE layers: ~1e-6 relative apart.
        np.testing.assert_allclose(np.asarray(got)[b][mask[b, 1:] & mask[b, :-1]], want, atol=1e-4, rtol=1e-4)
