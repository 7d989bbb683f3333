"""From a run's ConfigDict to the model dataclass, and the cross-field checks worth failing on before anything
is allocated (each message names the fields and the numbers)."""
from __future__ import annotations

import dataclasses
import math

import jax
import ml_collections
import numpy as np

from zenjax import sharding
from zenjax.models import Qwen3Config
from zenjax.media import PromptMedia
from zenjax.models.audio import AudioConfig, output_lengths
from zenjax.models.hf import ModelConfig, is_omni, text_config
from zenjax.models.mrope import MRopeConfig
from zenjax.models.omni import OmniConfig
from zenjax.models.qwen3 import read_hf_config
from zenjax.models.vision import VisionConfig
from zenjax.rl import losses, rewards

# How to run the model rather than what it is: these override an HF config.json.
RUNTIME_FIELDS = ("dtype", "param_dtype", "remat", "moe_impl", "router_aux_loss_coef", "router_z_loss_coef",
                  "balance_global_batch", "kernels")
OMNI_FIELDS = ("vision", "audio", "media_tokens")  # config.model's towers and token ids of an Omni thinker
BATCH_AXES = ("data", "fsdp", "expert")  # mesh axes that split the batch (sharding.TRAINING["batch"])


def model_config_from(m: ml_collections.ConfigDict) -> ModelConfig:
    """`config.model` as a Qwen3Config, or an OmniConfig when it has `vision` / `audio` towers; with `hf_config`
    set, the architecture comes from that config.json (a Qwen3 / Qwen3-MoE one, or a Qwen3-Omni thinker's)."""
    fields = m.to_dict()
    hf_config = fields.pop("hf_config", "")
    towers = {k: fields.pop(k) for k in OMNI_FIELDS if k in fields}
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(Qwen3Config)})
    if unknown:
        raise ValueError(f"config.model has fields Qwen3Config does not know: {unknown}")
    runtime = {k: fields[k] for k in RUNTIME_FIELDS if k in fields}
    if hf_config:
        if read_hf_config(hf_config).get("model_type", "").startswith("qwen3_omni"):
            return OmniConfig.from_hf(hf_config, **runtime)
        return Qwen3Config.from_hf(hf_config, **runtime)
    if not towers:
        return Qwen3Config(**fields)
    if set(towers) != set(OMNI_FIELDS):
        raise ValueError(f"config.model: an Omni thinker needs all of {list(OMNI_FIELDS)}, got {sorted(towers)}")
    ids = dict(towers["media_tokens"])
    ends = {k: ids.pop(k) for k in ("vision_end_token_id", "audio_end_token_id") if k in ids}
    as_text = {k: fields[k] for k in ("dtype", "param_dtype", "remat") if k in fields}  # the towers run as the text
    vision = VisionConfig(**{**towers["vision"], **as_text})
    audio = AudioConfig(**{**towers["audio"], **as_text})
    mrope = MRopeConfig(**ids, spatial_merge_size=vision.spatial_merge_size, n_window=audio.n_window)
    return OmniConfig(Qwen3Config(**fields), vision, audio, mrope, **ends)


def prompt_media(config: ml_collections.ConfigDict) -> PromptMedia | None:
    """The media every prompt of an Omni thinker's run carries (None for a text model)."""
    cfg = model_config_from(config.model)
    if not is_omni(cfg):
        return None
    d = config.data
    return PromptMedia(cfg, images=d.images, audios=d.audios, image_size=d.image_size, audio_seconds=d.audio_seconds)


def logprob_rows(rl: ml_collections.ConfigDict) -> int:
    """Sequences per old-log-prob / KL pass: rl.logprob_batch, or one update minibatch's when it is 0."""
    return rl.logprob_batch or rl.prompts_per_step * rl.group_size // rl.minibatches


def mesh_sizes(mesh: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """Mesh axis sizes for `num_devices`, resolving the one axis that may be -1 (as sharding.make_mesh does)."""
    return sharding.mesh_sizes({a: mesh[a] for a in sharding.MESH_AXES}, num_devices)


def _shards(logical: str, sizes: dict[str, int]) -> tuple[int, str]:
    """How many ways the rules split a logical axis on this mesh, and over which mesh axes (for messages)."""
    rule = sharding.TRAINING[logical]  # the rollout layout splits each parameter over a subset of these
    axes = () if rule is None else (rule,) if isinstance(rule, str) else tuple(rule)
    return math.prod(sizes[a] for a in axes), "*".join(f"mesh.{a}" for a in axes)


def _media_errors(config: ml_collections.ConfigDict) -> list[str]:
    d = config.data
    if not is_omni(model_config_from(config.model)):
        return [f"data.images={d.images} and data.audios={d.audios}: a text model takes no media (an Omni "
                "thinker's config has model.vision and model.audio)"] if d.images or d.audios else []
    if d.images < 0 or d.audios < 0 or d.audio_seconds <= 0:
        return [f"data.images={d.images} and data.audios={d.audios} must be >= 0, data.audio_seconds="
                f"{d.audio_seconds} > 0"]
    media = prompt_media(config)
    try:
        layout = media.layout
    except ValueError as e:
        return [str(e)]
    merge = media.cfg.vision.spatial_merge_size ** 2
    tokens = (sum(t * h * w // merge for t, h, w in layout.image_grids) + 2 * d.images
              + int(output_lengths(np.array(layout.audio_frames, np.int64)).sum()) + 2 * d.audios)
    if tokens >= d.max_prompt_len:
        return [f"every prompt's media take {tokens} tokens (data.images={d.images} of data.image_size="
                f"{d.image_size}, data.audios={d.audios} of data.audio_seconds={d.audio_seconds}): more than "
                f"data.max_prompt_len={d.max_prompt_len} leaves for the text"]
    return []


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None,
             num_processes: int | None = None) -> dict[str, int]:
    """Check a run config against itself and the device count; return the resolved mesh sizes.

    Raises ValueError listing every problem found."""
    n = jax.device_count() if num_devices is None else num_devices
    procs = jax.process_count() if num_processes is None else num_processes
    sizes = mesh_sizes(config.mesh, n)
    cfg = text_config(model_config_from(config.model))
    rl = config.rl
    errors = []

    counts = {"steps": config.steps, "rl.prompts_per_step": rl.prompts_per_step, "rl.max_new_tokens":
              rl.max_new_tokens, "optim.grad_accum": config.optim.grad_accum, "checkpoint_every":
              config.checkpoint_every, "keep_checkpoints": config.keep_checkpoints, "eval_every": config.eval_every}
    for key, value in counts.items():
        least = 0 if key == "eval_every" else 1  # eval_every=0 turns evaluation off
        if value < least:
            errors.append(f"{key}={value} must be >= {least}")
    if rl.loss not in losses.LOSSES:
        errors.append(f"rl.loss={rl.loss!r} is not a registered loss: {', '.join(sorted(losses.LOSSES))}")
    if rl.old_logprobs not in ("recompute", "sampler"):
        errors.append(f"rl.old_logprobs={rl.old_logprobs!r} must be 'recompute' or 'sampler'")
    try:
        rewards.split(config.rewards)
    except ValueError as e:
        errors.append(str(e))
    if rl.engine not in ("continuous", "static"):
        errors.append(f"rl.engine={rl.engine!r} must be 'continuous' or 'static'")
    if rl.slots < 0:
        errors.append(f"rl.slots={rl.slots} must be >= 0 (0: as many as the rollout's memory holds)")
    if rl.group_size < 2:
        errors.append(f"rl.group_size={rl.group_size}: group advantages need at least 2 completions per prompt")
    if rl.prompts_per_step % procs:
        errors.append(f"rl.prompts_per_step={rl.prompts_per_step} is not divisible by the {procs} processes "
                      "(each scores its share of the prompts)")
    rows = rl.prompts_per_step * rl.group_size
    batch_shards = math.prod(sizes[a] for a in BATCH_AXES)
    if rl.minibatches < 1 or rows % rl.minibatches:
        errors.append(f"rl.prompts_per_step*rl.group_size = {rl.prompts_per_step}*{rl.group_size} = {rows} "
                      f"is not divisible by rl.minibatches={rl.minibatches}")
    elif (rows // rl.minibatches) % batch_shards:
        errors.append(f"a minibatch of {rows // rl.minibatches} sequences (rl.prompts_per_step*rl.group_size/"
                      f"rl.minibatches) is not divisible by the {batch_shards} batch shards "
                      f"(mesh.data*mesh.fsdp*mesh.expert = {'*'.join(str(sizes[a]) for a in BATCH_AXES)})")
    elif rows and (logprob_rows(rl) < 1 or rows % logprob_rows(rl) or logprob_rows(rl) % batch_shards):
        errors.append(f"rl.logprob_batch={rl.logprob_batch}: the {rows} sequences of a rollout batch must split into "
                      f"passes of {logprob_rows(rl)} sequences, each divisible by the {batch_shards} batch shards")
    if rl.slots % batch_shards:
        errors.append(f"rl.slots={rl.slots} is not divisible by the {batch_shards} batch shards (each device decodes "
                      "its share of the slots)")
    if not 0 <= rl.eps_low < 1 or rl.eps_high < 0:
        errors.append(f"rl.eps_low={rl.eps_low} must be in [0, 1) and rl.eps_high={rl.eps_high} >= 0")
    errors += _media_errors(config)
    seq = config.data.max_prompt_len + rl.max_new_tokens
    if seq > cfg.max_position_embeddings:
        errors.append(f"data.max_prompt_len + rl.max_new_tokens = {config.data.max_prompt_len} + "
                      f"{rl.max_new_tokens} = {seq} exceeds model.max_position_embeddings="
                      f"{cfg.max_position_embeddings}")

    # Every sharded parameter dimension must divide evenly over the mesh axes its rule names.
    dims = {"vocab": cfg.vocab_size, "embed": cfg.hidden_size, "heads": cfg.num_heads,
            "kv_heads": cfg.num_kv_heads}
    field_of = {"vocab": "vocab_size", "embed": "hidden_size", "heads": "num_heads", "kv_heads": "num_kv_heads",
              "mlp": "intermediate_size", "experts": "num_experts", "expert_mlp": "moe_intermediate_size"}
    kinds = {moe for moe, _ in cfg.segments()}
    if False in kinds:
        dims["mlp"] = cfg.intermediate_size
    if True in kinds:
        dims.update(experts=cfg.num_experts, expert_mlp=cfg.moe_intermediate_size)
    for logical, size in dims.items():
        ways, axes = _shards(logical, sizes)
        if size % ways:
            errors.append(f"model.{field_of[logical]}={size} is not divisible by {axes}={ways} "
                          f"(the '{logical}' axis is sharded over it)")
    if errors:
        raise ValueError("invalid config: " + "; ".join(errors))
    return sizes
