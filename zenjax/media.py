"""Images, video frames and audio as the Qwen3-Omni-MoE thinker's encoders take them, on the host (numpy and PIL).

The same numbers as transformers' `Qwen3OmniMoeProcessor` without transformers at run time:
- images and video (its `Qwen2VLImageProcessor` / `Qwen2VLVideoProcessor`): `smart_resize` to multiples of
  patch_size * merge_size within [min_pixels, max_pixels], PIL bicubic, x / 255, (x - mean) / std, then one row
  per (channel, time, row, column) patch cube, rows in merge-block order. The defaults are Qwen3-Omni's
  preprocessor_config.json (patch 16, mean = std = 0.5, 3136..12845056 pixels) and, for video, the processor's
  own per-frame size (128 * 32 * 32 .. 768 * 32 * 32 pixels).
- audio (its `WhisperFeatureExtractor` call: padding to the longest, no truncation, attention mask): 128-bin Slaney
  log-mel of a centred 400-point periodic-Hann STFT every 160 samples, log10 clamped at 1e-10, at most 8 below the
  maximum, (x + 4) / 4.
- placeholders: the one pad token per item the chat template emits, repeated to that item's encoder token count.

`PromptMedia` prepares the prompts of a training run: every prompt's media get one shape (`omni.RowLayout`), so
that the rollout and training functions compile once.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from PIL import Image

from zenjax.models.audio import output_lengths
from zenjax.models.omni import OmniConfig, RowLayout

SAMPLING_RATE = 16000


class VisionInputs(NamedTuple):
    pixel_values: np.ndarray  # [N, C * temporal_patch_size * patch_size**2] float32, all items' patches in order
    grid_thw: np.ndarray  # [items, 3] int64: each item's (t, h, w) in patches


class AudioInputs(NamedTuple):
    input_features: np.ndarray  # [n_mels, sum(feature_lens)] float32, the audios' frames concatenated in order
    feature_lens: np.ndarray  # [audios] int64: mel frames of each audio


def smart_resize(height: int, width: int, factor: int = 32, min_pixels: int = 3136,
                 max_pixels: int = 12845056) -> tuple[int, int]:
    """(height, width) rounded to multiples of `factor` with the area brought into [min_pixels, max_pixels] (HF's)."""
    if min(height, width) < 1 or max(height, width) / min(height, width) > 200:
        raise ValueError(f"image of {height}x{width} pixels: both sides must be positive, aspect ratio at most 200")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    if min(h, w) < factor:  # only a min_pixels below factor**2 lets a side round to zero
        raise ValueError(f"image of {height}x{width} pixels resizes to {h}x{w}, below the patch factor {factor}")
    return h, w


def rgb_HWC(image) -> np.ndarray:
    """An RGB uint8 [H, W, 3] array; transparency is composited onto white as HF's convert_to_rgb does."""
    if isinstance(image, Image.Image):
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            return np.asarray(Image.alpha_composite(white, image.convert("RGBA")).convert("RGB"))
        return np.asarray(image.convert("RGB"))
    a = np.asarray(image)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image array {a.dtype}{list(a.shape)}: expected uint8 [H, W, C] with C in 1, 3, 4")
    if a.shape[-1] == 1:
        return np.repeat(a, 3, axis=-1)
    if a.shape[-1] == 4:
        alpha = a[..., 3:] / 255
        return np.round(alpha * a[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return a


def _patches(frames, patch_size, merge_size, temporal_patch_size, min_pixels, max_pixels, mean, std):
    """One item's frames (one for an image) -> its patch rows [t*h*w, C*T*P*P] and grid (t, h, w)."""
    frames_HWC = [rgb_HWC(f) for f in frames]
    if not frames_HWC or len({f.shape for f in frames_HWC}) > 1:
        raise ValueError(f"frames of shapes {sorted({f.shape for f in frames_HWC})}: expected one or more of one size")
    H, W, C = frames_HWC[0].shape
    h, w = smart_resize(H, W, patch_size * merge_size, min_pixels, max_pixels)
    # PIL bicubic on uint8 (rounded between its two passes), as HF's PIL backend resizes.
    x_THWC = np.stack([np.asarray(Image.fromarray(f).resize((w, h), Image.Resampling.BICUBIC)) for f in frames_HWC])
    # HF's order of operations and dtypes, so that the values are bit-equal: scale in float64, normalise in float32.
    x_THWC = (x_THWC.astype(np.float64) * (1 / 255)).astype(np.float32)
    x_THWC = (x_THWC - np.broadcast_to(np.float32(mean), (C,))) / np.broadcast_to(np.float32(std), (C,))
    # An image is one frame; a video's last frame repeats to fill the last temporal patch.
    pad = -len(x_THWC) % temporal_patch_size
    x_THWC = np.concatenate([x_THWC, np.repeat(x_THWC[-1:], pad, axis=0)])
    t, gh, gw, m, P = len(x_THWC) // temporal_patch_size, h // patch_size, w // patch_size, merge_size, patch_size
    x = x_THWC.reshape(t, temporal_patch_size, gh // m, m, P, gw // m, m, P, C)
    # rows (t, block row, block col, row in block, col in block); each row a (C, T, P, P) cube
    rows = x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7).reshape(t * gh * gw, C * temporal_patch_size * P * P)
    return rows, (t, gh, gw)


def _vision_inputs(items, **kw) -> VisionInputs:
    if not items:
        raise ValueError("expected one or more images or videos")
    out = [_patches(frames, **kw) for frames in items]
    return VisionInputs(np.concatenate([rows for rows, _ in out]), np.array([g for _, g in out], dtype=np.int64))


def image_inputs(images: Sequence, *, patch_size: int = 16, merge_size: int = 2, temporal_patch_size: int = 2,
                 min_pixels: int = 3136, max_pixels: int = 12845056, mean=0.5, std=0.5) -> VisionInputs:
    """`pixel_values` and `image_grid_thw` of PIL images or uint8 [H, W, C] arrays (HF's Qwen2-VL image processor)."""
    return _vision_inputs([[im] for im in images], patch_size=patch_size, merge_size=merge_size,
                          temporal_patch_size=temporal_patch_size, min_pixels=min_pixels, max_pixels=max_pixels,
                          mean=mean, std=std)


def video_inputs(videos: Sequence, *, patch_size: int = 16, merge_size: int = 2, temporal_patch_size: int = 2,
                 min_pixels: int = 128 * 32 * 32, max_pixels: int = 768 * 32 * 32, mean=0.5, std=0.5) -> VisionInputs:
    """`pixel_values_videos` and `video_grid_thw` of videos, each a sequence (or [T, H, W, C] array) of frames."""
    return _vision_inputs([list(v) for v in videos], patch_size=patch_size, merge_size=merge_size,
                          temporal_patch_size=temporal_patch_size, min_pixels=min_pixels, max_pixels=max_pixels,
                          mean=mean, std=std)


def _hz_to_mel(f):
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    return np.where(f < 1000.0, 3.0 * f / 200.0, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) * (27.0 / np.log(6.4)))


def _mel_to_hz(m):
    return np.where(m < 15.0, 200.0 * m / 3.0, 1000.0 * np.exp(np.log(6.4) / 27.0 * (m - 15.0)))


def mel_filters(n_mels: int = 128, n_fft: int = 400, sampling_rate: int = SAMPLING_RATE) -> np.ndarray:
    """Slaney-normalised triangular filters [n_fft // 2 + 1, n_mels] over 0..8 kHz (Whisper's mel_filter_bank)."""
    fft_hz = np.linspace(0, sampling_rate // 2, n_fft // 2 + 1)
    edges_hz = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(8000.0), n_mels + 2))
    slopes = edges_hz[None, :] - fft_hz[:, None]
    down, up = -slopes[:, :-2] / np.diff(edges_hz)[:-1], slopes[:, 2:] / np.diff(edges_hz)[1:]
    return np.maximum(0.0, np.minimum(down, up)) * (2.0 / (edges_hz[2:] - edges_hz[:-2]))


def audio_inputs(waveforms: Sequence[np.ndarray], sampling_rate: int = SAMPLING_RATE, *, n_mels: int = 128,
                 n_fft: int = 400, hop_length: int = 160) -> AudioInputs:
    """Log-mel frames of the mono float waveforms of one processor call, as the thinker takes them (HF's features
    masked by `feature_attention_mask`).

    As in HF's call, every waveform is zero-padded to the longest before the STFT, so a shorter one keeps
    ceil(samples / hop) frames (not floor) and its last frames see zeros instead of the reflected edge."""
    if sampling_rate != SAMPLING_RATE:
        raise ValueError(f"sampling_rate={sampling_rate}: the Qwen3-Omni feature extractor takes {SAMPLING_RATE} Hz")
    if not len(waveforms):
        raise ValueError("expected one or more waveforms")
    for i, w in enumerate(waveforms):
        if not isinstance(w, np.ndarray) or not np.issubdtype(w.dtype, np.floating) or w.ndim != 1 or not w.size:
            what = f"{w.dtype}{list(w.shape)}" if isinstance(w, np.ndarray) else type(w).__name__
            raise ValueError(f"waveform {i} is {what}: expected a non-empty mono float array [samples]")
    L = max(len(w) for w in waveforms)
    if L <= n_fft // 2:
        raise ValueError(f"the longest waveform has {L} samples: the centred STFT needs more than {n_fft // 2}")
    # HF casts to float32 first; the STFT then runs in float64 (HF's torch path runs in float32: see the test).
    x_AL = np.stack([np.pad(w.astype(np.float32), (0, L - len(w))) for w in waveforms]).astype(np.float64)
    x_AL = np.pad(x_AL, ((0, 0), (n_fft // 2, n_fft // 2)), mode="reflect")
    frames = L // hop_length  # the STFT's last frame is dropped, as Whisper does
    x_AFN = np.lib.stride_tricks.sliding_window_view(x_AL, n_fft, axis=1)[:, ::hop_length][:, :frames]
    window_N = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann
    power_AFK = np.abs(np.fft.rfft(x_AFN * window_N, axis=-1)) ** 2
    log_AMF = np.log10(np.maximum(np.einsum("afk,km->amf", power_AFK, mel_filters(n_mels, n_fft)), 1e-10))
    log_AMF = np.maximum(log_AMF, log_AMF.max(axis=(1, 2), keepdims=True) - 8.0)
    feats_AMF = ((log_AMF + 4.0) / 4.0).astype(np.float32)
    # HF's mask: the padded samples' mask sampled every hop, cut to `frames`.
    lens_A = np.array([min(-(-len(w) // hop_length), frames) for w in waveforms], dtype=np.int64)
    return AudioInputs(np.concatenate([f[:, :n] for f, n in zip(feats_AMF, lens_A)], axis=1), lens_A)


def expand_placeholders(ids: Sequence[int], *, image_pad_id: int | None = None, image_grid_thw=(),
                        video_pad_id: int | None = None, video_grid_thw=(), audio_pad_id: int | None = None,
                        audio_feature_lens=(), merge_size: int = 2) -> list[int]:
    """Token ids with the k-th pad token of each modality repeated to the k-th item's token count (HF's __call__):
    t*h*w / merge_size**2 for an image or video, the audio encoder's output length for an audio."""
    ids = [int(t) for t in ids]
    counts = {}
    for name, pad_id, sizes in (("image", image_pad_id, image_grid_thw), ("video", video_pad_id, video_grid_thw),
                                ("audio", audio_pad_id, audio_feature_lens)):
        sizes = np.asarray(sizes, dtype=np.int64)
        if name == "audio":
            n = output_lengths(sizes.reshape(-1))
        else:
            n = sizes.reshape(-1, 3).prod(axis=1) // merge_size ** 2
        found = ids.count(pad_id) if pad_id is not None else 0
        if found != len(n):
            raise ValueError(f"{found} {name} placeholder tokens (id {pad_id}) for {len(n)} {name} items")
        if pad_id is not None:
            counts[pad_id] = iter(n.tolist())
    out = []
    for tok in ids:
        out.extend([tok] * next(counts[tok]) if tok in counts else [tok])
    return out


@dataclasses.dataclass(frozen=True)
class PromptMedia:
    """A run's media per prompt: `images` of `image_size` x `image_size` pixels (others are resized, PIL bicubic)
    and `audios` of `audio_seconds` (others are cut or zero-padded), so that every prompt has the same placeholder
    counts and encoder inputs. Calling it on a data item gives its prompt ids, with the placeholders after the
    user turn's start, and its encoder inputs: "pixels" [N, patch values], "features" [mel, frames]."""
    cfg: OmniConfig
    images: int = 0  # per prompt
    audios: int = 0
    image_size: int = 64
    audio_seconds: float = 1.0

    @property
    def audio_samples(self) -> int:
        return max(round(self.audio_seconds * SAMPLING_RATE / 160), 3) * 160  # whole 10 ms hops

    @property
    def layout(self) -> RowLayout:
        v, side = self.cfg.vision, self.image_size // self.cfg.vision.patch_size
        if self.images and self.image_size % (v.patch_size * v.spatial_merge_size):
            raise ValueError(f"data.image_size={self.image_size} must be a multiple of patch_size * "
                             f"spatial_merge_size = {v.patch_size * v.spatial_merge_size}")
        return RowLayout(((1, side, side),) * self.images, (self.audio_samples // 160,) * self.audios)

    def __call__(self, item: dict, tokenizer) -> dict:
        cfg, m, layout = self.cfg, self.cfg.mrope, self.layout
        images, audios = item.get("images", []), item.get("audios", [])
        if (len(images), len(audios)) != (self.images, self.audios):
            raise ValueError(f"prompt {item['id']!r} has {len(images)} images and {len(audios)} audio clips, but "
                             f"every prompt of this run has data.images={self.images} and data.audios={self.audios}")
        out, ids = {}, []
        if images:
            S, v = self.image_size, cfg.vision
            frames = [Image.fromarray(rgb_HWC(im)).resize((S, S), Image.Resampling.BICUBIC) for im in images]
            vis = image_inputs(frames, patch_size=v.patch_size, merge_size=v.spatial_merge_size,
                               temporal_patch_size=v.temporal_patch_size, min_pixels=S * S, max_pixels=S * S)
            out["pixels"] = vis.pixel_values
            ids += [m.vision_start_token_id, m.image_token_id, cfg.vision_end_token_id] * len(images)
        if audios:
            n = self.audio_samples
            clips = [np.pad(a[:n], (0, max(n - len(a), 0))).astype(np.float32) for a in audios]
            out["features"] = audio_inputs(clips, n_mels=cfg.audio.num_mel_bins).input_features
            ids += [m.audio_start_token_id, m.audio_token_id, cfg.audio_end_token_id] * len(audios)
        try:  # a prompt whose text holds placeholder tokens of its own has more of them than media
            out["prompt_ids"] = expand_placeholders(
                tokenizer.encode_prompt(item["prompt"], ids), image_pad_id=m.image_token_id,
                image_grid_thw=layout.image_grids, audio_pad_id=m.audio_token_id,
                audio_feature_lens=layout.audio_frames, merge_size=cfg.vision.spatial_merge_size)
        except ValueError as e:
            raise ValueError(f"prompt {item['id']!r}: {e}") from None
        return out
