"""A workdir's identity files: written whole, readable by the user's group, and a run of another model or
tokenizer refused naming what differs (the CLI's refusals: tests/test_cli.py)."""
import json
import os

import pytest

from tests.test_tokenizer import _save_bpe
from zenjax import workdir
from zenjax.tokenizer import load_tokenizer
from zenjax.weights import umask

MODEL = {"model_type": "qwen3", "vocab_size": 384, "hidden_size": 64, "mlp_only_layers": (1,)}


def test_identity_is_written_whole_and_refuses_another_model_or_tokenizer(tmp_path):
    _save_bpe(tmp_path / "tok", generation_eos=[0])
    tok = load_tokenizer(str(tmp_path / "tok"))
    run = tmp_path / "run"
    workdir.write_identity(str(run), MODEL, json.dumps({"name": "a", "tokenizer": str(tmp_path / "tok")}), tok)
    assert not [n for n in os.listdir(run) if ".tmp-" in n], "a temporary file was left"
    assert all(os.stat(run / n).st_mode & 0o777 == 0o666 & ~umask() for n in os.listdir(run))
    # The tokenizer travels with the workdir: the same ids, and generation stops at its EOS ids.
    assert load_tokenizer(str(run)).hf.get_vocab() == tok.hf.get_vocab()
    assert json.loads((run / "generation_config.json").read_text())["eos_token_id"] == list(tok.eos_ids) == [2, 0]

    workdir.check_identity(str(run), MODEL, tok, "a")  # the same run resumes (tuples compared as JSON lists)
    with pytest.raises(ValueError, match=r"holds a run of another model or tokenizer \('a' vs 'b': hidden_size 64 "
                                         r"vs 128\); pass another --workdir, or the config it was trained with"):
        workdir.check_identity(str(run), dict(MODEL, hidden_size=128), tok, "b")
    _save_bpe(tmp_path / "other", generation_eos=[1])  # the same vocabulary, other EOS ids: other completions
    with pytest.raises(ValueError, match="tokenizer"):
        workdir.check_identity(str(run), MODEL, load_tokenizer(str(tmp_path / "other")), "b")
    with pytest.raises(ValueError, match="tokenizer"):
        workdir.check_identity(str(run), MODEL, load_tokenizer("char"), "b")
    assert workdir.same_vocabulary(load_tokenizer(str(tmp_path / "other")), str(run))
    assert not workdir.same_vocabulary(load_tokenizer("char"), str(run))
