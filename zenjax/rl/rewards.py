"""Reward functions by name, and `score` that combines them with weights.

A reward sees the decoded completion (without the prompt, cut at eos) and the prompt's item dict
({"id", "prompt", "answer", "tests", ...}). It returns a float, or (float, reason) where reason names why it
failed (counted in the info dict). Options for a reward come from `score(..., options={name: {...}})`.
"""

from __future__ import annotations

import collections
import math
import re
import time
from collections.abc import Callable

import numpy as np

from zenjax.rl import sandbox

REWARDS: dict[str, Callable] = {}  # name -> fn(completions, items, **options) -> list[float | (float, reason)]


def register(name: str, *, batched: bool = False):
    """Register a reward. Per-item fns take (completion, item, **options); batched ones take lists."""

    def deco(fn):
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is already registered")
        if batched:
            REWARDS[name] = fn
        else:
            REWARDS[name] = lambda completions, items, **opts: [fn(c, it, **opts) for c, it in zip(completions, items)]
        return fn

    return deco


def score(completions: list[str], items: list[dict], weights: dict[str, float],
          options: dict[str, dict] | None = None) -> tuple[np.ndarray, dict]:
    """Weighted sum of the named rewards for each completion.

    Returns rewards float32 [N] and info: "<name>/mean", "<name>/fail/<reason>" counts, "<name>/time_s" and
    "reward_time_s". A weight of 0 computes and logs a reward without it counting.
    """
    if len(completions) != len(items):
        raise ValueError(f"{len(completions)} completions but {len(items)} items")
    unknown = sorted(set(weights) - set(REWARDS))
    if unknown:
        raise ValueError(f"unknown reward(s) {unknown}; known: {sorted(REWARDS)}")
    options = options or {}
    extra = sorted(set(options) - set(weights))
    if extra:
        raise ValueError(f"options given for reward(s) {extra} that are not in weights {sorted(weights)}")
    start = time.perf_counter()
    total = np.zeros(len(completions), np.float64)
    info: dict[str, float] = {}
    for name, weight in weights.items():
        t = time.perf_counter()
        results = REWARDS[name](completions, items, **options.get(name, {}))
        values = np.zeros(len(completions), np.float64)
        reasons = collections.Counter()
        for i, r in enumerate(results):
            value, reason = r if isinstance(r, tuple) else (r, None)
            values[i] = value
            if reason is not None:
                reasons[reason] += 1
        total += weight * values
        info[f"{name}/mean"] = float(values.mean()) if len(values) else 0.0
        info[f"{name}/time_s"] = time.perf_counter() - t
        for reason, count in sorted(reasons.items()):
            info[f"{name}/fail/{reason}"] = count
    info["reward_time_s"] = time.perf_counter() - start
    return total.astype(np.float32), info


# ----------------------------------------------------------------------------------------------- answers

def _final_part(text: str) -> str | None:
    """The part of a completion that holds its answer: inside the last <answer> block, else after </think>.
    None while a <think> is still open (a completion cut off mid-thought has no answer)."""
    blocks = re.findall(r"<answer>(.*?)</answer>", text, re.S)
    if blocks:
        return blocks[-1]
    if "</think>" in text:
        return text.rsplit("</think>", 1)[1]
    return None if "<think>" in text else text


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), nested braces included."""
    matches = list(re.finditer(r"\\(?:boxed|fbox)", text))
    if not matches:
        return None
    i = matches[-1].end()
    while i < len(text) and text[i] == " ":
        i += 1
    if i < len(text) and text[i] != "{":  # "\boxed 5"
        m = re.match(r"[^\s$]+", text[i:])
        return m.group(0) if m else None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None  # unbalanced: the box was never closed


_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def extract_answer(text: str) -> str | None:
    """The final answer of a completion: the last \\boxed{}, else the last number; None if neither."""
    part = _final_part(text)
    if part is None:
        return None
    boxed = _last_boxed(part)
    if boxed is not None:
        return boxed
    numbers = _NUMBER.findall(part)
    return numbers[-1] if numbers else None


def _unwrap_frac(s: str) -> str:
    # \frac{a}{b} -> (a)/(b); a plain-number side loses its parentheses below.
    while True:
        m = re.search(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", s) or re.search(r"\\frac(\d)(\d)", s)
        if not m:
            return s
        s = s[:m.start()] + f"({m.group(1)})/({m.group(2)})" + s[m.end():]


def normalize_answer(s: str) -> str:
    """Canonical text of an answer: without LaTeX spacing, \\left/\\right, \\text{} wrappers, $, %, degrees,
    whitespace, thousands commas, a leading + or "x =", a trailing . or .0; \\frac{a}{b} as a/b."""
    s = s.strip().replace("\u2212", "-")  # unicode minus
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    for old, new in (("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\left", ""), ("\\right", ""),
                     ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\:", ""), ("\\$", ""), ("$", ""),
                     ("\\%", ""), ("%", ""), ("^\\circ", ""), ("^{\\circ}", "")):
        s = s.replace(old, new)
    s = _unwrap_frac(s)
    s = re.sub(r"\s+", "", s)
    s = re.sub(r"^[a-zA-Z]=", "", s)
    s = re.sub(r"(\d),(?=\d{3}(?!\d))", r"\1", s)
    s = re.sub(r"\((-?[\d.]+)\)", r"\1", s)
    s = s.rstrip(".")
    s = s.removeprefix("+")
    s = re.sub(r"^(-?\d+)\.0+$", r"\1", s)
    return s


def _to_number(s: str) -> float | None:
    m = re.fullmatch(r"(-?[\d.]+)/(-?[\d.]+)", s)
    try:
        if m:
            den = float(m.group(2))
            return float(m.group(1)) / den if den else None
        return float(s) if re.fullmatch(r"-?(\d+\.?\d*|\.\d+)(e-?\d+)?", s) else None
    except ValueError:
        return None


def answers_match(answer: str, reference: str) -> bool:
    """Same normalised text, or the same number within relative 1e-6 (fractions and decimals alike)."""
    a, r = normalize_answer(answer), normalize_answer(reference)
    if a == r:
        return True
    x, y = _to_number(a), _to_number(r)
    return x is not None and y is not None and math.isclose(x, y, rel_tol=1e-6)


def _reference(item: dict) -> str:
    ref = item.get("answer")
    if ref is None:
        raise ValueError(f"item {item.get('id')!r} has no reference answer (check data.answer_field)")
    ref = str(ref)
    if "####" in ref:  # GSM8K style: worked solution, then #### answer
        ref = ref.rsplit("####", 1)[1]
    boxed = _last_boxed(ref)
    return boxed if boxed is not None else ref


@register("math")
def math_reward(completion: str, item: dict):
    """1 if the completion's final answer equals the item's reference answer, else 0."""
    answer = extract_answer(completion)
    if answer is None:
        return 0.0, "no_answer"
    return (1.0, None) if answers_match(answer, _reference(item)) else (0.0, "wrong")


@register("exact")
def exact_reward(completion: str, item: dict):
    """1 if the whole completion, stripped, is the reference answer (synthetic tasks), else 0."""
    return (1.0, None) if completion.strip() == _reference(item).strip() else (0.0, "wrong")


_FULL_FORMAT = re.compile(r"\s*<think>(?:(?!</?think>).)*</think>\s*<answer>(?:(?!</?answer>).)*</answer>\s*", re.S)
_BLOCKS = (re.compile(r"<think>(?:(?!</?think>).)*</think>", re.S),
           re.compile(r"<answer>(?:(?!</?answer>).)*</answer>", re.S))


@register("format")
def format_reward(completion: str, item: dict, *, partial: float = 0.5):
    """1 for exactly `<think>...</think><answer>...</answer>` (whitespace around allowed); `partial` when only
    some of it is there (either block well formed, once); else 0."""
    if _FULL_FORMAT.fullmatch(completion):
        return 1.0, None
    if any(len(b.findall(completion)) == 1 for b in _BLOCKS):
        return partial, "partial"
    return 0.0, "no_format"


# ------------------------------------------------------------------------------------------------- code

def extract_code(completion: str) -> str | None:
    """The last ```python (or ```py, or bare ```) block after any thinking; else the whole answer part."""
    part = _final_part(completion)
    if part is None:
        return None
    blocks = re.findall(r"```(?:python|py|python3)?[ \t]*\n(.*?)```", part, re.S | re.I)
    code = blocks[-1] if blocks else part
    return code if code.strip() else None


def _tests(item: dict) -> str:
    tests = item.get("tests")
    if tests is None:
        raise ValueError(f"item {item.get('id')!r} has no tests (check data.tests_field)")
    return "\n".join(tests) if isinstance(tests, (list, tuple)) else str(tests)


@register("code", batched=True)
def code_reward(completions: list[str], items: list[dict], *, max_workers: int | None = None, **limits):
    """1 if the completion's code followed by the item's tests runs to its end in the sandbox, else 0.
    Options: max_workers (parallel programs) and any field of sandbox.Limits (wall_s, cpu_s, memory_mb, ...)."""
    lim = sandbox.Limits(**limits)
    programs, slots = [], []
    for i, (c, it) in enumerate(zip(completions, items)):
        code = extract_code(c)
        if code is not None:
            programs.append(code + "\n\n" + _tests(it) + "\n")
            slots.append(i)
    out: list = [(0.0, "no_code")] * len(completions)
    for i, res in zip(slots, sandbox.run_many(programs, lim, max_workers)):
        out[i] = (1.0, None) if res.passed else (0.0, res.reason)
    return out
