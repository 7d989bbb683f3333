"""python -m convert against transformers: HF -> Orbax -> zenjax logits, HF -> Orbax -> HF bit for bit, a training
workdir -> HF, and broken inputs that must fail by name and leave nothing behind."""
import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors.torch
import torch
import transformers
from etils import epath
from flax import nnx

from convert.__main__ import main
from convert.common import DTYPES, parse_mesh, parse_size
from convert.describe import describe
from convert.hf_to_orbax import hf_to_orbax
from convert.orbax_to_hf import orbax_to_hf
from tests.hf_util import dense_config, moe_config, save_random
from zenjax import weights
from zenjax.models.qwen3 import Qwen3
from zenjax.sharding import make_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER_FILES = {"tokenizer.json": '{"fake": 1}', "tokenizer_config.json": '{"fake": 2}'}


def _save_hf(config, directory, dtype=None, **save_kw):
    """A random HF checkpoint plus stand-in tokenizer files; returns the float32 torch model."""
    model = save_random(config, directory, **save_kw)
    if dtype is not None:  # the same weights rounded, saved in another dtype
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(dtype).float())
        model.to(dtype).save_pretrained(directory, **save_kw)
        model.float()
    for name, text in TOKENIZER_FILES.items():
        with open(os.path.join(directory, name), "w") as f:
            f.write(text)
    return model


def _tokens(vocab, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (2, 7))


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens)).logits.float().numpy()


def _our_logits(path, tokens):
    cfg, params = weights.load_weights(path, dtype="float32")
    # The conversion is under test, not the expert kernels (tests/test_moe.py): the every-expert path compiles faster.
    cfg = dataclasses.replace(cfg, dtype="float32", moe_impl="reference")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen3(cfg, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, params)
    return np.asarray(jax.jit(lambda m, t: m(t)[0])(nnx.merge(graphdef, state), tokens))


def _hf_tensors(directory):
    """Every tensor of an HF dir, read by the safetensors library itself (torch tensors)."""
    out = {}
    for f in sorted(os.listdir(directory)):
        if f.endswith(".safetensors"):
            out.update(safetensors.torch.load_file(os.path.join(directory, f)))
    return out


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "convert", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": ROOT}, timeout=300)


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """An untied dense checkpoint in several files, converted once through the CLI."""
    root = tmp_path_factory.mktemp("dense")
    ref = _save_hf(dense_config(), root / "hf", max_shard_size="40KB")
    assert len([f for f in os.listdir(root / "hf") if f.endswith(".safetensors")]) > 1
    res = _run_cli("hf-to-orbax", "--hf", root / "hf", "--out", root / "weights")
    assert res.returncode == 0, res.stderr
    return root, ref


def test_dense_untied_sharded_hf_to_orbax_logits(dense):
    root, ref = dense
    tokens = _tokens(ref.config.vocab_size)
    np.testing.assert_allclose(_our_logits(root / "weights", tokens), _hf_logits(ref, tokens), atol=1e-4)
    for name, text in TOKENIZER_FILES.items():
        assert (root / "weights" / name).read_text() == text


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_tied_hf_to_orbax_logits(tmp_path, dtype):
    ref = _save_hf(dense_config(tie_word_embeddings=True), tmp_path / "hf", dtype=dtype)
    assert "lm_head.weight" not in _hf_tensors(tmp_path / "hf")
    hf_to_orbax(str(tmp_path / "hf"), str(tmp_path / "weights"))
    reader = weights.ParamsReader(tmp_path / "weights" / "params")
    assert ("lm_head",) not in reader.paths()
    assert reader.dtype(("embed",)) == (np.float32 if dtype is None else jax.numpy.bfloat16)  # as stored
    tokens = _tokens(ref.config.vocab_size)
    np.testing.assert_allclose(_our_logits(tmp_path / "weights", tokens), _hf_logits(ref, tokens), atol=1e-4)


def test_moe_hf_to_orbax_to_hf(tmp_path):
    # Layer 1 dense among MoE layers: two stacks of each kind, experts stacked per layer.
    ref = _save_hf(moe_config(num_hidden_layers=4, mlp_only_layers=[1], norm_topk_prob=True), tmp_path / "hf",
                   max_shard_size="60KB")
    hf_to_orbax(str(tmp_path / "hf"), str(tmp_path / "weights"))
    reader = weights.ParamsReader(tmp_path / "weights" / "params")
    assert reader.shape(("stacks", 2, "mlp", "gate")) == (2, 6, 48, 24)  # layers 2-3: [layers, experts, in, out]
    tokens = _tokens(ref.config.vocab_size)
    want = _hf_logits(ref, tokens)
    np.testing.assert_allclose(_our_logits(tmp_path / "weights", tokens), want, atol=1e-4)
    orbax_to_hf(str(tmp_path / "weights"), str(tmp_path / "back"), max_shard_size=parse_size("50KB"))
    _assert_same_tensors(tmp_path / "hf", tmp_path / "back")
    _assert_transformers_loads(tmp_path / "back", want, tokens)


def _assert_same_tensors(a, b):
    ta, tb = _hf_tensors(a), _hf_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape, k
        assert torch.equal(ta[k].view(torch.uint8), tb[k].view(torch.uint8)), k  # bit for bit


def _assert_transformers_loads(directory, want_logits, tokens):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True,
                                                                    dtype=torch.float32)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys, no errors
    np.testing.assert_allclose(_hf_logits(model.eval(), tokens), want_logits, atol=1e-5)


def test_dense_round_trip_is_bit_identical(dense, tmp_path):
    root, ref = dense
    orbax_to_hf(str(root / "weights"), str(tmp_path / "back"), max_shard_size=parse_size("30KB"))
    files = os.listdir(tmp_path / "back")
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", *TOKENIZER_FILES} <= set(files)
    assert len([f for f in files if f.endswith(".safetensors")]) > 1
    with open(tmp_path / "back" / "model.safetensors.index.json") as f:
        index = json.load(f)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in _hf_tensors(root / "hf").values())
    assert set(index["weight_map"].values()) == {f for f in files if f.endswith(".safetensors")}
    _assert_same_tensors(root / "hf", tmp_path / "back")
    tokens = _tokens(ref.config.vocab_size)
    _assert_transformers_loads(tmp_path / "back", _hf_logits(ref, tokens), tokens)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_round_trip_and_dtype_options(tmp_path, dtype):
    ref = _save_hf(dense_config(tie_word_embeddings=True), tmp_path / "hf", dtype=dtype)
    hf_to_orbax(str(tmp_path / "hf"), str(tmp_path / "weights"))
    orbax_to_hf(str(tmp_path / "weights"), str(tmp_path / "back"))
    assert "model.safetensors" in os.listdir(tmp_path / "back")  # one file under the default 5GB
    _assert_same_tensors(tmp_path / "hf", tmp_path / "back")
    name = str(dtype).removeprefix("torch.")
    assert json.loads((tmp_path / "back" / "config.json").read_text())["dtype"] == name
    # Stored as float32 and exported back to the half type: the same bits again (the upcast is exact).
    hf_to_orbax(str(tmp_path / "hf"), str(tmp_path / "w32"), dtype=np.dtype("float32"))
    assert weights.ParamsReader(tmp_path / "w32" / "params").dtype(("embed",)) == np.float32
    orbax_to_hf(str(tmp_path / "w32"), str(tmp_path / "back16"), dtype=DTYPES[name])
    _assert_same_tensors(tmp_path / "hf", tmp_path / "back16")
    orbax_to_hf(str(tmp_path / "w32"), str(tmp_path / "back32"))
    back32 = _hf_tensors(tmp_path / "back32")
    for k, v in ref.state_dict().items():
        if k != "lm_head.weight":  # tied: not saved
            assert back32[k].dtype == torch.float32 and torch.equal(back32[k], v), k


def test_size_and_mesh_arguments():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("1000") == 1000
    assert parse_mesh("data=1,fsdp=4") == {"data": 1, "fsdp": 4}
    with pytest.raises(ValueError, match="size '5 gigs'"):
        parse_size("5 gigs")
    with pytest.raises(ValueError, match="axis=size"):
        parse_mesh("fsdp:4")


def test_training_workdir_exports_latest_step(dense, tmp_path):
    from zenjax.checkpoint import Checkpointer

    root, ref = dense
    mesh = make_mesh(data=1, fsdp=8)
    cfg, params = weights.load_weights(root / "weights", mesh=mesh)
    leaf = params["stacks"][0]["attn"]["q"]
    assert leaf.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert leaf.addressable_shards[0].data.shape == (3, 6, 4, 16)  # restored as shards, not whole
    workdir = tmp_path / "run"
    workdir.mkdir()
    weights.write_config(str(workdir), cfg)
    ckpt = Checkpointer(workdir, save_every=1, async_save=False)
    later = jax.tree.map(lambda x: x * 2, params)  # step 2 must win over step 1
    for step, p in ((1, params), (2, later)):
        ckpt.save(step, p, {"count": jax.numpy.zeros((), "int32")}, {"step": step})
    ckpt.close()
    assert main(["orbax-to-hf", "--orbax", str(workdir), "--out", str(tmp_path / "hf")]) == 0
    with torch.no_grad():
        for p in ref.parameters():
            p.mul_(2)
    try:
        tokens = _tokens(ref.config.vocab_size)
        _assert_transformers_loads(tmp_path / "hf", _hf_logits(ref, tokens), tokens)
    finally:
        with torch.no_grad():
            for p in ref.parameters():
                p.div_(2)
    assert "step 2" in describe(str(workdir))


def test_mesh_chunks_are_device_shards(tmp_path):
    _save_hf(dense_config(), tmp_path / "hf")
    hf_to_orbax(str(tmp_path / "hf"), str(tmp_path / "weights"), mesh_shape={"fsdp": 4, "tensor": 2})
    meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(tmp_path / "weights" / "params")).tree
    assert meta["stacks"]["0"]["attn"]["q"].storage.chunk_shape == (1, 12, 2, 16)  # [layers, embed/4, heads/2, D]
    assert meta["lm_head"].storage.chunk_shape == (12, 97)  # vocab 97 does not divide by 2: kept whole


def test_inspect_hf_dir_counts_parameters(dense, capsys):
    root, ref = dense
    assert main(["inspect", str(root / "hf")]) == 0
    out = capsys.readouterr().out
    assert f"parameters: {sum(p.numel() for p in ref.parameters()):,}" in out
    assert "model.layers.2.mlp.down_proj.weight" in out and "matches the config: yes" in out
    # The stored dtype, not the compute dtype a run would choose (which read as "bfloat16" for float32 files).
    assert "param_dtype: float32" in out and "\n  dtype:" not in out


def _rewrite(directory, change):
    """Loads every tensor of an HF dir, applies `change(dict)`, saves it back as one file."""
    tensors = {}
    for f in sorted(os.listdir(directory)):
        if f.endswith(".safetensors") or f.endswith(".index.json"):
            if f.endswith(".safetensors"):
                tensors.update(safetensors.torch.load_file(os.path.join(directory, f)))
            os.remove(os.path.join(directory, f))
    change(tensors)
    safetensors.torch.save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})


def _set_config(directory, **kw):
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    with open(path, "w") as f:
        json.dump({**cfg, **kw}, f)


BROKEN = {
    "missing tensor": (lambda d: _rewrite(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
                       ValueError, r"missing tensors \['model.layers.1.mlp.up_proj.weight'\]"),
    "extra tensor": (lambda d: _rewrite(d, lambda t: t.update({"model.layers.7.extra.weight": torch.zeros(2)})),
                     ValueError, r"unexpected tensors \['model.layers.7.extra.weight'\]"),
    "wrong shape": (lambda d: _rewrite(d, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight":
                                                              torch.zeros(16, 48)})),
                    ValueError, r"model.layers.0.self_attn.k_proj.weight is \(16, 48\), expected \(32, 48\)"),
    "model_type": (lambda d: _set_config(d, model_type="llama"), ValueError, "unsupported model_type 'llama'"),
    "no config": (lambda d: os.remove(os.path.join(d, "config.json")), FileNotFoundError, "no config.json"),
    # Found only while writing: the partial output must be removed.
    "truncated file": (lambda d: os.truncate(os.path.join(d, "model.safetensors"),
                                             os.path.getsize(os.path.join(d, "model.safetensors")) - 100),
                       ValueError, "is truncated"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_hf_input_fails_by_name_and_leaves_nothing(tmp_path, case):
    break_it, error, message = BROKEN[case]
    _save_hf(dense_config(), tmp_path / "hf")
    break_it(tmp_path / "hf")
    out = tmp_path / "out"
    with pytest.raises(error, match=message):
        hf_to_orbax(str(tmp_path / "hf"), str(out))
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    _save_hf(dense_config(), tmp_path / "hf")
    _set_config(tmp_path / "hf", model_type="llama")
    assert main(["hf-to-orbax", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "out")]) == 2
    assert "error: unsupported model_type 'llama'" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_orbax_that_does_not_fit_its_config_is_refused(dense, tmp_path):
    root, _ = dense
    os.symlink(root / "weights" / "params", tmp_path / "params")
    cfg = json.loads((root / "weights" / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 4, "intermediate_size": 32}))
    with pytest.raises(ValueError, match=r"stacks.0.mlp.up is \(3, 48, 64\), expected \(4, 48, 32\)"):
        orbax_to_hf(str(tmp_path), str(tmp_path / "out"))
    with pytest.raises(FileExistsError, match="not empty"):
        orbax_to_hf(str(root / "weights"), str(root))
    assert sorted(os.listdir(tmp_path)) == ["config.json", "params"]
