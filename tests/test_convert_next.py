"""python -m convert on a Qwen3-Next checkpoint (hub-style config keys, an MTP head): HF -> Orbax -> HF bit for bit
with the MTP tensors, logits equal transformers' on both sides, and broken inputs refused by name."""
import dataclasses
import json
import os

import jax
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
from flax import nnx

from convert.__main__ import main
from convert.hf_to_orbax import hf_to_orbax
from convert.orbax_to_hf import orbax_to_hf
from tests.hf_util import next_config, save_random
from zenjax import weights
from zenjax.models.qwen3 import Qwen3

MTP = {"mtp.fc.weight": (48, 96), "mtp.norm.weight": (48,), "mtp.layers.0.self_attn.q_proj.weight": (128, 48)}


def _tensors(directory):
    out = {}
    for f in sorted(os.listdir(directory)):
        if f.endswith(".safetensors"):
            out.update(safetensors.torch.load_file(os.path.join(directory, f)))
    return out


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A random Qwen3-Next checkpoint as the hub ships it: old config keys (num_experts, rope_theta,
    partial_rotary_factor, full_attention_interval; no layer_types), per-expert tensors, an MTP head (bfloat16)."""
    d = tmp_path_factory.mktemp("next_hub")
    ref = save_random(next_config(), d)
    tensors = safetensors.torch.load_file(d / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    tensors.update({k: torch.randn(s, generator=g).to(torch.bfloat16) for k, s in MTP.items()})
    safetensors.torch.save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    c = json.loads((d / "config.json").read_text())
    rope = c.pop("rope_parameters")
    c.update(rope_theta=rope["rope_theta"], partial_rotary_factor=rope["partial_rotary_factor"],
             full_attention_interval=4)
    del c["layer_types"]
    (d / "config.json").write_text(json.dumps(c))
    return d, ref


def _logits(model, tokens):
    return np.asarray(jax.jit(lambda m, t: m(t)[0])(model, tokens))


def test_round_trip_is_bit_identical_with_the_mtp_head_and_transformers_loads_it(hub, tmp_path):
    src, ref = hub
    w = hf_to_orbax(str(src), str(tmp_path / "w"))
    assert sorted(os.listdir(os.path.join(w, weights.CARRIED))) == ["model.safetensors"]
    cfg, params = weights.load_weights(w, dtype="float32")
    assert (cfg.full_attention_interval, cfg.num_experts, cfg.partial_rotary_factor) == (4, 6, 0.25)
    cfg = dataclasses.replace(cfg, dtype="float32")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen3(cfg, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, params)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(tokens)).logits.numpy()
    # float32 both sides, summed in other orders: ~1e-7 of the logits' scale.
    np.testing.assert_array_less(np.abs(_logits(nnx.merge(graphdef, state), tokens) - want).max(),
                                 1e-4 * np.abs(want).max())

    out = orbax_to_hf(w, str(tmp_path / "hf"))
    before, after = _tensors(src), _tensors(out)
    assert sorted(before) == sorted(after) and set(MTP) <= set(after)
    for k, t in before.items():
        assert after[k].dtype == t.dtype and torch.equal(after[k], t), k
    exported = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(exported).__name__ == "Qwen3NextForCausalLM"
    with torch.no_grad():
        np.testing.assert_array_equal(exported(input_ids=torch.tensor(tokens)).logits.numpy(), want)


@pytest.mark.parametrize("case", ["missing", "shape", "tensor_axis"])
def test_broken_checkpoints_fail_by_name_and_write_nothing(hub, tmp_path, capsys, case):
    src, _ = hub
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((src / "config.json").read_text())
    tensors = safetensors.torch.load_file(src / "model.safetensors")
    name = "model.layers.1.linear_attn.in_proj_ba.weight"
    if case == "missing":
        del tensors[name]
    elif case == "shape":
        tensors[name] = tensors[name][:-2]
    safetensors.torch.save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    mesh = ["--mesh", "tensor=3"] if case == "tensor_axis" else []
    assert main(["hf-to-orbax", "--hf", str(bad), "--out", str(tmp_path / "out"), *mesh]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert ("linear_num_key_heads=2 does not divide over tensor=3" in err if case == "tensor_axis" else name in err)
    assert not os.path.exists(tmp_path / "out")
