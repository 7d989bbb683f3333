"""Prompt sets for RL: JSONL / Parquet files or built-in synthetic tasks, served by a grain pipeline.

An item is a dict {"id": str, "prompt": str | list of {"role", "content"} messages, "answer": str | None,
"tests": str | None}, and for multimodal items "images" (uint8 [H, W, 3] RGB arrays) and "audios" (float32
[samples] mono at 16 kHz). Items read from files carry "image_paths" / "audio_paths" instead, decoded by
`load_media` only when served (a dataset's media need not fit in memory). Every source keeps a fixed held-out
eval split (`eval_items`) that does not depend on the training seed; `make_prompt_source` returns the rest.

Synthetic tasks (no downloads, deterministic, answer is the whole completion before eos):
- "arithmetic": "a<op>b=" -> the result, e.g. "3+5=" -> "8";
- "reverse": "rev <digits>=" -> the digits reversed, e.g. "rev 382=" -> "283" (use the "exact" reward);
- "see_hear": one image of 1..4 coloured squares, one per quadrant, and one clip of two pure tones; the prompt
  alternates between "count=" -> the number of squares and "high=" -> "1" if the first tone is higher, else "2".
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import wave
from collections.abc import Callable, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from zenjax.media import SAMPLING_RATE, rgb_HWC
from zenjax.tokenizer import Tokenizer

log = logging.getLogger(__name__)

SYNTHETIC_TASKS = ("arithmetic", "reverse", "see_hear")
_SPLIT_SEED = 0  # the eval split never moves with the training seed


def default_data_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.source = "arithmetic"  # "arithmetic" | "reverse" | "see_hear" | a .jsonl / .parquet file or glob of them
    c.prompt_field = "prompt"  # file field with the prompt: a string or a list of {"role", "content"} messages
    c.answer_field = "answer"  # file field with the reference answer ("" = none)
    c.tests_field = "tests"  # file field with Python test code, a string or list of strings ("" = none)
    c.id_field = "id"  # file field with a unique id ("" or absent = file name and row number)
    c.image_field = "images"  # file field with an image path or a list of them, relative to the file ("" = none)
    c.audio_field = "audios"  # file field with a WAV path or a list of them, relative to the file ("" = none)
    c.max_prompt_len = 512  # prompts with more tokens are dropped (counted in PromptLoader.stats and logged)
    c.eval_size = 16  # items held out for eval, a fixed pseudo-random choice
    c.operand_digits = 1  # arithmetic: digits per operand
    c.ops = "+"  # arithmetic: operators to draw from, any of "+-*"
    c.reverse_len = 3  # reverse: number of digits to reverse
    c.images = 0  # images in every prompt (an Omni thinker's runs: one media layout, one compile)
    c.audios = 0  # audio clips in every prompt
    c.image_size = 64  # images are resized to this square side, a multiple of the vision patch * merge (32)
    c.audio_seconds = 0.5  # audio clips are cut or zero-padded to this length: one shape per run, one compile
    c.tone_seconds = 0.25  # see_hear: length of each of the two tones
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


_COLOURS = np.array([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)], np.uint8)
_TONES_HZ = 200 * 2 ** (np.arange(8) * 4 / 7)  # 8 log-spaced steps from 200 to 3200 Hz, ~0.57 octave apart


def _see_hear(cfg) -> tuple[int, Any]:
    S = cfg.image_size
    if S < 32 or S % 32:
        raise ValueError(f"see_hear needs data.image_size a multiple of 32 and >= 32, got {S}")
    if cfg.tone_seconds < 0.02:  # a few periods of the lowest tone, so that its pitch is well defined
        raise ValueError(f"see_hear needs data.tone_seconds >= 0.02, got {cfg.tone_seconds}")
    Q, pairs = S // 2, len(_TONES_HZ) * (len(_TONES_HZ) - 1)
    t = np.arange(round(cfg.tone_seconds * SAMPLING_RATE)) / SAMPLING_RATE

    def item(k):
        # k -> (question, count, tone pair) exactly, so both questions see every count and every pair; the
        # layout (quadrants, colours, sizes, jitter) is pseudo-random from k.
        question, rest = k % 2, k // 2
        n, pair = 1 + rest % 4, (rest // 4) % pairs
        rng = np.random.default_rng(k)
        image_HWC = np.zeros((S, S, 3), np.uint8)
        for q, colour in zip(rng.permutation(4)[:n], rng.integers(len(_COLOURS), size=n)):
            side = int(rng.integers(Q // 3, Q // 2 + 1))
            # A free pixel at each quadrant edge: squares in neighbouring quadrants never touch.
            y, x = (q // 2) * Q + rng.integers(1, Q - side), (q % 2) * Q + rng.integers(1, Q - side)
            image_HWC[y:y + side, x:x + side] = _COLOURS[colour]
        a, b = divmod(pair, len(_TONES_HZ) - 1)
        b += b >= a  # the second tone is any other one
        audio_T = np.concatenate([0.5 * np.sin(2 * np.pi * _TONES_HZ[i] * t) for i in (a, b)]).astype(np.float32)
        prompt, answer = ("count=", str(n)) if question == 0 else ("high=", "1" if a > b else "2")
        return {"id": f"see_hear:{k}", "prompt": prompt, "answer": answer, "tests": None,
                "images": [image_HWC], "audios": [audio_T]}

    return 2 * 4 * pairs * 16, item  # 16 layouts per (question, count, pair): 7168 items


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
    item = {"id": str(rid) if rid is not None else f"{os.path.basename(path)}:{row_no}", "prompt": prompt,
            "answer": None if answer is None else str(answer), "tests": None if tests is None else str(tests)}
    for kind, name in (("image", cfg.image_field), ("audio", cfg.audio_field)):
        paths = field(name)
        if paths is None or paths == []:
            continue
        if isinstance(paths, str):
            paths = [paths]
        if not isinstance(paths, (list, tuple)) or not all(isinstance(p, str) and p for p in paths):
            raise ValueError(f"{where}: field {name!r} must be a path or a list of paths, got {paths!r}")
        resolved = [os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), p)) for p in paths]
        for p, full in zip(paths, resolved):
            if not os.path.isfile(full):
                raise ValueError(f"{where}: {kind} {p!r} ({full}) does not exist")
        item[f"{kind}_paths"] = resolved
    return item


def _read_image(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return rgb_HWC(image)


def _read_wav(path: str) -> np.ndarray:
    with wave.open(path, "rb") as f:
        channels, width, rate = f.getnchannels(), f.getsampwidth(), f.getframerate()
        raw = f.readframes(f.getnframes())
    if width not in (1, 2, 3, 4):
        raise ValueError(f"unsupported sample width of {width} bytes")
    if len(raw) < width * channels:
        raise ValueError("no samples")
    if width == 3:  # no numpy int24: place the 3 bytes in the top of an int32, shift back with the sign
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        x = ((b[:, 0] << 8) | (b[:, 1] << 16) | (b[:, 2] << 24)) >> 8
    else:
        x = np.frombuffer(raw, {1: np.uint8, 2: "<i2", 4: "<i4"}[width]).astype(np.int64)
        x = x - 128 if width == 1 else x  # 8-bit WAV is unsigned
    x_T = (x.reshape(-1, channels) / 2.0 ** (8 * width - 1)).mean(axis=1)  # [-1, 1], mixed down to mono
    if rate != SAMPLING_RATE:
        from scipy.signal import resample_poly  # scipy only for files that need it

        g = math.gcd(SAMPLING_RATE, rate)
        x_T = resample_poly(x_T, SAMPLING_RATE // g, rate // g)
    return x_T.astype(np.float32)


def load_media(item: dict) -> dict:
    """The item with "images" / "audios" decoded from its "image_paths" / "audio_paths" (which it no longer has)."""
    if "image_paths" not in item and "audio_paths" not in item:
        return item
    out = {k: v for k, v in item.items() if k not in ("image_paths", "audio_paths")}
    for kind, read, need in (("image", _read_image, "an image file PIL can open"),
                             ("audio", _read_wav, "a PCM WAV file")):
        arrays = []
        for path in item.get(f"{kind}_paths", ()):
            try:
                arrays.append(read(path))
            except Exception as e:  # PIL, wave and numpy raise many types; each failure here is the file's
                why = str(e) or type(e).__name__  # a file cut short raises a bare EOFError
                raise ValueError(f"prompt {item['id']!r}: cannot read {kind} {path!r}: {why}; {kind} must be "
                                 f"{need}") from None
        if arrays:
            out[f"{kind}s"] = arrays
    return out


def _split(cfg) -> tuple[int, Any]:
    """(size, item_of_position) for the configured source, positions already in the fixed split order."""
    if cfg.source == "arithmetic":
        size, make = _arithmetic(cfg)
    elif cfg.source == "reverse":
        size, make = _reverse(cfg)
    elif cfg.source == "see_hear":
        size, make = _see_hear(cfg)
    else:
        fields = [f for f in (cfg.prompt_field, cfg.answer_field, cfg.tests_field, cfg.id_field, cfg.image_field,
                              cfg.audio_field) if f]
        items = [_to_item(p, i, r, cfg) for p, i, r in _read_rows(cfg.source, fields)]
        if not items:
            raise ValueError(f"data.source {cfg.source!r} holds no prompts; give it one JSON object per line")
        size, make = len(items), items.__getitem__
    if not 0 <= cfg.eval_size < size:
        raise ValueError(f"data.eval_size={cfg.eval_size} must be in [0, {size}) for source {cfg.source!r} "
                         f"with {size} items")
    return size, make


def eval_items(cfg) -> list[dict]:
    """The fixed held-out items (the same for every training seed), media decoded."""
    size, make = _split(cfg)
    return [load_media(it) for it in _Shuffled(size, make, 0, cfg.eval_size)]


def make_prompt_source(cfg) -> Sequence[dict]:
    """The training items: every item of the source except the eval ones."""
    size, make = _split(cfg)
    return _Shuffled(size, make, cfg.eval_size, size)


# ----------------------------------------------------------------------------------------------- loader

class PromptLoader:
    """Endless batches of `batch_size` training items, media decoded, each with "prompt_ids", for this process.

    `prepare(item) -> dict` gives the fields to add to each item, at least "prompt_ids" (whose length the
    filter below counts); the default tokenises the text prompt. A multimodal model's `prepare` expands the
    media placeholders there.

    Order: grain's global shuffle of the training items, reshuffled every epoch, from `seed`; process p of
    P takes stream positions p, p + P, ... Prompts longer than `cfg.max_prompt_len` tokens are dropped (never
    truncated: a cut prompt loses its question or its generation prompt) and counted in `stats`.
    `get_state` / `set_state` (JSON-serialisable) resume exactly where the iterator was.
    """

    def __init__(self, cfg, tokenizer: Tokenizer, *, batch_size: int, seed: int, process_index: int = 0,
                 process_count: int = 1, prepare: Callable[[dict], dict] | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
        if cfg.max_prompt_len < 1:
            raise ValueError(f"data.max_prompt_len must be >= 1, got {cfg.max_prompt_len}")
        self.items = make_prompt_source(cfg)
        self.tokenizer = tokenizer
        self.prepare = prepare or self._tokenize
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
            item = load_media(next(self._it))
            fields = self.prepare(item)
            ids = fields["prompt_ids"]
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
            batch.append({**item, **fields})
        return batch

    def _tokenize(self, item: dict) -> dict:
        try:
            return {"prompt_ids": self.tokenizer.encode_prompt(item["prompt"])}
        except ValueError as e:  # named by the prompt's id: its file:line when the file gives no ids
            raise ValueError(f"prompt {item['id']!r}: {e}") from None

    def get_state(self) -> dict:
        return {"iterator": self._it.get_state(), "stats": dict(self.stats)}

    def set_state(self, state: dict) -> None:
        self._it.set_state(state["iterator"])
        self.stats = dict(state["stats"])
