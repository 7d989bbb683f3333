"""The command line the zenjax tools share: `--config=FILE[:ARG]` and `--config.a.b=VALUE`, as ml_collections CLIs
take them, with every user error (an unknown field, a value of the wrong type, a missing file) as one line on
stderr and exit status 2.

Config paths are relative to the working directory, else to the checkout holding the `configs` package, so
`--config=configs/next.py` works from any directory.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import os
import sys
from collections.abc import Callable

import ml_collections
from absl import app, flags

USAGE_EXIT = 2  # exit status of a user error, as argparse uses


class UserError(Exception):
    """Bad input from the user (flags, config, the files they name): printed as one line, exit status 2."""


def message(e: BaseException) -> str:
    """An exception's text on one line (a KeyError's own quotes and ml_collections' newlines removed)."""
    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(str(text).split())


def fail(e: BaseException | str) -> None:
    print(f"error: {e if isinstance(e, str) else message(e)}", file=sys.stderr)
    sys.exit(USAGE_EXIT)


def _project_root() -> str | None:
    spec = importlib.util.find_spec("configs")
    return os.path.dirname(list(spec.submodule_search_locations)[0]) if spec else None


def config_file(path: str) -> str:
    """A config path as given, else relative to the checkout; the error names both places."""
    root = _project_root()
    for candidate in (path, os.path.join(root, path) if root and not os.path.isabs(path) else None):
        if candidate and os.path.isfile(candidate):
            return os.path.abspath(candidate)
    where = f"{os.getcwd()}" + (f" or {root}" if root else "")
    raise UserError(f"config file {path!r} not found in {where}; pass e.g. --config=configs/next.py:tiny")


def load_config(spec: str) -> ml_collections.ConfigDict:
    """`FILE[:ARG]` -> the file's `get_config(ARG)`."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location(f"_zenjax_config_{abs(hash(path))}", config_file(path))
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
        config = module.get_config(arg) if arg else module.get_config()
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"--config={spec}: {message(e)}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise UserError(f"--config={spec}: get_config() returned {type(config).__name__}, not a ConfigDict")
    return config


def _parse(text: str, old, key: str):
    """`text` as a value of the type the field has now."""
    def bad(kind):
        return UserError(f"--config.{key}={text}: expected {kind} (the field is {old!r})")

    if isinstance(old, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise bad("true or false")
        return text.lower() in ("true", "1")
    if isinstance(old, (int, float)):
        try:
            return type(old)(text) if isinstance(old, float) else int(text)
        except ValueError:
            raise bad("an int" if isinstance(old, int) else "a number") from None
    if isinstance(old, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise bad("a Python literal such as (0, 1) or {'math': 1.0}") from None
    if isinstance(old, (tuple, list)):
        return type(old)(value if isinstance(value, (tuple, list)) else (value,))
    if isinstance(old, ml_collections.ConfigDict):
        if not isinstance(value, dict):
            raise bad(f"a dict, or one of its fields such as --config.{key}.{next(iter(old), 'name')}=")
        return ml_collections.ConfigDict(value)
    return value


def override(config: ml_collections.ConfigDict, key: str, text: str) -> None:
    """Sets `config.<key>` (dotted) from its command-line text; unknown fields name the closest ones."""
    node, parts = config, key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            here = ".".join(parts[:i])
            fields = list(node) if isinstance(node, ml_collections.ConfigDict) else []
            close = difflib.get_close_matches(part, fields, n=1)
            hint = f" (did you mean --config.{'.'.join([*parts[:i], close[0]])}?)" if close else ""
            raise UserError(f"--config.{key}: the config has no field {part!r}"
                            f"{' in ' + here if here else ''}{hint}; --dry_run prints every field")
        if i < len(parts) - 1:
            node = node[part]
    with node.unlocked():
        node[parts[-1]] = _parse(text, node[parts[-1]], key)


def split_argv(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """(argv without the `--config.a.b=v` overrides, the overrides in order)."""
    rest, overrides, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            key, eq, value = arg[len("--config."):].partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    raise UserError(f"{arg} needs a value: {arg}=VALUE")
                i, value = i + 1, argv[i + 1]
            overrides.append((key, value))
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


# The help of each tool's --config flag (defined by the tool, so that --help lists it with the tool's own).
CONFIG_HELP = "config file[:tiny], e.g. configs/next.py:tiny; set any field with --config.a.b=VALUE"


HELP = {"--help", "-h", "-?", "--helpshort"}


def exit_on_help(argv: list[str]) -> None:
    """--help prints the tool's flags and exits 0 (absl's own exits 1, which reads as a failure in scripts)."""
    if HELP & set(argv):
        app.usage(shorthelp=True, writeto_stdout=True)
        sys.exit(0)


def run(main: Callable[[ml_collections.ConfigDict, list[str]], None]) -> None:
    """absl's app.run for a tool taking a config: `main(config, argv)` with the overrides applied; a UserError
    from flags, config or `main` is one line and exit status 2."""
    loaded = []

    def parse(argv):
        try:
            rest, overrides = split_argv(argv[1:])
            exit_on_help(rest)
            args = flags.FLAGS([argv[0], *rest])
            if flags.FLAGS.config is None:
                raise UserError("--config=configs/<family>.py[:tiny] is required")
            config = load_config(flags.FLAGS.config)
            for key, value in overrides:
                override(config, key, value)
        except (UserError, flags.Error) as e:
            fail(e)
        config.lock()  # code may change fields, never add them
        loaded.append(config)
        return args

    def call(argv):
        try:
            main(loaded[0], argv)
        except UserError as e:
            fail(e)

    app.run(call, flags_parser=parse)
