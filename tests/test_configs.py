"""The Zen family configs: published parameter counts, sharded abstract train states, validation, tiny models."""
import dataclasses
import functools
import importlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from configs import base
from zenjax import sharding
from zenjax.config import model_config_from, validate
from zenjax.models import Qwen3, Qwen3Config
from zenjax.models.hf import is_omni, text_config
from zenjax.plan import abstract_train_state, count_params, device_bytes, plan
from zenjax.tokenizer import CharTokenizer

V = 151936
FAMILIES = ["nano", "eco", "coder", "omni", "next", "qwen3_30b_a3b"]


def load(name, arg=None):
    return importlib.import_module(f"configs.{name}").get_config(arg)


def hand_count(L, E, H, K, D, tied, F=0, X=0, k=0, f=0):
    """(total, active) parameters written out: per layer q and o are E x H*D, k and v E x K*D, q/k norms D each,
    two RMSNorms E each, then a dense SwiGLU 3*E*F or a router E*X plus X experts of 3*E*f (k of them active);
    outside the layers the embedding V*E, an LM head V*E unless tied, the final norm E."""
    attn = 2 * E * H * D + 2 * E * K * D + 2 * D + 2 * E
    if X:
        mlp, mlp_active = E * X + X * 3 * E * f, E * X + k * 3 * E * f
    else:
        mlp = mlp_active = 3 * E * F
    outer = V * E * (1 if tied else 2) + E
    return outer + L * (attn + mlp), outer + L * (attn + mlp_active)


def shapes(m):
    return {k: m[k] for k in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                              "tie_embeddings", "num_experts", "num_experts_per_tok", "moe_intermediate_size")}


def test_nano_is_qwen3_0_6b():
    c = load("nano")
    # Qwen/Qwen3-0.6B config.json
    assert shapes(c.model) == dict(vocab_size=V, hidden_size=1024, num_layers=28, num_heads=16, num_kv_heads=8,
                                   head_dim=128, tie_embeddings=True, num_experts=0, num_experts_per_tok=0,
                                   moe_intermediate_size=0)
    assert c.model.intermediate_size == 3072 and c.model.rope_theta == 1e6
    total, active = hand_count(28, 1024, 16, 8, 128, tied=True, F=3072)
    assert total == active == 596_049_920  # the published safetensors parameter count
    n = count_params(model_config_from(c.model))
    assert (n.total, n.active, n.embedding, n.lm_head) == (total, total, V * 1024, 0)
    assert round(n.total / 1e9, 1) == 0.6 and round(n.non_embedding / 1e9, 2) == 0.44  # the model card


def test_eco_is_qwen3_4b():
    c = load("eco")
    assert shapes(c.model) == dict(vocab_size=V, hidden_size=2560, num_layers=36, num_heads=32, num_kv_heads=8,
                                   head_dim=128, tie_embeddings=True, num_experts=0, num_experts_per_tok=0,
                                   moe_intermediate_size=0)
    assert c.model.intermediate_size == 9728
    total, _ = hand_count(36, 2560, 32, 8, 128, tied=True, F=9728)
    assert total == 4_022_468_096
    n = count_params(model_config_from(c.model))
    assert (n.total, n.active, n.lm_head) == (total, total, 0)
    assert round(n.total / 1e9, 1) == 4.0 and round(n.non_embedding / 1e9, 1) == 3.6  # the model card


def test_qwen3_30b_a3b_counts():
    c = load("qwen3_30b_a3b")
    assert shapes(c.model) == dict(vocab_size=V, hidden_size=2048, num_layers=48, num_heads=32, num_kv_heads=4,
                                   head_dim=128, tie_embeddings=False, num_experts=128, num_experts_per_tok=8,
                                   moe_intermediate_size=768)
    assert c.model.norm_topk_prob and c.model.intermediate_size == 6144
    total, active = hand_count(48, 2048, 32, 4, 128, tied=False, X=128, k=8, f=768)
    n = count_params(model_config_from(c.model))
    assert (n.total, n.active) == (total, active)
    # Model card: 30.5B total, 3.3B activated, 29.9B non-embedding (truncated to 0.1B: 3.35B reads as 3.3B).
    assert (total // 10**8, active // 10**8, n.non_embedding // 10**8) == (305, 33, 299)
    assert n.embedding == n.lm_head == V * 2048


def next_hand_count(L, E, H, K, D, G, Hv, Dk, Dv, W, X, k, f, fs, tied):
    """(total, active) of a Qwen3-Next: every 4th layer gated attention (q twice as wide: query and gate), the
    others Gated DeltaNet (q, k, v, z, b, a projections, a depthwise conv over q, k, v, dt_bias, A_log, the gated
    norm, out); every layer an MoE of X experts (k active) plus a shared expert of width fs and its gate."""
    attn = 2 * E * H * D + E * 2 * K * D + H * D * E + 2 * D
    delta = E * (2 * G * Dk + 2 * Hv * Dv + 2 * Hv) + W * (2 * G * Dk + Hv * Dv) + 2 * Hv + Dv + Hv * Dv * E
    shared = 3 * E * fs + E + E * X
    full = L // 4
    outer = V * E * (1 if tied else 2) + E
    layers = full * attn + (L - full) * delta + L * (shared + 2 * E)
    return outer + layers + L * X * 3 * E * f, outer + layers + L * k * 3 * E * f


def test_qwen3_next_80b_a3b_counts_as_transformers():
    """The released shapes: transformers' Qwen3NextForCausalLM built from our config on the meta device has exactly
    our parameters, and both are the hand count of the config's docstring."""
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM  # noqa: PLC0415

    cfg = model_config_from(load("qwen3_next_80b_a3b").model)
    n = count_params(cfg)
    with torch.device("meta"):
        ref = Qwen3NextForCausalLM(Qwen3NextConfig(**cfg.to_hf()))
    assert ref.config.layer_types.count("full_attention") == 12
    total, active = next_hand_count(48, 2048, 16, 2, 256, 16, 32, 128, 128, 4, X=512, k=10, f=512, fs=512,
                                    tied=False)
    assert n.total == sum(p.numel() for p in ref.parameters()) == total and n.active == active
    assert round(total / 1e9, 1) == 79.7 and round(active / 1e9, 1) == 3.9


@pytest.mark.parametrize("name,shape,target_total,target_active", [
    ("coder", dict(L=36, E=2048, H=32, K=8, f=384), 7e9, 2e9),
    ("next", dict(L=46, E=4096, H=64, K=4, f=768), 32e9, 8e9),
])
def test_zen_moe_sizes(name, shape, target_total, target_active):
    c = load(name)
    s = shape
    assert shapes(c.model) == dict(vocab_size=V, hidden_size=s["E"], num_layers=s["L"], num_heads=s["H"],
                                   num_kv_heads=s["K"], head_dim=128, tie_embeddings=False, num_experts=64,
                                   num_experts_per_tok=8, moe_intermediate_size=s["f"])
    total, active = hand_count(s["L"], s["E"], s["H"], s["K"], 128, tied=False, X=64, k=8, f=s["f"])
    n = count_params(model_config_from(c.model))
    assert (n.total, n.active) == (total, active)
    assert abs(total / target_total - 1) < 0.05 and abs(active / target_active - 1) < 0.10


def test_omni_is_a_thinker_as_transformers_counts_it():
    """14B total with both encoders, 4B active per text token: transformers' thinker built from our config on the
    meta device has exactly our parameters, tower by tower; the decoder's are the hand count."""
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import (  # noqa: PLC0415
        Qwen3OmniMoeThinkerConfig,
    )
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (  # noqa: PLC0415
        Qwen3OmniMoeThinkerForConditionalGeneration,
    )

    cfg = model_config_from(load("omni").model)
    n = count_params(cfg)
    with torch.device("meta"):
        ref = Qwen3OmniMoeThinkerForConditionalGeneration(Qwen3OmniMoeThinkerConfig(**cfg.to_hf()))
    tower = lambda prefix: sum(p.numel() for k, p in ref.named_parameters() if k.startswith(prefix))  # noqa: E731
    assert (n.total, n.vision, n.audio) == (sum(p.numel() for p in ref.parameters()), tower("model.visual."),
                                            tower("model.audio_tower."))
    total, active = hand_count(39, 3072, 48, 4, 128, tied=False, X=56, k=8, f=512)
    assert (n.total - n.vision - n.audio, n.active) == (total, active)
    assert abs(n.total / 14e9 - 1) < 0.01 and abs(n.active / 4e9 - 1) < 0.01


def test_model_section_mirrors_the_dataclass():
    m = base.model_config()
    # All but the layout, which the trainer picks per role (training state, rollout copy), and the multimodal RoPE
    # sections, which only the Omni thinker's config sets.
    assert set(m) - {"hf_config"} == {f.name for f in dataclasses.fields(Qwen3Config)} - {"layout", "mrope_section"}
    cfg = model_config_from(m)
    assert all(getattr(cfg, k) == (tuple(v) if k == "mlp_only_layers" else v) for k, v in m.items() if k != "hf_config")
    m.typo_field = 3
    with pytest.raises(ValueError, match="typo_field"):
        model_config_from(m)


def test_hf_config_defines_the_architecture_and_the_configdict_how_to_run_it(tmp_path):
    arch = Qwen3Config(vocab_size=64, hidden_size=48, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=12,
                       intermediate_size=96, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                       router_aux_loss_coef=0.001)
    (tmp_path / "config.json").write_text(json.dumps(arch.to_hf()))
    m = load("next", "tiny").model
    m.hf_config = str(tmp_path)
    m.dtype, m.remat, m.router_aux_loss_coef, m.moe_impl = "bfloat16", True, 0.01, "reference"
    cfg = model_config_from(m)
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_experts, cfg.head_dim) == (48, 3, 4, 12)  # from the json
    assert (cfg.dtype, cfg.remat, cfg.router_aux_loss_coef, cfg.moe_impl) == ("bfloat16", True, 0.01, "reference")


def _expected_device_params(cfg: Qwen3Config, mesh) -> int:
    """Per-device parameter count from the rules by hand: `embed` dims split over fsdp, expert weights also over
    the expert axis, norms (and nothing else) replicated; tensor = 1 in these meshes."""
    fsdp, ep = mesh.shape["fsdp"], mesh.shape["expert"]
    E, L = cfg.hidden_size, cfg.num_layers
    norms = L * (2 * E + 2 * cfg.head_dim) + E
    experts = L * cfg.num_experts * 3 * E * cfg.moe_intermediate_size
    total = count_params(cfg).total
    return norms + experts // (fsdp * ep) + (total - norms - experts) // fsdp


@pytest.mark.parametrize("name", FAMILIES)
def test_full_config_builds_a_sharded_abstract_train_state_on_8_devices(name):
    c = load(name)
    mesh = sharding.make_mesh(**c.mesh)  # 8 simulated devices (tests/conftest.py)
    validate(c, num_devices=8, num_processes=1)
    cfg = model_config_from(c.model)
    live = len(jax.live_arrays())
    params, opt_state = abstract_train_state(c, mesh)
    assert len(jax.live_arrays()) == live  # nothing was allocated
    for leaf in jax.tree.leaves((params, opt_state)):
        assert isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding.mesh == mesh
    all_params = params
    if is_omni(cfg):  # the encoders' widths are split over fsdp too; below, the decoder's share by hand
        vis = params["visual"]["blocks"]["fc1"]["kernel"]
        assert vis.sharding.shard_shape(vis.shape) == (27, 1152 // mesh.shape["fsdp"], 4304)
        cfg, params = cfg.text, params["text"]
    fsdp, ep = mesh.shape["fsdp"], mesh.shape["expert"]
    E = cfg.hidden_size
    assert params["embed"].sharding.shard_shape((V, E)) == (V, E // fsdp)
    if cfg.num_experts:
        gate = params["stacks"][0]["mlp"]["gate"]
        shape = (cfg.num_layers, cfg.num_experts, E, cfg.moe_intermediate_size)
        assert gate.shape == shape
        assert gate.sharding.shard_shape(shape) == (shape[0], shape[1] // ep, E // fsdp, shape[3])
    assert device_bytes(params) == 4 * _expected_device_params(cfg, mesh)
    # AdamW keeps mu and nu sharded like the params (plus a few replicated step counters).
    assert 0 <= device_bytes(opt_state) - 2 * device_bytes(all_params) <= 64


# The slice each config's docstring says it fits (v5p chips).
SLICES = {"nano": 4, "eco": 16, "coder": 32, "omni": 32, "next": 64, "qwen3_30b_a3b": 64}


@pytest.mark.parametrize("name", FAMILIES)
def test_full_config_fits_its_slice(name):
    c = load(name)
    chips = SLICES[name]
    assert f"({chips} chips)" in importlib.import_module(f"configs.{name}").__doc__
    assert plan(c, num_devices=chips, chip="v5p").warnings() == []


@functools.partial(jax.jit, static_argnums=0)  # one compile per distinct tiny architecture
def _init_and_forward(cfg, tokens):
    return Qwen3(cfg, rngs=nnx.Rngs(0))(tokens)[0]


@pytest.mark.parametrize("name", FAMILIES)
def test_tiny_config_validates_and_runs_a_forward(name):
    full, c = load(name), load(name, "tiny")
    for devices in (1, 8):
        validate(c, num_devices=devices, num_processes=1)
    cfg = text_config(model_config_from(c.model))  # an Omni thinker's decoder: its media, in test_train
    assert (cfg.num_experts > 0) == (full.model.num_experts > 0)  # same family
    assert cfg.tie_embeddings == full.model.tie_embeddings and cfg.norm_topk_prob == full.model.norm_topk_prob
    assert c.tokenizer == "" and cfg.vocab_size >= CharTokenizer().vocab_size  # "": char without init_from
    assert count_params(cfg).total < 200_000
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, CharTokenizer().vocab_size)
    logits = _init_and_forward(cfg, tokens)
    assert logits.shape == (2, 12, cfg.vocab_size) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()


def test_unknown_variant_is_rejected():
    with pytest.raises(ValueError, match="'huge'"):
        load("nano", "huge")


def test_validate_names_fields_and_numbers():
    c = load("next", "tiny")  # 8 experts, 4 heads / 2 kv heads, 8 prompts x 8 completions
    c.rl.prompts_per_step, c.rl.group_size, c.rl.minibatches = 8, 8, 3
    c.mesh.data, c.mesh.expert = 2, 3
    with pytest.raises(ValueError) as e:
        validate(c, num_devices=6, num_processes=1)
    msg = str(e.value)
    assert "8*8 = 64 is not divisible by rl.minibatches=3" in msg
    assert "model.num_experts=8 is not divisible by mesh.expert=3" in msg

    c = load("nano", "tiny")
    c.mesh.data, c.mesh.tensor = 1, 3
    c.rl.prompts_per_step, c.rl.minibatches = 8, 16  # minibatches of 4 sequences over 8 batch shards
    with pytest.raises(ValueError) as e:
        validate(c, num_devices=3, num_processes=1)
    assert "model.num_heads=4 is not divisible by mesh.tensor=3" in str(e.value)
    with pytest.raises(ValueError, match=r"minibatch of 4 sequences .* not divisible by the 8 batch shards"):
        c.mesh.tensor = 1
        c.mesh.data = -1
        validate(c, num_devices=8, num_processes=1)
    with pytest.raises(ValueError, match="only one mesh axis may be -1"):
        c.mesh.fsdp = -1
        validate(c, num_devices=8, num_processes=1)
