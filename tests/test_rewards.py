"""Rewards: a hand-written table of math answers, the format and exact rewards, `score` and the code reward."""

import numpy as np
import pytest

from zenjax.rl import rewards
from zenjax.rl.rewards import REWARDS, score

# (completion, reference answer, expected reward); each expectation decided by reading the pair.
MATH_CASES = [
    ("The answer is \\boxed{42}.", "42", 1.0),
    ("\\boxed{42}", "43", 0.0),
    ("so x = \\boxed{\\frac{3}{4}}", "0.75", 1.0),
    ("\\boxed{\\dfrac{3}{4}}", "3/4", 1.0),
    ("nested: \\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}", 1.0),
    ("\\boxed{\\frac{\\sqrt{3}}{2}} is it", "\\frac{\\sqrt{3}}{2}", 1.0),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{2}}{2}", 0.0),
    ("first \\boxed{1} then corrected to \\boxed{2}", "2", 1.0),
    ("first \\boxed{1} then corrected to \\boxed{2}", "1", 0.0),
    ("12 apples and 30 pears, so 42", "42", 1.0),
    ("so 42 and not 41", "42", 0.0),  # the last number counts
    ("The temperature is -7 degrees", "-7", 1.0),
    ("The temperature is -7 degrees", "7", 0.0),
    ("\\boxed{-3}", "-3", 1.0),
    ("it costs 3.50 dollars", "3.5", 1.0),
    ("pi is about 3.14159", "3.14159", 1.0),
    ("pi is about 3.14", "3.14159", 0.0),
    ("\\boxed{0.3333333}", "1/3", 1.0),  # within rel 1e-6
    ("\\boxed{0.333}", "1/3", 0.0),
    ("the total is 1,234,567", "1234567", 1.0),
    ("\\boxed{1,000}", "1000", 1.0),
    ("\\boxed{\\$1,000}", "1000", 1.0),
    ("\\boxed{5.0}", "5", 1.0),
    ("\\boxed{5}", "5.00", 1.0),
    ("\\boxed{+8}", "8", 1.0),
    ("\\boxed{x = 12}", "12", 1.0),
    ("\\boxed{ 2 }", "2", 1.0),
    ("\\boxed{50\\%}", "50", 1.0),
    ("3/4 of the cake", "0.75", 1.0),
    ("\\boxed{-\\frac{1}{2}}", "-0.5", 1.0),
    ("\\boxed{\\frac12}", "0.5", 1.0),
    ("answer 1e-7", "0", 0.0),  # relative tolerance only: 0 must be exact
    ("answer: 0", "0.0", 1.0),
    ("I do not know.", "42", 0.0),  # missing answer
    ("", "42", 0.0),
    ("\\boxed{never closed", "5", 0.0),
    ("<think>maybe 41? no, 42</think><answer>42</answer>", "42", 1.0),
    ("<think>the answer is 42</think> therefore 41", "42", 0.0),  # only the part after thinking counts
    ("<think>still thinking about 42", "42", 0.0),  # cut off mid-thought: no answer
    ("\\boxed{7}", "#### 7", 1.0),  # GSM8K-style reference
    ("\\boxed{8}", "The solution ... \\boxed{8}", 1.0),
    ("\\boxed{x^2+1}", "x^2 + 1", 1.0),
    ("\\boxed{(1,2)}", "(1, 2)", 1.0),
    ("\\boxed{(1,2)}", "(2, 1)", 0.0),
    ("the answer is 8−3 = 5", "5", 1.0),
]


@pytest.mark.parametrize("completion,reference,expected", MATH_CASES)
def test_math_table(completion, reference, expected):
    r, _ = score([completion], [{"id": "q", "answer": reference}], {"math": 1.0})
    assert r.dtype == np.float32 and r.shape == (1,)
    assert r[0] == expected, (completion, reference, rewards.extract_answer(completion))


def test_math_reasons_and_missing_reference():
    _, info = score(["\\boxed{1}", "nothing", "2"], [{"answer": "1"}] * 3, {"math": 1.0})
    assert info["math/mean"] == pytest.approx(1 / 3)
    assert info["math/fail/no_answer"] == 1 and info["math/fail/wrong"] == 1
    with pytest.raises(ValueError, match="no reference answer"):
        score(["1"], [{"id": "q7", "answer": None}], {"math": 1.0})


@pytest.mark.parametrize("completion,expected", [
    ("<think>a</think><answer>b</answer>", 1.0),
    ("  <think>\nlong\nthought\n</think>\n\n<answer> 42 </answer>\n", 1.0),
    ("<think>a</think>42", 0.5),
    ("<answer>42</answer>", 0.5),
    ("<think>a</think><answer>b</answer> trailing words", 0.5),
    ("<think>a<think>b</think></think><answer>c</answer>", 0.5),  # nested think: only the answer block is clean
    ("<think>a", 0.0),
    ("42", 0.0),
])
def test_format(completion, expected):
    r, _ = score([completion], [{"answer": None}], {"format": 1.0})
    assert r[0] == expected


def test_format_partial_option_and_weights():
    items = [{"answer": "42"}] * 2
    comps = ["<answer>42</answer>", "<think>x</think><answer>41</answer>"]
    r, info = score(comps, items, {"format": 2.0, "math": 1.0}, options={"format": {"partial": 0.25}})
    # format: 0.25 and 1.0 (x2); math: 1 and 0
    np.testing.assert_allclose(r, [2 * 0.25 + 1.0, 2 * 1.0 + 0.0])
    assert info["format/mean"] == pytest.approx(0.625) and info["math/mean"] == 0.5
    assert info["reward_time_s"] >= info["format/time_s"] >= 0


def test_exact():
    r, info = score(["8", " 8\n", "80", ""], [{"answer": "8"}] * 4, {"exact": 1.0})
    np.testing.assert_array_equal(r, [1, 1, 0, 0])
    assert info["exact/fail/wrong"] == 2


def test_score_errors():
    with pytest.raises(ValueError, match=r"unknown reward\(s\) \['nope'\]; known: \[.*'math'.*\]"):
        score(["1"], [{"answer": "1"}], {"nope": 1.0})
    with pytest.raises(ValueError, match="2 completions but 1 items"):
        score(["1", "2"], [{"answer": "1"}], {"math": 1.0})
    with pytest.raises(ValueError, match="not in weights"):
        score(["1"], [{"answer": "1"}], {"math": 1.0}, options={"code": {}})
    with pytest.raises(ValueError, match="already registered"):
        rewards.register("math")(lambda c, it: 0.0)
    assert {"math", "format", "code", "exact"} <= set(REWARDS)


def test_extract_code():
    c = ("<think>try ```python\nwrong()\n```</think>Here:\n```python\ndef f():\n    return 1\n```\n"
         "and usage ```py\nf()\n```")
    assert rewards.extract_code(c) == "f()\n"  # the last block after the thinking
    assert rewards.extract_code("```python\nx = 1\n```") == "x = 1\n"
    assert rewards.extract_code("def f(): return 2") == "def f(): return 2"
    assert rewards.extract_code("<think>never ends ```python\nx=1\n```") is None
    assert rewards.extract_code("   ") is None


TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"


def test_code_reward():
    comps = [
        "Sure!\n```python\ndef add(a, b):\n    return a + b\n```",
        "```python\ndef add(a, b):\n    return a - b\n```",
        "```python\ndef add(a, b):\n    while True:\n        pass\n```\n",
        "```python\nimport sys\nsys.exit(0)\n```",  # exits before the tests: no pass
        "no code at all? <think>",
        "```python\ndef add(a, b) return\n```",
    ]
    items = [{"id": str(i), "tests": TESTS} for i in range(len(comps))]
    r, info = score(comps, items, {"code": 1.0}, options={"code": {"wall_s": 3, "cpu_s": 1, "memory_mb": 256}})
    np.testing.assert_array_equal(r, [1, 0, 0, 0, 0, 0])
    assert info["code/fail/wrong"] == 1 and info["code/fail/timeout"] == 1 and info["code/fail/early_exit"] == 1
    assert info["code/fail/no_code"] == 1 and info["code/fail/crash"] == 1
    assert info["code/time_s"] < 10
    # tests given as a list of asserts
    r, _ = score([comps[0]], [{"tests": TESTS.split("\n")}], {"code": 1.0})
    assert r[0] == 1
    with pytest.raises(ValueError, match="no tests"):
        score([comps[0]], [{"id": "x", "tests": None}], {"code": 1.0})
