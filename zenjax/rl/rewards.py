"""Reward functions by name, and `score` that combines them with weights.

A reward sees the decoded completion (without the prompt, cut at eos) and the prompt's item dict
({"id", "prompt", "answer", "tests", ...}). It returns a float, or (float, reason) where reason names why it
failed (counted in the info dict). A reward's options are its keyword-only parameters; the config's `rewards`
section gives each reward a weight, or {"weight": w, option: value, ...} (`split`).
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import logging
import math
import re
import time
from collections.abc import Callable

import numpy as np

from zenjax.rl import judge, sandbox

log = logging.getLogger(__name__)
REWARDS: dict[str, Callable] = {}  # name -> fn(completions, items, **options) -> list[float | (float, reason)]
OPTIONS: dict[str, frozenset] = {}  # name -> the options it takes


def register(name: str, *, batched: bool = False, options_from: type | None = None):
    """Register a reward. Per-item fns take (completion, item, **options); batched ones take lists. Its options
    are its keyword-only parameters, and the fields of the dataclass `options_from` that its **kwargs take."""

    def deco(fn):
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is already registered")
        if batched:
            REWARDS[name] = fn
        else:
            REWARDS[name] = lambda completions, items, **opts: [fn(c, it, **opts) for c, it in zip(completions, items)]
        params = inspect.signature(fn).parameters.values()
        names = {p.name for p in params if p.kind is p.KEYWORD_ONLY}
        if options_from is not None:
            names |= {f.name for f in dataclasses.fields(options_from)}
        OPTIONS[name] = frozenset(names)
        return fn

    return deco


def split(section) -> tuple[dict[str, float], dict[str, dict]]:
    """The config's `rewards` section ({name: weight | {"weight": w, **options}}) as (weights, options);
    ValueError naming every unknown reward, missing weight and unknown option."""
    weights, options, errors = {}, {}, []
    for name, spec in dict(section).items():
        if name not in REWARDS:
            errors.append(f"reward {name!r} is not registered: {', '.join(sorted(REWARDS))}")
            continue
        if isinstance(spec, (int, float)):
            weights[name] = float(spec)
            continue
        spec = dict(spec)
        if not isinstance(spec.get("weight"), (int, float)):
            errors.append(f"rewards.{name} needs a number 'weight' next to its options")
        unknown = sorted(set(spec) - {"weight"} - OPTIONS[name])
        if unknown:
            errors.append(f"rewards.{name} has unknown options {unknown}; it takes: {', '.join(sorted(OPTIONS[name]))}")
        weights[name] = spec.pop("weight", 0.0)
        options[name] = spec
    if errors:
        raise ValueError("; ".join(errors))
    return weights, options


def score(completions: list[str], items: list[dict], weights, options: dict[str, dict] | None = None
          ) -> tuple[np.ndarray, dict]:
    """Weighted sum of the named rewards for each completion.

    `weights`: the config's `rewards` section (`split`); `options` add to the options it holds. Returns rewards
    float32 [N] and info: "<name>/mean", "<name>/fail/<reason>" counts, "<name>/time_s" and "reward_time_s".
    A weight of 0 computes and logs a reward without it counting.
    """
    if len(completions) != len(items):
        raise ValueError(f"{len(completions)} completions but {len(items)} items")
    unknown = sorted(set(weights) - set(REWARDS))
    if unknown:
        raise ValueError(f"unknown reward(s) {unknown}; known: {sorted(REWARDS)}")
    weights, given = split(weights)
    extra = sorted(set(options or {}) - set(weights))
    if extra:
        raise ValueError(f"options given for reward(s) {extra} that are not in weights {sorted(weights)}")
    options = {name: {**given.get(name, {}), **(options or {}).get(name, {})} for name in weights}
    start = time.perf_counter()
    total = np.zeros(len(completions), np.float64)
    info: dict[str, float] = {}
    for name, weight in weights.items():
        t = time.perf_counter()
        results = REWARDS[name](completions, items, **options[name])
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


@register("code", batched=True, options_from=sandbox.Limits)
def code_reward(completions: list[str], items: list[dict], *, workers: int = 0, deadline_s: float = 120.0,
                allow_missing: str = "", **limits):
    """1 if the completion's code runs in the sandbox and the item's tests hold on the values its functions
    return (judged in the trainer: zenjax.rl.judge), else 0.
    Options: workers (programs at once; 0: this host's cores), deadline_s (per call of `score`, i.e. per step:
    programs still running then are stopped and score 0 "timeout"; 0: none), allow_missing (isolation layers the
    user accepts to run without: sandbox.require) and any field of sandbox.Limits (wall_s, cpu_s, memory_mb, ...)."""
    sandbox.require(allow_missing)
    lim = sandbox.Limits(**limits)
    out: list = [(0.0, "no_code")] * len(completions)
    plans: dict[str, judge.Plan | None] = {}
    jobs = []
    for i, (c, it) in enumerate(zip(completions, items)):
        tests = _tests(it)
        if tests not in plans:
            try:
                plans[tests] = judge.parse(tests)
            except judge.Unsupported as e:
                log.warning("code reward: item %r scores 0: %s", it.get("id"), e)
                plans[tests] = None
        code = extract_code(c)
        if plans[tests] is None:
            out[i] = (0.0, "unsupported_test")
        elif code is not None:
            jobs.append((i, code, plans[tests]))
    results = sandbox.run_many([code for _, code, _ in jobs], lim, workers or None,
                               calls=[p.calls for _, _, p in jobs], setups=[p.setup for _, _, p in jobs],
                               deadline_s=deadline_s or None)
    for (i, _, plan), res in zip(jobs, results):
        if not res.passed:
            out[i] = (0.0, res.reason)
        else:
            out[i] = (1.0, None) if judge.judge(plan, res.values) else (0.0, "wrong")
    return out
