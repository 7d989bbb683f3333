"""Multimodal RoPE positions of the Qwen3-Omni thinker: 3-D position ids (host, numpy); `qwen3.apply_mrope` rotates.

`rope_index` mirrors transformers' `get_rope_index` (Qwen3-Omni-MoE) quirk for quirk, so its output
can be checked against it; positions are float32 because video time steps can be fractional.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from zenjax.models.audio import output_lengths


@dataclasses.dataclass(frozen=True)
class MRopeConfig:
    """What `get_rope_index` reads from the thinker config; defaults are Qwen3-Omni-30B-A3B's."""

    image_token_id: int = 151655
    video_token_id: int = 151656
    audio_token_id: int = 151646
    vision_start_token_id: int = 151652
    audio_start_token_id: int = 151647
    spatial_merge_size: int = 2  # vision_config.spatial_merge_size
    position_id_per_seconds: int = 25
    n_window: int = 50  # audio_config.n_window


def _rows(a):
    return iter(() if a is None else np.asarray(a))


def _arange3(n, start) -> np.ndarray:
    return np.broadcast_to(np.arange(n, dtype=np.float32), (3, n)) + np.float32(start)


def _vision_positions(start, t_index, grid_thw, merge: int) -> np.ndarray:
    """[3, t*h*w] (time, row, column) positions of one merged grid, offset by `start`."""
    h, w = int(grid_thw[1]) // merge, int(grid_thw[2]) // merge
    t_, h_, w_ = np.meshgrid(t_index, np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
    return np.stack([t_.ravel(), h_.ravel(), w_.ravel()]) + np.float32(start)


def _sequence_positions(ids, cfg, images, videos, audios, use_audio_in_video):
    """[3, len(ids)] positions of one unpadded sequence; images/videos/audios are shared iterators."""
    merge, pps = cfg.spatial_merge_size, np.float32(cfg.position_id_per_seconds)
    tokens = ids.tolist()
    after_start = ids[np.flatnonzero(ids == cfg.vision_start_token_id) + 1]
    n_img = int((after_start == cfg.image_token_id).sum())
    n_aud = int((ids == cfg.audio_start_token_id).sum())
    n_vid = int((after_start == (cfg.audio_start_token_id if use_audio_in_video else cfg.video_token_id)).sum())
    n_mm = n_img + n_aud + (0 if use_audio_in_video else n_vid)
    has_vision = cfg.image_token_id in tokens or cfg.video_token_id in tokens
    blocks = []  # HF starts each block at the max of the *last* block + 1; keep its block boundaries

    def next_start():
        return blocks[-1].max() + 1 if blocks else 0

    st = 0
    for _ in range(n_mm):
        st_idx = next_start()
        none = len(tokens) + 1
        ed_vis = tokens.index(cfg.vision_start_token_id, st) if has_vision and (n_vid > 0 or n_img > 0) else none
        ed_aud = tokens.index(cfg.audio_start_token_id, st) if cfg.audio_token_id in tokens and n_aud > 0 else none
        min_ed = min(ed_vis, ed_aud)
        text_len = min_ed - st
        if text_len:
            blocks.append(_arange3(text_len, st_idx))
            st_idx += text_len
        in_video = min_ed == ed_vis and ed_vis + 1 == ed_aud
        bos = eos = 2 if in_video else 1  # <vision_start><audio_start> ... <audio_end><vision_end>
        blocks.append(_arange3(bos, st_idx))
        st_idx += bos
        if min_ed == ed_aud:
            audio_len = int(output_lengths(next(audios), cfg.n_window))
            blocks.append(_arange3(audio_len, st_idx))
            st += text_len + bos + audio_len + eos
            n_aud -= 1
        elif min_ed == ed_vis and ids[ed_vis + 1] == cfg.image_token_id:
            grid = next(images)
            t_index = np.arange(int(grid[0]), dtype=np.float32) * pps
            blocks.append(_vision_positions(st_idx, t_index, grid, merge))
            st += text_len + bos + int(np.prod(grid)) // merge**2 + eos
            n_img -= 1
        elif min_ed == ed_vis and (ids[ed_vis + 1] == cfg.video_token_id or in_video):
            grid, seconds = next(videos)
            t_index = np.arange(int(grid[0]), dtype=np.float32) * np.float32(seconds) * pps
            vis = _vision_positions(st_idx, t_index, grid, merge)
            st += text_len + bos + int(np.prod(grid)) // merge**2 + eos
            n_vid -= 1
            if not in_video:
                blocks.append(vis)
            else:
                audio_len = int(output_lengths(next(audios), cfg.n_window))
                aud = _arange3(audio_len, st_idx)
                # HF merges by time, video first on ties, then the leftover of one stream as one block.
                order = np.argsort(np.concatenate([vis[0], aud[0]]), kind="stable")
                if order.size:
                    merged, is_audio = np.concatenate([vis, aud], axis=1)[:, order], order >= vis.shape[1]
                    switch = np.flatnonzero(is_audio != is_audio[-1])
                    cut = switch[-1] + 1 if switch.size else 0
                    blocks += [b for b in (merged[:, :cut], merged[:, cut:]) if b.shape[1]]
                st += audio_len
                n_aud -= 1
        blocks.append(_arange3(eos, next_start()))
    if st < len(tokens):
        blocks.append(_arange3(len(tokens) - st, next_start()))
    return np.concatenate(blocks, axis=1).astype(np.float32)


def rope_index(
    input_ids_BT,
    attention_mask_BT=None,
    image_grid_thw=None,
    video_grid_thw=None,
    audio_seqlens=None,
    second_per_grids=None,
    use_audio_in_video: bool = False,
    cfg: MRopeConfig = MRopeConfig(),
) -> tuple[np.ndarray, np.ndarray]:
    """3-D position ids [3, B, T] and rope deltas [B, 1], both float32, as HF's thinker `get_rope_index`.

    image_grid_thw [N, 3], video_grid_thw [V, 3] (patch grids before merging) and second_per_grids [V] are
    consumed in order across the whole batch, as are audio_seqlens [A] (mel frames per clip). Padding gets
    position 0, or 1 on the text-only path (no image or video grids, even with audio). A decoded token at
    text index i (valid tokens before it) gets position i + delta on all three rows.
    """
    ids_BT = np.asarray(input_ids_BT)
    mask_BT = np.ones_like(ids_BT) if attention_mask_BT is None else np.asarray(attention_mask_BT)
    if image_grid_thw is None and video_grid_thw is None:
        pos_BT = np.cumsum(mask_BT, -1, dtype=np.float32) - 1
        pos_BT[mask_BT == 0] = 1
        deltas_B1 = pos_BT.max(-1, keepdims=True) + 1 - mask_BT.sum(-1, keepdims=True)
        return np.broadcast_to(pos_BT, (3, *pos_BT.shape)).copy(), deltas_B1.astype(np.float32)
    if video_grid_thw is not None and second_per_grids is None:
        raise ValueError("video positions need second_per_grids (seconds per temporal grid step)")
    images, audios = _rows(image_grid_thw), _rows(audio_seqlens)
    videos = zip(_rows(video_grid_thw), _rows(second_per_grids))
    pos_3BT = np.zeros((3, *ids_BT.shape), np.float32)
    deltas = []
    for b in range(ids_BT.shape[0]):
        valid = mask_BT[b] == 1
        pos_3N = _sequence_positions(ids_BT[b][valid], cfg, images, videos, audios, use_audio_in_video)
        pos_3BT[:, b, valid] = pos_3N
        deltas.append(pos_3N.max() + 1 - valid.sum())
    return pos_3BT, np.asarray(deltas, np.float32)[:, None]
