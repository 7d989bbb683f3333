"""A training workdir's identity: the model and tokenizer its checkpoints belong to, checked before a run writes
anything there and written, each file atomically, once the run starts.

    <workdir>/config.json             the model, HF-style (what `convert orbax-to-hf` exports)
    <workdir>/run_config.json         the resolved run config
    <workdir>/tokenizer*, ...         the run's HF tokenizer (none for the built-in "char" one)
    <workdir>/generation_config.json  the ids generation stops at, so every export stops at EOS
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping

from zenjax.tokenizer import HFTokenizer, Tokenizer, load_tokenizer
from zenjax.weights import umask

CONFIG, RUN_CONFIG, GENERATION = "config.json", "run_config.json", "generation_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # an HF tokenizer directory has one of these


def has_tokenizer(directory: str) -> bool:
    return any(os.path.isfile(os.path.join(directory, n)) for n in TOKENIZER_FILES)


def check_usable(workdir: str) -> None:
    """A directory this process can write, or one it can create."""
    path = os.path.abspath(workdir)
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        what = "is a file" if existing == path else f"cannot be created: {existing} is a file"
        raise ValueError(f"--workdir={workdir}: {path} {what}; pass a directory, e.g. --workdir=runs/mine")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--workdir={workdir}: {existing} is not writable (read-only filesystem or permissions); "
                         "pass a --workdir on a writable filesystem")


def _tokenizer_key(tok: Tokenizer):
    """What decides the meaning of token ids: the vocabulary and the EOS ids."""
    if isinstance(tok, HFTokenizer):
        return sorted(tok.hf.get_vocab().items()), tok.eos_ids
    return type(tok).__name__, tok.vocab_size, tok.eos_ids


def same_vocabulary(tokenizer: Tokenizer, directory: str) -> bool:
    """Whether `tokenizer` maps text to the ids of the HF tokenizer in `directory`."""
    other = load_tokenizer(directory)
    return isinstance(tokenizer, HFTokenizer) and tokenizer.hf.get_vocab() == other.hf.get_vocab()


def check_identity(workdir: str, model_hf: Mapping, tokenizer: Tokenizer, name: str) -> None:
    """Refuses to resume a workdir whose model or tokenizer differs from this run's, naming the differences."""
    path = os.path.abspath(workdir)
    if not os.path.isfile(os.path.join(path, CONFIG)):
        return  # a new workdir
    with open(os.path.join(path, CONFIG)) as f:
        theirs = json.load(f)
    ours = json.loads(json.dumps(dict(model_hf)))  # tuples as the file has them: lists
    diffs = [f"{k} {theirs.get(k)!r} vs {v!r}" for k, v in ours.items() if theirs.get(k) != v]
    try:
        with open(os.path.join(path, RUN_CONFIG)) as f:
            run = json.load(f)
    except (OSError, ValueError):
        run = {}
    if not diffs and (run.get("tokenizer") == "char" or has_tokenizer(path)):
        stored = load_tokenizer("char" if run.get("tokenizer") == "char" else path)
        if _tokenizer_key(stored) != _tokenizer_key(tokenizer):
            diffs.append(f"tokenizer ({stored.vocab_size} vs {tokenizer.vocab_size} tokens, or other ids)")
    if diffs:
        raise ValueError(f"{path} holds a run of another model or tokenizer ({run.get('name', '?')!r} vs {name!r}: "
                         f"{'; '.join(diffs[:4])}{'; ...' if len(diffs) > 4 else ''}); pass another --workdir, or "
                         f"the config it was trained with (its {RUN_CONFIG})")


def _write(path: str, text: str) -> None:
    """Written whole or not at all: a temporary sibling renamed over `path`."""
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".tmp-", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp's 0600 would hide the file from the user's group
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_identity(workdir: str, model_hf: Mapping, run_config_json: str, tokenizer: Tokenizer) -> None:
    """The workdir's identity files (see the module doc); an HF tokenizer's files are its own `save_pretrained`."""
    os.makedirs(workdir, exist_ok=True)
    if isinstance(tokenizer, HFTokenizer):
        tmp = tempfile.mkdtemp(prefix=".tokenizer.tmp-", dir=workdir)
        try:
            for name in tokenizer.hf.save_pretrained(tmp):
                os.replace(name, os.path.join(workdir, os.path.basename(name)))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    generation = {"eos_token_id": list(tokenizer.eos_ids), "pad_token_id": tokenizer.pad_id}
    _write(os.path.join(workdir, GENERATION), json.dumps(generation, indent=1))
    _write(os.path.join(workdir, RUN_CONFIG), run_config_json)
    _write(os.path.join(workdir, CONFIG), json.dumps(dict(model_hf), indent=1))
