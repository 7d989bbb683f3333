"""Helpers shared by the conversions: side files, dtypes, sizes, progress."""
from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
from collections.abc import Mapping

import numpy as np
from tqdm import tqdm

from zenjax.models.hf import SAFETENSORS_DTYPES

# Tokenizer and generation files that travel with the weights (never other weights, READMEs or licences).
SIDE_FILES = ("tokenizer*", "vocab*", "merges.txt", "special_tokens_map.json", "added_tokens.json",
              "chat_template*", "generation_config.json")
DTYPES = {"bfloat16": SAFETENSORS_DTYPES["BF16"], "float16": SAFETENSORS_DTYPES["F16"],
          "float32": SAFETENSORS_DTYPES["F32"]}


def copy_side_files(src: str, dst: str, hf_config: Mapping) -> list[str]:
    """The tokenizer and generation files of `src`; a generation_config.json made from the model config's token
    ids when `src` has none, so that generate() stops at EOS."""
    names = sorted(n for n in os.listdir(src)
                   if os.path.isfile(os.path.join(src, n)) and any(fnmatch.fnmatch(n, p) for p in SIDE_FILES))
    for n in names:
        shutil.copyfile(os.path.join(src, n), os.path.join(dst, n))
    if "generation_config.json" not in names:
        generation = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in hf_config}
        with open(os.path.join(dst, "generation_config.json"), "w") as f:
            json.dump({**generation, "_from_model_config": True}, f, indent=2)
    return names


def parse_dtype(name: str | None) -> np.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}: expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def parse_size(text: str | int) -> int:
    """'5GB' -> 5 * 10**9, '500MiB' -> 500 * 2**20 (transformers' convention), or bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"size {text!r}: expected e.g. 5GB, 500MB, 2GiB or a number of bytes")
    unit = (m.group(2) or "B").upper()
    scale = 1 if unit == "B" else (1024 if "I" in unit else 1000) ** ("KMGT".index(unit[0]) + 1)
    return int(float(m.group(1)) * scale)


def parse_mesh(text: str | None) -> dict[str, int] | None:
    """'data=1,fsdp=4' -> {'data': 1, 'fsdp': 4}."""
    if not text:
        return None
    out = {}
    for part in text.split(","):
        name, _, size = part.partition("=")
        if not size.strip().isdigit() or int(size) < 1:
            raise ValueError(f"--mesh {text!r}: expected axis=size pairs such as data=1,fsdp=4")
        out[name.strip()] = int(size)
    return out


def progress(total_bytes: int, desc: str) -> tqdm:
    return tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, dynamic_ncols=True)
