"""python -m convert on Qwen3-Omni-MoE thinker checkpoints: a saved Qwen3OmniMoeThinkerForConditionalGeneration
-> Orbax -> HF bit for bit and loadable by transformers with the same logits, a whole Qwen3-Omni-MoE checkpoint
(thinker under `thinker.`, talker and code2wav skipped), `inspect`, and a missing tensor named on one line."""
import json
import os

import numpy as np
import pytest
import safetensors.torch
import torch
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeThinkerForConditionalGeneration

from convert.describe import describe
from convert.hf_to_orbax import hf_to_orbax
from convert.orbax_to_hf import orbax_to_hf
from tests.test_convert import TOKENIZER_FILES, _assert_same_tensors, _hf_tensors, _rewrite, _run_cli
from tests.test_omni import random_thinker
from zenjax import weights
from zenjax.models.omni import OmniConfig


def _save_thinker(directory):
    """A random tiny thinker saved as transformers saves it (weights as tests/test_omni.py draws them)."""
    model = random_thinker()
    model.save_pretrained(directory)
    for name, text in TOKENIZER_FILES.items():
        with open(os.path.join(directory, name), "w") as f:
            f.write(text)
    return model


def _logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens)).logits.float().numpy()


TOKENS = np.random.default_rng(0).integers(0, 280, (2, 7))  # text only: below the media token ids


@pytest.fixture(scope="module")
def thinker(tmp_path_factory):
    """A thinker converted through the CLI there and back."""
    root = tmp_path_factory.mktemp("omni")
    ref = _save_thinker(root / "hf")
    res = _run_cli("hf-to-orbax", "--hf", root / "hf", "--out", root / "weights")
    assert res.returncode == 0, res.stderr
    res = _run_cli("orbax-to-hf", "--orbax", root / "weights", "--out", root / "back")
    assert res.returncode == 0, res.stderr
    return root, ref


def test_round_trip_is_bit_identical_and_loads_in_transformers(thinker):
    root, ref = thinker
    _assert_same_tensors(root / "hf", root / "back")
    back = json.loads((root / "back" / "config.json").read_text())
    assert back["model_type"] == "qwen3_omni_moe_thinker"
    assert OmniConfig.from_hf(back) == OmniConfig.from_hf(root / "hf")
    assert set(TOKENIZER_FILES) <= set(os.listdir(root / "back"))
    model, info = Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained(
        root / "back", output_loading_info=True, dtype=torch.float32)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys, no errors
    np.testing.assert_array_equal(_logits(model.eval(), TOKENS), _logits(ref, TOKENS))


def test_weights_dir_records_the_thinker_config(thinker):
    root, _ = thinker
    cfg = weights.read_config(root / "weights")
    assert isinstance(cfg, OmniConfig) and cfg == OmniConfig.from_hf(root / "hf")
    assert json.loads((root / "weights" / "config.json").read_text())["model_type"] == "qwen3_omni_moe_thinker"
    reader = weights.ParamsReader(weights.locate(root / "weights").params_dir)
    reader.check(cfg)
    assert {p[0] for p in reader.paths()} == {"text", "visual", "audio_tower"}


def test_inspect_counts_parameters_per_tower(thinker):
    root, ref = thinker
    want = {"text": 0, "visual": 0, "audio_tower": 0}
    for name, t in _hf_tensors(root / "hf").items():  # the saved names: model.*, lm_head.weight, and the towers'
        tower = name.split(".")[0]
        want["text" if tower in ("model", "lm_head") else tower] += t.numel()
    for d in ("hf", "weights"):
        out = describe(str(root / d))
        assert "matches the config: yes" in out, out
        assert f"parameters: {sum(p.numel() for p in ref.parameters()):,}" in out
        for t, n in want.items():
            assert f"  {t}: {n:,}\n" in out + "\n", (t, out)
        assert "text.hidden_size: 32" in out and "vision.num_layers: 2" in out


def test_whole_omni_checkpoint_converts_its_thinker(thinker, tmp_path, capsys):
    root, _ = thinker
    src = tmp_path / "omni"
    os.makedirs(src)
    tensors = {"thinker." + k: v for k, v in _hf_tensors(root / "hf").items()}
    tensors.update({"talker.model.norm.weight": torch.ones(4), "talker.codec_head.weight": torch.ones(2, 4),
                    "code2wav.pre_transformer.norm.weight": torch.ones(4)})
    safetensors.torch.save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    thinker_cfg = json.loads((root / "hf" / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({"model_type": "qwen3_omni_moe", "thinker_config": thinker_cfg,
                                                 "talker_config": {}, "code2wav_config": {}}))
    assert "matches the config: yes" in describe(str(src))
    hf_to_orbax(str(src), str(tmp_path / "weights"))
    assert "skipping 3 tensors not part of the thinker (under code2wav., talker.)" in capsys.readouterr().out
    orbax_to_hf(str(tmp_path / "weights"), str(tmp_path / "back"))
    _assert_same_tensors(root / "hf", tmp_path / "back")  # a standalone thinker


def test_missing_tensor_is_named_on_one_line(thinker, tmp_path):
    root, _ = thinker
    src = tmp_path / "hf"
    os.makedirs(src)
    for f in os.listdir(root / "hf"):
        (src / f).write_bytes((root / "hf" / f).read_bytes())
    _rewrite(src, lambda t: t.pop("visual.blocks.1.attn.qkv.bias"))
    res = _run_cli("hf-to-orbax", "--hf", src, "--out", tmp_path / "out")
    assert res.returncode == 2  # a user error
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.stderr, res.stderr
    assert "missing tensors ['visual.blocks.1.attn.qkv.bias']" in lines[0]
    assert sorted(os.listdir(tmp_path)) == ["hf"]
