"""Prompt sets for RL: JSONL / Parquet files or built-in synthetic tasks, served by a grain pipeline.

An item is a dict {"id": str, "prompt": str | list of {"role", "content"} messages, "answer": str | None,
"tests": str | None}. Every source keeps a fixed held-out eval split (`eval_items`) that does not depend on
the training seed; `make_prompt_source` returns the rest.

Synthetic tasks (no downloads, deterministic, answer is the whole completion before eos):
- "arithmetic": "a<op>b=" -> the result, e.g. "3+5=" -> "8";
- "reverse": "rev <digits>=" -> the digits reversed, e.g. "rev 382=" -> "283" (use the "exact" reward).
"""

from __future__ import annotations

import glob
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import grain
import ml_collections
import pyarrow.parquet as pq

from zenjax.tokenizer import Tokenizer

log = logging.getLogger(__name__)

SYNTHETIC_TASKS = ("arithmetic", "reverse")
_SPLIT_SEED = 0  # the eval split never moves with the training seed


def default_data_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.source = "arithmetic"  # "arithmetic" | "reverse" | a .jsonl / .parquet file or glob of them
    c.prompt_field = "prompt"  # file field with the prompt: a string or a list of {"role", "content"} messages
    c.answer_field = "answer"  # file field with the reference answer ("" = none)
    c.tests_field = "tests"  # file field with Python test code, a string or list of strings ("" = none)
    c.id_field = "id"  # file field with a unique id ("" or absent = file name and row number)
    c.max_prompt_len = 512  # prompts with more tokens are dropped (counted in PromptLoader.stats and logged)
    c.eval_size = 16  # items held out for eval, a fixed pseudo-random choice
    c.operand_digits = 1  # arithmetic: digits per operand
    c.ops = "+"  # arithmetic: operators to draw from, any of "+-*"
    c.reverse_len = 3  # reverse: number of digits to reverse
    return c


# -------------------------------------------------------------------------------------------- synthetic

def _arithmetic(cfg) -> tuple[int, Any]:
    if cfg.operand_digits < 1 or not cfg.ops or set(cfg.ops) - set("+-*"):
        raise ValueError(f"arithmetic needs operand_digits >= 1 and ops from '+-*', got {cfg.operand_digits}, "
                         f"{cfg.ops!r}")
    n, ops = 10 ** cfg.operand_digits, cfg.ops
    fns = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}

    def item(k):
        op, rest = divmod(k, n * n)
        a, b = divmod(rest, n)
        text = f"{a}{ops[op]}{b}"
        return {"id": f"arithmetic:{text}", "prompt": text + "=", "answer": str(fns[ops[op]](a, b)), "tests": None}

    return len(ops) * n * n, item


def _reverse(cfg) -> tuple[int, Any]:
    if cfg.reverse_len < 1:
        raise ValueError(f"reverse needs reverse_len >= 1, got {cfg.reverse_len}")

    def item(k):
        s = str(k).zfill(cfg.reverse_len)
        return {"id": f"reverse:{s}", "prompt": f"rev {s}=", "answer": s[::-1], "tests": None}

    return 10 ** cfg.reverse_len, item


class _Shuffled(Sequence):
    """Positions [start, stop) of a fixed pseudo-random order of `size` items, each built on access."""

    def __init__(self, size: int, make, start: int, stop: int):
        self._size, self._make, self._start, self._len = size, make, start, stop - start

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self._len:
            raise IndexError(i)
        j = self._start + i
        k = grain.experimental.index_shuffle(j, max_index=self._size - 1, seed=_SPLIT_SEED, rounds=4)
        return self._make(k)


# ------------------------------------------------------------------------------------------------ files

def _read_rows(pattern: str, fields: list[str]) -> list[tuple[str, int, dict]]:
    """(path, n, row): n is the line number (from 1) in JSONL, the row index (from 0) in Parquet."""
    paths = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    if not paths or not all(os.path.isfile(p) for p in paths):
        raise ValueError(f"data.source {pattern!r} is neither a synthetic task {SYNTHETIC_TASKS} nor existing files")
    rows = []
    for path in paths:
        if path.endswith(".parquet"):
            names = pq.read_schema(path).names
            table = pq.read_table(path, columns=[f for f in fields if f in names])
            rows += [(path, i, r) for i, r in enumerate(table.to_pylist())]
        elif path.endswith((".jsonl", ".json")):
            with open(path, encoding="utf-8") as f:
                for i, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            row = json.loads(line)
                        except json.JSONDecodeError as e:
                            raise ValueError(f"{path}:{i}: not a JSON object per line: {e}") from None
                        if not isinstance(row, dict):
                            raise ValueError(f"{path}:{i}: not a JSON object per line")
                        rows.append((path, i, row))
        else:
            raise ValueError(f"{path}: unsupported file type (use .jsonl / .json lines or .parquet)")
    return rows


def _to_item(path: str, row_no: int, row: dict, cfg) -> dict:
    where = f"{path} row {row_no}" if path.endswith(".parquet") else f"{path}:{row_no}"
    if cfg.prompt_field not in row:
        raise ValueError(f"{where}: no prompt field {cfg.prompt_field!r} (fields: {sorted(row)})")
    prompt = row[cfg.prompt_field]
    if not isinstance(prompt, str):
        if not isinstance(prompt, (list, tuple)) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in prompt):
            raise ValueError(f"{where}: the prompt must be a string or a list of {{role, content}} messages")
        prompt = [{"role": m["role"], "content": m["content"]} for m in prompt]

    def field(name):
        return row.get(name) if name else None

    answer, tests = field(cfg.answer_field), field(cfg.tests_field)
    if isinstance(tests, (list, tuple)):
        tests = "\n".join(map(str, tests))
    rid = field(cfg.id_field)
    return {"id": str(rid) if rid is not None else f"{os.path.basename(path)}:{row_no}", "prompt": prompt,
            "answer": None if answer is None else str(answer), "tests": None if tests is None else str(tests)}


def _split(cfg) -> tuple[int, Any]:
    """(size, item_of_position) for the configured source, positions already in the fixed split order."""
    if cfg.source == "arithmetic":
        size, make = _arithmetic(cfg)
    elif cfg.source == "reverse":
        size, make = _reverse(cfg)
    else:
        fields = [f for f in (cfg.prompt_field, cfg.answer_field, cfg.tests_field, cfg.id_field) if f]
        items = [_to_item(p, i, r, cfg) for p, i, r in _read_rows(cfg.source, fields)]
        size, make = len(items), items.__getitem__
    if not 0 <= cfg.eval_size < size:
        raise ValueError(f"data.eval_size={cfg.eval_size} must be in [0, {size}) for source {cfg.source!r} "
                         f"with {size} items")
    return size, make


def eval_items(cfg) -> list[dict]:
    """The fixed held-out items (the same for every training seed)."""
    size, make = _split(cfg)
    return list(_Shuffled(size, make, 0, cfg.eval_size))


def make_prompt_source(cfg) -> Sequence[dict]:
    """The training items: every item of the source except the eval ones."""
    size, make = _split(cfg)
    return _Shuffled(size, make, cfg.eval_size, size)


# ----------------------------------------------------------------------------------------------- loader

class PromptLoader:
    """Endless batches of `batch_size` training items, each with "prompt_ids", for this process.

    Order: grain's global shuffle of the training items, reshuffled every epoch, from `seed`; process p of
    P takes stream positions p, p + P, ... Prompts longer than `cfg.max_prompt_len` tokens are dropped (never
    truncated: a cut prompt loses its question or its generation prompt) and counted in `stats`.
    `get_state` / `set_state` (JSON-serialisable) resume exactly where the iterator was.
    """

    def __init__(self, cfg, tokenizer: Tokenizer, *, batch_size: int, seed: int, process_index: int = 0,
                 process_count: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
        if cfg.max_prompt_len < 1:
            raise ValueError(f"data.max_prompt_len must be >= 1, got {cfg.max_prompt_len}")
        self.items = make_prompt_source(cfg)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_prompt_len = cfg.max_prompt_len
        ds = grain.MapDataset.source(self.items).shuffle(seed=seed).repeat()[process_index::process_count]
        # Items are in memory and tokenised here, so prefetch threads would only contend for the GIL.
        self._it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)).__iter__()
        self.stats = {"seen": 0, "dropped_too_long": 0}

    def __iter__(self):
        return self

    def __next__(self) -> list[dict]:
        batch, dropped_in_a_row = [], 0
        while len(batch) < self.batch_size:
            item = next(self._it)
            ids = self.tokenizer.encode_prompt(item["prompt"])
            self.stats["seen"] += 1
            if len(ids) > self.max_prompt_len:
                self.stats["dropped_too_long"] += 1
                n = self.stats["dropped_too_long"]
                if n & (n - 1) == 0:  # 1, 2, 4, 8, ...: visible without flooding the log
                    log.warning("dropped prompt %s: %d tokens > max_prompt_len %d (%d of %d seen so far dropped)",
                                item["id"], len(ids), self.max_prompt_len, n, self.stats["seen"])
                dropped_in_a_row += 1
                if dropped_in_a_row > len(self.items):
                    raise ValueError(f"every prompt is longer than data.max_prompt_len={self.max_prompt_len}")
                continue
            dropped_in_a_row = 0
            batch.append({**item, "prompt_ids": ids})
        return batch

    def get_state(self) -> dict:
        return {"iterator": self._it.get_state(), "stats": dict(self.stats)}

    def set_state(self, state: dict) -> None:
        self._it.set_state(state["iterator"])
        self.stats = dict(state["stats"])
