"""The Qwen3-Omni-MoE thinker in Flax NNX: transformers' `Qwen3OmniMoeThinkerForConditionalGeneration`.

The vision and audio encoders' features replace the prompt's placeholder tokens; the vision encoder's deepstack
features are added to the hidden states after the first decoder layers, at the visual positions; the decoder is
the Qwen3-MoE model of qwen3.py with multimodal RoPE on 3-D positions. What the token ids and the media's sizes
decide (positions, placeholder slots, the audio layout) is computed on the host with numpy (`placement`); the
rest (`OmniThinker.embed`, and `forward`: embed, then `Qwen3.hidden`) is jittable, with the vision grids static.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zenjax.models import audio, hf, vision
from zenjax.models.audio import AudioConfig, AudioEncoder, AudioLayout, audio_layout, output_lengths
from zenjax.models.mrope import MRopeConfig, rope_index
from zenjax.models.qwen3 import Qwen3, Qwen3Config, read_hf_config
from zenjax.models.vision import VisionConfig, VisionEncoder


@dataclasses.dataclass(frozen=True)
class OmniConfig:
    text: Qwen3Config  # with mrope_section
    vision: VisionConfig
    audio: AudioConfig
    mrope: MRopeConfig  # the placeholder and start token ids; spatial_merge_size and n_window as the encoders'
    vision_end_token_id: int = 151653  # not read by the model; kept for prompts and the HF config
    audio_end_token_id: int = 151648

    def __post_init__(self):
        E, m = self.text.hidden_size, self.mrope
        if not self.text.mrope_section:
            raise ValueError("the thinker's text config needs mrope_section")
        if (self.vision.out_hidden_size, self.audio.output_dim) != (E, E):
            raise ValueError(f"vision out_hidden_size={self.vision.out_hidden_size} and audio output_dim="
                             f"{self.audio.output_dim} must equal the text hidden_size={E}")
        if (m.spatial_merge_size, m.n_window) != (self.vision.spatial_merge_size, self.audio.n_window):
            raise ValueError("mrope's spatial_merge_size and n_window must be the vision and audio configs'")
        if len(self.vision.deepstack_visual_indexes) > self.text.num_layers:
            raise ValueError("more deepstack features than decoder layers")

    @classmethod
    def from_hf(cls, hf_cfg: Mapping[str, Any] | str | os.PathLike, *, dtype: str | None = None,
                **text_overrides) -> "OmniConfig":
        """From an HF Qwen3-Omni-MoE config.json (path, directory or dict): the whole model's (its thinker_config)
        or a thinker's, hub or transformers-5 key style. `dtype` is the compute dtype of all three towers."""
        hf_cfg = read_hf_config(hf_cfg)
        th = hf_cfg.get("thinker_config", hf_cfg)
        text = dict(th["text_config"])
        rope = {**(text.pop("rope_scaling", None) or {}), **(text.pop("rope_parameters", None) or {})}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"only default (multimodal) RoPE is supported, got {rope}")
        # HF's thinker interleaves the sections whatever `interleaved` / `mrope_interleaved` say; its defaults
        # (theta 1e6, sections 24/20/20, normalised top-k) differ from Qwen3-MoE's.
        text = {"norm_topk_prob": True, **text, "model_type": "qwen3_moe",
                "rope_theta": rope.get("rope_theta", text.get("rope_theta", 1e6)),
                "tie_word_embeddings": th.get("tie_word_embeddings", False)}
        kw = {} if dtype is None else {"dtype": dtype}
        towers = {**kw, **{k: text_overrides[k] for k in ("remat",) if k in text_overrides}}  # run as the text
        vis = VisionConfig.from_hf(th.get("vision_config") or {}, **towers)
        aud = AudioConfig.from_hf(th.get("audio_config") or {}, **towers)
        ids = {f.name: th[f.name] for f in dataclasses.fields(MRopeConfig) if f.name in th}
        ends = {k: th[k] for k in ("vision_end_token_id", "audio_end_token_id") if k in th}
        return cls(Qwen3Config.from_hf(text, mrope_section=rope.get("mrope_section", (24, 20, 20)),
                                       **kw, **text_overrides),
                   vis, aud, MRopeConfig(**{**ids, "spatial_merge_size": vis.spatial_merge_size,
                                            "n_window": aud.n_window}), **ends)

    def to_hf(self) -> dict[str, Any]:
        """An HF thinker config dict (`Qwen3OmniMoeThinkerConfig(**d)`, or a thinker's config.json)."""
        t, v, a, m = self.text, self.vision, self.audio, self.mrope
        drop = ("architectures", "num_local_experts", "rope_theta", "torch_dtype", "tie_word_embeddings")
        text = {k: val for k, val in t.to_hf().items() if k not in drop}
        text.update(model_type="qwen3_omni_moe_text", rope_parameters={
            "rope_type": "default", "rope_theta": t.rope_theta, "mrope_section": list(t.mrope_section),
            "interleaved": True})
        vis = dict(depth=v.num_layers, hidden_size=v.hidden_size, num_heads=v.num_heads,
                   intermediate_size=v.intermediate_size, hidden_act=v.hidden_act, in_channels=v.in_channels,
                   patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
                   spatial_merge_size=v.spatial_merge_size, out_hidden_size=v.out_hidden_size,
                   num_position_embeddings=v.num_position_embeddings,
                   deepstack_visual_indexes=list(v.deepstack_visual_indexes),
                   rope_parameters={"rope_type": "axial", "rope_theta": v.rope_theta})
        aud = dict(num_mel_bins=a.num_mel_bins, d_model=a.d_model, encoder_layers=a.num_layers,
                   encoder_attention_heads=a.num_heads, encoder_ffn_dim=a.ffn_dim, output_dim=a.output_dim,
                   n_window=a.n_window, n_window_infer=a.n_window_infer,
                   downsample_hidden_size=a.downsample_hidden_size, activation_function=a.activation)
        return dict(model_type="qwen3_omni_moe_thinker", architectures=["Qwen3OmniMoeThinkerForConditionalGeneration"],
                    text_config=text, vision_config=vis, audio_config=aud, tie_word_embeddings=t.tie_embeddings,
                    image_token_id=m.image_token_id, video_token_id=m.video_token_id,
                    audio_token_id=m.audio_token_id, vision_start_token_id=m.vision_start_token_id,
                    audio_start_token_id=m.audio_start_token_id, position_id_per_seconds=m.position_id_per_seconds,
                    vision_end_token_id=self.vision_end_token_id, audio_end_token_id=self.audio_end_token_id)


class Placement(NamedTuple):
    """What the token ids and media sizes decide, from `placement` (host numpy; passes into jit as arrays)."""
    positions_3BT: np.ndarray  # float32 (time, row, column) positions, HF's get_rope_index
    rope_deltas_B1: np.ndarray  # a decoded token at text index i (valid tokens before it) is at i + delta
    image_slots: np.ndarray  # flat [B * T] indices of the image placeholders, in order (HF's masked_scatter)
    video_slots: np.ndarray
    audio_slots: np.ndarray
    audio: AudioLayout | None


def placement(cfg: OmniConfig, input_ids_BT, mask_BT=None, *, image_grid_thw=None, video_grid_thw=None,
              video_second_per_grid=None, feature_lens=None, use_audio_in_video: bool = False) -> Placement:
    """From concrete ids, grids [N, 3] (patches, before merging) and mel-frame counts. Media are consumed in order
    over the whole batch. Placeholders of a modality given no media stay text tokens, as in HF."""
    ids_BT = np.asarray(input_ids_BT)
    merge2, m = cfg.vision.spatial_merge_size ** 2, cfg.mrope

    def slots(token_id, what, n):
        found = np.flatnonzero(ids_BT == token_id).astype(np.int32)
        if n is None:
            return found[:0]
        if len(found) != n:
            raise ValueError(f"{len(found)} {what} placeholder tokens (id {token_id}) but {n} {what} features")
        return found

    def vision_tokens(grid):
        return None if grid is None else int((np.prod(np.reshape(grid, (-1, 3)), axis=1) // merge2).sum())

    n_audio = None if feature_lens is None else int(output_lengths(np.asarray(feature_lens), cfg.audio.n_window).sum())
    image_slots = slots(m.image_token_id, "image", vision_tokens(image_grid_thw))
    video_slots = slots(m.video_token_id, "video", vision_tokens(video_grid_thw))
    audio_slots = slots(m.audio_token_id, "audio", n_audio)
    pos_3BT, deltas_B1 = rope_index(ids_BT, mask_BT, image_grid_thw, video_grid_thw, feature_lens,
                                    video_second_per_grid, use_audio_in_video, m)
    return Placement(pos_3BT, deltas_B1, image_slots, video_slots, audio_slots,
                     None if feature_lens is None else audio_layout(cfg.audio, feature_lens))


@dataclasses.dataclass(frozen=True)
class RowLayout:
    """The media every row of a training run carries, the same for each row so that batches keep one shape."""
    image_grids: tuple[tuple[int, int, int], ...] = ()  # each image's (t, h, w) patch grid, in prompt order
    audio_frames: tuple[int, ...] = ()  # each audio's mel frames, in prompt order

    def abstract(self, cfg: "OmniConfig", rows: int, prompt_len: int) -> "RowMedia":
        """The shapes of `rows` rows' RowMedia, as jax.ShapeDtypeStruct (compiling without data)."""
        merge = cfg.vision.spatial_merge_size ** 2
        sds = lambda *shape, dtype=np.float32: jax.ShapeDtypeStruct((rows, *shape), dtype)  # noqa: E731
        patches = sum(t * h * w for t, h, w in self.image_grids)
        tokens = int(output_lengths(np.array(self.audio_frames, np.int64)).sum())
        return RowMedia(sds(3, prompt_len), sds(),
                        sds(patches // merge, dtype=np.int32) if patches else None,
                        sds(patches, cfg.vision.patch_dim) if patches else None,
                        sds(tokens, dtype=np.int32) if tokens else None,
                        sds(cfg.audio.num_mel_bins, sum(self.audio_frames)) if tokens else None)


class RowMedia(NamedTuple):
    """Each row's media and multimodal positions, batch axis first so that minibatches slice them as they slice the
    tokens (`row_media` builds them on the host). A modality the layout lacks is None."""
    positions_B3L: np.ndarray  # float32 positions of the first L columns (the prompt, where the media are)
    deltas_B: np.ndarray  # float32: a text token after them, at index i among the row's valid tokens, is at i + delta
    image_slots_BK: np.ndarray | None  # int32 column of each image token in its row
    pixels_BND: np.ndarray | None  # the row's images' patch rows, as VisionEncoder takes them
    audio_slots_BK: np.ndarray | None
    features_BMF: np.ndarray | None  # the row's audios' log-mel frames, concatenated


def row_media(cfg: OmniConfig, ids_BL, mask_BL, layout: RowLayout, pixels_BND=None, features_BMF=None) -> RowMedia:
    """From concrete token rows whose placeholders match `layout` in every row (host numpy)."""
    ids_BL = np.asarray(ids_BL)
    B, L = ids_BL.shape
    p = placement(cfg, ids_BL, mask_BL, image_grid_thw=layout.image_grids * B or None,
                  feature_lens=layout.audio_frames * B or None)

    def per_row(slots, what):
        if not len(slots):
            return None
        k = len(slots) // B
        if len(slots) % B or not np.array_equal(slots // L, np.repeat(np.arange(B), k)):
            raise ValueError(f"every row must hold the same number of {what} placeholders ({k})")
        return (slots % L).reshape(B, k).astype(np.int32)

    return RowMedia(p.positions_3BT.transpose(1, 0, 2), p.rope_deltas_B1[:, 0].astype(np.float32),
                    per_row(p.image_slots, "image"), None if pixels_BND is None else np.asarray(pixels_BND, np.float32),
                    per_row(p.audio_slots, "audio"),
                    None if features_BMF is None else np.asarray(features_BMF, np.float32))


class OmniThinker(nnx.Module):
    def __init__(self, cfg: OmniConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.visual = VisionEncoder(cfg.vision, rngs=rngs)
        self.audio_tower = AudioEncoder(cfg.audio, rngs=rngs)
        self.text = Qwen3(cfg.text, rngs=rngs)

    def embed(self, input_ids_BT, p: Placement, *, pixel_values=None, image_grid_thw=None,
              pixel_values_videos=None, video_grid_thw=None, input_features=None):
        """The decoder's input embeddings [B, T, E], placeholders replaced by the encoders' features, and the
        deepstack additions (one [B, T, E] per tapped vision layer, zero off the visual positions; none without
        images or videos). pixel_values as `VisionEncoder` takes them; input_features [mel, frames] the audios'
        frames concatenated, as `AudioEncoder` takes them. Jittable with the grids static."""
        x_BTE = self.text.embed_tokens(input_ids_BT)
        B, T, E = x_BTE.shape
        x_NE, deep_NE = x_BTE.reshape(B * T, E), []
        for pixels, grid, slots in ((pixel_values, image_grid_thw, p.image_slots),
                                    (pixel_values_videos, video_grid_thw, p.video_slots)):
            if pixels is not None:
                out = self.visual(pixels, grid, self.cfg.text.rules)
                x_NE = x_NE.at[slots].set(out.merged_MO.astype(x_NE.dtype))
                deep_NE = deep_NE or [jnp.zeros_like(x_NE)] * len(out.deepstack)
                deep_NE = [d.at[slots].set(f.astype(d.dtype)) for d, f in zip(deep_NE, out.deepstack)]
        if input_features is not None:
            audio_VE = self.audio_tower(input_features, p.audio, self.cfg.text.rules)
            x_NE = x_NE.at[p.audio_slots].set(audio_VE.astype(x_NE.dtype))
        return x_NE.reshape(B, T, E), tuple(d.reshape(B, T, E) for d in deep_NE)

    def forward(self, input_ids_BT, mask_BT, p: Placement, *, pixel_values=None, image_grid_thw=None,
                pixel_values_videos=None, video_grid_thw=None, input_features=None):
        """Logits [B, T, V] (float32) and the MoE aux from a host-computed placement; jittable, grids static."""
        x_BTE, deepstack = self.embed(input_ids_BT, p, pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                                      pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
                                      input_features=input_features)
        out = self.text.hidden(None, mask_BT, p.positions_3BT, embeds_BTE=x_BTE, deepstack=deepstack)
        return self.text.logits(out.hidden_BTE), out.aux

    def hidden_rows(self, input_ids_BT, mask_BT, media: RowMedia, layout: RowLayout, cache=None):
        """`Qwen3.hidden` of rows whose first L columns carry `media` (a prompt, left-padded or not) and whose
        later columns are text (a completion): those continue at the text index + delta on all three rows.
        Jittable with `layout` static; a cache makes this the sampler's prefill."""
        B, T = input_ids_BT.shape
        L = media.positions_B3L.shape[-1]
        after_BM = (jnp.sum(mask_BT[:, :L], axis=1) + media.deltas_B)[:, None] + jnp.arange(T - L)
        pos_3BT = jnp.concatenate([jnp.moveaxis(media.positions_B3L, 1, 0),
                                   jnp.broadcast_to(after_BM.astype(jnp.float32), (3, B, T - L))], axis=-1)
        flat = lambda s_BK: None if s_BK is None else (jnp.arange(B)[:, None] * T + s_BK).reshape(-1)  # noqa: E731
        none = np.zeros(0, np.int32)
        p = Placement(pos_3BT, None, flat(media.image_slots_BK), none, flat(media.audio_slots_BK),
                      audio_layout(self.cfg.audio, layout.audio_frames * B) if layout.audio_frames else None)
        f = media.features_BMF
        x_BTE, deepstack = self.embed(
            input_ids_BT, p, image_grid_thw=layout.image_grids * B or None,
            pixel_values=None if media.pixels_BND is None else media.pixels_BND.reshape(-1, self.cfg.vision.patch_dim),
            input_features=None if f is None else jnp.moveaxis(f, 0, 1).reshape(f.shape[1], -1))
        return self.text.hidden(None, mask_BT, pos_3BT, cache, embeds_BTE=x_BTE, deepstack=deepstack)

    def head_weight(self):
        return self.text.head_weight()

    def __call__(self, input_ids_BT, mask_BT, *, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
                 video_grid_thw=None, video_second_per_grid=None, input_features=None, feature_lens=None,
                 use_audio_in_video: bool = False):
        """HF's forward: `placement` on the host, then `forward` (eagerly; jit `forward` instead)."""
        p = placement(self.cfg, input_ids_BT, mask_BT, image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
                      video_second_per_grid=video_second_per_grid, feature_lens=feature_lens,
                      use_audio_in_video=use_audio_in_video)
        return self.forward(input_ids_BT, mask_BT, p, pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                            pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
                            input_features=input_features)


# ------------------------------------------------------------------------------------------------ HF weights

def entries(cfg: OmniConfig, prefix: str = "thinker.") -> Iterator[hf.Entry]:
    """Every parameter slice of the thinker (paths into `nnx.state(thinker)`), HF names under `prefix`: "thinker."
    in a whole Qwen3-Omni-MoE checkpoint, "" in a saved `Qwen3OmniMoeThinkerForConditionalGeneration`."""
    towers = (("text", hf.entries(cfg.text, prefix)), ("visual", vision.entries(cfg.vision, prefix + "visual.")),
              ("audio_tower", audio.entries(cfg.audio, prefix + "audio_tower.")))
    for tower, tower_entries in towers:
        for e in tower_entries:
            yield dataclasses.replace(e, path=(tower, *e.path))


def from_hf(cfg: OmniConfig, tensors: Mapping[str, np.ndarray], prefix: str = "thinker.") -> dict:
    """The thinker's nnx pure dict (for `nnx.update(thinker, ...)`) from HF tensors by name: the hub's
    (`thinker.model.*`, `thinker.visual.*`, `thinker.audio_tower.*`, `thinker.lm_head.weight`), or with prefix ""
    a saved `Qwen3OmniMoeThinkerForConditionalGeneration`'s. Every tensor under `prefix` must be used."""
    towers = (prefix + "visual.", prefix + "audio_tower.")
    names = {k[len(prefix):] for k in tensors if k.startswith(prefix) and not k.startswith(towers)}
    hf.check_keys(cfg.text, names)  # the decoder's names are Qwen3MoeForCausalLM's under the prefix
    hf.check_shapes(cfg.text, {k: np.shape(tensors[prefix + k]) for k in names})
    return {"visual": vision.from_hf(cfg.vision, tensors, towers[0]),
            "audio_tower": audio.from_hf(cfg.audio, tensors, towers[1]),
            "text": hf.gather(hf.entries(cfg.text, prefix), tensors, jnp.dtype(cfg.text.param_dtype))}


def to_hf(cfg: OmniConfig, params: Mapping, prefix: str = "thinker.") -> dict[str, np.ndarray]:
    """Inverse of `from_hf`: the pure dict (e.g. `nnx.to_pure_dict(nnx.state(thinker, nnx.Param))`) as HF
    tensors by name, dtypes unchanged."""
    return hf.scatter(entries(cfg, prefix), params)
