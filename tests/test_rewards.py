"""Rewards: a hand-written table of math answers, the format and exact rewards, `score` and the code reward."""

import importlib

import ml_collections
import numpy as np
import pytest

from zenjax.config import validate
from zenjax.plan import scoring_cost
from zenjax.rl import judge, rewards
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


def code(body: str) -> str:
    return "```python\n" + body + "\n```"


def test_honest_solutions_pass():
    items = [{"id": "q", "tests": ["import math", "assert hyp(3, 4) == 5.0", "assert math.isclose(hyp(1, 1), 2 ** .5)",
                                   "assert sorted(parts(6)) == [1, 2, 3]", "assert not parts(1)"]}]
    base = ("import math\ndef hyp(a, b):\n    return math.sqrt(a * a + b * b)\n"
            "def parts(n):\n    return [d for d in range(1, n) if n % d == 0]\n")
    comps = [code(base + "print('thinking out loud')"),
             code(base + "import sys\nsys.setrecursionlimit(10000)\n"
                  "def depth(n):\n    return 0 if n == 0 else 1 + depth(n - 1)\nassert depth(3000) == 3000"),
             code(base + "import json, collections, itertools, functools, heapq, re, fractions, threading\n"
                  "t = threading.Thread(target=print)\nt.start()\nt.join()"),
             code(base + "open('cache.txt', 'w').write('42')\nassert open('cache.txt').read() == '42'")]
    r, info = score(comps, items * 4, {"code": 1.0})
    np.testing.assert_array_equal(r, [1, 1, 1, 1]), info


# Hostile completions: each earns 1.0 when the tests run inside the program's process (the previous design).
EXPECTED = "zz-expected-zz"
HACKS = {
    "__eq__ always True": "class Any:\n    __eq__ = lambda s, o: True\n    __len__ = lambda s: 14\n"
                          "    __iter__ = lambda s: iter(sorted('zz-expected-zz'))\ndef answer(x):\n    return Any()",
    "an int subclass equal to everything": "class I(int):\n    __eq__ = lambda s, o: True\n"
                                           "    __hash__ = int.__hash__\ndef answer(x):\n    return I(0)",
    "a list holding such an object": "class Any:\n    __eq__ = lambda s, o: True\ndef answer(x):\n    return [Any()]",
    # The harness's frames, every object in memory, the process's files: the expected value is in none of them.
    "searching the caller's frames and the heap": """
import gc, sys
def answer(x):
    needle = 'zz-' + 'expected'  # not a constant of this code, which the search would find
    texts = []
    frame = sys._getframe(1)
    while frame:
        texts += list(frame.f_locals.values()) + list(frame.f_globals.values())
        frame = frame.f_back
    for o in gc.get_objects():
        texts += o if isinstance(o, (list, tuple)) else list(o.values()) if isinstance(o, dict) else []
    for t in texts:
        if isinstance(t, str) and needle in t and t != needle:
            return t[t.index(needle):t.index(needle) + 14]
    return None""",
    "reading the tests from files, argv, environment": """
import os, sys
def answer(x):
    seen = ' '.join(sys.argv) + ' '.join(os.environ.values())
    for d in ('.', '/tmp', '/proc/self', '/proc/1'):
        for n in os.listdir(d):
            try:
                seen += open(os.path.join(d, n), errors='replace').read()
            except OSError:
                pass
    i = seen.find('zz-' + 'expected')
    return seen[i:i + 14] if i >= 0 else None""",
    "importing the test module": "import tests\ndef answer(x):\n    return tests.EXPECTED",
    "excepthook, settrace and a patched assert": """
import builtins, sys
sys.excepthook = lambda *a: None
sys.settrace(lambda *a: None)
builtins.AssertionError = type('Never', (Exception,), {})
def answer(x):
    raise AssertionError('skip me')""",
    "printing a success marker and exiting": "import os\nprint('ok', flush=True)\nos._exit(0)",
    # Asking for the calls, then exiting before reading them: the supervisor's write fails, and is survived.
    "asking for the calls and leaving": """
import os, time
for fd in range(3, 10):  # close the read ends (the calls' among them), then ask
    try:
        os.write(fd, b'')
    except OSError:
        os.closerange(fd, fd + 1)
for fd in range(3, 10):
    try:
        os.write(fd, b'R')
    except OSError:
        pass
time.sleep(0.5)""",
    "monkeypatching builtins the check uses": "import builtins\nbuiltins.sorted = lambda x: ['zz-expected-zz']\n"
                                              "builtins.len = lambda x: 14\ndef answer(x):\n    return 'wrong'",
}


def test_reward_hacks_score_zero():
    tests = [f"assert answer(1) == {EXPECTED!r}", f"assert sorted(answer(2)) == sorted({EXPECTED!r})",
             "assert len(answer(3)) == 14"]
    names = list(HACKS)
    out = rewards.code_reward([code(HACKS[n]) for n in names] + [code(f"def answer(x):\n    return {EXPECTED!r}")],
                              [{"id": "hack", "tests": tests}] * (len(names) + 1), wall_s=10, memory_mb=256)
    reasons = dict(zip(names, out))
    assert reasons == {**dict.fromkeys(names, (0.0, "wrong")), "importing the test module": (0.0, "crash"),
                       "printing a success marker and exiting": (0.0, "early_exit"),
                       "asking for the calls and leaving": (0.0, "crash"),
                       # the patched len breaks the sandbox's own json: a hook can only make its program fail
                       "monkeypatching builtins the check uses": (0.0, "crash")}
    assert out[-1] == (1.0, None)  # the honest answer to the same tests


def test_judge_splits_asserts_into_calls_and_checks():
    plan = judge.parse("import math\nfrom typing import List\n'''doc'''\n"
                       "assert abs(area(2.0) - 12.566) < 1e-3, 'msg'\n"
                       "assert f(g(1), k=[i for i in range(3)]) == (1, 2)\n"
                       "assert math.isclose(area(1), 3.14159, rel_tol=1e-5) and not empty([])\nassert MAX == 5\n")
    assert plan.setup == "import math\nfrom typing import List"
    assert plan.calls == ("area(2.0)", "f(g(1), k=[i for i in range(3)])", "area(1)", "empty([])", "MAX")
    ok = [("ok", v) for v in (12.5664, (1, 2), 3.14159, [], 5)]
    assert judge.judge(plan, ok)
    assert not judge.judge(plan, ok[:1] + [("ok", [1, 2])] + ok[2:])  # a list is not the tuple the test wants
    assert not judge.judge(plan, ok[:4] + [("error", "NameError")])
    assert not judge.judge(plan, [("ok", "x")] + ok[1:])  # a str where the check subtracts: the test fails


@pytest.mark.parametrize("tests", [
    "x = [1, 2]\nassert f(x) == 3",  # an assignment
    "def check(candidate):\n    assert candidate(1) == 2",  # HumanEval's form
    "assert all(f(i) == i for i in range(3))",  # the verdict would be computed next to the program
    "import numpy as np\nassert np.allclose(f(1), [1.0])",  # a module the trainer does not import judges
    "assert 2 ** f(1) == 4",  # costs the program's value would choose
    "assert f(1) % 2 == 1",  # ('%2000000000d' % 2)
    "assert sum(f(1), []) == [1]",
    "assert f(1).__class__ == int",
    "assert f(1) ==",
    "print('no assert')",
])
def test_tests_the_trainer_cannot_judge_score_zero(tests):
    with pytest.raises(judge.Unsupported):
        judge.parse(tests)
    r, info = score([code("def f(x):\n    return x")], [{"id": "u", "tests": tests}], {"code": 1.0})
    assert r[0] == 0 and info["code/fail/unsupported_test"] == 1


def test_reward_options_from_the_config_section():
    section = ml_collections.ConfigDict({"code": {"weight": 2.0, "wall_s": 3.0, "workers": 2}, "math": 0.5})
    assert rewards.split(section) == ({"code": 2.0, "math": 0.5}, {"code": {"wall_s": 3.0, "workers": 2}})
    with pytest.raises(ValueError, match=r"rewards.code has unknown options \['walls'\]; it takes: allow_missing, "
                                         r"cpu_s, deadline_s, disk_bytes, memory_mb, output_bytes, wall_s, workers"):
        rewards.split({"code": {"weight": 1.0, "walls": 3}})
    with pytest.raises(ValueError, match="rewards.math needs a number 'weight'"):
        rewards.split({"math": {"partial": 1}})
    r, _ = score([code("def add(a, b):\n    return a + b")], [{"tests": TESTS}], {"code": section.code})
    assert r[0] == 2.0


def test_config_validation_and_plan_name_the_scoring_cost():
    c = importlib.import_module("configs.coder").get_config(None)
    assert validate(c, num_devices=8, num_processes=1)
    c.rewards.code.workers, c.rewards.code.deadline_s = 16, 60.0
    assert scoring_cost(c, 512) == ("code reward  512 programs/step on 16 workers, up to wall_s=10 s each: 320 s if "
                                    "all run to their limit; cut at deadline_s=60 s (programs unfinished then score 0)")
    c.rewards = ml_collections.ConfigDict({"code": {"weight": 1.0, "wall": 3.0}})
    with pytest.raises(ValueError, match=r"rewards.code has unknown options \['wall'\]"):
        validate(c, num_devices=8, num_processes=1)
