"""The samplers on multimodal prompts: the Omni thinker's greedy generation against transformers' generate on a
left-padded batch of an image prompt and an audio prompt (the static sampler) and of prompts with one image and one
audio each (the continuous engine, the rollout's layout), and the log-probs against a teacher-forced forward."""
import jax
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file

from tests.test_omni import (
    G1,
    G2,
    PAD,
    audio,
    forward,
    inputs,
    left_pad,
    random_thinker,
    text,
    vision,
)
from zenjax import engine
from zenjax.models.omni import OmniConfig, OmniThinker, RowLayout, from_hf, row_media
from zenjax.sampling import sample, sample_multimodal

NEW = 6
TEXT = 280  # ids below the special tokens: a completion holding a placeholder id would be media to the forward


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    ref = random_thinker()
    path = tmp_path_factory.mktemp("thinker")
    ref.save_pretrained(path)
    cfg = OmniConfig.from_hf(path, dtype="float32")
    model = nnx.eval_shape(lambda: OmniThinker(cfg, rngs=nnx.Rngs(0)))
    nnx.update(model, from_hf(cfg, load_file(str(path / "model.safetensors")), prefix=""))
    return ref, model


@pytest.fixture(scope="module")
def batch():
    rows = [text(3) + vision(G1) + text(4), text(2) + audio(150) + text(3)]
    return rows, inputs(rows, images=[G1], audios=[150])


def _media(kw):
    return {k: kw[k] for k in ("pixel_values", "image_grid_thw", "input_features", "feature_lens")}


def _teacher_forced(model, out, kw, G):
    """The log-probs of the completions from one forward pass over prompt + completion, the whole sequence's
    placement: rows [p0 s0..s(G-1), p1 ...], so each medium repeats G times, in order."""
    tokens = np.asarray(out.tokens)
    ids = np.concatenate([np.asarray(out.prompt_tokens), tokens], 1)
    mask = np.concatenate([np.asarray(out.prompt_mask), np.asarray(out.mask)], 1)
    media = {"pixel_values": np.concatenate([kw["pixel_values"]] * G), "image_grid_thw": list(kw["image_grid_thw"]) * G,
             "input_features": np.concatenate([kw["input_features"]] * G, axis=1),
             "feature_lens": list(kw["feature_lens"]) * G}
    logits, _ = forward(model, ids, mask, media)
    logp_NMV = np.asarray(jax.nn.log_softmax(logits[:, out.prompt_tokens.shape[1] - 1:-1], axis=-1))
    return np.where(np.asarray(out.mask), np.take_along_axis(logp_NMV, tokens[..., None], -1)[..., 0], 0.0)


def test_greedy_equals_transformers_generate(models, batch):
    ref, model = models
    rows, (ids, mask, kw, hf_kw) = batch
    with torch.no_grad():
        want = ref.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask, dtype=torch.long), **hf_kw,
                            do_sample=False, max_new_tokens=NEW, pad_token_id=PAD, eos_token_id=None,
                            use_audio_in_video=False,
                            suppress_tokens=list(range(TEXT, 300)))[:, ids.shape[1]:].numpy()
    out = sample_multimodal(model, rows, _media(kw), max_new_tokens=NEW, rng=None, greedy=True, pad_id=PAD,
                            vocab_limit=TEXT)
    assert out.tokens.shape == (2, NEW) and np.asarray(out.mask).all()
    np.testing.assert_array_equal(np.asarray(out.tokens), want)
    np.testing.assert_allclose(np.asarray(out.logprobs), _teacher_forced(model, out, kw, 1), atol=1e-4)


def test_samples_share_the_prefill_and_their_logprobs_are_the_models(models, batch):
    _, model = models
    rows, (_, _, kw, _) = batch
    out = sample_multimodal(model, rows, _media(kw), num_samples=2, max_new_tokens=NEW, rng=jax.random.key(1),
                            pad_id=PAD, vocab_limit=TEXT)
    tokens = np.asarray(out.tokens)
    assert tokens.shape == (4, NEW) and not np.array_equal(tokens[0::2], tokens[1::2])  # distinct samples
    np.testing.assert_allclose(np.asarray(out.logprobs), _teacher_forced(model, out, kw, 2), atol=1e-4)


def test_engine_with_media_equals_transformers_generate(models):
    """Three prompts of the rollout layout (one image, one audio each) through 2 slots, 2 samples each: every
    refill prefills its prompts' media, and each greedy sample equals HF's generation for its prompt; so does the
    static sampler's."""
    ref, model = models
    rows = [text(n) + vision(G2) + text(2) + audio(77) + text(1) for n in (3, 1, 4)]
    ids, mask, kw, hf_kw = inputs(rows, images=[G2] * 3, audios=[77] * 3)
    with torch.no_grad():
        want = ref.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask, dtype=torch.long), **hf_kw,
                            do_sample=False, max_new_tokens=NEW, pad_token_id=PAD, eos_token_id=None,
                            use_audio_in_video=False,
                            suppress_tokens=list(range(TEXT, 300)))[:, ids.shape[1]:].numpy()
    layout = RowLayout(image_grids=(tuple(G2),), audio_frames=(77,))
    media = row_media(model.cfg, *left_pad(rows), layout, kw["pixel_values"].reshape(3, 8, -1),
                      kw["input_features"].reshape(16, 3, 77).transpose(1, 0, 2))
    out, stats = engine.sample(model, rows, slots=2, num_samples=2, max_new_tokens=NEW, rng=None, greedy=True,
                               pad_id=PAD, prompt_len=ids.shape[1], vocab_limit=TEXT, media=media, layout=layout)
    assert int(stats["refills"]) == 6 and np.asarray(out.mask).all()
    np.testing.assert_array_equal(np.asarray(out.tokens), np.repeat(want, 2, axis=0))
    # The static sampler on the same rows: the held-out evaluation's.
    out = sample(model, rows, max_new_tokens=NEW, rng=None, greedy=True, pad_id=PAD, prompt_len=ids.shape[1],
                 vocab_limit=TEXT, media=media, layout=layout)
    np.testing.assert_array_equal(np.asarray(out.tokens), want)
