"""zenjax.media against transformers' Qwen3-Omni processor pieces, built offline with Qwen3-Omni's preprocessor_config
values (patch 16, merge 2, temporal 2, mean = std = 0.5, 3136..12845056 pixels; Whisper 128 mels, 300 s chunks)."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (PreTrainedTokenizerFast, Qwen2VLImageProcessorPil, Qwen3OmniMoeProcessor,
                          WhisperFeatureExtractor)
from transformers.processing_utils import ProcessorMixin

from configs import omni
from zenjax import media
from zenjax.config import prompt_media
from zenjax.data import eval_items
from zenjax.tokenizer import CharTokenizer

P, T = 16, 2
VIDEO_PIXELS = dict(min_pixels=128 * 32 * 32, max_pixels=768 * 32 * 32)  # Qwen3OmniMoeProcessor.videos_kwargs
MAX_LEVELS = 3  # PIL vs torch bicubic on smooth images, in uint8 levels (measured: 2, on a fifth of the values)


def image_processor(**pixels):
    return Qwen2VLImageProcessorPil(patch_size=P, merge_size=2, temporal_patch_size=T, image_mean=[0.5] * 3,
                                    image_std=[0.5] * 3, **(pixels or dict(min_pixels=3136, max_pixels=12845056)))


def feature_extractor():
    return WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160, n_fft=400, chunk_length=300,
                                   padding_value=0.0, return_attention_mask=True)


def smooth(h, w, c=3, seed=0):
    """A photo-like uint8 image: smooth gradients plus a little noise."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = 127 + 60 * np.sin(xx / 7.0 + seed) + 50 * np.cos(yy / 11.0 - seed)
    noise = np.random.default_rng(seed).normal(0, 8, (h, w, c))
    return np.clip(base[..., None] * np.linspace(1.0, 0.6, c) + noise, 0, 255).astype(np.uint8)


def images():
    # 64x96 stays as it is; 75x131 RGBA (alpha composited onto white) is resized to 64x128; 40x50 grey is upscaled
    # to the 3136-pixel minimum (64x64); the last, an RGBA array, to 64x96.
    return [smooth(64, 96), Image.fromarray(smooth(75, 131, 4, seed=1), "RGBA"), smooth(40, 50, 1, seed=2),
            smooth(33, 70, 4, seed=3)]


def waveforms():
    t = np.arange(48123) / 16000
    rng = np.random.default_rng(0)
    tone = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(len(t))
    chirp = 0.2 * np.sin(2 * np.pi * (300 + 900 * t[:16050]) * t[:16050]) + 0.01 * rng.standard_normal(16050)
    return [tone.astype(np.float32), chirp.astype(np.float32)]


def test_images_match_hf_bit_for_bit():
    want = image_processor()(images(), return_tensors="np")
    got = media.image_inputs(images())
    np.testing.assert_array_equal(got.grid_thw, want["image_grid_thw"])
    assert got.grid_thw.tolist() == [[1, 4, 6], [1, 4, 8], [1, 4, 4], [1, 4, 6]]
    # Same PIL resize and the same float64 / float32 steps: equal to the bit.
    np.testing.assert_array_equal(got.pixel_values, want["pixel_values"])


def test_video_matches_hf_layout():
    frames = [smooth(90, 120, seed=s) for s in range(5)]
    got = media.video_inputs([np.stack(frames)])
    # HF's video processor needs torchvision, absent here. Its patchify orders rows as the image processor's and
    # stacks frames 2g, 2g+1 along T (an odd count repeats the last): build that from each frame's image patches.
    per_frame = [image_processor(**VIDEO_PIXELS)([f], return_tensors="np") for f in frames + frames[-1:]]
    _, gh, gw = per_frame[0]["image_grid_thw"][0]
    cubes = np.stack([p["pixel_values"].reshape(gh * gw, 3, T, P, P)[:, :, 0] for p in per_frame], axis=2)
    want = cubes.reshape(gh * gw, 3, 3, T, P, P).transpose(2, 0, 1, 3, 4, 5).reshape(-1, 3 * T * P * P)
    assert got.grid_thw.tolist() == [[3, gh, gw]] == [[3, 20, 28]]  # 90x120 upscaled to the 131072-pixel floor
    np.testing.assert_array_equal(got.pixel_values, want)
    # HF resizes videos with torchvision: float32 antialiased bicubic, clamp, round (its resize_image), then the
    # fused rescale-normalise. PIL rounds between its two passes, so values differ by at most a level or two.
    x = torch.from_numpy(np.stack(frames + frames[-1:])).permute(0, 3, 1, 2).float()
    x = torch.nn.functional.interpolate(x, size=[gh * P, gw * P], mode="bicubic", align_corners=False, antialias=True)
    tv = ((x.clamp(0, 255).round() - 127.5) / 127.5).numpy()
    tv = tv.reshape(3, T, 3, gh // 2, 2, P, gw // 2, 2, P).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(want.shape)
    assert np.abs(got.pixel_values - tv).max() <= MAX_LEVELS / 127.5 + 1e-6


def test_mel_filters_match_whisper():
    np.testing.assert_array_equal(media.mel_filters(), feature_extractor().mel_filters)


@pytest.mark.parametrize("which", [[0, 1], [1]])
def test_log_mel_matches_whisper(which):
    audio = [waveforms()[i] for i in which]
    # The call Qwen3OmniMoeProcessor makes (its audio_kwargs).
    want = feature_extractor()(audio, sampling_rate=16000, padding=True, truncation=False, return_attention_mask=True,
                               return_tensors="np")
    mask = want["attention_mask"].astype(bool)
    got = media.audio_inputs(audio)
    # Next to the longer audio the 16050-sample one keeps ceil(16050 / 160) frames, alone floor(16050 / 160).
    assert got.feature_lens.tolist() == mask.sum(-1).tolist() == ([300, 101] if len(audio) == 2 else [100])
    ref = want["input_features"].transpose(0, 2, 1)[mask].T  # what the thinker selects with feature_attention_mask
    # HF runs torch's float32 STFT, we numpy's float64: a relative power error e moves a feature by e / (4 ln 10);
    # float32 rounding in quiet bins (down to 1e-8 of the loudest) reaches ~1e-5 (measured 1.6e-5).
    np.testing.assert_allclose(got.input_features, ref, rtol=0, atol=5e-5)


def test_placeholders_match_processor(monkeypatch):
    pads = dict(image_token="<|image_pad|>", video_token="<|video_pad|>", audio_token="<|audio_pad|>",
                vision_bos_token="<|vision_start|>", vision_eos_token="<|vision_end|>",
                audio_bos_token="<|audio_start|>", audio_eos_token="<|audio_end|>")
    vocab = {c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz [UNK]")}
    word = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    word.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # one token per character
    tok = PreTrainedTokenizerFast(tokenizer_object=word, unk_token="[UNK]", extra_special_tokens=pads)
    # The class check looks the video processor up in a mapping that needs torchvision; videos are not processed.
    monkeypatch.setattr(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: type(arg))
    proc = Qwen3OmniMoeProcessor(image_processor=image_processor(), video_processor=SimpleNamespace(merge_size=2),
                                 feature_extractor=feature_extractor(), tokenizer=tok)
    image, audio = "<|vision_start|><|image_pad|><|vision_end|>", "<|audio_start|><|audio_pad|><|audio_end|>"
    text = f"hi {image} and {audio} then {image}{audio} bye"
    imgs, auds = images()[:2], waveforms()
    want = proc(text=[text], images=imgs, audio=auds, return_tensors="np")["input_ids"][0].tolist()
    vis, mel = media.image_inputs(imgs), media.audio_inputs(auds)
    got = media.expand_placeholders(tok(text)["input_ids"], image_pad_id=tok.image_token_id,
                                    image_grid_thw=vis.grid_thw, audio_pad_id=tok.audio_token_id,
                                    audio_feature_lens=mel.feature_lens)
    assert got == want
    assert got.count(tok.image_token_id) == 6 + 8 and got.count(tok.audio_token_id) == 39 + 14
    grid = media.video_inputs([[smooth(90, 120)] * 3]).grid_thw
    want = proc.replace_video_token({"video_grid_thw": grid}, 0, load_audio_from_video=False)
    got = media.expand_placeholders([tok.video_token_id], video_pad_id=tok.video_token_id, video_grid_thw=grid)
    assert got == tok(want)["input_ids"] and len(got) == 2 * 20 * 28 // 4


def test_bad_input_raises():
    cases = [
        (lambda: media.smart_resize(10, 2500), "aspect ratio"),
        (lambda: media.image_inputs([smooth(10, 20)], min_pixels=0), "below the patch factor"),
        (lambda: media.image_inputs([smooth(40, 40).astype(np.float32)]), "expected uint8"),
        (lambda: media.video_inputs([[smooth(40, 40), smooth(40, 48)]]), "of one size"),
        (lambda: media.audio_inputs([np.zeros((2, 16000), np.float32)]), "mono"),
        (lambda: media.audio_inputs([np.zeros(16000, np.int16)]), "mono float"),
        (lambda: media.audio_inputs([np.zeros(16000, np.float32)], sampling_rate=8000), "16000 Hz"),
        (lambda: media.audio_inputs([np.zeros(100, np.float32)]), "more than 200"),
        (lambda: media.expand_placeholders([5, 7, 5], image_pad_id=5, image_grid_thw=[[1, 4, 4]]), "2 image"),
        (lambda: media.expand_placeholders([5], audio_feature_lens=[100]), "0 audio"),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match):
            fn()


def test_prompt_media_give_every_prompt_one_layout():
    """The training run's prompts: the see_hear item's 64-pixel image and 0.5 s clip become 4 image and 7 audio
    tokens after the user turn's start; a prompt with placeholders of its own is an error naming it."""
    c = omni.get_config("tiny")
    media, item = prompt_media(c), eval_items(c.data)[0]
    out = media(item, CharTokenizer())
    assert out["prompt_ids"][:15] == [1, 59] + [56] * 4 + [60, 61] + [58] * 7 and out["prompt_ids"][15] == 62
    assert out["pixels"].shape == (16, 3 * 2 * 16 * 16) and out["features"].shape == (128, 50)
    assert media.layout.image_grids == ((1, 4, 4),) and media.layout.audio_frames == (50,)

    class Echo(CharTokenizer):  # an HF prompt whose text writes out <|image_pad|> holds one more placeholder
        def encode_prompt(self, prompt, media_ids=()):
            return super().encode_prompt(prompt, media_ids) + [56]

    with pytest.raises(ValueError, match=rf"prompt '{item['id']}': 2 image placeholder tokens \(id 56\) for 1"):
        media(item, Echo())
