"""Tests judged outside the untrusted program: each `assert` of an item's tests splits into calls the sandbox
evaluates (the completion's functions applied to the test's inputs) and a check the trainer evaluates on the
values that come back as plain data.

    assert abs(area(2.0) - 12.566) < 1e-3   ->  sandbox: area(2.0)    trainer: abs(_v0 - 12.566) < 1e-3

A sandbox-side expression is a call of a function the test does not define itself (the program's), or a bare
name of the program's; everything around it (comparisons, `abs`, `sorted`, `len`, `math.isclose`, the expected
values) runs in the trainer on plain data, with SAFE_BUILTINS only, of which only CHEAP ones may take the
program's values (their cost is never the program's choice). Expected values never enter the
sandbox. Test files may hold `assert` and `import` statements (imports run before the calls in the sandbox, and
in the trainer for the modules in MODULES); anything else (assignments, loops, `def check(candidate)`, a check
the trainer could not evaluate cheaply on the program's values) makes the item "unsupported_test", which
scores 0: a test the trainer cannot judge is never handed to the program to judge itself.
"""
from __future__ import annotations

import ast
import builtins
import dataclasses
from types import CodeType

MODULES = ("math", "cmath", "string", "itertools", "collections", "functools", "operator", "heapq", "bisect")
# What a check may apply to the program's values: each costs at most O(n log n) on at most output_bytes of data.
CHEAP = ("abs", "all", "any", "bool", "float", "frozenset", "int", "isinstance", "len", "list", "max", "min",
         "round", "set", "sorted", "str", "tuple", "type", "dict", "math.isclose", "isclose")
SAFE_BUILTINS = {name: getattr(builtins, name) for name in (
    "abs", "all", "any", "bool", "bytes", "chr", "complex", "dict", "divmod", "enumerate", "filter", "float",
    "frozenset", "int", "isinstance", "len", "list", "map", "max", "min", "ord", "pow", "range", "repr",
    "reversed", "round", "set", "slice", "sorted", "str", "sum", "tuple", "type", "zip")}
_AROUND = (ast.Compare, ast.BoolOp, ast.BinOp, ast.UnaryOp, ast.Call, ast.Attribute, ast.Subscript, ast.Tuple,
           ast.List, ast.Set, ast.Dict, ast.IfExp, ast.Slice)


class Unsupported(ValueError):
    """The tests hold something the trainer cannot judge outside the program."""


@dataclasses.dataclass(frozen=True)
class Plan:
    setup: str  # the tests' imports, run in the sandbox after the program
    calls: tuple[str, ...]  # expressions the sandbox evaluates; their values are _v0, _v1, ...
    checks: tuple[tuple[CodeType, tuple[int, ...]], ...]  # per assert: the trainer's check and the calls it reads
    modules: dict  # the imported MODULES, for the checks


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else base + "." + node.attr
    return None


class _Splitter:
    def __init__(self, known: set[str], foreign: set[str]):
        self.known, self.foreign = known, foreign  # names the trainer has; names only the sandbox has
        self.calls: list[str] = []

    def evaluable(self, node: ast.AST) -> bool:
        """Whether the trainer can evaluate `node` by itself: only its names, the test's constants."""
        bound = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        bound |= {a.arg for n in ast.walk(node) if isinstance(n, ast.Lambda) for a in n.args.args}
        for n in ast.walk(node):
            if isinstance(n, (ast.NamedExpr, ast.Await, ast.Yield, ast.YieldFrom)):
                return False
            if isinstance(n, ast.Attribute) and n.attr.startswith("_"):
                raise Unsupported(f"attribute {n.attr!r} in a test")
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and n.id not in self.known | bound:
                return False
        return True

    def split(self, node: ast.AST) -> ast.AST:
        """`node` with the program's parts replaced by _vN names (their sources appended to self.calls)."""
        if isinstance(node, ast.keyword):
            node.value = self.split(node.value)
            return node
        if self.evaluable(node):
            return node
        if isinstance(node, ast.Name) or (isinstance(node, ast.Call) and not self.evaluable(node.func)):
            root = _dotted(node if isinstance(node, ast.Name) else node.func)
            if root is not None and root.split(".")[0] in self.foreign:
                raise Unsupported(f"{root} (a module the trainer does not import) would judge the program")
            self.calls.append(ast.unparse(node))
            return ast.copy_location(ast.Name(f"_v{len(self.calls) - 1}", ast.Load()), node)
        if not isinstance(node, _AROUND):
            raise Unsupported(f"{type(node).__name__} around the program's values: {ast.unparse(node)[:80]}")
        if isinstance(node, ast.BinOp) and (isinstance(node.op, (ast.Pow, ast.LShift)) or (  # 2 ** v, '%9999999d' % 1
                isinstance(node.op, ast.Mod) and not self.evaluable(node.left)) or (
                isinstance(node.op, ast.Mult) and not (self.evaluable(node.left) or self.evaluable(node.right)))):
            raise Unsupported(f"{ast.unparse(node)[:80]}: its cost would be the program's choice")
        if isinstance(node, ast.Call) and _dotted(node.func) not in CHEAP:
            raise Unsupported(f"{ast.unparse(node.func)} applied to the program's values")
        for field, value in ast.iter_fields(node):
            if isinstance(value, (ast.expr, ast.keyword)):
                setattr(node, field, self.split(value))
            elif isinstance(value, list):
                setattr(node, field, [self.split(v) if isinstance(v, (ast.expr, ast.keyword)) else v for v in value])
        return node


def parse(tests: str) -> Plan:
    """The plan for an item's tests (Unsupported when some statement cannot be judged outside the program)."""
    try:
        tree = ast.parse(tests)
    except SyntaxError as e:
        raise Unsupported(f"the tests do not parse: {e}") from None
    modules, foreign, setup, asserts = {}, set(), [], []
    for stmt in tree.body:
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            setup.append(ast.unparse(stmt))
            source = stmt.module if isinstance(stmt, ast.ImportFrom) else None
            for alias in stmt.names:
                name = alias.asname or alias.name.split(".")[0]
                module = (source or alias.name).split(".")[0]
                if module in MODULES and not getattr(stmt, "level", 0):
                    ns: dict = {}
                    exec(compile(ast.Module([stmt], []), "<tests>", "exec"), {"__builtins__": __builtins__}, ns)
                    modules.update(ns)
                else:
                    foreign.add(name)
        elif isinstance(stmt, ast.Assert):
            asserts.append(stmt.test)
        elif not (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)):  # a docstring is fine
            raise Unsupported(f"line {stmt.lineno}: only assert and import statements can be judged "
                              f"({type(stmt).__name__})")
    if not asserts:
        raise Unsupported("the tests hold no assert")
    splitter = _Splitter(set(SAFE_BUILTINS) | set(modules), foreign)
    checks = []
    for test in asserts:
        first = len(splitter.calls)
        expr = splitter.split(test)
        code = compile(ast.fix_missing_locations(ast.Expression(expr)), "<test>", "eval")
        checks.append((code, tuple(range(first, len(splitter.calls)))))
    return Plan("\n".join(setup), tuple(splitter.calls), tuple(checks), modules)


def judge(plan: Plan, values: list) -> bool:
    """Whether every check holds on `values` (per call: ("ok", value) or ("error", name), plain data)."""
    for code, reads in plan.checks:
        if any(values[i][0] != "ok" for i in reads):
            return False  # the program raised on this test's input
        env = {"__builtins__": SAFE_BUILTINS, **plan.modules, **{f"_v{i}": values[i][1] for i in reads}}
        try:
            if not eval(code, env):
                return False
        except Exception:  # e.g. a value of the wrong type for the check: the test fails, as it would have
            return False
    return True

